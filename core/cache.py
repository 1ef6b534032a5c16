"""Two-tier embedding cache: an in-memory LRU bounded by bytes, then safetensors files on disk.

An image embedding is what the prompt decoder consumes: a small dict of tensors. The key is a
content hash of the decoded pixels plus everything that changes the embedding (backend, model
id and revision, dtype, input size, cache format version), so a different precision or model
never reads another's entry. Disk writes are atomic; a truncated or mismatched file, or one whose
tensors are not what the backend produces (names, shapes, dtypes) or hold NaN or infinite values,
is deleted and recomputed with a warning; the disk store is capped in bytes and evicts the least
recently used files. The disk store may also be shared by several machines: an fsspec URL as the
cache location (see `promptseg.remote_cache`) keeps the same guarantees there. Both tiers hold
contiguous tensors, so a decoder reading an entry from memory or from disk sees the same values in
the same layout.

Placement: the memory tier lives in host memory whatever the model's device, so a GPU holds the
model and one embedding (the last one used, kept on the device for the next prompt on that image),
never gigabytes of cache beside it. An entry is copied to the device when a prompt needs it: for
SAM 3 in fp16 that is 53 MiB of FPN levels (plus 10 MiB with the tracker levels): about 5 ms at
PCIe 3 x16's 12 GB/s (computed, not measured here), once per image change. On the CPU nothing is
copied.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from promptseg.errors import OptionError

if TYPE_CHECKING:
    from promptseg.remote_cache import RemoteCache

logger = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = 2
DEFAULT_MEMORY_BYTES = 2 * 1024**3
DEFAULT_DISK_BYTES = 20 * 1024**3

Tensors = dict[str, torch.Tensor]
TensorSpec = dict[str, tuple[tuple[int, ...], torch.dtype]]
"""Name -> (shape, dtype) of every tensor an embedding must hold (see `embedding_spec` in the backends)."""


def is_url(location: str | os.PathLike) -> bool:
    """Whether a cache location is an fsspec URL (``s3://bucket/prefix``, ``file:///srv/cache``)
    rather than a local folder."""
    return isinstance(location, str) and "://" in location


def default_cache_location() -> str | Path:
    """`PROMPTSEG_CACHE_DIR` (a folder or an fsspec URL), else the platform's user cache directory."""
    env = os.environ.get("PROMPTSEG_CACHE_DIR")
    if env and is_url(env):
        return env
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("promptseg")) / "embeddings"


def default_cache_dir() -> Path:
    """The local folder of the default cache: `default_cache_location()`, or when that is a URL the
    local tier in front of it (see `promptseg.remote_cache.local_dir_for`)."""
    location = default_cache_location()
    if isinstance(location, Path):
        return location
    from promptseg.remote_cache import local_dir_for

    return local_dir_for(location)


def open_disk_cache(
    cache_dir: str | os.PathLike | bool | None, max_bytes: int = DEFAULT_DISK_BYTES, folder: str | None = None
) -> DiskCache | RemoteCache | None:
    """The disk cache a loader's `cache_dir` names: a folder (`folder` below it when given), an fsspec
    URL (a store shared by several machines, with a local tier capped at `max_bytes`), None or True
    for `default_cache_location()`, False for none."""
    if cache_dir is False:
        return None
    location = cache_dir if cache_dir not in (None, True) else default_cache_location()
    _refuse_mangled_url(location)
    if is_url(location):
        from promptseg.remote_cache import RemoteCache, local_dir_for

        url = f"{location.rstrip('/')}/{folder}" if folder else location
        return RemoteCache(url, DiskCache(local_dir_for(url), max_bytes))
    root = Path(location)
    return DiskCache(root / folder if folder else root, max_bytes)


def _refuse_mangled_url(location: str | os.PathLike) -> None:
    """A URL that went through `pathlib.Path` lost a slash (``s3:/bucket``); used as a folder it would
    silently cache in a local directory of that name."""
    text = os.fspath(location)
    if not isinstance(location, str) and re.match(r"[A-Za-z][A-Za-z0-9+.-]+:/(?!/)", text):
        raise OptionError(f"The embedding cache {text!r} looks like a URL that went through pathlib.Path, which "
                          "drops a slash. Pass the URL as a string (cache_dir=\"s3://bucket/prefix\").")


def make_key(**parts: object) -> str:
    """A stable hex key from named parts (sorted, JSON-encoded, hashed)."""
    payload = json.dumps({"format": CACHE_FORMAT_VERSION, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


def tensors_nbytes(tensors: Tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def owned(tensor: torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    """`tensor` on `device`, contiguous and owning exactly its own bytes: a slice of a batch would
    otherwise keep the whole batch's storage alive (and a cache counting its bytes would undercount)."""
    tensor = tensor.detach().to(device).contiguous()
    if tensor.untyped_storage().nbytes() > tensor.numel() * tensor.element_size():
        tensor = tensor.clone()
    return tensor


def on_device(tensors: Tensors, device: torch.device | str) -> Tensors:
    """`tensors` moved to `device` (the same objects when they are there already)."""
    return {name: t.to(device) for name, t in tensors.items()}


def tensor_problem(tensors: Tensors, spec: TensorSpec | None = None) -> str | None:
    """Why `tensors` cannot be used as the embedding `spec` describes, or None when they can.

    Without a spec only the values are checked (every floating tensor finite).
    """
    if spec is not None:
        if set(tensors) != set(spec):
            return f"holds tensors {sorted(tensors)} where the backend makes {sorted(spec)}"
        for name, (shape, dtype) in spec.items():
            tensor = tensors[name]
            if tuple(tensor.shape) != tuple(shape):
                return f"has {name} of shape {tuple(tensor.shape)} where the backend makes {tuple(shape)}"
            if tensor.dtype != dtype:
                return f"has {name} in {tensor.dtype} where the backend makes {dtype}"
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return f"has NaN or infinite values in {name}"
    return None


@dataclass
class CacheStats:
    """Hit and miss counters, for tests, benchmarks and the hosts' status lines."""

    memory_hits: int = 0
    disk_hits: int = 0
    misses: int = 0
    disk_errors: int = 0

    @property
    def hits(self) -> int:
        return self.memory_hits + self.disk_hits


class MemoryCache:
    """An LRU of tensor dicts whose total size stays under `max_bytes`."""

    def __init__(self, max_bytes: int = DEFAULT_MEMORY_BYTES) -> None:
        self.max_bytes = int(max_bytes)
        self._items: OrderedDict[str, Tensors] = OrderedDict()
        self._sizes: dict[str, int] = {}
        self.nbytes = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: str) -> Tensors | None:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: str, tensors: Tensors) -> None:
        size = tensors_nbytes(tensors)
        with self._lock:
            if key in self._items:
                self.nbytes -= self._sizes.pop(key)
                del self._items[key]
            if size > self.max_bytes:
                return
            self._items[key] = tensors
            self._sizes[key] = size
            self.nbytes += size
            while self.nbytes > self.max_bytes:
                old_key, _ = self._items.popitem(last=False)
                self.nbytes -= self._sizes.pop(old_key)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._sizes.clear()
            self.nbytes = 0


class DiskCache:
    """Safetensors files under `root`, one per key, with their key parts in the file's metadata."""

    SUFFIX = ".safetensors"

    def __init__(self, root: str | os.PathLike, max_bytes: int = DEFAULT_DISK_BYTES) -> None:
        self.root = Path(root).expanduser()
        self.max_bytes = int(max_bytes)

    def path_for(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}{self.SUFFIX}"

    def contains(self, key: str) -> bool:
        """Whether an entry is stored under `key` (not checked: `get` does that)."""
        return self.path_for(key).exists()

    def get(self, key: str, expected: dict[str, str], spec: TensorSpec | None = None) -> Tensors | None:
        """The tensors stored under `key`, or None; a damaged or mismatched file is removed.

        `expected` is the key parts the file's metadata must repeat; `spec` the names, shapes and
        dtypes its tensors must have (their values must be finite in any case).
        """
        path = self.path_for(key)
        if not path.exists():
            return None
        tensors, problem = self.read(path, expected, spec)
        if problem is not None:
            self._discard(path, problem)
            return None
        try:
            os.utime(path)  # recency for LRU eviction
        except OSError:
            pass
        return tensors

    def read(
        self, path: Path, expected: dict[str, str], spec: TensorSpec | None = None
    ) -> tuple[Tensors | None, str | None]:
        """The tensors of the entry file at `path` and None, or None and why they cannot be trusted:
        unreadable (truncated, garbage), metadata other than `expected`, or tensors other than `spec`."""
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
                tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        except Exception as exc:  # truncated, garbage, or a half-written file from a crash
            return None, f"unreadable ({exc.__class__.__name__}: {exc})"
        mismatched = {k: (metadata.get(k), v) for k, v in expected.items() if metadata.get(k) != v}
        expected_names = set(json.loads(metadata.get("tensor_names", "[]")))
        if mismatched or not tensors or expected_names != set(tensors):
            return None, f"does not match what was expected ({mismatched or 'tensor set'})"
        problem = tensor_problem(tensors, spec)
        if problem is not None:
            return None, f"valid on its face but {problem}"
        return tensors, None

    def put(self, key: str, tensors: Tensors, metadata: dict[str, str]) -> None:
        """Write atomically (temporary file, then rename), then evict down to the size cap."""
        self.adopt(key, self.write_temp(key, tensors, metadata))

    def temp_path(self, key: str) -> Path:
        """A new empty file beside `key`'s entry, which readers never open (`adopt` renames it in)."""
        path = self.path_for(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=self.SUFFIX)
        os.close(fd)
        return Path(tmp)

    def write_temp(self, key: str, tensors: Tensors, metadata: dict[str, str]) -> Path:
        """`key`'s entry written to a temporary file (see `temp_path`), not yet visible to readers."""
        from safetensors.torch import save_file

        cpu = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
        meta = {**metadata, "tensor_names": json.dumps(sorted(cpu))}
        tmp = self.temp_path(key)
        try:
            save_file(cpu, str(tmp), metadata=meta)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return tmp

    def adopt(self, key: str, tmp: Path) -> None:
        """Make a complete temporary file `key`'s entry in one rename, then evict down to the size cap."""
        try:
            os.replace(tmp, self.path_for(key))
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        self.evict()

    def files(self) -> list[Path]:
        if not self.root.exists():
            return []
        return [p for p in self.root.glob(f"*/*{self.SUFFIX}") if not p.name.startswith(".tmp-")]

    def size(self) -> int:
        return sum(_safe_size(p) for p in self.files())

    def evict(self) -> int:
        """Delete least recently used files until the store fits `max_bytes`; return bytes freed."""
        files = self.files()
        total = sum(_safe_size(p) for p in files)
        freed = 0
        if total <= self.max_bytes:
            return 0
        for path in sorted(files, key=_safe_mtime):
            if total - freed <= self.max_bytes:
                break
            size = _safe_size(path)
            path.unlink(missing_ok=True)
            freed += size
        return freed

    def clear(self) -> int:
        """Delete every cached file; return how many were removed."""
        files = self.files()
        for path in files:
            path.unlink(missing_ok=True)
        for tmp in self.root.glob(f"*/.tmp-*{self.SUFFIX}") if self.root.exists() else []:
            tmp.unlink(missing_ok=True)
        return len(files)

    def _discard(self, path: Path, why: str) -> None:
        logger.warning("Embedding cache file %s is %s; deleting it and recomputing.", path, why)
        path.unlink(missing_ok=True)


def _safe_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _safe_mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


class EmbeddingCache:
    """Memory first, then disk; counts hits and misses. `disk=None` keeps everything in memory.

    The memory tier holds host copies; the entry used last also stays on the device it was asked
    for (see the module's "Placement").
    """

    def __init__(self, memory: MemoryCache | None = None, disk: DiskCache | RemoteCache | None = None) -> None:
        self.memory = memory if memory is not None else MemoryCache()
        self.disk = disk
        self.stats = CacheStats()
        self._on_device: tuple[str, torch.device, Tensors] | None = None
        """The last entry used, on its device: the next prompt on that image copies nothing."""

    def _keep_on_device(self, key: str, device: torch.device | str, tensors: Tensors) -> Tensors:
        device = torch.device(device)
        on = on_device(tensors, device)
        self._on_device = (key, device, on) if device.type != "cpu" else None
        return on

    def release(self) -> None:
        """Drop every entry held in memory, on the host and on the device (the disk keeps its own)."""
        self.memory.clear()
        self._on_device = None

    def get(
        self, key: str, metadata: dict[str, str], device: torch.device | str = "cpu",
        spec: TensorSpec | None = None,
    ) -> tuple[Tensors | None, str]:
        """Return ``(tensors, source)``; source is ``"memory"``, ``"disk"`` or ``"miss"``.

        A disk entry is checked against `spec` (see `DiskCache.get`); memory holds only what
        was computed here or already checked.
        """
        device = torch.device(device)
        if self._on_device is not None and self._on_device[:2] == (key, device):
            self.stats.memory_hits += 1
            return self._on_device[2], "memory"
        tensors = self.memory.get(key)
        if tensors is not None:
            self.stats.memory_hits += 1
            return self._keep_on_device(key, device, tensors), "memory"
        if self.disk is not None:
            try:
                tensors = self.disk.get(key, metadata, spec)
            except OSError as exc:
                self.stats.disk_errors += 1
                logger.warning("Cannot read the embedding cache at %s: %s", self.disk.root, exc)
                tensors = None
            if tensors is not None:
                self.memory.put(key, tensors)
                self.stats.disk_hits += 1
                return self._keep_on_device(key, device, tensors), "disk"
        self.stats.misses += 1
        return None, "miss"

    def put(self, key: str, tensors: Tensors, metadata: dict[str, str]) -> Tensors:
        """Store `tensors` in both tiers; return them as stored (contiguous, on their own device),
        for the caller to use."""
        device = next(iter(tensors.values())).device if tensors else torch.device("cpu")
        kept = {name: owned(t, device) for name, t in tensors.items()}
        host = on_device(kept, "cpu")  # the same tensors on the CPU
        self.memory.put(key, host)
        if self.disk is not None:
            try:
                self.disk.put(key, host, metadata)
            except OSError as exc:  # a full or read-only disk must not stop segmentation
                self.stats.disk_errors += 1
                logger.warning("Cannot write the embedding cache at %s: %s", self.disk.root, exc)
        return self._keep_on_device(key, device, kept)
