"""Fixtures of the weights tests: the cache in ``tmp_path`` (every test), a local HTTP
server, a dead URL, and the fake payload registered as model 'tiny'."""

from __future__ import annotations

import socket

import pytest

from napari_mobilesam import weights as w

from .common import LocalServer, make_info


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch, tmp_path):
    """No proxy for the local server, the cache in tmp_path, no mirror."""
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("MOBILESAM_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("MOBILESAM_WEIGHTS_MIRROR", raising=False)


@pytest.fixture
def server():
    srv = LocalServer()
    srv.thread.start()
    yield srv
    srv.httpd.shutdown()
    srv.httpd.server_close()
    srv.thread.join(timeout=5)


@pytest.fixture
def dead_url():
    """Base URL of a port on 127.0.0.1 where nothing listens."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.fixture
def tiny(monkeypatch):
    """Register the test payload as model 'tiny' (its own URL is dead: use a mirror)."""
    info = make_info()
    monkeypatch.setitem(w.REGISTRY, "tiny", info)
    return info
