"""What every segmentation backend provides, so the core can cache and post-process uniformly.

The core calls, in order: `preprocess` (RGB uint8 -> model input), `encode_image` (the expensive
part; its tensors are what the cache stores), `encode_text` (one entry per phrase, cached too),
then `decode` on a batch of phrases. A backend never post-processes masks: it returns
probabilities at its own mask resolution and the core does the rest.

A backend may also offer ``embedding_spec(image_size)``: the name, shape and dtype of every
tensor `encode_image` returns for an image of that size. The disk cache then refuses entries
that do not match it (and recomputes them); without it only their values are checked (finite).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:  # torch is imported by the backends that run, not by registration
    import torch

Tensors = "dict[str, torch.Tensor]"


@dataclass
class Detections:
    """Candidates for one phrase above the score threshold.

    `mask_probs` is ``(K, h, w)`` at the model's mask resolution, covering the whole image;
    `boxes` is ``(K, 4)`` normalised xyxy; `scores` is ``(K,)`` in [0, 1].
    """

    mask_probs: torch.Tensor
    boxes: torch.Tensor
    scores: torch.Tensor


@runtime_checkable
class SegmentationBackend(Protocol):
    """The interface the core needs from a text-promptable instance segmentation model."""

    name: str
    """Registry name, e.g. ``"sam3"``; part of every cache key."""
    model_id: str
    """Identity of the weights (hub id and revision, or a content digest); part of cache keys."""
    device: torch.device
    dtype: torch.dtype
    input_size: tuple[int, int]
    """``(height, width)`` the image is resized to; part of cache keys."""

    def preprocess(self, rgb) -> torch.Tensor:
        """``(H, W, 3)`` uint8 -> a batch of one model input on the backend's device."""

    def encode_image(self, pixel_values: torch.Tensor) -> Tensors:
        """Run the image encoder; return only what `decode` consumes (this is what is cached)."""

    def encode_text(self, phrases: list[str]) -> list[Tensors]:
        """Encode phrases; one dict per phrase, each with a leading batch axis of 1."""

    def decode(
        self,
        image: Tensors,
        texts: list[Tensors],
        threshold: float,
        boxes: torch.Tensor | None = None,
        box_labels: torch.Tensor | None = None,
    ) -> list[Detections]:
        """Decode several phrases on one image embedding in one batched call.

        `boxes` (``(B, 4)`` normalised xyxy) with `box_labels` (1 positive, 0 negative) are
        optional visual exemplars shared by every phrase.
        """


def sam3_embedding_spec(
    input_size: tuple[int, int], patch_size: int, channels: int, scales: tuple[float, ...], dtype: torch.dtype
) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """SAM 3's cached embedding: one FPN level ``fpn_i`` per scale, ``(1, channels, rows * s, cols * s)``
    for the ViT's ``rows x cols`` patch grid, in the model's dtype (the `embedding_spec` of both SAM 3 backends)."""
    rows, cols = (side // patch_size for side in input_size)
    return {f"fpn_{i}": ((1, channels, int(rows * s), int(cols * s)), dtype) for i, s in enumerate(scales)}


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
