"""Turn a task's image reference into a local file, without request forgery or credential leaks.

Label Studio references (uploads, Local Storage, the storage proxy, ``s3:``/``gs:``/``azure-blob:``
through the task's presign endpoint) are routed the way label-studio-sdk's ``get_local_path``
routes them, but downloaded here with `promptseg_labelstudio.download`: that function reads
bodies whole, without a timeout, keeps every file for the life of the process and falls back
to ``LABEL_STUDIO_URL``/``LABEL_STUDIO_API_KEY`` from the environment for any host it is given.

Rules: every HTTP request (redirects included) goes only to the Label Studio host or
``PROMPTSEG_ALLOWED_HOSTS``; the token goes only to the Label Studio host it belongs to
(requests drops it on a redirect to another host), as ``Token`` (legacy) or as a ``Bearer``
access token that `promptseg_labelstudio.tokens` gets for a personal access token from that
host, again after a 401; plain paths and Local Storage paths are
read only inside the document root; downloaded files are deleted once the task is done.
"""

from __future__ import annotations

import base64
import logging
import os
import posixpath
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse

import requests
from requests.adapters import HTTPAdapter

from promptseg.errors import ImageError
from promptseg_labelstudio.download import DownloadLimits, download
from promptseg_labelstudio.tokens import LabelStudioAuth

logger = logging.getLogger(__name__)

CLOUD_SCHEMES = ("s3", "gs", "azure-blob")
LABEL_STUDIO_PREFIXES = ("/data/", "data/", "/upload/", "upload/", "/storage-data/", "storage-data/")
MAX_REFERENCE_CHARS = 8192
NO_SOURCE_HINT = "set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY for the backend."


class ForbiddenURLError(ImageError):
    """An image URL points at a host or path the backend may not read."""


class HTTPStatusError(ImageError):
    """A host answered a download with an error status."""


@dataclass(frozen=True)
class LabelStudioSource:
    """A Label Studio base URL and the token that may be sent to it (and to nothing else)."""

    url: str
    token: str | None = None


class _AllowListAdapter(HTTPAdapter):
    """Refuses any request (the first and every redirect) to a host not on the allow-list."""

    def __init__(self, allowed: frozenset[str]) -> None:
        super().__init__(max_retries=0)
        self.allowed = allowed

    def send(self, request, **kwargs):
        check_host(request.url, self.allowed)
        return super().send(request, **kwargs)


def shown(reference: str, limit: int = 120) -> str:
    """`reference` quoted for a message, shortened when long."""
    return repr(reference if len(reference) <= limit else reference[:limit] + "...")


def parse_url(url: str):
    """`urlparse` whose port is checked, with malformed URLs as `ImageError`."""
    try:
        parsed = urlparse(url)
        parsed.port  # noqa: B018 - raises ValueError for a port outside 0..65535
    except ValueError as exc:
        detail = "its port must be 1-65535" if "port" in str(exc).lower() else str(exc)
        raise ImageError(f"Image URL {shown(url)} is malformed ({detail}): fix the task's data.") from None
    return parsed


def check_host(url: str, allowed: frozenset[str]) -> None:
    """Raise `ForbiddenURLError` unless `url` is http(s) on an allowed ``host`` or ``host:port``."""
    parsed = parse_url(url)
    host = (parsed.hostname or "").lower()
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    if parsed.scheme not in ("http", "https") or not host:
        raise ForbiddenURLError(f"Image URL {shown(url)} is not an http(s) URL.")
    if host not in allowed and f"{host}:{port}" not in allowed:
        raise ForbiddenURLError(
            f"Image URL host {host}:{port} is not allowed: only the Label Studio host and "
            "PROMPTSEG_ALLOWED_HOSTS are fetched from (add the host there if you trust it)."
        )


def host_entry(url: str) -> str:
    """The ``host:port`` allow-list entry of a base URL."""
    parsed = parse_url(url)
    return f"{(parsed.hostname or '').lower()}:{parsed.port or (443 if parsed.scheme == 'https' else 80)}"


def confine(root: Path | None, relative: str) -> Path:
    """`relative` inside `root`, or `ForbiddenURLError` if it would escape (``..``, symlinks)."""
    if root is None:
        raise ForbiddenURLError(
            f"Task image {shown(relative)} is a local path, and local paths are disabled: set "
            "LOCAL_FILES_DOCUMENT_ROOT to the folder holding the images."
        )
    normal = posixpath.normpath(relative.replace("\\", "/")).lstrip("/")
    if normal == ".." or normal.startswith("../"):
        raise ForbiddenURLError(f"Task image {shown(relative)} climbs out of the document root ('..').")
    candidate = (root / normal).resolve()
    if candidate != root and root not in candidate.parents:
        raise ForbiddenURLError(f"Task image {shown(relative)} is outside the document root.")
    return candidate


def label_studio_urls(reference: str, base: str, task_id: int | None) -> list[str]:
    """The URLs a Label Studio reference is downloaded from, in the order to try them.

    Uploads go through the storage proxy first (it serves cloud-backed default storage too),
    then the older ``/data/upload/`` path, as label-studio-sdk does.
    """
    if reference.split(":", 1)[0].lower() in CLOUD_SCHEMES:
        if task_id is None:
            raise ImageError(f"Cloud storage image {shown(reference)} needs its task id to be presigned by Label Studio.")
        fileuri = base64.urlsafe_b64encode(reference.encode()).decode()
        return [f"{base}/tasks/{task_id}/presign/?fileuri={fileuri}"]
    path = "/" + reference.lstrip("/")
    if path.startswith("/upload/"):
        path = "/data" + path
    if path.startswith("/data/upload/"):
        return [f"{base}/storage-data/uploaded/?filepath={path[len('/data/'):]}", base + path]
    return [base + path]


def local_storage_path(reference: str) -> str | None:
    """The ``?d=`` file of a ``/data/local-files/?d=...`` reference (the last value, as Label Studio reads it)."""
    parsed = urlparse("/" + reference.lstrip("/"))
    if not parsed.path.startswith("/data/local-files"):
        return None
    values = parse_qs(parsed.query, keep_blank_values=True).get("d")
    if not values or not values[-1]:
        raise ImageError(f"Local Storage URL {shown(reference)} names no file (?d=...).")
    return values[-1]


def file_suffix(url: str) -> str:
    """The image's extension from the URL (readers may dispatch on it), or none."""
    suffix = posixpath.splitext(urlparse(url).path)[1].lower()
    return suffix if re.fullmatch(r"\.[a-z0-9]{1,8}", suffix) else ""


class ImageFetcher:
    """Resolves task image references to local files for one Label Studio host and token."""

    def __init__(
        self,
        source: LabelStudioSource | None,
        allowed_hosts: tuple[str, ...] = (),
        document_root: Path | None = None,
        download_dir: Path | None = None,
        limits: DownloadLimits | None = None,
    ) -> None:
        self.source = source
        self.auth = LabelStudioAuth(source.url, source.token) if source is not None and source.token else None
        allowed = set(allowed_hosts)
        if source is not None:
            allowed.add(host_entry(source.url))
        self.allowed = frozenset(allowed)
        self.document_root = document_root
        self.download_dir = download_dir
        self.limits = limits or DownloadLimits()
        self.session = requests.Session()
        adapter = _AllowListAdapter(self.allowed)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)

    @contextmanager
    def local_image(self, reference: str, task_id: int | None = None,
                    no_source_hint: str = NO_SOURCE_HINT, limits: DownloadLimits | None = None) -> Iterator[str]:
        """A local path to the image (or video) `reference` (URL or path) of task `task_id`.

        A downloaded file lives only inside the ``with`` block; local files are left alone.
        `no_source_hint` says what to set when a Label Studio file has no host and token to use;
        `limits` replace the fetcher's own for this file (videos have larger ones).
        """
        target = self._locate(reference, task_id, no_source_hint)
        if isinstance(target, Path):
            yield str(target)
            return
        path = self._download_first(target, reference, limits or self.limits)
        try:
            yield str(path)
        finally:
            path.unlink(missing_ok=True)

    def _locate(self, reference: str, task_id: int | None, no_source_hint: str) -> Path | list[str]:
        """A local file, or the URLs to download the image from."""
        if not isinstance(reference, str) or not reference.strip():
            raise ImageError("The task has no image URL in the field the labeling config names.")
        reference = reference.strip()
        if len(reference) > MAX_REFERENCE_CHARS:
            raise ImageError(
                f"The task's image reference is {len(reference):,} characters long (the limit is "
                f"{MAX_REFERENCE_CHARS:,}): fix the task's data to hold the image's URL or path."
            )
        if reference.startswith("data:"):
            raise ImageError("Inline data: URLs are not supported: import the image as a file.")
        scheme = parse_url(reference).scheme.lower()
        if scheme == "file":
            return self._local(unquote(urlparse(reference).path))
        if scheme in ("http", "https"):
            check_host(reference, self.allowed)
            return [reference]
        if scheme in CLOUD_SCHEMES or reference.startswith(LABEL_STUDIO_PREFIXES):
            relative = local_storage_path(reference)
            if relative is not None and self.document_root is not None:
                return self._checked(confine(self.document_root, relative), relative)
            if self.source is None or not self.source.token:
                raise ImageError(f"Task image {shown(reference)} is stored in Label Studio: {no_source_hint}")
            return label_studio_urls(reference, self.source.url, task_id)
        if scheme and len(scheme) > 1:
            raise ForbiddenURLError(f"Image URL scheme {scheme!r} is not supported (use http(s), s3, gs, azure-blob).")
        return self._local(reference)

    def _local(self, path: str) -> Path:
        root = self.document_root
        if root is not None and os.path.isabs(path):
            resolved = Path(path).resolve()
            if resolved != root and root not in resolved.parents:
                raise ForbiddenURLError(f"Task image {shown(path)} is outside the document root.")
            return self._checked(resolved, path)
        return self._checked(confine(root, path), path)

    @staticmethod
    def _checked(path: Path, reference: str) -> Path:
        """`path`, unless the file system refuses it (e.g. a name too long); a missing file is the reader's to report."""
        try:
            path.stat()
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise ImageError(f"Task image {shown(reference)} cannot be read: {exc.strerror}. Fix the task's data.") from None
        return path

    def _headers(self, url: str) -> dict[str, str]:
        """The token, only for a request to the Label Studio host it belongs to."""
        return self.auth.header() if self._carries_token(url) else {}

    def _carries_token(self, url: str) -> bool:
        return self.auth is not None and host_entry(url) == host_entry(self.source.url)

    def _download_first(self, urls: list[str], reference: str, limits: DownloadLimits) -> Path:
        """Download the first of `urls` that answers; an HTTP error status moves on to the next one."""
        for url in urls[:-1]:
            try:
                return self._download(url, reference, limits)
            except HTTPStatusError as exc:
                logger.debug("%s; trying the next URL", exc)
        return self._download(urls[-1], reference, limits)

    def _download(self, url: str, reference: str, limits: DownloadLimits, renewed: bool = False) -> Path:
        """Download `url`; a 401 from Label Studio renews a personal access token's access token once."""
        try:
            return download(self.session, url, self._headers(url), self.download_dir, limits,
                            file_suffix(url) or file_suffix(reference))
        except requests.HTTPError as exc:
            status = exc.response.status_code if exc.response is not None else "?"
            if status == 401 and not renewed and self._carries_token(url) and self.auth.renew():
                return self._download(url, reference, limits, renewed=True)
            fix = "check the URL"
            if status in (401, 403):
                fix = "check the token (LABEL_STUDIO_API_KEY, or the one Label Studio sends with /setup)"
            raise HTTPStatusError(f"Fetching {shown(reference)} failed with HTTP {status}: {fix}.") from exc
        except requests.Timeout as exc:
            raise ImageError(
                f"Fetching {shown(reference)} timed out (no answer within {limits.socket_timeouts[1]:g} s; "
                f"{limits.timeout_setting} sets the limit): check that the host is up."
            ) from exc
        except requests.ConnectionError as exc:
            raise ImageError(
                f"Fetching {shown(reference)} failed: cannot connect to {host_entry(url)} or the connection broke. "
                "Check the URL and that the host is up."
            ) from exc
        except requests.RequestException as exc:
            raise ImageError(f"Fetching {shown(reference)} failed: {exc}") from exc
