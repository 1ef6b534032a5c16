"""Result conversions: label image, COCO RLE (pycocotools), polygons, smoothing, NMS."""

from __future__ import annotations

import numpy as np
from pycocotools import mask as mask_utils

from promptseg.masks import mask_nms, postprocess, smooth_instance
from promptseg.options import CleanupOptions
from promptseg.results import Instance, SegmentationResult


def make_instance(label, score, full_mask):
    ys, xs = np.nonzero(full_mask)
    x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
    return Instance(label=label, score=score, box=(int(x0), int(y0), int(x1), int(y1)), mask=full_mask[y0:y1, x0:x1].copy())


def disc(shape, center, radius):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - center[0]) ** 2 + (xx - center[1]) ** 2 <= radius**2


def test_label_image_coco_and_polygons_round_trip():
    shape = (60, 90)
    a, b = disc(shape, (20, 20), 10), disc(shape, (40, 60), 12)
    result = SegmentationResult([make_instance("cat", 0.9, a), make_instance("dog", 0.8, b)], shape, ["cat", "dog"])
    labels = result.to_label_image()
    assert np.array_equal(labels == 1, a) and np.array_equal(labels == 2, b)
    coco = result.to_coco(image_id=7)
    assert [r["category_id"] for r in coco] == [1, 2] and coco[0]["image_id"] == 7
    for record, full in zip(coco, (a, b)):
        rle = dict(record["segmentation"], counts=record["segmentation"]["counts"].encode())
        assert np.array_equal(mask_utils.decode(rle).astype(bool), full)
        assert record["area"] == full.sum()
    polygons = result.to_polygons()
    assert len(polygons) == 2 and all(len(p) == 1 for p in polygons)
    xs, ys = polygons[1][0][:, 0], polygons[1][0][:, 1]
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (48, 72, 28, 52)


def test_label_image_draws_higher_scores_on_top():
    shape = (30, 30)
    low = make_instance("a", 0.3, disc(shape, (15, 15), 10))
    high = make_instance("b", 0.9, disc(shape, (15, 15), 5))
    labels = SegmentationResult([high, low], shape, ["a", "b"]).to_label_image()
    assert labels[15, 15] == 1 and labels[15, 8] == 2 and labels[15, 2] == 0


def test_smoothing_closes_holes_and_stays_in_the_image():
    shape = (40, 40)
    ring = disc(shape, (20, 20), 12) & ~disc(shape, (20, 20), 2)
    smoothed = smooth_instance(make_instance("x", 1.0, ring), 3, shape)
    assert smoothed.full_mask(*shape)[20, 20]
    edge = disc(shape, (0, 0), 8)
    at_edge = smooth_instance(make_instance("x", 1.0, edge), 4, shape)
    assert at_edge.box[0] >= 0 and at_edge.box[1] >= 0 and np.array_equal(at_edge.full_mask(*shape), edge)


def test_nms_per_prompt_and_across_prompts():
    shape = (50, 50)
    big = disc(shape, (25, 25), 15)
    almost = disc(shape, (25, 26), 15)
    insts = [make_instance("cat", 0.9, big), make_instance("cat", 0.8, almost), make_instance("dog", 0.7, almost)]
    per_prompt = mask_nms(insts, 0.7, per_label=True)
    assert [i.score for i in per_prompt] == [0.9, 0.7]
    assert [i.label for i in postprocess(insts, shape, CleanupOptions(iou_threshold=0.7, cross_prompt_iou=0.7))] == ["cat"]
    assert len(postprocess(insts, shape, CleanupOptions(iou_threshold=None, cross_prompt_iou=None))) == 3
