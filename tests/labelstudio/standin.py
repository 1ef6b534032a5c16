"""Local stand-ins for the hosts the backend downloads from, and the backend itself on waitress.

`StandInHost` is an HTTP server on 127.0.0.1 that records every request's path and headers and
answers by path: an image for anything unknown, and slow, huge, hanging, redirecting or failing
answers for the paths below. `LiveBackend` serves the real app with waitress on a free
127.0.0.1 port. Both stop in `close()` (the tests' fixtures call it in teardown).
"""

from __future__ import annotations

import io
import json
import struct
import threading
import time
import uuid
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

from lshelpers import make_image

TRICKLE_SECONDS = 0.1
HUGE_BYTES = 64 * 1024**2


def make_jwt(kind: str, seconds: float) -> str:
    """A JWT of `kind` ("refresh", as personal access tokens are, or "access") expiring in `seconds`."""
    import jwt

    claims = {"token_type": kind, "exp": int(time.time() + seconds), "jti": uuid.uuid4().hex, "user_id": 1}
    return jwt.encode(claims, "stand-in-signing-key-of-32-bytes-or-more", algorithm="HS256")


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
        self.refresh_token: str | None = None
        self.access_seconds = 300.0
        self.issued: list[str] = []  # access tokens handed out, in order
        self.revoked: set[str] = set()  # access tokens answered 401
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

            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                try:
                    body = json.loads(self.rfile.read(length) or b"null")
                except ValueError:
                    body = None
                with host._lock:
                    host.requests.append({"method": "POST", "path": self.path, "body": body,
                                          "headers": {k.lower(): v for k, v in self.headers.items()}})
                refresh = body.get("refresh") if isinstance(body, dict) else None
                if self.path == "/api/token/refresh/" and host.refresh_token and refresh == host.refresh_token:
                    access = make_jwt("access", host.access_seconds)
                    with host._lock:
                        host.issued.append(access)
                    self.reply(200, {"access": access})
                else:
                    self.reply(401, {"detail": "Token is invalid or expired", "code": "token_not_valid"})

            def reply(self, status: int, data: dict):
                payload = json.dumps(data).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def do_GET(self):
                with host._lock:
                    host.requests.append({"method": "GET", "path": self.path,
                                          "headers": {k.lower(): v for k, v in self.headers.items()}})
                    host.active += 1
                try:
                    if self.headers.get("Authorization", "").removeprefix("Bearer ") in host.revoked:
                        return self.head(401, 0)
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
