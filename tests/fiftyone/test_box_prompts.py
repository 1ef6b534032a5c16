"""A prompt field holding Detections: each box is one object (`Segmenter.segment_object`), on a real database."""

from __future__ import annotations

import numpy as np
import pytest
from fo_helpers import URI

import promptseg
from promptseg.errors import ModelLoadError, OptionError
from promptseg_fiftyone.convert import pixel_box, relative_box
from promptseg_fiftyone.model import PromptsegModel
from promptseg_fiftyone.runner import segment_samples

BOXES = [("red square", [0.15, 0.2, 0.35, 0.3]), ("green square", [0.5, 0.5, 0.4, 0.4])]


@pytest.fixture
def hub_segmenter(tiny_sam3_hub_dir, tmp_path):
    """A fresh segmenter with the tracker head and its own cache, so encoder runs are counted from zero."""
    return promptseg.load_segmenter(str(tiny_sam3_hub_dir), device="cpu", cache_dir=tmp_path / "cache")


def detections(fo, boxes):
    return fo.Detections(detections=[fo.Detection(label=label, bounding_box=box) for label, box in boxes])


@pytest.fixture
def box_dataset(fo, make_dataset, image_paths):
    """Two boxes, one box, an empty Detections and no field value."""
    values = [detections(fo, BOXES), detections(fo, BOXES[1:]), fo.Detections(), None]
    return make_dataset(image_paths[:4], boxes=values)


def assert_objects_match_core(written, sample, segmenter) -> None:
    """One detection per prompt box: its label, and the mask, tight box and score `segment_object` gives."""
    from promptseg.images import load_image

    height, width = load_image(sample.filepath).shape[:2]
    prompts = sample["boxes"].detections
    assert len(written.detections) == len(prompts) > 0
    for detection, prompt in zip(written.detections, prompts):
        expected = segmenter.segment_object(sample.filepath, box=pixel_box(prompt.bounding_box, (height, width)))
        (inst,) = expected.instances
        assert detection.label == prompt.label
        assert detection.confidence == float(inst.score)
        assert detection.bounding_box == relative_box(inst.box, (height, width))
        decoded = detection.to_segmentation(frame_size=(width, height), target=1).mask.astype(bool)
        np.testing.assert_array_equal(decoded, inst.full_mask(height, width))  # exact: same segmenter, same box, cached embedding


def test_each_box_of_a_detections_field_becomes_one_masked_detection(fo, box_dataset, hub_segmenter):
    summary = segment_samples(box_dataset, None, "masks", segmenter=hub_segmenter, prompt_field="boxes")
    assert (summary.processed, summary.no_prompts, summary.failed_count, summary.instances) == (2, 2, 0, 3)
    assert summary.embedding_sources == {"computed": 2}
    assert hub_segmenter.stats.image_encoder_runs == 2  # one per image, for all of its boxes
    reloaded = fo.load_dataset(box_dataset.name)
    first, second, empty, missing = reloaded
    for sample in (first, second):
        assert_objects_match_core(sample["masks"], sample, hub_segmenter)
    assert empty["masks"] is None and missing["masks"] is None
    assert hub_segmenter.stats.image_encoder_runs == 2  # the checks above reused the cached embeddings


def test_apply_model_with_a_box_prompt_field(fo, box_dataset, hub_segmenter):
    box_dataset.apply_model(PromptsegModel(segmenter=hub_segmenter), "masks", prompt_field="boxes")
    assert hub_segmenter.stats.image_encoder_runs == 2
    first, second, empty, missing = fo.load_dataset(box_dataset.name)
    for sample in (first, second):
        assert_objects_match_core(sample["masks"], sample, hub_segmenter)
    assert empty["masks"] is not None and not empty["masks"].detections  # nothing to segment: an empty label
    assert missing["masks"] is not None and not missing["masks"].detections
    assert hub_segmenter.stats.image_encoder_runs == 2


def test_empty_and_outside_boxes_are_skipped_with_a_warning_and_the_others_written(fo, make_dataset, image_paths,
                                                                                   hub_segmenter, caplog):
    bad = [("flat", [0.2, 0.2, 0.3, 0.0]), ("off", [1.2, 0.1, 0.2, 0.2]), ("nan", [float("nan"), 0.1, 0.2, 0.2])]
    good = ("red square", [0.15, 0.2, 0.35, 0.3])
    dataset = make_dataset(image_paths[:2], boxes=[detections(fo, [*bad, good]), detections(fo, [good])])
    with caplog.at_level("WARNING"):
        summary = segment_samples(dataset, None, "masks", segmenter=hub_segmenter, prompt_field="boxes")
    assert (summary.processed, summary.failed_count, summary.skipped_boxes, summary.instances) == (2, 0, 3, 2)
    assert [m.count("skipped") for m in summary.warnings] == [1, 1, 1]
    for label, message in zip(("flat", "off", "nan"), summary.warnings):
        assert f"({label!r}) skipped" in message
    assert "empty or reversed" in summary.warnings[0] and "does not overlap" in summary.warnings[1]
    assert "finite" in summary.warnings[2] or "nan" in summary.warnings[2].lower()
    assert sum("skipped" in r.getMessage() for r in caplog.records) >= 3
    first, second = dataset
    assert [d.label for d in first["masks"].detections] == ["red square"]
    assert [d.label for d in second["masks"].detections] == ["red square"]


def test_a_detector_only_model_is_refused_before_any_work(fo, box_dataset, fo_segmenter):
    runs = fo_segmenter.stats.image_encoder_runs
    with pytest.raises(ModelLoadError, match="facebook/sam3"):
        segment_samples(box_dataset, None, "masks", segmenter=fo_segmenter, prompt_field="boxes")
    assert "masks" not in box_dataset.get_field_schema()
    assert fo_segmenter.stats.image_encoder_runs == runs


def test_apply_model_with_a_detector_only_model_reads_no_image(fo, box_dataset, fo_segmenter):
    runs = fo_segmenter.stats.image_encoder_runs
    with pytest.raises(ModelLoadError, match="facebook/sam3"):
        box_dataset.apply_model(PromptsegModel(segmenter=fo_segmenter), "masks", prompt_field="boxes",
                                skip_failures=False)
    assert fo_segmenter.stats.image_encoder_runs == runs


def test_text_prompts_or_exemplars_with_a_box_prompt_field_are_refused(fo, box_dataset, hub_segmenter):
    with pytest.raises(OptionError, match="holds boxes"):
        segment_samples(box_dataset, ["car"], "masks", segmenter=hub_segmenter, prompt_field="boxes")
    with pytest.raises(OptionError, match="holds boxes"):
        segment_samples(box_dataset, None, "masks", segmenter=hub_segmenter, prompt_field="boxes",
                        exemplar_field="boxes")
    assert hub_segmenter.stats.image_encoder_runs == 0


def test_the_operator_segments_each_box_of_a_detections_prompt_field(fo, box_dataset, tiny_sam3_hub_dir):
    import fiftyone.operators as foo
    from promptseg.sessions import shared_segmenter

    params = {"label_field": "masks", "model": str(tiny_sam3_hub_dir), "device": "cpu", "prompt_field": "boxes"}
    result = foo.execute_operator(URI, ctx={"dataset": box_dataset, "params": params})
    assert (result.result["processed"], result.result["instances"]) == (2, 3)
    segmenter = shared_segmenter(str(tiny_sam3_hub_dir), device="cpu")
    first, second, empty, _ = box_dataset
    for sample in (first, second):
        assert_objects_match_core(sample["masks"], sample, segmenter)
    assert empty["masks"] is None
