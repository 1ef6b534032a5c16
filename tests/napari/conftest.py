"""A real napari viewer with the *Segment by text* or *Segment by clicks* widget docked, on a tiny random SAM 3.

GUI tests need a real X server (run under ``xvfb-run -a``). napari's pytest plugin provides
``make_napari_viewer``; pytest-qt provides ``qtbot``.
"""

from __future__ import annotations

import pytest

import napari  # noqa: F401


@pytest.fixture
def viewer_widget(make_napari_viewer, tiny_sam3_dir):
    """``(viewer, widget)``: the widget docked as napari docks it, tiny model on the CPU, threshold 0."""
    from promptseg_napari._widget import SegmentWidget

    viewer = make_napari_viewer()
    widget = SegmentWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Segment by text")
    widget.model.value = str(tiny_sam3_dir)
    widget.device.value = "cpu"
    widget.threshold.value = 0.0  # the random model scores about 0.25
    yield viewer, widget
    if widget.running:  # never leave a worker behind a closing viewer
        widget.cancel()
        from napari.qt.threading import WorkerBase

        WorkerBase.await_workers(10_000)


@pytest.fixture
def run_widget(qtbot):
    """Press Run and wait (bounded) until the worker has finished; returns the outcome."""

    def run(widget, timeout_ms: int = 120_000):
        widget.run()
        qtbot.waitUntil(lambda: not widget.running, timeout=timeout_ms)
        return widget.last_outcome

    return run


@pytest.fixture
def notifications():
    """The napari notifications dispatched during the test (a live list)."""
    from napari.utils.notifications import notification_manager

    seen = []
    notification_manager.notification_ready.connect(seen.append)
    yield seen
    notification_manager.notification_ready.disconnect(seen.append)



@pytest.fixture
def clicks_widget(make_napari_viewer, tiny_sam3_hub_dir):
    """``(viewer, widget)``: the *Segment by clicks* widget docked, the hub-layout tiny SAM 3 (with
    its tracker) on the CPU."""
    from promptseg_napari._clicks import ClicksWidget

    viewer = make_napari_viewer()
    widget = ClicksWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Segment by clicks")
    widget.model.value = str(tiny_sam3_hub_dir)
    widget.device.value = "cpu"
    yield viewer, widget
    widget.finish_object()  # drop any queued update
    from napari.qt.threading import WorkerBase

    WorkerBase.await_workers(10_000)


@pytest.fixture
def settle(qtbot):
    """Wait (bounded) until the clicks widget has no update waiting, queued or running."""

    def wait(widget, timeout_ms: int = 60_000):
        qtbot.waitUntil(lambda: not widget.busy, timeout=timeout_ms)
        return widget.last_outcome

    return wait


@pytest.fixture(scope="session")
def tiny_sam3_video_napari_dir(tmp_path_factory):
    """The hub-layout tiny SAM 3 (detector and tracker) 128 channels wide: the width transformers'
    video memory attention runs at, so the video model can track with it."""
    from promptseg.testing import make_random_sam3_video

    return make_random_sam3_video(tmp_path_factory.mktemp("models") / "tiny-sam3-video", hidden=128)


@pytest.fixture
def track_widget(make_napari_viewer, tiny_sam3_video_napari_dir):
    """``(viewer, widget)``: *Segment by text* in track mode on the video-capable tiny SAM 3, on the CPU,
    with the scores that let the random model's few best detections start and keep tracks."""
    from promptseg_napari._widget import TRACK, SegmentWidget

    viewer = make_napari_viewer()
    widget = SegmentWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Segment by text")
    widget.model.value = str(tiny_sam3_video_napari_dir)
    widget.device.value = "cpu"
    widget.stack_mode.value = TRACK
    widget.threshold.value = 0.2545  # the random model scores every query near 0.25
    widget.new_threshold.value = "0.2545"
    yield viewer, widget
    if widget.running:
        widget.cancel()
        from napari.qt.threading import WorkerBase

        WorkerBase.await_workers(10_000)
