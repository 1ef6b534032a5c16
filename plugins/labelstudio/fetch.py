"""Turn a task's image reference into a local file, without server-side request forgery.

Uploaded files, Local Storage and cloud-storage URLs go through label-studio-sdk's
`get_local_path`, with every HTTP request (redirects included) checked against an allow-list:
the Label Studio host plus configured hosts. Plain paths and Local Storage paths are read only
inside the document root.
"""

from __future__ import annotations

import logging
import os
import posixpath
from pathlib import Path
from urllib.parse import unquote, urlparse

import requests
from requests.adapters import HTTPAdapter

from promptseg.errors import ImageError

logger = logging.getLogger(__name__)

CLOUD_SCHEMES = ("s3", "gs", "azure-blob")
LABEL_STUDIO_PREFIXES = ("/data/", "data/", "/upload/", "upload/", "/storage-data/", "storage-data/")


class ForbiddenURLError(ImageError):
    """An image URL points at a host or path the backend may not read."""


class _AllowListAdapter(HTTPAdapter):
    """Refuses any request (the first and every redirect) to a host not on the allow-list."""

    def __init__(self, allowed: frozenset[str]) -> None:
        super().__init__(max_retries=0)
        self.allowed = allowed

    def send(self, request, **kwargs):
        check_host(request.url, self.allowed)
        return super().send(request, **kwargs)


def check_host(url: str, allowed: frozenset[str]) -> None:
    """Raise `ForbiddenURLError` unless `url` is http(s) on an allowed ``host`` or ``host:port``."""
    parsed = urlparse(url)
    host = (parsed.hostname or "").lower()
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    if parsed.scheme not in ("http", "https") or not host:
        raise ForbiddenURLError(f"Image URL {url!r} is not an http(s) URL.")
    if host not in allowed and f"{host}:{port}" not in allowed:
        raise ForbiddenURLError(
            f"Image URL host {host}:{port} is not allowed: only the Label Studio host and "
            "PROMPTSEG_ALLOWED_HOSTS are fetched from (add the host there if you trust it)."
        )


def host_entry(url: str) -> str:
    """The ``host:port`` allow-list entry of a base URL."""
    parsed = urlparse(url)
    return f"{(parsed.hostname or '').lower()}:{parsed.port or (443 if parsed.scheme == 'https' else 80)}"


def confine(root: Path | None, relative: str) -> Path:
    """`relative` inside `root`, or `ForbiddenURLError` if it would escape (``..``, symlinks)."""
    if root is None:
        raise ForbiddenURLError(
            f"Task image {relative!r} is a local path, and local paths are disabled: set "
            "LOCAL_FILES_DOCUMENT_ROOT to the folder holding the images."
        )
    normal = posixpath.normpath(relative.replace("\\", "/")).lstrip("/")
    if normal == ".." or normal.startswith("../"):
        raise ForbiddenURLError(f"Task image {relative!r} climbs out of the document root ('..').")
    candidate = (root / normal).resolve()
    if candidate != root and root not in candidate.parents:
        raise ForbiddenURLError(f"Task image {relative!r} is outside the document root.")
    return candidate


class ImageFetcher:
    """Resolves task image references to local files for one Label Studio host and token."""

    def __init__(
        self,
        label_studio_url: str | None,
        access_token: str | None,
        allowed_hosts: tuple[str, ...] = (),
        document_root: Path | None = None,
        download_dir: Path | None = None,
    ) -> None:
        self.label_studio_url = label_studio_url
        self.access_token = access_token
        allowed = set(allowed_hosts)
        if label_studio_url:
            allowed.add(host_entry(label_studio_url))
        self.allowed = frozenset(allowed)
        self.document_root = document_root
        self.download_dir = download_dir
        self.session = requests.Session()
        adapter = _AllowListAdapter(self.allowed)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)

    def fetch(self, reference: str, task_id: int | None = None) -> str:
        """A local path to the image `reference` (URL or path) of task `task_id`."""
        if not isinstance(reference, str) or not reference.strip():
            raise ImageError("The task has no image URL in the field the labeling config names.")
        reference = reference.strip()
        scheme = urlparse(reference).scheme.lower()
        if reference.startswith("data:"):
            raise ImageError("Inline data: URLs are not supported: import the image as a file.")
        if scheme == "file":
            return str(self._local(unquote(urlparse(reference).path)))
        if scheme in ("http", "https"):
            check_host(reference, self.allowed)
            return self._sdk_fetch(reference, task_id)
        if scheme in CLOUD_SCHEMES or reference.startswith(LABEL_STUDIO_PREFIXES):
            if not self.label_studio_url or not self.access_token:
                raise ImageError(
                    f"Task image {reference!r} is stored in Label Studio: set LABEL_STUDIO_URL and "
                    "LABEL_STUDIO_API_KEY for the backend (or let Label Studio send them with /setup)."
                )
            return self._sdk_fetch(reference, task_id)
        if scheme and len(scheme) > 1:
            raise ForbiddenURLError(f"Image URL scheme {scheme!r} is not supported (use http(s), s3, gs, azure-blob).")
        return str(self._local(reference))

    def _local(self, path: str) -> Path:
        root = self.document_root
        if root is not None and os.path.isabs(path):
            resolved = Path(path).resolve()
            if resolved != root and root not in resolved.parents:
                raise ForbiddenURLError(f"Task image {path!r} is outside the document root.")
            return resolved
        return confine(root, path)

    def _local_files(self, relative: str) -> str | None:
        return str(confine(self.document_root, relative)) if self.document_root else None

    def _sdk_fetch(self, reference: str, task_id: int | None) -> str:
        from label_studio_sdk._extensions.label_studio_tools.core.utils.io import (
            get_local_path,
            http_session,
            local_files_resolver,
        )

        try:
            with http_session(self.session), local_files_resolver(self._local_files if self.document_root else None):
                return get_local_path(
                    reference,
                    cache_dir=str(self.download_dir) if self.download_dir else None,
                    hostname=self.label_studio_url or "",
                    access_token=self.access_token or "",
                    task_id=task_id,
                )
        except ImageError:
            raise
        except requests.HTTPError as exc:
            status = exc.response.status_code if exc.response is not None else "?"
            raise ImageError(f"Fetching {reference!r} failed with HTTP {status}: check the URL and the API key.") from exc
        except requests.RequestException as exc:
            raise ImageError(f"Fetching {reference!r} failed: {exc}") from exc
        except (FileNotFoundError, ValueError) as exc:
            raise ImageError(f"Cannot read {reference!r}: {exc}") from exc
