"""Layers the widget cannot fully use: a notification says why, and what can be used is used.

Lazy (dask) layers are read by napari a piece at a time for display; the widget must not read a
huge one whole, and a slice whose file went missing must not stop the other slices.
"""

from __future__ import annotations

import numpy as np
import pytest

from napari_helpers import structured
from promptseg.images import MAX_PIXELS_ENV

pytestmark = [pytest.mark.gui, pytest.mark.slow]


def _by_severity(notifications, severity):
    return [n.message for n in notifications if str(n.severity) == severity]


def lazy_stack(tmp_path, count, shape=(64, 80)):
    """A dask stack with one ``.npy`` file per slice, each read only when that slice is computed."""
    import dask
    import dask.array as da

    paths = []
    for index in range(count):
        paths.append(tmp_path / f"z{index:02d}.npy")
        np.save(paths[-1], structured(shape, seed=index, dtype=np.uint16, high=3000))
    slices = [da.from_delayed(dask.delayed(np.load)(str(p)), shape, np.uint16) for p in paths]
    return da.stack(slices), paths


def test_layer_over_the_pixel_budget_is_refused_before_its_pixels_are_read(viewer_widget, notifications, monkeypatch):
    import dask.array as da

    monkeypatch.delenv(MAX_PIXELS_ENV, raising=False)
    viewer, widget = viewer_widget
    reads = []
    level0 = da.zeros((20000, 20000), np.uint8, chunks=2048).map_blocks(
        lambda block: reads.append(block.shape) or block, meta=np.empty((0, 0), np.uint8)
    )
    viewer.add_image([level0, np.zeros((1250, 1250), np.uint8)], multiscale=True, contrast_limits=(0, 255),
                     name="slide")
    widget.prompts.value = "nucleus"
    read_for_display = len(reads)
    layers_before = len(viewer.layers)

    assert widget.run() is None

    assert not widget.running and len(viewer.layers) == layers_before
    assert len(reads) == read_for_display, "the widget read level 0 of the pyramid"
    [message] = _by_severity(notifications, "error")
    assert "'slide'" in message and "20000 x 20000" in message and MAX_PIXELS_ENV in message
    assert "Error" in widget.status.value


def test_a_stack_slice_whose_file_went_missing_is_reported_and_the_rest_segmented(
    viewer_widget, run_widget, notifications, tmp_path
):
    viewer, widget = viewer_widget
    stack, paths = lazy_stack(tmp_path, 5)
    viewer.add_image(stack, contrast_limits=(0, 3000), name="lazy stack")
    paths[4].unlink()  # the last slice's file was moved away after the layer was opened
    widget.prompts.value = "cell"

    outcome = run_widget(widget)

    assert outcome.error is None and list(outcome.skipped) == [4]
    labels = viewer.layers[-1]
    assert labels.data.shape == (5, 64, 80) and labels.data[:4].any() and not labels.data[4].any()
    [warning] = _by_severity(notifications, "warning")
    assert "1 of 5 slices could not be used" in warning and "Slice 4" in warning and "FileNotFoundError" in warning
    assert _by_severity(notifications, "error") == []
    assert "skipped slices: 4" in widget.status.value


def test_a_stack_with_no_readable_slice_gives_a_notification_not_a_traceback(
    viewer_widget, run_widget, notifications, tmp_path
):
    viewer, widget = viewer_widget
    stack, paths = lazy_stack(tmp_path, 3)
    viewer.add_image(stack, contrast_limits=(0, 3000))
    for path in paths:
        path.unlink()
    widget.prompts.value = "cell"
    layers_before = len(viewer.layers)

    outcome = run_widget(widget)

    assert outcome is not None and "No slice of the stack could be used" in outcome.error
    assert _by_severity(notifications, "error") == [outcome.error]
    assert len(viewer.layers) == layers_before and widget.run_button.enabled


def test_a_lazy_image_whose_file_went_missing_gives_a_notification_not_a_traceback(
    viewer_widget, run_widget, notifications, tmp_path
):
    import dask
    import dask.array as da

    viewer, widget = viewer_widget
    path = tmp_path / "image.npy"
    np.save(path, structured((64, 80), seed=9, dtype=np.uint16, high=3000))
    viewer.add_image(da.from_delayed(dask.delayed(np.load)(str(path)), (64, 80), np.uint16),
                     contrast_limits=(0, 3000), name="lazy image")
    path.unlink()
    widget.prompts.value = "cell"
    layers_before = len(viewer.layers)

    outcome = run_widget(widget)

    assert outcome is not None and "Cannot read the pixels of the layer" in outcome.error
    assert "FileNotFoundError" in outcome.error
    assert _by_severity(notifications, "error") == [outcome.error]
    assert len(viewer.layers) == layers_before and widget.run_button.enabled
