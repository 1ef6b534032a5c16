"""End to end against a real Label Studio server: projects of each config type, uploaded images,
the backend connected with ``ls.ml.create``, batch pre-annotation, an interactive prompt, clicks and
a box, and the stored predictions compared with the core's masks pixel for pixel. The model is the
tiny SAM 3 in the hub's layout, whose tracker head answers the clicks. A video project (an uploaded
mp4, ``VideoRectangle``) gets the core's tracks from a backend on the tiny SAM 3 video model.

Label Studio runs from its own virtual environment (its pins conflict with ours): the executable
is `PROMPTSEG_LABEL_STUDIO`, else ``label-studio`` on PATH, else the ``.venv-labelstudio`` that
``bash scripts/install.sh --test`` creates.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import requests
from lshelpers import (
    CONFIGS,
    TOKEN,
    decode_brush,
    free_port,
    make_image,
    region_label,
    running_label_studio,
    start,
    stop,
    wait_for,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]


@pytest.fixture(scope="module")
def label_studio(tmp_path_factory):
    with running_label_studio(tmp_path_factory.mktemp("label-studio")) as url:
        yield url


def backend_cache_dir(tmp_path_factory) -> Path:
    """The embedding cache the backend writes and the reference core reads."""
    return tmp_path_factory.getbasetemp() / "backend-embeddings"


@pytest.fixture(scope="module")
def backend(tiny_sam3_hub_dir, tmp_path_factory):
    """Our backend through its real command, ``promptseg labelstudio serve`` (waitress), in a subprocess.

    No LABEL_STUDIO_URL/API key and the default threshold: the host and token come from Label
    Studio's ``/setup`` call (allowed by PROMPTSEG_TRUST_SETUP_HOST, as basic auth is off), the
    threshold from the project's extra params.
    """
    work = tmp_path_factory.mktemp("backend")
    port = free_port()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("LABEL_STUDIO_", "BASIC_AUTH_")) and k not in ("PROMPTSEG_THRESHOLD", "LOCAL_FILES_DOCUMENT_ROOT")}
    import torch

    # The reference core (fixture `core`) reads the embeddings this backend writes and decodes with as
    # many threads: the same computation on bit-identical inputs, so masks may be compared exactly
    # (see tests/tolerance.py).
    env.update(PROMPTSEG_CACHE_DIR=str(backend_cache_dir(tmp_path_factory)), PROMPTSEG_DEVICE="cpu",
               HF_HUB_OFFLINE="1", PROMPTSEG_TRUST_SETUP_HOST="1", OMP_NUM_THREADS=str(torch.get_num_threads()))
    command = [sys.executable, "-m", "promptseg.cli", "labelstudio", "serve", "--host", "127.0.0.1",
               "--port", str(port), "--model", str(tiny_sam3_hub_dir)]
    log = work / "backend.log"
    process = start(command, env, log)
    try:
        wait_for(f"http://127.0.0.1:{port}/health", process, 180, log)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(process)


@pytest.fixture(scope="module")
def core(tiny_sam3_hub_dir, tmp_path_factory):
    """The core on its own, for the reference masks, on the backend's embeddings."""
    import promptseg

    return promptseg.load_segmenter(str(tiny_sam3_hub_dir), device="cpu", cache_dir=backend_cache_dir(tmp_path_factory))


def make_project(ls, url, kind, images, backend):
    project = ls.projects.create(title=f"promptseg {kind}", label_config=CONFIGS[kind])
    for path in images:  # uploaded files, served by Label Studio
        with open(path, "rb") as handle:
            response = requests.post(f"{url}/api/projects/{project.id}/import", headers={"Authorization": f"Token {TOKEN}"},
                                     files={"file": (path.name, handle, "image/png")}, timeout=60)
        response.raise_for_status()
    tasks = sorted(ls.tasks.list(project=project.id), key=lambda t: t.id)
    assert len(tasks) == len(images)
    ml = ls.ml.create(project=project.id, url=backend, title="promptseg", is_interactive=True,
                      extra_params={"threshold": 0.0})
    return project, tasks, ml


def stored_regions(ls, task_id):
    predictions = list(ls.predictions.list(task=task_id))
    assert len(predictions) == 1, predictions
    assert predictions[0].model_version.startswith("promptseg-")
    return predictions[0].result


def test_pre_annotation_and_interactive_prompt_through_label_studio(label_studio, backend, images, core):
    from label_studio_sdk import LabelStudio

    ls = LabelStudio(base_url=label_studio, api_key=TOKEN)
    prompts = {"brush": ["cat", "small dog"], "polygon": ["cat", "dog"], "rectangle": ["cat", "dog"]}
    labels = {"cat": "cat", "dog": "dog", "small dog": "dog"}
    for kind in ("brush", "polygon", "rectangle"):
        project, tasks, ml = make_project(ls, label_studio, kind, images, backend)
        assert ls.ml.get(ml.id).state == "CO", f"backend not connected: {ls.ml.get(ml.id).error_message}"
        ls.actions.create(id="retrieve_tasks_predictions", project=project.id,
                          selected_items={"all": True, "excluded": []})
        for task, path in zip(tasks, images):
            regions = stored_regions(ls, task.id)
            result = core.segment(str(path), prompts[kind], threshold=0.0)
            assert result.embedding_source != "computed"  # the backend's own embedding, read back
            height, width = result.image_size
            assert len(result) > 0
            if kind == "brush":
                assert len(regions) == len(result)
                for region, inst in zip(regions, result.instances):
                    assert region_label(region) == labels[inst.label]
                    np.testing.assert_array_equal(decode_brush(region), inst.full_mask(height, width))
            elif kind == "rectangle":
                assert len(regions) == len(result)
                for region, inst in zip(regions, result.instances):
                    v = region["value"]
                    box = tuple(round(p) for p in (v["x"] * width / 100, v["y"] * height / 100,
                                                   (v["x"] + v["width"]) * width / 100, (v["y"] + v["height"]) * height / 100))
                    assert box == inst.box and v["rectanglelabels"] == [inst.label]
            else:
                expected = [(inst.label, poly) for inst, polys in zip(result.instances, result.to_polygons()) for poly in polys]
                assert len(regions) == len(expected)
                for region, (label, poly) in zip(regions, expected):
                    assert region["value"]["polygonlabels"] == [label]
                    np.testing.assert_allclose(np.asarray(region["value"]["points"]) * (width / 100, height / 100), poly, atol=1e-6)

        if kind == "brush":  # an annotator types a prompt in the TextArea
            context = {"result": [{"type": "textarea", "from_name": "prompt", "to_name": "image",
                                   "value": {"text": ["fluffy cat"]}}]}
            raw = ls.ml.with_raw_response.predict_interactive(ml.id, task=tasks[0].id, context=context)
            body = raw.response.json()
            assert "errors" not in body, body
            regions = body["data"]["result"]
            result = core.segment(str(images[0]), ["fluffy cat"], threshold=0.0)
            assert len(regions) == len(result) > 0
            for region, inst in zip(regions, result.instances):
                assert region_label(region) == "cat" and region["score"] == pytest.approx(inst.score)
                np.testing.assert_array_equal(decode_brush(region), inst.full_mask(*result.image_size))


def test_clicks_and_a_box_through_label_studio(label_studio, backend, images, core):
    """Smart keypoints (one negative) and a rectangle, as the editor sends them, give one brush region."""
    from label_studio_sdk import LabelStudio

    ls = LabelStudio(base_url=label_studio, api_key=TOKEN)
    project, tasks, ml = make_project(ls, label_studio, "clicks", images[:1], backend)
    assert ls.ml.get(ml.id).state == "CO", f"backend not connected: {ls.ml.get(ml.id).error_message}"
    height, width = make_image(0, size=(72, 96)).shape[:2]
    size = {"original_width": width, "original_height": height, "image_rotation": 0}
    context = {"result": [
        {"type": "keypointlabels", "from_name": "kp", "to_name": "image", "is_positive": True, **size,
         "value": {"x": 30.0, "y": 40.0, "width": 0.5, "keypointlabels": ["dog"]}},
        {"type": "keypointlabels", "from_name": "kp", "to_name": "image", "is_positive": False, **size,
         "value": {"x": 75.0, "y": 65.0, "width": 0.5, "keypointlabels": ["dog"]}},
        {"type": "rectanglelabels", "from_name": "rect", "to_name": "image", **size,
         "value": {"x": 10.0, "y": 12.5, "width": 50.0, "height": 62.5, "rotation": 0, "rectanglelabels": ["dog"]}},
    ]}
    raw = ls.ml.with_raw_response.predict_interactive(ml.id, task=tasks[0].id, context=context)
    body = raw.response.json()
    assert "errors" not in body, body
    [region] = body["data"]["result"]
    result = core.segment_object(str(images[0]), points=[(0.30 * width, 0.40 * height), (0.75 * width, 0.65 * height)],
                                 point_labels=[1, 0], box=(0.10 * width, 0.125 * height, 0.60 * width, 0.75 * height),
                                 threshold=0.0)
    assert result.embedding_source != "computed"  # the backend's own embedding, read back
    assert region["type"] == "brushlabels" and region_label(region) == "dog"
    assert region["score"] == pytest.approx(result.instances[0].score)
    mask = decode_brush(region)
    assert mask.any()
    np.testing.assert_array_equal(mask, result.instances[0].full_mask(*result.image_size))


def test_bad_task_through_label_studio_stores_nothing_and_backend_survives(label_studio, backend, images):
    from label_studio_sdk import LabelStudio

    ls = LabelStudio(base_url=label_studio, api_key=TOKEN)
    project, tasks, ml = make_project(ls, label_studio, "rectangle", images[:1], backend)
    bad = ls.tasks.create(project=project.id, data={"image": "http://169.254.169.254/latest/meta-data/x.png"})
    ls.actions.create(id="retrieve_tasks_predictions", project=project.id, selected_items={"all": True, "excluded": []})
    assert len(list(ls.predictions.list(task=tasks[0].id))) == 1
    assert list(ls.predictions.list(task=bad.id)) == []
    assert requests.get(f"{backend}/health", timeout=5).json()["status"] == "UP"


@pytest.fixture(scope="module")
def video_backend(tmp_path_factory):
    """The backend on the tiny SAM 3 video model (128 channels wide, the width it tracks at), served by
    ``promptseg labelstudio serve`` like `backend`, with one torch thread (see tests/test_video.py)."""
    from promptseg.testing import make_random_sam3_video

    model_dir = make_random_sam3_video(tmp_path_factory.mktemp("models") / "tiny-sam3-video", hidden=128)
    work = tmp_path_factory.mktemp("video-backend")
    port = free_port()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("LABEL_STUDIO_", "BASIC_AUTH_")) and k not in ("PROMPTSEG_THRESHOLD", "LOCAL_FILES_DOCUMENT_ROOT")}
    env.update(PROMPTSEG_CACHE_DIR=str(work / "embeddings"), PROMPTSEG_DEVICE="cpu", HF_HUB_OFFLINE="1",
               PROMPTSEG_TRUST_SETUP_HOST="1", OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "promptseg.cli", "labelstudio", "serve", "--host", "127.0.0.1",
               "--port", str(port), "--model", str(model_dir)]
    log = work / "backend.log"
    process = start(command, env, log)
    try:
        wait_for(f"http://127.0.0.1:{port}/health", process, 180, log)
        yield f"http://127.0.0.1:{port}", model_dir, work / "embeddings"
    finally:
        stop(process)


def test_video_project_gets_one_track_per_object_through_label_studio(label_studio, video_backend, tmp_path):
    """An uploaded mp4 in a VideoRectangle project: batch predictions stored by Label Studio are the
    core's tracks (keyframes at 1-based frames, boxes in percent)."""
    import promptseg
    import torch
    from label_studio_sdk import LabelStudio
    from lshelpers import VIDEO_CONFIG, VIDEO_FPS, VIDEO_THRESHOLD, write_mp4

    url, model_dir, embeddings = video_backend
    ls = LabelStudio(base_url=label_studio, api_key=TOKEN)
    project = ls.projects.create(title="promptseg video", label_config=VIDEO_CONFIG)
    clip = write_mp4(tmp_path / "clip.mp4", 8)
    with open(clip, "rb") as handle:
        response = requests.post(f"{label_studio}/api/projects/{project.id}/import", headers={"Authorization": f"Token {TOKEN}"},
                                 files={"file": ("clip.mp4", handle, "video/mp4")}, timeout=60)
    response.raise_for_status()
    [task] = list(ls.tasks.list(project=project.id))
    thresholds = {"threshold": VIDEO_THRESHOLD, "new_threshold": 0.2581}  # few new objects per frame: quick
    ml = ls.ml.create(project=project.id, url=url, title="promptseg video", is_interactive=False, extra_params=thresholds)
    assert ls.ml.get(ml.id).state == "CO", f"backend not connected: {ls.ml.get(ml.id).error_message}"
    ls.actions.create(id="retrieve_tasks_predictions", project=project.id, selected_items={"all": True, "excluded": []})
    regions = stored_regions(ls, task.id)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        core = promptseg.load_segmenter(str(model_dir), device="cpu", cache_dir=embeddings)
        result = core.segment_video(clip, ["cat", "small dog"], **thresholds)
    finally:
        torch.set_num_threads(threads)
    assert result.info["embedding_source"] != "computed"  # the backend's own embeddings, read back
    tracks = result.tracks()
    assert len(regions) == len(tracks) > 0
    height, width = result.frame_size
    for region, track in zip(regions, tracks):
        value = region["value"]
        assert region["type"] == "videorectangle" and value["labels"] == [{"cat": "cat", "small dog": "dog"}[track.label]]
        assert value["framesCount"] == 8 and value["duration"] == pytest.approx(8 / VIDEO_FPS)
        boxes = {n: inst.box for n, frame in zip(result.frame_indices, result.frames)
                 for inst in frame.instances if inst.extra["object_id"] == track.object_id}
        assert [k["frame"] for k in value["sequence"]] == [n + 1 for n in sorted(boxes)]
        for keyframe in value["sequence"]:
            x0, y0, x1, y1 = boxes[keyframe["frame"] - 1]
            assert (keyframe["x"], keyframe["width"]) == pytest.approx((100 * x0 / width, 100 * (x1 - x0) / width))
            assert (keyframe["y"], keyframe["height"]) == pytest.approx((100 * y0 / height, 100 * (y1 - y0) / height))
