"""Small file helpers shared by every writer: atomic writes (temp file + rename), write checks and sha256."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path


class WriteError(OSError):
    """A file could not be written (disk full, read-only folder); the message is one line with a fix."""


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Call write(tmp_path) on a temporary file beside `path`, fsync, then rename it to `path`.

    The file gets the mode a plain open(path, "w") gives a new file, 0o666 & ~umask (mkstemp's temporary file
    is 0o600, which would otherwise be renamed into place). On any failure (including KeyboardInterrupt) the
    temporary file is removed and `path` is untouched; an OSError becomes a WriteError naming `path`.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path), suffix=".tmp", dir=path.parent)
    except OSError as error:
        raise _write_error(path, error) from error
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(error, OSError) and not isinstance(error, WriteError):
            raise _write_error(path, error) from error
        raise


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """atomic_write of a bytes object."""
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def current_umask() -> int:
    """The process's umask, read from /proc (Linux) where it can be, else by setting and restoring it (which
    briefly changes it for every thread)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def temp_prefix(path: Path) -> str:
    """Name prefix of atomic_write's temporary files for `path` (left behind only by a killed process)."""
    return f".{path.name}."


def remove_stale_temps(path: Path) -> None:
    """Delete temporary files a killed writer of `path` left beside it."""
    for stale in path.parent.glob(f"{temp_prefix(path)}*.tmp"):
        stale.unlink(missing_ok=True)


def _write_error(path: Path, error: OSError) -> WriteError:
    reason = error.strerror or str(error)
    return WriteError(f"cannot write {path}: {reason}; free disk space or choose a writable folder")


def unwritable_reason(folder: str | Path) -> str | None:
    """Why files cannot be created in `folder` (or, while it does not exist, its nearest existing parent);
    None if they can. Creates nothing that outlives the call."""
    existing = Path(folder)
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is a file, not a folder"
    try:
        tempfile.TemporaryFile(dir=existing).close()
    except OSError as error:
        return f"cannot create files in {existing} ({error.strerror or error})"
    return None


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


CODE_FOLDERS = ("configs", "quant_layers", "utils")


def code_fingerprint(root: str | Path = Path(__file__).resolve().parents[2]) -> str:
    """sha256 (first 16 hex digits) over the path and bytes of main.py and every .py file of the code folders:
    which code made a result, also where no git history travels with the code (the GPU machine)."""
    root = Path(root)
    files = [root / "main.py"] + sorted(p for folder in CODE_FOLDERS for p in (root / folder).rglob("*.py"))
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]
