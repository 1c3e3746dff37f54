"""Tests of the downloader and of fetching weights into the cache (checksums, sizes,
interrupted and killed downloads, read-only caches), against a local HTTP server."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from napari_mobilesam import download as dl
from napari_mobilesam import weights as w
from napari_mobilesam.weights import WeightsError

from .common import PAYLOAD, PAYLOAD_SHA, damaged, leftovers, make_info

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


def test_fetch_refuses_a_cached_file_with_the_wrong_sha256(tiny, monkeypatch, dead_url, tmp_path):
    monkeypatch.setenv("MOBILESAM_WEIGHTS_MIRROR", dead_url)
    cached = damaged(tmp_path)
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
