"""Tiled segmentation: the grid, stitching against exact ground truth, caching per tile, progress, cancel."""

from __future__ import annotations

import numpy as np
import pytest
from truth_backend import random_scene, render, score_of, truth_segmenter

from promptseg.errors import CancelledError, OptionError
from promptseg.options import TilingOptions
from promptseg.tiling import resolve_tiling, tile_grid

VOCAB = {"cell": 1, "nucleus": 2}


def truth_objects(labels, kinds, code):
    """{object id: full-size mask} for objects of class `code`."""
    return {obj: labels == obj for obj, kind in kinds.items() if kind == code}


def assert_reconstructs(result, labels, kinds):
    """Every ground-truth object appears exactly once, with its exact pixels and score."""
    height, width = labels.shape
    expected = {}
    for phrase, code in VOCAB.items():
        for obj, mask in truth_objects(labels, kinds, code).items():
            expected[obj] = (phrase, mask)
    assert len(result) == len(expected)
    matched = set()
    for inst in result:
        x0, y0, x1, y1 = inst.box
        ids = np.unique(labels[y0:y1, x0:x1][inst.mask])
        assert len(ids) == 1 and ids[0] != 0, f"instance {inst.box} mixes objects {ids}"
        obj = int(ids[0])
        assert obj not in matched, f"object {obj} found twice"
        matched.add(obj)
        phrase, mask = expected[obj]
        assert inst.label == phrase
        np.testing.assert_array_equal(inst.full_mask(height, width), mask, err_msg=f"object {obj} extent")
        assert inst.score == pytest.approx(score_of(obj), abs=1e-6)
    assert matched == set(expected)


def designed_scene():
    """Objects placed on purpose against a 128 px / 32 px-overlap grid of a 300 x 400 image.

    Tile columns start at 0, 96, 192, 272 and rows at 0, 96, 172.
    """
    labels = np.zeros((300, 400), dtype=np.int32)
    kinds = {}

    def put(obj, kind, region):
        labels[region] = obj
        kinds[obj] = kind

    put(1, 1, np.s_[20:60, 80:150])           # straddles the first vertical border, wider than the overlap
    yy, xx = np.ogrid[:300, :400]
    put(2, 2, ((yy - 110) ** 2 + (xx - 112) ** 2) < 30**2)  # disc on a four-tile corner
    put(3, 1, np.s_[100:120, 100:120])        # lies inside an overlap corner: seen by four tiles
    put(4, 2, np.s_[280:300, 0:30])           # on the image's bottom-left edge
    put(5, 1, np.s_[200:215, 10:390])         # long bar crossing every tile column
    ring = (((yy - 60) ** 2 + (xx - 300) ** 2) < 50**2) & (((yy - 60) ** 2 + (xx - 300) ** 2) >= 35**2)
    ring &= labels == 0
    put(6, 2, ring)                            # a ring whose pieces meet only through other tiles
    put(7, 1, np.s_[240:270, 150:192])        # two touching objects of one class, split at a border
    put(8, 1, np.s_[240:270, 192:230])
    put(9, 2, np.s_[0:10, 390:400])           # top-right corner of the image
    return labels, kinds


def test_grid_covers_image_with_overlap():
    tiles = tile_grid((300, 400), 128, 32)
    assert sorted({t.x0 for t in tiles}) == [0, 96, 192, 272]
    assert sorted({t.y0 for t in tiles}) == [0, 96, 172]
    covered = np.zeros((300, 400), dtype=int)
    for t in tiles:
        assert t.y1 - t.y0 == 128 and t.x1 - t.x0 == 128
        covered[t.y0 : t.y1, t.x0 : t.x1] += 1
    assert covered.min() >= 1


def test_grid_of_image_smaller_than_tile_is_one_tile():
    tiles = tile_grid((50, 70), 128, 16)
    assert [(t.y0, t.y1, t.x0, t.x1) for t in tiles] == [(0, 50, 0, 70)]


def test_stitching_reconstructs_designed_scene_exactly():
    labels, kinds = designed_scene()
    seg = truth_segmenter(VOCAB)
    result = seg.segment(render(labels, kinds), ["cell", "nucleus"], tile=128, overlap=32)
    assert result.info["tiles"] == 12
    assert result.info["pieces"] > len(kinds)  # objects really were cut and seen twice
    assert_reconstructs(result, labels, kinds)
    by_id = {int(np.unique(labels[i.box[1]:i.box[3], i.box[0]:i.box[2]][i.mask])[0]): i for i in result}
    assert by_id[2].extra["tiles"] == 4  # the corner disc was stitched from four tiles
    assert by_id[5].extra["tiles"] >= 4


@pytest.mark.parametrize("tile,overlap,seed", [(64, 8, 1), (96, 40, 2), (100, 1, 3), (128, 64, 4)])
def test_stitching_reconstructs_random_scenes_exactly(tile, overlap, seed):
    labels, kinds = random_scene(230, 310, 60, seed=seed, sizes=(3, 70))
    seg = truth_segmenter(VOCAB)
    result = seg.segment(render(labels, kinds), ["cell", "nucleus"], tile=tile, overlap=overlap)
    assert_reconstructs(result, labels, kinds)


def test_tiled_result_matches_untiled_result():
    """Exact on purpose: the truth backend's probabilities are exactly 0 or 1 at input resolution,
    so no rounding can move a pixel (models are compared with tests/tolerance.py instead)."""
    labels, kinds = random_scene(200, 260, 40, seed=5, sizes=(5, 60))
    seg = truth_segmenter(VOCAB)
    rgb = render(labels, kinds)
    whole = seg.segment(rgb, ["cell", "nucleus"])
    tiled = seg.segment(rgb, ["cell", "nucleus"], tile=80, overlap=16)
    np.testing.assert_array_equal(whole.to_label_image() > 0, tiled.to_label_image() > 0)
    assert sorted(whole.scores.tolist()) == pytest.approx(sorted(tiled.scores.tolist()))


def test_low_resolution_masks_are_stitched_into_one_object_each():
    """With 32 x 32 mask probabilities per tile (like a real model), borders blur but objects stay whole."""
    labels, kinds = designed_scene()
    seg = truth_segmenter(VOCAB, mask_size=32)
    result = seg.segment(render(labels, kinds), ["cell", "nucleus"], tile=128, overlap=32)
    assert len(result) == len(kinds)
    for inst in result:
        x0, y0, x1, y1 = inst.box
        ids, counts = np.unique(labels[y0:y1, x0:x1][inst.mask], return_counts=True)
        obj = int(ids[np.argmax(counts)])
        truth = labels == obj
        inter = np.count_nonzero(inst.full_mask(*labels.shape) & truth)
        assert inter / np.count_nonzero(inst.full_mask(*labels.shape) | truth) > 0.75


def test_each_tile_embedding_is_cached_under_its_pixels(tmp_path):
    labels, kinds = random_scene(200, 300, 20, seed=6)
    rgb = render(labels, kinds)
    seg = truth_segmenter(VOCAB, cache_dir=tmp_path)
    first = seg.segment(rgb, "cell", tile=100, overlap=20)
    tiles = tile_grid(rgb.shape[:2], 100, 20)
    assert seg.stats.image_encoder_runs == len(tiles) == first.info["tiles"]
    assert first.embedding_source == "computed"
    for t in tiles:
        assert seg.is_cached(rgb[t.y0 : t.y1, t.x0 : t.x1])
    second = seg.segment(rgb, "nucleus", tile=100, overlap=20)
    assert seg.stats.image_encoder_runs == len(tiles)
    assert second.embedding_source == "memory"
    # a fresh process sharing the disk cache reads every tile from disk
    again = truth_segmenter(VOCAB, cache_dir=tmp_path)
    third = again.segment(rgb, "cell", tile=100, overlap=20)
    assert again.stats.image_encoder_runs == 0 and third.embedding_source == "disk"
    assert again.cache.stats.disk_hits == len(tiles)


def test_progress_counts_tiles_and_cancel_stops_between_tiles():
    labels, kinds = random_scene(200, 300, 20, seed=7)
    rgb = render(labels, kinds)
    seg = truth_segmenter(VOCAB)
    calls = []
    seg.segment(rgb, "cell", tile=100, overlap=20, progress=lambda total, advance: calls.append((total, advance)))
    total = len(tile_grid(rgb.shape[:2], 100, 20))
    assert calls == [(total, 0)] + [(total, 1)] * total

    done = []
    with pytest.raises(CancelledError):
        seg.segment(rgb, "cell", tile=100, overlap=20, progress=lambda t, a: done.append(a),
                    cancel=lambda: sum(done) >= 2)
    assert sum(done) == 2

    untiled = []
    seg.segment(rgb, "cell", progress=lambda t, a: untiled.append((t, a)))
    assert untiled == [(1, 0), (1, 1)]
    with pytest.raises(CancelledError):
        seg.segment(rgb, "cell", cancel=lambda: True)


def test_post_processing_applies_to_stitched_objects():
    labels, kinds = designed_scene()
    seg = truth_segmenter(VOCAB)
    rgb = render(labels, kinds)
    areas = {obj: int((labels == obj).sum()) for obj in kinds}
    big = seg.segment(rgb, ["cell", "nucleus"], tile=128, overlap=32, min_area=2000)
    # min_area judges whole objects, not the pieces each tile saw
    assert len(big) == sum(a >= 2000 for a in areas.values())
    best = seg.segment(rgb, ["cell", "nucleus"], tile=128, overlap=32, max_instances=3)
    assert best.scores.tolist() == pytest.approx(sorted((score_of(o) for o in kinds), reverse=True)[:3])


def test_exemplars_are_clipped_to_each_tile():
    labels, kinds = designed_scene()
    seg = truth_segmenter(VOCAB)
    result = seg.segment(render(labels, kinds), "cell", tile=128, overlap=32, exemplars=[[80, 20, 150, 60]])
    assert len(result) == sum(k == 1 for k in kinds.values())


def test_auto_tiles_only_images_much_larger_than_the_model_input():
    assert resolve_tiling(TilingOptions("auto", None), (1200, 1400), (1008, 1008)) is None
    assert resolve_tiling(TilingOptions("auto", None), (4000, 3000), (1008, 1008)) == (1008, 126)
    assert resolve_tiling(TilingOptions(None, 50), (4000, 3000), (1008, 1008)) is None
    seg = truth_segmenter(VOCAB, input_size=64)
    labels, kinds = designed_scene()
    result = seg.segment(render(labels, kinds), ["cell", "nucleus"], tile="auto")
    assert result.info["tile"] == 64
    assert_reconstructs(result, labels, kinds)


@pytest.mark.parametrize("tile,overlap,match", [
    ("big", None, "tile must be"), (8, None, "at least 16"), (100, 0, "overlap must"), (100, 80, "overlap must"),
])
def test_bad_tiling_options_are_explained(tile, overlap, match):
    seg = truth_segmenter(VOCAB)
    with pytest.raises(OptionError, match=match):
        seg.segment(np.zeros((300, 300, 3), np.uint8), "cell", tile=tile, overlap=overlap)


def test_tiny_sam3_runs_the_tiled_path(make_segmenter, rgb_image):
    seg = make_segmenter()
    result = seg.segment(rgb_image, ["red square", "green square"], threshold=0.0, tile=100, overlap=20)
    tiles = tile_grid(rgb_image.shape[:2], 100, 20)
    assert result.info["tiles"] == len(tiles)
    assert seg.stats.image_encoder_runs == len(tiles)
    assert len(result) > 0
    height, width = rgb_image.shape[:2]
    for inst in result:
        x0, y0, x1, y1 = inst.box
        assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
        assert inst.mask.shape == (y1 - y0, x1 - x0) and inst.mask.any()
        touching = [t for t in tiles if t.x0 < x1 and x0 < t.x1 and t.y0 < y1 and y0 < t.y1]
        assert 1 <= inst.extra["tiles"] <= len(touching)
    assert result.to_label_image().shape == (height, width)
    again = seg.segment(rgb_image, "red square", threshold=0.0, tile=100, overlap=20)
    assert seg.stats.image_encoder_runs == len(tiles) and again.embedding_source == "memory"


def test_local_nms_keeps_what_all_pairs_nms_keeps():
    from promptseg.masks import mask_nms
    from promptseg.results import Instance
    from promptseg.tiling import local_nms

    rng = np.random.default_rng(8)
    instances = []
    for i in range(300):
        x0, y0 = (int(v) for v in rng.integers(0, 400, 2))
        w, h = (int(v) for v in rng.integers(5, 90, 2))
        mask = rng.random((h, w)) < 0.9
        instances.append(Instance(label="ab"[i % 2], score=float(rng.random()), box=(x0, y0, x0 + w, y0 + h), mask=mask))
        if i % 3 == 0:  # a near-duplicate
            instances.append(Instance(label="ab"[i % 2], score=float(rng.random()),
                                      box=(x0 + 1, y0, x0 + w + 1, y0 + h), mask=mask))
    for per_label in (True, False):
        expected = mask_nms(instances, 0.5, per_label=per_label)
        assert [id(i) for i in local_nms(instances, 0.5, per_label, 64)] == [id(i) for i in expected]
        assert len(expected) < len(instances)


def test_cli_tiles_a_large_16_bit_image(tiny_sam3_dir, tmp_path):
    import json

    import tifffile

    from promptseg.cli import main

    image = np.random.default_rng(9).integers(0, 60000, (2, 130, 150), dtype=np.uint16)
    path = tmp_path / "big.tif"
    tifffile.imwrite(path, np.moveaxis(image, 0, -1))
    out = tmp_path / "out"
    code = main(["segment", str(path), "-p", "cell", "--tile", "64", "--overlap", "16", "--channels", "1",
                 "--threshold", "0", "--format", "json", "--model", str(tiny_sam3_dir), "--device", "cpu",
                 "--no-cache", "--out", str(out)])
    assert code == 0
    record = json.loads((out / "big.json").read_text())
    assert record["image_size"] == [130, 150] and record["instances"]
    assert {inst["tiles"] for inst in record["instances"]} <= set(range(1, 10))


def test_tiling_needs_only_a_detect_callable():
    """`segment_tiled` stitches whatever a plain `detect(pixels, boxes, labels)` function finds: no segmenter."""
    from promptseg.masks import tight_box
    from promptseg.options import CleanupOptions
    from promptseg.results import Instance, SegmentationResult
    from promptseg.tiling import segment_tiled

    labels, kinds = designed_scene()
    rgb = render(labels, kinds)
    calls = []

    def detect(pixels, boxes, box_labels):  # reads the object ids the scene's pixels encode
        calls.append(pixels.shape[:2])
        ids = pixels[..., 0].astype(np.int64) + 256 * pixels[..., 1].astype(np.int64)
        found = []
        for obj in np.unique(ids[ids > 0]):
            x0, y0, x1, y1 = tight_box(ids == obj)
            phrase = next(p for p, code in VOCAB.items() if code == kinds[int(obj)])
            found.append(Instance(label=phrase, score=score_of(int(obj)), box=(x0, y0, x1, y1),
                                  mask=(ids == obj)[y0:y1, x0:x1]))
        return found, "computed"

    instances, origin, info = segment_tiled(rgb, 128, 32, detect, CleanupOptions())
    assert len(calls) == info["tiles"] == len(tile_grid(rgb.shape[:2], 128, 32)) and origin == "computed"
    assert_reconstructs(SegmentationResult(instances, labels.shape, list(VOCAB)), labels, kinds)
