"""Helpers both SAM 3 backends share (`promptseg.backends.sam3_hf` and `promptseg.backends.meta`).

SAM 3-specific, so kept apart from the backend protocol: the layout of the cached embedding,
exemplar boxes in SAM 3's form, and SAM 3's scores (detection x presence) above a threshold.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from promptseg.backends.protocol import Detections
from promptseg.errors import ModelLoadError

if TYPE_CHECKING:  # torch is imported by the backends that run, not by registration
    import torch


def sam3_embedding_spec(
    input_size: tuple[int, int], patch_size: int, channels: int, scales: tuple[float, ...], dtype: torch.dtype
) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """SAM 3's cached embedding: one FPN level ``fpn_i`` per scale, ``(1, channels, rows * s, cols * s)``
    for the ViT's ``rows x cols`` patch grid, in the model's dtype (the `embedding_spec` of both SAM 3 backends)."""
    rows, cols = (side // patch_size for side in input_size)
    return {f"fpn_{i}": ((1, channels, int(rows * s), int(cols * s)), dtype) for i, s in enumerate(scales)}


def sam3_tracker_spec(
    input_size: tuple[int, int], patch_size: int, channels: tuple[int, int, int], dtype: torch.dtype
) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """The tracker's cached levels ``tracker_0..2`` at 4x, 2x and 1x the ViT's patch grid, with the
    `channels` of the mask decoder's two projections and the neck (both SAM 3 backends cache them)."""
    rows, cols = (side // patch_size for side in input_size)
    return {
        f"tracker_{i}": ((1, width, rows * scale, cols * scale), dtype)
        for i, (scale, width) in enumerate(zip((4, 2, 1), channels))
    }


def exemplar_inputs(boxes: torch.Tensor, labels: torch.Tensor | None, device, dtype):
    """Normalised xyxy exemplar boxes -> SAM 3's normalised cxcywh, with labels (1 positive, 0 negative)."""
    import torch

    xyxy = boxes.to(device, dtype)
    cxcywh = torch.stack(
        [(xyxy[:, 0] + xyxy[:, 2]) / 2, (xyxy[:, 1] + xyxy[:, 3]) / 2,
         xyxy[:, 2] - xyxy[:, 0], xyxy[:, 3] - xyxy[:, 1]], dim=-1,
    )
    if labels is None:
        labels = torch.ones(len(boxes), dtype=torch.long)
    return cxcywh, labels.to(device, torch.long)


def split_detections(
    pred_logits: torch.Tensor,
    presence_logits: torch.Tensor | None,
    pred_masks: torch.Tensor,
    pred_boxes: torch.Tensor,
    threshold: float,
) -> list[Detections]:
    """SAM 3's batched outputs -> one `Detections` per prompt, keeping scores above `threshold`.

    Score = sigmoid(detection logit) x sigmoid(presence logit), as SAM 3 defines it; masks become
    probabilities (float32) so post-processing can interpolate them like transformers does.
    """
    scores = pred_logits.float().sigmoid()
    if presence_logits is not None:
        scores = scores * presence_logits.float().sigmoid()
    results = []
    for b in range(scores.shape[0]):
        keep = scores[b] > threshold
        results.append(
            Detections(
                mask_probs=pred_masks[b][keep].float().sigmoid(),
                boxes=pred_boxes[b][keep].float(),
                scores=scores[b][keep],
            )
        )
    return results


def refuse_partial_load(info: dict, directory, part: str) -> None:
    """`ModelLoadError` when ``from_pretrained``'s loading info names missing or mismatched weights of `part`."""
    problems = sorted(info.get("missing_keys") or []) + sorted(map(str, info.get("mismatched_keys") or []))
    if problems:
        more = f" (+{len(problems) - 5} more)" if len(problems) > 5 else ""
        raise ModelLoadError(
            f"The checkpoint in {directory} lacks {part} weights its config describes "
            f"({', '.join(problems[:5])}{more}). Refusing a partial load: use the complete checkpoint for this config."
        )
