"""Map between FiftyOne labels and promptseg's core types: nothing here segments or post-processes.

FiftyOne boxes are relative ``[x, y, w, h]`` with the top-left at ``(x, y)``; FiftyOne renders a
detection's mask into the pixel box ``int(x * W) : int((x + w) * W)``. promptseg instances carry a
tight pixel box ``(x0, y0, x1, y1)`` (x1/y1 exclusive) and a mask of exactly that size, so the
relative box is chosen to land on those same pixels and the mask is never resampled.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from promptseg.errors import OptionError, PromptError

DEFAULT_MASK_PATH_MIN_PIXELS = 4096 * 4096
"""Images with at least this many pixels get their masks written as PNG files (`mask_path`)."""


def relative_edge(pixel: int, size: int) -> float:
    """The float ``f`` nearest ``pixel / size`` with ``int(f * size) == pixel`` (FiftyOne's rounding)."""
    value = pixel / size
    while int(value * size) < pixel:
        value = math.nextafter(value, math.inf)
    while value > 0 and int(value * size) > pixel:
        value = math.nextafter(value, -math.inf)
    return value


def relative_box(box: Sequence[int], image_size: tuple[int, int]) -> list[float]:
    """A pixel ``(x0, y0, x1, y1)`` box as FiftyOne's relative ``[x, y, w, h]``, pixel-exact."""
    height, width = image_size
    x0, y0, x1, y1 = (int(v) for v in box)
    left, top = relative_edge(x0, width), relative_edge(y0, height)
    box_w = _extent(left, x1, width)
    box_h = _extent(top, y1, height)
    return [left, top, box_w, box_h]


def _extent(start: float, end_pixel: int, size: int) -> float:
    extent = end_pixel / size - start
    while int((start + extent) * size) < end_pixel:
        extent = math.nextafter(extent, math.inf)
    while int((start + extent) * size) > end_pixel:
        extent = math.nextafter(extent, -math.inf)
    return extent


def pixel_box(bounding_box: Sequence[float], image_size: tuple[int, int]) -> list[float]:
    """FiftyOne's relative ``[x, y, w, h]`` as a float pixel ``[x0, y0, x1, y1]`` (for exemplars)."""
    height, width = image_size
    x, y, w, h = (float(v) for v in bounding_box)
    return [x * width, y * height, (x + w) * width, (y + h) * height]


def to_detections(
    result,
    *,
    mask_dir: str | os.PathLike | None = None,
    mask_stem: str = "mask",
):
    """A promptseg `SegmentationResult` as `fo.Detections`.

    Each detection has the prompt as `label`, the score as `confidence`, the relative box, the mask
    cropped to the box, the phrase the model received as ``phrase``, and any numeric scores the
    core added (``inst.extra``) as attributes. With `mask_dir`, masks are written there as PNG files
    and referenced by `mask_path` instead of being stored in the database.
    """
    import fiftyone as fo

    if mask_dir is not None:
        os.makedirs(mask_dir, exist_ok=True)
    detections = []
    for index, inst in enumerate(result.instances):
        detection = fo.Detection(
            label=inst.label,
            confidence=float(inst.score),
            bounding_box=relative_box(inst.box, result.image_size),
            mask=np.ascontiguousarray(inst.mask, dtype=bool),
        )
        _copy_attributes(inst, detection)
        if mask_dir is not None:
            detection.export_mask(os.path.join(os.fspath(mask_dir), f"{mask_stem}-{index}.png"), update=True)
        detections.append(detection)
    return fo.Detections(detections=detections)


OUTPUTS = ("detections", "segmentation", "polylines")
"""Label types a run can write: one `fo.Detections`, `fo.Segmentation` or `fo.Polylines` per sample."""


def check_output(output: Any) -> str:
    """The output name, or an `OptionError` naming the choices."""
    if output not in OUTPUTS:
        raise OptionError(f"Unknown output {output!r}: choose one of {', '.join(OUTPUTS)}.")
    return output


def label_type(output: str):
    """The FiftyOne label class a run with this `output` writes."""
    import fiftyone as fo

    return {"detections": fo.Detections, "segmentation": fo.Segmentation, "polylines": fo.Polylines}[
        check_output(output)
    ]


def add_class_ids(class_ids: dict[str, int], labels: Sequence[str]) -> dict[str, int]:
    """Give each new label the next class id (from 1; 0 is background), keeping the existing ones."""
    for label in labels:
        if label not in class_ids:
            class_ids[label] = max(class_ids.values(), default=0) + 1
    return class_ids


def class_ids_from_targets(mask_targets: dict | None) -> dict[str, int]:
    """Invert a field's ``mask_targets`` ({class id: label}) into {label: class id}."""
    return {str(label): int(value) for value, label in (mask_targets or {}).items() if int(value) > 0}


def to_segmentation(result, class_ids: dict[str, int], *, mask_path: str | os.PathLike | None = None):
    """A promptseg result as one semantic `fo.Segmentation`: pixel value = class id of the prompt.

    The mask is the core's `to_label_image` (higher-scoring instance on top where they overlap)
    with each instance index replaced by its label's id from `class_ids`; store the inverse
    mapping as the field's ``mask_targets`` so the App names the classes. With `mask_path` the
    mask is written there as a PNG instead of into the database.
    """
    import fiftyone as fo

    add_class_ids(class_ids, [inst.label for inst in result.instances])
    dtype = np.uint8 if max(class_ids.values(), default=0) < 256 else np.uint16
    lookup = np.array([0] + [class_ids[inst.label] for inst in result.instances], dtype=dtype)
    segmentation = fo.Segmentation(mask=lookup[result.to_label_image()])
    if mask_path is not None:
        os.makedirs(os.path.dirname(os.fspath(mask_path)) or ".", exist_ok=True)
        segmentation.export_mask(os.fspath(mask_path), update=True)
    return segmentation


def to_polylines(result, tolerance: float = 0.0):
    """A promptseg result as `fo.Polylines`: one closed, filled polyline per instance.

    The shapes are the core's `to_polygons` (an instance in several pieces has several shapes),
    divided by the image size to FiftyOne's relative coordinates. Instances too small to have a
    polygon (under three contour points) are left out.
    """
    import fiftyone as fo

    height, width = result.image_size
    scale = np.array([width, height], dtype=np.float64)
    polylines = []
    for inst, polygons in zip(result.instances, result.to_polygons(tolerance)):
        if not polygons:  # fewer than three contour points: nothing a polygon can draw
            continue
        polyline = fo.Polyline(
            label=inst.label,
            confidence=float(inst.score),
            points=[[(float(x), float(y)) for x, y in polygon / scale] for polygon in polygons],
            closed=True,
            filled=True,
        )
        _copy_attributes(inst, polyline)
        polylines.append(polyline)
    return fo.Polylines(polylines=polylines)


def to_label(
    result,
    output: str,
    phrases: Sequence[str],
    class_ids: dict[str, int] | None,
    mask_dir: str | os.PathLike | None,
    mask_stem: str,
    mask_path_min_pixels: int | None = DEFAULT_MASK_PATH_MIN_PIXELS,
):
    """One sample's label of the `output` type (see `label_type`).

    Masks of images with at least `mask_path_min_pixels` pixels go to PNG files under `mask_dir`
    named after `mask_stem` (polylines have none). For a segmentation, `phrases` get class ids
    in prompt order, found or not, added to `class_ids`.
    """
    if output == "polylines":
        return to_polylines(result)
    height, width = result.image_size
    large = mask_dir is not None and mask_path_min_pixels is not None and height * width >= mask_path_min_pixels
    folder = mask_dir if large else None
    if output == "segmentation":
        add_class_ids(class_ids, phrases)
        path = os.path.join(os.fspath(folder), f"{mask_stem}.png") if folder is not None else None
        return to_segmentation(result, class_ids, mask_path=path)
    return to_detections(result, mask_dir=folder, mask_stem=mask_stem)


def _copy_attributes(inst, label) -> None:
    """The phrase the model received and the core's numeric scores (``inst.extra``) as attributes."""
    label["phrase"] = inst.phrase or inst.label
    for key, value in inst.extra.items():
        if isinstance(value, (bool, int, float, str, np.integer, np.floating)):
            label[key] = value.item() if isinstance(value, np.generic) else value


def prompts_from_value(value: Any, field: str = "prompt field") -> list[str]:
    """Prompts held by a sample field: a string, a list of strings, or classification/detection labels."""
    import fiftyone as fo

    if value is None:
        return []
    if isinstance(value, str):
        return [value] if value.strip() else []
    if isinstance(value, (fo.Classification, fo.Detection)):
        return [value.label] if value.label else []
    if isinstance(value, fo.Classifications):
        return [c.label for c in value.classifications if c.label]
    if isinstance(value, fo.Detections):
        return [d.label for d in value.detections if d.label]
    if isinstance(value, (list, tuple)):
        out = []
        for item in value:
            out += prompts_from_value(item, field)
        return out
    raise PromptError(
        f"Cannot read prompts from {field!r} of type {type(value).__name__}: use a string, a list of "
        "strings, or a Classification(s)/Detections field whose labels are the prompts."
    )


def exemplars_from_value(value: Any, image_size: tuple[int, int], field: str = "exemplar field") -> list[list[float]]:
    """Pixel xyxy exemplar boxes from a `fo.Detections` (or `fo.Detection`) field value.

    Boxes without area are dropped; a box with a NaN or infinite coordinate is an `OptionError`.
    """
    import fiftyone as fo

    if value is None:
        return []
    if isinstance(value, fo.Detection):
        value = fo.Detections(detections=[value])
    if not isinstance(value, fo.Detections):
        raise OptionError(
            f"Exemplar boxes come from a Detections field, but {field!r} holds {type(value).__name__}."
        )
    boxes = [d.bounding_box for d in value.detections if d.bounding_box is not None]
    for box in boxes:
        if len(box) != 4 or not all(math.isfinite(v) for v in box):
            raise OptionError(
                f"Exemplar box {list(box)} in {field!r} is not four finite numbers [x, y, w, h]: fix or "
                "remove that detection."
            )
    return [pixel_box(b, image_size) for b in boxes if b[2] > 0 and b[3] > 0]


def to_result(detections, image_size: tuple[int, int]):
    """`fo.Detections` (ours or anyone's) back to a `SegmentationResult`, e.g. for `render.overlay`.

    Masks are decoded by FiftyOne itself (`Detection.to_segmentation`), so masks of any stored
    size land where the App draws them.
    """
    from promptseg.results import Instance, SegmentationResult

    height, width = image_size
    instances = []
    for detection in detections.detections if detections is not None else []:
        if detection.bounding_box is None or not detection.has_mask:
            continue
        x, y, w, h = detection.bounding_box
        box = (int(x * width), int(y * height), int((x + w) * width), int((y + h) * height))
        full = detection.to_segmentation(frame_size=(width, height), target=1).mask.astype(bool)
        phrase = detection.get_attribute_value("phrase", None) if detection.has_attribute("phrase") else None
        instances.append(Instance(
            label=detection.label or "", score=float(detection.confidence or 0.0), box=box,
            mask=full[box[1] : box[3], box[0] : box[2]], phrase=phrase,
        ))
    labels = list(dict.fromkeys(inst.label for inst in instances))
    return SegmentationResult(instances=instances, image_size=(height, width), prompts=labels)


BOX_PROMPT_LABELS = ("Detection", "Detections")
"""A prompt field holding these labels gives boxes (one object each), as FiftyOne's SAM zoo models read it."""

OBJECT_LABEL = "object"
"""The label of an object whose prompt box has none."""


def holds_boxes(value: Any) -> bool:
    """Whether a prompt field's value is boxes (`fo.Detection(s)`) rather than text."""
    import fiftyone as fo

    return isinstance(value, (fo.Detection, fo.Detections))


def box_count(value: Any) -> int:
    """How many detections (prompt boxes) a `fo.Detection(s)` value holds (0 for None)."""
    import fiftyone as fo

    if value is None:
        return 0
    return 1 if isinstance(value, fo.Detection) else len(value.detections)


def box_prompts_from_value(value: Any, image_size: tuple[int, int]) -> list[tuple[str, list[float] | None]]:
    """``(label, pixel xyxy box)`` per detection of a `fo.Detections` (or `fo.Detection`) value.

    The box is FiftyOne's relative ``[x, y, w, h]`` in the image's pixels (None when the detection
    has no box); whether it is usable (finite, not empty, on the image) is the core's to check.
    """
    import fiftyone as fo

    if value is None:
        return []
    detections = [value] if isinstance(value, fo.Detection) else list(value.detections)
    prompts = []
    for detection in detections:
        box = detection.bounding_box
        pixels = pixel_box(box, image_size) if box is not None and len(box) == 4 else None
        prompts.append((detection.label or OBJECT_LABEL, pixels))
    return prompts
