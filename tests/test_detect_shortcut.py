"""The transformers backend's detection head skips work for queries it will drop, and nothing else.

Reference: ``Sam3Model.forward`` on the same cached vision features (``vision_embeds``) with the
prompt's token ids, then SAM 3's score rule (detection x presence) at the threshold. The
short-cut must keep the same queries with the same scores, boxes and masks within
`tolerance.FLOAT_ATOL`, at several thresholds, for a batch of prompts, with exemplar boxes too.
Thresholds are put half-way between two neighbouring reference scores, so no score sits on a cut.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tolerance import assert_detections_close

from promptseg.backends.protocol import Detections
from promptseg.backends.sam3_common import exemplar_inputs

PROMPTS = ["red square", "green thing", "cat"]
EXEMPLARS = (torch.tensor([[0.2, 0.25, 0.55, 0.66], [0.65, 0.5, 0.9, 0.83]]), torch.tensor([1, 0]))


def full_forward(segmenter, features, prompts, threshold, exemplars=None) -> list[Detections]:
    """transformers' own forward on the cached features, kept at `threshold` as SAM 3 scores."""
    from transformers.models.sam3.modeling_sam3 import Sam3VisionEncoderOutput

    backend, batch = segmenter.backend, len(prompts)
    levels = [features[f"fpn_{i}"] for i in range(sum(k.startswith("fpn_") for k in features))]
    vision = Sam3VisionEncoderOutput(
        fpn_hidden_states=tuple(level.expand(batch, -1, -1, -1) for level in levels) + (None,),
        fpn_position_encoding=tuple(backend._position(level).expand(batch, -1, -1, -1) for level in levels) + (None,),
    )
    tokens = backend.tokenizer(prompts, padding="max_length", max_length=32, truncation=True, return_tensors="pt")
    extra = {}
    if exemplars is not None:
        cxcywh, labels = exemplar_inputs(*exemplars, backend.device, backend.dtype)
        extra = {"input_boxes": cxcywh[None].expand(batch, -1, -1), "input_boxes_labels": labels[None].expand(batch, -1)}
    with torch.inference_mode():
        out = backend.model(vision_embeds=vision, input_ids=tokens["input_ids"],
                            attention_mask=tokens["attention_mask"], **extra)
    scores = out.pred_logits.float().sigmoid() * out.presence_logits.float().sigmoid()
    return [
        Detections(mask_probs=out.pred_masks[b][keep].float().sigmoid(), boxes=out.pred_boxes[b][keep].float(),
                   scores=scores[b][keep])
        for b, keep in enumerate(scores > threshold)
    ]


def thresholds_between(detections: list[Detections]) -> list[float]:
    """Cuts half-way between neighbouring scores (none closer than 1e-4 to a score), low to high."""
    scores = np.unique(np.concatenate([d.scores.numpy() for d in detections]))
    gaps = [(a + b) / 2 for a, b in zip(scores[:-1], scores[1:]) if b - a > 2e-4]
    picks = [gaps[int(q * (len(gaps) - 1))] for q in (0.0, 0.5, 0.9, 1.0)]
    return [0.0, *picks, float(scores.max()) + 1e-3]


@pytest.fixture
def cached(make_segmenter, rgb_image):
    segmenter = make_segmenter(cache_dir=False)
    features, _ = segmenter.embed(rgb_image)
    return segmenter, features


@pytest.mark.parametrize("with_exemplars", [False, True], ids=["text", "text+exemplars"])
def test_short_cut_keeps_what_the_full_forward_keeps(cached, with_exemplars):
    segmenter, features = cached
    exemplars = EXEMPLARS if with_exemplars else None
    texts = segmenter.text_embeddings(PROMPTS)
    boxes = dict(zip(("boxes", "box_labels"), exemplars)) if exemplars else {}
    cuts = thresholds_between(full_forward(segmenter, features, PROMPTS, 0.0, exemplars))
    kept = []
    for threshold in cuts:
        reference = full_forward(segmenter, features, PROMPTS, threshold, exemplars)
        found = segmenter.backend.decode(features, texts, threshold, **boxes)
        assert_detections_close(found, reference)
        kept.append(sum(len(d.scores) for d in found))
    assert kept[0] == len(PROMPTS) * segmenter.backend.model.config.detr_decoder_config.num_queries
    assert kept[-1] == 0 and kept == sorted(kept, reverse=True) and len(set(kept)) >= 3


def test_mask_decoder_runs_only_for_kept_queries_and_not_at_all_when_none_passes(cached):
    segmenter, features = cached
    model = segmenter.backend.model
    seen = []
    hook = model.mask_decoder.register_forward_hook(
        lambda module, args, kwargs, out: seen.append(tuple(kwargs["decoder_queries"].shape)), with_kwargs=True,
    )
    try:
        texts = segmenter.text_embeddings(PROMPTS)
        everything = segmenter.backend.decode(features, texts, 0.0)
        scores = np.concatenate([d.scores.numpy() for d in everything])
        middle = float(np.median(scores))
        some = segmenter.backend.decode(features, texts, middle)
        none = segmenter.backend.decode(features, texts, float(scores.max()) + 1e-3)
    finally:
        hook.remove()
    queries = model.config.detr_decoder_config.num_queries
    union = torch.stack([full.scores > middle for full in everything]).any(dim=0)  # kept by some prompt
    assert [len(kept.scores) for kept in some] == [int((full.scores > middle).sum()) for full in everything]
    assert seen == [(len(PROMPTS), queries, seen[0][2]), (len(PROMPTS), int(union.sum()), seen[0][2])]
    assert all(len(d.scores) == 0 and d.mask_probs.shape[0] == 0 for d in none)
    assert none[0].mask_probs.shape[1:] == everything[0].mask_probs.shape[1:]


def test_first_self_attention_is_cached_with_the_image_and_run_once(cached):
    """The DETR encoder's first self-attention block runs with the image encoder, not per prompt; an
    embedding without it (made elsewhere) gets it computed, with the same detections."""
    from promptseg.backends.sam3_hf_detect import FIRST_SELF_ATTENTION

    segmenter, features = cached
    assert FIRST_SELF_ATTENTION in features
    rows = segmenter.backend.input_size[0] // segmenter.backend.model.config.vision_config.backbone_config.patch_size
    assert features[FIRST_SELF_ATTENTION].shape[1] == rows * rows
    texts = segmenter.text_embeddings(PROMPTS)
    attention = segmenter.backend.model.detr_encoder.layers[0].self_attn
    calls = []
    hook = attention.register_forward_hook(lambda *args: calls.append(1))
    try:
        with_cached = segmenter.backend.decode(features, texts, 0.0)
        assert calls == []  # every prompt of the batch reuses the image's block
        without = {k: v for k, v in features.items() if k != FIRST_SELF_ATTENTION}
        computed = segmenter.backend.decode(without, texts, 0.0)
        assert calls == [1]
    finally:
        hook.remove()
    assert_detections_close(computed, with_cached)
