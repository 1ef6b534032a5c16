"""The `@promptseg/fiftyone/segment_with_text` operator, loaded by FiftyOne from its plugins dir."""

from __future__ import annotations

import numpy as np
import pytest
from fo_helpers import URI, assert_matches_core

PROMPTS = ["red square", "green square"]


@pytest.fixture(scope="module")
def operator(fo):
    import fiftyone.operators as foo

    return foo.get_operator(URI)


@pytest.fixture
def params(tiny_sam3_dir, fo_segmenter):
    # fo_segmenter is the cached segmenter the operator will reuse for these model/device values.
    return {"prompts": PROMPTS, "label_field": "sam", "threshold": 0.0, "model": str(tiny_sam3_dir), "device": "cpu"}


def test_plugin_is_found_in_the_plugins_dir(fo):
    import fiftyone.plugins as fop

    assert "@promptseg/fiftyone" in [p.name for p in fop.list_plugins()]


def test_runs_immediately_on_the_dataset_and_asks_the_app_to_reload(fo, dataset, params, fo_segmenter):
    import fiftyone.operators as foo

    result = foo.execute_operator(URI, ctx={"dataset": dataset, "params": params})
    assert result.result["processed"] == len(dataset)
    assert "reload_dataset" in [r["operator_uri"] for r in result.executor.to_json()["requests"]]
    for sample in dataset:
        assert_matches_core(sample["sam"], fo_segmenter.segment(sample.filepath, PROMPTS, threshold=0.0))


def test_runs_on_a_view_and_on_selected_samples_only(fo, dataset, params):
    import fiftyone.operators as foo

    view = dataset.skip(1).limit(2)
    foo.execute_operator(URI, ctx={"view": view, "params": {**params, "view_target": "CURRENT_VIEW"}})
    assert [v is not None for v in dataset.values("sam")] == [False, True, True, False, False, False]

    selected = dataset.values("id")[-1:]
    foo.execute_operator(URI, ctx={"dataset": dataset, "selected": selected,
                                   "params": {**params, "label_field": "picked", "view_target": "SELECTED_SAMPLES"}})
    assert [v is not None for v in dataset.values("picked")] == [False] * 5 + [True]


def test_call_from_python_skips_done_samples(operator, dataset, params):
    first = operator(dataset.limit(2), PROMPTS, "sam", threshold=0.0, model=params["model"], device="cpu")
    assert first.result["processed"] == 2
    second = operator(dataset, PROMPTS, "sam", threshold=0.0, model=params["model"], device="cpu")
    assert second.result["skipped"] == 2 and second.result["processed"] == len(dataset) - 2


def test_delegated_run_is_queued_then_executed(fo, operator, dataset, params, fo_segmenter):
    from fiftyone.operators.delegated import DelegatedOperationService
    from fiftyone.operators.executor import ExecutionRunState

    queued = operator(dataset, PROMPTS, "later", threshold=0.0, model=params["model"], device="cpu", delegate=True)
    assert queued.delegated
    assert not dataset.has_field("later")  # nothing happens until a worker runs it
    service = DelegatedOperationService()
    service.execute_queued_operations(operator=URI, dataset_name=dataset.name)
    (run,) = service.list_operations(operator=URI, dataset_name=dataset.name)
    assert run.run_state == ExecutionRunState.COMPLETED, run.run_state
    assert run.result.result["processed"] == len(dataset)
    # the worker saw the runner's progress(total, advance) as a fraction and a count
    assert run.status.progress == 1.0
    assert run.status.label == f"Segmented {len(dataset)} of {len(dataset)} samples"
    dataset.reload()
    for sample in dataset:
        assert_matches_core(sample["later"], fo_segmenter.segment(sample.filepath, PROMPTS, threshold=0.0))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"prompts": []}, "Add at least one prompt"),
        ({"prompts": ["car", "  "]}, "A prompt is empty"),
        ({"prompts": ["car", 3]}, "Prompts must be strings, got int"),
        ({"label_field": "bad.name"}, "Bad label field name"),
        ({"label_field": "filepath"}, "already holds StringField, not Detections"),
        ({"label_field": "filepath", "output": "segmentation"}, "already holds StringField, not Segmentation"),
        ({"label_field": "metadata", "output": "polylines"}, "already holds ImageMetadata, not Polylines"),
        ({"threshold": 2}, "threshold must be a number between 0 and 1, got 2"),
        ({"min_area": -1}, "min_area must be a whole number of pixels >= 0, got -1"),
        ({"mask_threshold": 1.0}, "mask_threshold must be strictly between 0 and 1"),
    ],
)
def test_form_errors_name_the_problem(fo, dataset, params, change, message):
    import fiftyone.operators as foo
    from fiftyone.operators.executor import ExecutionError

    with pytest.raises(ExecutionError) as excinfo:
        foo.execute_operator(URI, ctx={"dataset": dataset, "params": {**params, **change}})
    assert message in str(excinfo.value)
    assert not dataset.has_field("sam") or dataset.count("sam") == 0


def test_second_run_reuses_the_loaded_model_and_skips_the_image_encoder(operator, dataset, params, fo_segmenter):
    operator(dataset, ["red square"], "one", threshold=0.0, model=params["model"], device="cpu")
    runs = fo_segmenter.stats.image_encoder_runs
    second = operator(dataset, ["green square"], "two", threshold=0.0, model=params["model"], device="cpu")
    # A freshly loaded model would start with an empty memory cache ("disk" at best).
    assert second.result["embedding_sources"] == {"memory": len(dataset)}
    assert fo_segmenter.stats.image_encoder_runs == runs


def test_the_old_get_segmenter_warns_and_gives_the_shared_segmenter(params):
    import promptseg_fiftyone
    from promptseg.sessions import shared_segmenter

    with pytest.warns(DeprecationWarning, match="promptseg.sessions.shared_segmenter"):
        old = promptseg_fiftyone.get_segmenter(params["model"], device="cpu")
    assert old is shared_segmenter(params["model"], device="cpu")  # other tests' models may have evicted a fixture's
    assert "get_segmenter" not in promptseg_fiftyone.__all__


def test_output_choice_writes_segmentation_and_refuses_a_field_of_another_type(fo, dataset, params, fo_segmenter):
    import fiftyone.operators as foo
    from fiftyone.operators.executor import ExecutionError

    run = foo.execute_operator(URI, ctx={"dataset": dataset, "params": {**params, "output": "segmentation"}})
    assert run.result["processed"] == len(dataset)
    assert dataset.get_field("sam").document_type is fo.Segmentation
    assert {int(k): v for k, v in dataset.mask_targets["sam"].items()} == {1: PROMPTS[0], 2: PROMPTS[1]}
    sample = dataset.first()
    result = fo_segmenter.segment(sample.filepath, PROMPTS, threshold=0.0)
    height, width = result.image_size
    expected = np.zeros((height, width), dtype=np.uint8)
    for index, inst in enumerate(result):
        expected[result.to_label_image() == index + 1] = PROMPTS.index(inst.label) + 1
    np.testing.assert_array_equal(sample["sam"].get_mask(), expected)

    with pytest.raises(ExecutionError) as excinfo:
        foo.execute_operator(URI, ctx={"dataset": dataset, "params": {**params, "output": "polylines"}})
    assert "'sam' already holds Segmentation, not Polylines" in str(excinfo.value)


def test_unusable_images_are_listed_in_the_result_and_the_rest_is_written(fo, make_dataset, params, image_paths,
                                                                          bomb_path, corrupt_path):
    import fiftyone.operators as foo

    dataset = make_dataset([image_paths[0], bomb_path, corrupt_path, image_paths[1]])
    run = foo.execute_operator(URI, ctx={"dataset": dataset, "params": params})
    assert (run.result["processed"], run.result["failed_count"]) == (2, 2)
    assert [failure["filepath"] for failure in run.result["failed"]] == [bomb_path, corrupt_path]
    assert [v is not None for v in dataset.values("sam")] == [True, False, False, True]


def test_an_empty_dataset_runs_with_nothing_to_do(fo, params):
    import fiftyone.operators as foo

    dataset = fo.Dataset()
    try:
        run = foo.execute_operator(URI, ctx={"dataset": dataset, "params": params})
        assert run.error is None
        assert (run.result["total"], run.result["processed"], run.result["failed_count"]) == (0, 0, 0)
    finally:
        dataset.delete()


def _form(dataset, params):
    """The operator's form as the App would build it for `params`."""
    import fiftyone.operators as foo
    from fiftyone.operators.executor import ExecutionContext

    ctx = ExecutionContext(request_params={"dataset_name": dataset.name, "params": params})
    return foo.get_operator(URI).resolve_input(ctx).type.properties


def test_form_options_show_the_cores_defaults_ranges_and_help(dataset):
    from promptseg.options import SegmentOptions, option_info
    from promptseg_fiftyone.operators import FORM_OPTIONS

    form = _form(dataset, {"prompts": ["car"]})
    defaults = SegmentOptions().to_flat()
    for name in FORM_OPTIONS:
        info = option_info(name)
        assert form[name].default == defaults[name], name
        assert info.help[1:] in form[name].view.description, name
        assert getattr(form[name].type, "min", None) == info.minimum, name
    assert not form["threshold"].invalid
    bad = _form(dataset, {"prompts": ["car"], "max_instances": 0})
    assert bad["max_instances"].invalid and "max_instances must be None or a whole number >= 1" in bad["max_instances"].error_message


def test_run_without_option_params_uses_the_cores_defaults(fo, dataset, params, fo_segmenter):
    import fiftyone.operators as foo
    from promptseg.options import SegmentOptions

    bare = {name: value for name, value in params.items() if name != "threshold"}
    foo.execute_operator(URI, ctx={"dataset": dataset, "params": bare})
    info = dataset.get_run_info("promptseg_sam")
    assert info.config.options == {}, "no option differs from SegmentOptions()"
    for sample in dataset:  # (the random model scores under the default threshold: both are empty)
        expected = fo_segmenter.segment(sample.filepath, PROMPTS, SegmentOptions())
        assert [d.label for d in sample["sam"].detections] == [inst.label for inst in expected]


def test_python_call_passes_any_core_option(operator, dataset, params, fo_segmenter):
    from promptseg.options import SegmentOptions

    operator(dataset, PROMPTS, "tiled", threshold=0.0, tile=64, iou_threshold=None, model=params["model"], device="cpu")
    options = SegmentOptions.from_flat(threshold=0.0, tile=64, iou_threshold=None)
    assert dataset.get_run_info("promptseg_tiled").config.options == {"threshold": 0.0, "tile": 64, "iou_threshold": None}
    for sample in dataset:
        assert_matches_core(sample["tiled"], fo_segmenter.segment(sample.filepath, PROMPTS, options))



def test_delegated_run_keeps_an_options_object(fo, operator, dataset, params, fo_segmenter):
    from fiftyone.operators.delegated import DelegatedOperationService
    from promptseg.options import SegmentOptions

    options = SegmentOptions.from_flat(threshold=0.0, channels=(2, 1, 0))  # the images' channels as BGR
    assert operator(dataset, PROMPTS, "later", model=params["model"], device="cpu", delegate=True,
                    options=options).delegated
    DelegatedOperationService().execute_queued_operations(operator=URI, dataset_name=dataset.name)
    dataset.reload()
    for sample in dataset:
        assert_matches_core(sample["later"], fo_segmenter.segment(sample.filepath, PROMPTS, options))


def test_python_call_refuses_a_bad_option_before_queueing(fo, operator, dataset, params):
    from promptseg.errors import OptionError

    with pytest.raises(OptionError, match="Unknown option 'tiles'.*Did you mean 'tile'"):
        operator(dataset, PROMPTS, "later", tiles=64, model=params["model"], device="cpu", delegate=True)
    with pytest.raises(OptionError, match="threshold must be a number between 0 and 1, got 2"):
        operator(dataset, PROMPTS, "later", threshold=2, model=params["model"], device="cpu", delegate=True)
    assert not dataset.has_field("later")


def test_the_docs_table_lists_every_option_and_the_forms_subset():
    from pathlib import Path

    from promptseg.options import SegmentOptions
    from promptseg_fiftyone.operators import FORM_OPTIONS

    rows = [line for line in (Path(__file__).parents[2] / "docs" / "fiftyone.md").read_text().splitlines()
            if line.startswith("| `")]
    listed = {name.strip("` ") for row in rows for name in row.split("|")[1].split(",")}
    assert set(SegmentOptions.names()) <= listed
    in_form = {name.strip("` ") for row in rows if "| no" not in row for name in row.split("|")[1].split(",")}
    assert in_form & set(SegmentOptions.names()) == set(FORM_OPTIONS)
