"""*Segment by text* in track mode: a time series or z-stack tracked by SAM 3's video model in a real
viewer gives the core's `segment_video` labels and tracks, with progress per frame and Cancel."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from promptseg_napari._widget import LINK, SEPARATE, TRACK

THRESHOLDS = {"threshold": 0.2545, "new_threshold": 0.2545}


@pytest.fixture(autouse=True)
def one_thread():
    """The tracker makes thousands of tiny matrix products: on a shared 2-core machine two OpenMP
    threads per process wait on each other; one thread keeps these tests short."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def time_lapse(frames: int = 6, size: int = 64, offset: int = 0) -> np.ndarray:
    """``(T, H, W)`` uint8: two bright squares moving in opposite directions over a dim background
    (`offset` shifts them, so each test has frames of its own in the shared embedding cache)."""
    video = np.full((frames, size, size), 30, np.uint8)
    for t in range(frames):
        x = 6 + 3 * t + offset
        video[t, 10:26, x:x + 16] = 230
        video[t, 38:52, size - 20 - 2 * t - offset:size - 6 - 2 * t - offset] = 170
    return video


def segmenter(widget):
    from promptseg.sessions import shared_segmenter

    return shared_segmenter(widget.model.value, device="cpu")


def test_track_mode_gives_segment_videos_labels_and_tracks(track_widget, run_widget):
    viewer, widget = track_widget
    video = time_lapse()
    image = viewer.add_image(video, name="lapse", axis_labels=("t", "y", "x"), scale=(1.0, 0.5, 0.5))
    widget.prompts.value = "square"

    outcome = run_widget(widget)

    assert outcome.error is None, outcome.error
    expected = segmenter(widget).segment_video(video, ["square"], **THRESHOLDS)
    layer = viewer.layers["lapse segmentation"]
    np.testing.assert_array_equal(layer.data, expected.to_label_volume())  # same computation, same cache
    tracks = expected.tracks()
    assert tracks, "the random model tracked nothing: the comparison would be empty"
    assert layer.data.shape == video.shape and tuple(layer.scale) == tuple(image.scale)
    features = layer.features
    assert list(features["index"]) == [track.object_id + 1 for track in tracks]
    assert list(features["label"]) == [track.label for track in tracks]
    assert list(features["first_frame"]) == [track.first_frame for track in tracks]
    assert list(features["last_frame"]) == [track.last_frame for track in tracks]
    assert list(features["frames"]) == [track.num_frames for track in tracks]
    np.testing.assert_allclose(features["score"], [track.best_score for track in tracks], atol=1e-4)
    # every id in the labels has its row; objects on several frames (the random model's tracks are short)
    assert set(np.unique(layer.data)) - {0} == set(features["index"])
    assert sum(bool(plane.any()) for plane in layer.data) > 1
    assert widget.progress.max == widget.progress.value == len(video)
    meta = layer.metadata["promptseg"]
    assert meta["stack_mode"] == TRACK and meta["axes"] == "TYX" and meta["prompts"] == ["square"]


def test_track_mode_greys_out_and_leaves_out_the_clean_up_and_tiling_fields(track_widget, run_widget):
    viewer, widget = track_widget
    widget.stack_mode.value = LINK
    widget.smooth.value, widget.min_area.value, widget.tiling.value = 2, 5, "on"
    assert widget.smooth.enabled and widget.tile_size.enabled and not widget.new_threshold.enabled

    widget.stack_mode.value = TRACK
    assert not any(getattr(widget, name).enabled for name in ("smooth", "min_area", "tiling", "tile_size"))
    assert widget.new_threshold.enabled
    options = widget.segment_options()
    assert options.decoding.threshold == pytest.approx(0.2545) and options.tiling.tile is None
    assert options.cleanup.min_area == 0 and options.cleanup.smooth == 0

    video = time_lapse(4, offset=2)
    viewer.add_image(video, name="lapse", axis_labels=("t", "y", "x"))
    widget.prompts.value = "square"
    outcome = run_widget(widget)  # the video model refuses min_area/smooth/tile: none reached it
    assert outcome.error is None, outcome.error
    np.testing.assert_array_equal(viewer.layers["lapse segmentation"].data,
                                  segmenter(widget).segment_video(video, "square", **THRESHOLDS).to_label_volume())

    widget.stack_mode.value = SEPARATE
    assert widget.smooth.enabled and widget.min_area.enabled and widget.tile_size.enabled
    assert not widget.new_threshold.enabled


@pytest.mark.parametrize("lazy", [False, True], ids=["numpy", "dask"])
def test_track_mode_reads_a_channel_first_stack_one_slice_at_a_time(track_widget, run_widget, lazy):
    import dask.array as da

    viewer, widget = track_widget
    gray = time_lapse(5, offset=4)
    stack = np.stack([gray, gray // 2, 255 - gray], axis=1)  # ZCYX, three channels
    viewer.add_image(da.from_array(stack, chunks=(1, 3, 64, 64)) if lazy else stack, name="zstack")
    widget.axes.value = "ZCYX"
    widget.prompts.value = "square"

    outcome = run_widget(widget)

    assert outcome.error is None, outcome.error
    layer = viewer.layers["zstack segmentation"]
    expected = segmenter(widget).segment_video(np.moveaxis(stack, 1, -1), "square", **THRESHOLDS)
    assert layer.data.shape == (5, 64, 64)
    np.testing.assert_array_equal(layer.data, expected.to_label_volume())
    assert layer.metadata["promptseg"]["stack_mode"] == TRACK


def test_cancel_stops_between_frames_and_adds_no_layer(track_widget, qtbot, notifications):
    viewer, widget = track_widget
    viewer.add_image(time_lapse(12, offset=6), name="lapse", axis_labels=("t", "y", "x"))
    widget.prompts.value = "square"
    widget._relay.advanced.connect(lambda total, advance: advance and widget.cancel())
    layers_before = len(viewer.layers)

    widget.run()
    qtbot.waitUntil(lambda: not widget.running, timeout=120_000)

    outcome = widget.last_outcome
    assert outcome.cancelled and "cancelled" in outcome.error
    # cancel is asked on the first frame's signal; the worker may finish one more frame before it sees it
    assert widget.progress.value in (1, 2) and widget.progress.max == 12
    assert len(viewer.layers) == layers_before
    assert widget.run_button.enabled and not widget.cancel_button.enabled
    assert any("cancelled" in n.message for n in notifications)


def test_second_prompt_runs_no_image_encoder(track_widget, run_widget):
    viewer, widget = track_widget
    video = time_lapse(5, offset=8)
    viewer.add_image(video, name="lapse", axis_labels=("t", "y", "x"))
    widget.prompts.value = "square"
    before = segmenter(widget).stats.image_encoder_runs

    first = run_widget(widget)
    encoded = segmenter(widget).stats.image_encoder_runs
    widget.prompts.value = "bright block"
    second = run_widget(widget)

    assert first.error is None and second.error is None
    assert encoded - before == len(video) and first.source == "computed"
    assert segmenter(widget).stats.image_encoder_runs == encoded  # 0 runs for the second prompt
    assert second.source == "memory" and "image encoder skipped" in widget.status.value
    layer = viewer.layers["lapse segmentation"]
    np.testing.assert_array_equal(
        layer.data, segmenter(widget).segment_video(video, "bright block", **THRESHOLDS).to_label_volume())
    assert layer.metadata["promptseg"]["prompts"] == ["bright block"]


def test_viewer_processes_events_while_tracking_runs(track_widget, qtbot):
    """A 10 ms QTimer keeps ticking from the first to the last frame: the main thread is not blocked."""
    from qtpy.QtCore import QTimer

    viewer, widget = track_widget
    viewer.add_image(time_lapse(16, offset=10), name="lapse", axis_labels=("t", "y", "x"))
    widget.prompts.value = "square"
    ticks, marks = [], []
    timer = QTimer()
    timer.setInterval(10)
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
    widget._relay.advanced.connect(lambda total, advance: marks.append(time.perf_counter()))
    timer.start()
    try:
        widget.run()
        qtbot.waitUntil(lambda: not widget.running, timeout=180_000)
    finally:
        timer.stop()

    assert widget.last_outcome.error is None and len(marks) == 17  # announce + one per frame
    start, end = marks[0], marks[-1]
    during = [t for t in ticks if start <= t <= end]
    gaps = np.diff([start, *during, end])
    duration = end - start
    print(f"tracking {duration:.2f} s, {len(during)} timer ticks, longest gap {gaps.max() * 1000:.0f} ms")
    assert len(during) >= 10, f"only {len(during)} ticks in {duration:.2f} s of tracking"
    assert gaps.max() < duration / 3, "the event loop stalled for a large part of the tracking"


def test_detector_only_model_is_a_notification_not_a_traceback(viewer_widget, run_widget, notifications):
    viewer, widget = viewer_widget  # tiny_sam3_dir: the detector alone, no video heads
    widget.stack_mode.value = TRACK
    viewer.add_image(time_lapse(3, offset=12), name="lapse", axis_labels=("t", "y", "x"))
    widget.prompts.value = "square"
    layers_before = len(viewer.layers)

    outcome = run_widget(widget)

    assert outcome.error and "facebook/sam3" in outcome.error and not outcome.cancelled
    assert widget.status.value.startswith("Error:") and "facebook/sam3" in widget.status.value
    assert any(str(n.severity) == "error" and "facebook/sam3" in n.message for n in notifications)
    assert len(viewer.layers) == layers_before and widget.run_button.enabled


def test_track_mode_on_a_2d_image_is_refused_before_a_run(track_widget, notifications):
    viewer, widget = track_widget
    viewer.add_image(time_lapse(1)[0], name="one frame")
    widget.prompts.value = "square"

    assert widget.run() is None
    assert "track mode needs a z-stack or time series" in widget.status.value
    assert any(str(n.severity) == "error" and "Choose another stack mode" in n.message for n in notifications)


def test_track_mode_on_two_channels_picks_them_like_other_modes(track_widget, run_widget):
    viewer, widget = track_widget
    gray = time_lapse(3, offset=16)
    stack = np.stack([gray, 255 - gray], axis=1)  # TCYX, 2 channels
    viewer.add_image(stack, name="two channels")
    widget.axes.value = "TCYX"
    widget.channels.value = "1, 0"
    widget.prompts.value = "square"

    outcome = run_widget(widget)

    assert outcome.error is None, outcome.error
    expected = segmenter(widget).segment_video(np.moveaxis(stack, 1, -1), "square", channels=(1, 0), **THRESHOLDS)
    np.testing.assert_array_equal(viewer.layers["two channels segmentation"].data, expected.to_label_volume())


@pytest.mark.parametrize("text, message", [
    ("high", "new object score must be a score between 0 and 1"),
    ("1.5", "new_threshold must be a number between 0 and 1"),
])
def test_bad_new_object_score_is_an_error_message(track_widget, qtbot, notifications, text, message):
    viewer, widget = track_widget
    viewer.add_image(time_lapse(2, offset=14), name="lapse", axis_labels=("t", "y", "x"))
    widget.prompts.value = "square"
    widget.new_threshold.value = text
    layers_before = len(viewer.layers)

    widget.run()  # a number out of range is the core's to refuse, in the worker
    qtbot.waitUntil(lambda: not widget.running, timeout=60_000)
    assert message in widget.status.value
    assert any(str(n.severity) == "error" and message in n.message for n in notifications)
    assert len(viewer.layers) == layers_before
