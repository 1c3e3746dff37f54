"""What the weights tests share: a fake payload, its registry entry, a local HTTP
server on 127.0.0.1 to serve it (never the internet) and small file helpers."""

from __future__ import annotations

import hashlib
import http.server
import threading
import time
from pathlib import Path

from napari_mobilesam.weights import ModelInfo

PAYLOAD = bytes(range(256)) * 16  # 4 KiB
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()

VIT_T = {
    "filename": "mobile_sam.pt",
    "url": "https://github.com/ChaoningZhang/MobileSAM/raw/master/weights/mobile_sam.pt",
    "sha256": "6dbb90523a35330fedd7f1d3dfc66f995213d81b29a5ca8108dbcdd4e37d6c2f",
    "size": 40728226,
    "license": "Apache-2.0",
}


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


def leftovers(folder: Path) -> list[str]:
    """Temporary files left in ``folder``."""
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".part"))


def sparse_file(path: Path, size: int) -> Path:
    """A file of ``size`` bytes without writing them (fast even for 40 MB)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def damaged(tmp_path) -> Path:
    """The tiny payload in the cache with one byte changed: right size, wrong sha256."""
    cached = tmp_path / "cache" / "tiny.pt"
    cached.parent.mkdir(exist_ok=True)
    cached.write_bytes(b"X" + PAYLOAD[1:])
    return cached
