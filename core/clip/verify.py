"""CLIP re-scoring of SAM 3's instances: verification, negative prompts, exclusive label sets.

Two steps of `Segmenter.segment` live here. Before decoding, `prompt_phrases` turns the prompts
into the English phrases SAM 3 reads (text only, no image needed). After post-processing,
`check_with_clip` runs on the final instances of one image. Each instance's masked
crop is compared with its prompt (`clip_score`), with the negative phrases, and, for exclusive
label sets, with every label. The decisions are pure functions of embedding matrices
(`decide`), so they can be checked with controlled embeddings; `apply_clip` wires them to a
`ClipScorer`.

Scores written to each instance:

* ``extra["sam_score"]``: SAM 3's own score (detection x presence), unchanged.
* ``extra["clip_similarity"]``: cosine of crop and prompt embeddings.
* ``extra["clip_score"]``: CLIPScore (Hessel et al., 2021), ``min(1, 2.5 * max(cos, 0))``.
* ``score`` becomes the fused score ``sqrt(sam_score * clip_score)`` (geometric mean), so every
  host that sorts or filters by score benefits; ``extra["fused_score"]`` holds the same value.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from promptseg.errors import OptionError
from promptseg.masks import mask_iou
from promptseg.options import DEFAULT_CLIP_THRESHOLD  # noqa: F401  (importable from here too, as before)
from promptseg.options import CleanupOptions, ClipOptions
from promptseg.results import Instance, SegmentationResult
from promptseg.unionfind import UnionFind

logger = logging.getLogger(__name__)

EXCLUSIVE_IOU = 0.5
"""Masks of different prompts overlapping at least this much (IoU) claim the same object."""
CLIPSCORE_WEIGHT = 2.5


@dataclass
class ClipReport:
    """What the CLIP step did to one image's instances (kept in ``result.info["clip"]``)."""

    scored: int = 0
    dropped_by_negative: int = 0
    dropped_by_verify: int = 0
    dropped_by_exclusive: int = 0
    mapped_prompts: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {
            "scored": self.scored,
            "dropped_by_negative": self.dropped_by_negative,
            "dropped_by_verify": self.dropped_by_verify,
            "dropped_by_exclusive": self.dropped_by_exclusive,
            "mapped_prompts": dict(self.mapped_prompts),
        }


def clip_score(similarity: torch.Tensor | float) -> torch.Tensor:
    """CLIPScore: ``min(1, 2.5 * max(cos, 0))``, roughly 0.4 for unrelated and 0.75+ for matching pairs."""
    value = torch.as_tensor(similarity, dtype=torch.float32)
    return (CLIPSCORE_WEIGHT * value.clamp(min=0)).clamp(max=1)


def fused_score(sam_score: float, clip: float) -> float:
    """Geometric mean of SAM 3's score and CLIPScore: either one near 0 pulls the result down."""
    return float(np.sqrt(max(sam_score, 0.0) * max(clip, 0.0)))


def require_clip(options: ClipOptions) -> None:
    """Without a CLIP scorer, asking for a CLIP decision is an error, not a silent no-op."""
    if options.asked:
        raise OptionError(
            f"{', '.join(options.asked)} need(s) a CLIP model: load_segmenter(..., clip='ViT-B-32/laion2b_s34b_b79k') "
            "or --clip MODEL."
        )


def prompt_phrases(scorer, prompts: list[str], options: ClipOptions | None = None) -> dict[str, str]:
    """Before decoding: each non-English prompt -> the English phrase SAM 3 reads (`model_phrases`).

    Empty without a CLIP scorer, where asking for a CLIP decision is an `OptionError`; several
    prompts reading as one phrase are an `OptionError` too.
    """
    if scorer is None:
        require_clip(options or ClipOptions())
        return {}
    from promptseg.clip.mapping import model_phrases

    mapping = model_phrases(scorer, prompts)
    phrases = [mapping.get(p, p) for p in prompts]
    if len(set(phrases)) < len(phrases):
        raise OptionError(
            "Several prompts map to the same English phrase "
            f"({', '.join(f'{p!r} -> {q!r}' for p, q in mapping.items())}): give distinct prompts."
        )
    return mapping


def cleanup_for_clip(cleanup: CleanupOptions, options: ClipOptions) -> CleanupOptions:
    """With an exclusive label set CLIP, not SAM 3's score, settles overlaps across prompts."""
    return dataclasses.replace(cleanup, cross_prompt_iou=None) if options.exclusive else cleanup


def decide(
    instances: Sequence[Instance],
    crops: torch.Tensor,
    prompt_texts: torch.Tensor,
    prompt_index: Sequence[int],
    options: ClipOptions | None = None,
    *,
    negatives: torch.Tensor | None = None,
    negative_names: Sequence[str] = (),
    labels: Sequence[str] = (),
    logit_scale: float = 100.0,
    report: ClipReport | None = None,
) -> list[Instance]:
    """Re-score, then drop by negatives, by verification, and resolve exclusive label conflicts.

    `crops` is ``(N, D)`` (one unit embedding per instance), `prompt_texts` ``(P, D)`` and
    `prompt_index[i]` the row of instance i's prompt; `labels` name those rows (the label set).
    `negatives` is ``(M, D)``. An instance is dropped by a negative when its best negative
    similarity exceeds its prompt similarity by more than ``options.negative_margin``; by
    verification when ``options.verify`` or a ``clip_threshold`` is set and its CLIPScore is below
    the threshold; ``options.exclusive`` resolves label conflicts.
    """
    options = options or ClipOptions()
    report = report if report is not None else ClipReport()
    index = torch.as_tensor(list(prompt_index), dtype=torch.long)
    similarity = (crops * prompt_texts[index]).sum(dim=-1)
    scores = clip_score(similarity)
    kept: list[Instance] = []
    verify = options.verify or options.clip_threshold is not None
    negative_sim = crops @ negatives.T if negatives is not None and len(negatives) else None
    crop_rows = []
    for i, inst in enumerate(instances):
        sam = float(inst.extra.get("sam_score", inst.score))
        extra = {**inst.extra, "sam_score": sam, "clip_similarity": float(similarity[i]),
                 "clip_score": float(scores[i])}
        extra["fused_score"] = fused_score(sam, float(scores[i]))
        if negative_sim is not None:
            best = int(negative_sim[i].argmax())
            extra["negative_similarity"] = float(negative_sim[i, best])
            extra["closest_negative"] = negative_names[best] if negative_names else best
            if float(negative_sim[i, best]) - float(similarity[i]) > options.negative_margin:
                report.dropped_by_negative += 1
                continue
        if verify and float(scores[i]) < options.threshold:
            report.dropped_by_verify += 1
            continue
        kept.append(replace(inst, score=extra["fused_score"], extra=extra))
        crop_rows.append(i)
    report.scored += len(instances)
    if options.exclusive and kept:
        kept = resolve_exclusive(kept, crops[crop_rows], prompt_texts, labels, logit_scale, report)
    return kept


def resolve_exclusive(
    instances: Sequence[Instance],
    crops: torch.Tensor,
    label_texts: torch.Tensor,
    labels: Sequence[str],
    logit_scale: float = 100.0,
    report: ClipReport | None = None,
    iou: float = EXCLUSIVE_IOU,
) -> list[Instance]:
    """Give each object one label: overlapping masks of different labels become one instance.

    Instances whose masks overlap (IoU >= `iou`) form a group; if the group holds several
    labels, CLIP decides with a softmax over the whole label set (probabilities averaged over
    the group's crops). The group keeps the best-scoring instance of the winning label and
    drops the rest; ``extra["label_probs"]`` records the vote.
    """
    count = len(instances)
    overlapping = UnionFind(count)
    for a in range(count):
        for b in range(a + 1, count):
            if instances[a].label != instances[b].label and mask_iou(instances[a], instances[b]) >= iou:
                overlapping.union(a, b)
    probs = torch.softmax(logit_scale * crops @ label_texts.T, dim=-1)
    keep: dict[int, Instance] = {}
    for members in overlapping.groups():
        if len({instances[i].label for i in members}) < 2:
            for i in members:
                keep[i] = instances[i]
            continue
        vote = probs[members].mean(dim=0)
        winner = labels[int(vote.argmax())]
        claimants = [i for i in members if instances[i].label == winner] or members
        best = max(claimants, key=lambda i: instances[i].score)
        chosen = instances[best]
        extra = {**chosen.extra, "label_probs": {label: float(p) for label, p in zip(labels, vote)}}
        if chosen.label != winner:
            extra["sam_label"] = chosen.label
        keep[best] = replace(chosen, label=winner, extra=extra)
        if report is not None:
            report.dropped_by_exclusive += len(members) - 1
    return [keep[i] for i in sorted(keep)]


def apply_clip(
    scorer,
    rgb: np.ndarray,
    instances: Sequence[Instance],
    prompts: Sequence[str],
    options: ClipOptions | None = None,
    *,
    report: ClipReport | None = None,
) -> list[Instance]:
    """Embed the instances' crops, the prompts (as their model phrases) and negatives; `decide`."""
    report = report if report is not None else ClipReport()
    if not instances:
        return []
    labels = list(prompts)
    phrases = {inst.label: inst.phrase or inst.label for inst in instances}
    label_phrases = [phrases.get(label) or report.mapped_prompts.get(label, label) for label in labels]
    row = {label: i for i, label in enumerate(labels)}
    unknown = sorted({inst.label for inst in instances} - set(row))
    for label in unknown:  # an instance labelled outside the prompt list (e.g. by a host)
        row[label] = len(labels)
        labels.append(label)
        label_phrases.append(phrases[label])
    crops = scorer.crop_embeddings(rgb, instances)
    texts = scorer.text_embeddings(label_phrases)
    options = options or ClipOptions()
    negatives = scorer.text_embeddings(list(options.negative)) if options.negative else None
    return decide(
        instances, crops, texts, [row[inst.label] for inst in instances], options,
        negatives=negatives, negative_names=list(options.negative), labels=labels,
        logit_scale=scorer.logit_scale, report=report,
    )


def check_with_clip(
    scorer, rgb: np.ndarray, result: SegmentationResult, prompts: Sequence[str], mapping: dict[str, str],
    options: ClipOptions | None = None,
) -> SegmentationResult:
    """The CLIP stage, after post-processing: give the instances the user's prompts back as labels
    (`mapping` is what `prompt_phrases` returned), then re-score and filter them (`apply_clip`).

    Without a CLIP scorer the result is returned as it is.
    """
    if scorer is None:
        return result
    back = {phrase: prompt for prompt, phrase in mapping.items()}
    instances = [
        replace(inst, label=back[inst.label], phrase=inst.phrase or inst.label) if inst.label in back else inst
        for inst in result.instances
    ]
    report = ClipReport(mapped_prompts=dict(mapping))
    result.instances = apply_clip(scorer, rgb, instances, list(prompts), options or ClipOptions(), report=report)
    result.prompts = list(prompts)
    result.info["clip"] = {**report.as_dict(), **scorer.describe()}
    return result
