"""Interactive clicks and boxes: KeyPointLabels and RectangleLabels in the context give one object's
brush region, equal to the core's `segment_object` for the same pixel prompts."""

from __future__ import annotations

import numpy as np
import pytest

from lshelpers import CONFIGS, THRESHOLD, decode_brush, make_image, region_label

HEIGHT, WIDTH = make_image(0).shape[:2]


@pytest.fixture
def hub_client(ls_hub_model):
    from promptseg_labelstudio.app import create_app

    return create_app(ls_hub_model).test_client()


def keypoint(x, y, positive=True, label="cat"):
    """A smart keypoint as Label Studio sends it: percent of the image, ``is_positive``."""
    return {"type": "keypointlabels", "from_name": "kp", "to_name": "image", "is_positive": positive,
            "original_width": WIDTH, "original_height": HEIGHT,
            "value": {"x": x, "y": y, "width": 0.5, "keypointlabels": [label]}}


def rectangle(x, y, width, height, label="cat"):
    return {"type": "rectanglelabels", "from_name": "rect", "to_name": "image",
            "original_width": WIDTH, "original_height": HEIGHT,
            "value": {"x": x, "y": y, "width": width, "height": height, "rotation": 0, "rectanglelabels": [label]}}


def predict(client, regions, images=("image0.png",), config=CONFIGS["clicks"]):
    tasks = [{"id": i + 1, "data": {"image": image}} for i, image in enumerate(images)]
    body = {"tasks": tasks, "project": "5.1", "label_config": config, "params": {"context": {"result": regions}}}
    response = client.post("/predict", json=body)
    assert response.status_code == 200, response.get_data(as_text=True)
    return response.json["results"]


def core_object(ls_hub_model, ls_image_root, name="image0.png", **prompts):
    return ls_hub_model.segmenter.segment_object(str(ls_image_root / name), threshold=THRESHOLD, **prompts)


def px(x_percent, y_percent):
    return x_percent * WIDTH / 100, y_percent * HEIGHT / 100


CASES = {
    "positive clicks": ([keypoint(30, 40), keypoint(25, 30)],
                        {"points": [px(30, 40), px(25, 30)], "point_labels": [1, 1]}),
    "a negative click": ([keypoint(30, 40), keypoint(75, 65, positive=False)],
                         {"points": [px(30, 40), px(75, 65)], "point_labels": [1, 0]}),
    "a rectangle": ([rectangle(15, 15, 40, 50)], {"box": (*px(15, 15), *px(55, 65))}),
    "click and rectangle": ([keypoint(30, 40), rectangle(15, 15, 40, 50)],
                            {"points": [px(30, 40)], "point_labels": [1], "box": (*px(15, 15), *px(55, 65))}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_clicks_and_boxes_give_the_cores_object_mask(hub_client, ls_hub_model, ls_image_root, case):
    regions, pixel_prompts = CASES[case]
    [prediction] = predict(hub_client, regions)
    expected = core_object(ls_hub_model, ls_image_root, **pixel_prompts)
    [region] = prediction["result"]
    assert region["type"] == "brushlabels" and region["from_name"] == "tag" and region["to_name"] == "image"
    assert region_label(region) == "cat"
    assert (region["original_height"], region["original_width"]) == expected.image_size == (HEIGHT, WIDTH)
    mask = decode_brush(region)
    assert mask.any()
    np.testing.assert_array_equal(mask, expected.instances[0].full_mask(HEIGHT, WIDTH))
    assert prediction["score"] == pytest.approx(expected.instances[0].score)


def test_is_positive_becomes_the_point_label(hub_client, ls_hub_model, monkeypatch):
    """Label Studio's ``is_positive`` (missing: positive) reaches the core as labels 1/0, in pixels."""
    seen = []
    real = ls_hub_model.segmenter.segment_object

    def recording(image, **prompts):
        seen.append(prompts)
        return real(image, **prompts)

    monkeypatch.setattr(ls_hub_model.segmenter, "segment_object", recording)
    unmarked = keypoint(50, 50)
    del unmarked["is_positive"]
    [prediction] = predict(hub_client, [keypoint(30, 40), keypoint(75, 65, positive=False), unmarked])
    assert len(prediction["result"]) == 1
    [prompts] = seen
    assert prompts["point_labels"] == [1, 0, 1]
    np.testing.assert_allclose(prompts["points"], [px(30, 40), px(75, 65), px(50, 50)])
    assert "box" not in prompts


def test_the_region_takes_the_label_of_the_last_click(hub_client):
    [prediction] = predict(hub_client, [keypoint(30, 40, label="cat"), keypoint(70, 60, label="dog")])
    assert region_label(prediction["result"][0]) == "dog"


def test_several_clicks_on_one_task_run_the_image_encoder_once(hub_client, ls_hub_model):
    stats = ls_hub_model.segmenter.stats
    before = stats.image_encoder_runs
    clicks = []
    for x, y in [(20, 20), (30, 40), (45, 35), (60, 70)]:
        clicks.append(keypoint(x, y))
        [prediction] = predict(hub_client, clicks, images=("image2.png",))
        assert len(prediction["result"]) == 1
    assert stats.image_encoder_runs == before + 1


def test_text_context_keeps_the_text_behaviour(hub_client, ls_hub_model, ls_image_root):
    text = {"type": "textarea", "from_name": "prompt", "to_name": "image", "value": {"text": ["dog"]}}
    [prediction] = predict(hub_client, [text], images=("image1.png",))
    result = ls_hub_model.segmenter.segment(str(ls_image_root / "image1.png"), ["dog"], threshold=THRESHOLD)
    brush = [r for r in prediction["result"] if r["type"] == "brushlabels"]
    assert len(brush) == len(result) > 0
    for region, inst in zip(brush, result.instances):
        assert region_label(region) == "dog"
        np.testing.assert_array_equal(decode_brush(region), inst.full_mask(*result.image_size))


def test_clicks_fill_a_polygon_output(hub_client, ls_hub_model, ls_image_root):
    config = CONFIGS["clicks"].replace("BrushLabels", "PolygonLabels")
    [prediction] = predict(hub_client, [keypoint(30, 40)], config=config)
    expected = core_object(ls_hub_model, ls_image_root, points=[px(30, 40)], point_labels=[1])
    contours = expected.to_polygons()[0]
    assert len(prediction["result"]) == len(contours) > 0
    for region, points in zip(prediction["result"], contours):
        assert region["type"] == "polygonlabels" and region_label(region) == "cat"
        np.testing.assert_allclose(region["value"]["points"], np.asarray(points) * (100 / WIDTH, 100 / HEIGHT))


@pytest.mark.parametrize("regions, message", [
    ([keypoint(130, 40)], "'x' is 130%, outside the image"),
    ([keypoint(30, -5)], "'y' is -5%, outside the image"),
    ([keypoint("left", 40)], "must be a number"),
    ([rectangle(20, 20, 0, 30)], "has no area"),
    ([rectangle(20, 20, 30, -1)], "has no area"),
    ([rectangle(120, 20, 10, 10)], "lies off the image"),
    ([keypoint(30, 40, label="bird")], "'bird', which names none of the labels"),
])
def test_bad_clicks_fail_their_task_only(hub_client, regions, message):
    first, second = predict(hub_client, regions, images=("image0.png", "image1.png"))
    for prediction, task in ((first, 1), (second, 2)):
        assert "result" not in prediction
        assert prediction["error"].startswith(f"task {task}:") and message in prediction["error"]
    assert hub_client.get("/health").json["status"] == "UP"


def test_clicks_on_a_detector_only_checkpoint_are_a_task_error(client):
    [prediction] = predict(client, [keypoint(30, 40)])
    assert "result" not in prediction and "facebook/sam3" in prediction["error"]
