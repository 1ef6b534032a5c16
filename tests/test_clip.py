"""OpenCLIP in the core: loading, caching, re-scoring, negatives, label sets, suggestions, languages.

Tiny random OpenCLIP models are registered with open_clip, saved, and reloaded through the real
loaders (`NAME/PATH` and `local-dir:`). Where random weights cannot show a semantic decision, the
text encoder's output is replaced by controlled embeddings and the decision is asserted.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from dataclasses import replace

import numpy as np
import pytest
import torch

from promptseg.errors import ModelLoadError, OptionError
from promptseg.options import ClipOptions
from promptseg.results import Instance


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> dict[str, str]:
    from promptseg.testing import make_random_clip

    return make_random_clip(tmp_path_factory.mktemp("models") / "tiny-clip")


@pytest.fixture(scope="session")
def tiny_multilingual_clip(tmp_path_factory) -> dict[str, str]:
    from promptseg.testing import make_random_clip

    return make_random_clip(tmp_path_factory.mktemp("models") / "tiny-xlmr-clip", multilingual=True)


@pytest.fixture
def scorer(tiny_clip, tmp_path):
    from promptseg.clip import load_clip

    return load_clip(tiny_clip["local_dir"], device="cpu", cache_dir=tmp_path / "cache")


def _unit(*values: float) -> torch.Tensor:
    vector = torch.tensor(values, dtype=torch.float32)
    return vector / vector.norm()


def controlled_text_encoder(dim: int, table: dict[str, torch.Tensor]):
    """An `encode_text` that returns the embedding of the first table key found in each text."""

    def encode(texts):
        rows = []
        for text in texts:
            key = next((k for k in sorted(table, key=len, reverse=True) if k in text), None)
            rows.append(table[key] if key is not None else torch.zeros(dim))
        return torch.nn.functional.normalize(torch.stack(rows), dim=-1)

    return encode


def _instance(label, score, box=(0, 0, 10, 10), fill=True, **extra) -> Instance:
    x0, y0, x1, y1 = box
    mask = np.full((y1 - y0, x1 - x0), fill, dtype=bool)
    return Instance(label=label, score=score, box=box, mask=mask, phrase=label, extra=dict(extra))


# --- loading -------------------------------------------------------------------------------------


def test_weights_file_and_local_dir_load_the_same_model(tiny_clip, tmp_path):
    from promptseg.clip import load_clip

    a = load_clip(tiny_clip["file"], device="cpu", cache_dir=False)
    b = load_clip(tiny_clip["local_dir"], device="cpu", cache_dir=False)
    rgb = np.random.default_rng(1).integers(0, 255, (40, 60, 3), dtype=np.uint8)
    assert torch.allclose(a.image_embeddings([rgb]), b.image_embeddings([rgb]), atol=1e-5)
    assert torch.allclose(a.text_embeddings(["red car"]), b.text_embeddings(["red car"]), atol=1e-5)
    assert a.model_id.startswith("promptseg-tiny-clip/file:") and b.model_id.startswith("local-dir:")
    assert not a.multilingual and a.backend.input_size == (32, 32)


def test_scorer_is_registered_through_the_plugin_hook():
    from promptseg.plugins import plugin_manager, registry

    assert plugin_manager().has_plugin("openclip")
    assert registry().scorers["openclip"].name == "openclip"


def test_misspelt_clip_loader_option_is_an_option_error_naming_what_it_takes(tiny_clip):
    """load_clip checks its backend's options like load_segmenter does (one shared load path)."""
    from promptseg.clip import load_clip

    with pytest.raises(OptionError, match="Unknown option\\(s\\) 'pretraned' for the openclip backend: besides "
                       "load_clip's own options it takes cache_dir, pretrained"):
        load_clip(tiny_clip["local_dir"], device="cpu", cache_dir=False, pretraned="x")


def test_architecture_without_weights_is_refused():
    from promptseg.clip import load_clip

    with pytest.raises(ModelLoadError, match="no weights named"):
        load_clip("ViT-B-32", device="cpu", cache_dir=False)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("NoSuchNet-B-99/openai", "not an open_clip architecture"),
        ("ViT-B-32/no_such_tag", "no pretrained tag"),
        ("ViT-B-32//no/such/weights.safetensors", "No CLIP weights file"),
    ],
)
def test_bad_clip_names_get_clear_errors(spec, message):
    from promptseg.clip import load_clip

    with pytest.raises(ModelLoadError, match=message):
        load_clip(spec, device="cpu", cache_dir=False)


def test_directory_without_config_or_weights_is_refused(tmp_path, tiny_clip):
    from promptseg.clip import load_clip

    with pytest.raises(ModelLoadError, match="no open_clip_config.json"):
        load_clip(f"local-dir:{tmp_path}", device="cpu", cache_dir=False)
    config = tiny_clip["local_dir"].removeprefix("local-dir:") + "/open_clip_config.json"
    (tmp_path / "open_clip_config.json").write_text(open(config).read())
    with pytest.raises(ModelLoadError, match="no weights"):
        load_clip(str(tmp_path), device="cpu", cache_dir=False)


def test_a_file_without_architecture_says_how_to_name_it(tiny_clip):
    from promptseg.clip import load_clip

    path = tiny_clip["file"].split("/", 1)[1]
    with pytest.raises(ModelLoadError, match="needs its architecture"):
        load_clip(path, device="cpu", cache_dir=False)


def test_pretrained_tag_offline_fails_fast_with_advice(monkeypatch, tmp_path):
    from promptseg.clip import load_clip

    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # never download 600 MB in a test
    start = time.perf_counter()
    with pytest.raises(ModelLoadError, match="ViT-B-32/laion2b_s34b_b79k") as info:
        load_clip("ViT-B-32/laion2b_s34b_b79k", device="cpu", cache_dir=False)
    assert time.perf_counter() - start < 60
    assert "local-dir:DIR" in str(info.value)


# --- crops and caches ----------------------------------------------------------------------------


def test_masked_crop_neutralises_the_background(scorer):
    from promptseg.clip import masked_crop

    rgb = np.full((40, 40, 3), 200, dtype=np.uint8)
    mask = np.zeros((20, 20), dtype=bool)
    mask[5:15, 5:15] = True
    inst = Instance("x", 0.9, (10, 10, 30, 30), mask)
    crop = masked_crop(rgb, inst, scorer.backend.fill)
    assert crop.shape == (24, 24, 3)  # 10% margin of the 20-pixel box on each side
    inside = np.zeros(crop.shape[:2], dtype=bool)
    inside[2:22, 2:22] = mask
    assert (crop[inside] == 200).all()
    assert (crop[~inside] == scorer.backend.fill).all()


def test_crop_embeddings_are_cached_by_content(scorer, rgb_image):
    instances = [_instance("a", 0.5, (40, 30, 110, 80)), _instance("b", 0.5, (130, 60, 180, 100))]
    first = scorer.crop_embeddings(rgb_image, instances)
    assert scorer.stats.image_encoder_runs == 1 and scorer.stats.images_encoded == 2
    again = scorer.crop_embeddings(rgb_image, instances)
    assert torch.equal(first, again) and scorer.stats.images_encoded == 2
    changed = _instance("a", 0.5, (40, 30, 110, 80), fill=False)
    changed.mask[:10] = True
    scorer.crop_embeddings(rgb_image, [changed])
    assert scorer.stats.images_encoded == 3
    assert torch.allclose(first.norm(dim=-1), torch.ones(2), atol=1e-5)


def test_suggestions_come_from_the_disk_cache_in_a_new_process(tiny_clip, tmp_path, rgb_image):
    from promptseg.clip import load_clip
    from promptseg.clip.suggest import suggest_prompts

    first = load_clip(tiny_clip["local_dir"], device="cpu", cache_dir=tmp_path)
    ranked = suggest_prompts(first, rgb_image, k=5)
    assert len(ranked) == 5 and all(isinstance(p, str) and 0 < s <= 1 for p, s in ranked)
    assert [s for _, s in ranked] == sorted((s for _, s in ranked), reverse=True)
    second = load_clip(tiny_clip["local_dir"], device="cpu", cache_dir=tmp_path)
    again = suggest_prompts(second, rgb_image, k=5)
    assert [p for p, _ in again] == [p for p, _ in ranked]
    assert [s for _, s in again] == pytest.approx([s for _, s in ranked], rel=1e-5)
    assert second.stats.image_encoder_runs == 0 and second.stats.text_encoder_runs == 0


# --- the decisions, on controlled embeddings -----------------------------------------------------


def test_fused_score_is_the_geometric_mean_and_replaces_score():
    from promptseg.clip.verify import decide

    crops = torch.stack([_unit(1, 0, 0), _unit(0.2, 1, 0)])
    texts = torch.stack([_unit(1, 0, 0)])
    out = decide([_instance("cat", 0.64), _instance("cat", 0.9)], crops, texts, [0, 0])
    assert out[0].extra["clip_score"] == 1.0 and out[0].extra["sam_score"] == 0.64
    assert out[0].score == pytest.approx(0.8) == out[0].extra["fused_score"]
    cos = float(_unit(0.2, 1, 0)[0])
    assert out[1].extra["clip_similarity"] == pytest.approx(cos)
    assert out[1].extra["clip_score"] == pytest.approx(2.5 * cos)
    assert out[1].score == pytest.approx(math.sqrt(0.9 * 2.5 * cos))


def test_verify_drops_instances_below_the_clip_threshold():
    from promptseg.clip.verify import ClipReport, decide

    crops = torch.stack([_unit(1, 0.1, 0), _unit(0.1, 1, 0), _unit(1, 3, 0)])
    texts = torch.stack([_unit(1, 0, 0)])
    report = ClipReport()
    kept = decide([replace(_instance("cat", 0.5), extra={"id": i}) for i in range(3)],
                  crops, texts, [0, 0, 0], ClipOptions(verify=True), report=report)
    assert [k.extra["id"] for k in kept] == [0, 2]  # cos 0.10 -> CLIPScore 0.25 < 0.5 is dropped
    assert kept[1].extra["clip_score"] == pytest.approx(2.5 / math.sqrt(10))
    assert report.dropped_by_verify == 1
    strict = decide([replace(_instance("cat", 0.5), extra={"id": i}) for i in range(3)],
                    crops, texts, [0, 0, 0], ClipOptions(verify=True, clip_threshold=0.99))
    assert [k.extra["id"] for k in strict] == [0]


def test_negative_prompt_removes_instances_closer_to_it():
    from promptseg.clip.verify import ClipReport, decide

    car, toy = _unit(1, 0, 0), _unit(0, 1, 0)
    crops = torch.stack([_unit(1, 0.2, 0), _unit(0.5, 1, 0), _unit(1, 0.9, 0)])
    instances = [replace(_instance("car", 0.8), extra={"id": i}) for i in range(3)]
    report = ClipReport()
    kept = decide(instances, crops, car[None], [0, 0, 0], negatives=toy[None],
                  negative_names=["toy car"], report=report)
    assert [k.extra["id"] for k in kept] == [0, 2]
    assert report.dropped_by_negative == 1
    assert kept[1].extra["closest_negative"] == "toy car"
    # a margin makes the negative need a clear win: 0.5 vs 1 loses, 1 vs 0.9 now survives more easily
    lenient = decide(instances, crops, car[None], [0, 0, 0], ClipOptions(negative_margin=0.5), negatives=toy[None])
    assert [k.extra["id"] for k in lenient] == [0, 1, 2]
    strict = decide(instances, crops, car[None], [0, 0, 0], ClipOptions(negative_margin=-0.1), negatives=toy[None])
    assert [k.extra["id"] for k in strict] == [0]


def test_exclusive_label_set_keeps_one_label_per_object():
    from promptseg.clip.verify import ClipReport, decide

    cat, dog = _unit(1, 0, 0), _unit(0, 1, 0)
    instances = [
        _instance("cat", 0.9, (0, 0, 10, 10)),   # SAM 3 is surer it is a cat ...
        _instance("dog", 0.6, (0, 0, 10, 11)),   # ... of the same object
        _instance("cat", 0.7, (20, 20, 30, 30)),  # a second, separate object
    ]
    crops = torch.stack([_unit(0.1, 1, 0), _unit(0.2, 1, 0), _unit(1, 0.1, 0)])  # CLIP sees a dog
    report = ClipReport()
    kept = decide(instances, crops, torch.stack([cat, dog]), [0, 1, 0], ClipOptions(exclusive=True),
                  labels=["cat", "dog"], logit_scale=100.0, report=report)
    assert [k.label for k in kept] == ["dog", "cat"]
    assert kept[0].box == (0, 0, 10, 11)  # the dog instance itself, not a relabelled cat mask
    assert kept[0].extra["label_probs"]["dog"] > 0.99
    assert report.dropped_by_exclusive == 1
    # when only the losing label claimed the object, that instance is relabelled
    only_cat = decide(instances[:2], torch.stack([_unit(1, 0, 0), _unit(1, 0.1, 0)]), torch.stack([cat, dog]),
                      [0, 1], ClipOptions(exclusive=True), labels=["cat", "dog"])
    assert [(k.label, k.box) for k in only_cat] == [("cat", (0, 0, 10, 10))]


def test_map_to_labels_exact_spelling_and_clip(scorer, monkeypatch):
    from promptseg import map_to_labels

    labels = ["cat", "dog", "traffic light"]
    assert map_to_labels("Traffic_Light", labels) == "traffic light"
    assert map_to_labels(["dgo", "cats"], labels) == ["dog", "cat"]
    table = {"cat": _unit(1, 0, 0), "kitten": _unit(0.9, 0.1, 0), "dog": _unit(0, 1, 0),
             "puppy": _unit(0.1, 0.9, 0), "traffic light": _unit(0, 0, 1)}
    monkeypatch.setattr(scorer.backend, "encode_text", controlled_text_encoder(3, table))
    assert map_to_labels(["kitten", "puppy"], labels, clip=scorer) == ["cat", "dog"]
    with pytest.raises(OptionError):
        map_to_labels("cat", [])


# --- through the segmenter (tiny SAM 3 + tiny CLIP, real loaders) --------------------------------


@pytest.fixture
def clip_segmenter(make_segmenter, tiny_clip):
    return make_segmenter(clip=tiny_clip["local_dir"])


def test_clip_off_changes_nothing_and_clip_options_need_it(make_segmenter, rgb_image):
    plain = make_segmenter()
    result = plain.segment(rgb_image, ["red square"], threshold=0.0)
    assert result.instances and all("clip_score" not in inst.extra for inst in result)
    assert "clip" not in result.info and "clip" not in plain.describe()
    for option in ({"verify": True}, {"negative": "toy"}, {"exclusive": True}, {"clip_threshold": 0.3}):
        with pytest.raises(OptionError, match="need"):
            plain.segment(rgb_image, ["red square"], threshold=0.0, **option)
    with pytest.raises(OptionError, match="CLIP"):
        plain.suggest_prompts(rgb_image)


def test_segment_with_clip_rescores_every_instance(make_segmenter, clip_segmenter, rgb_image):
    plain = make_segmenter().segment(rgb_image, ["red square", "green square"], threshold=0.0)
    scored = clip_segmenter.segment(rgb_image, ["red square", "green square"], threshold=0.0)
    assert len(scored) == len(plain) > 0
    for before, after in zip(plain, scored):
        assert after.box == before.box and after.label == before.label
        assert after.extra["sam_score"] == pytest.approx(before.score)
        assert 0 <= after.extra["clip_score"] <= 1
        assert after.score == pytest.approx(math.sqrt(before.score * after.extra["clip_score"]))
    assert scored.info["clip"]["scored"] == len(scored)
    assert clip_segmenter.describe()["clip_model_id"].startswith("local-dir:")
    runs = clip_segmenter.clip.stats.images_encoded
    clip_segmenter.segment(rgb_image, ["red square", "green square"], threshold=0.0)
    assert clip_segmenter.clip.stats.images_encoded == runs  # crops came from the cache


def test_verify_in_segment_drops_exactly_the_low_clip_scores(clip_segmenter, rgb_image):
    scored = clip_segmenter.segment(rgb_image, "red square", threshold=0.0)
    values = sorted(inst.extra["clip_score"] for inst in scored)
    cut = values[len(values) // 2]
    verified = clip_segmenter.segment(rgb_image, "red square", threshold=0.0, verify=True, clip_threshold=cut)
    assert sorted(i.extra["clip_score"] for i in verified) == [v for v in values if v >= cut]
    assert verified.info["clip"]["dropped_by_verify"] == sum(v < cut for v in values)


def test_negative_and_exclusive_through_segment(clip_segmenter, rgb_image, monkeypatch):
    prompts = ["red square", "green square"]
    table = {"red square": _unit(1, 0, 0), "green square": _unit(0, 1, 0), "reflection": _unit(0, 0, 1)}
    monkeypatch.setattr(clip_segmenter.clip.backend, "encode_text", controlled_text_encoder(16, {
        k: torch.nn.functional.pad(v, (0, 13)) for k, v in table.items()}))
    scored = clip_segmenter.segment(rgb_image, prompts, threshold=0.0)
    # a negative equal to a prompt's own embedding direction can never be closer than the prompt
    same = clip_segmenter.segment(rgb_image, prompts, threshold=0.0, negative=["red square"], negative_margin=0.0)
    assert len(same) >= sum(i.label == "red square" for i in scored)
    exclusive = clip_segmenter.segment(rgb_image, prompts, threshold=0.0, exclusive=True)
    from promptseg.masks import mask_iou

    for a in exclusive:
        for b in exclusive:
            if a is not b and a.label != b.label:
                assert mask_iou(a, b) < 0.5
    assert exclusive.info["clip"]["dropped_by_exclusive"] >= 0
    everything = clip_segmenter.segment(rgb_image, prompts, threshold=0.0, negative="reflection",
                                        negative_margin=-2.0)
    assert len(everything) == 0 and everything.info["clip"]["dropped_by_negative"] == len(scored)


def test_suggest_prompts_with_custom_vocabulary(clip_segmenter, rgb_image, tmp_path):
    ranked = clip_segmenter.suggest_prompts(rgb_image, vocabulary=["cat", "dog", "car"], k=5)
    assert sorted(p for p, _ in ranked) == ["car", "cat", "dog"]
    assert sum(s for _, s in ranked) == pytest.approx(1.0, abs=1e-4)
    path = tmp_path / "vocab.txt"
    path.write_text("# mine\ncat\n\ndog\n")
    assert sorted(p for p, _ in clip_segmenter.suggest_prompts(rgb_image, vocabulary=path, k=2)) == ["cat", "dog"]
    with pytest.raises(OptionError):
        clip_segmenter.suggest_prompts(rgb_image, vocabulary="not-a-file.txt")
    with pytest.raises(OptionError):
        clip_segmenter.suggest_prompts(rgb_image, k=0)


def test_shipped_vocabulary_is_coco_then_lvis():
    from promptseg.clip.vocabulary import default_vocabulary

    vocabulary = default_vocabulary()
    assert vocabulary[:3] == ("person", "bicycle", "car") and len(vocabulary) == 1214
    assert "computer monitor" in vocabulary and all("_" not in p and "(" not in p for p in vocabulary)


# --- any-language prompts ------------------------------------------------------------------------


def test_monolingual_clip_warns_about_non_english_prompts(clip_segmenter, rgb_image):
    with pytest.warns(UserWarning, match="not English"):
        result = clip_segmenter.segment(rgb_image, "红色的汽车", threshold=0.0)
    assert all(inst.label == "红色的汽车" for inst in result)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        clip_segmenter.segment(rgb_image, "red car", threshold=0.0)  # English: no warning


def test_multilingual_clip_maps_a_prompt_to_an_english_phrase(make_segmenter, tiny_multilingual_clip, rgb_image,
                                                              monkeypatch):
    seg = make_segmenter(clip=tiny_multilingual_clip["local_dir"])
    assert seg.clip.multilingual
    seg.clip.vocabulary = ["car", "cat", "bicycle"]
    table = {"红色的汽车": _unit(1, 0.2, 0), "car": _unit(1, 0, 0), "cat": _unit(0, 1, 0),
             "bicycle": _unit(0, 0, 1), "一只猫": _unit(0.1, 1, 0)}
    table = {k: torch.nn.functional.pad(v, (0, 13)) for k, v in table.items()}  # the tiny CLIP's 16 dims
    monkeypatch.setattr(seg.clip.backend, "encode_text", controlled_text_encoder(16, table))
    result = seg.segment(rgb_image, ["红色的汽车", "一只猫"], threshold=0.0)
    assert result.info["clip"]["mapped_prompts"] == {"红色的汽车": "car", "一只猫": "cat"}
    assert result.prompts == ["红色的汽车", "一只猫"]
    direct = make_segmenter().segment(rgb_image, ["car", "cat"], threshold=0.0)
    assert [(i.label, i.phrase, i.box) for i in result] == [
        ({"car": "红色的汽车", "cat": "一只猫"}[i.label], i.label, i.box) for i in direct
    ]
    assert [i.extra["sam_score"] for i in result] == pytest.approx([i.score for i in direct])


def test_multilingual_tower_really_encodes_any_script(tiny_multilingual_clip):
    from promptseg.clip import load_clip
    from promptseg.clip.mapping import model_phrases
    from promptseg.clip.vocabulary import default_vocabulary

    scorer = load_clip(tiny_multilingual_clip["local_dir"], device="cpu", cache_dir=False)
    embeddings = scorer.text_embeddings(["红色的汽车", "собака", "red car"], templates=None)
    assert embeddings.shape == (3, 16) and not torch.allclose(embeddings[0], embeddings[1])
    mapping = model_phrases(scorer, ["红色的汽车", "red car"])
    assert set(mapping) == {"红色的汽车"} and mapping["红色的汽车"] in {*default_vocabulary(), "red car"}


# --- command line --------------------------------------------------------------------------------


def test_cli_segment_with_clip_flags_and_suggest(tiny_sam3_dir, tiny_clip, rgb_image, tmp_path, capsys):
    from PIL import Image

    from promptseg.cli import main

    image = tmp_path / "scene.png"
    Image.fromarray(rgb_image).save(image)
    code = main(["segment", str(image), "-p", "red square", "-p", "green square", "--model", str(tiny_sam3_dir),
                 "--device", "cpu", "--cache-dir", str(tmp_path / "c"), "--threshold", "0", "--format", "json",
                 "--out", str(tmp_path / "out"), "--clip", tiny_clip["local_dir"], "--verify",
                 "--clip-threshold", "0", "--negative", "shadow", "--exclusive"])
    assert code == 0
    record = json.loads((tmp_path / "out" / "scene.json").read_text())
    assert record["instances"] and all("clip_score" in inst and "sam_score" in inst for inst in record["instances"])
    capsys.readouterr()
    assert main(["suggest", str(image), "--clip", tiny_clip["local_dir"], "-k", "3", "--device", "cpu",
                 "--cache-dir", str(tmp_path / "c")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and all(float(line.split("\t")[0]) > 0 for line in lines)
