"""Servers on 127.0.0.1 that stand in for the internet in tests: a gated Hugging Face hub, and a
plain file server (the archive GitHub would serve for a repository).

`StandInHub` answers the requests `huggingface_hub.snapshot_download` makes (repository info, file tree,
file metadata and contents), refuses every request without ``Authorization: Bearer <token>`` the
way the hub refuses a gated repository, and keeps every Authorization header it received. Use
`pointed_at` to send `huggingface_hub` to it (its endpoint and cache are read when it is imported,
so they are patched in its `constants` module).
"""

from __future__ import annotations

import hashlib
import json
import threading
from contextlib import contextmanager
from functools import partial
from http.server import BaseHTTPRequestHandler, SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class StandInHub:
    """Serve the files of `folder` as the gated model repository `repo`, readable with `token` only."""

    def __init__(self, folder: Path, repo: str, token: str) -> None:
        self.files = {path.name: path.read_bytes() for path in sorted(Path(folder).iterdir()) if path.is_file()}
        self.repo, self.token = repo, token
        self.authorizations: list[str | None] = []
        self.paths: list[str] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> StandInHub:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet: tests read `hub.paths`
                pass

            def do_HEAD(self) -> None:
                self._answer(body=False)

            def do_GET(self) -> None:
                self._answer(body=True)

            def _answer(self, body: bool) -> None:
                path = unquote(urlsplit(self.path).path)
                hub.paths.append(path)
                hub.authorizations.append(self.headers.get("Authorization"))
                if self.headers.get("Authorization") != f"Bearer {hub.token}":
                    return self._send(401, b"", {"X-Error-Code": "GatedRepo",
                                                 "X-Error-Message": "Access to this model is restricted."}, body)
                info, tree, resolve = (f"/api/models/{hub.repo}/revision/", f"/api/models/{hub.repo}/tree/",
                                       f"/{hub.repo}/resolve/")
                if path.startswith(info):
                    siblings = [{"rfilename": name} for name in hub.files]
                    return self._json({"id": hub.repo, "modelId": hub.repo, "sha": COMMIT, "siblings": siblings}, body)
                if path.startswith(tree):
                    entries = [{"type": "file", "path": name, "size": len(data), "oid": _oid(data)}
                               for name, data in hub.files.items()]
                    return self._json(entries, body)
                if path.startswith(resolve):
                    name = path[len(resolve):].split("/", 1)[-1]
                    if name in hub.files:
                        data = hub.files[name]
                        headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{_oid(data)}"',
                                   "Content-Type": "application/octet-stream"}
                        return self._send(200, data, headers, body)
                    return self._send(404, b"", {"X-Error-Code": "EntryNotFound"}, body)
                return self._send(404, b"", {"X-Error-Code": "RepoNotFound"}, body)

            def _json(self, value, body: bool) -> None:
                self._send(200, json.dumps(value).encode(), {"Content-Type": "application/json"}, body)

            def _send(self, status: int, data: bytes, headers: dict[str, str], body: bool) -> None:
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if body:
                    self.wfile.write(data)

        return Handler


def _oid(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


@contextmanager
def pointed_at(monkeypatch, hub: StandInHub, cache_dir: Path):
    """Point `huggingface_hub` at `hub` with `cache_dir` as its cache; no token is sent unless passed.

    ``HF_HUB_DISABLE_IMPLICIT_TOKEN``: a token the hub receives was handed to the download
    explicitly, not picked up by `huggingface_hub` from the environment or a login.
    """
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache_dir))
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_IMPLICIT_TOKEN", True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    yield hub


class _QuietFiles(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@contextmanager
def serve_folder(folder: Path):
    """Serve the files of `folder` over HTTP on 127.0.0.1; yields the base URL. Stopped on exit."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(_QuietFiles, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
