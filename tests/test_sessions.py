"""`promptseg.sessions`: the segmenters every host adapter shares, on the tiny SAM 3 and the real loader."""

from __future__ import annotations

import functools
import shutil
import threading
import time
from pathlib import Path

import pytest

import promptseg.segmenter
from promptseg.errors import ModelLoadError
from promptseg.sessions import MAX_SHARED, clear_shared_segmenters, shared_segmenter


@pytest.fixture
def loads(monkeypatch):
    """The models `load_segmenter` was asked for, in order; `loads.hold(model)` pauses that model's load."""
    real = promptseg.segmenter.load_segmenter

    class Loads(list):
        delay = 0.0
        held: dict[str, threading.Event] = {}

        def hold(self, model) -> threading.Event:
            return self.held.setdefault(str(model), threading.Event())

    seen = Loads()

    @functools.wraps(real)  # the same signature, so given and default arguments key alike
    def counting(model, *args, **kwargs):
        seen.append(str(model))
        if str(model) in seen.held:
            assert seen.held[str(model)].wait(60), "a held load was never released"
        time.sleep(seen.delay)
        return real(model, *args, **kwargs)

    monkeypatch.setattr(promptseg.segmenter, "load_segmenter", counting)
    clear_shared_segmenters()
    yield seen
    for event in seen.held.values():
        event.set()
    clear_shared_segmenters()


@pytest.fixture
def three_models(tiny_sam3_dir, tmp_path) -> list[str]:
    """Three model directories (copies of the tiny SAM 3), to fill the cache past its two places."""
    copies = [tmp_path / name for name in ("b", "c")]
    for copy in copies:
        shutil.copytree(tiny_sam3_dir, copy)
    return [str(tiny_sam3_dir), *map(str, copies)]


def test_same_arguments_give_the_same_segmenter_loaded_once(loads, tiny_sam3_dir):
    first = shared_segmenter(str(tiny_sam3_dir), device="cpu")
    again = shared_segmenter(str(tiny_sam3_dir), device="cpu")
    spelled_out = shared_segmenter(Path(tiny_sam3_dir), "cpu", "auto", cache_dir=None, clip=None)

    assert again is first and spelled_out is first
    assert loads == [str(tiny_sam3_dir)]
    assert first.stats.image_encoder_runs == 0 and first.describe()["device"] == "cpu"

    memory_only = shared_segmenter(str(tiny_sam3_dir), device="cpu", cache_dir=False)
    assert memory_only is not first and len(loads) == 2, "other load options are another segmenter"


def test_a_third_segmenter_drops_the_least_recently_used(loads, three_models):
    assert MAX_SHARED == 2
    a, b, c = three_models
    first_a = shared_segmenter(a, device="cpu")
    first_b = shared_segmenter(b, device="cpu")
    assert shared_segmenter(a, device="cpu") is first_a  # a is now the most recently used
    shared_segmenter(c, device="cpu")
    assert loads == [a, b, c]

    assert shared_segmenter(a, device="cpu") is first_a, "switching between two models does not reload"
    assert loads == [a, b, c]
    reloaded_b = shared_segmenter(b, device="cpu")
    assert reloaded_b is not first_b and loads == [a, b, c, b]


def test_concurrent_callers_share_one_load(loads, tiny_sam3_dir):
    loads.delay = 0.3  # keep the load under way while every thread asks
    barrier = threading.Barrier(6)
    got = []

    def ask():
        barrier.wait(10)
        got.append(shared_segmenter(str(tiny_sam3_dir), device="cpu"))

    threads = [threading.Thread(target=ask) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)

    assert len(got) == 6 and all(segmenter is got[0] for segmenter in got)
    assert loads == [str(tiny_sam3_dir)]


def test_a_load_under_way_does_not_block_another_segmenter(loads, three_models):
    a, b, _ = three_models
    loaded_b = shared_segmenter(b, device="cpu")
    release = loads.hold(a)
    waiting = threading.Thread(target=shared_segmenter, args=(a,), kwargs={"device": "cpu"})
    waiting.start()
    try:
        while a not in loads:  # bounded by the join below if the thread dies
            assert waiting.is_alive()
            time.sleep(0.01)
        assert shared_segmenter(b, device="cpu") is loaded_b
        assert waiting.is_alive(), "a's load is still held while b was served"
    finally:
        release.set()
        waiting.join(60)
    assert loads == [b, a]
    assert shared_segmenter(a, device="cpu") is not loaded_b and loads == [b, a]


def test_a_failed_load_reaches_every_waiting_caller_and_is_not_kept(loads, tmp_path):
    missing = str(tmp_path / "no-such-model")
    loads.delay = 0.3
    barrier = threading.Barrier(3)
    errors = []

    def ask():
        barrier.wait(10)
        try:
            shared_segmenter(missing, device="cpu")
        except ModelLoadError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=ask) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)

    assert len(errors) == 3 and loads == [missing], "one load, its error given to every caller"
    assert "no-such-model" in str(errors[0])
    with pytest.raises(ModelLoadError):
        shared_segmenter(missing, device="cpu")
    assert loads == [missing, missing], "a failure is not kept: the next call tries again"


def test_clear_forgets_every_segmenter(loads, tiny_sam3_dir):
    first = shared_segmenter(str(tiny_sam3_dir), device="cpu")
    clear_shared_segmenters()
    second = shared_segmenter(str(tiny_sam3_dir), device="cpu")
    assert second is not first and len(loads) == 2
