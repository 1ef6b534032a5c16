"""Video tasks: a `<Video>` with `VideoRectangle` and `Labels` gets one `videorectangle` track per object
from `Segmenter.segment_video` on the tiny random SAM 3 video model: keyframes at Label Studio's
1-based frames, boxes in percent, times in seconds, `enabled: false` where an object goes; over HTTP
the video is downloaded only from the configured host, with the video limits; bad videos fail alone."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import requests
import torch

from lshelpers import VIDEO_CONFIG, VIDEO_FPS, VIDEO_THRESHOLD, write_mp4

API_KEY = "operator-api-key-0123456789"
FRAMES = 10
NEW_OBJECTS = {"new_threshold": 0.2581}  # the best two detections of a frame start objects (fewer objects: faster)
CHAINED = 1000


@pytest.fixture(autouse=True)
def one_thread():
    """The tracker makes thousands of tiny matrix products: on a shared 2-core machine one thread is fastest."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def video_root(tmp_path_factory) -> Path:
    """A document root with a 10-frame clip, a 4-frame clip, a file that is not a video and one with no frames."""
    import av

    root = tmp_path_factory.mktemp("ls-videos")
    write_mp4(root / "clip.mp4", FRAMES)
    write_mp4(root / "short.mp4", 4)
    (root / "notes.mp4").write_bytes(b"this is not a video at all\n" * 40)
    with av.open(str(root / "empty.mp4"), "w") as container:  # a video stream without one frame
        stream = container.add_stream("mpeg4", rate=VIDEO_FPS)
        stream.width, stream.height, stream.pix_fmt = 96, 72, "yuv420p"
        container.start_encoding()  # writes the header, which a container with no packet never gets
    assert (root / "empty.mp4").stat().st_size > 0
    return root


@pytest.fixture(scope="module")
def video_model(tmp_path_factory, video_root):
    """A backend on the hub layout 128 channels wide (the width the video model tracks at)."""
    from promptseg.testing import make_random_sam3_video
    from promptseg_labelstudio.config import BackendConfig
    from promptseg_labelstudio.model import PromptsegMLBackend

    model_dir = make_random_sam3_video(tmp_path_factory.mktemp("models") / "tiny-sam3-video", hidden=128)
    config = BackendConfig(model=str(model_dir), device="cpu", threshold=VIDEO_THRESHOLD, document_root=video_root,
                           cache_dir=tmp_path_factory.mktemp("ls-video-cache"))
    return PromptsegMLBackend(config)


@pytest.fixture(scope="module")
def clip_result(video_model, video_root):
    """The core's result on the 10-frame clip, with the prompts the config's labels give."""
    return video_model.segmenter.segment_video(str(video_root / "clip.mp4"), ["cat", "small dog"],
                                               threshold=VIDEO_THRESHOLD, **NEW_OBJECTS)


def make_client(video_model, **changes):
    from promptseg_labelstudio.app import create_app
    from promptseg_labelstudio.model import PromptsegMLBackend

    backend = PromptsegMLBackend(replace(video_model.config, **changes), segmenter=video_model.segmenter)
    return create_app(backend).test_client()


def setup(client, extra=None, project="3.1", config=VIDEO_CONFIG):
    return client.post("/setup", json={"project": project, "schema": config,
                                       "extra_params": {**NEW_OBJECTS, **(extra or {})}})


def predict(client, videos, project="3.1", config=VIDEO_CONFIG, context=None, data=None):
    tasks = [{"id": i + 1, "data": {"video": video, **(data or {})}} for i, video in enumerate(videos)]
    response = client.post("/predict", json={"tasks": tasks, "project": project, "label_config": config,
                                             "params": {"context": context}})
    assert response.status_code == 200, response.get_data(as_text=True)
    return response.json["results"]


def plan_output():
    from promptseg_labelstudio.labeling import parse_labeling_config

    return parse_labeling_config(VIDEO_CONFIG).outputs[0]


def label_of(inst):
    return {"cat": "cat", "small dog": "dog"}[inst.label]


def expected_enabled(frames: list[int], last: int) -> list[bool]:
    """Label Studio's rule, from an object's source frames (stride 1 over the whole video): a keyframe
    stays enabled while the object is on the next frame, or when it is on the video's last frame."""
    return [n + 1 in frames or n == last for n in frames]


def chained(result, positions):
    """A copy of `result` where the best "cat" instance of each frame at `positions` is one object
    (`CHAINED`). The tiny random model starts new objects on every frame, so a track over several
    frames, with gaps where wanted, is made of its real instances."""
    frames = []
    for position, frame in enumerate(result.frames):
        instances = list(frame.instances)
        if position in positions:
            best = max((i for i, inst in enumerate(instances) if inst.label == "cat"), key=lambda i: instances[i].score)
            instances[best] = replace(instances[best], extra={**instances[best].extra, "object_id": CHAINED})
        frames.append(replace(frame, instances=instances))
    return replace(result, frames=frames)


@pytest.fixture(scope="module", params=["as tracked", "one object on every frame"])
def video_result(request, clip_result):
    """The core's result, and the same with one object chained through all its frames."""
    return clip_result if request.param == "as tracked" else chained(clip_result, set(range(FRAMES)))


# -- the mapping from a VideoResult to videorectangle regions ------------------------------------------

def test_each_object_is_one_track_of_keyframes_in_percent_at_one_based_frames(video_result, video_root):
    from promptseg_labelstudio.video import read_timing, track_regions

    clip_result = video_result
    timing = read_timing(str(video_root / "clip.mp4"))
    assert (timing.frame_count, timing.fps) == (FRAMES, VIDEO_FPS)
    regions = track_regions(clip_result, plan_output(), label_of, timing, rate=VIDEO_FPS)
    tracks = clip_result.tracks()
    assert len(tracks) >= 2 and len(regions) == len(tracks)  # objects of both labels
    assert {r["value"]["labels"][0] for r in regions} == {"cat", "dog"}
    height, width = clip_result.frame_size
    for region, track in zip(regions, tracks):
        assert region["type"] == "videorectangle" and region["from_name"] == "box" and region["to_name"] == "video"
        value = region["value"]
        assert value["labels"] == [{"cat": "cat", "small dog": "dog"}[track.label]]
        assert value["framesCount"] == FRAMES and value["duration"] == pytest.approx(FRAMES / VIDEO_FPS)
        assert region["score"] == pytest.approx(track.best_score)
        seen = {n: inst for n, frame in zip(clip_result.frame_indices, clip_result.frames)
                for inst in frame.instances if inst.extra["object_id"] == track.object_id}
        sequence = value["sequence"]
        assert [k["frame"] for k in sequence] == [n + 1 for n in sorted(seen)]
        assert [k["enabled"] for k in sequence] == expected_enabled(sorted(seen), FRAMES - 1)
        for keyframe in sequence:
            x0, y0, x1, y1 = seen[keyframe["frame"] - 1].box
            assert keyframe["rotation"] == 0
            assert keyframe["time"] == pytest.approx((keyframe["frame"] - 1) / VIDEO_FPS)
            assert (keyframe["x"], keyframe["y"]) == pytest.approx((100 * x0 / width, 100 * y0 / height))
            assert (keyframe["width"], keyframe["height"]) == pytest.approx((100 * (x1 - x0) / width,
                                                                            100 * (y1 - y0) / height))


def test_regions_pass_the_sdks_videorectangle_schema(video_result, video_root):
    from label_studio_sdk.label_interface.control_tags import VideoRectangleValue

    from promptseg_labelstudio.video import read_timing, track_regions

    regions = track_regions(video_result, plan_output(), label_of, read_timing(str(video_root / "clip.mp4")), VIDEO_FPS)
    assert regions
    for region in regions:
        VideoRectangleValue(**region["value"])  # raises on a field of the wrong kind or a box over 100 %


def test_a_gap_disables_the_keyframe_before_it_and_the_object_continues_the_same_region(clip_result, video_root):
    from promptseg_labelstudio.video import read_timing, track_regions

    timing = read_timing(str(video_root / "clip.mp4"))
    gapped = chained(clip_result, {0, 1, 2, 4, 5, 6})  # gone on frame 3 and after 6
    tracks = gapped.tracks()
    regions = track_regions(gapped, plan_output(), label_of, timing, VIDEO_FPS)
    assert len(regions) == len(tracks) and tracks[-1].object_id == CHAINED
    sequence = regions[-1]["value"]["sequence"]  # the object that came back is still one region
    assert [k["frame"] for k in sequence] == [1, 2, 3, 5, 6, 7]
    assert [k["enabled"] for k in sequence] == [True, True, False, True, True, False]


def test_a_track_on_the_last_frame_stays_enabled_unless_the_frame_range_stops_early(clip_result, video_root):
    from promptseg_labelstudio.video import VideoTiming, track_regions

    clip_result = chained(clip_result, set(range(FRAMES)))
    pick = lambda regions: regions[-1]  # noqa: E731 - regions come in object-id order, CHAINED last
    whole = pick(track_regions(clip_result, plan_output(), label_of, VideoTiming(FRAMES, VIDEO_FPS), VIDEO_FPS))
    assert whole["value"]["sequence"][-1]["enabled"] is True
    longer = VideoTiming(FRAMES + 5, VIDEO_FPS)  # the same frames as the first 10 of a 15-frame video
    cut = pick(track_regions(clip_result, plan_output(), label_of, longer, VIDEO_FPS))
    assert cut["value"]["sequence"][-1]["enabled"] is False
    assert cut["value"]["framesCount"] == FRAMES + 5


@pytest.mark.parametrize("rate", [24.0, 2.0])
def test_keyframes_follow_label_studios_frame_rate_when_it_differs_from_the_files(clip_result, video_root, rate):
    from promptseg_labelstudio.video import read_timing, track_regions

    clip_result = chained(clip_result, set(range(FRAMES)))
    timing = read_timing(str(video_root / "clip.mp4"))
    regions = track_regions(clip_result, plan_output(), label_of, timing, rate)
    tracks = clip_result.tracks()
    assert len(regions) == len(tracks) > 0
    width = clip_result.frame_size[1]
    for region, track in zip(regions, tracks):
        value = region["value"]
        assert value["framesCount"] == round(FRAMES * rate / VIDEO_FPS)
        seen = {n: inst for n, frame in zip(clip_result.frame_indices, clip_result.frames)
                for inst in frame.instances if inst.extra["object_id"] == track.object_id}
        shown_at = {}  # Label Studio frame -> the last file frame shown on it (none past the video's end)
        for n in sorted(seen):
            shown_at[min(round(n * rate / VIDEO_FPS) + 1, value["framesCount"])] = n
        assert [k["frame"] for k in value["sequence"]] == sorted(shown_at)
        for keyframe in value["sequence"]:
            n = shown_at[keyframe["frame"]]
            assert keyframe["time"] == pytest.approx((keyframe["frame"] - 1) / rate)
            assert abs(keyframe["time"] - n / VIDEO_FPS) <= 1 / rate  # within a Label Studio frame of frame n
            assert keyframe["x"] == pytest.approx(100 * seen[n].box[0] / width)
        if rate > VIDEO_FPS:  # every file frame has a Label Studio frame of its own
            assert len(value["sequence"]) == len(seen)
        elif track.num_frames == FRAMES:  # 5 file frames a second on 2 Label Studio frames a second share them
            assert len(value["sequence"]) == round(FRAMES * rate / VIDEO_FPS)


@pytest.mark.parametrize("attribute, data, rate", [
    (None, {}, 24.0), ("30", {}, 30.0), ("$fps", {"fps": 25}, 25.0), ("$fps", {"fps": "29.97"}, 29.97),
    ("$fps", {}, 24.0), ("fast", {}, 24.0), ("0.04", {}, 25.0),
])
def test_label_studio_frame_rate_is_read_as_the_editor_reads_it(attribute, data, rate):
    from promptseg_labelstudio.video import label_studio_rate

    assert label_studio_rate(attribute, data) == pytest.approx(rate)


# -- the backend: config, options, prompts ---------------------------------------------------------------

def test_video_config_maps_labels_and_hints_to_prompts():
    from promptseg_labelstudio.labeling import parse_labeling_config

    plan = parse_labeling_config(VIDEO_CONFIG)
    assert plan.media == "video" and plan.image_name == "video" and plan.value_key == "video"
    assert plan.batch_prompts()[0] == ["cat", "small dog"] and plan.frame_rate == "5"
    assert plan.textareas == ("prompt",)
    [output] = plan.outputs
    assert (output.from_name, output.to_name, output.result_type, output.labels) == ("box", "video", "videorectangle",
                                                                                     ("cat", "dog"))


def test_pre_annotation_returns_the_cores_tracks(video_model, clip_result):
    client = make_client(video_model)
    assert setup(client).status_code == 200
    [prediction] = predict(client, ["clip.mp4"])
    regions = prediction["result"]
    tracks = clip_result.tracks()
    assert len(regions) == len(tracks) > 0
    for region, track in zip(regions, tracks):
        assert region["value"]["labels"] == [{"cat": "cat", "small dog": "dog"}[track.label]]
        assert len(region["value"]["sequence"]) == track.num_frames
        assert region["score"] == pytest.approx(track.best_score)
    assert prediction["score"] == pytest.approx(max(t.best_score for t in tracks))


def test_stride_and_frame_range_from_extra_params(video_model, video_root):
    client = make_client(video_model)
    assert setup(client, {"stride": 2, "frames": "1:7"}, project="4.1").status_code == 200
    [prediction] = predict(client, ["clip.mp4"], project="4.1")
    core = video_model.segmenter.segment_video(str(video_root / "clip.mp4"), ["cat", "small dog"], frames=(1, 7),
                                               stride=2, threshold=VIDEO_THRESHOLD, **NEW_OBJECTS)
    assert core.frame_indices == [1, 3, 5]
    regions = prediction["result"]
    assert len(regions) == len(core.tracks()) > 0
    for region in regions:
        sequence = region["value"]["sequence"]
        assert {k["frame"] for k in sequence} <= {2, 4, 6}
        assert sequence[-1]["enabled"] is False  # the range stops before the video does
        assert region["value"]["framesCount"] == FRAMES


def test_typed_prompt_on_a_video_fills_its_label(video_model):
    client = make_client(video_model)
    assert setup(client, project="5.1").status_code == 200
    context = {"result": [{"type": "textarea", "from_name": "prompt", "to_name": "video", "value": {"text": ["fluffy cat"]}}]}
    [prediction] = predict(client, ["clip.mp4"], project="5.1", context=context)
    core = video_model.segmenter.segment_video(  # the embeddings are cached: only the tracker runs again
        str(Path(video_model.config.document_root) / "clip.mp4"), ["fluffy cat"], threshold=VIDEO_THRESHOLD, **NEW_OBJECTS)
    assert len(prediction["result"]) == len(core.tracks()) > 0
    assert {r["value"]["labels"][0] for r in prediction["result"]} == {"cat"}


@pytest.mark.parametrize("extra, message", [
    ({"stride": 0}, "'stride' must be a whole number >= 1"),
    ({"stride": 1.5}, "'stride' must be a whole number >= 1"),
    ({"frames": "7:2"}, "'frames' must have start < stop"),
    ({"frames": [1, 2, 3]}, "'frames' must be [start, stop]"),
    ({"frames": "a:b"}, "'frames' must be [start, stop]"),
    ({"new_threshold": 2}, "'new_threshold' must be a number from 0 to 1"),
    ({"min_area": 20}, "do(es) not apply to videos"),
    ({"strid": 2}, "'stride', 'frames', 'new_threshold'"),
])
def test_bad_video_extra_params_are_refused_at_setup(video_model, extra, message):
    response = setup(make_client(video_model), extra)
    assert response.status_code == 422
    assert message in response.json["error"]


def test_a_model_without_the_tracker_is_refused_at_setup(make_app):
    response = make_app().test_client().post("/setup", json={"project": "6.1", "schema": VIDEO_CONFIG})
    assert response.status_code == 422 and "facebook/sam3" in response.json["error"]


def test_a_video_without_rectangles_or_labels_is_refused(video_model):
    config = '<View><Video name="video" value="$video"/><Labels name="l" toName="video"><Label value="cat"/></Labels></View>'
    response = make_client(video_model).post("/setup", json={"project": "7.1", "schema": config})
    assert response.status_code == 400 and "no <VideoRectangle> with <Labels>" in response.json["error"]


def test_bad_videos_fail_alone(video_model):
    client = make_client(video_model, max_video_frames=8)
    assert setup(client, project="8.1").status_code == 200
    results = predict(client, ["short.mp4", "notes.mp4", "empty.mp4", "clip.mp4", "missing.mp4", "short.mp4"],
                      project="8.1")
    assert len(results[0]["result"]) > 0 and len(results[5]["result"]) > 0
    assert "Cannot read the video" in results[1]["error"]
    assert "has no frames" in results[2]["error"] and "no video stream" in results[2]["error"]
    assert "10 frames to segment, over the limit of 8" in results[3]["error"]
    assert "PROMPTSEG_MAX_VIDEO_FRAMES" in results[3]["error"]
    assert "is not a file" in results[4]["error"]
    for failed in results[1:5]:
        assert "result" not in failed
    assert setup(client, {"frames": [5, 9]}, project="8.2").status_code == 200
    short, clip = predict(client, ["short.mp4", "clip.mp4"], project="8.2")
    assert "frames 5:9 holds no frame of this 4-frame video" in short["error"] and "result" not in short
    assert len(clip["result"]) > 0


# -- over HTTP: downloads only from the configured host, with the video limits ------------------------------

@pytest.fixture
def live(video_model, tmp_path, serve_backend):
    """Serve the real app on waitress with config `changes` (same segmenter); stopped in teardown."""
    downloads = tmp_path / "downloads"
    downloads.mkdir()

    def start(**changes) -> str:
        return serve_backend(video_model, download_dir=downloads, document_root=None, **changes)

    start.downloads = downloads
    return start


def live_predict(url, videos, project="9.1"):
    tasks = [{"id": i + 1, "data": {"video": video}} for i, video in enumerate(videos)]
    response = requests.post(f"{url}/predict", json={"tasks": tasks, "project": project, "label_config": VIDEO_CONFIG},
                             timeout=300)
    assert response.status_code == 200, response.text
    return response.json()["results"]


def test_uploaded_video_is_fetched_from_label_studio_only_with_the_key(live, standin, other_host, video_root, clip_result):
    standin.files["/storage-data/uploaded/"] = (video_root / "clip.mp4").read_bytes()
    other_host.files["/clip.mp4"] = (video_root / "clip.mp4").read_bytes()
    url = live(label_studio_url=standin.url, api_key=API_KEY)
    assert requests.post(f"{url}/setup", json={"project": "9.1", "schema": VIDEO_CONFIG, "extra_params": NEW_OBJECTS,
                                               "hostname": other_host.url, "access_token": "other"},
                         timeout=30).status_code == 200
    results = live_predict(url, ["/data/upload/3/clip.mp4", f"{other_host.url}/clip.mp4"])
    regions = results[0]["result"]
    assert len(regions) == len(clip_result.tracks()) > 0
    for region, track in zip(regions, clip_result.tracks()):
        assert [k["frame"] - 1 for k in region["value"]["sequence"]][0] == track.first_frame
    assert "is not allowed" in results[1]["error"]  # a host /setup named is not the configured one
    assert standin.paths_seen() == ["/storage-data/uploaded/?filepath=upload/3/clip.mp4"]
    assert [h.get("authorization") for h in standin.headers_seen()] == [f"Token {API_KEY}"]
    assert other_host.paths_seen() == []
    assert list(live.downloads.iterdir()) == []  # the downloaded video is removed after its task


def test_video_downloads_have_their_own_size_cap_and_deadline(live, standin, video_root):
    standin.files["/ok.mp4"] = (video_root / "short.mp4").read_bytes()
    cap = 2 * 1024**2  # over the 1 MB the slow path declares, far under the 64 MiB the huge one streams
    url = live(allowed_hosts=(standin.host,), max_video_bytes=cap, video_download_timeout=1.5)
    assert requests.post(f"{url}/setup", json={"project": "9.1", "schema": VIDEO_CONFIG, "extra_params": NEW_OBJECTS},
                         timeout=30).status_code == 200
    results = live_predict(url, [f"{standin.url}/huge/big.mp4", f"{standin.url}/slow/slow.mp4", f"{standin.url}/ok.mp4",
                                 f"{standin.url}/declared-huge/big.mp4"])
    assert f"Video '{standin.url}/huge/big.mp4' is over the download limit of {cap:,} bytes" in results[0]["error"]
    assert "PROMPTSEG_MAX_VIDEO_BYTES" in results[0]["error"] and "PROMPTSEG_MAX_VIDEO_BYTES" in results[3]["error"]
    assert "took longer than 1.5 s (PROMPTSEG_VIDEO_DOWNLOAD_TIMEOUT)" in results[1]["error"]
    assert len(results[2]["result"]) > 0
    assert standin.sent.get("/huge/big.mp4", 0) < 64 * 1024**2
    assert list(live.downloads.iterdir()) == []

