"""Tests for utils.data.cache: cache root, wheel fetching (fake pip, no network) and hub_reachable."""

from __future__ import annotations

import hashlib
import socket
import subprocess
from pathlib import Path

import pytest

from utils.data.cache import CacheError, cache_dir, fetch_wheel, hub_reachable

WHEEL = "demo_pkg-1.0-py3-none-any.whl"
CONTENT = b"PK fake wheel bytes"
DIGEST = hashlib.sha256(CONTENT).hexdigest()


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LLM_FP4_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("DEMO_WHEEL", raising=False)


@pytest.fixture
def pip_calls(monkeypatch) -> list[list[str]]:
    """Fake ``pip download``: writes WHEEL into the ``-d`` folder and records each command."""
    calls = []

    def run(cmd, **_):
        calls.append(cmd)
        (Path(cmd[cmd.index("-d") + 1]) / WHEEL).write_bytes(CONTENT)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(subprocess, "run", run)
    return calls


def _no_pip(monkeypatch) -> None:
    def run(cmd, **_):
        raise AssertionError(f"unexpected subprocess {cmd}")

    monkeypatch.setattr(subprocess, "run", run)


def test_cache_dir(tmp_path):
    assert cache_dir() == tmp_path / "cache" and (tmp_path / "cache").is_dir()
    assert cache_dir(tmp_path / "other") == tmp_path / "other" and (tmp_path / "other").is_dir()


def test_env_var_path(tmp_path, monkeypatch):
    _no_pip(monkeypatch)
    given = tmp_path / "mine.whl"
    given.write_bytes(CONTENT)
    monkeypatch.setenv("DEMO_WHEEL", str(given))
    assert fetch_wheel("demo-pkg", "1.0", env_var="DEMO_WHEEL", sha256=DIGEST) == given
    monkeypatch.setenv("DEMO_WHEEL", str(tmp_path / "missing.whl"))
    with pytest.raises(CacheError, match="DEMO_WHEEL=.*missing.whl is not a file"):
        fetch_wheel("demo-pkg", "1.0", env_var="DEMO_WHEEL")


def test_download_once_then_cached(tmp_path, pip_calls, monkeypatch, capsys):
    first = fetch_wheel("demo-pkg", "1.0", sha256=DIGEST)
    assert first == tmp_path / "cache" / "wheels" / WHEEL and first.read_bytes() == CONTENT
    assert len(pip_calls) == 1 and "demo-pkg==1.0" in pip_calls[0] and "--no-deps" in pip_calls[0]
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "downloading demo-pkg==1.0" in err
    assert [p.name for p in first.parent.iterdir()] == [WHEEL]  # no temporary folder left
    _no_pip(monkeypatch)
    assert fetch_wheel("demo-pkg", "1.0", sha256=DIGEST) == first
    assert capsys.readouterr().err == ""


def test_cache_argument(tmp_path, pip_calls):
    assert fetch_wheel("demo-pkg", "1.0", cache=tmp_path / "elsewhere") == tmp_path / "elsewhere" / "wheels" / WHEEL


def test_sha256_mismatch(tmp_path, pip_calls, monkeypatch):
    with pytest.raises(CacheError, match="sha256") as err:
        fetch_wheel("demo-pkg", "1.0", sha256="0" * 64)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "cache" / "wheels" / WHEEL).exists()  # a bad download is not kept
    fetch_wheel("demo-pkg", "1.0")
    with pytest.raises(CacheError, match="delete it"):
        fetch_wheel("demo-pkg", "1.0", sha256="0" * 64)  # cached copy checked too
    given = tmp_path / "mine.whl"
    given.write_bytes(b"other bytes")
    monkeypatch.setenv("DEMO_WHEEL", str(given))
    with pytest.raises(CacheError, match="sha256"):
        fetch_wheel("demo-pkg", "1.0", env_var="DEMO_WHEEL", sha256=DIGEST)


def test_pip_failure(tmp_path, monkeypatch):
    monkeypatch.setattr(subprocess, "run",
                        lambda cmd, **_: subprocess.CompletedProcess(cmd, 1, "", "ERROR: no route\nmore\n"))
    with pytest.raises(CacheError, match=r"'pip download demo-pkg==1.0' failed \(exit 1: more\); set DEMO_WHEEL"):
        fetch_wheel("demo-pkg", "1.0", env_var="DEMO_WHEEL")
    assert list((tmp_path / "cache" / "wheels").iterdir()) == []


@pytest.mark.parametrize("var", ["HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"])
def test_hub_offline_env(var, monkeypatch):
    def connect(*_, **__):
        raise AssertionError("no connection attempt expected")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setenv(var, "1")
    monkeypatch.setattr(socket, "create_connection", connect)
    assert hub_reachable() is False


def test_hub_probe_target(monkeypatch):
    seen = []

    class Conn:
        def close(self) -> None:
            pass

    def connect(address, timeout):
        seen.append(address)
        return Conn()

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HTTPS_PROXY", "https_proxy", "HF_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(socket, "create_connection", connect)
    assert hub_reachable()
    monkeypatch.setenv("HF_ENDPOINT", "http://mirror.example:8080")
    assert hub_reachable()
    monkeypatch.setenv("HTTPS_PROXY", "proxy.example:3128")
    assert hub_reachable()
    assert seen == [("huggingface.co", 443), ("mirror.example", 8080), ("proxy.example", 3128)]


def test_hub_unreachable(monkeypatch):
    def refuse(*_, **__):
        raise OSError("connection refused")

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(socket, "create_connection", refuse)
    assert hub_reachable() is False
