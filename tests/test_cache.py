"""The embedding cache: bytes-bounded memory LRU, atomic disk store with a size cap, clear errors."""

from __future__ import annotations

import os
import time

import torch

from promptseg.cache import DiskCache, EmbeddingCache, MemoryCache, make_key


def tensors(value: float, numel: int = 256) -> dict[str, torch.Tensor]:
    return {"fpn_0": torch.full((numel,), float(value)), "fpn_1": torch.full((numel // 2,), float(value))}


def test_memory_cache_is_bounded_by_bytes_and_evicts_least_recent():
    entry_bytes = (256 + 128) * 4
    cache = MemoryCache(max_bytes=2 * entry_bytes)
    cache.put("a", tensors(1))
    cache.put("b", tensors(2))
    assert cache.get("a") is not None  # a is now the most recent
    cache.put("c", tensors(3))
    assert cache.get("b") is None and cache.get("a") is not None and cache.get("c") is not None
    assert cache.nbytes == 2 * entry_bytes
    cache.put("huge", tensors(4, numel=10_000))  # larger than the whole cache: not kept
    assert cache.get("huge") is None and len(cache) == 2


def test_disk_cache_round_trips_and_checks_metadata(tmp_path):
    disk = DiskCache(tmp_path)
    meta = {"model": "m", "dtype": "fp32"}
    disk.put("ab" * 32, tensors(1.5), meta)
    loaded = disk.get("ab" * 32, meta)
    assert torch.equal(loaded["fpn_0"], tensors(1.5)["fpn_0"])
    assert disk.get("ab" * 32, {"model": "other", "dtype": "fp32"}) is None  # mismatch: deleted
    assert not disk.path_for("ab" * 32).exists()


def test_disk_cache_leaves_no_partial_files(tmp_path):
    disk = DiskCache(tmp_path)
    disk.put("cd" * 32, tensors(1), {})
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == ["cd" * 32 + ".safetensors"]


def test_garbage_file_is_deleted_and_reported(tmp_path, caplog):
    disk = DiskCache(tmp_path)
    path = disk.path_for("ef" * 32)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a safetensors file")
    assert disk.get("ef" * 32, {}) is None
    assert not path.exists() and "deleting it and recomputing" in caplog.text


def test_disk_cache_size_cap_evicts_least_recently_used(tmp_path):
    disk = DiskCache(tmp_path, max_bytes=10**9)
    keys = [f"{i:02d}" * 32 for i in range(4)]
    for age, key in enumerate(keys):
        disk.put(key, tensors(age, numel=4096), {})
        past = time.time() - 100 + age
        os.utime(disk.path_for(key), (past, past))
    disk.get(keys[0], {})  # reading refreshes recency
    one_file = disk.path_for(keys[0]).stat().st_size
    disk.max_bytes = 2 * one_file
    disk.evict()
    remaining = {p.stem for p in disk.files()}
    assert remaining == {keys[0], keys[3]}
    assert disk.clear() == 2 and disk.files() == []


def test_two_tier_cache_counts_hits_and_promotes_disk_entries(tmp_path):
    cache = EmbeddingCache(MemoryCache(), DiskCache(tmp_path))
    key = make_key(pixels="p", model="m")
    assert cache.get(key, {})[1] == "miss"
    cache.put(key, tensors(2), {})
    assert cache.get(key, {})[1] == "memory"
    cold = EmbeddingCache(MemoryCache(), DiskCache(tmp_path))
    assert cold.get(key, {})[1] == "disk"
    assert cold.get(key, {})[1] == "memory"
    assert (cold.stats.disk_hits, cold.stats.memory_hits, cold.stats.misses) == (1, 1, 0)


def test_unwritable_disk_does_not_stop_segmentation(tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache directory should be")
    cache = EmbeddingCache(MemoryCache(), DiskCache(blocker / "cache"))
    cache.put("gh" * 32, tensors(1), {})
    assert cache.get("gh" * 32, {})[1] == "memory"
    assert cache.stats.disk_errors == 1 and "Cannot write the embedding cache" in caplog.text


def test_keys_change_with_every_part():
    base = {"backend": "sam3", "model": "m", "dtype": "fp32", "input_size": "1008x1008", "pixels": "p"}
    keys = {make_key(**base)}
    for part in base:
        keys.add(make_key(**{**base, part: "other"}))
    assert len(keys) == len(base) + 1
