"""Tests of the weights registry, the downloader and the ``mobilesam`` command line.

Downloads are tested against a local HTTP server on 127.0.0.1 (never the internet)
serving small fake payloads; ``MOBILESAM_CACHE`` points at ``tmp_path``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from napari_mobilesam import cli
from napari_mobilesam import download as dl
from napari_mobilesam import weights as w
from napari_mobilesam.weights import ModelInfo, WeightsError

PAYLOAD = bytes(range(256)) * 16  # 4 KiB
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()

VIT_T = {
    "filename": "mobile_sam.pt",
    "url": "https://github.com/ChaoningZhang/MobileSAM/raw/master/weights/mobile_sam.pt",
    "sha256": "6dbb90523a35330fedd7f1d3dfc66f995213d81b29a5ca8108dbcdd4e37d6c2f",
    "size": 40728226,
    "license": "Apache-2.0",
}


# ---------------------------------------------------------------------------- fixtures


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves ``server.routes[path] = (body, announced_length, delay_s)``; else 404."""

    def do_GET(self) -> None:
        self.server.hits.append(self.path)
        route = self.server.routes.get(self.path)
        if route is None:
            self.send_error(404, "Not Found")
            return
        body, announced, delay = route
        if delay:
            time.sleep(delay)
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body) if announced is None else announced))
        self.end_headers()
        try:
            self.wfile.write(body)
            self.wfile.flush()
        except OSError:  # the client gave up (timeout test)
            pass
        self.close_connection = True  # a short body then EOF: a truncated transfer

    def log_message(self, format, *args) -> None:
        pass


class _Server(http.server.ThreadingHTTPServer):
    block_on_close = False  # don't wait for a sleeping handler at teardown


class LocalServer:
    """A stdlib HTTP server on 127.0.0.1 at a free port, in a background thread."""

    def __init__(self) -> None:
        self.httpd = _Server(("127.0.0.1", 0), _Handler)
        self.httpd.routes = {}
        self.httpd.hits = []
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def hits(self) -> list[str]:
        return self.httpd.hits

    def serve(
        self, path: str, body: bytes, *, announce: int | None = None, delay: float = 0.0
    ) -> str:
        """Serve ``body`` at ``path`` (announcing ``announce`` bytes); returns its URL."""
        self.httpd.routes[path] = (body, announce, delay)
        return self.base + path


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


def make_info(url: str = "http://127.0.0.1:9/tiny.pt", **kw) -> ModelInfo:
    """A ModelInfo for PAYLOAD (real sha256 and size) unless overridden."""
    fields = {
        "name": "tiny",
        "filename": "tiny.pt",
        "url": url,
        "sha256": PAYLOAD_SHA,
        "size": len(PAYLOAD),
        "license": "MIT",
        "description": "test payload",
    }
    fields.update(kw)
    return ModelInfo(**fields)


@pytest.fixture
def tiny(monkeypatch):
    """Register the test payload as model 'tiny' (its own URL is dead: use a mirror)."""
    info = make_info()
    monkeypatch.setitem(w.REGISTRY, "tiny", info)
    return info


def leftovers(folder: Path) -> list[str]:
    """Temporary files left in ``folder``."""
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".part"))


def sparse_file(path: Path, size: int) -> Path:
    """A file of ``size`` bytes without writing them (fast even for 40 MB)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.truncate(size)
    return path


# ---------------------------------------------------------------------------- registry


def test_registry_lists_the_four_published_models_and_the_bundled_one():
    assert list(w.REGISTRY) == ["vit_t", "vit_b", "vit_l", "vit_h", "vit_t_synthetic_cells"]
    for name, info in w.REGISTRY.items():
        assert info.name == name
        if info.bundled:
            assert info.url == "" and info.network == "vit_t"
            continue
        assert info.license == "Apache-2.0"
        assert info.url.startswith("https://") and info.url.endswith("/" + info.filename)
        assert len(info.sha256) == 64 and info.size > 0 and info.description


def test_registry_vit_t_values_exactly():
    info = w.get_model_info("vit_t")
    assert {k: getattr(info, k) for k in VIT_T} == VIT_T


def test_registry_sam_values():
    assert w.REGISTRY["vit_b"].filename == "sam_vit_b_01ec64.pth"
    assert w.REGISTRY["vit_b"].size == 375042383
    assert w.REGISTRY["vit_l"].sha256.startswith("3adcc4315b64")
    assert w.REGISTRY["vit_h"].size == 2564550879


def test_model_info_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        w.REGISTRY["vit_t"].size = 1


def _write_registry(path: Path, models) -> Path:
    path.write_text(json.dumps({"schema_version": 1, "models": models}))
    return path


def test_load_registry_takes_the_first_existing_file(tmp_path):
    entry = {**VIT_T, "description": "d"}
    second = _write_registry(tmp_path / "b.json", {"x": entry})
    infos = w._load_registry([tmp_path / "missing.json", second])
    assert list(infos) == ["x"] and infos["x"].filename == "mobile_sam.pt"
    assert infos["x"].source == ""


def test_load_registry_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing\.json"):
        w._load_registry([tmp_path / "missing.json"])


def test_load_registry_invalid_json(tmp_path):
    path = tmp_path / "r.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        w._load_registry([path])


def test_load_registry_without_models(tmp_path):
    path = tmp_path / "r.json"
    path.write_text("[]")
    with pytest.raises(ValueError, match="no 'models'"):
        w._load_registry([path])


@pytest.mark.parametrize(
    ("entry", "match"),
    [
        ("a string", "expected an object"),
        ({"filename": "a.pt"}, "missing keys"),
        ({"size": 0}, "'size' must be a positive integer"),
        ({"size": "5"}, "'size' must be a positive integer"),
        ({"size": True}, "'size' must be a positive integer"),
        ({"sha256": "ABC"}, "'sha256' must be 64"),
        ({"filename": "sub/a.pt"}, "'filename' must be a bare file name"),
        ({"filename": ""}, "'filename' must be a bare file name"),
    ],
)
def test_load_registry_malformed_entry(tmp_path, entry, match):
    if isinstance(entry, dict) and "missing keys" not in match:
        entry = {**VIT_T, "description": "d", **entry}
    path = _write_registry(tmp_path / "r.json", {"bad": entry})
    with pytest.raises(ValueError, match=match) as exc:
        w._load_registry([path])
    assert "'bad'" in str(exc.value) and "r.json" in str(exc.value)


def test_get_model_info_unknown_name():
    with pytest.raises(ValueError, match="'vit_x'") as exc:
        w.get_model_info("vit_x")
    for name in ("vit_t", "vit_b", "vit_l", "vit_h"):
        assert name in str(exc.value)


def test_get_model_info_not_a_string():
    with pytest.raises(TypeError, match="must be a str"):
        w.get_model_info(3)


# ------------------------------------------------------------------------------- cache


def test_cache_dir_from_env(monkeypatch, tmp_path):
    monkeypatch.setenv("MOBILESAM_CACHE", str(tmp_path / "here"))
    assert w.cache_dir() == tmp_path / "here"
    assert w.weight_path("vit_t") == tmp_path / "here" / "mobile_sam.pt"
    assert not (tmp_path / "here").exists()  # not created until a download


def test_cache_dir_env_expands_user(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("MOBILESAM_CACHE", "~/weights")
    assert w.cache_dir() == tmp_path / "weights"


def test_cache_dir_checkout_local(monkeypatch, tmp_path):
    checkout = tmp_path / "checkout" / "weights"
    checkout.mkdir(parents=True)
    (checkout / "registry.json").write_text("{}")
    monkeypatch.setattr(w, "_CHECKOUT_WEIGHTS", checkout)
    monkeypatch.delenv("MOBILESAM_CACHE")
    assert w.cache_dir() == checkout
    monkeypatch.setenv("MOBILESAM_CACHE", "")  # empty counts as unset
    assert w.cache_dir() == checkout


def test_cache_dir_this_checkout(monkeypatch):
    monkeypatch.delenv("MOBILESAM_CACHE")
    if not (w._CHECKOUT_WEIGHTS / "registry.json").is_file():
        pytest.skip("not running from a source checkout")
    assert w.cache_dir() == Path(w.__file__).resolve().parents[2] / "weights"


def test_cache_dir_installed_uses_os_cache(monkeypatch, tmp_path):
    import pooch

    monkeypatch.setattr(w, "_CHECKOUT_WEIGHTS", tmp_path / "no-checkout")
    monkeypatch.delenv("MOBILESAM_CACHE")
    assert w.cache_dir() == Path(pooch.os_cache("napari-mobilesam")).absolute()


def test_download_url_mirror(monkeypatch):
    info = w.get_model_info("vit_b")
    assert w.download_url(info) == info.url
    monkeypatch.setenv("MOBILESAM_WEIGHTS_MIRROR", "https://mirror.example.org/sam/")
    assert w.download_url(info) == "https://mirror.example.org/sam/sam_vit_b_01ec64.pth"
    monkeypatch.setenv("MOBILESAM_WEIGHTS_MIRROR", "https://mirror.example.org/sam")
    assert w.download_url(info) == "https://mirror.example.org/sam/sam_vit_b_01ec64.pth"
    monkeypatch.setenv("MOBILESAM_WEIGHTS_MIRROR", "")
    assert w.download_url(info) == info.url


def test_sha256_file(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(PAYLOAD)
    assert w.sha256_file(path) == PAYLOAD_SHA
    assert w.sha256_file(path, chunk=100) == PAYLOAD_SHA
    with pytest.raises(ValueError, match="chunk"):
        w.sha256_file(path, chunk=0)


# ---------------------------------------------------------------------------- download


def test_download_good_file(server, tmp_path, capsys):
    info = make_info(server.serve("/tiny.pt", PAYLOAD))
    dest = tmp_path / "new" / "folder" / "tiny.pt"
    assert w.download(info, dest) == dest
    assert dest.read_bytes() == PAYLOAD
    assert w.sha256_file(dest) == PAYLOAD_SHA
    assert sorted(p.name for p in dest.parent.iterdir()) == ["tiny.pt"]  # no temp files
    assert "tiny.pt" in capsys.readouterr().err  # the progress bar, on stderr


def test_download_quiet_replaces_existing_file(server, tmp_path, capsys):
    info = make_info(server.serve("/tiny.pt", PAYLOAD))
    dest = tmp_path / "tiny.pt"
    dest.write_bytes(b"old")
    w.download(info, dest, progress=False)
    assert dest.read_bytes() == PAYLOAD
    assert leftovers(tmp_path) == []
    assert capsys.readouterr().err == ""


def test_download_checksum_mismatch(server, tmp_path):
    wrong = "0" * 64
    info = make_info(server.serve("/tiny.pt", PAYLOAD), sha256=wrong)
    dest = tmp_path / "tiny.pt"
    with pytest.raises(WeightsError) as exc:
        w.download(info, dest, progress=False)
    msg = str(exc.value)
    assert "checksum mismatch" in msg
    assert wrong in msg and PAYLOAD_SHA in msg  # expected and what arrived
    assert str(dest) in msg
    assert exc.value.dest == dest and exc.value.model == "tiny"
    assert not dest.exists() and leftovers(tmp_path) == []


def test_download_truncated_transfer(server, tmp_path):
    # announces the whole payload but sends half of it, then closes the connection
    url = server.serve("/tiny.pt", PAYLOAD[: len(PAYLOAD) // 2], announce=len(PAYLOAD))
    dest = tmp_path / "tiny.pt"
    with pytest.raises(WeightsError, match="truncated transfer") as exc:
        w.download(make_info(url), dest, progress=True)
    assert url in str(exc.value) and str(dest) in str(exc.value)
    assert not dest.exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize(
    ("size", "match"),
    [
        (len(PAYLOAD) + 10, "truncated transfer: received 4,096 bytes, expected 4,106"),
        (len(PAYLOAD) - 10, "wrong size: received 4,096 bytes, expected 4,086"),
    ],
)
def test_download_size_differs_from_registry(server, tmp_path, size, match):
    info = make_info(server.serve("/tiny.pt", PAYLOAD), size=size)
    dest = tmp_path / "tiny.pt"
    with pytest.raises(WeightsError, match=match):
        w.download(info, dest, progress=False)
    assert not dest.exists() and leftovers(tmp_path) == []


def test_download_server_down(dead_url, tmp_path, capsys):
    info = make_info(dead_url + "/tiny.pt")
    dest = tmp_path / "tiny.pt"
    with pytest.raises(WeightsError, match="could not connect") as exc:
        w.download(info, dest)
    msg = str(exc.value)
    assert "'tiny'" in msg and dead_url + "/tiny.pt" in msg
    # how to work offline: the file, where, and how to check it; the alternatives
    assert str(dest) in msg and PAYLOAD_SHA in msg and f"{len(PAYLOAD):,} bytes" in msg
    for hint in ("MOBILESAM_CACHE", "MOBILESAM_WEIGHTS_MIRROR", "checkpoint=", "--weights PATH"):
        assert hint in msg
    assert exc.value.url == dead_url + "/tiny.pt"
    assert not dest.exists() and leftovers(tmp_path) == []
    assert "tiny.pt" not in capsys.readouterr().err  # no progress bar without bytes


def test_download_http_404(server, tmp_path):
    info = make_info(server.base + "/nothing-here.pt")
    dest = tmp_path / "tiny.pt"
    with pytest.raises(WeightsError, match="HTTP 404") as exc:
        w.download(info, dest, progress=False)
    assert "/nothing-here.pt" in str(exc.value)
    assert not dest.exists() and leftovers(tmp_path) == []


def test_download_timeout(server, tmp_path, monkeypatch):
    monkeypatch.setattr(dl, "_TIMEOUT_S", 0.2)
    info = make_info(server.serve("/slow.pt", PAYLOAD, delay=1.0))
    dest = tmp_path / "tiny.pt"
    with pytest.raises(WeightsError, match="timeout"):
        w.download(info, dest, progress=False)
    assert not dest.exists() and leftovers(tmp_path) == []


def test_download_unsupported_scheme(tmp_path):
    dest = tmp_path / "tiny.pt"
    with pytest.raises(WeightsError, match="unsupported URL scheme 'gopher'"):
        w.download(make_info("gopher://example.invalid/tiny.pt"), dest, progress=False)
    assert not dest.exists() and leftovers(tmp_path) == []


def test_download_file_url(tmp_path):
    src = tmp_path / "share" / "tiny.pt"
    src.parent.mkdir()
    src.write_bytes(PAYLOAD)
    dest = tmp_path / "cache" / "tiny.pt"
    w.download(make_info(src.as_uri()), dest, progress=False)
    assert dest.read_bytes() == PAYLOAD


def test_download_file_url_missing(tmp_path):
    dest = tmp_path / "tiny.pt"
    url = (tmp_path / "nowhere" / "tiny.pt").as_uri()
    with pytest.raises(WeightsError, match="FileNotFoundError"):
        w.download(make_info(url), dest, progress=False)
    assert not dest.exists() and leftovers(tmp_path) == []


def test_download_folder_not_writable(tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the cache folder should be")
    dest = blocker / "tiny.pt"
    with pytest.raises(WeightsError, match="cannot write to the folder") as exc:
        w.download(make_info(), dest, progress=False)
    assert str(dest) in str(exc.value)


def test_download_cannot_move_into_place(server, tmp_path, monkeypatch):
    info = make_info(server.serve("/tiny.pt", PAYLOAD))

    def refuse(src, dst):
        raise PermissionError(13, "Permission denied", str(dst))

    monkeypatch.setattr(w.os, "replace", refuse)
    dest = tmp_path / "tiny.pt"
    with pytest.raises(WeightsError, match="cannot move the downloaded file into place"):
        w.download(info, dest, progress=False)
    assert not dest.exists() and leftovers(tmp_path) == []


def test_download_interrupted_leaves_nothing(tmp_path, monkeypatch):
    def half_then_ctrl_c(url, sink):
        sink.write(PAYLOAD[:100])
        raise KeyboardInterrupt

    monkeypatch.setattr(dl, "_transfer", half_then_ctrl_c)
    dest = tmp_path / "tiny.pt"
    with pytest.raises(KeyboardInterrupt):
        w.download(make_info(), dest, progress=True)
    assert not dest.exists() and leftovers(tmp_path) == []


# ------------------------------------------------------------------------------- fetch


def test_fetch_downloads_through_the_mirror_then_reuses(server, tiny, monkeypatch, tmp_path):
    server.serve("/mirror/tiny.pt", PAYLOAD)
    monkeypatch.setenv("MOBILESAM_WEIGHTS_MIRROR", server.base + "/mirror/")
    path = w.fetch("tiny", progress=False)
    assert path == tmp_path / "cache" / "tiny.pt" == w.weight_path("tiny")
    assert path.read_bytes() == PAYLOAD
    assert server.hits == ["/mirror/tiny.pt"]
    assert w.fetch("tiny", progress=False) == path
    assert server.hits == ["/mirror/tiny.pt"]  # second call: no request
    assert leftovers(path.parent) == []


def test_fetch_reuses_cached_file_without_network(tiny, monkeypatch, dead_url, tmp_path):
    monkeypatch.setenv("MOBILESAM_WEIGHTS_MIRROR", dead_url)

    def no_network(*args, **kwargs):
        raise AssertionError("fetch() must not download a cached file")

    monkeypatch.setattr(w, "download", no_network)
    cached = tmp_path / "cache" / "tiny.pt"
    cached.parent.mkdir()
    cached.write_bytes(PAYLOAD)
    assert w.fetch("tiny") == cached


def _damaged(tmp_path) -> Path:
    """The tiny payload in the cache with one byte changed: right size, wrong sha256."""
    cached = tmp_path / "cache" / "tiny.pt"
    cached.parent.mkdir(exist_ok=True)
    cached.write_bytes(b"X" + PAYLOAD[1:])
    return cached


def test_fetch_refuses_a_cached_file_with_the_wrong_sha256(tiny, monkeypatch, dead_url, tmp_path):
    monkeypatch.setenv("MOBILESAM_WEIGHTS_MIRROR", dead_url)
    cached = _damaged(tmp_path)
    with pytest.raises(WeightsError) as exc:
        w.fetch("tiny")
    message = str(exc.value)
    assert str(cached) in message and PAYLOAD_SHA in message
    assert hashlib.sha256(cached.read_bytes()).hexdigest() in message
    assert "mobilesam weights download tiny" in message and "--weights PATH" in message
    assert exc.value.dest == cached and exc.value.url is None
    assert cached.read_bytes()[:1] == b"X"  # left for the user to look at


def test_cached_weights_are_hashed_once_per_file_version(tiny, monkeypatch, dead_url, tmp_path):
    monkeypatch.setenv("MOBILESAM_WEIGHTS_MIRROR", dead_url)
    cached = tmp_path / "cache" / "tiny.pt"
    cached.parent.mkdir()
    cached.write_bytes(PAYLOAD)
    hashed = []
    real = w.sha256_file
    monkeypatch.setattr(w, "sha256_file", lambda path, *a: hashed.append(path) or real(path))
    for _ in range(3):
        assert w.fetch("tiny") == cached
    assert len(hashed) == 1
    memo = json.loads((cached.parent / ".tiny.pt.sha256.json").read_text())
    assert memo["sha256"] == PAYLOAD_SHA and memo["size"] == len(PAYLOAD)
    w._DIGESTS.clear()  # a new process: the sidecar remembers
    assert w.fetch("tiny") == cached and len(hashed) == 1
    # the same size, another content and mtime: hashed again, and refused
    cached.write_bytes(b"X" + PAYLOAD[1:])
    os.utime(cached, ns=(1, 1))
    with pytest.raises(WeightsError, match="not the published file"):
        w.fetch("tiny")
    assert len(hashed) == 2


def test_a_downloaded_file_is_not_hashed_again(server, tiny, monkeypatch, tmp_path):
    server.serve("/tiny.pt", PAYLOAD)
    monkeypatch.setenv("MOBILESAM_WEIGHTS_MIRROR", server.base)
    path = w.fetch("tiny", progress=False)
    monkeypatch.setattr(w, "sha256_file", lambda *a: pytest.fail("hashed again"))
    assert w.fetch("tiny", progress=False) == path
    assert w.file_sha256(path) == PAYLOAD_SHA


def test_file_sha256_outside_the_cache_leaves_no_sidecar(tmp_path):
    own = tmp_path / "mine.pt"
    own.write_bytes(PAYLOAD)
    assert w.file_sha256(own) == PAYLOAD_SHA
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.pt"]


def test_a_read_only_cache_still_verifies(tiny, monkeypatch, dead_url, tmp_path):
    monkeypatch.setenv("MOBILESAM_WEIGHTS_MIRROR", dead_url)
    cached = tmp_path / "cache" / "tiny.pt"
    cached.parent.mkdir()
    cached.write_bytes(PAYLOAD)

    def read_only(*args, **kwargs):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr("napari_mobilesam.atomic.write_json_atomic", read_only)
    assert w.fetch("tiny") == cached
    assert not (cached.parent / ".tiny.pt.sha256.json").exists()


def _part(folder: Path, name: str = "tiny.pt") -> Path:
    part = folder / f".{name}.abc123.part"
    part.parent.mkdir(parents=True, exist_ok=True)
    part.write_bytes(b"half a download")
    return part


def test_fetch_removes_the_part_file_of_a_killed_download(tiny, monkeypatch, dead_url, tmp_path):
    monkeypatch.setenv("MOBILESAM_WEIGHTS_MIRROR", dead_url)
    cache = tmp_path / "cache"
    stale = _part(cache)
    other = _part(cache, "other.pt")  # another model's: left to its own fetch
    with pytest.raises(WeightsError):
        w.fetch("tiny", progress=False)  # the download fails; the leftover is gone anyway
    assert not stale.exists() and other.exists()
    assert leftovers(cache) == [other.name]


def test_the_part_file_of_a_running_download_is_kept(tiny, tmp_path):
    import fcntl

    cache = tmp_path / "cache"
    running = _part(cache)
    with open(running, "rb+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # as a download in another process holds it
        assert w.remove_stale_parts(cache, "tiny.pt") == []
        assert running.exists()
    assert w.remove_stale_parts(cache, "tiny.pt") == [running]


def test_a_part_file_left_by_sigkill_is_removed_by_the_next_fetch(server, tiny, tmp_path):
    """A real download process killed with SIGKILL mid-transfer leaves its .part file
    (nothing can remove it then); the next fetch removes it and downloads."""
    import signal

    server.serve("/big.pt", PAYLOAD * 32, announce=len(PAYLOAD) * 64)  # 2 chunks of 64 KiB
    server.serve("/tiny.pt", PAYLOAD)
    code = (
        "import sys, os, signal\n"
        "from napari_mobilesam import download as dl, weights as w\n"
        "info = w.ModelInfo('tiny', 'tiny.pt', sys.argv[1], 'a' * 64, 10**6, 'MIT', 'x')\n"
        "real = dl._Sink.write\n"
        "def write(self, data):\n"
        "    n = real(self, data)\n"
        "    print('part', flush=True)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "dl._Sink.write = write\n"
        "w.download(info, sys.argv[2], progress=False)\n"
    )
    cache = tmp_path / "cache"
    env = {**os.environ, "MOBILESAM_WEIGHTS_MIRROR": ""}
    done = subprocess.run(
        [sys.executable, "-c", code, server.base + "/big.pt", str(cache / "tiny.pt")],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert done.returncode == -signal.SIGKILL and "part" in done.stdout, done.stderr
    assert len(leftovers(cache)) == 1
    os.environ["MOBILESAM_WEIGHTS_MIRROR"] = server.base
    try:
        assert w.fetch("tiny", progress=False).read_bytes() == PAYLOAD
    finally:
        del os.environ["MOBILESAM_WEIGHTS_MIRROR"]
    assert leftovers(cache) == []


def test_fetch_replaces_a_file_of_the_wrong_size(server, tiny, monkeypatch, tmp_path):
    monkeypatch.setenv("MOBILESAM_WEIGHTS_MIRROR", server.base)
    server.serve("/tiny.pt", PAYLOAD)
    stale = tmp_path / "cache" / "tiny.pt"
    stale.parent.mkdir()
    stale.write_bytes(b"partial")
    assert w.fetch("tiny", progress=False).read_bytes() == PAYLOAD


def test_fetch_failure_names_the_cache_path(tiny, dead_url, monkeypatch, tmp_path):
    monkeypatch.setenv("MOBILESAM_WEIGHTS_MIRROR", dead_url)
    with pytest.raises(WeightsError) as exc:
        w.fetch("tiny", progress=False)
    assert str(tmp_path / "cache" / "tiny.pt") in str(exc.value)
    assert dead_url + "/tiny.pt" in str(exc.value)


def test_fetch_unknown_name():
    with pytest.raises(ValueError, match="unknown model name 'nope'"):
        w.fetch("nope")


def test_import_is_light_and_has_no_side_effects(tmp_path):
    cache = tmp_path / "never-created"
    code = (
        "import sys, napari_mobilesam.cli, napari_mobilesam.weights\n"
        "assert 'torch' not in sys.modules, 'torch imported by the weights CLI'\n"
    )
    env = {**os.environ, "MOBILESAM_CACHE": str(cache)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=60)
    assert not cache.exists()


# --------------------------------------------------------------------------------- CLI


def test_cli_list(tiny, capsys, tmp_path):
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "tiny.pt").write_bytes(PAYLOAD)
    sparse_file(tmp_path / "cache" / "mobile_sam.pt", VIT_T["size"])  # zeros: wrong sha256
    sparse_file(tmp_path / "cache" / "sam_vit_b_01ec64.pth", 10)
    assert cli.main(["weights", "list"]) == 0
    out = capsys.readouterr().out
    lines = {
        line.split()[0]: line for line in out.splitlines() if line.startswith(("vit_", "tiny"))
    }
    assert sorted(lines) == ["tiny", "vit_b", "vit_h", "vit_l", "vit_t", "vit_t_synthetic_cells"]
    bundled = lines["vit_t_synthetic_cells"].split()
    assert bundled[4:6] == ["yes", "(bundled)"]  # not in the cache folder: in the package
    assert lines["tiny"].split()[1:5] == ["tiny.pt", "0.0", "MIT", "yes"]
    assert lines["vit_t"].split()[1:5] == ["mobile_sam.pt", "40.7", "Apache-2.0", "corrupt"]
    assert lines["vit_t"].endswith(str(tmp_path / "cache" / "mobile_sam.pt"))
    assert lines["vit_b"].split()[4] == "partial"
    assert lines["vit_h"].split()[2:5] == ["2564.6", "Apache-2.0", "no"]
    assert str(tmp_path / "cache") in out
    assert "mobilesam weights download NAME` replaces it" in out


def test_cli_download_via_mirror(server, tiny, monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("MOBILESAM_WEIGHTS_MIRROR", server.base)
    server.serve("/tiny.pt", PAYLOAD)
    assert cli.main(["weights", "download", "tiny"]) == 0
    out, err = capsys.readouterr()
    dest = tmp_path / "cache" / "tiny.pt"
    assert out.strip() == str(dest) and dest.read_bytes() == PAYLOAD
    assert f"downloading 0.0 MB from {server.base}/tiny.pt" in err
    assert "tiny.pt" in err.splitlines()[-1] or "100%" in err  # progress bar

    assert cli.main(["weights", "download", "tiny"]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == str(dest) and "already in the cache (sha256 checked)" in err
    assert server.hits == ["/tiny.pt"]


def test_cli_download_replaces_a_damaged_file(server, tiny, monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("MOBILESAM_WEIGHTS_MIRROR", server.base)
    server.serve("/tiny.pt", PAYLOAD)
    dest = _damaged(tmp_path)
    assert cli.main(["weights", "path", "tiny"]) == 1
    assert "has the wrong sha256" in capsys.readouterr().err
    assert cli.main(["weights", "download", "tiny"]) == 0
    out, err = capsys.readouterr()
    assert "has the wrong sha256 (damaged or replaced); downloading it again" in err
    assert "already in the cache" not in err
    assert out.strip() == str(dest) and dest.read_bytes() == PAYLOAD
    assert server.hits == ["/tiny.pt"]
    assert cli.main(["weights", "path", "tiny"]) == 0


def test_cli_download_quiet(server, tiny, monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("MOBILESAM_WEIGHTS_MIRROR", server.base)
    server.serve("/tiny.pt", PAYLOAD)
    assert cli.main(["weights", "download", "--quiet", "tiny"]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == str(tmp_path / "cache" / "tiny.pt") and err == ""


def test_cli_download_defaults_to_vit_t(monkeypatch, capsys, tmp_path):
    calls = []

    def fake_fetch(name, *, progress=True):
        calls.append((name, progress))
        return tmp_path / name

    monkeypatch.setattr(w, "fetch", fake_fetch)
    assert cli.main(["weights", "download", "-q"]) == 0
    assert calls == [("vit_t", False)]


def test_cli_download_failure(tiny, dead_url, monkeypatch, capsys):
    monkeypatch.setenv("MOBILESAM_WEIGHTS_MIRROR", dead_url)
    assert cli.main(["weights", "download", "tiny"]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert "mobilesam: error: could not download" in err and "Traceback" not in err
    assert dead_url + "/tiny.pt" in err and "--weights PATH" in err


def test_cli_download_some_fail(server, tiny, monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(w.REGISTRY, "tiny2", make_info(name="tiny2", filename="tiny2.pt"))
    monkeypatch.setenv("MOBILESAM_WEIGHTS_MIRROR", server.base)
    server.serve("/tiny.pt", PAYLOAD)  # tiny2.pt is not served: 404
    assert cli.main(["weights", "download", "-q", "tiny2", "tiny"]) == 1
    out, err = capsys.readouterr()
    assert out.strip() == str(tmp_path / "cache" / "tiny.pt")
    assert "HTTP 404" in err and "1 of 2 downloads failed" in err


def test_cli_download_unknown_name_downloads_nothing(monkeypatch, capsys):
    monkeypatch.setattr(w, "fetch", lambda *a, **k: pytest.fail("nothing may be downloaded"))
    assert cli.main(["weights", "download", "vit_t", "vit_x"]) == 2
    err = capsys.readouterr().err
    assert "unknown model name 'vit_x'" in err and "vit_h" in err and "Traceback" not in err


def test_cli_path(capsys, tmp_path):
    expected = tmp_path / "cache" / "mobile_sam.pt"
    assert cli.main(["weights", "path", "vit_t"]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert str(expected) in err and "does not exist yet" in err
    assert "mobilesam weights download vit_t" in err

    assert cli.main(["weights", "path", "--no-check", "vit_t"]) == 0
    assert capsys.readouterr().out.strip() == str(expected)

    sparse_file(expected, 100)
    assert cli.main(["weights", "path", "vit_t"]) == 1
    assert "is incomplete" in capsys.readouterr().err

    sparse_file(expected, VIT_T["size"])  # the right size, but zeros
    assert cli.main(["weights", "path", "vit_t"]) == 1
    assert "has the wrong sha256" in capsys.readouterr().err
    assert cli.main(["weights", "path", "--no-check", "vit_t"]) == 0
    assert capsys.readouterr().out.strip() == str(expected)


def test_cli_path_of_a_good_file(tiny, capsys, tmp_path):
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "tiny.pt").write_bytes(PAYLOAD)
    assert cli.main(["weights", "path", "tiny"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "cache" / "tiny.pt")


def test_cli_path_unknown_name(capsys):
    assert cli.main(["weights", "path", "vit_x"]) == 2
    assert "unknown model name 'vit_x'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "status"),
    [([], 2), (["weights"], 2), (["weights", "nope"], 2), (["--help"], 0), (["--version"], 0)],
)
def test_cli_usage(argv, status, capsys):
    assert cli.main(argv) == status
    out, err = capsys.readouterr()
    assert "usage:" in out + err or "mobilesam 0" in out


def test_cli_ctrl_c(monkeypatch, capsys):
    def interrupted(name, *, progress=True):
        raise KeyboardInterrupt

    monkeypatch.setattr(w, "fetch", interrupted)
    assert cli.main(["weights", "download", "-q"]) == 130
    assert "interrupted" in capsys.readouterr().err


def test_cli_weights_error_from_a_command(monkeypatch, capsys):
    info = make_info()

    def add_failing(subparsers):
        def run(args):
            raise dl._error(info, info.url, Path("/x/tiny.pt"), "some reason")

        subparsers.add_parser("fail").set_defaults(func=run)

    monkeypatch.setattr(cli, "_GROUPS", [*cli._GROUPS, add_failing])
    assert cli.main(["fail"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("mobilesam: error: could not download") and "some reason" in err


def test_cli_new_command_groups_plug_in(monkeypatch, capsys):
    def add_hello(subparsers):
        p = subparsers.add_parser("hello")
        p.set_defaults(func=lambda args: print("hi") or 0)

    monkeypatch.setattr(cli, "_GROUPS", [*cli._GROUPS, add_hello])
    assert cli.main(["hello"]) == 0
    assert capsys.readouterr().out == "hi\n"
    assert cli.main(["weights", "list"]) == 0
