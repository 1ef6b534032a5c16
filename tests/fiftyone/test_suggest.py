"""The `@promptseg/fiftyone/suggest_prompts` operator with a tiny random OpenCLIP."""

from __future__ import annotations

import pytest

SUGGEST = "@promptseg/fiftyone/suggest_prompts"


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> str:
    from promptseg.testing import make_random_clip

    return make_random_clip(tmp_path_factory.mktemp("fo-clip") / "tiny-clip")["local_dir"]


@pytest.fixture
def params(tiny_sam3_dir, tiny_clip):
    return {"model": str(tiny_sam3_dir), "device": "cpu", "clip": tiny_clip, "k": 5}


def test_plugin_lists_the_operator(fo):
    import fiftyone.plugins as fop

    (plugin,) = [p for p in fop.list_plugins() if p.name == "@promptseg/fiftyone"]
    assert "suggest_prompts" in plugin.operators


def test_open_sample_gets_k_vocabulary_phrases_ranked_by_score(fo, dataset, params):
    import fiftyone.operators as foo

    from promptseg.clip.vocabulary import default_vocabulary
    from promptseg.sessions import shared_segmenter

    sample_id = dataset.values("id")[2]
    run = foo.execute_operator(SUGGEST, ctx={"dataset": dataset, "current_sample": sample_id, "params": params})
    suggestions = run.result["suggestions"]
    assert run.result["sample_id"] == sample_id and run.result["filepath"] == dataset[sample_id].filepath
    assert len(suggestions) == 5
    phrases = [s["phrase"] for s in suggestions]
    scores = [s["score"] for s in suggestions]
    assert set(phrases) <= set(default_vocabulary()) and len(set(phrases)) == 5
    assert scores == sorted(scores, reverse=True) and all(0 < s <= 1 for s in scores)
    assert run.result["prompts"] == ", ".join(phrases)
    # The same ranking the core gives, from the cached segmenter the operator loaded.
    segmenter = shared_segmenter(params["model"], device="cpu", clip=params["clip"])
    expected = segmenter.suggest_prompts(dataset[sample_id].filepath, k=5)
    assert [(s["phrase"], pytest.approx(s["score"])) for s in suggestions] == expected


def test_first_selected_sample_and_a_custom_vocabulary(fo, dataset, params):
    import fiftyone.operators as foo

    selected = dataset.values("id")[3:5]
    vocabulary = ["red square", "green square", "blue circle"]
    run = foo.execute_operator(SUGGEST, ctx={"dataset": dataset, "selected": selected,
                                             "params": {**params, "vocabulary": vocabulary, "k": 10}})
    assert run.result["sample_id"] == selected[0]
    assert sorted(s["phrase"] for s in run.result["suggestions"]) == sorted(vocabulary)
    assert sum(s["score"] for s in run.result["suggestions"]) == pytest.approx(1.0)


def test_without_a_sample_it_says_what_to_do(fo, dataset, params):
    import fiftyone.operators as foo
    from fiftyone.operators.executor import ExecutionError

    with pytest.raises(ExecutionError, match="open a sample in the App or select one"):
        foo.execute_operator(SUGGEST, ctx={"dataset": dataset, "params": params})


def test_an_unreadable_open_sample_gets_the_cores_message(fo, make_dataset, params, image_paths, bomb_path):
    import fiftyone.operators as foo
    from fiftyone.operators.executor import ExecutionError

    dataset = make_dataset([image_paths[0], bomb_path])
    with pytest.raises(ExecutionError, match="PROMPTSEG_MAX_PIXELS"):
        foo.execute_operator(SUGGEST, ctx={"dataset": dataset, "current_sample": dataset.values("id")[1],
                                           "params": params})


def test_output_shows_the_ranked_phrases():
    import fiftyone.operators as foo

    output = foo.get_operator(SUGGEST).resolve_output(None).to_json()
    assert {"suggestions", "prompts"} <= set(output["type"]["properties"])
