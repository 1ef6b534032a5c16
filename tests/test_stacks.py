"""Stacks: slice-by-slice segmentation, layouts, 3D linking with consistent ids, progress and cancel."""

from __future__ import annotations

import numpy as np
import pytest
from truth_backend import render, truth_segmenter

from promptseg.errors import CancelledError, ImageError, OptionError
from promptseg.stacks import open_stack, parse_axes

VOCAB = {"cell": 1, "nucleus": 2}


def truth_volume(depth=8, height=90, width=120):
    """Ellipsoids and a drifting cylinder with known ids; object 3 exists only in slices 2-4."""
    zz, yy, xx = np.ogrid[:depth, :height, :width]
    labels = np.zeros((depth, height, width), dtype=np.int32)
    labels[((zz - 3.5) / 4.5) ** 2 + ((yy - 30) / 20) ** 2 + ((xx - 30) / 20) ** 2 < 1] = 1
    labels[((zz - 4) / 6) ** 2 + ((yy - 60) / 15) ** 2 + ((xx - 90) / 25) ** 2 < 1] = 2
    labels[2:5, 70:85, 10:25] = 3
    for z in range(depth):  # drifts 3 px per slice: linked by overlap, not by position
        labels[z, 5:20, 50 + 3 * z : 62 + 3 * z] = 4
    kinds = {1: 1, 2: 2, 3: 1, 4: 2}
    stack = np.stack([render(labels[z], kinds) for z in range(depth)])  # Z, Y, X, RGB
    return labels, kinds, stack


def assert_same_partition(volume, labels):
    """The label volume equals the truth up to renaming ids (one id per 3D object, consistently)."""
    assert volume.shape == labels.shape
    np.testing.assert_array_equal(volume > 0, labels > 0)
    pairs = set(zip(volume[labels > 0].tolist(), labels[labels > 0].tolist()))
    assert len(pairs) == len({a for a, _ in pairs}) == len({b for _, b in pairs})


def test_linked_stack_gives_one_id_per_3d_object():
    labels, kinds, stack = truth_volume()
    seg = truth_segmenter(VOCAB)
    result = seg.segment_stack(stack, ["cell", "nucleus"], axes="ZYXC", link=True)
    assert len(result) == 8 and result.linked and result.axes == "ZYXC"
    assert result.num_objects == 4
    assert_same_partition(result.to_label_volume(), labels)
    objects = result.objects()
    spans = sorted(sorted(z for z, _ in pieces) for pieces in objects.values())
    assert [2, 3, 4] in spans
    for pieces in objects.values():
        assert len({inst.label for _, inst in pieces}) == 1
        assert all(inst.extra["object_id"] in objects and inst.extra["slice"] == z for z, inst in pieces)


def test_unlinked_stack_numbers_every_instance():
    labels, kinds, stack = truth_volume()
    result = truth_segmenter(VOCAB).segment_stack(stack, ["cell", "nucleus"], axes="ZYXC")
    assert not result.linked
    total = sum(len(r) for r in result)
    assert result.num_objects == total == sum(len(np.unique(s)) - 1 for s in labels)
    volume = result.to_label_volume()
    np.testing.assert_array_equal(volume > 0, labels > 0)


def test_stack_slices_can_be_tiled():
    labels, kinds, stack = truth_volume(depth=4, height=150, width=200)
    seg = truth_segmenter(VOCAB)
    result = seg.segment_stack(stack, ["cell", "nucleus"], axes="ZYXC", link=0.5, tile=64, overlap=16)
    assert all(r.info["tiles"] > 1 for r in result)
    assert_same_partition(result.to_label_volume(), labels)


def test_stack_progress_counts_slices_and_cancel_stops():
    _, _, stack = truth_volume(depth=5)
    seg = truth_segmenter(VOCAB)
    calls = []
    seg.segment_stack(stack, "cell", axes="ZYXC", progress=lambda t, a: calls.append((t, a)))
    assert calls == [(5, 0)] + [(5, 1)] * 5
    done = []
    with pytest.raises(CancelledError, match="after 3 of 5"):
        seg.segment_stack(stack, "cell", axes="ZYXC", progress=lambda t, a: done.append(a),
                          cancel=lambda: sum(done) >= 3)


def test_layouts_are_read_as_views_and_guessed():
    data = np.arange(2 * 3 * 10 * 12, dtype=np.uint16).reshape(2, 3, 10, 12)
    slices, layout = open_stack(data, "ZCYX")
    assert layout == "ZCYX" and slices.shape == (2, 10, 12, 3) and np.shares_memory(slices, data)
    assert parse_axes(None, (5, 40, 50)) == "ZYX"
    assert parse_axes(None, (5, 40, 50, 3)) == "ZYXC"
    assert parse_axes(None, (5, 2, 40, 50)) == "ZCYX"
    assert parse_axes("tyx", (5, 40, 50)) == "TYX"
    with pytest.raises(OptionError, match="axes"):
        parse_axes("ZTYX", (2, 5, 40, 50))
    with pytest.raises(OptionError, match="Cannot tell"):
        parse_axes(None, (5, 6, 40, 50))
    with pytest.raises(ImageError, match="slice axis"):
        open_stack(np.zeros((10, 10)))
    with pytest.raises(OptionError, match="link"):
        truth_segmenter(VOCAB).segment_stack(np.zeros((2, 20, 20), np.uint8), "cell", link=2)


def test_tiny_sam3_segments_a_uint16_tiff_stack(make_segmenter, tmp_path):
    import tifffile

    rng = np.random.default_rng(0)
    stack = rng.integers(100, 400, (4, 2, 64, 80), dtype=np.uint16)  # T, C, Y, X
    stack[:, 1, 20:40, 20:50] += 30000
    path = tmp_path / "series.ome.tif"
    tifffile.imwrite(path, stack, metadata={"axes": "TCYX"})
    before = stack.copy()
    seg = make_segmenter()
    result = seg.segment_stack(path, "bright square", threshold=0.0, channels=(1,), link=True)
    assert result.axes == "TCYX" and len(result) == 4
    assert seg.stats.image_encoder_runs == 4
    volume = result.to_label_volume()
    assert volume.shape == (4, 64, 80) and volume.max() == result.num_objects >= 1
    again = seg.segment_stack(stack, "bright square", axes="TCYX", threshold=0.0, channels=(1,))
    assert seg.stats.image_encoder_runs == 4  # same pixels after scaling: every slice from the cache
    assert all(r.embedding_source == "memory" for r in again)
    np.testing.assert_array_equal(stack, before)


def test_a_list_of_images_is_a_stack(make_segmenter, rgb_image, tmp_path):
    from PIL import Image

    path = tmp_path / "slice.png"
    Image.fromarray(rgb_image).save(path)
    result = make_segmenter().segment_stack([rgb_image, str(path)], "red square", threshold=0.0, link=True)
    assert len(result) == 2 and result.shape == (2, 120, 200)
    # identical slices: every instance of slice 1 continues an object of slice 0
    assert set(result.object_ids[1]) <= set(result.object_ids[0])


def test_cli_segments_a_tiff_stack_into_a_label_volume(tiny_sam3_dir, tmp_path):
    import tifffile

    from promptseg.cli import main

    stack = np.random.default_rng(5).integers(0, 4000, (3, 60, 70), dtype=np.uint16)
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, stack, metadata={"axes": "ZYX"})
    out = tmp_path / "out"
    code = main(["segment", str(path), "-p", "cell", "--stack", "--link", "--threshold", "0",
                 "--percentiles", "1", "99", "--model", str(tiny_sam3_dir), "--device", "cpu",
                 "--no-cache", "--out", str(out)])
    assert code == 0
    volume = tifffile.imread(out / "stack.labels.tif")
    assert volume.shape == (3, 60, 70) and volume.max() >= 1


def test_stacks_need_only_a_per_slice_callable():
    """`segment_stack` scales each slice and links what a plain `segment_slice(rgb)` finds: no segmenter."""
    from promptseg.options import PixelOptions
    from promptseg.results import Instance, SegmentationResult
    from promptseg.stacks import segment_stack

    labels, kinds, _ = truth_volume()
    counts = (labels > 0).astype(np.uint16) * 40000 + 1000  # 16-bit: objects bright, background dim
    seen = []

    def segment_slice(rgb):
        seen.append(rgb.dtype)
        index = len(seen) - 1
        found = []
        for obj in np.unique(labels[index][labels[index] > 0]):
            ys, xs = np.nonzero((labels[index] == obj) & (rgb[..., 0] > 127))  # what the scaled pixels show
            x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
            found.append(Instance("cell", 0.9, (int(x0), int(y0), int(x1), int(y1)),
                                  (labels[index] == obj)[y0:y1, x0:x1]))
        return SegmentationResult(found, rgb.shape[:2], ["cell"])

    result = segment_stack(counts, ["cell"], segment_slice, PixelOptions(percentiles=(0, 100)), link=True)
    assert seen == [np.uint8] * len(labels)
    assert_same_partition(result.to_label_volume(), labels)
