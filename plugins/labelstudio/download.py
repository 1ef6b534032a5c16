"""Bounded HTTP downloads: connect/read timeouts, an overall deadline and a size cap.

The body is streamed to a file and the cap is checked while streaming, so a body larger than
the cap is stopped, not read whole. Reads return whatever the socket has (``read1``), so a host
that trickles bytes is stopped by the deadline even though each read is quick. The caller owns
the file and deletes it after use.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import requests
from urllib3.exceptions import DecodeError, ProtocolError, ReadTimeoutError

from promptseg.errors import ImageError

DEFAULT_MAX_DOWNLOAD_BYTES = 64 * 1024**2
DEFAULT_DOWNLOAD_TIMEOUT = 60.0
CONNECT_TIMEOUT = 10.0
READ_TIMEOUT = 30.0
CHUNK_BYTES = 64 * 1024


class DownloadError(ImageError):
    """A download was too large, too slow or failed; the message says which and what to set."""


@dataclass(frozen=True)
class DownloadLimits:
    """`max_bytes` per file; `timeout` seconds for a whole download (connect, headers and body).

    `what` names the kind of file and `size_setting`/`timeout_setting` the settings that raise
    the limits, for the messages (videos have limits of their own).
    """

    max_bytes: int = DEFAULT_MAX_DOWNLOAD_BYTES
    timeout: float = DEFAULT_DOWNLOAD_TIMEOUT
    what: str = "Image"
    size_setting: str = "PROMPTSEG_MAX_DOWNLOAD_BYTES"
    timeout_setting: str = "PROMPTSEG_DOWNLOAD_TIMEOUT"

    @property
    def socket_timeouts(self) -> tuple[float, float]:
        """requests' ``(connect, read)`` timeouts, never longer than the whole deadline."""
        return min(CONNECT_TIMEOUT, self.timeout), min(READ_TIMEOUT, self.timeout)


def download(session: requests.Session, url: str, headers: dict[str, str], folder: Path | None,
             limits: DownloadLimits, suffix: str = "") -> Path:
    """Stream `url` into a new file in `folder` (the system temp folder if None) and return it.

    Raises `DownloadError` past `limits` (the partial file is removed) and lets requests'
    errors (HTTP status, connection) through for the caller to word.
    """
    deadline = time.monotonic() + limits.timeout
    with session.get(url, headers={"Accept-Encoding": "identity", **headers}, stream=True,
                     timeout=limits.socket_timeouts) as response:
        response.raise_for_status()
        declared = response.headers.get("Content-Length", "")
        if declared.isdigit() and int(declared) > limits.max_bytes:
            raise too_large(url, limits, f"it declares {int(declared):,} bytes")
        handle, name = tempfile.mkstemp(prefix="promptseg-ls-", suffix=suffix, dir=folder)
        path = Path(name)
        try:
            with os.fdopen(handle, "wb") as out:
                _copy_body(response, out, url, limits, deadline)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
    return path


def _copy_body(response: requests.Response, out, url: str, limits: DownloadLimits, deadline: float) -> None:
    size = 0
    while True:
        if time.monotonic() > deadline:
            raise DownloadError(
                f"Downloading {url!r} took longer than {limits.timeout:g} s ({limits.timeout_setting}): "
                "the host is too slow; raise the limit if the file is large and the host is trusted."
            )
        chunk = _read_some(response)
        if not chunk:
            return
        size += len(chunk)
        if size > limits.max_bytes:
            raise too_large(url, limits, "its body is larger")
        out.write(chunk)


def _read_some(response: requests.Response) -> bytes:
    """What the socket has, up to a chunk, with urllib3's errors as requests' (as `iter_content` does)."""
    try:
        return response.raw.read1(CHUNK_BYTES, decode_content=True)
    except ReadTimeoutError as exc:
        raise requests.ReadTimeout(exc) from exc
    except ProtocolError as exc:
        raise requests.ConnectionError(exc) from exc
    except DecodeError as exc:
        raise requests.exceptions.ContentDecodingError(exc) from exc


def too_large(url: str, limits: DownloadLimits, why: str) -> DownloadError:
    return DownloadError(
        f"{limits.what} {url!r} is over the download limit of {limits.max_bytes:,} bytes ({why}): "
        f"set {limits.size_setting} higher if such files are expected."
    )
