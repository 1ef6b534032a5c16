"""Every SAM 3 decode path in fp16 and bf16, on both backends, agrees with fp32.

The paths are the public calls: text prompts, exemplar boxes, a tiled image, a Z-stack, and visual
prompts (clicks, a box, a box on a tiled image). Each runs on the transformers backend (the hub's
layout, tracker included) and on the ``sam3-meta`` backend (an official ``sam3.pt`` layout), in
fp32 and in the lower precision, on the CPU. What the backend's decoder returns on each call is
recorded: the lower precision must give finite values that match fp32 call for call within
`tolerance.LOW_PRECISION` (scores and predicted IoUs, mask probabilities, normalised boxes, the
share of mask pixels on the same side of the cut), and the public result must hold finite scores.
Every query is kept (``threshold=0``) so the decoders' outputs line up one to one.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
from tolerance import LOW_PRECISION, assert_low_precision_close

import sam3  # noqa: F401  (the meta extra; CI installs it)

import promptseg

BACKENDS = ["transformers", "meta"]
DTYPES = ["fp16", "bf16"]
PROMPTS = ["red square", "green thing"]
EXEMPLARS = [(40, 30, 110, 80), (130, 60, 180, 100)]
TILE = 112  # the tiny models' input size: four tiles of the 120x200 test image


@pytest.fixture(scope="module")
def checkpoints(tiny_sam3_hub_dir, tmp_path_factory) -> dict[str, str]:
    from promptseg.testing import make_random_meta_sam3

    return {"transformers": str(tiny_sam3_hub_dir),
            "meta": str(make_random_meta_sam3(tmp_path_factory.mktemp("models") / "tiny-meta"))}


@pytest.fixture(scope="module")
def segmenters(checkpoints):
    """One segmenter per backend and precision for the module (in-memory cache only)."""
    loaded = {}

    def get(backend: str, dtype: str):
        if (backend, dtype) not in loaded:
            loaded[backend, dtype] = promptseg.load_segmenter(checkpoints[backend], device="cpu", dtype=dtype,
                                                              cache_dir=False)
        return loaded[backend, dtype]

    return get


def run_in_both(segmenters, monkeypatch, backend: str, dtype: str, decoder: str, call):
    """`call(segmenter)` in fp32 and in `dtype`: both results and what `decoder` returned on each call."""
    runs = []
    for precision in ("fp32", dtype):
        segmenter = segmenters(backend, precision)
        assert segmenter.describe()["dtype"] == precision
        outputs = []
        original = getattr(segmenter.backend, decoder)

        def recording(*args, original=original, outputs=outputs, **kwargs):
            outputs.append(original(*args, **kwargs))
            return outputs[-1]

        monkeypatch.setattr(segmenter.backend, decoder, recording)
        runs.append((call(segmenter), outputs))
    (reference, reference_outputs), (lower, lower_outputs) = runs
    assert len(reference_outputs) == len(lower_outputs) > 0
    return reference, lower, list(zip(reference_outputs, lower_outputs))


def assert_finite_scores(*results) -> None:
    for result in results:
        assert result.instances, "no instance at all"
        assert all(math.isfinite(instance.score) for instance in result.instances)


def assert_text_decoders_agree(pairs, dtype: str) -> None:
    for reference, lower in pairs:
        assert_low_precision_close(reference, lower, dtype)


def assert_object_decoders_agree(pairs, dtype: str) -> None:
    """Visual prompts: predicted IoUs like scores, mask probabilities, and pixels on the same side of the cut."""
    score_tol, mask_tol, _, agreement = LOW_PRECISION[dtype]
    for (ref_logits, ref_ious), (low_logits, low_ious) in pairs:
        assert low_logits.shape == ref_logits.shape and low_ious.shape == ref_ious.shape
        assert torch.isfinite(low_logits).all() and torch.isfinite(low_ious).all()
        torch.testing.assert_close(low_ious, ref_ious, atol=score_tol, rtol=0)
        torch.testing.assert_close(low_logits.sigmoid(), ref_logits.sigmoid(), atol=mask_tol, rtol=0)
        same = ((ref_logits > 0) == (low_logits > 0)).float().mean().item()
        assert same >= agreement, f"{dtype}: only {same:.4f} of mask pixels agree with fp32"


both = pytest.mark.parametrize("dtype", DTYPES)
backends = pytest.mark.parametrize("backend", BACKENDS)


@backends
@both
def test_text_prompts(segmenters, monkeypatch, rgb_image, backend, dtype):
    reference, lower, pairs = run_in_both(
        segmenters, monkeypatch, backend, dtype, "decode", lambda seg: seg.segment(rgb_image, PROMPTS, threshold=0.0)
    )
    assert len(pairs) == len(PROMPTS)  # one prompt per decoder call on the CPU
    assert_text_decoders_agree(pairs, dtype)
    assert_finite_scores(reference, lower)


@backends
@both
def test_exemplar_boxes(segmenters, monkeypatch, rgb_image, backend, dtype):
    def segment(seg):
        return seg.segment(rgb_image, PROMPTS, exemplars=EXEMPLARS, exemplar_labels=[1, 0], threshold=0.0)

    reference, lower, pairs = run_in_both(segmenters, monkeypatch, backend, dtype, "decode", segment)
    assert_text_decoders_agree(pairs, dtype)
    assert_finite_scores(reference, lower)


@backends
@both
def test_tiled_image(segmenters, monkeypatch, rgb_image, backend, dtype):
    def segment(seg):  # one prompt: each tile is decoded once
        return seg.segment(rgb_image, PROMPTS[:1], tile=TILE, overlap=16, exemplars=EXEMPLARS[:1], threshold=0.0)

    reference, lower, pairs = run_in_both(segmenters, monkeypatch, backend, dtype, "decode", segment)
    assert len(pairs) == reference.info["tiles"] == lower.info["tiles"] > 1
    assert_text_decoders_agree(pairs, dtype)
    assert_finite_scores(reference, lower)


@backends
@both
def test_z_stack(segmenters, monkeypatch, rgb_image, backend, dtype):
    stack = np.stack([rgb_image[..., channel] for channel in range(3)])  # three different slices, ZYX

    def segment(seg):
        return seg.segment_stack(stack, PROMPTS, axes="ZYX", link=True, threshold=0.0)

    reference, lower, pairs = run_in_both(segmenters, monkeypatch, backend, dtype, "decode", segment)
    assert len(pairs) == len(stack) * len(PROMPTS)
    assert_text_decoders_agree(pairs, dtype)
    assert len(reference.slices) == len(lower.slices) == len(stack)
    assert_finite_scores(*reference.slices, *lower.slices)


@backends
@both
def test_visual_prompts(segmenters, monkeypatch, rgb_image, backend, dtype):
    def segment(seg):
        return [seg.segment_object(rgb_image, points=[(60, 50), (150, 80)], point_labels=[1, 0]),
                seg.segment_object(rgb_image, points=[(75, 55)]),  # one click: three candidates
                seg.segment_object(rgb_image, box=(40, 30, 110, 80)),
                seg.segment_object(rgb_image, box=(40, 30, 110, 80), tile=TILE, overlap=16)]

    reference, lower, pairs = run_in_both(segmenters, monkeypatch, backend, dtype, "decode_object", segment)
    assert len(pairs) == 4
    assert_object_decoders_agree(pairs, dtype)
    assert lower[-1].info["window_kind"] == reference[-1].info["window_kind"]
    for result in [*reference, *lower]:
        assert all(math.isfinite(instance.score) for instance in [*result.instances, *result.alternatives])


# -- fp16 overflow on the Meta backend -------------------------------------------------------------

def overflow_decoder_ffn(model) -> None:
    """The first DETR decoder layer's feed-forward output at ~6e5: infinite in fp16 (then NaN after its
    LayerNorm), finite in fp32."""
    layer = model.transformer.decoder.layers[0]
    with torch.no_grad():
        layer.linear1.bias.fill_(100)
        layer.linear2.weight.fill_(100)


def test_meta_backend_fp16_decoder_overflow_is_redone_in_fp32(checkpoints, rgb_image, caplog):
    """Every score NaN fails every threshold: the backend flags it, and the call is redone on an fp32
    twin that shares the (fp32) weights, within fp16's tolerances of an fp32 model (the embedding is
    fp16's)."""
    half, reference = (promptseg.load_segmenter(checkpoints["meta"], device="cpu", dtype=dtype, cache_dir=False)
                       for dtype in ("fp16", "fp32"))
    for segmenter in (half, reference):
        overflow_decoder_ffn(segmenter.backend.model)
    features, _ = half.embed(rgb_image)
    texts = half.text_embeddings(PROMPTS)
    raw = half.backend.decode(features, texts, 0.0)
    assert [(found.finite, len(found.scores)) for found in raw] == [(False, 0)] * len(PROMPTS)  # nothing kept
    with caplog.at_level(logging.WARNING, logger="promptseg.overflow"):
        redone = half.guard.run("the decoder", features, lambda backend: backend.decode(features, texts, 0.0))
    assert "fp16 overflowed in the decoder" in caplog.text and "redoing it in fp32" in caplog.text
    twin = half.guard.safe_backend()
    assert twin.dtype == torch.float32 and twin.model is half.backend.model and twin.tracker is half.backend.tracker
    expected_features, _ = reference.embed(rgb_image)
    expected = reference.backend.decode(expected_features, reference.text_embeddings(PROMPTS), 0.0)
    assert all(found.finite for found in expected)
    assert_low_precision_close(expected, redone, "fp16")
    assert_finite_scores(half.segment(rgb_image, PROMPTS, threshold=0.0))
