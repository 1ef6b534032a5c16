"""A `SegmentationResult` as Label Studio regions: brush RLE, polygons and boxes in percent.

Label Studio stores geometry as percentages of the original image size (``original_width``,
``original_height``); brush masks use its own RLE, encoded by label-studio-sdk's codec.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable

import numpy as np

from promptseg.results import Instance, SegmentationResult
from promptseg_labelstudio.labeling import Output


def regions_for(
    result: SegmentationResult,
    outputs: Iterable[Output],
    label_of: Callable[[Instance], str | None],
    polygon_tolerance: float = 0.0,
) -> list[dict]:
    """Regions for every instance on every output whose labels contain the instance's label."""
    height, width = result.image_size
    polygons = None
    regions = []
    for output in outputs:
        for index, inst in enumerate(result.instances):
            label = label_of(inst)
            if label is None or label not in output.labels:
                continue
            if output.geometry == "brush":
                values = [brush_value(inst, height, width)]
            elif output.geometry == "rectangle":
                values = [rectangle_value(inst, height, width)]
            else:
                if polygons is None:
                    polygons = result.to_polygons(polygon_tolerance)
                values = [polygon_value(points, height, width) for points in polygons[index]]
            for value in values:
                value[output.result_type] = [label]
                regions.append({
                    "id": uuid.uuid4().hex[:10],
                    "from_name": output.from_name,
                    "to_name": output.to_name,
                    "type": output.result_type,
                    "original_width": width,
                    "original_height": height,
                    "image_rotation": 0,
                    "value": value,
                    "score": float(inst.score),
                })
    return regions


def brush_value(inst: Instance, height: int, width: int) -> dict:
    """The instance's full-size mask in Label Studio's brush RLE."""
    from label_studio_sdk.converter.brush import mask2rle

    mask = inst.full_mask(height, width).astype(np.uint8) * 255
    return {"format": "rle", "rle": [int(v) for v in mask2rle(mask)]}


def rectangle_value(inst: Instance, height: int, width: int) -> dict:
    """The tight mask box (x1/y1 exclusive) in percent."""
    x0, y0, x1, y1 = inst.box
    return {
        "x": 100.0 * x0 / width,
        "y": 100.0 * y0 / height,
        "width": 100.0 * (x1 - x0) / width,
        "height": 100.0 * (y1 - y0) / height,
        "rotation": 0,
    }


def polygon_value(points: np.ndarray, height: int, width: int) -> dict:
    """One closed contour, pixel ``(x, y)`` vertices to percent."""
    scaled = np.asarray(points, dtype=np.float64) * (100.0 / width, 100.0 / height)
    return {"points": scaled.tolist(), "closed": True}
