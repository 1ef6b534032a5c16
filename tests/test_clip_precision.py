"""CLIP in fp16 and bf16: every CLIP path runs and agrees with fp32; the loader leaves no tensor behind.

Both tiny CLIPs (open_clip's own text tower and a Hugging Face xlm-roberta one) are loaded
through the real loaders. The segment tests load SAM 3 and CLIP together with
``load_segmenter(..., clip=..., dtype=...)`` and hold SAM 3's instances fixed: each call runs once
with the segmenter's low-precision CLIP and once with an fp32 CLIP swapped in, so the difference
is CLIP's alone (SAM 3's own fp16/bf16 drift is tests/test_precision.py's subject).

Tolerances (absolute). Cosine similarity of an image or crop embedding and a text embedding:
`SIMILARITY_ATOL`, 2e-3 in fp16 and 1e-2 in bf16, the score tolerances of
`tolerance.LOW_PRECISION` (measured on the tiny CLIPs over 20 images and the 1,214 shipped
phrases: at most 1.1e-3 in fp16 and 6.2e-3 in bf16). What follows from it exactly:

* CLIPScore ``min(1, 2.5 * max(cos, 0))`` moves by at most ``2.5 * atol``; a negative's margin
  (a difference of two cosines) by ``2 * atol``;
* a softmax over ``logit_scale * cos`` (label sets, suggestions) moves each probability by a
  factor within ``exp(+-2 * logit_scale * atol)`` (every logit moves by at most
  ``logit_scale * atol``).

A decision (kept or dropped, which label wins, which phrase a prompt maps to) may differ from
fp32 only where the fp32 quantity lies within its tolerance of the cut.
"""

from __future__ import annotations

import contextlib
import logging
import math

import numpy as np
import pytest
import torch
from safetensors import safe_open
from tolerance import FLOAT_ATOL, LOW_PRECISION

from promptseg.clip.vocabulary import default_vocabulary

DTYPES = ["fp16", "bf16"]
SIMILARITY_ATOL = {name: tolerances[0] for name, tolerances in LOW_PRECISION.items()}
PROMPTS = ["red square", "green square"]


@pytest.fixture(scope="module")
def tiny_clips(tmp_path_factory) -> dict[str, str]:
    """``local-dir:`` specs of the two tiny CLIPs, by kind."""
    from promptseg.testing import make_random_clip

    root = tmp_path_factory.mktemp("clips")
    return {
        "standard": make_random_clip(root / "standard")["local_dir"],
        "multilingual": make_random_clip(root / "multilingual", multilingual=True)["local_dir"],
    }


def fp32_clip(spec: str):
    from promptseg.clip import load_clip

    return load_clip(spec, device="cpu", dtype="fp32", cache_dir=False)


@contextlib.contextmanager
def clip_swapped(segmenter, scorer):
    """Run `segmenter` with `scorer` as its CLIP (SAM 3 unchanged, its embeddings cached)."""
    own, segmenter.clip = segmenter.clip, scorer
    try:
        yield segmenter
    finally:
        segmenter.clip = own


def low_and_fp32(segmenter, reference, call):
    """`call(segmenter)` with the segmenter's own (low-precision) CLIP, then with the fp32 one."""
    low = call(segmenter)
    with clip_swapped(segmenter, reference):
        return low, call(segmenter)


def identity(instance) -> tuple:
    """What names one SAM 3 instance in both runs (its mask and SAM score are bit-identical)."""
    return instance.box, instance.extra["sam_score"], instance.phrase


def ratio_bound(scorer, dtype: str) -> float:
    """The factor a softmax probability over ``logit_scale * cos`` may move by (module docstring)."""
    return math.exp(2 * scorer.logit_scale * SIMILARITY_ATOL[dtype])


def assert_similarities_close(low, reference, dtype: str) -> None:
    """Instances of both runs pair one to one, and their CLIP similarities agree within tolerance."""
    atol = SIMILARITY_ATOL[dtype]
    by_identity = {identity(inst): inst for inst in low}
    assert len(by_identity) == len(low) == len(reference) > 0
    for want in reference:
        got = by_identity[identity(want)]
        assert got.extra["clip_similarity"] == pytest.approx(want.extra["clip_similarity"], abs=atol)
        assert got.extra["clip_score"] == pytest.approx(want.extra["clip_score"], abs=2.5 * atol)
        assert np.isfinite(got.score)


# ---- placement: the loader's path leaves nothing behind ------------------------------------------


@pytest.mark.parametrize("kind", ["standard", "multilingual"])
@pytest.mark.parametrize("dtype", ["fp32", *DTYPES])
def test_loader_path_moves_every_tensor_of_the_clip(tiny_clips, kind, dtype):
    """`place_model` is what `load` runs after building: here it moves a loaded CLIP to `meta`."""
    from promptseg.clip import load_clip
    from promptseg.clip.openclip import place_model
    from promptseg.device import DTYPES as TORCH_DTYPES
    from promptseg.placement import stray_tensors

    scorer = load_clip(tiny_clips[kind], device="cpu", dtype=dtype, cache_dir=False)
    model = scorer.backend.model
    assert stray_tensors(model, "cpu") == []
    model.visual.cache_like_a_decoder = [torch.zeros(3)]  # a plain attribute, as caches are kept
    place_model(model, torch.device("meta"), TORCH_DTYPES[dtype])
    assert stray_tensors(model, "meta") == []


@pytest.mark.parametrize("kind", ["standard", "multilingual"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_the_whole_clip_runs_in_the_precision_it_reports(tiny_clips, kind, dtype):
    from promptseg.clip import load_clip

    scorer = load_clip(tiny_clips[kind], device="cpu", dtype=dtype, cache_dir=False)
    floating = [t for t in [*scorer.backend.model.parameters(), *scorer.backend.model.buffers()]
                if t.is_floating_point()]
    assert {t.dtype for t in floating} == {scorer.backend.dtype}
    assert scorer.describe()["clip_dtype"] == dtype
    # the temperature is read before the cast: bf16 would round exp(2.6593) = 14.29 to 14.24
    assert scorer.logit_scale == pytest.approx(fp32_clip(tiny_clips[kind]).logit_scale, rel=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_multilingual_text_tower_encodes_in_half_precision(tiny_clips, dtype):
    """A Hugging Face text tower used to keep fp32 embeddings and LayerNorms beside fp16/bf16
    weights ("mat1 and mat2 must have the same dtype")."""
    from promptseg.clip import load_clip

    texts = ["红色的汽车", "собака", "red car"]
    scorer = load_clip(tiny_clips["multilingual"], device="cpu", dtype=dtype, cache_dir=False)
    low = scorer.text_embeddings(texts, templates=None)
    reference = fp32_clip(tiny_clips["multilingual"]).text_embeddings(texts, templates=None)
    assert low.dtype == torch.float32 and torch.isfinite(low).all()
    cosine = (low * reference).sum(dim=-1)
    assert torch.all(cosine >= 1 - SIMILARITY_ATOL[dtype]), cosine


@pytest.mark.parametrize("dtype", DTYPES)
def test_cached_embeddings_are_kept_apart_by_precision(tiny_clips, tmp_path, rgb_image, dtype):
    """One disk cache for both precisions: a half-precision scorer never reads fp32's entries, and
    each entry names the precision and the kind of device that made it."""
    from promptseg.clip import load_clip
    from promptseg.clip.suggest import suggest_prompts

    vocabulary = list(default_vocabulary()[:50])
    full = load_clip(tiny_clips["standard"], device="cpu", dtype="fp32", cache_dir=tmp_path)
    suggest_prompts(full, rgb_image, vocabulary, k=3)
    low = load_clip(tiny_clips["standard"], device="cpu", dtype=dtype, cache_dir=tmp_path)
    suggest_prompts(low, rgb_image, vocabulary, k=3)
    assert low.stats.image_encoder_runs == 1 and low.stats.text_encoder_runs == 1
    again = load_clip(tiny_clips["standard"], device="cpu", dtype=dtype, cache_dir=tmp_path)
    suggest_prompts(again, rgb_image, vocabulary, k=3)
    assert again.stats.image_encoder_runs == 0 and again.stats.text_encoder_runs == 0
    entries = [safe_open(path, "pt").metadata() for path in tmp_path.rglob("*.safetensors")]
    assert sorted((e["kind"], e["dtype"], e["device"]) for e in entries) == sorted(
        (kind, precision, "cpu") for kind in ("image", "vocabulary") for precision in ("fp32", dtype))


# ---- every CLIP path of segment, in fp16 and bf16 -------------------------------------------------


@pytest.fixture
def clip_pair(make_segmenter, tiny_clips):
    """``(segmenter in the low precision with its CLIP, fp32 CLIP of the same weights, dtype name)``."""

    def make(kind: str, dtype: str):
        segmenter = make_segmenter(cache_dir=False, dtype=dtype, clip=tiny_clips[kind])
        assert segmenter.describe()["dtype"] == segmenter.describe()["clip_dtype"] == dtype
        return segmenter, fp32_clip(tiny_clips[kind])

    return make


@pytest.mark.parametrize("kind", ["standard", "multilingual"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_rescoring_in_low_precision_matches_fp32(clip_pair, rgb_image, kind, dtype):
    segmenter, reference = clip_pair(kind, dtype)
    low, full = low_and_fp32(segmenter, reference, lambda s: s.segment(rgb_image, PROMPTS, threshold=0.0))
    assert low.info["clip"]["clip_dtype"] == dtype and full.info["clip"]["clip_dtype"] == "fp32"
    assert_similarities_close(low, full, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_verify_in_low_precision_keeps_what_fp32_keeps(clip_pair, rgb_image, dtype):
    """On the multilingual tiny CLIP, whose crop-prompt similarities are positive (the standard
    one's are all negative here, so every CLIPScore is 0 and no cut could split them)."""
    segmenter, reference = clip_pair("multilingual", dtype)
    with clip_swapped(segmenter, reference):
        scores = {identity(i): i.extra["clip_score"] for i in segmenter.segment(rgb_image, PROMPTS, threshold=0.0)}
    cut = float(np.median(list(scores.values())))
    low, full = low_and_fp32(segmenter, reference, lambda s: s.segment(
        rgb_image, PROMPTS, threshold=0.0, verify=True, clip_threshold=cut))
    assert 0 < full.info["clip"]["dropped_by_verify"] < len(scores)
    kept = {identity(i) for i in low}
    for name, score in scores.items():
        if abs(score - cut) > 2.5 * SIMILARITY_ATOL[dtype]:
            assert (name in kept) == (score >= cut), f"{name}: fp32 CLIPScore {score:.4f}, cut {cut:.4f}"
    both = kept & {identity(i) for i in full}
    assert_similarities_close([i for i in low if identity(i) in both], [i for i in full if identity(i) in both], dtype)


@pytest.mark.parametrize("kind", ["standard", "multilingual"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_negative_prompt_in_low_precision_drops_what_fp32_drops(clip_pair, rgb_image, kind, dtype):
    segmenter, reference = clip_pair(kind, dtype)
    with clip_swapped(segmenter, reference):  # a margin of 2 drops nothing: every instance's lead in fp32
        every = segmenter.segment(rgb_image, PROMPTS, threshold=0.0, negative="shadow", negative_margin=2.0)
    lead = {identity(i): i.extra["negative_similarity"] - i.extra["clip_similarity"] for i in every}
    margin = float(np.median(list(lead.values())))
    low, full = low_and_fp32(segmenter, reference, lambda s: s.segment(
        rgb_image, PROMPTS, threshold=0.0, negative="shadow", negative_margin=margin))
    assert 0 < full.info["clip"]["dropped_by_negative"] < len(lead)
    kept = {identity(i) for i in low}
    for name, value in lead.items():
        if abs(value - margin) > 2 * SIMILARITY_ATOL[dtype]:
            assert (name in kept) == (value <= margin), f"{name}: fp32 lead {value:.4f}, margin {margin:.4f}"
    for inst in low:
        assert inst.extra["closest_negative"] == "shadow"
        assert inst.extra["negative_similarity"] - inst.extra["clip_similarity"] == pytest.approx(
            lead[identity(inst)], abs=2 * SIMILARITY_ATOL[dtype])


@pytest.mark.parametrize("kind", ["standard", "multilingual"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_exclusive_labels_in_low_precision_match_fp32(clip_pair, rgb_image, kind, dtype):
    segmenter, reference = clip_pair(kind, dtype)
    low, full = low_and_fp32(segmenter, reference, lambda s: s.segment(
        rgb_image, PROMPTS, threshold=0.0, exclusive=True))
    assert full.info["clip"]["dropped_by_exclusive"] > 0  # the tiny SAM 3's masks overlap across prompts
    assert len(low) == len(full)  # one instance per group; the groups come from SAM 3's masks
    factor = ratio_bound(reference, dtype)
    by_identity = {identity(inst): inst for inst in low}
    for want in full:  # each object keeps the same SAM 3 instance (no near-tie of fused scores here)
        got = by_identity[identity(want)]
        if "label_probs" not in want.extra:  # no conflict: nothing to decide
            assert got.label == want.label and "label_probs" not in got.extra
            continue
        probs = sorted(want.extra["label_probs"].values(), reverse=True)
        if probs[0] / factor > probs[1] * factor:  # the winner stays ahead whatever the rounding
            assert got.label == want.label
        for label, p in want.extra["label_probs"].items():
            assert p / factor <= got.extra["label_probs"][label] <= p * factor


@pytest.mark.parametrize("kind", ["standard", "multilingual"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_suggest_prompts_in_low_precision_matches_fp32(clip_pair, rgb_image, kind, dtype):
    segmenter, reference = clip_pair(kind, dtype)
    everything = len(default_vocabulary())
    low, full = low_and_fp32(segmenter, reference, lambda s: dict(s.suggest_prompts(rgb_image, k=everything)))
    assert set(low) == set(full) and len(full) == everything
    factor = ratio_bound(reference, dtype)
    ratios = np.array([low[phrase] / full[phrase] for phrase in full])
    assert np.all(ratios >= 1 / factor) and np.all(ratios <= factor), (ratios.min(), ratios.max())
    best = max(full, key=full.get)
    assert low[best] * factor**2 >= max(low.values())  # fp32's top phrase is top or tied in low precision


@pytest.mark.parametrize("dtype", DTYPES)
def test_multilingual_prompt_in_low_precision_maps_and_scores_like_fp32(clip_pair, rgb_image, dtype):
    """The prompt maps to the fp32 choice or to a phrase tied with it within tolerance; the
    instances SAM 3 then finds are scored like fp32 scores them."""
    segmenter, reference = clip_pair("multilingual", dtype)
    prompt = "红色的汽车"
    low = segmenter.segment(rgb_image, prompt, threshold=0.0)
    phrase = low.info["clip"]["mapped_prompts"][prompt]
    candidates = list(default_vocabulary())
    similarity = (reference.text_embeddings([prompt], templates=None)
                  @ reference.vocabulary_embeddings(candidates, None).T)[0]
    assert float(similarity[candidates.index(phrase)]) >= float(similarity.max()) - 2 * SIMILARITY_ATOL[dtype]
    assert low.prompts == [prompt] and len(low) > 0
    assert all(inst.label == prompt and inst.phrase == phrase for inst in low)
    reference.vocabulary = [phrase]  # the same phrase for SAM 3, so both runs score the same instances
    with clip_swapped(segmenter, reference):
        full = segmenter.segment(rgb_image, prompt, threshold=0.0)
    assert full.info["clip"]["mapped_prompts"] == {prompt: phrase}
    assert_similarities_close(low, full, dtype)


# ---- fp16 overflow ------------------------------------------------------------------------------


def overflow_mlp(block) -> None:
    """The block's MLP output at ~1.3e6 (100 x 100 x 128 hidden units): infinite in fp16, finite in fp32."""
    with torch.no_grad():
        block.mlp.c_fc.bias.fill_(100)
        block.mlp.c_proj.weight.fill_(100)


@pytest.mark.parametrize("tower", ["text", "image"])
def test_fp16_overflow_moves_the_clip_to_fp32_with_one_warning(tiny_clips, tmp_path, rgb_image, caplog, tower):
    """The reference is an fp32 CLIP holding the same fp16-rounded, equally modified weights: what
    the scorer computes after the move matches it within the float32 tolerance."""
    from promptseg.clip import VOCABULARY_TEMPLATES, load_clip
    from promptseg.clip.suggest import suggest_prompts

    half = load_clip(tiny_clips["standard"], device="cpu", dtype="fp16", cache_dir=tmp_path)
    reference = fp32_clip(tiny_clips["standard"])
    reference.backend.model.load_state_dict({k: v.float() for k, v in half.backend.model.state_dict().items()})
    for model in (half.backend.model, reference.backend.model):
        overflow_mlp(model.transformer.resblocks[0] if tower == "text" else model.visual.transformer.resblocks[0])
    raw = half.backend.encode_text(["cat"]) if tower == "text" else half.backend.encode_images([rgb_image])
    assert not torch.isfinite(raw).all()  # the injection really overflows fp16

    vocabulary = ["cat", "dog", "car"]
    with caplog.at_level(logging.WARNING, logger="promptseg.clip.scorer"):
        ranked = suggest_prompts(half, rgb_image, vocabulary, k=3)
        half.text_embeddings(["bird"])
        half.crop_embeddings(rgb_image, [])
    warned = [r.getMessage() for r in caplog.records if "overflowed" in r.getMessage()]
    assert len(warned) == 1 and f"CLIP's {tower} tower" in warned[0] and "runs in fp32" in warned[0]
    assert half.describe()["clip_dtype"] == "fp32" and all(np.isfinite(p) for _, p in ranked)

    if tower == "text":
        moved, expected = (s.text_embeddings(vocabulary, VOCABULARY_TEMPLATES) for s in (half, reference))
    else:
        moved, expected = (s.image_embeddings([rgb_image], disk=True) for s in (half, reference))
    torch.testing.assert_close(moved, expected, atol=FLOAT_ATOL, rtol=0)
    entries = {(e["kind"], e["dtype"]) for e in
               (safe_open(path, "pt").metadata() for path in tmp_path.rglob("*.safetensors"))}
    # the image is encoded first: in fp16 when only the text tower overflows
    assert entries == {("image", "fp16" if tower == "text" else "fp32"), ("vocabulary", "fp32")}
