"""Visual prompts (points, a box, a previous mask) for one object: checked, then mapped to the model.

`check_visual_prompts` runs before any pixel is read (so a bad click costs nothing); `to_model_input`
maps the checked prompts from the image's pixels to the model input's (SAM 3 resizes every image to
a square, so x and y scale apart), and `object_instances` turns SAM's candidate mask logits into
instances through the masks module, best predicted IoU first.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from promptseg.errors import OptionError
from promptseg.masks import instances_from_probs
from promptseg.results import Instance

POINT_FORM = "pixel (x, y) pairs, e.g. points=[(120, 80), (60, 40)] with point_labels=[1, 0]"
BOX_FORM = "one pixel corner box (x0, y0, x1, y1) with x1 > x0 and y1 > y0, e.g. box=(40, 30, 110, 80)"
OBJECT_LABEL = "object"


@dataclass(frozen=True)
class VisualPrompts:
    """Checked visual prompts in image pixels: ``(N, 2)`` points with ``(N,)`` labels, a ``(4,)`` box,
    a previous mask (checked against the image size once it is known)."""

    points: np.ndarray | None
    point_labels: np.ndarray | None
    box: np.ndarray | None
    mask: Any


def check_visual_prompts(points: Any = None, point_labels: Any = None, box: Any = None, mask: Any = None) -> VisualPrompts:
    """Check the shapes and values of visual prompts; `OptionError` naming what is wrong and the form."""
    if points is None and box is None and mask is None:
        if point_labels is not None:
            raise OptionError(f"point_labels were given without points: give points as {POINT_FORM}.")
        raise OptionError(
            f"segment_object needs a prompt: points ({POINT_FORM}), a box ({BOX_FORM}) or a previous mask."
        )
    checked_points = labels = checked_box = None
    if points is not None:
        checked_points = _finite(points, "points", POINT_FORM)
        if checked_points.shape == (2,):
            checked_points = checked_points[None]
        if checked_points.ndim != 2 or checked_points.shape[1] != 2 or not len(checked_points):
            raise OptionError(f"points must be two numbers per point, got shape {checked_points.shape}: give {POINT_FORM}.")
        labels = np.ones(len(checked_points), dtype=np.int64)
        if point_labels is not None:
            given = _finite(point_labels, "point_labels", "1 (positive) or 0 (negative) per point")
            if given.shape != (len(checked_points),):
                raise OptionError(
                    f"point_labels has shape {given.shape} for {len(checked_points)} point(s): give one 1 (positive) "
                    "or 0 (negative) per point, or leave it out to mark every point positive."
                )
            if not np.isin(given, (0, 1)).all():
                raise OptionError(f"point_labels must be 1 (positive) or 0 (negative), got {given.tolist()}.")
            labels = given.astype(np.int64)
    elif point_labels is not None:
        raise OptionError(f"point_labels were given without points: give points as {POINT_FORM}.")
    if box is not None:
        checked_box = _finite(box, "box", BOX_FORM).reshape(-1)
        if checked_box.shape != (4,):
            raise OptionError(f"box must be four numbers, got {checked_box.size}: give {BOX_FORM}.")
        if checked_box[2] <= checked_box[0] or checked_box[3] <= checked_box[1]:
            raise OptionError(f"box {checked_box.tolist()} is empty or reversed: give {BOX_FORM} (corners, not width and height).")
    if mask is not None and not isinstance(mask, (Instance, np.ndarray)):
        raise OptionError(f"mask must be an Instance or a boolean (H, W) array, got {type(mask).__name__}.")
    return VisualPrompts(checked_points, labels, checked_box, mask)


def full_size_mask(mask: Any, image_size: tuple[int, int]) -> np.ndarray:
    """A previous mask as a boolean ``(H, W)`` array of the image; `OptionError` when it does not fit."""
    height, width = image_size
    if isinstance(mask, Instance):
        x0, y0, x1, y1 = mask.box
        if x1 > width or y1 > height:
            raise OptionError(
                f"The mask's instance box {mask.box} lies outside this {width}x{height} image: pass an instance "
                "of a result of this same image."
            )
        return mask.full_mask(height, width)
    array = np.asarray(mask)
    if array.shape != (height, width):
        raise OptionError(f"mask has shape {array.shape}; it must be the image's (height, width) = {(height, width)}.")
    if array.dtype != bool and not np.isin(array, (0, 1)).all():
        raise OptionError("mask must be boolean (or 0/1): give the mask of one object, True inside it.")
    return array.astype(bool)


def check_inside(prompts: VisualPrompts, image_size: tuple[int, int]) -> None:
    """Points must lie on the image and a box must overlap it (x in [0, width], y in [0, height])."""
    height, width = image_size
    if prompts.points is not None:
        outside = ~((prompts.points[:, 0] >= 0) & (prompts.points[:, 0] <= width)
                    & (prompts.points[:, 1] >= 0) & (prompts.points[:, 1] <= height))
        if outside.any():
            raise OptionError(
                f"point(s) {prompts.points[outside].tolist()} lie outside the {width}x{height} image: points are "
                "pixel (x, y), x across and y down from the top-left corner."
            )
    if prompts.box is not None:
        x0, y0, x1, y1 = prompts.box
        if x1 <= 0 or y1 <= 0 or x0 >= width or y0 >= height:
            raise OptionError(
                f"box {prompts.box.tolist()} does not overlap the {width}x{height} image: give {BOX_FORM} in its pixels."
            )


def to_model_input(prompts: VisualPrompts, image_size: tuple[int, int], input_size: tuple[int, int]):
    """Points, labels, box and mask as the model takes them: coordinates in model-input pixels
    (as transformers' tracker processor scales them), the mask as float ``(H, W)``."""
    (height, width), (in_h, in_w) = image_size, input_size
    scale = np.array([in_w / width, in_h / height])
    points = labels = box = mask = None
    if prompts.points is not None:
        points = torch.as_tensor(prompts.points * scale, dtype=torch.float32)
        labels = torch.as_tensor(prompts.point_labels)
    if prompts.box is not None:
        box = torch.as_tensor(prompts.box * np.tile(scale, 2), dtype=torch.float32)
    if prompts.mask is not None:
        mask = torch.from_numpy(full_size_mask(prompts.mask, image_size).astype(np.float32))
    return points, labels, box, mask


def object_instances(logits: torch.Tensor, ious: torch.Tensor, image_size, mask_threshold: float) -> list[Instance]:
    """SAM's candidate masks -> instances, best predicted IoU first (empty candidates dropped).

    Logits are upsampled and cut at ``logit(mask_threshold)``, which is how transformers
    post-processes them (bilinear logits, then > 0 for the default 0.5); `score` is the predicted IoU.
    """
    cut = math.log(mask_threshold / (1 - mask_threshold))
    order = torch.argsort(ious, descending=True)
    logits, ious = logits[order], ious[order]
    no_boxes = torch.zeros(len(ious), 4)
    found = instances_from_probs(logits, ious, no_boxes, OBJECT_LABEL, image_size, cut)
    return [dataclasses.replace(inst, model_box=None, extra={"predicted_iou": inst.score}) for inst in found]


def _finite(value: Any, name: str, form: str) -> np.ndarray:
    try:
        array = np.asarray(value)
        if array.dtype.kind not in "biuf":
            raise TypeError("not numbers")
        array = array.astype(np.float64)
    except (TypeError, ValueError):
        raise OptionError(f"{name} must be numbers only: give {form}; got {value!r:.80}.") from None
    if not np.isfinite(array).all():
        raise OptionError(f"{name} has a NaN or infinite value: give {form}.")
    return array
