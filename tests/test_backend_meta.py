"""The ``sam3-meta`` backend on a tiny model built from Meta's own components.

The model is saved as an official ``sam3.pt`` (``detector.*`` tensors) and loaded through the
backend's real loader on the CPU, where the unmodified package cannot run by itself.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import sam3  # noqa: F401  (the meta extra; CI installs it)
from tolerance import assert_detections_close

from promptseg.errors import ModelLoadError  # noqa: E402

PROMPTS = ["red square", "green thing"]


@pytest.fixture(scope="session")
def meta_checkpoint(tmp_path_factory):
    from promptseg.testing import make_random_meta_sam3

    return make_random_meta_sam3(tmp_path_factory.mktemp("models") / "tiny-meta")


@pytest.fixture
def make_meta(meta_checkpoint, tmp_path):
    from promptseg import load_segmenter

    def make(cache_dir=None, **options):
        return load_segmenter(str(meta_checkpoint), device="cpu",
                              cache_dir=tmp_path / "cache" if cache_dir is None else cache_dir, **options)

    return make


def _rewrite(meta_checkpoint, tmp_path, change):
    """A copy of the tiny checkpoint (with its architecture file) after `change(state)`."""
    from promptseg.backends.meta.model import arch_path

    state = torch.load(meta_checkpoint, weights_only=True)
    change(state)
    path = tmp_path / "edited.pt"
    torch.save(state, path)
    arch_path(path).write_bytes(arch_path(meta_checkpoint).read_bytes())
    return path


# -- registration and loading -------------------------------------------------------------------

def test_pt_files_pick_the_meta_backend_and_directories_the_transformers_one(meta_checkpoint, tiny_sam3_dir):
    from promptseg.plugins import registry

    assert registry().segmenter_for(str(meta_checkpoint)).name == "sam3-meta"
    assert registry().segmenter_for(str(meta_checkpoint.parent)).name == "sam3-meta"
    assert registry().segmenter_for(str(tiny_sam3_dir)).name == "sam3"
    assert registry().segmenter_for("facebook/sam3").name == "sam3"
    assert registry().segmenter_for("facebook/sam3", backend="sam3-meta").name == "sam3-meta"


def test_checkpoint_uses_the_official_layout_and_loads_every_tensor(meta_checkpoint):
    """Every ``detector.*`` tensor in the image model (the tracker's: tests/test_backend_meta_visual.py)."""
    from promptseg.backends import meta

    state = torch.load(meta_checkpoint, weights_only=True)
    assert state and all(key.startswith(("detector.", "tracker.")) for key in state)
    backend = meta.load(str(meta_checkpoint), device="cpu")
    loaded = backend.model.state_dict()
    for key, value in state.items():
        if key.startswith("detector."):
            assert torch.equal(loaded[key[len("detector."):]], value), key


def test_random_model_has_no_uninitialised_text_parameters(meta_checkpoint):
    from promptseg.backends.meta.model import UNINITIALISED

    state = torch.load(meta_checkpoint, weights_only=True)
    for name in UNINITIALISED:
        assert torch.isfinite(state["detector." + name]).all() and state["detector." + name].abs().max() < 10
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


@pytest.mark.parametrize("what", ["missing", "extra", "shape", "foreign"])
def test_checkpoint_with_wrong_keys_is_refused(meta_checkpoint, tmp_path, what):
    from promptseg.backends import meta
    from promptseg.backends.meta.model import UNINITIALISED

    name = "detector." + UNINITIALISED[1]

    def change(state):
        if what == "missing":
            del state[name]
        elif what == "extra":
            state["detector.transformer.decoder.surplus.weight"] = torch.zeros(3)
        elif what == "shape":
            state[name] = torch.zeros(3, 3)
        else:
            state["optimizer.step"] = torch.zeros(1)

    path = _rewrite(meta_checkpoint, tmp_path, change)
    expected = {"missing": "missing keys", "extra": "unexpected keys", "shape": "shape mismatches",
                "foreign": "unexpected keys"}[what]
    with pytest.raises(ModelLoadError, match=expected):
        meta.load(str(path), device="cpu")


def test_nested_model_dict_is_accepted(meta_checkpoint, tmp_path):
    from promptseg.backends import meta

    def change(state):
        nested = dict(state)
        state.clear()
        state["model"] = nested

    backend = meta.load(str(_rewrite(meta_checkpoint, tmp_path, change)), device="cpu")
    assert backend.name == "sam3-meta" and backend.visual_prompts


def test_unreadable_file_and_offline_hub_give_clear_errors(tmp_path, monkeypatch):
    from promptseg.backends import meta

    bad = tmp_path / "sam3.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelLoadError, match="download sam3.pt again"):
        meta.load(str(bad), device="cpu")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ModelLoadError, match="not in the local Hugging Face cache.*hf auth login"):
        meta.load("facebook/sam3", device="cpu")
    with pytest.raises(ModelLoadError, match="No checkpoint at"):
        meta.load(str(tmp_path / "nowhere" / "sam3.pt"), device="cpu")


def test_device_redirect_is_scoped_to_its_block():
    from promptseg.backends.meta.device import DeviceRedirect

    with DeviceRedirect("cpu"):
        made = torch.zeros(2, device="cuda")
        pinned = torch.ones(2).pin_memory()
        moved = torch.ones(1).to("cuda")
    assert made.device.type == pinned.device.type == moved.device.type == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises((RuntimeError, AssertionError)):
            torch.zeros(2, device="cuda")


@pytest.mark.slow
def test_released_architecture_matches_metas_own_builder_key_for_key():
    """The loader's full-size model has exactly the detector keys and shapes of Meta's builder
    (with the SAM 2 neck, as in sam3.pt), and its tracker those of the builder's interactive
    predictor (``tracker.*`` in sam3.pt), so the official checkpoint loads strictly. ~75 s, 4 GB."""
    import gc

    from sam3.model_builder import build_sam3_image_model

    from promptseg.backends.meta.device import DeviceRedirect
    from promptseg.backends.meta.model import Architecture, build_image_model, build_tracker
    from promptseg.tokenizer import open_clip_vocab_path

    with DeviceRedirect("cpu"):
        reference = build_sam3_image_model(bpe_path=str(open_clip_vocab_path()), device="cpu",
                                           load_from_HF=False, enable_inst_interactivity=True)
    shapes = {k: v.shape for k, v in reference.state_dict().items()}
    tracker = "inst_interactive_predictor.model."  # where Meta's loader puts tracker.* of sam3.pt
    expected = {k: shape for k, shape in shapes.items() if not k.startswith("inst_interactive_predictor.")}
    expected_tracker = {k[len(tracker):]: shape for k, shape in shapes.items() if k.startswith(tracker)}
    del reference
    gc.collect()
    ours = {k: v.shape for k, v in build_image_model(Architecture(), open_clip_vocab_path()).state_dict().items()}
    assert ours == expected
    assert {k: v.shape for k, v in build_tracker(Architecture()).state_dict().items()} == expected_tracker


# -- the core pipeline ---------------------------------------------------------------------------

def test_segment_finds_instances_with_masks_boxes_and_scores(make_meta, rgb_image):
    seg = make_meta()
    result = seg.segment(rgb_image, PROMPTS, threshold=0.0, cross_prompt_iou=None)
    assert seg.describe()["backend"] == "sam3-meta"
    assert len(result) > 0 and result.image_size == rgb_image.shape[:2]
    assert {inst.label for inst in result.instances} <= set(PROMPTS)
    for inst in result.instances:
        assert 0.0 <= inst.score <= 1.0
        x0, y0, x1, y1 = inst.box
        assert 0 <= x0 < x1 <= rgb_image.shape[1] and 0 <= y0 < y1 <= rgb_image.shape[0]
        assert inst.mask.shape == (y1 - y0, x1 - x0) and inst.mask.any()
    assert result.to_label_image().shape == rgb_image.shape[:2]


def test_decode_gives_mask_probabilities_normalised_boxes_and_thresholded_scores(make_meta, rgb_image):
    from promptseg.testing.meta import TINY

    seg = make_meta()
    features, _ = seg.embed(rgb_image)
    [found] = seg.backend.decode(features, seg.text_embeddings(["red square"]), threshold=0.0)
    side = TINY.image_size // TINY.patch_size * 4  # masks come at 4x the patch grid
    assert found.mask_probs.shape == (len(found.scores), side, side)
    assert ((found.mask_probs >= 0) & (found.mask_probs <= 1)).all() and ((found.scores >= 0) & (found.scores <= 1)).all()
    assert found.boxes.shape == (len(found.scores), 4)
    assert ((found.boxes >= -1e-4) & (found.boxes <= 1 + 1e-4)).all()
    cut = float(found.scores.median())
    [kept] = seg.backend.decode(features, seg.text_embeddings(["red square"]), threshold=cut)
    assert len(kept.scores) == int((found.scores > cut).sum())


def test_batched_prompts_equal_one_prompt_at_a_time(make_meta, rgb_image):
    seg = make_meta()
    features, _ = seg.embed(rgb_image)
    texts = seg.text_embeddings(PROMPTS)
    together = seg.backend.decode(features, texts, threshold=0.0)
    alone = [seg.backend.decode(features, [text], threshold=0.0)[0] for text in texts]
    assert_detections_close(together, alone)  # the shared tolerance rule (tests/tolerance.py)


def test_second_prompt_skips_image_encoder(make_meta, rgb_image):
    seg = make_meta()
    first = seg.segment(rgb_image, "red square", threshold=0.0)
    second = seg.segment(rgb_image, "green thing", threshold=0.0)
    assert (first.embedding_source, second.embedding_source) == ("computed", "memory")
    assert seg.stats.image_encoder_runs == 1 and seg.cache.stats.memory_hits == 1


def test_disk_cache_is_reused_and_kept_apart_from_the_transformers_backend(
    make_meta, make_segmenter, rgb_image, tmp_path
):
    shared = tmp_path / "shared-cache"
    make_segmenter(cache_dir=shared).segment(rgb_image, "red square", threshold=0.0)
    meta = make_meta(cache_dir=shared)
    first = meta.segment(rgb_image, "red square", threshold=0.0)
    assert first.embedding_source == "computed"  # not the transformers backend's entry
    again = make_meta(cache_dir=shared)
    second = again.segment(rgb_image, "red square", threshold=0.0)
    assert second.embedding_source == "disk" and again.stats.image_encoder_runs == 0
    assert [i.score for i in second.instances] == pytest.approx([i.score for i in first.instances], abs=1e-6)
    for a, b in zip(first.instances, second.instances):  # exact: the same tensors, laid out alike, same code
        np.testing.assert_array_equal(a.mask, b.mask)


def test_embedding_spec_is_what_its_encoder_returns(make_meta, rgb_image):
    for seg in (make_meta(cache_dir=False), make_meta(cache_dir=False, dtype="bf16")):
        for image in (rgb_image, rgb_image[:5, :40]):
            features = seg.backend.encode_image(seg.backend.preprocess(image))
            made = {name: (tuple(t.shape), t.dtype) for name, t in features.items()}
            assert made == seg.backend.embedding_spec(image.shape[:2])


@pytest.mark.parametrize("damage", ["shape", "dtype", "nan", "inf"])
def test_cache_entry_with_bad_values_is_recomputed(make_meta, rgb_image, tmp_path, caplog, damage):
    """This backend's entries go through the same disk store and its checks (see tests/test_cache.py)."""
    from test_cache import DAMAGE, rewrite_entry

    cache_dir = tmp_path / "c"
    first = make_meta(cache_dir=cache_dir)
    fresh = first.segment(rgb_image, "red square", threshold=0.0)
    computed, _ = first.embed(rgb_image)
    (path,) = cache_dir.glob("*/*.safetensors")
    change, words = DAMAGE[damage]
    rewrite_entry(path, change)
    again = make_meta(cache_dir=cache_dir)
    result = again.segment(rgb_image, "red square", threshold=0.0)
    assert result.embedding_source == "computed" and again.stats.image_encoder_runs == 1
    assert "deleting it and recomputing" in caplog.text and words in caplog.text
    assert len(fresh) > 0 and [i.score for i in result] == pytest.approx([i.score for i in fresh], abs=1e-5)
    read, source = make_meta(cache_dir=cache_dir).embed(rgb_image)  # the file now holds a good entry
    assert source == "disk" and all(torch.equal(read[name], computed[name]) for name in computed)


def test_exemplar_boxes_positive_and_negative_steer_the_decoder(make_meta, rgb_image):
    seg = make_meta()
    box = [[40, 30, 110, 80]]
    plain = seg.segment(rgb_image, "red square", threshold=0.0, iou_threshold=None, cross_prompt_iou=None)
    positive = seg.segment(rgb_image, "red square", threshold=0.0, iou_threshold=None, cross_prompt_iou=None,
                           exemplars=box)
    negative = seg.segment(rgb_image, "red square", threshold=0.0, iou_threshold=None, cross_prompt_iou=None,
                           exemplars=box, exemplar_labels=[0])
    both = seg.segment(rgb_image, "red square", threshold=0.0, iou_threshold=None, cross_prompt_iou=None,
                       exemplars=box + [[130, 60, 180, 100]], exemplar_labels=[1, 0])
    scores = [sorted(i.score for i in r.instances) for r in (plain, positive, negative, both)]
    for i in range(len(scores)):
        for j in range(i + 1, len(scores)):
            assert scores[i] != pytest.approx(scores[j], abs=1e-6), (i, j)
    assert seg.stats.image_encoder_runs == 1  # exemplars reuse the cached image embedding


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_low_precision_matches_fp32_with_and_without_exemplars(make_meta, rgb_image, dtype):
    """Same tolerances as the transformers backend (tests/test_precision.py)."""
    from test_precision import decode_all
    from tolerance import assert_low_precision_close

    reference, lower = make_meta(cache_dir=False), make_meta(cache_dir=False, dtype=dtype)
    assert lower.describe()["dtype"] == dtype
    features, _ = lower.embed(rgb_image)
    assert all(t.dtype == lower.dtype for t in features.values())  # the cache holds the low precision
    assert_low_precision_close(decode_all(reference, rgb_image, PROMPTS), decode_all(lower, rgb_image, PROMPTS), dtype)
    boxes, labels = torch.tensor([[0.2, 0.25, 0.55, 0.66], [0.65, 0.5, 0.9, 0.83]]), torch.tensor([1, 0])
    assert_low_precision_close(decode_all(reference, rgb_image, PROMPTS, boxes=boxes, box_labels=labels),
                               decode_all(lower, rgb_image, PROMPTS, boxes=boxes, box_labels=labels), dtype)


# -- an adapter on this backend --------------------------------------------------------------------

def test_label_studio_backend_serves_this_model(make_meta, tmp_path):
    from label_studio_sdk.converter.brush import decode_rle
    from PIL import Image
    from promptseg_labelstudio.app import create_app
    from promptseg_labelstudio.config import BackendConfig
    from promptseg_labelstudio.model import PromptsegMLBackend

    rng = np.random.default_rng(3)
    image = rng.integers(0, 60, (48, 64, 3), dtype=np.uint8)
    image[8:30, 10:35] = (220, 40, 40)
    Image.fromarray(image).save(tmp_path / "a.png")
    seg = make_meta()
    config = BackendConfig(model="unused", device="cpu", threshold=0.0, document_root=tmp_path)
    client = create_app(PromptsegMLBackend(config, segmenter=seg)).test_client()
    label_config = ('<View><Image name="image" value="$image"/><BrushLabels name="tag" toName="image">'
                    '<Label value="red square"/></BrushLabels></View>')
    body = {"tasks": [{"id": 1, "data": {"image": "a.png"}}], "project": "1.1", "label_config": label_config}
    response = client.post("/predict", json=body)
    assert response.status_code == 200, response.get_data(as_text=True)
    [prediction] = response.json["results"]
    expected = seg.segment(str(tmp_path / "a.png"), ["red square"], threshold=0.0)
    assert len(prediction["result"]) == len(expected) > 0
    for region, inst in zip(prediction["result"], expected.instances):
        mask = decode_rle(region["value"]["rle"]).reshape(48, 64, 4)[:, :, 3] > 0
        np.testing.assert_array_equal(mask, inst.full_mask(48, 64))  # exact: one segmenter, its cached embedding
        assert region["score"] == pytest.approx(inst.score)
    assert seg.stats.image_encoder_runs == 1  # the core call above hit the adapter's cached embedding
