"""`PromptsegModel` through FiftyOne's own `apply_model`."""

from __future__ import annotations

import pytest
from fo_helpers import assert_matches_core

from promptseg.errors import OptionError, PromptError
from promptseg_fiftyone.model import PromptsegModel


def test_apply_model_with_fixed_prompts(dataset, fo_segmenter):
    dataset.apply_model(PromptsegModel(["red square"], segmenter=fo_segmenter, threshold=0.0), "sam")
    for sample in dataset:
        assert_matches_core(sample["sam"], fo_segmenter.segment(sample.filepath, ["red square"], threshold=0.0))


def test_apply_model_with_a_prompt_field_and_batches(fo, make_dataset, fo_segmenter, image_paths):
    classes = [fo.Classifications(classifications=[fo.Classification(label=label)])
               for label in ("red square", "green square", "red square")]
    dataset = make_dataset(image_paths[:3], gt=classes)
    model = PromptsegModel(segmenter=fo_segmenter, threshold=0.0)
    dataset.apply_model(model, "sam", prompt_field="gt", batch_size=2)
    for sample in dataset:
        expected = fo_segmenter.segment(sample.filepath, [sample.gt.classifications[0].label], threshold=0.0)
        assert_matches_core(sample["sam"], expected)


def test_exemplar_field_from_the_constructor_survives_apply_model_kwargs(fo, make_dataset, fo_segmenter, image_paths):
    from promptseg.images import load_image

    boxes = fo.Detections(detections=[fo.Detection(label="red square", bounding_box=[0.2, 0.25, 0.3, 0.25])])
    dataset = make_dataset(image_paths[:1], words=["red square"], examples=[boxes])
    model = PromptsegModel(segmenter=fo_segmenter, exemplar_field="examples", threshold=0.0)
    dataset.apply_model(model, "sam", prompt_field="words")
    sample = dataset.first()
    height, width = load_image(sample.filepath).shape[:2]
    exemplars = [[0.2 * width, 0.25 * height, 0.5 * width, 0.5 * height]]
    expected = fo_segmenter.segment(sample.filepath, ["red square"], threshold=0.0, exemplars=exemplars)
    assert_matches_core(sample["sam"], expected)


def test_corrupt_image_is_skipped_by_apply_model(make_dataset, fo_segmenter, image_paths, corrupt_path):
    dataset = make_dataset([corrupt_path, image_paths[0]])
    dataset.apply_model(PromptsegModel(["red square"], segmenter=fo_segmenter, threshold=0.0), "sam")
    assert dataset.values("sam")[0] is None and dataset.values("sam")[1] is not None


def test_model_without_any_prompt_source_says_so(fo_segmenter, image_paths):
    with pytest.raises(PromptError, match="no prompts"):
        PromptsegModel(segmenter=fo_segmenter).predict(image_paths[0])


def test_apply_model_reports_a_decompression_bomb_and_writes_the_others(make_dataset, fo_segmenter, image_paths,
                                                                        bomb_path, caplog):
    dataset = make_dataset([image_paths[0], bomb_path, image_paths[1]])
    model = PromptsegModel(["red square"], segmenter=fo_segmenter, threshold=0.0)
    with caplog.at_level("WARNING"):
        dataset.apply_model(model, "sam")
    bomb_id = dataset.values("id")[1]
    assert any(bomb_id in record.getMessage() for record in caplog.records if record.levelname == "WARNING")
    assert dataset.values("sam")[1] is None
    for sample in dataset.select(dataset.values("id")[::2]):
        assert_matches_core(sample["sam"], fo_segmenter.segment(sample.filepath, ["red square"], threshold=0.0))

    dataset.exists("sam", False).apply_model(model, "sam")  # the resume recipe: goes past it again
    assert [v is not None for v in dataset.values("sam")] == [True, False, True]


def test_apply_model_keeps_the_segmenters_pixel_budget(make_dataset, make_segmenter, image_paths):
    from PIL import Image

    big, small = image_paths[0], image_paths[5]
    assert Image.open(big).width * Image.open(big).height > 100 * 100 > Image.open(small).width * Image.open(small).height
    dataset = make_dataset([big, small])
    dataset.apply_model(PromptsegModel(["red square"], segmenter=make_segmenter(max_pixels=100 * 100)), "sam")
    assert [v is not None for v in dataset.values("sam")] == [False, True]


def test_bad_options_fail_when_the_model_is_made(fo_segmenter):
    with pytest.raises(OptionError, match="Unknown option 'thresold'"):
        PromptsegModel(["red square"], segmenter=fo_segmenter, thresold=0.3)
    with pytest.raises(OptionError, match="threshold must be a number between 0 and 1, got 2"):
        PromptsegModel(["red square"], segmenter=fo_segmenter, threshold=2)


def test_options_object_or_names_reach_the_core(dataset, fo_segmenter):
    from promptseg.options import SegmentOptions

    options = SegmentOptions.from_flat(threshold=0.0, tile=64, min_area=3)
    dataset.apply_model(PromptsegModel(["red square"], segmenter=fo_segmenter, options=options), "by_object")
    dataset.apply_model(PromptsegModel(["red square"], segmenter=fo_segmenter, threshold=0.0, tile=64, min_area=3),
                        "by_name")
    for sample in dataset:
        expected = fo_segmenter.segment(sample.filepath, ["red square"], options)
        assert_matches_core(sample["by_object"], expected)
        assert_matches_core(sample["by_name"], expected)


def test_model_defaults_are_the_cores(fo_segmenter):
    from promptseg.options import SegmentOptions

    assert PromptsegModel(["red square"], segmenter=fo_segmenter).options == SegmentOptions()
    assert PromptsegModel(["red square"], segmenter=fo_segmenter, options=SegmentOptions(), min_area=4).options == \
        SegmentOptions.from_flat(min_area=4)
