"""The tolerance rules every test uses to compare float-derived results of two computations.

Two computations that are equal in exact arithmetic (a batched and a one-by-one decoder forward,
a full forward and a forward on cached features, another thread count) round differently, and
how they round depends on the CPU: a mask probability of 0.4999999 in one may be 0.5000001 in
the other, so one pixel flips. Results of such computations are never compared bit for bit.

Same precision (float32 against float32):

* scores, mask probabilities and normalised boxes: ``|a - b| <= FLOAT_ATOL``;
* binary masks: a pixel may differ only where the reference probability lies within
  ``MASK_EPS`` of the cut (``|p - mask_threshold| < MASK_EPS``). ``MASK_EPS`` equals
  ``FLOAT_ATOL``: a pixel can flip only if the probabilities may differ by its distance to the
  cut. It is deliberately not a share of [0, 1] such as 1e-3: the tiny random SAM 3 of the tests
  has mask logits below 2e-3, so all its probabilities lie within 4e-4 of 0.5 and such an
  epsilon would excuse every pixel;
* pixel boxes are the tight boxes of the masks: equal when the masks are equal, else each
  side may move only across pixels the mask rule excuses (on a sharp mask edge that is one
  pixel at most; on the tiny model, whose probabilities are all near the cut, a side moved 4
  pixels for probabilities 5e-6 lower); detector boxes (normalised) within ``FLOAT_ATOL``;
* an instance found by one computation only is allowed when every one of its pixels is such a
  near-cut pixel.

Lower precision against float32 (`LOW_PRECISION`): absolute tolerances per dtype on scores,
mask probabilities and normalised boxes, and a least share of mask pixels on the same side of
0.5 (fp16 and bf16 keep fewer mantissa bits, so far more pixels sit near the cut).

A result computed twice from bit-identical inputs by the same code (an embedding read back from
the cache and decoded the same way, the same image twice) is deterministic and compared exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from promptseg.masks import tight_box

FLOAT_ATOL = 1e-5  # ~170 float32 steps at 0.5; batched and one-by-one forwards differ by ~6e-8 here
MASK_EPS = FLOAT_ATOL

LOW_PRECISION = {  # dtype: (score, mask probability, normalised box, share of mask pixels that agree)
    "fp16": (2e-3, 1e-2, 5e-3, 0.99),
    "bf16": (1e-2, 3e-2, 2e-2, 0.99),
}

Probabilities = Callable[[object], np.ndarray]
"""Given an instance, its full-size mask probability map (the reference computation's)."""


def assert_mask_agrees(mask: np.ndarray, reference: np.ndarray, probs: np.ndarray, cut: float = 0.5) -> None:
    """Two binary masks of one object differ only where the reference probability is near the cut."""
    assert mask.shape == reference.shape == probs.shape
    differ = mask != reference
    near = np.abs(probs[differ] - cut)
    assert np.all(near < MASK_EPS), (
        f"{int(differ.sum())} pixel(s) differ, some with probability {cut}+-{float(near.max()):.2e} "
        f"(allowed only within {MASK_EPS} of the cut)"
    )


def assert_detections_close(found: Sequence, reference: Sequence, cut: float = 0.5) -> None:
    """Backend `Detections` of two float32 computations (one per phrase, every query kept) agree."""
    assert len(found) == len(reference)
    for got, want in zip(found, reference):
        assert got.scores.shape == want.scores.shape and got.mask_probs.shape == want.mask_probs.shape
        torch.testing.assert_close(got.scores, want.scores, atol=FLOAT_ATOL, rtol=0)
        torch.testing.assert_close(got.mask_probs, want.mask_probs, atol=FLOAT_ATOL, rtol=0)
        torch.testing.assert_close(got.boxes, want.boxes, atol=FLOAT_ATOL, rtol=0)
        probs = want.mask_probs.float().numpy()
        assert_mask_agrees(got.mask_probs.numpy() > cut, probs > cut, probs, cut)


def assert_low_precision_close(reference: Sequence, lower: Sequence, dtype_name: str) -> None:
    """fp16/bf16 `Detections` against float32 ones, within `LOW_PRECISION[dtype_name]`."""
    score_tol, mask_tol, box_tol, agreement = LOW_PRECISION[dtype_name]
    assert len(reference) == len(lower)
    for ref, low in zip(reference, lower):
        assert ref.scores.shape == low.scores.shape and len(ref.scores) > 0
        assert torch.isfinite(low.scores).all() and torch.isfinite(low.mask_probs).all()
        torch.testing.assert_close(low.scores, ref.scores, atol=score_tol, rtol=0)
        torch.testing.assert_close(low.mask_probs, ref.mask_probs, atol=mask_tol, rtol=0)
        torch.testing.assert_close(low.boxes, ref.boxes, atol=box_tol, rtol=0)
        same = ((ref.mask_probs > 0.5) == (low.mask_probs > 0.5)).float().mean().item()
        assert same >= agreement, f"{dtype_name}: only {same:.4f} of mask pixels agree with fp32"


def full_size_probabilities(detections: dict, image_size: tuple[int, int]) -> Probabilities:
    """The reference probability map of an instance, from its phrase's `Detections` (every query kept).

    Each query's low-resolution probabilities are upsampled to the image as the post-processing
    does (bilinear, ``align_corners=False``); an instance is the query of its label with the
    nearest score (scores of different queries lie far further apart than `FLOAT_ATOL`).
    """
    maps = {
        label: F.interpolate(found.mask_probs.float()[None], size=image_size, mode="bilinear",
                             align_corners=False)[0].numpy()
        for label, found in detections.items()
    }

    def probability(instance) -> np.ndarray:
        scores = detections[instance.label].scores.float()
        query = int(torch.argmin((scores - instance.score).abs()))
        assert abs(float(scores[query]) - instance.score) <= FLOAT_ATOL, "no query has this instance's score"
        return maps[instance.label][query]

    return probability


def assert_results_agree(result, reference, probability: Probabilities, mask_threshold: float = 0.5) -> None:
    """Two `SegmentationResult`s of one image from two float32 computations agree under the rule above.

    Instances are paired by label, score (within `FLOAT_ATOL`) and mask overlap, not by position:
    near-equal scores may swap places in the ranking.
    """
    assert result.image_size == reference.image_size
    height, width = reference.image_size
    unmatched = list(result.instances)
    for want in reference.instances:
        want_mask = want.full_mask(height, width)
        candidates = [got for got in unmatched
                      if got.label == want.label and abs(got.score - want.score) <= FLOAT_ATOL]
        if not candidates:
            _assert_all_near_cut(want, want_mask, probability, mask_threshold)
            continue
        got = max(candidates, key=lambda inst: np.count_nonzero(inst.full_mask(height, width) & want_mask))
        unmatched.remove(got)
        assert got.score == pytest.approx(want.score, abs=FLOAT_ATOL)
        got_mask = got.full_mask(height, width)
        assert_mask_agrees(got_mask, want_mask, probability(want), mask_threshold)
        if np.array_equal(got_mask, want_mask):
            assert got.box == want.box
        else:  # sides moved only across the excused pixels checked above
            assert got.box == tight_box(got_mask) and want.box == tight_box(want_mask)
        if got.model_box is not None and want.model_box is not None:
            scale = max(height, width)
            assert np.allclose(got.model_box, want.model_box, atol=FLOAT_ATOL * scale, rtol=0)
    for got in unmatched:
        _assert_all_near_cut(got, got.full_mask(height, width), probability, mask_threshold)


def _assert_all_near_cut(instance, mask: np.ndarray, probability: Probabilities, cut: float) -> None:
    """An instance only one computation found: allowed only if it is made of near-cut pixels."""
    near = np.abs(probability(instance)[mask] - cut)
    assert np.all(near < MASK_EPS), f"{instance.label} ({instance.score:.6f}) {instance.box} found by one side only"
