"""Atomic writes give the file the permissions an ordinary write would."""

import os
import stat

import pytest

from utils.run import fileio


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_file_mode_follows_the_umask(tmp_path, umask, mode):
    previous = os.umask(umask)
    try:
        fileio.write_bytes_atomic(tmp_path / "results.json", b"{}")
        fileio.atomic_write(tmp_path / "params.pt", lambda tmp: open(tmp, "wb").write(b"x"))
    finally:
        os.umask(previous)
    for name in ("results.json", "params.pt"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode
    assert (tmp_path / "results.json").read_bytes() == b"{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.pt", "results.json"]  # no temporary left


def test_current_umask_reads_without_changing_it():
    previous = os.umask(0o027)
    try:
        assert fileio.current_umask() == 0o027
        assert os.umask(0o027) == 0o027  # still what it was
    finally:
        os.umask(previous)
