"""The *Segment by text* widget in a real napari viewer, driven like a user would, on the tiny SAM 3."""

from __future__ import annotations

import time

import numpy as np
import pytest

from napari_helpers import structured

pytestmark = [pytest.mark.gui, pytest.mark.slow]


def _errors(notifications):
    return [n.message for n in notifications if str(n.severity) == "error"]


@pytest.mark.parametrize(
    "shape, dtype, kwargs, axes, labels_shape",
    [
        ((96, 128), np.uint8, {"scale": (0.5, 0.25), "translate": (10, -3)}, "auto", (96, 128)),
        ((96, 128, 3), np.uint8, {"scale": (2.0, 2.0), "translate": (0, 5)}, "auto", (96, 128)),
        ((96, 128), np.uint16, {"scale": (0.3, 0.3)}, "auto", (96, 128)),
        ((3, 96, 128), np.float32, {"scale": (1.0, 0.7, 0.7)}, "CYX", (96, 128)),
        ((4, 64, 80), np.uint16, {"scale": (2.0, 0.5, 0.5), "translate": (1, 2, 3)}, "auto", (4, 64, 80)),
        ((3, 64, 80, 3), np.uint8, {"scale": (5.0, 1.0, 1.0)}, "TYXC", (3, 64, 80)),
    ],
    ids=["2d-uint8", "rgb", "2d-uint16", "multichannel-CYX", "z-stack-uint16", "rgb-time-series"],
)
def test_labels_layer_matches_image_shape_scale_and_translate(
    viewer_widget, run_widget, notifications, shape, dtype, kwargs, axes, labels_shape
):
    viewer, widget = viewer_widget
    high = 255 if dtype == np.uint8 else 4000
    image = viewer.add_image(structured(shape, seed=len(shape), dtype=dtype, high=high), **kwargs)
    widget.axes.value = axes
    widget.prompts.value = "cell, blob"

    outcome = run_widget(widget)

    assert outcome.error is None and _errors(notifications) == []
    labels = viewer.layers[-1]
    assert labels.__class__.__name__ == "Labels" and labels.name == f"{image.name} segmentation"
    assert labels.data.shape == labels_shape
    assert labels.data.dtype == np.int32
    # the Labels axes are the image's non-channel axes, with their scale and translate
    spatial = [i for i, a in enumerate(widget.make_job().source.axes) if a != "C"]
    assert np.allclose(labels.scale, [image.scale[i] for i in spatial])
    assert np.allclose(labels.translate, [image.translate[i] for i in spatial])
    features = labels.features
    assert list(features.columns[:4]) == ["index", "label", "score", "area"]
    assert len(features) > 0, "threshold 0 keeps the random model's detections"
    assert set(features["label"]) <= {"cell", "blob"}
    ids = set(np.unique(labels.data)) - {0}
    assert ids and ids <= set(features["index"])
    assert widget.progress.value == widget.progress.max == (shape[0] if len(labels_shape) == 3 else 1)


def test_status_bar_shows_label_and_score_under_the_cursor(viewer_widget, run_widget):
    viewer, widget = viewer_widget
    viewer.add_image(structured((96, 128), seed=11))
    widget.prompts.value = "nucleus"
    run_widget(widget)
    labels = viewer.layers[-1]
    value = int(labels.data.max())
    y, x = np.argwhere(labels.data == value)[0]
    row = labels.features.set_index("index").loc[value]

    status = labels.get_status((y, x))["coordinates"]

    assert f"label: {row['label']}" in status and f"score: {row['score']:.3g}"[:10] in status


def test_viewer_processes_events_while_inference_runs(viewer_widget, qtbot):
    """A 10 ms QTimer keeps ticking while the model runs: the main thread is not blocked.

    Measured from the first to the last progress signal (the inference), not the Labels layer
    update afterwards, which napari does on the main thread by design.
    """
    from qtpy.QtCore import QTimer

    viewer, widget = viewer_widget
    viewer.add_image(structured((12, 96, 96), seed=3, dtype=np.uint16, high=3000))
    widget.prompts.value = "cell"
    ticks, progress_seen, marks = [], set(), []
    timer = QTimer()
    timer.setInterval(10)
    timer.timeout.connect(lambda: (ticks.append(time.perf_counter()), progress_seen.add(widget.progress.value)))
    widget._relay.advanced.connect(lambda total, advance: marks.append(time.perf_counter()))
    timer.start()
    try:
        widget.run()
        qtbot.waitUntil(lambda: not widget.running, timeout=180_000)
    finally:
        timer.stop()

    assert widget.last_outcome.error is None and len(marks) == 13  # announce + one per slice
    start, end = marks[0], marks[-1]
    during = [t for t in ticks if start <= t <= end]
    gaps = np.diff([start, *during, end])
    duration = end - start
    print(f"inference {duration:.2f} s, {len(during)} timer ticks, longest gap {gaps.max() * 1000:.0f} ms")
    assert len(during) >= 10, f"only {len(during)} ticks in {duration:.2f} s of inference"
    assert gaps.max() < duration / 3, "the event loop stalled for a large part of the inference"
    # the bar moved through intermediate slices while the timer was running
    assert any(0 < value < 12 for value in progress_seen), sorted(progress_seen)


def test_cancel_stops_at_the_next_slice_and_adds_no_layer(viewer_widget, qtbot, notifications):
    viewer, widget = viewer_widget
    viewer.add_image(structured((40, 96, 96), seed=5, dtype=np.uint16, high=3000))
    widget.prompts.value = "cell"
    widget._relay.advanced.connect(lambda total, advance: advance and widget.cancel())
    layers_before = len(viewer.layers)

    widget.run()
    qtbot.waitUntil(lambda: not widget.running, timeout=120_000)

    outcome = widget.last_outcome
    assert outcome.cancelled and "cancelled" in outcome.error
    # cancel is requested on the first slice's signal; the worker may finish one more slice before it sees it
    assert widget.progress.value in (1, 2) and widget.progress.max == 40
    assert len(viewer.layers) == layers_before
    assert widget.run_button.enabled and not widget.cancel_button.enabled
    assert any("cancelled" in n.message for n in notifications)
    assert "Cancelled" in widget.status.value


def test_rerun_updates_the_layer_in_place_unless_asked_to_keep(viewer_widget, run_widget):
    viewer, widget = viewer_widget
    viewer.add_image(structured((96, 128), seed=7))
    widget.prompts.value = "cell"
    run_widget(widget)
    first = viewer.layers[-1]
    count = len(viewer.layers)

    widget.prompts.value = "dog"
    run_widget(widget)

    assert len(viewer.layers) == count and viewer.layers[-1] is first
    assert set(first.features["label"]) == {"dog"}
    assert first.metadata["promptseg"]["prompts"] == ["dog"]

    widget.keep.value = True
    widget.prompts.value = "tree"
    run_widget(widget)

    assert len(viewer.layers) == count + 1
    assert set(first.features["label"]) == {"dog"} and set(viewer.layers[-1].features["label"]) == {"tree"}


def test_second_prompt_reuses_the_cached_embedding_and_says_so(viewer_widget, run_widget):
    from promptseg.sessions import shared_segmenter

    viewer, widget = viewer_widget
    viewer.add_image(structured((96, 128), seed=int(time.time_ns() % 100_000) + 100))  # unseen pixels
    widget.prompts.value = "cell"
    first = run_widget(widget)
    assert first.source == "computed" and "computed" in widget.status.value
    segmenter = shared_segmenter(widget.model.value, device="cpu")
    encoder_runs = segmenter.stats.image_encoder_runs

    widget.prompts.value = "nucleus"
    second = run_widget(widget)

    assert second.source == "memory" and "cached" in widget.status.value
    assert segmenter.stats.image_encoder_runs == encoder_runs
    assert shared_segmenter(widget.model.value, device="cpu") is segmenter, "one segmenter per (model, device)"


def test_no_image_layer_gives_a_notification(viewer_widget, notifications):
    viewer, widget = viewer_widget
    viewer.add_labels(np.zeros((32, 32), dtype=np.int32))
    widget.prompts.value = "cell"
    assert [c for c in widget.image.choices if c is not None] == []  # only image layers are offered

    assert widget.run() is None

    assert not widget.running
    assert any("No image layer" in m for m in _errors(notifications))


def test_empty_prompt_gives_a_notification(viewer_widget, notifications):
    viewer, widget = viewer_widget
    viewer.add_image(structured((32, 32)))
    widget.prompts.value = " ,  ; "

    assert widget.run() is None

    assert any("Type what to segment" in m for m in _errors(notifications))
    assert "Error" in widget.status.value


def test_layer_with_unknown_axes_gives_a_notification(viewer_widget, notifications):
    viewer, widget = viewer_widget
    viewer.add_image(np.zeros((2, 3, 32, 32), dtype=np.uint16))
    widget.prompts.value = "cell"

    assert widget.run() is None
    widget.axes.value = "ZYX"
    assert widget.run() is None

    errors = _errors(notifications)
    assert "Choose the axes" in errors[0] and "does not fit" in errors[1]


def test_model_that_cannot_load_gives_a_notification(viewer_widget, run_widget, notifications, tmp_path):
    viewer, widget = viewer_widget
    viewer.add_image(structured((32, 32)))
    widget.prompts.value = "cell"
    widget.model.value = str(tmp_path / "no-such-model")

    outcome = run_widget(widget)

    assert outcome.error and _errors(notifications) == [outcome.error]
    assert widget.run_button.enabled


def test_sample_data_opens_and_segments(viewer_widget, run_widget):
    viewer, widget = viewer_widget
    viewer.open_sample("promptseg", "nuclei")
    image = viewer.layers["synthetic nuclei"]
    assert image.data.dtype == np.uint16 and image.data.shape == (512, 512)
    widget.prompts.value = "nucleus"

    outcome = run_widget(widget)

    assert outcome.error is None
    assert viewer.layers[-1].data.shape == image.data.shape


def test_tiling_progress_counts_tiles(viewer_widget, run_widget):
    viewer, widget = viewer_widget
    viewer.add_image(structured((200, 200), seed=13), scale=(0.5, 0.5))
    widget.prompts.value = "cell"
    widget.tiling.value = "on"
    assert widget.tile_size.enabled
    widget.tile_size.value = 112  # the tiny model's input size: a 2 x 2 grid with overlap
    steps = []
    widget._relay.advanced.connect(lambda total, advance: steps.append((total, advance)))

    outcome = run_widget(widget)

    assert outcome.error is None
    assert steps == [(4, 0)] + [(4, 1)] * 4
    assert widget.progress.value == widget.progress.max == 4
    assert viewer.layers[-1].data.shape == (200, 200)


def test_form_defaults_limits_and_help_are_the_cores(viewer_widget):
    from promptseg.options import SegmentOptions, option_info
    from promptseg_napari._widget import SegmentWidget

    viewer, _ = viewer_widget
    widget = SegmentWidget(viewer)  # a fresh one, as it opens (the fixture's has threshold 0)
    viewer.window.add_dock_widget(widget, name="Segment by text (fresh)")
    assert widget.segment_options() == SegmentOptions()
    for name in ("threshold", "smooth", "min_area"):
        control, info = getattr(widget, name), option_info(name)
        assert control.value == info.default and control.min == info.minimum, name
        assert info.help[1:] in control.tooltip, name
    assert widget.threshold.max == option_info("threshold").maximum
    assert widget.tiling.value == "off" and option_info("tile").default is None


def test_form_options_reach_the_core(viewer_widget, run_widget):
    from promptseg.options import SegmentOptions
    from promptseg.sessions import shared_segmenter

    viewer, widget = viewer_widget
    image = viewer.add_image(structured((96, 128), seed=21))
    widget.prompts.value = "cell, blob"
    everything = run_widget(widget)
    areas = sorted(everything.features["area"])
    assert len(areas) > 1
    widget.min_area.value, widget.smooth.value = areas[-1], 1

    outcome = run_widget(widget)

    options = SegmentOptions.from_flat(threshold=0.0, min_area=areas[-1], smooth=1)
    assert widget.segment_options() == options
    expected = shared_segmenter(widget.model.value, device="cpu").segment(image.data, ["cell", "blob"], options)
    assert 0 < len(outcome.features["area"]) < len(areas)
    assert outcome.features["area"] == [inst.area for inst in expected.instances]
    np.testing.assert_array_equal(outcome.labels, expected.to_label_image(np.int32))


def test_bad_channels_are_refused_by_the_core_before_a_run(viewer_widget, notifications):
    viewer, widget = viewer_widget
    viewer.add_image(np.zeros((5, 32, 32), dtype=np.uint16))
    widget.axes.value = "CYX"
    widget.prompts.value = "cell"
    widget.channels.value = "0, 1, 2, 3"

    assert widget.run() is None and not widget.running
    assert any("channels must be one to three channel indices" in m for m in _errors(notifications))
