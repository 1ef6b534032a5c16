"""Local stand-ins for the hosts the backend downloads from, and the backend itself on waitress.

`StandInHost` is an HTTP server on 127.0.0.1 that records every request's path and headers and
answers by path: an image for anything unknown, and slow, huge, hanging, redirecting or failing
answers for the paths below. `LiveBackend` serves the real app with waitress on a free
127.0.0.1 port. Both stop in `close()` (the tests' fixtures call it in teardown).
"""

from __future__ import annotations

import io
import struct
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

from lshelpers import make_image

TRICKLE_SECONDS = 0.1
HUGE_BYTES = 64 * 1024**2


def png_bytes(seed: int = 0, size=(48, 64)) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(make_image(seed, size)).save(out, format="PNG")
    return out.getvalue()


def bomb_png(width: int = 30000, height: int = 30000) -> bytes:
    """A ~100-byte PNG whose header declares `width` x `height` pixels (a decompression bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    rows = zlib.compress(b"\x00" * 64)  # far fewer rows than declared: the header is what matters
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


class StandInHost:
    """An HTTP host on 127.0.0.1 recording each request as ``{"path", "headers"}``.

    Paths: ``/slow/...`` declares 1 MB and trickles a byte every `TRICKLE_SECONDS`;
    ``/huge/...`` streams `HUGE_BYTES` without a Content-Length (``sent`` counts what got out);
    ``/declared-huge/...`` declares `HUGE_BYTES`; ``/hang/...`` never answers; ``/status/N``
    answers N; ``/redirect?to=URL`` answers 302; ``/bomb.png`` is `bomb_png()`;
    ``/storage-data/...`` answers 404 when `proxy_missing`; a path in `files` answers its bytes,
    one in `redirects` a 302 to its URL;
    anything else is a small PNG.
    """

    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.sent: dict[str, int] = {}
        self.active = 0
        self.proxy_missing = False
        self.files: dict[str, bytes] = {}  # extra paths and their bodies
        self.redirects: dict[str, str] = {}  # paths answered by a 302 to a URL
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        self.image = png_bytes()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.host = f"127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    def headers_seen(self) -> list[dict[str, str]]:
        with self._lock:
            return [dict(r["headers"]) for r in self.requests]

    def paths_seen(self) -> list[str]:
        with self._lock:
            return [r["path"] for r in self.requests]

    def close(self) -> None:
        self.stopping.set()
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(timeout=10)

    def _handler(self):
        host = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"

            def log_message(self, *args):  # keep test output clean
                pass

            def do_GET(self):
                with host._lock:
                    host.requests.append({"path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()}})
                    host.active += 1
                try:
                    self.answer(urlparse(self.path))
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the backend hung up: what the size cap and deadlines are for
                finally:
                    with host._lock:
                        host.active -= 1

            def answer(self, url):
                path = url.path
                if path.startswith("/slow/"):
                    self.head(200, 1_000_000)
                    while not host.stopping.wait(TRICKLE_SECONDS):
                        self.wfile.write(b"\0")
                        self.wfile.flush()
                elif path.startswith("/huge/"):
                    self.head(200, None)
                    block = b"\0" * 65536
                    for _ in range(HUGE_BYTES // len(block)):
                        if host.stopping.is_set():
                            return
                        self.wfile.write(block)
                        with host._lock:
                            host.sent[self.path] = host.sent.get(self.path, 0) + len(block)
                elif path.startswith("/declared-huge/"):
                    self.head(200, HUGE_BYTES)
                    self.wfile.write(b"\0" * 1024)
                elif path.startswith("/hang/"):
                    host.stopping.wait(60)
                elif path.startswith("/status/"):
                    self.head(int(path.rsplit("/", 1)[1]), 0)
                elif path == "/redirect" or path in host.redirects:
                    self.send_response(302)
                    self.send_header("Location", host.redirects.get(path) or parse_qs(url.query)["to"][0])
                    self.end_headers()
                elif path.startswith("/storage-data/") and host.proxy_missing:
                    self.head(404, 0)
                else:
                    body = bomb_png() if path == "/bomb.png" else host.files.get(path, host.image)
                    self.head(200, len(body))
                    self.wfile.write(body)

            def head(self, status: int, length: int | None):
                self.send_response(status)
                self.send_header("Content-Type", "image/png")
                if length is not None:
                    self.send_header("Content-Length", str(length))
                self.end_headers()

        return Handler


class LiveBackend:
    """The real app served by waitress on a free 127.0.0.1 port, in a thread of this process."""

    def __init__(self, app, threads: int = 4) -> None:
        from waitress.server import create_server

        self.server = create_server(app, host="127.0.0.1", port=0, threads=threads)
        self.url = f"http://127.0.0.1:{self.server.effective_port}"
        self._thread = threading.Thread(target=self.server.run, daemon=True)
        self._thread.start()

    def close(self) -> None:
        from waitress import wasyncore

        wasyncore.close_all(self.server._map)  # as waitress's own multi-socket server closes
        self._thread.join(timeout=30)


def wait_until(condition, seconds: float = 10.0) -> bool:
    """Poll `condition` until it holds or `seconds` pass (a bounded loop)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()
