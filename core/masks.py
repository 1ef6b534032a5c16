"""Post-processing: from low-resolution mask probabilities to compact, cleaned-up instances.

transformers' own post-processing upsamples every kept mask to the full image as int64, which
needs ~6 GB at 2048x2048 and cannot fit 4096x4096 in 24 GB. Here each instance is thresholded at
the model's mask resolution to find its extent, then upsampled only inside that region, with the
same bilinear sampling as ``F.interpolate(..., align_corners=False)`` (through
``torchvision.ops.roi_align``), so the pixels equal the full-size result while memory stays
proportional to the objects.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from promptseg.options import CleanupOptions, DecodingOptions
from promptseg.results import Instance, mask_to_polygons  # noqa: F401  (importable from here too, as before)

# (y0, y1, x0, x1) region in pixels of the original image
Region = tuple[int, int, int, int]


def instances_from_probs(
    mask_probs: torch.Tensor,
    scores: torch.Tensor,
    boxes: torch.Tensor,
    label: str,
    image_size: tuple[int, int],
    mask_threshold: float = DecodingOptions.mask_threshold,
    phrase: str | None = None,
) -> list[Instance]:
    """Make instances from ``(Q, h, w)`` mask probabilities, ``(Q,)`` scores and ``(Q, 4)`` boxes.

    Boxes are normalised xyxy (as SAM 3 returns them); the returned instances' boxes are tight
    pixel boxes of their masks. Queries whose mask is empty at `mask_threshold` are dropped.
    """
    from torchvision.ops import roi_align

    height, width = image_size
    low_h, low_w = mask_probs.shape[-2:]
    probs = mask_probs.float()
    positive_low = probs > mask_threshold
    instances = []
    for query in range(probs.shape[0]):
        region = _pixel_region(positive_low[query], (low_h, low_w), (height, width))
        if region is None:
            continue
        y0, y1, x0, x1 = region
        scale_y, scale_x = low_h / height, low_w / width
        roi = torch.tensor(
            [[0.0, x0 * scale_x, y0 * scale_y, x1 * scale_x, y1 * scale_y]],
            dtype=torch.float32,
            device=probs.device,
        )
        upsampled = roi_align(
            probs[query][None, None], roi, output_size=(y1 - y0, x1 - x0),
            spatial_scale=1.0, sampling_ratio=1, aligned=True,
        )[0, 0]
        crop = (upsampled > mask_threshold).cpu().numpy()
        tight = tight_box(crop)
        if tight is None:
            continue
        cx0, cy0, cx1, cy1 = tight
        box_norm = boxes[query].float().cpu().tolist()
        instances.append(
            Instance(
                label=label,
                score=float(scores[query]),
                box=(x0 + cx0, y0 + cy0, x0 + cx1, y0 + cy1),
                mask=np.ascontiguousarray(crop[cy0:cy1, cx0:cx1]),
                model_box=(
                    box_norm[0] * width, box_norm[1] * height,
                    box_norm[2] * width, box_norm[3] * height,
                ),
                phrase=phrase if phrase is not None else label,
            )
        )
    return instances


def _pixel_region(
    positive: torch.Tensor, low_size: tuple[int, int], size: tuple[int, int]
) -> Region | None:
    """The pixel rows/columns whose bilinear samples can touch a positive low-res cell."""
    rows = torch.nonzero(positive.any(dim=1)).flatten()
    if rows.numel() == 0:
        return None
    cols = torch.nonzero(positive.any(dim=0)).flatten()
    (low_h, low_w), (height, width) = low_size, size
    r0, r1, c0, c1 = int(rows[0]), int(rows[-1]), int(cols[0]), int(cols[-1])
    sy, sx = height / low_h, width / low_w
    y0 = max(0, math.floor((r0 - 1) * sy))
    y1 = min(height, math.ceil((r1 + 2) * sy) + 1)
    x0 = max(0, math.floor((c0 - 1) * sx))
    x1 = min(width, math.ceil((c1 + 2) * sx) + 1)
    return y0, y1, x0, x1


def tight_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """``(x0, y0, x1, y1)`` of the True pixels (exclusive ends), or None when there are none."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def with_mask(instance: Instance, mask: np.ndarray, offset: tuple[int, int]) -> Instance | None:
    """A copy of `instance` with a new mask placed at pixel `offset` (x, y), re-tightened."""
    from dataclasses import replace

    tight = tight_box(mask)
    if tight is None:
        return None
    cx0, cy0, cx1, cy1 = tight
    ox, oy = offset
    return replace(
        instance,
        box=(ox + cx0, oy + cy0, ox + cx1, oy + cy1),
        mask=np.ascontiguousarray(mask[cy0:cy1, cx0:cx1]),
    )


def smooth_instance(instance: Instance, radius: int, image_size: tuple[int, int]) -> Instance | None:
    """Morphological closing with a disc of `radius` pixels: fills notches and pinholes."""
    import cv2

    if radius <= 0:
        return instance
    pad = radius + 1
    padded = np.pad(instance.mask, pad).astype(np.uint8)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    closed = cv2.morphologyEx(padded, cv2.MORPH_CLOSE, kernel).astype(bool)
    x0, y0 = instance.box[:2]
    height, width = image_size
    # keep the result inside the image
    top, left = max(0, pad - y0), max(0, pad - x0)
    bottom = closed.shape[0] - max(0, (y0 - pad + closed.shape[0]) - height)
    right = closed.shape[1] - max(0, (x0 - pad + closed.shape[1]) - width)
    closed = closed[top:bottom, left:right]
    return with_mask(instance, closed, (x0 - pad + left, y0 - pad + top))


def mask_iou(a: Instance, b: Instance) -> float:
    """IoU of two instances' masks, computed on the overlap of their boxes only."""
    ax0, ay0, ax1, ay1 = a.box
    bx0, by0, bx1, by1 = b.box
    x0, y0, x1, y1 = max(ax0, bx0), max(ay0, by0), min(ax1, bx1), min(ay1, by1)
    if x0 >= x1 or y0 >= y1:
        return 0.0
    inter = np.count_nonzero(
        a.mask[y0 - ay0 : y1 - ay0, x0 - ax0 : x1 - ax0] & b.mask[y0 - by0 : y1 - by0, x0 - bx0 : x1 - bx0]
    )
    union = a.area + b.area - inter
    return inter / union if union else 0.0


def mask_nms(
    instances: Sequence[Instance], iou_threshold: float | None, per_label: bool
) -> list[Instance]:
    """Greedy non-maximum suppression on mask IoU, highest score first.

    With `per_label`, only instances of the same label suppress each other.
    """
    ordered = sorted(instances, key=lambda inst: -inst.score)
    if iou_threshold is None:
        return ordered
    kept: list[Instance] = []
    for candidate in ordered:
        if all(
            (per_label and kept_inst.label != candidate.label)
            or mask_iou(kept_inst, candidate) <= iou_threshold
            for kept_inst in kept
        ):
            kept.append(candidate)
    return kept


def clean(instances: list[Instance], image_size: tuple[int, int], cleanup: CleanupOptions) -> list[Instance]:
    """Smooth each mask (`cleanup.smooth`) and drop specks (`cleanup.min_area`); no de-duplication."""
    cleaned = []
    for inst in instances:
        if cleanup.smooth:
            inst = smooth_instance(inst, cleanup.smooth, image_size)
        if inst is not None and inst.area >= max(cleanup.min_area, 1):
            cleaned.append(inst)
    return cleaned


def postprocess(
    instances: list[Instance], image_size: tuple[int, int], cleanup: CleanupOptions | None = None
) -> list[Instance]:
    """Smooth, drop specks, de-duplicate within and across prompts, keep the best `max_instances`:
    the post-processing stage, reading only its `CleanupOptions`."""
    cleanup = cleanup or CleanupOptions()
    cleaned = clean(instances, image_size, cleanup)
    cleaned = mask_nms(cleaned, cleanup.iou_threshold, per_label=True)
    cleaned = mask_nms(cleaned, cleanup.cross_prompt_iou, per_label=False)
    if cleanup.max_instances is not None:
        cleaned = cleaned[: cleanup.max_instances]
    return cleaned
