"""`Segmenter.segment_video`: SAM 3's video model on the hub-layout checkpoint, parity with transformers'
own streaming pipeline (processor, inference session, post-processing), the image encoder run once per
frame however many prompts, and the frame sources (video file, folder, array, TIFF) giving one result."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from skimage.draw import disk

import promptseg
from promptseg.errors import CancelledError, ImageError, ModelLoadError, OptionError
from tolerance import FLOAT_ATOL, MASK_EPS, assert_mask_agrees

# the tiny random model scores every query near 0.25: these keep its few best detections per frame
THRESHOLDS = {"threshold": 0.2545, "new_threshold": 0.2545}


@pytest.fixture(autouse=True)
def one_thread():
    """The tracker makes thousands of tiny matrix products: on a shared 2-core machine, two OpenMP
    threads per process wait on each other (100x slower here); one thread keeps these tests short."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_sam3_video_dir(tmp_path_factory):
    """The hub layout 128 channels wide: the width transformers' video memory attention runs at."""
    from promptseg.testing import make_random_sam3_video

    return make_random_sam3_video(tmp_path_factory.mktemp("models") / "tiny-sam3-video", hidden=128)


@pytest.fixture
def video_segmenter(tiny_sam3_video_dir, tmp_path):
    return promptseg.load_segmenter(str(tiny_sam3_video_dir), device="cpu", cache_dir=tmp_path / "cache")


def scene(t: int, height: int = 72, width: int = 96) -> np.ndarray:
    """Two discs moving across a dark background, frame `t`."""
    frame = np.full((height, width, 3), 40, np.uint8)
    frame[disk((30, 20 + 3 * t), 12, shape=(height, width))] = (220, 60, 60)
    frame[disk((50, 70 - 2 * t), 9, shape=(height, width))] = (60, 200, 90)
    return frame


def clip(count: int = 5) -> np.ndarray:
    return np.stack([scene(t) for t in range(count)])


def reference_pipeline(model_dir, tokenizer, frames, prompt, threshold, new_threshold):
    """transformers' streaming loop as its documentation shows it: one frame at a time through the
    processor, the model with an inference session, and the processor's post-processing."""
    from transformers import Sam2VideoVideoProcessor, Sam3ImageProcessor, Sam3VideoModel, Sam3VideoProcessor

    model = Sam3VideoModel.from_pretrained(model_dir).eval()
    model.score_threshold_detection, model.new_det_thresh = threshold, new_threshold
    size = {"height": 112, "width": 112}
    processor = Sam3VideoProcessor(Sam3ImageProcessor(size=size), Sam2VideoVideoProcessor(size=size), tokenizer)
    session = processor.init_video_session(inference_device="cpu", dtype=torch.float32)
    processor.add_text_prompt(session, prompt)
    outputs = []
    for frame in frames:
        inputs = processor(images=frame, return_tensors="pt")
        raw = model(inference_session=session, frame=inputs.pixel_values[0])
        post = processor.postprocess_outputs(session, raw, original_sizes=inputs.original_sizes)
        outputs.append((raw, post))
    return outputs


def test_tracker_equals_transformers_video_pipeline(video_segmenter, tiny_sam3_video_dir):
    frames = clip(5)
    reference = reference_pipeline(tiny_sam3_video_dir, video_segmenter.backend.tokenizer, frames, "cat", 0.2545, 0.2545)
    tracker = video_segmenter.backend.video_tracker(["cat"], frames.shape[1:3], 0.2545, 0.2545)
    tracked_somewhere = False
    for frame, (raw, _) in zip(frames, reference):
        embedding, _ = video_segmenter.embed(frame)
        got = tracker.step(embedding)
        assert got.object_ids == sorted(raw.obj_id_to_mask)
        want = torch.cat([raw.obj_id_to_mask[i] for i in got.object_ids]).float() if got.object_ids else got.mask_logits
        torch.testing.assert_close(got.mask_logits, want, atol=FLOAT_ATOL, rtol=0)
        np.testing.assert_allclose(got.scores, [raw.obj_id_to_score[i] for i in got.object_ids], atol=FLOAT_ATOL)
        np.testing.assert_allclose(got.tracker_scores, [raw.obj_id_to_tracker_score.get(i, 0.0) for i in got.object_ids],
                                   atol=FLOAT_ATOL)
        tracked_somewhere |= bool(raw.obj_id_to_tracker_score)
    assert tracked_somewhere  # the tracker followed objects, not only the detector found them


def test_segment_video_equals_transformers_post_processing(video_segmenter, tiny_sam3_video_dir):
    frames = clip(5)
    reference = reference_pipeline(tiny_sam3_video_dir, video_segmenter.backend.tokenizer, frames, "cat", 0.2545, 0.2545)
    result = video_segmenter.segment_video(frames, "cat", **THRESHOLDS)
    assert len(result) == len(frames) and result.frame_indices == list(range(len(frames)))
    found = 0
    for position, (raw, post) in enumerate(reference):
        masks = post["masks"].numpy()
        want = {int(i): masks[k] for k, i in enumerate(post["object_ids"]) if masks[k].any()}
        assert result.object_ids(position) == sorted(want)
        for inst in result[position]:
            obj = inst.extra["object_id"]
            logits = torch.nn.functional.interpolate(raw.obj_id_to_mask[obj][None].float(), size=frames.shape[1:3],
                                                     mode="bilinear", align_corners=False)[0, 0]
            probs = torch.sigmoid(logits).numpy()
            assert_mask_agrees(inst.full_mask(*frames.shape[1:3]), want[obj], probs)
            assert abs(inst.score - raw.obj_id_to_score[obj]) <= FLOAT_ATOL
            assert inst.label == "cat" and inst.extra["frame"] == position
            found += 1
    assert found >= len(frames)  # objects on every frame, not an empty comparison


def test_second_prompt_runs_no_image_encoder(video_segmenter, tiny_sam3_video_dir, tmp_path):
    frames = clip(4)
    trunk_runs = []
    handle = video_segmenter.backend.model.vision_encoder.backbone.register_forward_hook(
        lambda *_: trunk_runs.append(1))
    try:
        first = video_segmenter.segment_video(frames, "cat", **THRESHOLDS)
        assert video_segmenter.stats.image_encoder_runs == len(trunk_runs) == len(frames)
        second = video_segmenter.segment_video(frames, "dog", **THRESHOLDS)
        assert video_segmenter.stats.image_encoder_runs == len(trunk_runs) == len(frames)
        assert second.info["embedding_source"] == "memory" and first.info["embedding_source"] == "computed"
    finally:
        handle.remove()
    again = promptseg.load_segmenter(str(tiny_sam3_video_dir), device="cpu", cache_dir=tmp_path / "cache")
    runs = []
    handle = again.backend.model.vision_encoder.backbone.register_forward_hook(lambda *_: runs.append(1))
    try:
        from_disk = again.segment_video(frames, "cat", **THRESHOLDS)
    finally:
        handle.remove()
    assert again.stats.image_encoder_runs == len(runs) == 0 and from_disk.info["embedding_source"] == "disk"
    for got, want in zip(from_disk, first):  # bit-identical embeddings, the same code: exactly equal
        assert [i.extra["object_id"] for i in got] == [i.extra["object_id"] for i in want]
        assert all(np.array_equal(a.mask, b.mask) and a.box == b.box for a, b in zip(got, want))


def test_video_model_shares_the_loaded_trunk_and_neck(video_segmenter):
    video_segmenter.segment_video(clip(1), "cat", **THRESHOLDS)
    backend = video_segmenter.backend
    video = backend._video_model
    assert video.detector_model.model is backend.model
    assert video.tracker_neck is backend.tracker.vision_encoder.neck
    assert video.tracker_model.vision_encoder is None  # the trunk is the detector's, held once
    trunk = {p.data_ptr() for p in backend.model.vision_encoder.backbone.parameters()}
    video_pointers = {p.data_ptr() for p in video.parameters()}
    assert trunk <= video_pointers
    held = {p.data_ptr() for m in (backend.model, backend.tracker, video) for p in m.parameters()}
    assert len(held) == len({p.data_ptr() for p in backend.model.parameters()} | {p.data_ptr() for p in backend.tracker.parameters()}
                            | {p.data_ptr() for p in video.tracker_model.parameters()})


def test_detector_only_checkpoint_names_the_full_checkpoint(make_segmenter, video_segmenter, tmp_path):
    detector_only = make_segmenter()
    assert not detector_only.supports_video and video_segmenter.supports_video
    with pytest.raises(ModelLoadError, match="holds the text detector only.*Load the full facebook/sam3"):
        detector_only.require_video()
    missing = tmp_path / "not-read.mp4"  # refused before the video is opened: no "cannot read" error
    with pytest.raises(ModelLoadError, match="holds the text detector only.*Load the full facebook/sam3"):
        detector_only.segment_video(missing, "cat")


def write_mp4(path, frames, fps=5):
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("ffv1", rate=fps) if path.suffix == ".mkv" else container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "bgr0" if path.suffix == ".mkv" else "yuv420p"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def same_result(a, b):
    assert a.frame_indices == b.frame_indices
    for x, y in zip(a, b):
        assert [i.extra["object_id"] for i in x] == [i.extra["object_id"] for i in y]
        assert all(np.array_equal(p.mask, q.mask) and p.box == q.box for p, q in zip(x, y))


def test_video_file_folder_array_and_tiff_give_one_result(video_segmenter, tmp_path):
    import tifffile
    from PIL import Image

    frames = clip(4)
    from_array = video_segmenter.segment_video(frames, "cat", **THRESHOLDS)
    folder = tmp_path / "frames"
    folder.mkdir()
    for t, frame in enumerate(frames):  # natural order: frame10 would come after frame9
        Image.fromarray(frame).save(folder / f"frame{t}.png")
    same_result(video_segmenter.segment_video(folder, "cat", **THRESHOLDS), from_array)
    tifffile.imwrite(tmp_path / "series.tif", frames, metadata={"axes": "TYXS"})
    same_result(video_segmenter.segment_video(tmp_path / "series.tif", "cat", **THRESHOLDS), from_array)
    planes = np.ascontiguousarray(np.moveaxis(frames, -1, 1))  # one page per channel: T, C, Y, X
    tifffile.imwrite(tmp_path / "planes.ome.tif", planes, metadata={"axes": "TCYX"})
    same_result(video_segmenter.segment_video(tmp_path / "planes.ome.tif", "cat", **THRESHOLDS), from_array)
    lossless = write_mp4(tmp_path / "clip.mkv", frames)  # FFV1 in RGB: decoded frames equal the array
    same_result(video_segmenter.segment_video(lossless, "cat", **THRESHOLDS), from_array)
    lossy = video_segmenter.segment_video(write_mp4(tmp_path / "clip.mp4", frames), "cat", **THRESHOLDS)
    assert len(lossy) == 4 and lossy.frame_size == (72, 96)


def test_any_channel_count_is_read_like_an_image(video_segmenter):
    """A (T, H, W, C) array with 2 or 5 channels: `channels` picks them, as for one image."""
    frames = clip(3)
    five = np.concatenate([frames, frames[..., :2]], axis=-1)  # channels 0..2 are the RGB frames
    same_result(video_segmenter.segment_video(five, "cat", channels=(0, 1, 2), **THRESHOLDS),
                video_segmenter.segment_video(frames, "cat", **THRESHOLDS))
    two = video_segmenter.segment_video(five[..., 3:], "cat", channels=(0, 1), **THRESHOLDS)
    assert len(two) == 3 and two.frame_size == (72, 96)


def test_frame_range_and_stride(video_segmenter):
    frames = clip(7)
    seen = []
    result = video_segmenter.segment_video(frames, "cat", frames=(1, 6), stride=2, progress=lambda t, a: seen.append((t, a)),
                                           **THRESHOLDS)
    assert result.frame_indices == [1, 3, 5] and [r.info["frame"] for r in result] == [1, 3, 5]
    assert seen == [(3, 0), (3, 1), (3, 1), (3, 1)]
    direct = video_segmenter.segment_video(frames[1:6:2], "cat", **THRESHOLDS)
    for x, y in zip(result, direct):
        assert [i.extra["object_id"] for i in x] == [i.extra["object_id"] for i in y]
    assert video_segmenter.segment_video(frames, "cat", frames=slice(5, None), **THRESHOLDS).frame_indices == [5, 6]


def test_cancel_between_frames(video_segmenter):
    calls = []
    with pytest.raises(CancelledError):
        video_segmenter.segment_video(clip(4), "cat", cancel=lambda: len(calls) >= 2,
                                      progress=lambda total, advance: calls.append(advance) if advance else None)
    assert len(calls) == 2


def test_tracks_label_volume_and_exports(video_segmenter, tmp_path):
    import tifffile
    from PIL import Image
    from pycocotools import mask as mask_utils

    result = video_segmenter.segment_video(clip(4), "cat", **THRESHOLDS)
    volume = result.to_label_volume()
    assert volume.shape == (4, 72, 96)
    tracks = {track.object_id: track for track in result.tracks()}
    assert tracks and set(np.unique(volume)) - {0} <= {obj + 1 for obj in tracks}
    for obj, track in tracks.items():
        on = [n for n, r in zip(result.frame_indices, result) if obj in [i.extra["object_id"] for i in r]]
        assert (track.first_frame, track.last_frame, track.num_frames) == (on[0], on[-1], len(on))
        assert track.best_score >= track.mean_score > 0
    pngs = result.save_label_pngs(tmp_path / "labels")
    assert [p.name for p in pngs] == [f"frame_{n:06d}.png" for n in range(4)]
    assert all(np.array_equal(np.asarray(Image.open(p)), volume[k]) for k, p in enumerate(pngs))
    np.testing.assert_array_equal(tifffile.imread(result.save_label_tiff(tmp_path / "labels.tif")), volume)
    document = json.loads(result.save_tracking_json(tmp_path / "tracks.json").read_text())
    assert {t["id"] for t in document["tracks"]} == {obj + 1 for obj in tracks}
    assert [image["frame_id"] for image in document["images"]] == [0, 1, 2, 3]
    for record in document["annotations"]:
        image = document["images"][record["image_id"] - 1]
        decoded = mask_utils.decode(record["segmentation"]).astype(bool)
        position = image["frame_id"]
        assert np.array_equal(decoded & (volume[position] > 0), decoded)  # every annotated pixel is labelled
        assert record["track_id"] in {t["id"] for t in document["tracks"]}


@pytest.mark.parametrize(
    "video, call, error, match",
    [
        ("empty-folder", {}, ImageError, "holds no frames"),
        ("garbage.mp4", {}, ImageError, "Cannot read the video"),
        ("array", {"stride": 0}, OptionError, "stride must be a whole number >= 1"),
        ("array", {"frames": (5, 9)}, OptionError, "holds no frame of this 3-frame video"),
        ("array", {"frames": (2, 1)}, OptionError, "start < stop"),
        ("array", {"min_area": 5}, OptionError, "min_area do\\(es\\) not apply to videos"),
        ("sizes", {}, ImageError, "must have one size"),
    ],
)
def test_bad_video_inputs(video_segmenter, tmp_path, video, call, error, match):
    from PIL import Image

    if video == "empty-folder":
        video = tmp_path / "empty"
        video.mkdir()
    elif video == "garbage.mp4":
        video = tmp_path / "garbage.mp4"
        video.write_bytes(b"not a video at all" * 10)
    elif video == "sizes":
        video = tmp_path / "sizes"
        video.mkdir()
        Image.fromarray(scene(0)).save(video / "a1.png")
        Image.fromarray(scene(1, 64, 64)).save(video / "a2.png")
    else:
        video = clip(3)
    with pytest.raises(error, match=match):
        video_segmenter.segment_video(video, "cat", **call)


class LazyVideo:
    """A (T, H, W, 3) video made frame by frame on request, as a lazy array (dask, zarr) hands them out."""

    def __init__(self, count: int, height: int = 480, width: int = 640) -> None:
        self.shape = (count, height, width, 3)

    def __getitem__(self, t: int) -> np.ndarray:
        height, width = self.shape[1:3]
        frame = np.full((height, width, 3), 40, np.uint8)
        frame[disk((height // 3, width // 6 + 2 * (t % 100)), height // 8, shape=(height, width))] = (220, 60, 60)
        return frame


def test_memory_does_not_grow_with_the_number_of_frames(tiny_sam3_video_dir):
    """300 streamed 640x480 frames: resident memory after frame 300 within 8 MiB of its value after frame
    60 (keeping the frames would add 0.9 MiB each, 216 MiB in all; measured here: about 14 KiB per frame,
    the compact per-frame results and the session's per-frame bookkeeping). The embedding cache is capped
    at 8 MiB, as its `memory_cache_bytes` caps it for any video; no detection passes the threshold, so
    the tracker holds no object (its own per-object state is checked in the next test)."""
    import psutil

    seg = promptseg.load_segmenter(str(tiny_sam3_video_dir), device="cpu", cache_dir=False,
                                   memory_cache_bytes=8 * 2**20)
    process, resident = psutil.Process(), []

    def progress(total, advance):
        if advance:
            resident.append(process.memory_info().rss)

    result = seg.segment_video(LazyVideo(300), "cat", threshold=0.99, progress=progress)
    assert len(result) == 300 and seg.stats.image_encoder_runs == 300
    growth = resident[299] - resident[59]
    assert growth < 8 * 2**20, f"{growth / 240 / 1024:.1f} KiB per frame"


def test_tracker_keeps_only_the_frames_it_reads(video_segmenter):
    """Each tracked object's per-frame outputs stay within the tracker's memory window (16 frames)."""
    frames = clip(30)
    tracker = video_segmenter.backend.video_tracker(["cat"], frames.shape[1:3], 0.2545, 0.2545)
    for frame in frames:
        tracker.step(video_segmenter.embed(frame)[0])
    kept = [len(out["non_cond_frame_outputs"]) for out in tracker.session.output_dict_per_obj.values()]
    assert kept and max(kept) <= tracker.memory_frames + 1 and tracker.memory_frames == 16
    assert min(frame for out in tracker.session.output_dict_per_obj.values() for frame in out["non_cond_frame_outputs"]) >= 29 - 17


def test_a_video_file_states_its_frame_rate_and_other_sources_none(tmp_path):
    from promptseg.video import open_frames

    frames = clip(3)
    assert open_frames(write_mp4(tmp_path / "clip.mp4", frames, fps=12)).fps == pytest.approx(12.0)
    assert open_frames(frames).fps is None  # an array has no clock


def test_a_container_without_a_video_stream_names_the_problem(tmp_path):
    import av

    from promptseg.video import open_frames

    path = tmp_path / "sound.mp4"
    with av.open(str(path), "w") as container:  # audio only: one second of silence
        stream = container.add_stream("aac", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 8000
        for packet in [*stream.encode(frame), *stream.encode()]:
            container.mux(packet)
    with pytest.raises(ImageError, match="has no frames \\(the file holds no video stream\\).*folder of images"):
        open_frames(path)
