"""What a segmentation call returns: plain dataclasses with compact masks.

Masks are stored cropped to their own tight box, never as an N x H x W stack, so a 4096x4096 image
with a hundred instances costs a few megabytes. Full-size arrays are made only on request, one at
a time (`Instance.full_mask`, `SegmentationResult.to_label_image`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

Box = tuple[int, int, int, int]


@dataclass(frozen=True, eq=False)
class Instance:
    """One segmented object.

    `box` is the tight pixel box ``(x0, y0, x1, y1)`` of the mask in the original image, with
    ``x1``/``y1`` exclusive, and `mask` is a boolean array of shape ``(y1 - y0, x1 - x0)``.
    `label` is the prompt as the user gave it; `phrase` is the text the model actually received
    (they differ when a prompt was mapped, e.g. from another language). `model_box` is the
    detector's own box (float pixel xyxy), which may be looser than the mask. `extra` holds
    scores and provenance added by later stages (CLIP score, tile, slice).
    """

    label: str
    score: float
    box: Box
    mask: np.ndarray
    model_box: tuple[float, float, float, float] | None = None
    phrase: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @cached_property
    def area(self) -> int:
        """Number of mask pixels (counted once: NMS asks for it on every comparison)."""
        return int(np.count_nonzero(self.mask))

    def full_mask(self, height: int, width: int) -> np.ndarray:
        """The mask pasted into a ``(height, width)`` boolean canvas."""
        canvas = np.zeros((height, width), dtype=bool)
        x0, y0, x1, y1 = self.box
        canvas[y0:y1, x0:x1] = self.mask
        return canvas


@dataclass
class SegmentationResult:
    """All instances found in one image, plus what produced them.

    `image_size` is ``(height, width)`` of the original image. `embedding_source` says where the
    image embedding came from: ``"memory"``, ``"disk"`` or ``"computed"`` (``"mixed"`` for a
    tiled image whose tiles came from several places).
    """

    instances: list[Instance]
    image_size: tuple[int, int]
    prompts: list[str]
    embedding_source: str = "computed"
    source: str | None = None
    info: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    """Set (and `instances` empty) when the image could not be processed in a batch run."""
    alternatives: list[Instance] = field(default_factory=list)
    """`Segmenter.segment_object`: SAM's other candidate masks for the same prompt, best first."""

    def __len__(self) -> int:
        return len(self.instances)

    def __iter__(self) -> Iterator[Instance]:
        return iter(self.instances)

    def __getitem__(self, index: int) -> Instance:
        return self.instances[index]

    @property
    def labels(self) -> list[str]:
        return [inst.label for inst in self.instances]

    @property
    def scores(self) -> np.ndarray:
        return np.array([inst.score for inst in self.instances], dtype=np.float32)

    @property
    def boxes(self) -> np.ndarray:
        """``(N, 4)`` pixel xyxy boxes (x1, y1 exclusive)."""
        return np.array([inst.box for inst in self.instances], dtype=np.int64).reshape(-1, 4)

    def to_label_image(self, dtype: Any = np.int32) -> np.ndarray:
        """An ``(H, W)`` array where pixel value ``i + 1`` means instance ``i`` and 0 is background.

        Where instances overlap, the higher-scoring one is drawn on top.
        """
        height, width = self.image_size
        labels = np.zeros((height, width), dtype=dtype)
        for index in sorted(range(len(self.instances)), key=lambda i: self.instances[i].score):
            inst = self.instances[index]
            x0, y0, x1, y1 = inst.box
            labels[y0:y1, x0:x1][inst.mask] = index + 1
        return labels

    def to_coco(
        self, image_id: int = 0, category_ids: dict[str, int] | None = None
    ) -> list[dict[str, Any]]:
        """COCO result dicts with compressed RLE masks (pycocotools), one per instance.

        `category_ids` maps labels to COCO category ids; by default labels are numbered from 1 in
        order of first appearance.
        """
        from pycocotools import mask as mask_utils

        if category_ids is None:
            category_ids = {}
            for label in self.labels:
                category_ids.setdefault(label, len(category_ids) + 1)
        height, width = self.image_size
        records = []
        for inst in self.instances:
            rle = mask_utils.encode(np.asfortranarray(inst.full_mask(height, width), dtype=np.uint8))
            rle["counts"] = rle["counts"].decode("ascii")
            x0, y0, x1, y1 = inst.box
            records.append(
                {
                    "image_id": image_id,
                    "category_id": category_ids[inst.label],
                    "category_name": inst.label,
                    "segmentation": rle,
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "area": inst.area,
                    "score": inst.score,
                }
            )
        return records

    def to_polygons(self, tolerance: float = 0.0) -> list[list[np.ndarray]]:
        """Outer contours of each instance as ``(K, 2)`` float arrays of pixel ``(x, y)`` vertices.

        One list per instance (an instance in several pieces has several polygons).
        `tolerance` > 0 simplifies each contour (Douglas-Peucker, in pixels).
        """
        return [mask_to_polygons(inst.mask, inst.box[:2], tolerance) for inst in self.instances]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary (masks as COCO RLE)."""
        return {
            "source": self.source,
            "image_size": list(self.image_size),
            "prompts": list(self.prompts),
            "embedding_source": self.embedding_source,
            "instances": [
                {
                    "label": inst.label,
                    "phrase": inst.phrase,
                    "score": inst.score,
                    "box": list(inst.box),
                    "area": inst.area,
                    **{k: v for k, v in inst.extra.items() if isinstance(v, (int, float, str))},
                    "segmentation": coco["segmentation"],
                }
                for inst, coco in zip(self.instances, self.to_coco())
            ],
        }


def mask_to_polygons(
    mask: np.ndarray, offset: tuple[int, int] = (0, 0), tolerance: float = 0.0
) -> list[np.ndarray]:
    """Outer contours of a boolean mask as ``(K, 2)`` float arrays of ``(x, y)`` pixel vertices."""
    import cv2

    contours, _ = cv2.findContours(
        np.ascontiguousarray(mask, dtype=np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE
    )
    polygons = []
    for contour in contours:
        if tolerance > 0:
            contour = cv2.approxPolyDP(contour, tolerance, True)
        if len(contour) < 3:
            continue
        points = contour.reshape(-1, 2).astype(np.float64)
        points += np.asarray(offset, dtype=np.float64)
        polygons.append(points)
    return polygons


def normalise_prompt(text: str) -> str:
    """A prompt as the core uses it, and as it comes back in `Instance.label`: runs of white space
    made one space, none at the ends. Hosts that map labels back to their own names key by this."""
    return " ".join(text.split())


def ensure_prompt_list(prompts: str | Sequence[str]) -> list[str]:
    """Normalise the `prompts` argument to a list of stripped, non-empty strings."""
    from promptseg.errors import PromptError

    if isinstance(prompts, str):
        prompts = [prompts]
    if not isinstance(prompts, Sequence) or len(prompts) == 0:
        raise PromptError("No prompt given: pass a noun phrase such as 'red car' or a list of them.")
    cleaned = []
    for prompt in prompts:
        if not isinstance(prompt, str):
            raise PromptError(
                f"Prompts must be strings, got {type(prompt).__name__}: {prompt!r}."
            )
        text = normalise_prompt(prompt)
        if not text:
            raise PromptError("A prompt is empty: give a noun phrase such as 'nucleus'.")
        cleaned.append(text)
    return list(dict.fromkeys(cleaned))
