"""Bad options get an `OptionError` naming the cause and the fix, before any work is done.

Every case runs through the real API on the tiny random SAM 3: `segment` (untiled and tiled),
`check_options` (which hosts call to validate their forms) and `load_segmenter`.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from promptseg.errors import OptionError
from promptseg.segmenter import check_exemplars, check_options

NAN, INF = math.nan, math.inf

BAD_EXEMPLARS = [  # exemplars, exemplar_labels, words of the message
    ([[0, 0, 10]], None, "four numbers per box"),
    ([0, 0, 10, 10, 20], None, "four numbers per box"),
    ([[0, 0, 10, 10], [1, 2]], None, "exemplars must be"),
    ([[0, 0, NAN, 10]], None, "NaN or infinite"),
    ([[0, -INF, 10, 10]], None, "NaN or infinite"),
    ([[50, 50, 10, 10]], None, "empty or reversed"),
    ([[10, 10, 10, 40]], None, "empty or reversed"),
    ([["a", "b", "c", "d"]], None, "numbers only"),
    ([[0, 0, None, 10]], None, "numbers only"),
    ("0,0,10,10", None, "numbers only"),
    ([[0, 0, 10, 10], [5, 5, 20, 20]], [1], "one 1 \\(positive\\) or 0 \\(negative\\) per box"),
    ([[0, 0, 10, 10]], [2], "must be 1 \\(positive\\) or 0 \\(negative\\)"),
    ([[0, 0, 10, 10]], [0.5], "must be 1 \\(positive\\) or 0 \\(negative\\)"),
    ([[0, 0, 10, 10]], ["yes"], "numbers only"),
    (None, [1], "without exemplars"),
]


@pytest.mark.parametrize("tile", [None, 64])
@pytest.mark.parametrize("exemplars, labels, words", BAD_EXEMPLARS)
def test_malformed_exemplars_are_an_option_error_before_any_work(segmenter, rgb_image, tile, exemplars, labels,
                                                                 words):
    with pytest.raises(OptionError, match=words) as caught:
        segmenter.segment(rgb_image, "cat", exemplars=exemplars, exemplar_labels=labels, tile=tile)
    assert "(x0, y0, x1, y1)" in str(caught.value) or "label" in str(caught.value)  # says the expected form
    assert segmenter.stats.image_encoder_runs == 0 and segmenter.stats.decoder_runs == 0
    assert len(segmenter.cache.memory) == 0


def test_exemplars_are_checked_before_the_image_is_read(segmenter):
    with pytest.raises(OptionError, match="NaN or infinite"):
        segmenter.segment("/no/such/image.png", "cat", exemplars=[[0, 0, NAN, 10]])


def test_exemplars_in_any_numeric_form_give_the_same_result(segmenter, rgb_image):
    options = {"threshold": 0.0, "iou_threshold": None, "cross_prompt_iou": None}
    as_lists = segmenter.segment(rgb_image, "cat", exemplars=[[40, 30, 110, 80]], exemplar_labels=[1], **options)
    forms = [
        {"exemplars": (40, 30, 110, 80)},  # one box given flat
        {"exemplars": np.array([[40, 30, 110, 80]], dtype=np.int32), "exemplar_labels": np.array([True])},
        {"exemplars": [np.float32([40.0, 30.0, 110.0, 80.0])], "exemplar_labels": (np.int64(1),)},
    ]
    for form in forms:
        again = segmenter.segment(rgb_image, "cat", **form, **options)
        assert [i.score for i in again] == [i.score for i in as_lists]  # same inputs, same computation
    boxes, labels = check_exemplars([(40, 30, 110, 80), (0, 0, 5, 5)], [True, 0])
    assert boxes.shape == (2, 4) and labels.tolist() == [1, 0]
    assert check_exemplars([], None) == (None, None)


@pytest.mark.parametrize("tile", [None, 64])
def test_negative_exemplar_label_is_used_on_both_paths(segmenter, rgb_image, tile):
    options = {"threshold": 0.0, "iou_threshold": None, "cross_prompt_iou": None, "tile": tile}
    positive = segmenter.segment(rgb_image, "cat", exemplars=[[40, 30, 110, 80]], **options)
    negative = segmenter.segment(rgb_image, "cat", exemplars=[[40, 30, 110, 80]], exemplar_labels=[0], **options)
    assert sorted(i.score for i in positive) != pytest.approx(sorted(i.score for i in negative), abs=1e-6)


@pytest.mark.parametrize(
    "options, words",
    [
        ({"threshold": NAN}, "threshold must be a number between 0 and 1"),
        ({"threshold": "0.5"}, "threshold must be a number between 0 and 1"),
        ({"threshold": True}, "threshold must be a number between 0 and 1"),
        ({"mask_threshold": 1}, "strictly between 0 and 1"),
        ({"smooth": -1}, "smooth must be a whole number of pixels >= 0"),
        ({"min_area": 2.5}, "min_area must be a whole number of pixels >= 0"),
        ({"max_instances": True}, "max_instances must be None or a whole number >= 1"),
        ({"max_instances": 2.0}, "max_instances must be None or a whole number >= 1"),
        ({"iou_threshold": -0.1}, "iou_threshold must be a number between 0 and 1"),
        ({"cross_prompt_iou": 1.5}, "cross_prompt_iou must be a number between 0 and 1"),
    ],
)
def test_out_of_range_options_name_the_option_and_its_range(segmenter, rgb_image, options, words):
    with pytest.raises(OptionError, match=words):
        check_options(**options)
    with pytest.raises(OptionError, match=words):
        segmenter.segment(rgb_image, "cat", **options)
    assert segmenter.stats.image_encoder_runs == 0


def test_numpy_numbers_are_valid_options(segmenter, rgb_image):
    check_options(threshold=np.float32(0.3), mask_threshold=np.float64(0.5), min_area=np.int64(5),
                  max_instances=np.int32(3), iou_threshold=np.float32(0.7))
    result = segmenter.segment(rgb_image, "cat", threshold=np.float32(0.0), max_instances=np.int64(2))
    assert len(result) == 2


@pytest.mark.parametrize(
    "options, words",
    [
        ({"revison": "main"}, "Unknown option\\(s\\) 'revison' for the sam3 backend.*revision, token"),
        ({"prompt_batch_size": 0}, "prompt_batch_size must be a whole number >= 1"),
        ({"prompt_batch_size": "8"}, "prompt_batch_size must be a whole number >= 1"),
        ({"memory_cache_bytes": -1}, "memory_cache_bytes must be a whole number of bytes >= 0"),
        ({"disk_cache_bytes": "20GB"}, "disk_cache_bytes must be .*cache_dir=False"),
    ],
)
def test_bad_load_options_are_an_option_error(tiny_sam3_dir, options, words):
    from promptseg import load_segmenter

    with pytest.raises(OptionError, match=words):
        load_segmenter(str(tiny_sam3_dir), device="cpu", cache_dir=False, **options)
