"""Runs of a FiftyOne dataset or view on Ray (`promptseg_fiftyone.on_ray.segment_on_ray` and the
operator's "Run on Ray"): two single-CPU actors of a local Ray write the labels the single-process
`segment_samples` writes, report a corrupt image and write the rest, and a rerun sends Ray only the
samples still without a label."""

from __future__ import annotations

import logging

import pytest
from fo_helpers import URI, detections_payload

from promptseg.errors import ModelLoadError, OptionError, PromptError
from tolerance import assert_results_agree, full_size_probabilities

ray = pytest.importorskip("ray")

pytestmark = pytest.mark.timeout(600)

PROMPTS = ["red square", "green square"]


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray for the module: two CPUs on 127.0.0.1, no dashboard, shut down at the end."""
    # Ray Data logs each run's DataContext at DEBUG with a format its arguments do not fit; pytest's
    # log capture turns that logging error into a failure, so keep that one logger above DEBUG
    logging.getLogger("ray.data._internal.execution.streaming_executor").setLevel(logging.INFO)
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", configure_logging=False)
    yield
    ray.shutdown()


@pytest.fixture
def ray_dataset(make_dataset, image_paths, corrupt_path):
    """Four images and, third, a corrupt one."""
    return make_dataset([image_paths[0], image_paths[1], corrupt_path, image_paths[2], image_paths[3]])


@pytest.fixture
def sent(monkeypatch):
    """The item ids each call of the core's `segment_on_ray` was given (the real function runs)."""
    import promptseg.distributed as distributed

    calls: list[list[str]] = []
    real = distributed.segment_on_ray

    def spy(items, prompts, **keywords):
        items = list(items)
        calls.append([item["id"] for item in items])
        return real(items, prompts, **keywords)

    monkeypatch.setattr(distributed, "segment_on_ray", spy)
    return calls


def run_on_ray(samples, label_field, tiny_sam3_dir, **keywords):
    from promptseg_fiftyone.on_ray import segment_on_ray

    return segment_on_ray(samples, PROMPTS, label_field, actors=2, model=str(tiny_sam3_dir), device="cpu",
                          dtype="fp32", cache_dir=False, threshold=0.0, **keywords)


def assert_same_labels(dataset, field, reference_field, segmenter) -> None:
    """Each sample's `field` agrees with its `reference_field` within the tolerance rules."""
    from promptseg_fiftyone.convert import to_result

    checked = 0
    for sample in dataset:
        got, want = sample[field], sample[reference_field]
        if want is None:
            assert got is None, f"{sample.filepath} has {field} but not {reference_field}"
            continue
        rgb = segmenter.load(sample.filepath)
        features, _ = segmenter.embed(rgb)
        found = segmenter.backend.decode(features, segmenter.text_embeddings(PROMPTS), 0.0)
        probabilities = full_size_probabilities(dict(zip(PROMPTS, found)), rgb.shape[:2])
        assert type(got) is type(want)
        assert_results_agree(to_result(got, rgb.shape[:2]), to_result(want, rgb.shape[:2]), probabilities)
        assert {(d.label, d.phrase) for d in got.detections} == {(d.label, d.phrase) for d in want.detections}
        checked += 1
    assert checked > 0


def test_two_actors_write_the_labels_of_the_single_process_run(fo, local_ray, ray_dataset, tiny_sam3_dir,
                                                               fo_segmenter, corrupt_path, sent, monkeypatch):
    from promptseg_fiftyone.runner import segment_samples

    reference = segment_samples(ray_dataset, PROMPTS, "local", segmenter=fo_segmenter, threshold=0.0)
    writes = []
    set_values = fo.Dataset.set_values

    def counted(dataset, field, values, **keywords):
        writes.append((field, sorted(values), keywords.get("key_field")))
        return set_values(dataset, field, values, **keywords)

    monkeypatch.setattr(fo.Dataset, "set_values", counted)
    summary = run_on_ray(ray_dataset, "ray", tiny_sam3_dir, batch_size=2)
    assert sent == [ray_dataset.values("id")]
    good = [sample_id for sample_id, path in zip(*ray_dataset.values(["id", "filepath"])) if path != corrupt_path]
    assert [(field, len(ids), key) for field, ids, key in writes] == [("ray", 2, "id"), ("ray", 2, "id")]
    assert sorted(writes[0][1] + writes[1][1]) == sorted(good)  # two bulk writes, the corrupt sample in neither
    assert (summary.total, summary.processed, summary.skipped, summary.failed_count) == (5, 4, 0, 1)
    assert (reference.processed, reference.failed_count) == (4, 1)
    (failure,) = summary.failed
    assert failure["filepath"] == corrupt_path and failure["id"] == ray_dataset.values("id")[2]
    assert "corrupt" in failure["error"] and "corrupt" in reference.failed[0]["error"]
    assert [label is not None for label in ray_dataset.values("ray")] == [True, True, False, True, True]
    assert_same_labels(ray_dataset, "ray", "local", fo_segmenter)

    info = ray_dataset.get_run_info("promptseg_ray")
    assert info.config.model == str(tiny_sam3_dir) and info.config.prompts == PROMPTS
    assert info.config.segmenter["dtype"] == "fp32" and info.config.options == {"threshold": 0.0}
    assert ray_dataset.load_run_results("promptseg_ray").failed[0]["filepath"] == corrupt_path


class Stop(Exception):
    """Raised by a progress callback to stop a run part way."""


def test_a_stopped_run_keeps_what_it_wrote_and_a_rerun_sends_only_the_rest(local_ray, ray_dataset, tiny_sam3_dir,
                                                                           fo_segmenter, sent):
    from promptseg_fiftyone.runner import segment_samples

    ids = ray_dataset.values("id")
    back = []

    def stop_after_two(total, advance):
        back.append(advance)
        if sum(back) == 2:
            raise Stop

    with pytest.raises(Stop):  # on a view without the first sample, one write at most (batch_size=100)
        run_on_ray(ray_dataset.skip(1), "ray", tiny_sam3_dir, batch_size=100, progress=stop_after_two)
    assert sent == [ids[1:]] and back[0] == 0  # progress: the total first, then one per record
    done = ray_dataset.exists("ray").values("id")
    assert ids[0] not in done  # outside the view
    assert len(done) + ray_dataset.load_run_results("promptseg_ray").failed_count == 2  # each record back
    written = {sample_id: detections_payload(label) for sample_id, label in zip(ids, ray_dataset.values("ray"))
               if label is not None}

    rest = run_on_ray(ray_dataset, "ray", tiny_sam3_dir)
    assert sorted(sent[1]) == sorted(set(ids) - set(done))  # the corrupt sample, if it came back, is retried
    assert (rest.skipped, rest.processed + len(done), rest.failed_count) == (len(done), 4, 1)
    after = dict(zip(ids, ray_dataset.values("ray")))
    assert {sample_id: detections_payload(after[sample_id]) for sample_id in written} == written  # not rewritten
    assert [after[sample_id] is not None for sample_id in ids] == [True, True, False, True, True]

    last = run_on_ray(ray_dataset.exists("ray"), "ray", tiny_sam3_dir)  # all done: Ray is not asked
    assert len(sent) == 2 and (last.total, last.skipped, last.processed) == (4, 4, 0)
    segment_samples(ray_dataset, PROMPTS, "local", segmenter=fo_segmenter, threshold=0.0)
    assert_same_labels(ray_dataset, "ray", "local", fo_segmenter)  # stopped and resumed = one whole run


def test_segmentation_output_has_the_single_process_class_ids(fo, local_ray, ray_dataset, tiny_sam3_dir,
                                                              fo_segmenter):
    from promptseg_fiftyone.runner import segment_samples

    view = ray_dataset.limit(2)
    run_on_ray(view, "ray", tiny_sam3_dir, output="segmentation")
    segment_samples(view, PROMPTS, "local", segmenter=fo_segmenter, threshold=0.0, output="segmentation")
    assert ray_dataset.get_field("ray").document_type is fo.Segmentation
    assert ray_dataset.mask_targets["ray"] == ray_dataset.mask_targets["local"]
    for sample in view:
        got, want = sample["ray"].get_mask(), sample["local"].get_mask()
        assert got.shape == want.shape and got.dtype == want.dtype


@pytest.mark.parametrize(("call", "error", "words"), [
    ({"prompts": []}, PromptError, "No prompt given"),
    ({"threshold": 2}, OptionError, "threshold must be a number between 0 and 1"),
    ({"output": "masks"}, OptionError, "Unknown output 'masks'"),
    ({"batch_size": 0}, OptionError, "batch_size must be a whole number of at least 1"),
    ({"label_field": "filepath"}, OptionError, "already holds StringField"),
])
def test_bad_requests_stop_before_ray_is_asked(ray_dataset, tiny_sam3_dir, sent, call, error, words):
    from promptseg_fiftyone.on_ray import segment_on_ray

    arguments = {"prompts": PROMPTS, "label_field": "ray", **call}
    with pytest.raises(error, match=words):
        segment_on_ray(ray_dataset, model=str(tiny_sam3_dir), **arguments)
    assert sent == [] and not ray_dataset.has_field("ray")


def test_a_model_the_actors_cannot_load_fails_the_run_and_writes_nothing(local_ray, ray_dataset, tmp_path):
    from promptseg_fiftyone.on_ray import segment_on_ray

    with pytest.raises(ModelLoadError, match="could not load the segmenter"):
        segment_on_ray(ray_dataset, PROMPTS, "ray", actors=1, model=str(tmp_path / "no-model"), device="cpu")
    assert ray_dataset.count("ray") == 0
    recorded = ray_dataset.load_run_results("promptseg_ray")  # the run is recorded: nothing done, nothing failed
    assert (recorded.processed, recorded.failed_count) == (0, 0)


def test_a_delegated_run_on_ray_is_queued_then_executed_with_progress(fo, local_ray, ray_dataset, tiny_sam3_dir,
                                                                     fo_segmenter, sent):
    import fiftyone.operators as foo
    from fiftyone.operators.delegated import DelegatedOperationService
    from fiftyone.operators.executor import ExecutionRunState

    from promptseg_fiftyone.runner import segment_samples

    operator = foo.get_operator(URI)
    queued = operator(ray_dataset, PROMPTS, "ray", threshold=0.0, model=str(tiny_sam3_dir), device="cpu",
                      on_ray=True, actors=2, delegate=True)
    assert queued.delegated and sent == []
    service = DelegatedOperationService()
    service.execute_queued_operations(operator=URI, dataset_name=ray_dataset.name)
    (run,) = service.list_operations(operator=URI, dataset_name=ray_dataset.name)
    assert run.run_state == ExecutionRunState.COMPLETED, run.run_state
    assert (run.result.result["processed"], run.result.result["failed_count"]) == (4, 1)
    assert run.status.progress == 1.0 and run.status.label == "Segmented 5 of 5 samples"
    assert sent == [ray_dataset.values("id")]
    ray_dataset.reload()
    segment_samples(ray_dataset, PROMPTS, "local", segmenter=fo_segmenter, threshold=0.0)
    assert_same_labels(ray_dataset, "ray", "local", fo_segmenter)


def _form(dataset, params):
    import fiftyone.operators as foo
    from fiftyone.operators.executor import ExecutionContext

    ctx = ExecutionContext(request_params={"dataset_name": dataset.name, "params": params})
    return foo.get_operator(URI).resolve_input(ctx).type.properties


def test_the_form_offers_ray_for_datasets_and_views_not_selections(ray_dataset):
    form = _form(ray_dataset, {"prompts": PROMPTS})
    assert "on_ray" in form and "ray_address" not in form
    chosen = _form(ray_dataset, {"prompts": PROMPTS, "on_ray": True})
    assert {"ray_address", "ray_actors", "ray_gpus_per_actor"} <= set(chosen)
    assert chosen["ray_actors"].default == 2 and not chosen["on_ray"].invalid
    assert "on_ray" not in _form(ray_dataset, {"prompts": PROMPTS, "view_target": "SELECTED_SAMPLES"})

    ray_dataset.set_values("words", ["car"] * len(ray_dataset))
    with_field = _form(ray_dataset, {"prompts": PROMPTS, "on_ray": True, "prompt_field": "words"})
    assert with_field["on_ray"].invalid and "typed prompts only" in with_field["on_ray"].error_message


def test_the_operator_refuses_a_prompt_field_on_ray(fo, ray_dataset, tiny_sam3_dir, sent):
    import fiftyone.operators as foo
    from fiftyone.operators.executor import ExecutionError

    ray_dataset.set_values("words", ["car"] * len(ray_dataset))
    params = {"prompts": PROMPTS, "label_field": "ray", "model": str(tiny_sam3_dir), "device": "cpu",
              "on_ray": True, "prompt_field": "words"}
    with pytest.raises(ExecutionError, match="Runs on Ray take the typed prompts only, not Prompt field"):
        foo.execute_operator(URI, ctx={"dataset": ray_dataset, "params": params})
    assert sent == []
