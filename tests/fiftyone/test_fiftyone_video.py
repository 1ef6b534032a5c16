"""Video datasets in a real FiftyOne database: `segment_samples`, the operator and `apply_model` write
frame-level Detections with instance masks and ``index`` = object id, equal to the core's
`segment_video` on the same file; a broken video is reported and the others written; reruns resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage.draw import disk

from promptseg.errors import ModelLoadError, OptionError
from promptseg_fiftyone.runner import segment_samples

from fo_helpers import URI

# the tiny random model scores every query near 0.25: these keep its few best detections per frame
THRESHOLDS = {"threshold": 0.2545, "new_threshold": 0.2545}


@pytest.fixture(autouse=True)
def one_thread():
    """The tracker makes thousands of tiny matrix products: on a shared 2-core machine one thread is fastest."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def video_model_dir(tmp_path_factory):
    """The hub layout (detector and tracker) 128 channels wide, as the video model needs."""
    from promptseg.testing import make_random_sam3_video

    return make_random_sam3_video(tmp_path_factory.mktemp("models") / "tiny-sam3-video", hidden=128)


@pytest.fixture(scope="module")
def video_segmenter(video_model_dir):
    """The process-wide segmenter the operator also gets for model=video_model_dir, device=cpu."""
    from promptseg.sessions import shared_segmenter

    return shared_segmenter(str(video_model_dir), device="cpu")


def scene(t: int, shift: int, height: int = 72, width: int = 96) -> np.ndarray:
    """Two discs moving across a dark background, frame `t`; `shift` makes each clip its own."""
    frame = np.full((height, width, 3), 40, np.uint8)
    frame[disk((30, 20 + shift + 3 * t), 12, shape=(height, width))] = (220, 60, 60)
    frame[disk((50, 70 - shift - 2 * t), 9, shape=(height, width))] = (60, 200, 90)
    return frame


def write_mp4(path, frames, fps=5):
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return str(path)


@pytest.fixture(scope="module")
def video_paths(tmp_path_factory) -> tuple[list[str], str]:
    """Three short mp4 clips (4, 3 and 5 frames) and one file that is not a video."""
    root = tmp_path_factory.mktemp("fo-videos")
    clips = [write_mp4(root / f"clip{i}.mp4", np.stack([scene(t, 2 * i) for t in range(n)]))
             for i, n in enumerate((4, 3, 5))]
    broken = root / "broken.mp4"
    broken.write_bytes(b"not a video at all" * 20)
    return clips, str(broken)


@pytest.fixture
def video_dataset(fo, video_paths):
    """clip0, the broken file, clip1, clip2."""
    clips, broken = video_paths
    dataset = fo.Dataset()
    dataset.add_samples([fo.Sample(filepath=path) for path in (clips[0], broken, clips[1], clips[2])])
    assert dataset.media_type == "video"
    yield dataset
    dataset.delete()


def assert_frames_match_core(sample, field, core) -> int:
    """Each segmented frame's Detections equal the core's result for that frame; returns the detections seen."""
    height, width = core.frame_size
    seen = 0
    for number, result in zip(core.frame_indices, core.frames):
        detections = sample.frames[number + 1][field]
        assert detections is not None
        assert len(detections.detections) == len(result)
        for detection, inst in zip(detections.detections, result):
            # exact: the same segmenter on the same decoded frames and cached embeddings
            assert detection.index == inst.extra["object_id"] == detection["object_id"]
            assert detection.label == inst.label and detection.confidence == pytest.approx(inst.score, abs=0)
            decoded = detection.to_segmentation(frame_size=(width, height), target=1).mask.astype(bool)
            np.testing.assert_array_equal(decoded, inst.full_mask(height, width))
            seen += 1
    return seen


def assert_one_detection_per_index(sample, field) -> None:
    """An index is one object: at most one detection per frame carries it."""
    for frame in sample.frames.values():
        indexes = [d.index for d in frame[field].detections]
        assert len(indexes) == len(set(indexes))


def payload(dataset, field):
    """Everything written per frame detection, for exact comparisons between runs."""
    out = []
    for sample in dataset:
        for number, frame in sample.frames.items():
            for d in frame[field].detections if frame[field] is not None else []:
                out.append((sample.id, number, d.index, d.label, d.confidence, tuple(d.bounding_box),
                            np.asarray(d.get_mask(), bool).tobytes()))
    return out


def test_runner_writes_frame_tracks_equal_to_the_core_and_reports_the_broken_video(fo, video_dataset, video_segmenter,
                                                                                  video_paths):
    clips, broken = video_paths
    calls = []
    summary = segment_samples(video_dataset, "cat", "sam", segmenter=video_segmenter,
                              progress=lambda *a: calls.append(a), **THRESHOLDS)
    assert (summary.processed, summary.failed_count, summary.skipped) == (3, 1, 0)
    assert summary.failed[0]["filepath"] == broken and "Cannot read the video" in summary.failed[0]["error"]
    assert video_dataset.get_frame_field_schema()["sam"].document_type is fo.Detections
    reloaded = fo.load_dataset(video_dataset.name)
    seen = 0
    for sample in reloaded:
        if sample.filepath == broken:
            assert all(frame["sam"] is None for frame in sample.frames.values())  # left empty: retried by a rerun
            continue
        core = video_segmenter.segment_video(sample.filepath, "cat", **THRESHOLDS)
        assert sorted(sample.frames.keys()) == [n + 1 for n in core.frame_indices]
        seen += assert_frames_match_core(sample, "sam", core)
        assert_one_detection_per_index(sample, "sam")
    assert seen == summary.instances > 0
    # progress counts frames: the total over the readable videos first, then one per frame
    assert calls[0] == (4 + 3 + 5, 0) and sum(advance for _, advance in calls[1:]) == 12
    assert all(total == 12 for total, _ in calls)


def test_an_object_keeps_its_index_on_every_frame_it_is_on(fo):
    """The tiny random model starts a new object on each frame, so a track over frames is built here from
    the core's types: one object on frames 3 and 5 of the source, another on frame 5 only."""
    from promptseg.results import Instance, SegmentationResult
    from promptseg.video import VideoResult
    from promptseg_fiftyone.video import frame_labels

    def inst(object_id, frame, box):
        x0, y0, x1, y1 = box
        return Instance(label="cell", score=0.9, box=box, mask=np.ones((y1 - y0, x1 - x0), bool),
                        extra={"object_id": object_id, "frame": frame, "tracker_score": 0.8})

    frames = [SegmentationResult([inst(7, 3, (2, 2, 6, 5))], (10, 12), ["cell"]),
              SegmentationResult([inst(7, 5, (3, 2, 7, 5)), inst(9, 5, (0, 6, 4, 10))], (10, 12), ["cell"])]
    labels = frame_labels(VideoResult(frames, [3, 5], (10, 12), ["cell"]))
    assert sorted(labels) == [4, 6]  # FiftyOne numbers frames from 1
    assert [d.index for d in labels[4].detections] == [7] and [d.index for d in labels[6].detections] == [7, 9]
    decoded = labels[6].detections[0].to_segmentation(frame_size=(12, 10), target=1).mask.astype(bool)
    np.testing.assert_array_equal(decoded, frames[1].instances[0].full_mask(10, 12))


def test_rerun_skips_done_videos_and_overwrite_redoes_them(video_dataset, video_segmenter):
    first = segment_samples(video_dataset.limit(2), "cat", "sam", segmenter=video_segmenter, **THRESHOLDS)
    assert (first.processed, first.failed_count) == (1, 1)
    written = payload(video_dataset, "sam")
    rerun = segment_samples(video_dataset, "cat", "sam", segmenter=video_segmenter, **THRESHOLDS)
    assert (rerun.skipped, rerun.processed, rerun.failed_count) == (1, 2, 1)
    after = payload(video_dataset, "sam")
    assert [row for row in after if row[0] == video_dataset.first().id] == written  # the done video was not redone
    again = segment_samples(video_dataset, "cat", "sam", segmenter=video_segmenter, **THRESHOLDS)
    assert (again.skipped, again.processed, again.failed_count) == (3, 0, 1)
    redo = segment_samples(video_dataset, "cat", "sam", segmenter=video_segmenter, overwrite=True, **THRESHOLDS)
    assert (redo.skipped, redo.processed) == (0, 3) and payload(video_dataset, "sam") == after


def test_stride_segments_every_nth_frame(video_dataset, video_segmenter):
    view = video_dataset.limit(1)
    segment_samples(view, "cat", "sam", segmenter=video_segmenter, stride=2, **THRESHOLDS)
    sample = view.first()
    assert [n for n, frame in sample.frames.items() if frame["sam"] is not None] == [1, 3]
    core = video_segmenter.segment_video(sample.filepath, "cat", stride=2, **THRESHOLDS)
    assert_frames_match_core(sample, "sam", core)


def test_apply_model_writes_frame_tracks_and_skips_the_broken_video(fo, video_dataset, video_segmenter, video_paths):
    from promptseg_fiftyone import PromptsegVideoModel

    clips, broken = video_paths
    video_dataset.apply_model(PromptsegVideoModel("cat", segmenter=video_segmenter, **THRESHOLDS), label_field="sam")
    seen = 0
    for sample in fo.load_dataset(video_dataset.name):
        if sample.filepath == broken:
            assert all(frame["sam"] is None for frame in sample.frames.values())
            continue
        core = video_segmenter.segment_video(sample.filepath, "cat", **THRESHOLDS)
        seen += assert_frames_match_core(sample, "sam", core)
        assert_one_detection_per_index(sample, "sam")
    assert seen > 0


def test_operator_writes_frame_tracks_and_reports_progress_in_frames(fo, video_dataset, video_segmenter,
                                                                     video_model_dir, video_paths):
    import fiftyone.operators as foo
    from fiftyone.operators.delegated import DelegatedOperationService

    clips, broken = video_paths
    params = {"prompts": ["cat"], "label_field": "sam", "model": str(video_model_dir), "device": "cpu", **THRESHOLDS}
    run = foo.execute_operator(URI, ctx={"dataset": video_dataset, "params": params})
    assert (run.result["processed"], run.result["failed_count"]) == (3, 1)
    assert run.result["failed"][0]["filepath"] == broken
    for sample in video_dataset.select(video_dataset.match({"filepath": {"$ne": broken}}).values("id")):
        assert_frames_match_core(sample, "sam", video_segmenter.segment_video(sample.filepath, "cat", **THRESHOLDS))

    operator = foo.get_operator(URI)
    operator(video_dataset, ["cat"], "later", model=str(video_model_dir), device="cpu", stride=2, delegate=True,
             **THRESHOLDS)
    service = DelegatedOperationService()
    service.execute_queued_operations(operator=URI, dataset_name=video_dataset.name)
    (queued,) = service.list_operations(operator=URI, dataset_name=video_dataset.name)
    assert queued.result.result["processed"] == 3
    assert queued.status.progress == 1.0 and queued.status.label == "Segmented 7 of 7 frames"  # 4, 3, 5 frames: 2 + 2 + 3 at stride 2


def test_detector_only_model_is_refused_before_any_work(fo, video_dataset, fo_segmenter, tiny_sam3_dir):
    import fiftyone.operators as foo
    from fiftyone.operators.executor import ExecutionError

    from promptseg_fiftyone import PromptsegVideoModel

    with pytest.raises(ModelLoadError, match="holds the text detector only.*Load the full facebook/sam3"):
        segment_samples(video_dataset, "cat", "sam", segmenter=fo_segmenter)
    with pytest.raises(ModelLoadError, match="holds the text detector only"):
        PromptsegVideoModel("cat", segmenter=fo_segmenter)
    params = {"prompts": ["cat"], "label_field": "sam", "model": str(tiny_sam3_dir), "device": "cpu"}
    with pytest.raises(ExecutionError, match="holds the text detector only"):
        foo.execute_operator(URI, ctx={"dataset": video_dataset, "params": params})
    assert "sam" not in video_dataset.get_frame_field_schema()


@pytest.mark.parametrize(
    "call, match",
    [
        ({"output": "segmentation"}, "frame-level Detections.*leave output as 'detections'"),
        ({"stride": 0}, "stride must be a whole number >= 1"),
        ({"min_area": 5}, "min_area do\\(es\\) not apply to videos"),
    ],
    ids=["output", "stride", "cleanup-option"],
)
def test_bad_video_run_settings_fail_before_any_work(video_dataset, video_segmenter, call, match):
    with pytest.raises(OptionError, match=match):
        segment_samples(video_dataset, "cat", "sam", segmenter=video_segmenter, **call)
    assert "sam" not in video_dataset.get_frame_field_schema()


def test_stride_on_an_image_dataset_is_refused(dataset, fo_segmenter):
    with pytest.raises(OptionError, match="apply to video datasets only"):
        segment_samples(dataset, "cat", "sam", segmenter=fo_segmenter, stride=2)


def test_each_video_takes_its_own_prompts_from_a_text_field(video_dataset, video_segmenter, video_paths):
    clips, broken = video_paths
    view = video_dataset.match({"filepath": {"$ne": broken}})
    for sample, prompt in zip(view, ["cat", None, "dog"]):
        sample["prompt"] = prompt
        sample.save()
    summary = segment_samples(view, None, "sam", segmenter=video_segmenter, prompt_field="prompt", **THRESHOLDS)
    assert (summary.processed, summary.no_prompts) == (2, 1)
    first, empty, last = view
    assert all(frame["sam"] is None for frame in empty.frames.values())  # no prompt: left for a later run
    for sample, prompt in ((first, "cat"), (last, "dog")):
        assert_frames_match_core(sample, "sam", video_segmenter.segment_video(sample.filepath, prompt, **THRESHOLDS))
        assert {d.label for frame in sample.frames.values() for d in frame["sam"].detections} == {prompt}

    from promptseg_fiftyone import PromptsegVideoModel

    view.apply_model(PromptsegVideoModel(segmenter=video_segmenter, **THRESHOLDS), label_field="applied",
                     prompt_field="prompt")
    first, empty, last = view
    assert all(frame["applied"] is None for frame in empty.frames.values())
    for sample, prompt in ((first, "cat"), (last, "dog")):
        assert_frames_match_core(sample, "applied", video_segmenter.segment_video(sample.filepath, prompt, **THRESHOLDS))


def test_the_form_of_a_video_dataset_asks_for_stride_and_new_threshold(video_dataset, dataset):
    import fiftyone.operators as foo
    from fiftyone.operators.executor import ExecutionContext

    def form(target):
        ctx = ExecutionContext(request_params={"dataset_name": target.name, "params": {"prompts": ["car"]}})
        return foo.get_operator(URI).resolve_input(ctx).type.properties

    video_form, image_form = form(video_dataset), form(dataset)
    assert video_form["stride"].default == 1 and video_form["stride"].type.min == 1
    assert "new_threshold" in video_form and "min_area" not in video_form
    assert "stride" not in image_form and "min_area" in image_form
