"""fp16 overflow: a non-finite output is detected and that call is redone in fp32, with a warning.

The overflow is injected into the tiny model's weights (a layer whose outputs pass fp16's 65504),
so the real image encoder or decoder produces it. The reference is an fp32 model holding the same
fp16-rounded, equally modified weights: the redone call must match it within the stated
tolerances (`tolerance.py`): float32 ones where both ran in fp32 from the start, the fp16 ones
where the embedding was computed in fp16.
"""

from __future__ import annotations

import logging

import pytest
import torch
from tolerance import assert_detections_close, assert_low_precision_close

PROMPTS = ["red square", "green thing"]


def overflow_box_head(model) -> None:
    """Box offsets of ~3e5 for every query: infinite in fp16, finite in fp32."""
    head = model.detr_decoder.box_head
    with torch.no_grad():
        head.layer2.bias.fill_(100)
        head.layer3.weight.fill_(100)


def overflow_neck(model) -> None:
    """The coarsest FPN level the DETR encoder reads at ~3e5 everywhere: infinite in fp16."""
    layer = model.vision_encoder.neck.fpn_layers[2]
    with torch.no_grad():
        layer.proj1.weight.zero_()
        layer.proj1.bias.fill_(10)
        layer.proj2.weight.fill_(100)


def fp16_and_reference(make_segmenter, inject):
    """An fp16 segmenter and an fp32 one with the same (fp16-rounded) weights, both with `inject` applied."""
    half = make_segmenter(cache_dir=False, dtype="fp16")
    reference = make_segmenter(cache_dir=False, dtype="fp32")
    reference.backend.model.load_state_dict({k: v.float() for k, v in half.backend.model.state_dict().items()})
    for segmenter in (half, reference):
        inject(segmenter.backend.model)
    return half, reference


def guarded_decode(segmenter, image):
    """The segmenter's own embed and guarded decode, every query kept (threshold 0)."""
    features, _ = segmenter.embed(image)
    texts = segmenter.text_embeddings(PROMPTS)
    return segmenter.guard.run("the decoder", features, lambda backend: backend.decode(features, texts, 0.0))


def test_decoder_overflow_is_redone_in_fp32(make_segmenter, rgb_image, caplog):
    half, reference = fp16_and_reference(make_segmenter, overflow_box_head)
    features, _ = half.embed(rgb_image)
    raw = half.backend.decode(features, half.text_embeddings(PROMPTS), 0.0)
    assert not raw[0].finite  # the injection really overflows fp16

    with caplog.at_level(logging.WARNING, logger="promptseg.overflow"):
        redone = guarded_decode(half, rgb_image)
    assert half.guard.redone == 1 and half.guard.safe_backend().dtype == torch.float32
    assert "fp16 overflowed in the decoder" in caplog.text and "redoing it in fp32" in caplog.text
    assert all(d.finite for d in redone)
    assert_low_precision_close(guarded_decode(reference, rgb_image), redone, "fp16")  # fp16 embedding
    assert reference.guard.redone == 0  # fp32 is not watched: nothing to redo


def test_image_encoder_overflow_is_redone_and_remembered(make_segmenter, rgb_image, caplog):
    half, reference = fp16_and_reference(make_segmenter, overflow_neck)
    raw = half.backend.encode_image(half.backend.preprocess(rgb_image))
    assert not torch.isfinite(raw["fpn_2"]).all()  # the injection really overflows fp16

    with caplog.at_level(logging.WARNING, logger="promptseg.overflow"):
        redone = guarded_decode(half, rgb_image)
    assert "fp16 overflowed in the image encoder" in caplog.text
    assert half.guard.redone == 1 and half.stats.image_encoder_runs == 1
    assert_detections_close(redone, guarded_decode(reference, rgb_image))  # fp32 from the pixels on

    caplog.clear()
    features, origin = half.embed(rgb_image)  # a later prompt: the fp32 embedding, from the cache
    assert origin == "memory" and features["fpn_2"].dtype == torch.float32
    result = half.segment(rgb_image, "a new prompt", threshold=0.0)
    assert half.guard.redone == 1 and half.stats.image_encoder_runs == 1 and "overflowed" not in caplog.text
    assert result.instances and all(torch.isfinite(torch.tensor(i.score)) for i in result.instances)


def test_results_without_overflow_are_not_redone(make_segmenter, rgb_image):
    half = make_segmenter(cache_dir=False, dtype="fp16")
    half.segment(rgb_image, PROMPTS, threshold=0.0)
    assert half.guard.redone == 0 and half.guard._safe is None  # no twin made


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_only_fp16_is_watched(make_segmenter, dtype):
    assert not make_segmenter(cache_dir=False, dtype=dtype).guard.watching
