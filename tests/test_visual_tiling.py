"""Visual prompts on a tiled image: the window that answers them, parity with a direct call on that
window's pixels, the text grid's cached tile embeddings reused by clicks, and refine of a tiled result.

The tiny SAM 3's input is 112 px, so a 300 x 400 image with ``tile=128`` (overlap 16) has tile columns
starting at 0, 112, 224, 272 and rows at 0, 112, 172.
"""

from __future__ import annotations

import numpy as np
import pytest

import promptseg
from promptseg.errors import OptionError
from promptseg.segmenter import _instance_under
from promptseg.options import TilingOptions
from promptseg.tiling import resolve_tiling, tile_grid
from promptseg.visual import check_visual_prompts
from promptseg.visual_tiling import object_window, prompt_extent, prompts_in_window

TILE, OVERLAP = 128, 16
SIZE = (300, 400)
GRID = tile_grid(SIZE, TILE, OVERLAP)


@pytest.fixture
def hub_segmenter(tiny_sam3_hub_dir, tmp_path):
    return promptseg.load_segmenter(str(tiny_sam3_hub_dir), device="cpu", cache_dir=tmp_path / "cache")


@pytest.fixture(scope="module")
def large_image() -> np.ndarray:
    rng = np.random.default_rng(3)
    image = rng.integers(0, 60, (*SIZE, 3), dtype=np.uint8)
    image[20:60, 80:150] = (220, 40, 40)      # across the first column border, wider than the overlap
    image[150:230, 250:330] = (40, 200, 60)   # across row and column borders
    image[30:90, 20:80] = (40, 60, 220)       # inside the first tile
    return image


def grid_tile_boxes() -> set[tuple[int, int, int, int]]:
    return {(t.x0, t.y0, t.x1, t.y1) for t in GRID}


def window_of(extent):
    return object_window(extent, SIZE, TILE, OVERLAP)


# --- which window answers the prompts -----------------------------------------------------------------


def test_a_click_inside_a_tile_is_answered_by_that_grid_tile():
    window = window_of((60, 50, 61, 51))
    assert window.kind == "grid" and window.box == (0, 0, 128, 128)


def test_a_click_in_an_overlap_goes_to_the_tile_whose_centre_is_nearer():
    # columns 112..127 are seen by the tiles at 0 (centre 64) and 112 (centre 176)
    assert window_of((115, 50, 116, 51)).box == (0, 0, 128, 128)
    assert window_of((125, 50, 126, 51)).box == (112, 0, 240, 128)


def test_a_box_across_a_border_gets_a_tile_sized_window_that_holds_it():
    extent = (100, 40, 140, 80)  # crosses x = 112 and x = 128: no grid tile holds it
    assert not any(t.x0 <= 100 and t.x1 >= 140 for t in GRID)
    window = window_of(extent)
    assert window.kind == "shifted" and window.box not in grid_tile_boxes()
    assert (window.x1 - window.x0, window.y1 - window.y0) == (TILE, TILE)
    assert window.x0 <= 100 and window.x1 >= 140 and window.y0 <= 40 and window.y1 >= 80


def test_a_wider_extent_gets_the_grid_tiles_it_touches():
    window = window_of((50, 40, 250, 80))  # wider than a tile
    assert window.kind == "neighbours" and window.box == (0, 0, 352, 128)
    assert window_of((5, 5, 395, 295)).box == (0, 0, 400, 300)  # the whole image: today's resizing


def test_every_window_holds_its_extent_inside_the_image():
    rng = np.random.default_rng(0)
    for _ in range(500):
        x0, x1 = sorted(rng.integers(0, SIZE[1] + 1, 2))
        y0, y1 = sorted(rng.integers(0, SIZE[0] + 1, 2))
        extent = (int(x0), int(y0), int(max(x1, x0 + 1)), int(max(y1, y0 + 1)))
        extent = (min(extent[0], SIZE[1] - 1), min(extent[1], SIZE[0] - 1), min(extent[2], SIZE[1]), min(extent[3], SIZE[0]))
        window = window_of(extent)
        assert 0 <= window.x0 <= extent[0] and extent[2] <= window.x1 <= SIZE[1]
        assert 0 <= window.y0 <= extent[1] and extent[3] <= window.y1 <= SIZE[0]
        if window.kind == "grid":
            assert window.box in grid_tile_boxes()
        if window.kind != "neighbours":
            assert (window.x1 - window.x0, window.y1 - window.y0) == (TILE, TILE)


def test_an_axis_shorter_than_a_tile_is_taken_whole():
    window = object_window((150, 10, 151, 11), (60, 400), TILE, OVERLAP)
    assert window.kind == "grid" and (window.y0, window.y1) == (0, 60) and (window.x0, window.x1) == (112, 240)


def test_the_extent_holds_every_point_the_box_and_the_mask():
    mask = np.zeros(SIZE, bool)
    mask[200:210, 300:320] = True
    prompts = check_visual_prompts(points=[(10.5, 20.2), (30, 5)], box=(50.5, 60, 70.2, 80), mask=mask)
    assert prompt_extent(prompts, SIZE) == (10, 5, 320, 210)
    assert prompt_extent(check_visual_prompts(points=[(400, 300)]), SIZE) == (399, 299, 400, 300)  # the edge
    assert prompt_extent(check_visual_prompts(box=(-20, -5, 30, 40)), SIZE) == (0, 0, 30, 40)  # clipped
    assert prompt_extent(check_visual_prompts(mask=np.zeros(SIZE, bool)), SIZE) is None


def test_prompts_in_a_window_are_shifted_and_the_mask_cropped():
    rng = np.random.default_rng(2)
    blob = rng.random((40, 70)) > 0.5
    instance = promptseg.Instance(label="cell", score=0.5, box=(80, 20, 150, 60), mask=blob)
    full = instance.full_mask(*SIZE)
    window = window_of((80, 20, 150, 60))
    for mask in (instance, full):
        prompts = check_visual_prompts(points=[(120.5, 40.0)], point_labels=[0], box=(90, 25, 140, 55), mask=mask)
        local = prompts_in_window(prompts, window, SIZE)
        assert np.array_equal(local.points, [[120.5 - window.x0, 40.0 - window.y0]])
        assert local.point_labels.tolist() == [0]
        assert np.array_equal(local.box, [90 - window.x0, 25 - window.y0, 140 - window.x0, 55 - window.y0])
        assert np.array_equal(local.mask, full[window.y0 : window.y1, window.x0 : window.x1])


# --- parity with a direct call on the window's pixels -------------------------------------------------


def assert_same_as_direct_call(seg, image, tiled, prompt):
    """`tiled` equals `segment_object` on the window's pixels with the prompts moved into it."""
    x0, y0, x1, y1 = tiled.info["window"]
    shift = np.array([x0, y0], dtype=np.float64)
    direct_prompt = {}
    if "points" in prompt:
        direct_prompt["points"] = np.asarray(prompt["points"], dtype=np.float64) - shift
        direct_prompt["point_labels"] = prompt.get("point_labels")
    if "box" in prompt:
        direct_prompt["box"] = np.asarray(prompt["box"], dtype=np.float64) - np.tile(shift, 2)
    if "mask" in prompt:
        full = prompt["mask"].full_mask(*image.shape[:2]) if hasattr(prompt["mask"], "full_mask") else prompt["mask"]
        direct_prompt["mask"] = full[y0:y1, x0:x1]
    crop = np.ascontiguousarray(image[y0:y1, x0:x1])
    direct = seg.segment_object(crop, multimask=prompt.get("multimask"), **direct_prompt)
    assert direct.embedding_source == "memory"  # the window's embedding is the one the tiled call cached
    assert tiled.image_size == image.shape[:2] and direct.info == {}
    got, want = tiled.instances + tiled.alternatives, direct.instances + direct.alternatives
    assert len(got) == len(want) > 0
    for a, b in zip(got, want):  # the same embedding decoded by the same code: exactly equal
        bx0, by0, bx1, by1 = b.box
        assert a.box == (bx0 + x0, by0 + y0, bx1 + x0, by1 + y0)
        assert np.array_equal(a.mask, b.mask) and a.score == b.score and a.extra == b.extra
        assert a.box[2] <= image.shape[1] and a.box[3] <= image.shape[0]


@pytest.mark.parametrize(
    "prompt, kind",
    [
        (dict(points=[(60.0, 50.0)]), "grid"),
        (dict(points=[(120.0, 50.0)]), "grid"),                                           # in an overlap
        (dict(points=[(100.5, 170.0), (140.0, 180.0)], point_labels=[1, 0]), "shifted"),  # either side of a border
        (dict(box=(100.0, 20.0, 150.0, 60.0)), "shifted"),                                # a box across a border
        (dict(points=[(225.0, 115.0)], box=(200.0, 90.0, 250.0, 140.0)), "shifted"),     # across a corner
        (dict(points=[(30.0, 40.0), (200.0, 60.0)], point_labels=[1, 1]), "neighbours"),   # wider than a tile
        (dict(points=[(300.0, 250.0)], multimask=False), "grid"),
    ],
    ids=["centre", "overlap", "points-across-border", "box-across-border", "box-across-corner", "wide", "single"],
)
def test_tiled_click_equals_a_direct_call_on_its_window(hub_segmenter, large_image, prompt, kind):
    call = {k: v for k, v in prompt.items() if k != "multimask"}
    tiled = hub_segmenter.segment_object(large_image, multimask=prompt.get("multimask"), tile=TILE, **call)
    assert tiled.info["window_kind"] == kind and (tiled.info["tile"], tiled.info["overlap"]) == (TILE, OVERLAP)
    assert_same_as_direct_call(hub_segmenter, large_image, tiled, prompt)


def test_mask_refinement_is_cropped_to_the_window(hub_segmenter, large_image):
    region = np.zeros(SIZE, bool)
    region[20:60, 80:150] = np.random.default_rng(4).random((40, 70)) > 0.3  # over the red square, across a border
    region[20, 80] = region[59, 149] = True  # its tight box is the square's
    instance = promptseg.Instance(label="red square", score=0.9, box=(80, 20, 150, 60), mask=region[20:60, 80:150])
    for mask in (instance, region):  # an Instance, or a boolean array
        prompt = dict(points=[(120.0, 40.0)], mask=mask, multimask=False)
        tiled = hub_segmenter.segment_object(large_image, points=[(120.0, 40.0)], mask=mask, multimask=False, tile=TILE)
        x0, y0, x1, y1 = tiled.info["window"]
        assert tiled.info["window_kind"] == "shifted" and x0 <= 80 and 150 <= x1 and y0 <= 20 and 60 <= y1
        assert_same_as_direct_call(hub_segmenter, large_image, tiled, prompt)


def test_tiled_clicks_on_the_meta_backend_equal_a_direct_call_on_their_window(tmp_path, large_image):
    from promptseg.testing import make_random_meta_sam3

    checkpoint = make_random_meta_sam3(tmp_path / "tiny-meta")
    seg = promptseg.load_segmenter(str(checkpoint), device="cpu", cache_dir=tmp_path / "cache")
    assert seg.backend.name == "sam3-meta" and seg.supports_visual_prompts
    for prompt, kind in ((dict(points=[(60.0, 50.0)]), "grid"), (dict(box=(100.0, 20.0, 150.0, 60.0)), "shifted")):
        tiled = seg.segment_object(large_image, tile=TILE, **prompt)
        assert tiled.info["window_kind"] == kind
        assert_same_as_direct_call(seg, large_image, tiled, prompt)


# --- the text grid's cached tiles answer the clicks ----------------------------------------------------


def test_text_then_clicks_on_a_tiled_image_run_no_trunk_again(tiny_sam3_hub_dir, tmp_path, large_image):
    seg = promptseg.load_segmenter(str(tiny_sam3_hub_dir), device="cpu", cache_dir=tmp_path / "shared")
    trunk_runs = []
    seg.backend.model.vision_encoder.backbone.register_forward_hook(lambda *_: trunk_runs.append(1))
    seg.segment(large_image, ["red square", "green square"], tile=TILE, threshold=0.0, max_instances=5)
    assert seg.stats.image_encoder_runs == len(GRID) == len(trunk_runs) == 12
    clicks = [
        dict(points=[(60, 50)]),                                          # tile (0, 0)
        dict(points=[(60, 50), (90, 70)], point_labels=[1, 0]),           # two clicks, one tile
        dict(points=[(120, 50)]),                                         # in an overlap
        dict(points=[(390, 290)]),                                        # the image's corner
        dict(points=[(200, 200)], box=(180, 180, 230, 230)),              # a box inside one tile
        dict(box=(300, 190, 350, 260)),
    ]
    windows = set()
    for prompt in clicks:
        result = seg.segment_object(large_image, tile=TILE, **prompt)
        assert result.info["window_kind"] == "grid" and result.embedding_source == "memory"
        windows.add(result.info["window"])
    assert len(windows) >= 4 and windows <= grid_tile_boxes()
    assert seg.stats.image_encoder_runs == 12 and len(trunk_runs) == 12


def test_clicks_first_then_text_reuse_the_clicked_tile(hub_segmenter, large_image):
    hub_segmenter.segment_object(large_image, points=[(300, 250)], tile=TILE)
    assert hub_segmenter.stats.image_encoder_runs == 1
    tiled = hub_segmenter.segment(large_image, "green square", tile=TILE, threshold=0.0, max_instances=3)
    assert tiled.embedding_source == "mixed" and hub_segmenter.stats.image_encoder_runs == len(GRID)


def test_more_clicks_on_an_object_across_a_border_reuse_its_window(hub_segmenter, large_image):
    box = (100, 20, 150, 60)
    first = hub_segmenter.segment_object(large_image, box=box, tile=TILE)
    runs = hub_segmenter.stats.image_encoder_runs
    assert first.embedding_source == "computed" and first.info["window_kind"] == "shifted"
    for points, labels in (([(110, 40)], [1]), ([(110, 40), (140, 30)], [1, 0])):
        more = hub_segmenter.segment_object(large_image, points=points, point_labels=labels, box=box, tile=TILE)
        assert more.info["window"] == first.info["window"] and more.embedding_source == "memory"
    assert hub_segmenter.stats.image_encoder_runs == runs


def test_auto_tiles_a_large_image_by_the_text_rule(hub_segmenter, large_image):
    grid = resolve_tiling(TilingOptions(tile="auto"), SIZE, hub_segmenter.backend.input_size)
    assert grid is not None  # the rule segment() uses: the long side is over 1.5 model inputs
    result = hub_segmenter.segment_object(large_image, points=[(300, 250)], tile="auto")
    assert (result.info["tile"], result.info["overlap"]) == grid
    assert result.info["window"] in {(t.x0, t.y0, t.x1, t.y1) for t in tile_grid(SIZE, *grid)}


def test_auto_on_a_small_image_is_the_untiled_call(hub_segmenter, rgb_image):
    small = rgb_image[:, :160]  # 120 x 160: long side 160 <= 1.5 x 112: "auto" does not tile it
    for prompt in (dict(points=[(60, 50)]), dict(box=(40, 30, 110, 80)), dict(points=[(20, 20), (150, 110)])):
        auto = hub_segmenter.segment_object(small, tile="auto", **prompt)
        plain = hub_segmenter.segment_object(small, **prompt)
        assert auto.info == {} == plain.info
        for a, b in zip(auto.instances + auto.alternatives, plain.instances + plain.alternatives, strict=True):
            assert a.box == b.box and a.score == b.score and np.array_equal(a.mask, b.mask)


# --- refine a tiled text result ------------------------------------------------------------------------


def tiled_text(seg, image):
    return seg.segment(image, ["red square", "green square", "blue square"], tile=TILE, threshold=0.0,
                       max_instances=6)


def test_refine_of_a_tiled_result_keeps_ids_and_uses_its_grid(hub_segmenter, large_image):
    result = tiled_text(hub_segmenter, large_image)
    before = list(result.instances)
    target = before[2]
    ys, xs = np.nonzero(target.mask)
    click = (float(target.box[0] + xs[len(xs) // 2]), float(target.box[1] + ys[len(ys) // 2]))
    expected = hub_segmenter.segment_object(large_image, points=[click], mask=target, multimask=False, tile=TILE)
    untiled = hub_segmenter.segment_object(large_image, points=[click], mask=target, multimask=False)
    runs = hub_segmenter.stats.image_encoder_runs
    same = hub_segmenter.refine(result, points=[click], image=large_image, index=2)
    assert same is result and len(result) == len(before)
    assert all(result.instances[i] is before[i] for i in range(len(before)) if i != 2)
    refined = result.instances[2]
    assert (refined.label, refined.score, refined.phrase) == (target.label, target.score, target.phrase)
    assert refined.extra["refined"] and refined.extra["tiles"] == target.extra["tiles"]
    assert refined.box == expected[0].box and np.array_equal(refined.mask, expected[0].mask)
    assert not (refined.box == untiled[0].box and np.array_equal(refined.mask, untiled[0].mask))
    assert hub_segmenter.stats.image_encoder_runs == runs  # every window was cached by the calls above


def test_refine_of_a_tiled_result_can_be_told_not_to_tile(hub_segmenter, large_image):
    result = tiled_text(hub_segmenter, large_image)
    target = result.instances[0]
    ys, xs = np.nonzero(target.mask)
    click = [(float(target.box[0] + xs[0]), float(target.box[1] + ys[0]))]
    untiled = hub_segmenter.segment_object(large_image, points=click, mask=target, multimask=False)
    hub_segmenter.refine(result, points=click, image=large_image, index=0, tile=None)
    assert result[0].box == untiled[0].box and np.array_equal(result[0].mask, untiled[0].mask)


def test_refine_on_background_of_a_tiled_result_adds_the_object_in_image_pixels(hub_segmenter, large_image):
    result = hub_segmenter.segment(large_image, "red square", tile=TILE, threshold=0.0, max_instances=1)
    row, col = np.argwhere(result.to_label_image() == 0)[-1]  # background near the bottom-right corner
    click = [(float(col), float(row))]
    hub_segmenter.refine(result, points=click, image=large_image)
    alone = hub_segmenter.segment_object(large_image, points=click, tile=TILE)
    assert len(result) == 2 and result[1].label == "object"
    assert result[1].box == alone[0].box and np.array_equal(result[1].mask, alone[0].mask)
    wx0, wy0, wx1, wy1 = alone.info["window"]
    assert (wx0, wy0) == (272, 172)  # the bottom-right grid tile answered
    assert wx0 <= result[1].box[0] and result[1].box[2] <= wx1 and wy0 <= result[1].box[1] and result[1].box[3] <= wy1


def test_the_instance_under_a_click_is_the_one_drawn_on_top(hub_segmenter, large_image):
    result = tiled_text(hub_segmenter, large_image)
    labels = result.to_label_image()
    rng = np.random.default_rng(1)
    for row, col in zip(rng.integers(0, SIZE[0], 400), rng.integers(0, SIZE[1], 400)):
        under = _instance_under(result, np.array([[col + 0.5, row + 0.5]]), np.array([1]))
        assert (under if under is not None else -1) == labels[row, col] - 1


# --- bad prompts on a tiled image ---------------------------------------------------------------------


def test_a_mask_from_another_image_is_an_option_error_when_tiled(hub_segmenter, large_image):
    other = promptseg.Instance(label="cell", score=1.0, box=(380, 10, 420, 40), mask=np.ones((30, 40), bool))
    with pytest.raises(OptionError, match="lies outside this 400x300 image"):
        hub_segmenter.segment_object(large_image, points=[(390, 20)], mask=other, tile=TILE)
    with pytest.raises(OptionError, match="image's \\(height, width\\)"):
        hub_segmenter.segment_object(large_image, points=[(390, 20)], mask=np.ones((30, 40), bool), tile=TILE)
