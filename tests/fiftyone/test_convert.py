"""Box and prompt mapping between FiftyOne's relative boxes/labels and the core's pixel types."""

from __future__ import annotations

import numpy as np
import pytest

from promptseg.errors import OptionError, PromptError
from promptseg_fiftyone.convert import exemplars_from_value, pixel_box, prompts_from_value, relative_box


def test_relative_box_lands_on_the_same_pixels_under_fiftyones_rounding():
    rng = np.random.default_rng(3)
    for _ in range(5000):
        height, width = (int(v) for v in rng.integers(1, 5000, 2))
        x0, x1 = sorted(int(v) for v in rng.choice(width + 1, 2, replace=False))
        y0, y1 = sorted(int(v) for v in rng.choice(height + 1, 2, replace=False))
        x, y, w, h = relative_box((x0, y0, x1, y1), (height, width))
        # FiftyOne (eta BoundingBox.coords_in) truncates relative * size to int.
        assert (int(x * width), int(y * height), int((x + w) * width), int((y + h) * height)) == (x0, y0, x1, y1)
        assert abs(x - x0 / width) < 1e-12 and abs(w - (x1 - x0) / width) < 1e-12


def test_pixel_box_converts_relative_xywh_to_pixel_xyxy():
    assert pixel_box([0.25, 0.5, 0.5, 0.25], (200, 400)) == [100.0, 100.0, 300.0, 150.0]


def test_prompts_come_from_strings_lists_and_labels(fo):
    assert prompts_from_value("red car") == ["red car"]
    assert prompts_from_value(["cat", "dog"]) == ["cat", "dog"]
    assert prompts_from_value(None) == [] and prompts_from_value("  ") == []
    assert prompts_from_value(fo.Classification(label="cell")) == ["cell"]
    classes = fo.Classifications(classifications=[fo.Classification(label="a"), fo.Classification(label="b")])
    assert prompts_from_value(classes) == ["a", "b"]
    boxes = fo.Detections(detections=[fo.Detection(label="car", bounding_box=[0, 0, 0.1, 0.1])])
    assert prompts_from_value(boxes) == ["car"]
    with pytest.raises(PromptError, match="Cannot read prompts from 'weight'"):
        prompts_from_value(3.5, "weight")


def test_exemplars_need_detections_and_drop_empty_boxes(fo):
    boxes = fo.Detections(detections=[
        fo.Detection(label="car", bounding_box=[0.1, 0.2, 0.3, 0.4]),
        fo.Detection(label="car", bounding_box=[0.5, 0.5, 0.0, 0.1]),
    ])
    (box,) = exemplars_from_value(boxes, (100, 200))
    assert box == pytest.approx([20.0, 20.0, 80.0, 60.0])
    with pytest.raises(OptionError, match="Detections field"):
        exemplars_from_value(fo.Classification(label="x"), (10, 10), "gt")
