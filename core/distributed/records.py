"""Compact, JSON-ready records of one image's segmentation, and back.

A record is what a distributed run sends from its workers: a plain dict (masks as COCO RLE of the
full image, pycocotools), small enough to stream and to store, keyed by the item's id. It holds
everything `SegmentationResult` holds except `info`'s non-JSON values and `alternatives`, so the
writers that take a result (label PNGs, COCO, JSON) give the same files from a record.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from promptseg.results import Instance, SegmentationResult


def result_to_record(item_id: str, result: SegmentationResult, segmenter: dict[str, str] | None = None) -> dict[str, Any]:
    """The record of `result` for item `item_id`; `segmenter` is the `Segmenter.describe()` that made it."""
    record = result.to_dict()
    for entry, instance in zip(record["instances"], result.instances):
        entry["model_box"] = None if instance.model_box is None else [float(v) for v in instance.model_box]
    record.update(id=item_id, error=result.error, segmenter=dict(segmenter or {}), info=_json_safe(result.info))
    return record


def error_record(item_id: str, source: str | None, message: str, segmenter: dict[str, str] | None = None) -> dict[str, Any]:
    """The record of an item that could not be segmented (unreadable, corrupt, over the pixel budget)."""
    return {"id": item_id, "source": source, "image_size": [0, 0], "prompts": [], "embedding_source": None,
            "instances": [], "error": message, "segmenter": dict(segmenter or {}), "info": {}}


def record_to_result(record: dict[str, Any]) -> SegmentationResult:
    """The `SegmentationResult` a record was made from: masks decoded and cropped to their boxes.

    Also reads the JSON files ``promptseg segment --format json`` writes (`SegmentationResult.to_dict`).
    """
    from pycocotools import mask as mask_utils

    instances = []
    for entry in record["instances"]:
        x0, y0, x1, y1 = entry["box"]
        rle = dict(entry["segmentation"])
        rle["counts"] = rle["counts"].encode("ascii")
        full = mask_utils.decode(rle).astype(bool)
        known = {"label", "phrase", "score", "box", "area", "segmentation", "model_box"}
        instances.append(Instance(
            label=entry["label"], score=float(entry["score"]), box=(x0, y0, x1, y1),
            mask=np.ascontiguousarray(full[y0:y1, x0:x1]),
            model_box=None if entry.get("model_box") is None else tuple(entry["model_box"]),
            phrase=entry.get("phrase"), extra={k: v for k, v in entry.items() if k not in known},
        ))
    return SegmentationResult(
        instances=instances, image_size=tuple(record["image_size"]), prompts=list(record["prompts"]),
        embedding_source=record.get("embedding_source") or "computed", source=record.get("source"),
        info={**record.get("info", {}), "segmenter": record.get("segmenter", {}), "id": record.get("id")},
        error=record.get("error"),
    )


def _json_safe(info: dict[str, Any]) -> dict[str, Any]:
    """The entries of `info` that survive JSON unchanged (the rest are run details of one process)."""
    safe = {}
    for key, value in info.items():
        try:
            if json.loads(json.dumps(value)) == value:
                safe[key] = value
        except (TypeError, ValueError):
            continue
    return safe
