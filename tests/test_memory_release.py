"""Where cached embeddings live, and that unloading a segmenter gives its memory back.

The `meta` device stands in for a GPU: a tensor moved there keeps its shape and dtype and needs
no memory, so the cache's placement (host copies, one entry on the device) is checked without one.
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from promptseg.cache import EmbeddingCache, MemoryCache, owned
from promptseg.errors import ModelLoadError


def features(value: float) -> dict[str, torch.Tensor]:
    return {"fpn_0": torch.full((4, 8), value), "fpn_1": torch.full((2, 4), value)}


def test_memory_tier_is_on_the_host_and_one_entry_on_the_device():
    cache = EmbeddingCache(MemoryCache())
    cache.put("a", features(1.0), {})
    cache.put("b", features(2.0), {})
    on_gpu, origin = cache.get("a", {}, "meta")
    assert origin == "memory" and {t.device.type for t in on_gpu.values()} == {"meta"}
    assert all(t.device.type == "cpu" for key in ("a", "b") for t in cache.memory.get(key).values())
    again, _ = cache.get("a", {}, "meta")
    assert again is on_gpu  # the next prompt on that image copies nothing
    other, _ = cache.get("b", {}, "meta")
    assert other is not on_gpu and cache.get("a", {}, "meta")[0] is not on_gpu  # one entry on the device
    assert cache.stats.memory_hits == 4


def test_on_the_cpu_nothing_is_copied():
    cache = EmbeddingCache(MemoryCache())
    stored = cache.put("a", features(1.0), {})
    found, _ = cache.get("a", {}, "cpu")
    assert all(found[name] is stored[name] is cache.memory.get("a")[name] for name in stored)


def test_release_empties_host_and_device_tiers():
    cache = EmbeddingCache(MemoryCache())
    cache.put("a", features(1.0), {})
    cache.get("a", {}, "meta")
    cache.release()
    assert len(cache.memory) == 0 and cache.memory.nbytes == 0
    assert cache.get("a", {}, "meta") == (None, "miss")


def test_a_slice_of_a_batch_does_not_keep_the_batch_alive():
    batch = torch.zeros(16, 1000)
    row = owned(batch[3])
    assert row.untyped_storage().nbytes() == 1000 * 4 and torch.equal(row, batch[3])
    whole = torch.ones(10)
    assert owned(whole).data_ptr() == whole.data_ptr()  # already its own: not copied


def test_cached_text_features_are_counted_at_their_own_size(segmenter):
    segmenter.text_embeddings(["red square", "green thing", "a cell"])
    entries = [segmenter.text_cache.get(key) for key in list(segmenter.text_cache._items)]
    assert len(entries) == 3
    for entry in entries:
        for tensor in entry.values():
            assert tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()
    assert segmenter.text_cache.nbytes == sum(t.numel() * t.element_size() for e in entries for t in e.values())


def test_close_frees_the_model_and_refuses_further_use(make_segmenter, rgb_image, monkeypatch):
    from promptseg import device

    released = []
    monkeypatch.setattr(device, "release_device_memory", released.append)
    segmenter = make_segmenter(cache_dir=False)
    segmenter.segment(rgb_image, "red square")
    model = weakref.ref(segmenter.backend.model)
    segmenter.close()
    gc.collect()
    assert model() is None and len(segmenter.cache.memory) == 0 and len(segmenter.text_cache) == 0
    assert released == [torch.device("cpu")]
    with pytest.raises(ModelLoadError, match="was closed.*load_segmenter"):
        segmenter.segment(rgb_image, "red square")


@pytest.mark.parametrize("kind", ["cuda", "mps"])
def test_device_memory_is_handed_back_to_the_driver(monkeypatch, kind):
    from promptseg.device import release_device_memory

    emptied = []
    monkeypatch.setattr(getattr(torch, kind), "empty_cache", lambda: emptied.append(kind))
    release_device_memory(torch.device(kind))
    release_device_memory(torch.device("cpu"))
    assert emptied == [kind]


def test_a_dropped_shared_segmenter_is_freed(tiny_sam3_dir, rgb_image, monkeypatch):
    from promptseg import device, sessions

    sessions.clear_shared_segmenters()  # what other tests left loaded is released before counting
    released = []
    monkeypatch.setattr(device, "release_device_memory", released.append)
    first = sessions.shared_segmenter(str(tiny_sam3_dir), device="cpu", dtype="fp32", cache_dir=False)
    first.segment(rgb_image, "red square")
    model, cache = weakref.ref(first.backend.model), first.cache
    del first
    for dtype in ("bf16", "fp16"):  # two more: the first is the least recently used, and dropped
        sessions.shared_segmenter(str(tiny_sam3_dir), device="cpu", dtype=dtype, cache_dir=False)
    gc.collect()
    assert model() is None and len(cache.memory) == 0
    assert released == [torch.device("cpu")]
    sessions.clear_shared_segmenters()
    assert released == [torch.device("cpu")] * 2
