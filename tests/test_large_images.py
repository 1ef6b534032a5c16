"""Images larger than memory: tiles read on demand, percentiles from a bounded sample, labels written by block."""

from __future__ import annotations

import numpy as np
import pytest
from truth_backend import random_scene, render, truth_segmenter

from promptseg.errors import ImageError, OptionError
from promptseg.large_images import (
    SAMPLE_PIXELS,
    LazyRGB,
    class_ids,
    create_label_pyramid,
    downsample_labels,
    sample_limits,
    write_labels,
)
from promptseg.tiling import tile_grid

VOCAB = {"cell": 1, "nucleus": 2}


class RecordingArray:
    """An array-like that records every region read and refuses to be read whole through ``__array__``."""

    def __init__(self, data: np.ndarray) -> None:
        self.data, self.reads = data, []

    @property
    def shape(self):
        return self.data.shape

    @property
    def dtype(self):
        return self.data.dtype

    def __getitem__(self, key):
        self.reads.append(key)
        return self.data[key].copy()

    def __array__(self, *args, **kwargs):
        raise AssertionError("the whole array was requested")


def _region(key):
    rows, cols = key[:2]
    return rows.start, rows.stop, cols.start, cols.stop


def test_each_tile_is_read_when_it_runs_and_the_whole_image_never():
    labels, kinds = random_scene(600, 700, 60, seed=4)
    source = RecordingArray(render(labels, kinds))  # uint8 RGB: no percentile sample is read
    segmenter = truth_segmenter(VOCAB)
    reads_per_tile = []

    result = segmenter.segment_large(
        source, ["cell", "nucleus"], tile=256, overlap=32, threshold=0.5,
        progress=lambda total, advance: advance and reads_per_tile.append(len(source.reads)),
    )

    tiles = tile_grid((600, 700), 256, 32)
    assert [_region(key) for key in source.reads] == [(t.y0, t.y1, t.x0, t.x1) for t in tiles]
    assert reads_per_tile == list(range(1, len(tiles) + 1)), "one region read per tile, as that tile runs"
    reference = segmenter.segment(render(labels, kinds), ["cell", "nucleus"], tile=256, overlap=32, threshold=0.5)
    assert len(result) == len(reference) == len(kinds)
    np.testing.assert_array_equal(result.to_label_image(), reference.to_label_image())
    assert result.info["tiles"] == len(tiles)


def test_lazy_path_equals_the_in_memory_tiled_path_on_the_tiny_model(segmenter, tmp_path):
    import zarr

    rng = np.random.default_rng(3)
    image = rng.integers(200, 900, (300, 340), dtype=np.uint16)
    image[60:180, 50:200] = 3500
    stored = zarr.open_array(str(tmp_path / "image.zarr"), mode="w", shape=image.shape, dtype=image.dtype,
                             chunks=(128, 128))
    stored[:] = image

    in_memory = segmenter.segment(image, ["cell", "blob"], tile=112, threshold=0.0)
    lazy = segmenter.segment_large(stored, ["cell", "blob"], tile=112, threshold=0.0)

    # a small image is sampled whole: the tiles' RGB pixels are bit-identical to the in-memory path's
    from promptseg.images import load_image

    np.testing.assert_array_equal(LazyRGB.open(stored)[:, :], load_image(image))
    assert lazy.info["tiles"] == in_memory.info["tiles"] > 1
    assert len(lazy) == len(in_memory) > 0
    for found, expected in zip(lazy.instances, in_memory.instances):
        assert found.label == expected.label and found.box == expected.box
        assert found.score == pytest.approx(expected.score, abs=1e-6)
        np.testing.assert_array_equal(found.mask, expected.mask)


def test_percentiles_come_from_the_coarsest_fitting_level_without_reading_level_0():
    rng = np.random.default_rng(0)
    level0 = RecordingArray(rng.integers(0, 4000, (4000, 3000), dtype=np.uint16))
    level1 = RecordingArray(level0.data[::2, ::2].copy())
    level2 = RecordingArray(level0.data[::4, ::4].copy())

    limits = sample_limits(level0, "YX", (1, 99), overview=[level1, level2])

    assert level0.reads == [] and level2.reads == [] and len(level1.reads) == 1, "the largest level under the budget"
    expected = np.percentile(level1.data.astype(np.float32), [1, 99])
    np.testing.assert_allclose(limits[0], expected, rtol=1e-6)


def test_without_a_coarse_level_a_bounded_sample_of_windows_estimates_the_percentiles():
    rng = np.random.default_rng(1)
    data = rng.normal(1000, 200, (5000, 4100)).astype(np.float32)
    data[:2500] += 1000  # a bright half the windows must reach
    source = RecordingArray(data)

    limits = sample_limits(source, "YX", (2, 98))

    read = sum((k[0].stop - k[0].start) * (k[1].stop - k[1].start) for k in source.reads)
    assert 0 < read <= SAMPLE_PIXELS < data.size
    exact = np.percentile(data, [2, 98])
    np.testing.assert_allclose(limits[0], exact, rtol=0.03)


def test_channel_first_layout_and_channel_choice_reach_each_tile():
    rng = np.random.default_rng(2)
    image = rng.integers(0, 5000, (5, 64, 80), dtype=np.uint16)
    lazy = LazyRGB.open(image, axes="CYX", channels=(4, 1))

    from promptseg.images import load_image

    expected = load_image(np.moveaxis(image, 0, -1), channels=(4, 1))
    np.testing.assert_array_equal(lazy[10:40, 20:70], expected[10:40, 20:70])


def test_labels_are_written_block_by_block_into_a_zarr_array(tmp_path, monkeypatch):
    import zarr

    labels, kinds = random_scene(900, 1000, 80, seed=6)
    result = truth_segmenter(VOCAB).segment(render(labels, kinds), ["cell", "nucleus"], threshold=0.5)
    stored = zarr.open_array(str(tmp_path / "labels.zarr"), mode="w", shape=(900, 1000), dtype=np.int32,
                             chunks=(256, 256), fill_value=0)
    writes = []

    class Recording:
        shape, dtype, chunks = stored.shape, stored.dtype, (256, 256)

        def __setitem__(self, key, value):
            writes.append(value.shape)
            stored[key] = value

    monkeypatch.setattr("promptseg.large_images.BLOCK", 512)
    blocks = write_labels(result, Recording())

    np.testing.assert_array_equal(stored[:], result.to_label_image(np.int32))
    assert blocks == len(writes) and max(w[0] * w[1] for w in writes) <= 512 * 512 < 900 * 1000

    classes = np.zeros((900, 1000), np.int32)
    write_labels(result, classes, class_ids(result, ["cell", "nucleus"]))
    instance_image = result.to_label_image(np.int32)
    for index, inst in enumerate(result.instances):
        expected = {"cell": 1, "nucleus": 2}[inst.label]
        assert (classes[instance_image == index + 1] == expected).all()


def test_label_pyramid_levels_are_nearest_neighbour_copies(tmp_path):
    import zarr

    labels, kinds = random_scene(500, 640, 40, seed=8)
    levels = create_label_pyramid(tmp_path / "store", [(500, 640), (250, 320), (125, 160)], chunks=64)
    levels[0][:] = labels
    downsample_labels(levels[0], levels[1])
    downsample_labels(levels[1], levels[2])

    np.testing.assert_array_equal(levels[1][:], labels[::2, ::2])
    np.testing.assert_array_equal(levels[2][:], labels[::4, ::4])
    group = zarr.open_group(str(tmp_path / "store"), mode="r")
    multiscales = group.attrs.get("ome", group.attrs.asdict()).get("multiscales") or group.attrs["multiscales"]
    assert [d["path"] for d in multiscales[0]["datasets"]] == ["0", "1", "2"]
    # a store made here may be replaced by the next run
    create_label_pyramid(tmp_path / "store", [(10, 10)])


def test_a_stack_is_refused_where_one_plane_is_expected():
    with pytest.raises(ImageError, match=r"one 2D plane.*segment_stack"):
        LazyRGB.open(np.zeros((4, 64, 64, 3), np.uint8))
    with pytest.raises(ImageError, match="axes one of"):
        LazyRGB.open(np.zeros((7, 64, 64), np.uint16))  # 7 slices, not channels: says to pass axes


def test_a_lazy_image_cannot_be_read_whole_by_accident():
    lazy = LazyRGB.open(np.zeros((64, 64), np.uint16))
    with pytest.raises(ImageError, match="read in tiles and never whole"):
        np.asarray(lazy)


def test_a_failing_read_names_the_region_and_the_store():
    class Broken(RecordingArray):
        def __getitem__(self, key):
            raise OSError("chunk file missing")

    lazy = LazyRGB(Broken(np.zeros((64, 64), np.uint8)), "YX", None)
    with pytest.raises(ImageError, match=r"pixels \[0:32, 0:32\].*chunk file missing.*store behind it"):
        lazy[0:32, 0:32]


def test_label_store_paths_that_cannot_be_used_are_refused(tmp_path):
    afile = tmp_path / "notes.txt"
    afile.write_text("x")
    with pytest.raises(OptionError, match="is a file: choose a folder"):
        create_label_pyramid(afile, [(10, 10)])
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "a.jpg").write_bytes(b"x")
    with pytest.raises(OptionError, match="already holds other files"):
        create_label_pyramid(tmp_path / "photos", [(10, 10)])
    with pytest.raises(OptionError, match="Cannot write the labels store .*blank for a temporary folder"):
        create_label_pyramid(afile / "labels.zarr", [(10, 10)])  # under a file: no folder can be made


def test_class_ids_need_every_prompt():
    labels, kinds = random_scene(100, 100, 5, seed=1)
    result = truth_segmenter(VOCAB).segment(render(labels, kinds), ["cell", "nucleus"], threshold=0.5)
    with pytest.raises(OptionError, match="have no prompt"):
        class_ids(result, ["cell"] if any(i.label == "nucleus" for i in result) else ["nucleus"])


def test_untiled_a_lazy_image_over_the_pixel_budget_is_refused_before_any_read(monkeypatch):
    from promptseg.images import MAX_PIXELS_ENV

    monkeypatch.setenv(MAX_PIXELS_ENV, str(100 * 100))
    source = RecordingArray(np.zeros((300, 400), np.uint16))
    segmenter = truth_segmenter(VOCAB)

    with pytest.raises(ImageError, match=r"120,000 pixels.*tile="):
        segmenter.segment_large(source, "cell", tile=None)

    assert source.reads == []
    labels, kinds = random_scene(90, 100, 6, seed=2)
    small = RecordingArray(render(labels, kinds))
    result = segmenter.segment_large(small, ["cell", "nucleus"], tile=None, threshold=0.5)
    assert len(small.reads) == 1 and len(result) == len(kinds), "read whole, once, within the budget"
