"""An embedding store shared by several machines: any fsspec file system, read through a local tier.

`cache_dir="s3://bucket/prefix"` (or ``gs://``, ``file://``, ``memory://``, any fsspec URL) keeps the
local store's guarantees on a shared one:

* the same content-hash keys and the same safetensors entries, in the same ``ab/<key>.safetensors``
  layout;
* verified reads: an entry is downloaded to a temporary local file and checked exactly as a local
  one (readable, metadata, tensor names, shapes, dtypes, finite values) before it is used; a bad or
  truncated entry is recomputed and the shared copy overwritten, with a warning;
* no partial entry visible to readers: object stores publish an object whole when its upload
  completes (S3 PUT and multipart uploads, GCS, Azure); elsewhere an entry is written under a
  temporary name and moved into place;
* a local tier in front (`local_dir_for`): an entry read or written once is kept on this machine, so
  asking again does not download again. The local tier keeps its size cap; the shared store has none.

Credentials and endpoints come the fsspec way (the environment, such as ``AWS_ACCESS_KEY_ID`` or
``AWS_ENDPOINT_URL``, or fsspec's configuration such as ``FSSPEC_S3_ENDPOINT_URL``) and are never
logged. A shared store that fails (no such bucket, no credentials, network down) never stops
segmentation: the first failure is logged once with its cause and fix, and the run goes on with the
local tier alone.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from promptseg.errors import OptionError

logger = logging.getLogger(__name__)

ATOMIC_PUT_PROTOCOLS = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss"})
"""Stores where an upload becomes visible whole or not at all; others get a temporary name and a move."""

EXTRA_FOR_PROTOCOL = {"s3": "promptseg[s3]", "s3a": "promptseg[s3]", "gs": "gcsfs", "gcs": "gcsfs",
                      "az": "adlfs", "abfs": "adlfs", "abfss": "adlfs"}

_USERINFO = re.compile(r"(\w[\w+.-]*://)[^/@\s]+@")


def redact(text: str) -> str:
    """`text` with any ``user:password@`` of a URL in it replaced by ``***@``: messages name stores, not secrets."""
    return _USERINFO.sub(r"\1***@", text)


def local_dir_for(url: str) -> Path:
    """The local tier of the shared store at `url`: a folder named after a hash of the URL under
    `PROMPTSEG_LOCAL_CACHE_DIR`, else under the platform's user cache directory."""
    base = os.environ.get("PROMPTSEG_LOCAL_CACHE_DIR")
    if base:
        root = Path(base).expanduser()
    else:
        import platformdirs

        root = Path(platformdirs.user_cache_dir("promptseg")) / "shared"
    return root / hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:16]


class LocalStore(Protocol):
    """What the shared store needs of its local tier (`promptseg.cache.DiskCache` provides it)."""

    root: Path
    max_bytes: int
    SUFFIX: str

    def path_for(self, key: str) -> Path: ...
    def contains(self, key: str) -> bool: ...
    def get(self, key: str, expected: dict[str, str], spec: Any = None) -> Any: ...
    def read(self, path: Path, expected: dict[str, str], spec: Any = None) -> tuple[Any, str | None]: ...
    def temp_path(self, key: str) -> Path: ...
    def write_temp(self, key: str, tensors: Any, metadata: dict[str, str]) -> Path: ...
    def adopt(self, key: str, tmp: Path) -> None: ...


@dataclass
class SharedStats:
    """What the shared store did in this process, for tests and benchmarks."""

    downloads: int = 0
    uploads: int = 0
    bad_entries: int = 0


class RemoteCache:
    """Entries in an fsspec file system several machines share, read through a local `DiskCache`.

    Same interface as `promptseg.cache.DiskCache` (`get`, `put`, `contains`, `path_for`, `root`), so the
    embedding cache uses either without knowing which.
    """

    def __init__(self, url: str, local: LocalStore) -> None:
        self.url = url.rstrip("/")
        self.root = redact(self.url)
        """What messages call this store (the URL without any credentials in it)."""
        self.local = local
        self.fs, self.base = _connect(self.url)
        protocols = {self.fs.protocol} if isinstance(self.fs.protocol, str) else set(self.fs.protocol)
        self.atomic_put = bool(protocols & ATOMIC_PUT_PROTOCOLS)
        self.stats = SharedStats()
        self.failure: str | None = None
        """Why the shared store was given up for this run, once it failed."""
        self._lock = threading.Lock()

    @property
    def max_bytes(self) -> int:
        """The local tier's cap (the shared store has none)."""
        return self.local.max_bytes

    def path_for(self, key: str) -> Path:
        """Where `key`'s entry is kept on this machine (the local tier)."""
        return self.local.path_for(key)

    def contains(self, key: str) -> bool:
        """Whether an entry is stored under `key` on this machine or in the shared store (not checked)."""
        if self.local.contains(key):
            return True
        if self.failure is not None:
            return False
        try:
            return bool(self.fs.exists(self.remote_path(key)))
        except Exception as exc:
            self._give_up("read from", exc)
            return False

    def remote_path(self, key: str) -> str:
        return f"{self.base}/{key[:2]}/{key}{self.local.SUFFIX}"

    def get(self, key: str, expected: dict[str, str], spec: Any = None) -> Any:
        """The tensors stored under `key` (local tier first, then the shared store), or None.

        A shared entry is checked like a local one (see `DiskCache.get`) before it is used or
        kept locally; one that fails the checks is left for the caller's `put` to overwrite.
        """
        tensors = self.local.get(key, expected, spec)
        if tensors is not None or self.failure is not None:
            return tensors
        tmp = self.local.temp_path(key)
        try:
            if not self._download(key, tmp):
                return None
            tensors, problem = self.local.read(tmp, expected, spec)
            if problem is not None:
                self.stats.bad_entries += 1
                logger.warning("Shared embedding cache entry %s is %s; recomputing it and overwriting the "
                               "shared copy.", redact(f"{self.url}/{key[:2]}/{key}{self.local.SUFFIX}"), problem)
                return None
            self.local.adopt(key, tmp)
            return tensors
        finally:
            tmp.unlink(missing_ok=True)

    def put(self, key: str, tensors: Any, metadata: dict[str, str]) -> None:
        """Write `key`'s entry to the shared store (so no reader sees part of it), then to the local tier."""
        tmp = self.local.write_temp(key, tensors, metadata)
        try:
            if self.failure is None:
                self._upload(tmp, key)
            self.local.adopt(key, tmp)
        finally:
            tmp.unlink(missing_ok=True)

    def _download(self, key: str, tmp: Path) -> bool:
        """Copy the shared entry to `tmp`; False when there is none (or the store failed)."""
        try:
            self.fs.get_file(self.remote_path(key), str(tmp))
        except FileNotFoundError:  # no entry yet (a missing bucket shows up at the first write)
            return False
        except Exception as exc:  # the store's own errors vary by file system: none may stop a run
            self._give_up("read from", exc)
            return False
        self.stats.downloads += 1
        return True

    def _upload(self, tmp: Path, key: str) -> None:
        target = self.remote_path(key)
        try:
            if self.atomic_put:
                self.fs.put_file(str(tmp), target)
            else:
                parent = target.rsplit("/", 1)[0]
                self.fs.makedirs(parent, exist_ok=True)
                staging = f"{parent}/.tmp-{uuid.uuid4().hex}{self.local.SUFFIX}"
                self.fs.put_file(str(tmp), staging)
                try:
                    self.fs.mv(staging, target)
                except BaseException:
                    self.fs.rm_file(staging)
                    raise
        except Exception as exc:
            self._give_up("write to", exc)
            return
        self.stats.uploads += 1

    def _give_up(self, action: str, exc: Exception) -> None:
        """Stop using the shared store for this run, and say why and what to do, once."""
        with self._lock:
            if self.failure is not None:
                return
            self.failure = f"{exc.__class__.__name__}: {redact(str(exc))}"
        logger.warning("Cannot %s the shared embedding cache %s (%s). %s Going on with the local cache %s "
                       "only for the rest of this run.", action, self.root, self.failure, _fix_for(exc),
                       self.local.root)


def _connect(url: str) -> tuple[Any, str]:
    """The fsspec file system and path of `url`; a setup error names the package to install."""
    import fsspec

    protocol = url.split("://", 1)[0]
    try:
        fs, path = fsspec.url_to_fs(url)
    except ImportError as exc:
        package = EXTRA_FOR_PROTOCOL.get(protocol, f"the fsspec implementation of {protocol}://")
        raise OptionError(f"The embedding cache {redact(url)} needs a package that is not installed "
                          f"({exc}). Install it with `pip install '{package}'`, or point cache_dir "
                          "(PROMPTSEG_CACHE_DIR) at a local folder.") from None
    except ValueError as exc:
        raise OptionError(f"The embedding cache {redact(url)} is not a URL fsspec knows ({redact(str(exc))}). "
                          "Use a folder or a URL such as s3://bucket/prefix, gs://bucket/prefix or "
                          "file:///shared/folder.") from None
    return fs, path.rstrip("/")


def _fix_for(exc: Exception) -> str:
    """What to do about a shared store's failure, by its kind."""
    name = exc.__class__.__name__
    if isinstance(exc, PermissionError) or "Credentials" in name or "AccessDenied" in str(exc):
        return ("Give this machine credentials that may read and write there (for S3: AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or an instance role; see docs/shared-cache.md).")
    if isinstance(exc, FileNotFoundError):
        return "Create the bucket (or folder) first, or point cache_dir (PROMPTSEG_CACHE_DIR) at one that exists."
    return ("Check the network and the endpoint (for S3-compatible stores AWS_ENDPOINT_URL or "
            "FSSPEC_S3_ENDPOINT_URL), or point cache_dir (PROMPTSEG_CACHE_DIR) at a local folder.")
