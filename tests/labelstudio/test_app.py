"""The ML backend protocol, driven in-process with Flask's test client and the tiny SAM 3."""

from __future__ import annotations

import base64
import threading

import numpy as np
import pytest

from lshelpers import CONFIGS, THRESHOLD, decode_brush, region_label


def predict(client, config, images, project="1.1000", context=None):
    tasks = [{"id": i + 1, "data": {"image": image}} for i, image in enumerate(images)]
    body = {"tasks": tasks, "project": project, "label_config": config, "params": {"context": context}}
    response = client.post("/predict", json=body)
    assert response.status_code == 200, response.get_data(as_text=True)
    return response.json["results"]


def textarea(text):
    return {"result": [{"type": "textarea", "from_name": "prompt", "to_name": "image", "value": {"text": [text]}}]}


def core_result(ls_model, ls_image_root, name, prompts):
    return ls_model.segmenter.segment(str(ls_image_root / name), prompts, threshold=THRESHOLD)


def test_health_reports_model_and_status(client):
    body = client.get("/health").json
    assert body["status"] == "UP"
    assert body["model_class"] == "PromptsegMLBackend"
    assert body["model_version"].startswith("promptseg-")
    assert client.get("/").json["status"] == "UP"


def test_the_old_class_name_imports_with_a_deprecation_warning():
    import promptseg_labelstudio
    from promptseg_labelstudio.model import PromptsegMLBackend

    with pytest.warns(DeprecationWarning, match="PromptsegMLBackend"):
        from promptseg_labelstudio.model import PromptsegModel
    assert PromptsegModel is PromptsegMLBackend
    with pytest.warns(DeprecationWarning, match="PromptsegMLBackend"):
        assert promptseg_labelstudio.PromptsegModel is PromptsegMLBackend
    assert "PromptsegModel" not in promptseg_labelstudio.__all__


def test_backends_with_the_same_settings_share_one_loaded_model(ls_model):
    from promptseg.sessions import shared_segmenter
    from promptseg_labelstudio.model import PromptsegMLBackend

    config = ls_model.config
    assert PromptsegMLBackend(config).segmenter is ls_model.segmenter
    assert shared_segmenter(config.model, device=config.device, dtype=config.dtype,
                            cache_dir=config.cache_dir) is ls_model.segmenter


def test_setup_returns_model_version(client, ls_model):
    response = client.post("/setup", json={"project": "7.1", "schema": CONFIGS["brush"], "extra_params": {}})
    assert response.status_code == 200
    assert response.json == {"model_version": ls_model.model_version}


def test_brush_masks_equal_core_masks_pixel_for_pixel(client, ls_model, ls_image_root):
    [prediction] = predict(client, CONFIGS["brush"], ["image0.png"])
    # label "dog" is prompted by its hint "small dog"
    result = core_result(ls_model, ls_image_root, "image0.png", ["cat", "small dog"])
    assert len(result) > 0
    regions = prediction["result"]
    assert len(regions) == len(result)
    labels = {"cat": "cat", "small dog": "dog"}
    for region, inst in zip(regions, result.instances):
        assert region["type"] == "brushlabels" and region["from_name"] == "tag" and region["to_name"] == "image"
        assert (region["original_height"], region["original_width"]) == result.image_size
        assert region_label(region) == labels[inst.label]
        assert region["score"] == pytest.approx(inst.score)
        np.testing.assert_array_equal(decode_brush(region), inst.full_mask(*result.image_size))
    assert prediction["score"] == pytest.approx(max(i.score for i in result.instances))


def test_a_hint_with_loose_white_space_still_labels_every_instance(client, ls_model, ls_image_root):
    config = CONFIGS["brush"].replace('hint="small dog"', 'hint="  small \t dog "')
    [prediction] = predict(client, config, ["image0.png"])
    result = core_result(ls_model, ls_image_root, "image0.png", ["cat", "small dog"])
    assert {inst.label for inst in result.instances} == {"cat", "small dog"}
    assert [region_label(region) for region in prediction["result"]] == [
        {"cat": "cat", "small dog": "dog"}[inst.label] for inst in result.instances
    ]


def test_rectangles_are_tight_mask_boxes_in_percent(client, ls_model, ls_image_root):
    [prediction] = predict(client, CONFIGS["rectangle"], ["image1.png"])
    result = core_result(ls_model, ls_image_root, "image1.png", ["cat", "dog"])
    height, width = result.image_size
    assert len(prediction["result"]) == len(result) > 0
    for region, inst in zip(prediction["result"], result.instances):
        value = region["value"]
        assert region["type"] == "rectanglelabels" and value["rectanglelabels"] == [inst.label]
        x0, y0 = round(value["x"] * width / 100), round(value["y"] * height / 100)
        x1, y1 = round((value["x"] + value["width"]) * width / 100), round((value["y"] + value["height"]) * height / 100)
        assert (x0, y0, x1, y1) == inst.box


def test_polygons_are_core_contours_in_percent(client, ls_model, ls_image_root):
    [prediction] = predict(client, CONFIGS["polygon"], ["image2.png"])
    result = core_result(ls_model, ls_image_root, "image2.png", ["cat", "dog"])
    height, width = result.image_size
    expected = [(inst.label, poly) for inst, polys in zip(result.instances, result.to_polygons()) for poly in polys]
    assert len(prediction["result"]) == len(expected) > 0
    for region, (label, poly) in zip(prediction["result"], expected):
        assert region["type"] == "polygonlabels" and region["value"]["polygonlabels"] == [label]
        assert region["value"]["closed"] is True
        points = np.asarray(region["value"]["points"]) * (width / 100, height / 100)
        np.testing.assert_allclose(points, poly, atol=1e-9)


def test_labels_with_rectangle_tool_give_merged_regions(client, ls_model, ls_image_root):
    [prediction] = predict(client, CONFIGS["labels+rectangle"], ["image3.png"])
    result = core_result(ls_model, ls_image_root, "image3.png", ["cat"])
    assert len(prediction["result"]) == len(result) > 0
    for region in prediction["result"]:
        assert region["from_name"] == "lab" and region["type"] == "rectanglelabels"
        assert region["value"]["rectanglelabels"] == ["cat"]


def test_config_with_two_outputs_fills_both(client, ls_model, ls_image_root):
    config = ('<View><Image name="image" value="$image"/><BrushLabels name="b" toName="image"><Label value="cat"/>'
              '</BrushLabels><RectangleLabels name="r" toName="image"><Label value="cat"/></RectangleLabels></View>')
    [prediction] = predict(client, config, ["image0.png"])
    result = core_result(ls_model, ls_image_root, "image0.png", ["cat"])
    types = [r["type"] for r in prediction["result"]]
    assert types.count("brushlabels") == types.count("rectanglelabels") == len(result) > 0


def test_interactive_prompt_maps_to_label_and_reuses_embedding(client, ls_model, ls_image_root):
    predict(client, CONFIGS["brush"], ["image1.png"])  # the image is seen once
    runs = ls_model.segmenter.stats.image_encoder_runs
    [prediction] = predict(client, CONFIGS["brush"], ["image1.png"], context=textarea("fluffy cat"))
    assert ls_model.segmenter.stats.image_encoder_runs == runs
    result = core_result(ls_model, ls_image_root, "image1.png", ["fluffy cat"])
    assert len(prediction["result"]) == len(result) > 0
    for region, inst in zip(prediction["result"], result.instances):
        assert region_label(region) == "cat"
        assert region["score"] == pytest.approx(inst.score)
        np.testing.assert_array_equal(decode_brush(region), inst.full_mask(*result.image_size))


def test_interactive_prompt_naming_no_label_is_a_task_error(client):
    [prediction] = predict(client, CONFIGS["brush"], ["image0.png"], context=textarea("bicycle"))
    assert "result" not in prediction
    assert "names none of the labels [cat, dog]" in prediction["error"]


def test_interactive_request_without_text_is_a_task_error(client):
    context = {"result": [{"type": "choices", "from_name": "mood", "to_name": "image", "value": {"choices": ["happy"]}}]}
    [prediction] = predict(client, CONFIGS["brush"], ["image0.png"], context=context)
    assert "type what to segment in the TextArea 'prompt'" in prediction["error"]


def test_extra_params_override_default_threshold(make_app, ls_image_root):
    client = make_app().test_client()
    setup = client.post("/setup", json={"project": "42.5", "schema": CONFIGS["brush"], "extra_params": {"threshold": 0.99}})
    assert setup.status_code == 200
    [high] = predict(client, CONFIGS["brush"], ["image0.png"], project="42.5")
    [default] = predict(client, CONFIGS["brush"], ["image0.png"], project="43.5")
    assert high["result"] == [] and len(default["result"]) > 0


def test_unknown_extra_param_names_the_valid_ones(client):
    response = client.post("/setup", json={"project": "1.1", "schema": CONFIGS["brush"], "extra_params": {"min_aera": 5}})
    assert response.status_code == 422
    error = response.json["error"]
    assert "Did you mean 'min_area'" in error and "polygon_tolerance" in error and "threshold, mask_threshold" in error


def test_backend_defaults_are_the_cores(monkeypatch):
    from promptseg.options import SegmentOptions
    from promptseg_labelstudio.config import BackendConfig

    monkeypatch.delenv("PROMPTSEG_THRESHOLD", raising=False)
    assert BackendConfig().segment_options == SegmentOptions()
    assert BackendConfig.from_env().segment_options == SegmentOptions()
    monkeypatch.setenv("PROMPTSEG_THRESHOLD", "0.3")
    assert BackendConfig.from_env().segment_options == SegmentOptions.from_flat(threshold=0.3)


@pytest.mark.parametrize("extra", [
    {"min_area": "largest"},  # filled in below: the area of the largest instance
    {"iou_threshold": None, "cross_prompt_iou": None},
    {"tile": 64, "max_instances": 2},
], ids=["min_area", "no-dedupe", "tiled"])
def test_any_core_option_in_extra_params_reaches_the_core(make_app, ls_model, ls_image_root, extra):
    prompts = ["cat", "small dog"]
    everything = core_result(ls_model, ls_image_root, "image0.png", prompts)
    if extra.get("min_area") == "largest":
        extra = {"min_area": max(inst.area for inst in everything.instances)}
    expected = ls_model.segmenter.segment(str(ls_image_root / "image0.png"), prompts, threshold=THRESHOLD, **extra)
    assert 0 < len(expected) != len(everything), "the option changes what the core finds"
    client = make_app().test_client()
    assert client.post("/setup", json={"project": "51.1", "schema": CONFIGS["brush"], "extra_params": extra}).status_code == 200
    [prediction] = predict(client, CONFIGS["brush"], ["image0.png"], project="51.1")
    regions = prediction["result"]
    assert len(regions) == len(expected)
    for region, inst in zip(regions, expected.instances):
        np.testing.assert_array_equal(decode_brush(region), inst.full_mask(*expected.image_size))


def test_default_threshold_comes_from_environment(monkeypatch):
    from promptseg_labelstudio.config import BackendConfig

    monkeypatch.setenv("PROMPTSEG_THRESHOLD", "0.3")
    assert BackendConfig.from_env().threshold == 0.3
    monkeypatch.setenv("PROMPTSEG_THRESHOLD", "3")
    with pytest.raises(Exception, match="between 0 and 1"):
        BackendConfig.from_env()


@pytest.mark.parametrize("extra, message", [
    ({"threshold": 2}, "threshold must be a number between 0 and 1"),
    ({"min_area": "lots"}, "min_area must be a whole number of pixels >= 0, got 'lots'"),
    ("not json", "must be a JSON object"),
    ({"thresold": 0.3}, "Unknown option 'thresold'"),
    ({"polygon_tolerance": -1}, "'polygon_tolerance' must be a number >= 0"),
    ({"verify": True, "negative": "toy cat"}, "verify, negative need a CLIP model, which this backend does not load"),
])
def test_bad_extra_params_are_rejected_at_setup(client, extra, message):
    response = client.post("/setup", json={"project": "1.1", "schema": CONFIGS["brush"], "extra_params": extra})
    assert response.status_code == 422
    assert message in response.json["error"]


@pytest.mark.parametrize("kwargs, status, message", [
    ({"data": "not json", "content_type": "text/plain"}, 400, "must be a JSON object"),
    ({"json": [1, 2]}, 400, "must be a JSON object"),
    ({"json": {"label_config": CONFIGS["brush"]}}, 400, "'tasks' must be a non-empty list"),
    ({"json": {"tasks": "x", "label_config": CONFIGS["brush"]}}, 400, "'tasks' must be a non-empty list"),
    ({"json": {"tasks": [{"id": 1, "data": {}}]}}, 400, "no labeling config"),
    ({"json": {"tasks": [{"id": 1}], "label_config": "<View><Image"}}, 400, "cannot be parsed"),
])
def test_malformed_predict_requests_get_clear_400s(client, kwargs, status, message):
    response = client.post("/predict", **kwargs)
    assert response.status_code == status
    assert message in response.json["error"]
    assert client.get("/health").json["status"] == "UP"


@pytest.mark.parametrize("config, message", [
    ('<View><Text name="t" value="$text"/><Choices name="c" toName="t"><Choice value="a"/></Choices></View>', "no <Image> tag"),
    ('<View><Image name="image" value="$image"/><Choices name="c" toName="image"><Choice value="a"/></Choices></View>',
     "nothing to fill in"),
    ('<View><Image name="image" value="$image"/><BrushLabels name="b" toName="image"></BrushLabels></View>',
     "nothing to fill in"),
])
def test_unknown_configs_are_rejected(client, config, message):
    setup = client.post("/setup", json={"project": "1.1", "schema": config})
    assert setup.status_code == 400 and message in setup.json["error"]
    response = client.post("/predict", json={"tasks": [{"id": 1, "data": {"image": "image0.png"}}], "label_config": config})
    assert response.status_code == 400 and message in response.json["error"]


def test_bad_task_fails_alone(client, ls_image_root):
    tasks = [{"id": 1, "data": {"image": "image0.png"}}, {"id": 2, "data": {"picture": "image0.png"}},
             {"id": 3, "data": {"image": "missing.png"}}, {"id": 4}, "junk", {"id": 6, "data": {"image": "image1.png"}}]
    response = client.post("/predict", json={"tasks": tasks, "label_config": CONFIGS["brush"]})
    results = response.json["results"]
    assert len(results) == len(tasks)
    assert len(results[0]["result"]) > 0 and len(results[5]["result"]) > 0
    assert "no 'image' field" in results[1]["error"]
    assert "No such image file" in results[2]["error"]
    assert "'data' object" in results[3]["error"] and "'data' object" in results[4]["error"]
    for failed in results[1:5]:
        assert "result" not in failed  # so Label Studio stores no empty prediction for it


def test_unexpected_failure_in_one_task_is_reported_and_server_keeps_running(client, ls_model, monkeypatch):
    original = ls_model.segmenter.segment

    def flaky(image, prompts, **options):
        if str(image).endswith("image2.png"):
            raise RuntimeError("out of memory")
        return original(image, prompts, **options)

    monkeypatch.setattr(ls_model.segmenter, "segment", flaky)
    results = predict(client, CONFIGS["brush"], ["image2.png", "image0.png"])
    assert results[0]["error"] == "task 1: unexpected RuntimeError: out of memory"
    assert len(results[1]["result"]) > 0
    assert client.get("/health").status_code == 200


@pytest.mark.parametrize("url, message", [
    ("http://169.254.169.254/latest/meta-data/x.png", "is not allowed"),
    ("https://example.com/cat.png", "is not allowed"),
    ("ftp://example.com/cat.png", "scheme 'ftp' is not supported"),
    ("gopher://127.0.0.1:6379/_x", "scheme 'gopher' is not supported"),
    ("data:image/png;base64,AAAA", "data: URLs are not supported"),
])
def test_forbidden_urls_are_refused(client, url, message):
    [prediction] = predict(client, CONFIGS["brush"], [url])
    assert message in prediction["error"]


def test_storage_urls_need_label_studio_credentials(client):
    [prediction] = predict(client, CONFIGS["brush"], ["/data/upload/1/cat.png"])
    assert "set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY" in prediction["error"]


@pytest.mark.parametrize("path, message", [
    ("../../../etc/passwd", "climbs out of the document root"),
    ("sub/../../outside.png", "climbs out of the document root"),
    ("/etc/passwd", "outside the document root"),
    ("file:///etc/passwd", "outside the document root"),
])
def test_path_traversal_is_refused(client, path, message):
    [prediction] = predict(client, CONFIGS["brush"], [path])
    assert message in prediction["error"]


def test_symlink_out_of_document_root_is_refused(client, ls_image_root, tmp_path):
    outside = tmp_path / "secret.png"
    outside.write_bytes((ls_image_root / "image0.png").read_bytes())
    link = ls_image_root / "link.png"
    link.symlink_to(outside)
    try:
        [prediction] = predict(client, CONFIGS["brush"], ["link.png"])
    finally:
        link.unlink()
    assert "outside the document root" in prediction["error"]


def test_paths_inside_document_root_work_relative_absolute_and_nested(client, ls_image_root):
    for image in ["image0.png", str(ls_image_root / "image0.png"), f"file://{ls_image_root}/sub/nested.png"]:
        [prediction] = predict(client, CONFIGS["brush"], [image])
        assert len(prediction["result"]) > 0, prediction


def test_local_paths_are_off_without_document_root(make_app):
    client = make_app(document_root=None).test_client()
    [prediction] = predict(client, CONFIGS["brush"], ["image0.png"])
    assert "local paths are disabled: set LOCAL_FILES_DOCUMENT_ROOT" in prediction["error"]


def test_local_storage_urls_are_confined_to_document_root(make_app):
    client = make_app(label_studio_url="http://127.0.0.1:9", api_key="token").test_client()
    [ok] = predict(client, CONFIGS["brush"], ["/data/local-files/?d=sub/nested.png"])
    assert len(ok["result"]) > 0
    [escape] = predict(client, CONFIGS["brush"], ["/data/local-files/?d=../../etc/passwd"])
    assert "climbs out of the document root" in escape["error"]


def test_basic_auth_guards_every_endpoint(make_app):
    client = make_app(basic_auth_user="ls", basic_auth_pass="s3cret").test_client()
    assert client.get("/health").status_code == 401
    wrong = base64.b64encode(b"ls:nope").decode()
    assert client.get("/health", headers={"Authorization": f"Basic {wrong}"}).status_code == 401
    assert client.post("/predict", json={}).status_code == 401
    good = base64.b64encode(b"ls:s3cret").decode()
    assert client.get("/health", headers={"Authorization": f"Basic {good}"}).status_code == 200


def test_oversized_request_is_refused(make_app):
    client = make_app(max_request_bytes=4096).test_client()
    tasks = [{"id": i, "data": {"image": "image0.png"}} for i in range(200)]
    response = client.post("/predict", json={"tasks": tasks, "label_config": CONFIGS["brush"]})
    assert response.status_code == 413
    assert "Too Large" in response.json["error"]


def test_webhook_train_and_versions_are_acknowledged(client, ls_model):
    webhook = client.post("/webhook", json={"action": "ANNOTATION_CREATED", "project": {"id": 1}})
    assert webhook.status_code == 200 and webhook.json["status"] == "ok"
    assert client.post("/train", json={"project": "1.1"}).json["status"] == "ok"
    assert client.get("/versions").json == {"versions": [ls_model.model_version]}
    assert client.get("/nowhere").status_code == 404
    assert client.get("/predict").status_code == 405


def test_concurrent_requests_return_the_same_as_serial(make_app):
    app = make_app()
    images = [f"image{i % 4}.png" for i in range(8)]
    serial = {image: predict(app.test_client(), CONFIGS["brush"], [image])[0]["result"] for image in set(images)}
    outcome, errors = {}, []

    def worker(index, image):
        try:
            outcome[index] = predict(app.test_client(), CONFIGS["brush"], [image])[0]["result"]
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i, image)) for i, image in enumerate(images)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors and len(outcome) == len(images)
    strip = lambda regions: [{k: v for k, v in r.items() if k != "id"} for r in regions]  # noqa: E731
    for index, image in enumerate(images):
        assert strip(outcome[index]) == strip(serial[image])


def test_label_studio_project_ids_share_settings(client):
    from promptseg_labelstudio.model import _project_key

    assert _project_key("12.1700000000") == _project_key(12) == "12"


def test_serve_command_is_registered_with_its_options():
    from promptseg.cli import build_parser
    from promptseg_labelstudio._commands import run_serve

    args = build_parser().parse_args(["labelstudio", "serve", "--host", "127.0.0.1", "--port", "9191", "--model", "m"])
    assert (args.host, args.port, args.model, args.func) == ("127.0.0.1", 9191, "m", run_serve)


def test_wsgi_entry_builds_the_app_lazily_from_the_environment(monkeypatch, tiny_sam3_dir, ls_image_root):
    import importlib

    monkeypatch.setenv("PROMPTSEG_MODEL", str(tiny_sam3_dir))
    monkeypatch.setenv("PROMPTSEG_DEVICE", "cpu")
    monkeypatch.setenv("PROMPTSEG_THRESHOLD", "0.0")
    monkeypatch.setenv("LOCAL_FILES_DOCUMENT_ROOT", str(ls_image_root))
    wsgi = importlib.reload(importlib.import_module("promptseg_labelstudio._wsgi"))
    client = wsgi.app.test_client()
    assert wsgi.app is wsgi.app
    [prediction] = predict(client, CONFIGS["rectangle"], ["image0.png"])
    assert len(prediction["result"]) > 0


def test_the_docs_options_table_names_every_core_option():
    import re
    from pathlib import Path

    from promptseg.options import SegmentOptions

    text = (Path(__file__).parents[2] / "docs" / "labelstudio.md").read_text()
    table = text[text.index("## Options"):text.index("## Labeling configs")]
    assert set(SegmentOptions.names()) <= set(re.findall(r"`([a-z_]+)`", table))
