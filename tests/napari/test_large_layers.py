"""Large and lazy layers in a real viewer: zarr pyramids read tile by tile, labels on disk, the class layer."""

from __future__ import annotations

import numpy as np
import pytest

from napari_helpers import structured

pytestmark = [pytest.mark.gui, pytest.mark.slow]


def _errors(notifications):
    return [n.message for n in notifications if str(n.severity) == "error"]


def zarr_pyramid(path, image: np.ndarray, levels: int = 2) -> list:
    """`image` and its 2x, 4x... nearest-neighbour copies as zarr arrays, finest first."""
    import zarr

    group = zarr.open_group(str(path), mode="w")
    arrays = []
    for level in range(levels):
        data = image[:: 2**level, :: 2**level]
        array = group.create_array(str(level), shape=data.shape, dtype=data.dtype, chunks=(128, 128))
        array[:] = data
        arrays.append(array)
    return arrays


def test_a_zarr_pyramid_is_segmented_in_tiles_into_a_multiscale_labels_layer_on_disk(
    viewer_widget, run_widget, notifications, tmp_path
):
    import zarr

    from promptseg.sessions import shared_segmenter

    viewer, widget = viewer_widget
    image = structured((300, 360), seed=17)
    levels = zarr_pyramid(tmp_path / "slide.zarr", image)
    layer = viewer.add_image(levels, multiscale=True, name="slide", scale=(0.5, 0.5))
    widget.prompts.value = "cell, blob"
    widget.tiling.value = "on"
    widget.tile_size.value = 112
    widget.disk_above.value = 0  # every image's labels on disk
    widget.store.value = str(tmp_path / "labels")
    widget.class_layer.value = True

    outcome = run_widget(widget)

    assert outcome.error is None and _errors(notifications) == []
    instances, classes = viewer.layers["slide segmentation"], viewer.layers["slide classes"]
    for labels, kind in ((instances, "instances"), (classes, "classes")):
        assert labels.multiscale and [tuple(d.shape) for d in labels.data] == [(300, 360), (150, 180)]
        assert all(isinstance(level, zarr.Array) for level in labels.data), "backed by the store, not memory"
        assert str(tmp_path / "labels" / kind) in str(labels.data[0].store)
        np.testing.assert_allclose(labels.scale, layer.scale)
    assert instances.metadata["promptseg"]["store"] == str(tmp_path / "labels")
    # the lazy path gives what the in-memory tiled path gives (uint8: the same pixels in every tile)
    expected = shared_segmenter(widget.model.value, device="cpu").segment(
        image, ["cell", "blob"], widget.segment_options())
    level0 = np.asarray(instances.data[0][:])
    np.testing.assert_array_equal(level0, expected.to_label_image(np.int32))
    np.testing.assert_array_equal(np.asarray(instances.data[1][:]), level0[::2, ::2])
    ids = {"cell": 1, "blob": 2}
    class0 = np.asarray(classes.data[0][:])
    for index, inst in enumerate(expected.instances):
        assert (class0[level0 == index + 1] == ids[inst.label]).all()
    assert outcome.features["area"] == [inst.area for inst in expected.instances]


def test_class_layer_has_one_id_per_prompt_its_colours_and_a_legend(viewer_widget, run_widget):
    viewer, widget = viewer_widget
    viewer.add_image(structured((96, 128), seed=23), name="cells")
    widget.prompts.value = "cell, blob, dog"
    widget.class_layer.value = True

    outcome = run_widget(widget)

    assert outcome.error is None
    instances, classes = viewer.layers["cells segmentation"], viewer.layers["cells classes"]
    assert isinstance(classes.data, np.ndarray) and classes.data.shape == instances.data.shape
    prompts = ["cell", "blob", "dog"]
    by_index = dict(zip(instances.features["index"], instances.features["label"]))
    for index, label in by_index.items():
        pixels = instances.data == index
        if pixels.any():  # an instance may be covered by a better one
            assert set(np.unique(classes.data[pixels])) == {prompts.index(label) + 1}
    assert set(np.unique(classes.data)) - {0} <= {1, 2, 3}
    assert (classes.data == 0).sum() == (instances.data == 0).sum()
    # colours: the legend's, one per prompt, and the swatches shown in the widget
    from promptseg.render import instance_colors

    expected = ["#{:02x}{:02x}{:02x}".format(*map(int, c)) for c in instance_colors(3)]
    assert widget.legend_entries == list(zip(prompts, expected))
    for class_id, color in enumerate(expected, start=1):
        np.testing.assert_allclose(classes.colormap.map(np.array([class_id]))[0][:3],
                                   [int(color[i : i + 2], 16) / 255 for i in (1, 3, 5)], atol=1e-6)
    assert classes.colormap.map(np.array([0]))[0][3] == 0, "background transparent"
    assert not widget.legend.native.isHidden(), "the legend is shown once there are classes"
    assert all(prompt in widget.legend.value and color in widget.legend.value for prompt, color in zip(prompts, expected))
    assert list(classes.features["label"]) == prompts
    value = int(classes.data.max())
    y, x = np.argwhere(classes.data == value)[0]
    assert f"label: {prompts[value - 1]}" in classes.get_status((y, x))["coordinates"]


def test_class_layer_of_a_stack_follows_its_objects(viewer_widget, run_widget):
    viewer, widget = viewer_widget
    viewer.add_image(structured((3, 64, 80), seed=29, dtype=np.uint16, high=3000), name="stack")
    widget.prompts.value = "cell, blob"
    widget.class_layer.value = True

    outcome = run_widget(widget)

    assert outcome.error is None
    instances, classes = viewer.layers["stack segmentation"], viewer.layers["stack classes"]
    assert classes.data.shape == instances.data.shape == (3, 64, 80)
    for index, label in zip(instances.features["index"], instances.features["label"]):
        pixels = instances.data == index
        assert (classes.data[pixels] == ["cell", "blob"].index(label) + 1).all()


def test_a_labels_store_that_cannot_be_written_is_refused_before_the_run(viewer_widget, notifications, tmp_path):
    viewer, widget = viewer_widget
    viewer.add_image(structured((64, 64), seed=2))
    widget.prompts.value = "cell"
    widget.disk_above.value = 0
    blocker = tmp_path / "a-file.txt"
    blocker.write_text("not a folder")
    widget.store.value = str(blocker)

    assert widget.run() is None

    assert not widget.running
    [message] = _errors(notifications)
    assert "a-file.txt" in message and "choose a folder" in message.lower()


def test_a_tiled_lazy_layer_over_the_pixel_budget_is_read_in_tiles(
    viewer_widget, run_widget, notifications, monkeypatch, tmp_path
):
    """The pixel budget guards whole reads; tile by tile, a lazy layer over it is segmented."""
    from promptseg.images import MAX_PIXELS_ENV

    monkeypatch.setenv(MAX_PIXELS_ENV, str(200 * 200))
    viewer, widget = viewer_widget
    levels = zarr_pyramid(tmp_path / "big.zarr", structured((240, 300), seed=31, dtype=np.uint16, high=3000))
    viewer.add_image(levels, multiscale=True, name="big")
    widget.prompts.value = "cell"
    assert widget.run() is None, "tiling off: refused before reading"
    assert any("set 'tiling' to 'on' or 'auto'" in m for m in _errors(notifications))

    widget.tiling.value = "on"
    widget.tile_size.value = 112
    outcome = run_widget(widget)

    assert outcome.error is None
    labels = viewer.layers["big segmentation"]
    assert isinstance(labels.data, np.ndarray) and labels.data.shape == (240, 300), "small labels stay in memory"
