"""How the plugin is packaged for FiftyOne: its manifest (url, tags, secrets, requirements), the
Hugging Face token read as a plugin secret by a delegated run, and which runs the App schedules.
"""

from __future__ import annotations

import pytest
from fo_helpers import URI, assert_matches_core
from stand_ins import COMMIT, StandInHub, pointed_at

PROMPTS = ["red square", "green square"]
REPO = "promptseg-test/tiny-sam3"
TOKEN = "hf_standInToken7f3a9c"


@pytest.fixture(scope="module")
def operator(fo):
    import fiftyone.operators as foo

    return foo.get_operator(URI)


def test_manifest_gives_url_tags_secrets_and_requirements(fo):
    import fiftyone.plugins as fop

    plugin = fop.get_plugin("@promptseg/fiftyone")
    assert plugin.url == "https://github.com/promptseg/promptseg"
    assert plugin.secrets == ["HF_TOKEN", "PROMPTSEG_MODEL"]
    assert {"segmentation", "sam3"} <= set(plugin._metadata["tags"])
    assert fop.load_plugin_requirements("@promptseg/fiftyone") == ["promptseg>=0.1"]
    fop.ensure_plugin_requirements("@promptseg/fiftyone", error_level=0)  # raises when one is missing


def _database_text() -> str:
    """Every document of every collection of the test database, as text."""
    from fiftyone.core.odm import get_db_conn

    db = get_db_conn()
    return "\n".join(str(doc) for name in db.list_collection_names() for doc in db[name].find())


def test_delegated_run_hands_the_hf_token_secret_to_the_hub_and_stores_it_nowhere(
        fo, operator, dataset, tiny_sam3_dir, fo_segmenter, tmp_path, monkeypatch, caplog, capfd):
    import logging

    from fiftyone.operators.delegated import DelegatedOperationService
    from fiftyone.operators.executor import ExecutionRunState

    caplog.set_level(logging.DEBUG)
    # Open-source FiftyOne resolves a plugin secret from the worker's environment; huggingface_hub is
    # told not to send a token by itself, so the token the hub receives was handed over by the run.
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with StandInHub(tiny_sam3_dir, REPO, TOKEN) as hub, pointed_at(monkeypatch, hub, tmp_path / "hf-cache"):
        queued = operator(dataset, PROMPTS, "gated", threshold=0.0, model=REPO, device="cpu", delegate=True)
        assert queued.delegated and hub.paths == []  # nothing is fetched until a worker runs it
        service = DelegatedOperationService()
        service.execute_queued_operations(operator=URI, dataset_name=dataset.name)
        (run,) = service.list_operations(operator=URI, dataset_name=dataset.name)
        assert run.run_state == ExecutionRunState.COMPLETED, run.result.error
        repo_requests = [auth for path, auth in zip(hub.paths, hub.authorizations) if REPO in path]
        assert repo_requests and set(repo_requests) == {f"Bearer {TOKEN}"}
    dataset.reload()
    assert run.result.result["processed"] == len(dataset)
    assert dataset.get_run_info("promptseg_gated").config.segmenter["model_id"] == f"hub:{REPO}@{COMMIT}"
    for sample in dataset:  # the hub's copy of the tiny model gives what the local copy gives
        assert_matches_core(sample["gated"], fo_segmenter.segment(sample.filepath, PROMPTS, threshold=0.0))
    assert TOKEN not in _database_text()  # labels, run record, queued operation: params and results
    out, err = capfd.readouterr()
    assert TOKEN not in caplog.text + out + err


def test_delegated_run_without_the_token_fails_saying_how_to_get_access(
        fo, operator, dataset, tiny_sam3_dir, tmp_path, monkeypatch):
    from fiftyone.operators.delegated import DelegatedOperationService
    from fiftyone.operators.executor import ExecutionRunState

    monkeypatch.delenv("HF_TOKEN", raising=False)
    with StandInHub(tiny_sam3_dir, REPO, TOKEN) as hub, pointed_at(monkeypatch, hub, tmp_path / "hf-cache"):
        operator(dataset, PROMPTS, "gated", model=REPO, device="cpu", delegate=True)
        service = DelegatedOperationService()
        service.execute_queued_operations(operator=URI, dataset_name=dataset.name)
    (run,) = service.list_operations(operator=URI, dataset_name=dataset.name)
    assert run.run_state == ExecutionRunState.FAILED
    assert f"Access to {REPO} is refused (gated repository)" in run.result.error
    assert "set HF_TOKEN" in run.result.error
    assert not dataset.has_field("gated") or dataset.count("gated") == 0


def _context(dataset, params=None, **request):
    """The execution context the App sends for the operator's form and its execution choice."""
    from fiftyone.operators.executor import ExecutionContext

    return ExecutionContext(request_params={"dataset_name": dataset.name, "params": {"prompts": ["car"],
                                                                                     **(params or {})}, **request})


def _options(operator, ctx):
    options = operator.resolve_execution_options(ctx)
    return options.allow_immediate_execution, options.allow_delegated_execution, options.default_choice_to_delegated


def test_whole_dataset_and_large_views_are_scheduled_by_default_small_selections_run_now(
        fo, operator, make_dataset, image_paths):
    from promptseg_fiftyone.operators import IMMEDIATE_MAX_SAMPLES

    dataset = make_dataset(image_paths * 4)  # 24 samples
    assert len(dataset) > IMMEDIATE_MAX_SAMPLES
    ids = dataset.values("id")
    whole = _options(operator, _context(dataset))
    assert whole == (True, True, True)  # both offered, "Schedule" first
    assert _options(operator, _context(dataset, {"view_target": "DATASET"})) == (True, True, True)
    small = dataset.limit(IMMEDIATE_MAX_SAMPLES)
    assert _options(operator, _context(dataset, {"view_target": "CURRENT_VIEW"}, view=small._serialize())) == (
        True, True, False)
    large = dataset.limit(IMMEDIATE_MAX_SAMPLES + 1)
    assert _options(operator, _context(dataset, {"view_target": "CURRENT_VIEW"}, view=large._serialize()))[2]
    assert _options(operator, _context(dataset, {"view_target": "SELECTED_SAMPLES"}, selected=ids[:3])) == (
        True, True, False)
    assert _options(operator, _context(dataset, {"view_target": "SELECTED_SAMPLES"}, selected=ids))[2]
    # delegate=True (scripts) still forces a delegated run
    assert _options(operator, _context(dataset, {"delegate": True}))[:2] == (False, True)


def test_form_explains_the_default_and_warns_when_runs_wait_for_a_worker(fo, operator, dataset, tiny_sam3_dir):
    from fiftyone.operators.delegated import DelegatedOperationService

    form = operator.resolve_input(_context(dataset)).type.properties
    notice = form["execution_notice"].view.label
    assert f"{len(dataset)} samples: scheduled by default" in notice and "fiftyone delegated launch" in notice
    assert "queued_warning" not in form
    selected = _context(dataset, {"view_target": "SELECTED_SAMPLES"}, selected=dataset.values("id")[:2])
    assert "2 samples: runs now by default" in operator.resolve_input(selected).type.properties[
        "execution_notice"].view.label

    queued = operator(dataset, ["car"], "later", model=str(tiny_sam3_dir), device="cpu", delegate=True)
    try:
        warning = operator.resolve_input(_context(dataset)).type.properties["queued_warning"].view.label
        assert "1 earlier run(s)" in warning and "no delegated worker seems to be running" in warning
        assert "`fiftyone delegated launch`" in warning
    finally:
        DelegatedOperationService().delete_operation(queued.result["id"])
    assert "queued_warning" not in operator.resolve_input(_context(dataset)).type.properties


def test_python_calls_run_now_unless_delegated(fo, operator, dataset, tiny_sam3_dir, fo_segmenter):
    """The App's default does not change a script: a call on the whole dataset runs where it is called."""
    run = operator(dataset, ["red square"], "now", threshold=0.0, model=str(tiny_sam3_dir), device="cpu")
    assert not run.delegated and run.result["processed"] == len(dataset)
