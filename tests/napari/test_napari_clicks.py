"""The *Segment by clicks* widget in a real napari viewer, on the hub-layout tiny SAM 3 (which has the
tracker head that visual prompts need).

The painted pixels are compared with a direct `segment_object` call on the same shared segmenter
with the same prompts: both decode the same cached embedding with the same inputs, one prompt set
at a time, so they are the same computation and compared exactly. The random model's masks are
arbitrary shapes; what is checked is where the widget paints them, not what they look like.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from napari_helpers import structured

pytestmark = [pytest.mark.gui, pytest.mark.slow]


def _segmenter(widget):
    from promptseg.sessions import shared_segmenter

    return shared_segmenter(widget.model.value, device="cpu")


def _core_mask(widget, pixels, points=None, labels=None, box=None, mask=None, **options) -> np.ndarray:
    """The core's mask for these prompts (the widget asks SAM for one mask when it refines)."""
    result = _segmenter(widget).segment_object(
        pixels, points, labels, box, mask=mask, multimask=False if mask is not None else None, **options
    )
    return result.instances[0].full_mask(*result.image_size)


def _click(widget, position, positive=True):
    """Add a click as napari's add mode does: the layer's feature default, then `add`."""
    layer = widget.points_layer
    layer.feature_defaults = {"positive": positive}
    layer.add(position)


def _errors(notifications):
    return [n.message for n in notifications if str(n.severity) == "error"]


def _labels_with(shape, regions):
    """An int32 label image with `regions` = {id: (rows, cols)} painted in."""
    data = np.zeros(shape, dtype=np.int32)
    for value, (rows, cols) in regions.items():
        data[rows, cols] = value
    return data


def test_clicks_paint_the_cores_mask_as_a_new_label_and_leave_other_labels_alone(clicks_widget, settle):
    viewer, widget = clicks_widget
    image = viewer.add_image(structured((96, 128), seed=31), scale=(0.5, 0.25), translate=(10, -3))
    before = _labels_with((96, 128), {1: (slice(20, 60), slice(50, 120)), 5: (slice(0, 10), slice(0, 10))})
    labels = viewer.add_labels(before.copy(), scale=(0.5, 0.25), translate=(10, -3))
    widget.target.value = labels
    assert widget.points_layer.ndim == 2 and np.allclose(widget.points_layer.scale, image.scale)

    _click(widget, (30, 40))
    settle(widget)
    _click(widget, (50, 100), positive=False)
    outcome = settle(widget)

    assert outcome.error is None
    assert list(widget.points_layer.features["positive"]) == [True, False]
    expected = _core_mask(widget, image.data, [(40, 30), (100, 50)], [1, 0])
    assert labels.selected_label == 6, "a new object takes the next free id"
    painted = labels.data == 6
    np.testing.assert_array_equal(painted, expected & (before == 0))
    np.testing.assert_array_equal(labels.data[~painted], before[~painted])  # other ids kept, even under the mask
    assert (expected & (before == 1)).any(), "the mask reaches label 1, which keeps its pixels"
    assert "label 6" in widget.status.value and "image encoder skipped" in widget.status.value


def test_every_update_is_one_undo_step_of_the_labels_layer(clicks_widget, settle):
    viewer, widget = clicks_widget
    image = viewer.add_image(structured((96, 128), seed=32))
    points = widget.points_layer

    points.data = np.array([[30.0, 40.0]])  # through the layer's data, new rows take the default (positive)
    settle(widget)
    labels = widget.target.value
    assert labels is not None and labels.name == f"{image.name} objects"
    layers = viewer.layers
    assert layers.index(labels) < layers.index(widget.box_layer) < layers.index(points), "prompts drawn on top"
    assert layers.selection.active is points, "still ready to click"
    first = labels.data.copy()
    points.feature_defaults = {"positive": False}
    points.data = np.array([[30.0, 40.0], [40.0, 60.0]])
    settle(widget)
    second = labels.data.copy()

    # exact: the widget's segmenter decodes the same cached embedding with the same code
    np.testing.assert_array_equal(second == 1, _core_mask(widget, image.data, [(40, 30), (60, 40)], [1, 0]))
    assert (first != second).any(), "the negative click changed the object"
    labels.undo()
    np.testing.assert_array_equal(labels.data, first)
    labels.undo()
    assert not labels.data.any(), "undo restores the layer as it was before the first click"
    labels.redo()
    np.testing.assert_array_equal(labels.data, first)


def test_a_box_drawn_in_the_shapes_layer_is_the_box_prompt(clicks_widget, settle):
    viewer, widget = clicks_widget
    image = viewer.add_image(structured((96, 128), seed=33))

    widget.box_layer.add_rectangles(np.array([[10.0, 20.0], [60.0, 90.0]]))  # as the rectangle tool adds it
    settle(widget)
    labels = widget.target.value
    np.testing.assert_array_equal(labels.data == 1, _core_mask(widget, image.data, box=(20, 10, 90, 60)))

    _click(widget, (70, 100), positive=False)
    settle(widget)
    np.testing.assert_array_equal(
        labels.data == 1, _core_mask(widget, image.data, [(100, 70)], [0], box=(20, 10, 90, 60))
    )

    # another shape counts as its bounding box; the last one drawn is the box
    widget.box_layer.add_polygons([np.array([[5.0, 30.0], [40.0, 70.0], [5.0, 110.0]])])
    settle(widget)
    np.testing.assert_array_equal(
        labels.data == 1, _core_mask(widget, image.data, [(100, 70)], [0], box=(30, 5, 110, 40))
    )


def test_refine_changes_only_the_label_under_the_first_click(clicks_widget, settle):
    viewer, widget = clicks_widget
    image = viewer.add_image(structured((96, 128), seed=34))
    before = _labels_with((96, 128), {1: (slice(15, 50), slice(15, 70)), 2: (slice(50, 90), slice(60, 120))})
    labels = viewer.add_labels(before.copy())
    widget.target.value = labels
    widget.mode.value = "refine selected label"
    labels.selected_label = 2  # the click decides: it lands on label 1

    _click(widget, (40, 60), positive=False)
    _click(widget, (30, 30))  # the first positive click decides the label
    settle(widget)

    assert labels.selected_label == 1
    expected = _core_mask(widget, image.data, [(60, 40), (30, 30)], [0, 1], mask=before == 1)
    np.testing.assert_array_equal(labels.data == 1, expected & ((before == 0) | (before == 1)))
    np.testing.assert_array_equal(labels.data == 2, before == 2)
    assert (labels.data != before).any()


def test_refine_on_background_uses_the_selected_label(clicks_widget, settle):
    viewer, widget = clicks_widget
    image = viewer.add_image(structured((96, 128), seed=35))
    before = _labels_with((96, 128), {1: (slice(15, 50), slice(15, 70)), 2: (slice(50, 90), slice(60, 120))})
    labels = viewer.add_labels(before.copy())
    widget.target.value = labels
    widget.mode.value = "refine selected label"
    labels.selected_label = 2

    _click(widget, (80, 20))  # background
    settle(widget)

    expected = _core_mask(widget, image.data, [(20, 80)], [1], mask=before == 2)
    np.testing.assert_array_equal(labels.data == 2, expected & ((before == 0) | (before == 2)))
    np.testing.assert_array_equal(labels.data == 1, before == 1)


def test_a_click_on_a_z_stack_changes_only_the_current_slice(clicks_widget, settle):
    viewer, widget = clicks_widget
    stack = structured((4, 64, 80), seed=36, dtype=np.uint16, high=3000)
    image = viewer.add_image(stack, scale=(2.0, 0.5, 0.5), translate=(1, 2, 3))
    viewer.dims.set_point(0, 1 + 2 * 2)  # world z of slice 2
    points = widget.points_layer
    assert points.ndim == 3

    _click(widget, (1, 10, 10))  # a click kept on slice 1 is not a prompt for slice 2
    _click(widget, (2, 30, 40))
    settle(widget)

    labels = widget.target.value
    assert labels.data.shape == (4, 64, 80) and np.allclose(labels.scale, image.scale)
    np.testing.assert_array_equal(labels.data[2] == 1, _core_mask(widget, stack[2], [(40, 30)], [1]))
    assert labels.data[2].any() and not labels.data[[0, 1, 3]].any()


def test_several_clicks_and_a_box_run_the_image_encoder_once(clicks_widget, settle):
    viewer, widget = clicks_widget
    viewer.add_image(structured((96, 128), seed=int(time.time_ns() % 100_000) + 500))  # unseen pixels
    _click(widget, (30, 40))
    settle(widget)
    stats = _segmenter(widget).stats
    encoder, decoder = stats.image_encoder_runs, stats.decoder_runs

    for position, positive in [((50, 100), False), ((20, 30), True), ((60, 20), False)]:
        _click(widget, position, positive)
        settle(widget)
    widget.box_layer.data = [np.array([[10.0, 20.0], [10.0, 90.0], [60.0, 90.0], [60.0, 20.0]])]
    settle(widget)

    assert stats.image_encoder_runs == encoder
    assert stats.decoder_runs == decoder + 4
    assert widget.last_outcome.source == "memory"


def test_clicks_in_quick_succession_are_one_update(clicks_widget, settle):
    viewer, widget = clicks_widget
    image = viewer.add_image(structured((96, 128), seed=37))
    _click(widget, (30, 40))
    settle(widget)
    decoder = _segmenter(widget).stats.decoder_runs

    for position in [(35, 45), (40, 50), (45, 55)]:  # faster than the debounce interval
        _click(widget, position)
    settle(widget)

    assert _segmenter(widget).stats.decoder_runs == decoder + 1
    clicks = [(40, 30), (45, 35), (50, 40), (55, 45)]
    np.testing.assert_array_equal(widget.target.value.data == 1, _core_mask(widget, image.data, clicks, [1] * 4))


def test_viewer_processes_events_while_the_worker_runs(clicks_widget, qtbot):
    """A 10 ms QTimer keeps ticking while the worker loads the model and encodes the image."""
    from qtpy.QtCore import QTimer

    from promptseg.sessions import clear_shared_segmenters

    viewer, widget = clicks_widget
    viewer.add_image(structured((96, 128), seed=38))
    clear_shared_segmenters()  # the first click loads the model in the worker, as in a new session
    ticks = []
    timer = QTimer()
    timer.setInterval(10)
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
    timer.start()
    try:
        _click(widget, (30, 40))
        qtbot.waitUntil(lambda: widget._worker is not None, timeout=5_000)
        start = time.perf_counter()
        qtbot.waitUntil(lambda: widget._worker is None, timeout=120_000)
        end = time.perf_counter()
    finally:
        timer.stop()

    assert widget.last_outcome.error is None and widget.last_outcome.source == "computed"
    during = [t for t in ticks if start <= t <= end]
    gaps = np.diff([start, *during, end])
    duration = end - start
    print(f"worker {duration:.2f} s, {len(during)} timer ticks, longest gap {gaps.max() * 1000:.0f} ms")
    assert len(during) >= 10, f"only {len(during)} ticks in {duration:.2f} s of work"
    assert gaps.max() < duration / 3, "the event loop stalled for a large part of the work"


def test_finish_object_clears_the_prompts_and_the_next_click_is_a_new_label(clicks_widget, settle, qtbot):
    from qtpy.QtCore import Qt

    viewer, widget = clicks_widget
    viewer.add_image(structured((96, 128), seed=39))
    _click(widget, (30, 40))
    widget.box_layer.data = [np.array([[10.0, 20.0], [10.0, 90.0], [60.0, 90.0], [60.0, 20.0]])]
    settle(widget)
    labels = widget.target.value
    first = labels.data.copy()
    assert viewer.layers.selection.active is widget.points_layer

    qtbot.keyClick(viewer.window._qt_viewer.canvas.native, Qt.Key_N)  # the clicks layer's shortcut

    assert len(widget.points_layer.data) == 0 and len(widget.box_layer.data) == 0
    assert "Label 1 finished" in widget.status.value
    settle(widget)
    np.testing.assert_array_equal(labels.data, first), "clearing the prompts keeps the object"
    _click(widget, (80, 110))
    settle(widget)
    assert labels.selected_label == 2 and (labels.data == 2).any()
    np.testing.assert_array_equal(labels.data[first == 1], first[first == 1])

    viewer.layers.remove(widget.box_layer)  # deleted by hand: Finish object brings it back
    widget.finish_object()
    assert widget.box_layer in viewer.layers and widget.box_layer.mode == "add_rectangle"


def test_shift_click_adds_a_negative_point_and_t_toggles_the_kind(clicks_widget, settle, qtbot):
    from qtpy.QtCore import QPoint, Qt

    viewer, widget = clicks_widget
    viewer.add_image(structured((96, 128), seed=40))
    viewer.reset_view()
    canvas = viewer.window._qt_viewer.canvas.native
    centre = QPoint(canvas.width() // 2, canvas.height() // 2)
    points = widget.points_layer
    qtbot.waitUntil(lambda: viewer.layers.selection.active is points, timeout=5_000)  # ready to click
    assert points.mode == "add"

    qtbot.mouseClick(canvas, Qt.LeftButton, Qt.NoModifier, centre)
    qtbot.mouseClick(canvas, Qt.LeftButton, Qt.ShiftModifier, centre + QPoint(20, 0))
    qtbot.keyClick(canvas, Qt.Key_T)
    assert widget.negative.value
    qtbot.mouseClick(canvas, Qt.LeftButton, Qt.NoModifier, centre + QPoint(0, 20))
    qtbot.mouseClick(canvas, Qt.LeftButton, Qt.ShiftModifier, centre + QPoint(20, 20))
    settle(widget)

    assert list(points.features["positive"]) == [True, False, False, True]
    colours = [tuple(np.round(c[:3], 2)) for c in points.face_color]
    assert colours == [(0.0, 1.0, 0.0), (1.0, 0.0, 0.0), (1.0, 0.0, 0.0), (0.0, 1.0, 0.0)]


def test_a_model_without_the_visual_prompt_head_is_a_clear_error(clicks_widget, settle, notifications, tiny_sam3_dir):
    viewer, widget = clicks_widget
    viewer.add_image(structured((64, 64), seed=41))
    widget.model.value = str(tiny_sam3_dir)  # a Sam3Model save: the text detector only

    _click(widget, (30, 40))
    outcome = settle(widget)

    assert "no visual-prompt head" in outcome.error and "facebook/sam3" in outcome.error
    assert "no visual-prompt head" in widget.status.value and widget.status.value.startswith("Error")
    assert _errors(notifications) == [outcome.error]
    assert not widget.target.value.data.any()


def test_a_click_outside_the_image_is_a_clear_error(clicks_widget, settle, notifications):
    viewer, widget = clicks_widget
    viewer.add_image(structured((64, 64), seed=42))

    _click(widget, (30, 200))
    outcome = settle(widget)

    assert "outside the 64x64 image" in outcome.error
    assert "outside" in widget.status.value and _errors(notifications) == [outcome.error]
    assert not widget.target.value.data.any()


def test_a_labels_layer_of_another_shape_is_refused(clicks_widget, settle, notifications):
    viewer, widget = clicks_widget
    viewer.add_image(structured((64, 64), seed=43))
    labels = viewer.add_labels(np.zeros((32, 32), dtype=np.int32))
    widget.target.value = labels

    _click(widget, (30, 40))
    settle(widget)

    assert any("has shape (32, 32), the image needs (64, 64)" in m for m in _errors(notifications))
    assert not labels.data.any() and widget._worker is None


def test_removing_every_click_restores_the_object_as_it_was(clicks_widget, settle):
    viewer, widget = clicks_widget
    viewer.add_image(structured((96, 128), seed=44))
    before = _labels_with((96, 128), {1: (slice(15, 50), slice(15, 70)), 2: (slice(50, 90), slice(60, 120))})
    labels = viewer.add_labels(before.copy())
    widget.target.value = labels
    widget.mode.value = "refine selected label"
    _click(widget, (30, 30))
    _click(widget, (40, 60), positive=False)
    settle(widget)
    assert (labels.data != before).any()

    widget.points_layer.data = np.empty((0, 2))
    settle(widget)

    np.testing.assert_array_equal(labels.data, before)
    assert "object restored" in widget.status.value


def test_refine_with_no_label_under_the_click_and_none_selected_is_a_clear_error(clicks_widget, settle, notifications):
    viewer, widget = clicks_widget
    viewer.add_image(structured((64, 64), seed=45))
    labels = viewer.add_labels(np.zeros((64, 64), dtype=np.int32))
    labels.selected_label = 0
    widget.target.value = labels
    widget.mode.value = "refine selected label"

    _click(widget, (30, 40))
    settle(widget)

    assert any("No label to refine: click inside a label" in m for m in _errors(notifications))
    assert widget.status.value.startswith("Error") and widget._worker is None and not labels.data.any()


def test_a_slice_beyond_the_stack_is_a_clear_error(clicks_widget, settle, notifications):
    viewer, widget = clicks_widget
    image = viewer.add_image(structured((4, 64, 64), seed=46), name="short stack")
    viewer.add_image(np.zeros((8, 64, 64), dtype=np.uint8), name="longer stack", visible=False)
    widget.image.value = image
    viewer.dims.set_point(0, 6)

    _click(widget, (6, 30, 40))
    settle(widget)

    assert any("The viewer shows slice 6, outside 'short stack' (slices 0..3)" in m for m in _errors(notifications))
    assert widget._worker is None


def test_a_box_without_area_is_a_clear_error(clicks_widget, settle, notifications):
    viewer, widget = clicks_widget
    viewer.add_image(structured((64, 64), seed=47))

    widget.box_layer.add_lines(np.array([[20.0, 10.0], [20.0, 50.0]]))  # a flat line: its box has no height
    outcome = settle(widget)

    assert "is empty or reversed" in outcome.error and _errors(notifications) == [outcome.error]
    assert not widget.target.value.data.any()


def test_an_empty_model_box_is_a_clear_error(clicks_widget, settle, notifications):
    viewer, widget = clicks_widget
    viewer.add_image(structured((64, 64), seed=48))
    widget.model.value = "  "

    _click(widget, (30, 40))
    settle(widget)

    assert any("The model is empty" in m for m in _errors(notifications)) and widget._worker is None


def test_tiling_answers_a_click_from_its_tile(clicks_widget, settle):
    viewer, widget = clicks_widget
    image = viewer.add_image(structured((300, 300), seed=49))
    widget.tiling.value = "on"
    assert widget.tile_size.enabled
    widget.tile_size.value = 112  # the tiny model's input size

    _click(widget, (150, 160))
    settle(widget)

    painted = widget.target.value.data == 1
    np.testing.assert_array_equal(painted, _core_mask(widget, image.data, [(160, 150)], [1], tile=112))
    assert not np.array_equal(painted, _core_mask(widget, image.data, [(160, 150)], [1])), "tiling made a difference"


def test_form_defaults_are_the_cores(clicks_widget):
    from promptseg.options import SegmentOptions, option_info

    _, widget = clicks_widget
    assert widget.segment_options() == SegmentOptions()
    assert widget.tiling.value == "off" and option_info("tile").default is None
    assert widget.mode.value == "new object" and not widget.negative.value


def test_clicks_are_mapped_through_world_coordinates_to_the_images_pixels(clicks_widget, settle):
    viewer, widget = clicks_widget
    image = viewer.add_image(structured((96, 128), seed=50), scale=(0.5, 0.25), translate=(10, -3))
    points = widget.points_layer
    points.scale, points.translate = (1.0, 1.0), (0.0, 0.0)  # clicks layer no longer aligned with the image

    _click(widget, (20, 15))  # world (20, 15) = image pixel y (20 - 10) / 0.5 = 20, x (15 + 3) / 0.25 = 72
    settle(widget)

    np.testing.assert_array_equal(widget.target.value.data == 1, _core_mask(widget, image.data, [(72, 20)], [1]))


def test_a_multichannel_stack_is_clicked_on_the_chosen_channels_of_the_current_slice(clicks_widget, settle):
    viewer, widget = clicks_widget
    data = structured((3, 4, 64, 80), seed=51, dtype=np.uint16, high=3000)  # Z, C, Y, X
    viewer.add_image(data)
    widget.axes.value = "ZCYX"
    widget.channels.value = "0, 2"
    viewer.dims.set_point(0, 1)

    _click(widget, (1, 0, 30, 40))  # the clicks layer has the image's four dimensions
    settle(widget)

    labels = widget.target.value
    assert labels.data.shape == (3, 64, 80)
    expected = _core_mask(widget, np.moveaxis(data[1], 0, -1), [(40, 30)], [1], channels=(0, 2))
    np.testing.assert_array_equal(labels.data[1] == 1, expected)
    assert not labels.data[[0, 2]].any()


def test_a_text_result_is_refined_label_by_label(clicks_widget, settle, qtbot):
    """The annotator's loop: Segment by text, then clicks correct one of its instances in place."""
    from promptseg_napari._widget import SegmentWidget

    viewer, widget = clicks_widget
    image = viewer.add_image(structured((96, 128), seed=52))
    text = SegmentWidget(viewer)
    viewer.window.add_dock_widget(text, name="Segment by text")
    text.model.value, text.device.value, text.threshold.value = widget.model.value, "cpu", 0.0
    text.prompts.value = "cell, blob"
    text.run()
    qtbot.waitUntil(lambda: not text.running, timeout=120_000)
    result = viewer.layers[f"{image.name} segmentation"]
    ids = [int(i) for i in np.unique(result.data) if i]
    assert ids, "threshold 0 keeps the random model's detections"
    corner = np.zeros(result.data.shape, dtype=bool)
    corner[:16, :16] = True
    result.data[corner & (result.data == 0)] = 99  # one more object, drawn by hand, to stay untouched
    before = result.data.copy()
    target = ids[0]
    y, x = np.argwhere(before == target)[0]

    widget.target.value = result
    widget.mode.value = "refine selected label"
    _click(widget, (y, x))
    settle(widget)

    expected = _core_mask(widget, image.data, [(x, y)], [1], mask=before == target)
    np.testing.assert_array_equal(result.data == target, expected & ((before == 0) | (before == target)))
    others = (before != target) & (before != 0)
    np.testing.assert_array_equal(result.data[others], before[others])
    assert result.selected_label == target
