"""`output="segmentation"` and `output="polylines"`: other FiftyOne label types from the same core result."""

from __future__ import annotations

import numpy as np
import pytest

from promptseg.errors import OptionError
from promptseg_fiftyone.runner import segment_samples

PROMPTS = ["red square", "green square"]


def assert_segmentation_matches_core(segmentation, result, class_ids: dict[str, int]) -> None:
    """Every pixel of each instance the core drew on top holds that instance's class id; background is 0."""
    height, width = result.image_size
    mask = segmentation.get_mask()
    assert mask.shape == (height, width)
    assert len(result) > 0
    on_top = result.to_label_image()
    for index, inst in enumerate(result):
        drawn = on_top == index + 1
        assert np.all(inst.full_mask(height, width)[drawn])
        assert np.all(mask[drawn] == class_ids[inst.label])
    union = np.any([inst.full_mask(height, width) for inst in result], axis=0)
    np.testing.assert_array_equal(mask > 0, union)


def test_segmentation_is_the_cores_masks_with_class_ids_in_prompt_order(fo, dataset, fo_segmenter):
    summary = segment_samples(dataset, PROMPTS, "sem", segmenter=fo_segmenter, threshold=0.0, output="segmentation")
    assert summary.processed == len(dataset)
    reloaded = fo.load_dataset(dataset.name)
    assert reloaded.get_field("sem").document_type is fo.Segmentation
    assert {int(k): v for k, v in reloaded.mask_targets["sem"].items()} == {1: "red square", 2: "green square"}
    for sample in reloaded:
        result = fo_segmenter.segment(sample.filepath, PROMPTS, threshold=0.0)
        assert_segmentation_matches_core(sample["sem"], result, {"red square": 1, "green square": 2})


def test_segmentation_class_ids_grow_with_per_sample_prompts_and_stay_stable(fo, make_dataset, fo_segmenter,
                                                                            image_paths, tmp_path):
    dataset = make_dataset(image_paths[:2], words=[["green square"], ["blue thing", "red square"]])
    segment_samples(dataset, ["red square"], "sem", segmenter=fo_segmenter, threshold=0.0,
                    output="segmentation", prompt_field="words", mask_dir=tmp_path, mask_path_min_pixels=1)
    ids = {"red square": 1, "green square": 2, "blue thing": 3}
    assert {int(k): v for k, v in dataset.mask_targets["sem"].items()} == {v: k for k, v in ids.items()}
    for sample, words in zip(dataset, (["green square"], ["blue thing", "red square"])):
        assert sample["sem"].mask is None and sample["sem"].mask_path.startswith(str(tmp_path))
        result = fo_segmenter.segment(sample.filepath, ["red square", *words], threshold=0.0)
        assert_segmentation_matches_core(sample["sem"], result, ids)

    segment_samples(dataset, ["green square"], "sem", segmenter=fo_segmenter, threshold=0.0,
                    output="segmentation", overwrite=True, mask_path_min_pixels=None)
    assert {int(k): v for k, v in dataset.mask_targets["sem"].items()} == {v: k for k, v in ids.items()}
    sample = dataset.first()
    assert_segmentation_matches_core(sample["sem"], fo_segmenter.segment(sample.filepath, ["green square"],
                                                                       threshold=0.0), ids)


def test_polylines_are_the_cores_polygons_in_relative_coordinates(fo, dataset, fo_segmenter):
    segment_samples(dataset, PROMPTS, "poly", segmenter=fo_segmenter, threshold=0.0, output="polylines")
    reloaded = fo.load_dataset(dataset.name)
    assert reloaded.get_field("poly").document_type is fo.Polylines
    shapes = 0
    for sample in reloaded:
        result = fo_segmenter.segment(sample.filepath, PROMPTS, threshold=0.0)
        height, width = result.image_size
        expected = [(inst, polygons) for inst, polygons in zip(result, result.to_polygons()) if polygons]
        polylines = sample["poly"].polylines
        assert len(polylines) == len(expected) > 0
        for polyline, (inst, polygons) in zip(polylines, expected):
            assert polyline.closed and polyline.filled
            assert polyline.label == inst.label and polyline.phrase == inst.phrase
            assert polyline.confidence == pytest.approx(inst.score)
            assert len(polyline.points) == len(polygons)
            for points, polygon in zip(polyline.points, polygons):
                np.testing.assert_allclose(np.array(points) * [width, height], polygon, atol=1e-9)
                shapes += 1
    assert shapes > 0


@pytest.mark.parametrize(("output", "holds"), [("segmentation", "Detections"), ("polylines", "Detections"),
                                               ("detections", "Segmentation")])
def test_an_existing_field_of_another_label_type_is_refused(fo, dataset, fo_segmenter, output, holds):
    kinds = {"Detections": fo.Detections, "Segmentation": fo.Segmentation}
    dataset.add_sample_field("taken", fo.EmbeddedDocumentField, embedded_doc_type=kinds[holds])
    with pytest.raises(OptionError, match=f"'taken' already holds {holds}, not"):
        segment_samples(dataset, PROMPTS, "taken", segmenter=fo_segmenter, output=output)


def test_unknown_output_names_the_choices(dataset, fo_segmenter):
    with pytest.raises(OptionError, match="detections, segmentation, polylines"):
        segment_samples(dataset, PROMPTS, "x", segmenter=fo_segmenter, output="masks")


def test_apply_model_writes_segmentations_and_polylines(fo, make_dataset, fo_segmenter, image_paths):
    from promptseg_fiftyone.model import PromptsegModel

    dataset = make_dataset(image_paths[:3], words=["green square", None, "blue thing"])
    model = PromptsegModel(["red square"], segmenter=fo_segmenter, threshold=0.0, output="segmentation")
    dataset.apply_model(model, "sem", prompt_field="words")
    assert model.mask_targets == {1: "red square", 2: "green square", 3: "blue thing"}
    dataset.apply_model(PromptsegModel(["red square"], segmenter=fo_segmenter, threshold=0.0, output="polylines"),
                        "poly")
    for sample, word in zip(dataset, ("green square", None, "blue thing")):
        prompts = ["red square"] + ([word] if word else [])
        result = fo_segmenter.segment(sample.filepath, prompts, threshold=0.0)
        assert_segmentation_matches_core(sample["sem"], result, {v: k for k, v in model.mask_targets.items()})
        polygons = fo_segmenter.segment(sample.filepath, ["red square"], threshold=0.0).to_polygons()
        assert [len(p.points) for p in sample["poly"].polylines] == [len(p) for p in polygons if p]
    with pytest.raises(OptionError, match="Unknown output 'mask'"):
        PromptsegModel(["car"], segmenter=fo_segmenter, output="mask")
