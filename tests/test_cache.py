"""The embedding cache: bytes-bounded memory LRU, atomic disk store with a size cap, clear errors."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
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


# -- entries whose header is valid but whose tensors are not what the backend makes --------------

SPEC = {"fpn_0": ((256,), torch.float32), "fpn_1": ((128,), torch.float32)}


def _with_value(stored: dict[str, torch.Tensor], name: str, value: float) -> dict[str, torch.Tensor]:
    damaged = stored[name].clone()
    damaged.view(-1)[damaged.numel() // 2] = value
    return {**stored, name: damaged}


DAMAGE = {  # what a bad entry holds -> words of the warning
    "shape": (lambda t: {**t, "fpn_1": t["fpn_1"][..., :-1].contiguous()}, "shape"),
    "dtype": (lambda t: {**t, "fpn_0": t["fpn_0"].half()}, "float16"),
    "nan": (lambda t: _with_value(t, "fpn_0", float("nan")), "NaN or infinite"),
    "inf": (lambda t: _with_value(t, "fpn_1", float("-inf")), "NaN or infinite"),
}


def rewrite_entry(path, change) -> None:
    """Replace a cache file's tensors by `change(tensors)`, keeping its (valid) metadata."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
        stored = {name: handle.get_tensor(name) for name in handle.keys()}
    save_file(change(stored), str(path), metadata=metadata)


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_disk_entry_unlike_the_backends_embedding_is_deleted(tmp_path, caplog, damage):
    disk = DiskCache(tmp_path)
    key, meta = "ab" * 32, {"model": "m"}
    disk.put(key, tensors(1.0), meta)
    assert disk.get(key, meta, SPEC) is not None  # the intact entry passes
    change, words = DAMAGE[damage]
    rewrite_entry(disk.path_for(key), change)
    assert disk.get(key, meta, SPEC) is None
    assert not disk.path_for(key).exists()
    assert "deleting it and recomputing" in caplog.text and words in caplog.text


def test_without_a_spec_only_the_values_are_checked(tmp_path):
    disk = DiskCache(tmp_path)
    disk.put("cd" * 32, {"fpn_0": torch.ones(7, dtype=torch.float16)}, {})
    assert disk.get("cd" * 32, {}) is not None  # any shape and dtype: the backend declares none
    disk.put("cd" * 32, {"fpn_0": torch.tensor([1.0, float("nan")])}, {})
    assert disk.get("cd" * 32, {}) is None


def test_sam3_embedding_spec_is_what_its_encoder_returns(make_segmenter, rgb_image, tmp_path):
    from promptseg import load_segmenter
    from promptseg.testing import make_random_sam3

    other_size = make_random_sam3(tmp_path / "sam3-84", image_size=84)
    for seg in (make_segmenter(cache_dir=False), make_segmenter(cache_dir=False, dtype="bf16"),
                load_segmenter(str(other_size), device="cpu", cache_dir=False)):
        for image in (rgb_image, rgb_image[:5, :40], np.zeros((500, 37, 3), np.uint8)):
            features = seg.backend.encode_image(seg.backend.preprocess(image))
            made = {name: (tuple(t.shape), t.dtype) for name, t in features.items()}
            assert made == seg.backend.embedding_spec(image.shape[:2])
    assert made["fpn_2"][0] == (1, 32, 6, 6)  # 84 px / 14 px patches


def reference_probabilities(seg, rgb, prompt):
    from tolerance import full_size_probabilities

    features, _ = seg.embed(rgb)
    [found] = seg.backend.decode(features, seg.text_embeddings([prompt]), 0.0)
    return full_size_probabilities({prompt: found}, rgb.shape[:2])


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_cache_file_with_valid_header_but_bad_tensors_is_recomputed(make_segmenter, rgb_image, tmp_path, caplog,
                                                                      damage):
    from tolerance import assert_results_agree

    cache_dir, options = tmp_path / "c", {"threshold": 0.0, "iou_threshold": None, "cross_prompt_iou": None}
    first = make_segmenter(cache_dir=cache_dir)
    fresh = first.segment(rgb_image, "cat", **options)
    computed, _ = first.embed(rgb_image)
    (path,) = cache_dir.glob("*/*.safetensors")
    change, words = DAMAGE[damage]
    rewrite_entry(path, change)

    again = make_segmenter(cache_dir=cache_dir)
    result = again.segment(rgb_image, "cat", **options)
    assert result.embedding_source == "computed" and again.stats.image_encoder_runs == 1
    assert "deleting it and recomputing" in caplog.text and words in caplog.text
    assert len(fresh) > 0
    assert_results_agree(result, fresh, reference_probabilities(first, rgb_image, "cat"))

    caplog.clear()
    third = make_segmenter(cache_dir=cache_dir)
    read, source = third.embed(rgb_image)  # the file was replaced by a good entry
    assert source == "disk" and "recomputing" not in caplog.text
    assert all(torch.equal(read[name], computed[name]) for name in computed)
