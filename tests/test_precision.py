"""Precision parity of the transformers backend: fp16 and bf16 against fp32 on the CPU.

Same tiny weights, same image and prompts; every query is kept (threshold 0) so the outputs
line up one to one. Tolerances (absolute, on [0, 1] quantities) are `tolerance.LOW_PRECISION`:
scores 2e-3 in fp16 and 1e-2 in bf16 (8 mantissa bits), mask probabilities 1e-2 / 3e-2,
normalised boxes 5e-3 / 2e-2, and at least 99% of mask pixels on the same side of 0.5 (pixels
near 0.5 may flip). The Meta backend's parity test (tests/test_backend_meta.py) uses the same.
"""

from __future__ import annotations

import pytest
import torch
from tolerance import assert_low_precision_close

PROMPTS = ["red square", "green thing"]


def decode_all(segmenter, image, prompts, **exemplars):
    features, _ = segmenter.embed(image)
    return segmenter.backend.decode(features, segmenter.text_embeddings(prompts), 0.0, **exemplars)


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_transformers_backend_low_precision_matches_fp32(make_segmenter, rgb_image, dtype):
    reference = make_segmenter(cache_dir=False, dtype="fp32")
    lower = make_segmenter(cache_dir=False, dtype=dtype)
    assert lower.describe()["dtype"] == dtype
    features, _ = lower.embed(rgb_image)
    assert all(t.dtype == lower.dtype for t in features.values())  # the cache holds the low precision
    assert_low_precision_close(decode_all(reference, rgb_image, PROMPTS), decode_all(lower, rgb_image, PROMPTS), dtype)


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_transformers_backend_exemplars_in_low_precision_match_fp32(make_segmenter, rgb_image, dtype):
    boxes = torch.tensor([[0.2, 0.25, 0.55, 0.66], [0.65, 0.5, 0.9, 0.83]])
    labels = torch.tensor([1, 0])
    reference = decode_all(make_segmenter(cache_dir=False), rgb_image, PROMPTS, boxes=boxes, box_labels=labels)
    lower = decode_all(make_segmenter(cache_dir=False, dtype=dtype), rgb_image, PROMPTS, boxes=boxes,
                       box_labels=labels)
    assert_low_precision_close(reference, lower, dtype)
