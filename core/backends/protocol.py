"""What a backend provides, so the core can cache, post-process and score uniformly.

Two kinds of backends, each registered with a `BackendSpec` through the
``promptseg_register_backends`` hook (see `promptseg.hookspecs`):

* a `SegmentationBackend` (an image + text prompts -> masks model, e.g. SAM 3), added with
  ``registry.add_segmenter``;
* a `ScorerBackend` (an image-text model with one embedding space, e.g. CLIP), added with
  ``registry.add_scorer``.

For a segmentation backend the core calls, in order: `preprocess` (RGB uint8 -> model input),
`encode_image` (the expensive part; its tensors are what the cache stores), `encode_text` (one
entry per phrase, cached too), then `decode` on a batch of phrases. A backend never
post-processes masks: it returns probabilities at its own mask resolution and the core does the
rest. Helpers the SAM 3 backends share live in `promptseg.backends.sam3_common`.

A segmentation backend may also offer ``embedding_spec(image_size)``: the name, shape and dtype of every
tensor `encode_image` returns for an image of that size. The disk cache then refuses entries
that do not match it (and recomputes them); without it only their values are checked (finite).

Visual prompts (``Segmenter.segment_object``) are optional too: a backend that answers them sets
``visual_prompts = True`` and offers ``decode_object(image, points, point_labels, box, mask, multimask)``
on the same cached embedding (so one trunk run serves text and clicks), returning ``(K, h, w)`` mask
logits and ``(K,)`` predicted IoUs; points and box in pixels of the model input (`input_size`), the
mask a float ``(H, W)`` of the image; ``visual_prompts_help`` may say what to load when it is False.
Both SAM 3 backends do when their checkpoint holds the tracker (`promptseg.backends.sam3_hf`,
`promptseg.backends.meta`).

Any backend (segmentation or scorer) may offer ``with_dtype(dtype)``: the same model in another
precision. In fp16 the core redoes a call whose outputs are not finite on that twin
(`promptseg.overflow`); without it the overflow is only reported. A segmentation backend that drops
queries below the threshold sets ``Detections.finite`` from the raw outputs, since a NaN score
never passes a threshold and would hide the overflow.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:  # torch is imported by the backends that run, not by registration
    import numpy as np
    import torch

Tensors = "dict[str, torch.Tensor]"


@dataclass(frozen=True)
class BackendSpec:
    """How to recognise and load one backend.

    `load(model, device, dtype, **options)` returns a backend object; `accepts(model)` says
    whether a model string (hub id, directory, file) is meant for this backend, so
    ``load_segmenter(model=...)`` can pick the backend without being told. Higher `priority`
    is asked first.
    """

    name: str
    load: Callable[..., Any]
    accepts: Callable[[str], bool] = lambda model: False
    priority: int = 0
    description: str = ""
    requires: tuple[str, ...] = field(default_factory=tuple)


@dataclass
class Detections:
    """Candidates for one phrase above the score threshold.

    `mask_probs` is ``(K, h, w)`` at the model's mask resolution, covering the whole image;
    `boxes` is ``(K, 4)`` normalised xyxy; `scores` is ``(K,)`` in [0, 1].
    """

    mask_probs: torch.Tensor
    boxes: torch.Tensor
    scores: torch.Tensor
    finite: bool = True
    """False when a raw output (a logit or box of any query, kept or not) was NaN or infinite: a NaN
    score fails every threshold, so dropped queries would hide an fp16 overflow (`promptseg.overflow`)."""


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


@runtime_checkable
class ScorerBackend(Protocol):
    """The interface `promptseg.clip.scorer.ClipScorer` needs from an image-text model.

    Images and texts are embedded in one space, as unit-length float32 rows on the CPU, so a
    similarity is a dot product. The scorer caches every embedding under `name`, `model_id`
    and `dtype`.
    """

    name: str
    """Registry name, e.g. ``"openclip"``; part of every cache key."""
    model_id: str
    """Identity of the weights; part of every cache key."""
    device: torch.device
    dtype: torch.dtype
    input_size: tuple[int, int]
    """``(height, width)`` the model sees."""
    fill: tuple[int, int, int]
    """RGB colour that is neutral after the model's normalisation (fills masked-out pixels and padding)."""
    logit_scale: float
    """The learned temperature: ``softmax(logit_scale * cosine)`` gives label probabilities."""
    multilingual: bool
    """Whether the text tower reads many languages (non-English prompts are then mapped to English)."""

    def encode_images(self, images: list[np.ndarray]) -> torch.Tensor:
        """``(N, D)`` unit-length embeddings of square RGB uint8 pictures."""

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """``(N, D)`` unit-length embeddings of texts."""
