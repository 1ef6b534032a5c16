"""`segment_samples`: the loop behind the operator, against a real FiftyOne database."""

from __future__ import annotations

import os

import numpy as np
import pytest

from promptseg.errors import OptionError, PromptError
from promptseg_fiftyone.runner import run_key_for, segment_samples

from fo_helpers import assert_matches_core, detections_payload

PROMPTS = ["red square", "green square"]


def test_masks_round_trip_through_fiftyone_pixel_for_pixel(fo, dataset, fo_segmenter, image_paths):
    summary = segment_samples(dataset, PROMPTS, "sam", segmenter=fo_segmenter, threshold=0.0)
    assert summary.processed == len(image_paths) and summary.failed_count == 0
    reloaded = fo.load_dataset(dataset.name)
    for sample in reloaded:
        assert_matches_core(sample["sam"], fo_segmenter.segment(sample.filepath, PROMPTS, threshold=0.0))
        assert {d.phrase for d in sample["sam"].detections} <= set(PROMPTS)


def test_large_images_store_masks_as_files(fo, dataset, fo_segmenter, tmp_path):
    segment_samples(dataset.limit(2), PROMPTS, "sam", segmenter=fo_segmenter, threshold=0.0,
                    mask_dir=tmp_path / "masks", mask_path_min_pixels=1)
    for sample in fo.load_dataset(dataset.name).limit(2):
        detections = sample["sam"]
        assert all(d.mask is None and os.path.isfile(d.mask_path) for d in detections.detections)
        assert_matches_core(detections, fo_segmenter.segment(sample.filepath, PROMPTS, threshold=0.0))


def test_corrupt_image_is_reported_and_the_others_are_written(make_dataset, fo_segmenter, image_paths, corrupt_path):
    dataset = make_dataset([image_paths[0], corrupt_path, image_paths[1]])
    summary = segment_samples(dataset, PROMPTS, "sam", segmenter=fo_segmenter, threshold=0.0)
    assert summary.processed == 2 and summary.failed_count == 1
    assert summary.failed[0]["filepath"] == corrupt_path and "corrupt" in summary.failed[0]["error"]
    assert dataset.values("sam")[1] is None  # left empty, so a later run retries it
    assert all(dataset.values("sam")[i] is not None for i in (0, 2))


def test_a_decompression_bomb_is_reported_and_reruns_go_on_past_it(make_dataset, fo_segmenter, image_paths, bomb_path):
    dataset = make_dataset([image_paths[0], bomb_path, image_paths[1], image_paths[2]])
    summary = segment_samples(dataset, PROMPTS, "sam", segmenter=fo_segmenter, threshold=0.0, batch_size=2)
    assert (summary.processed, summary.failed_count) == (3, 1)
    (failure,) = summary.failed
    assert failure["filepath"] == bomb_path and "PROMPTSEG_MAX_PIXELS" in failure["error"]
    written = [None if d is None else detections_payload(d) for d in dataset.values("sam")]
    assert written[1] is None and None not in written[:1] + written[2:]

    rerun = segment_samples(dataset, PROMPTS, "sam", segmenter=fo_segmenter, threshold=0.0, batch_size=2)
    assert (rerun.skipped, rerun.processed, rerun.failed_count) == (3, 0, 1)
    assert [None if d is None else detections_payload(d) for d in dataset.values("sam")] == written
    assert dataset.load_run_results(run_key_for("sam")).failed[0]["filepath"] == bomb_path


def test_the_segmenters_pixel_budget_holds_for_the_run(make_dataset, make_segmenter, image_paths):
    from PIL import Image

    segmenter = make_segmenter(max_pixels=100 * 100)
    big, small = image_paths[0], image_paths[5]
    assert Image.open(big).width * Image.open(big).height > 100 * 100 > Image.open(small).width * Image.open(small).height
    dataset = make_dataset([big, small])
    summary = segment_samples(dataset, PROMPTS, "sam", segmenter=segmenter, threshold=0.0)
    assert (summary.processed, summary.failed_count) == (1, 1)
    assert summary.failed[0]["filepath"] == big and "max_pixels" in summary.failed[0]["error"]
    assert dataset.values("sam")[0] is None and dataset.values("sam")[1] is not None


def test_missing_and_empty_image_files_are_reported_and_the_others_are_written(make_dataset, fo_segmenter,
                                                                              image_paths, tmp_path):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    missing = str(tmp_path / "gone.png")
    dataset = make_dataset([image_paths[0], missing, str(empty), image_paths[1]])
    summary = segment_samples(dataset, PROMPTS, "sam", segmenter=fo_segmenter, threshold=0.0)
    assert (summary.processed, summary.failed_count) == (2, 2)
    errors = {failure["filepath"]: failure["error"] for failure in summary.failed}
    assert "No such image file" in errors[missing] and "empty (0 bytes)" in errors[str(empty)]
    assert [v is not None for v in dataset.values("sam")] == [True, False, False, True]


def test_a_sample_whose_own_prompts_or_boxes_are_unusable_is_reported_and_the_others_are_written(
    fo, make_dataset, fo_segmenter, image_paths
):
    dataset = make_dataset(image_paths[:3])
    dataset.add_sample_field("words", fo.ListField)  # untyped: a sample may hold a number among its words
    nan_box = fo.Detection(label="red square", bounding_box=[float("nan"), 0.2, 0.3, 0.3])
    good_box = fo.Detection(label="red square", bounding_box=[1 / 6, 0.2, 1 / 3, 0.3])
    for sample, words, boxes in zip(dataset, [["red square"], ["red square", 7], ["green square"]],
                                    [[good_box], [good_box], [nan_box]]):
        sample["words"], sample["examples"] = words, fo.Detections(detections=boxes)
        sample.save()

    by_words = segment_samples(dataset, None, "by_words", segmenter=fo_segmenter, threshold=0.0, prompt_field="words")
    assert (by_words.processed, by_words.failed_count) == (2, 1)
    assert "Cannot read prompts from 'words' of type int" in by_words.failed[0]["error"]
    assert [v is not None for v in dataset.values("by_words")] == [True, False, True]

    by_boxes = segment_samples(dataset, ["red square"], "by_boxes", segmenter=fo_segmenter, threshold=0.0,
                               exemplar_field="examples")
    assert (by_boxes.processed, by_boxes.failed_count) == (2, 1)
    assert "not four finite numbers" in by_boxes.failed[0]["error"]
    assert [v is not None for v in dataset.values("by_boxes")] == [True, True, False]


def test_an_empty_dataset_is_a_run_with_nothing_to_do(fo, fo_segmenter):
    dataset = fo.Dataset()
    calls = []
    try:
        summary = segment_samples(dataset, PROMPTS, "sam", segmenter=fo_segmenter, progress=lambda *a: calls.append(a))
        assert (summary.total, summary.processed, summary.skipped, summary.failed_count) == (0, 0, 0, 0)
        assert calls == [(0, 0)] and dataset.has_field("sam")
    finally:
        dataset.delete()


def test_progress_announces_the_samples_to_do_then_counts_each_one(make_dataset, fo_segmenter, image_paths,
                                                                    corrupt_path):
    """The core's ``progress(total, advance)``: skipped samples are not counted, failed ones are."""
    dataset = make_dataset([image_paths[0], corrupt_path, image_paths[1]])
    segment_samples(dataset.limit(1), PROMPTS, "sam", segmenter=fo_segmenter, threshold=0.0)
    calls = []
    summary = segment_samples(dataset, PROMPTS, "sam", segmenter=fo_segmenter, threshold=0.0,
                              progress=lambda *a: calls.append(a))
    assert (summary.skipped, summary.processed, summary.failed_count) == (1, 1, 1)
    assert calls == [(2, 0), (2, 1), (2, 1)]


def test_channels_and_percentiles_pick_the_pixels_of_each_file(make_dataset, fo_segmenter, tmp_path):
    import tifffile

    rng = np.random.default_rng(7)
    stack = (rng.random((90, 120, 5)) * 900).astype(np.uint16)
    stack[20:60, 30:80, 3] += 40000  # a bright square seen only in channels 3 and 4
    stack[20:60, 30:80, 4] += 25000
    path = str(tmp_path / "five_channels.tif")
    tifffile.imwrite(path, stack)
    dataset = make_dataset([path])
    options = {"threshold": 0.0, "channels": (4, 3, 2), "percentiles": (5.0, 95.0)}
    summary = segment_samples(dataset, PROMPTS, "sam", segmenter=fo_segmenter, **options)
    assert (summary.processed, summary.failed_count) == (1, 0)
    assert_matches_core(dataset.first()["sam"], fo_segmenter.segment(path, PROMPTS, **options))


def test_existing_labels_are_skipped_unless_overwrite(dataset, fo_segmenter, image_paths):
    segment_samples(dataset, ["red square"], "sam", segmenter=fo_segmenter, threshold=0.0)
    before = [detections_payload(d) for d in dataset.values("sam")]

    again = segment_samples(dataset, ["green square"], "sam", segmenter=fo_segmenter, threshold=0.0)
    assert again.skipped == len(image_paths) and again.processed == 0
    assert any("different prompts" in w for w in again.warnings)
    assert [detections_payload(d) for d in dataset.values("sam")] == before

    redo = segment_samples(dataset, ["green square"], "sam", segmenter=fo_segmenter, threshold=0.0, overwrite=True)
    assert redo.processed == len(image_paths) and redo.skipped == 0
    labels = {d.label for dets in dataset.values("sam") for d in dets.detections}
    assert labels == {"green square"}


def test_interrupted_run_resumed_equals_uninterrupted_run(dataset, fo_segmenter, image_paths):
    segment_samples(dataset, PROMPTS, "reference", segmenter=fo_segmenter, threshold=0.0)

    done = []

    def interrupt_after_three(total, advance):
        done.append(advance)
        if sum(done) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        segment_samples(dataset, PROMPTS, "resumed", segmenter=fo_segmenter, threshold=0.0,
                        batch_size=2, progress=interrupt_after_three)
    written = [v is not None for v in dataset.values("resumed")]
    assert written == [True, True, True, False, False, False]  # nothing finished was lost

    summary = segment_samples(dataset, PROMPTS, "resumed", segmenter=fo_segmenter, threshold=0.0, batch_size=2)
    assert summary.skipped == 3 and summary.processed == 3
    assert [detections_payload(d) for d in dataset.values("resumed")] == [
        detections_payload(d) for d in dataset.values("reference")
    ]


def test_second_prompt_over_the_same_view_skips_the_image_encoder(dataset, make_segmenter, image_paths):
    segmenter = make_segmenter()
    first = segment_samples(dataset, ["red square"], "first", segmenter=segmenter, threshold=0.0)
    runs = segmenter.stats.image_encoder_runs
    second = segment_samples(dataset, ["green square"], "second", segmenter=segmenter, threshold=0.0)
    assert first.embedding_sources == {"computed": len(image_paths)}
    assert second.embedding_sources == {"memory": len(image_paths)}
    assert segmenter.stats.image_encoder_runs == runs


def test_run_record_says_what_produced_the_field(dataset, fo_segmenter, tiny_sam3_dir):
    segment_samples(dataset, PROMPTS, "sam", segmenter=fo_segmenter, threshold=0.1, min_area=2)
    info = dataset.get_run_info(run_key_for("sam"))
    assert info.config.method == "promptseg"
    assert info.config.prompts == PROMPTS
    assert info.config.options == {"threshold": 0.1, "min_area": 2}
    assert info.config.model == str(tiny_sam3_dir)
    assert info.config.segmenter["device"] == "cpu"
    results = dataset.load_run_results(run_key_for("sam"))
    assert results.processed == len(dataset)


def test_per_sample_prompts_from_string_list_and_classifications(fo, make_dataset, fo_segmenter, image_paths):
    paths = image_paths[:3]
    dataset = make_dataset(
        paths,
        text=["red square", None, "green square"],
        words=[["red square"], ["green square", "red square"], []],
        classes=[fo.Classifications(classifications=[fo.Classification(label="red square")]), None, None],
    )
    for field, expected in (("text", [["red square"], None, ["green square"]]),
                            ("words", [["red square"], ["green square", "red square"], None]),
                            ("classes", [["red square"], None, None])):
        summary = segment_samples(dataset, None, f"by_{field}", segmenter=fo_segmenter, threshold=0.0,
                                  prompt_field=field)
        assert summary.no_prompts == sum(e is None for e in expected)
        for sample, prompts in zip(dataset, expected):
            if prompts is None:
                assert sample[f"by_{field}"] is None
            else:
                assert_matches_core(sample[f"by_{field}"], fo_segmenter.segment(sample.filepath, prompts, threshold=0.0))


def test_exemplar_boxes_reach_the_core_in_pixels(fo, make_dataset, fo_segmenter, image_paths):
    from promptseg.images import load_image

    box = fo.Detection(label="red square", bounding_box=[1 / 6, 0.2, 1 / 3, 0.3])
    dataset = make_dataset(image_paths[:2], examples=[fo.Detections(detections=[box]), None])
    segment_samples(dataset, ["red square"], "sam", segmenter=fo_segmenter, threshold=0.0, exemplar_field="examples")
    first, second = dataset
    height, width = load_image(first.filepath).shape[:2]
    pixels = [[width / 6, 0.2 * height, width / 6 + width / 3, 0.5 * height]]
    with_box = fo_segmenter.segment(first.filepath, ["red square"], threshold=0.0, exemplars=pixels)
    assert_matches_core(first["sam"], with_box)
    assert_matches_core(second["sam"], fo_segmenter.segment(second.filepath, ["red square"], threshold=0.0))


def test_bad_requests_fail_before_any_work_with_clear_messages(fo, dataset, fo_segmenter, monkeypatch):
    dataset.add_sample_field("note", fo.StringField)
    with pytest.raises(PromptError, match="No prompt"):
        segment_samples(dataset, [], "sam", segmenter=fo_segmenter)
    with pytest.raises(PromptError, match="empty"):
        segment_samples(dataset, ["car", " "], "sam", segmenter=fo_segmenter)
    with pytest.raises(OptionError, match="Bad label field name 'my.field'"):
        segment_samples(dataset, ["car"], "my.field", segmenter=fo_segmenter)
    with pytest.raises(OptionError, match="'note' already holds StringField, not Detections"):
        segment_samples(dataset, ["car"], "note", segmenter=fo_segmenter)
    with pytest.raises(OptionError, match="prompt field 'nope' is not a field"):
        segment_samples(dataset, ["car"], "sam", segmenter=fo_segmenter, prompt_field="nope")
    dataset.add_sample_field("weight", fo.FloatField)
    with pytest.raises(OptionError, match="prompt field 'weight' holds FloatField: choose a string"):
        segment_samples(dataset, None, "sam", segmenter=fo_segmenter, prompt_field="weight")
    dataset.add_sample_field("classes", fo.EmbeddedDocumentField, embedded_doc_type=fo.Classifications)
    with pytest.raises(OptionError, match="exemplar field 'classes' holds Classifications: choose a Detection"):
        segment_samples(dataset, ["car"], "sam", segmenter=fo_segmenter, exemplar_field="classes")
    with pytest.raises(OptionError, match="Unknown option 'thresold': Segmenter.segment takes threshold"):
        segment_samples(dataset, ["car"], "sam", segmenter=fo_segmenter, thresold=0.3)
    with pytest.raises(OptionError, match="'exemplars' cannot be an option"):
        segment_samples(dataset, ["car"], "sam", segmenter=fo_segmenter, exemplars=[[0, 0, 5, 5]])
    with pytest.raises(OptionError, match="batch_size must be at least 1"):
        segment_samples(dataset, ["car"], "sam", segmenter=fo_segmenter, batch_size=0)
    with monkeypatch.context() as env, pytest.raises(OptionError, match="PROMPTSEG_MAX_PIXELS='lots'"):
        env.setenv("PROMPTSEG_MAX_PIXELS", "lots")
        segment_samples(dataset, ["car"], "sam", segmenter=fo_segmenter)
    with pytest.raises(OptionError, match="threshold must be a number between 0 and 1, got 2"):
        segment_samples(dataset, ["car"], "sam", segmenter=fo_segmenter, threshold=2)
    with pytest.raises(OptionError, match="max_instances must be None or a whole number >= 1, got 0"):
        segment_samples(dataset, ["car"], "sam", segmenter=fo_segmenter, max_instances=0)
    assert not dataset.has_field("sam")  # none of these started a run


def test_options_object_and_names_give_the_same_run(dataset, fo_segmenter):
    from promptseg.options import SegmentOptions

    options = SegmentOptions.from_flat(threshold=0.0, smooth=1, cross_prompt_iou=None)
    segment_samples(dataset, PROMPTS, "by_object", segmenter=fo_segmenter, options=options)
    segment_samples(dataset, PROMPTS, "by_name", segmenter=fo_segmenter, threshold=0.0, smooth=1, cross_prompt_iou=None)
    for sample in dataset:
        expected = fo_segmenter.segment(sample.filepath, PROMPTS, options)
        assert_matches_core(sample["by_object"], expected)
        assert_matches_core(sample["by_name"], expected)
    recorded = {"threshold": 0.0, "smooth": 1, "cross_prompt_iou": None}
    assert dataset.get_run_info("promptseg_by_object").config.options == recorded
    assert dataset.get_run_info("promptseg_by_name").config.options == recorded
