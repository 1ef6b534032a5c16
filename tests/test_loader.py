"""Loading SAM 3: local directories with and without tokenizer files, strict weights, clear failures."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from safetensors.torch import load_file, save_file

import promptseg
from promptseg.errors import ModelLoadError, OptionError


def copy_model(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_directory_without_tokenizer_uses_open_clip_vocabulary(tiny_sam3_dir):
    import open_clip

    assert not (tiny_sam3_dir / "tokenizer.json").exists()
    seg = promptseg.load_segmenter(str(tiny_sam3_dir), cache_dir=False)
    reference = open_clip.get_tokenizer("ViT-B-32")
    for text in ["red car", "a photo of a nucleus", "zebra-crossing!!", "straße", "红色的汽车"]:
        ours = seg.backend.tokenizer(text)["input_ids"]
        theirs = [t for t in reference([text], context_length=77)[0].tolist() if t != 0]
        assert ours == theirs


def test_directory_with_tokenizer_and_processor_files_loads_them(tiny_sam3_dir, tmp_path, rgb_image):
    from transformers import Sam3ImageProcessor

    from promptseg.tokenizer import clip_tokenizer

    model_dir = copy_model(tiny_sam3_dir, tmp_path / "with-files")
    clip_tokenizer().save_pretrained(model_dir)
    Sam3ImageProcessor(size={"height": 112, "width": 112}).save_pretrained(model_dir)
    seg = promptseg.load_segmenter(str(model_dir), cache_dir=False)
    plain = promptseg.load_segmenter(str(tiny_sam3_dir), cache_dir=False)
    a = seg.segment(rgb_image, "cat", threshold=0.0)
    b = plain.segment(rgb_image, "cat", threshold=0.0)
    assert [i.box for i in a] == [i.box for i in b]


def test_processor_with_another_input_size_is_rejected(tiny_sam3_dir, tmp_path):
    from transformers import Sam3ImageProcessor

    model_dir = copy_model(tiny_sam3_dir, tmp_path / "wrong-size")
    Sam3ImageProcessor().save_pretrained(model_dir)  # 1008x1008, but the model expects 112
    with pytest.raises(ModelLoadError, match="preprocessor_config.json"):
        promptseg.load_segmenter(str(model_dir), cache_dir=False)


def test_missing_weight_key_is_an_error(tiny_sam3_dir, tmp_path):
    model_dir = copy_model(tiny_sam3_dir, tmp_path / "missing")
    weights = load_file(model_dir / "model.safetensors")
    dropped = sorted(weights)[3]
    del weights[dropped]
    save_file(weights, model_dir / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match="missing keys") as info:
        promptseg.load_segmenter(str(model_dir), cache_dir=False)
    assert dropped in str(info.value)


def test_unexpected_weight_key_is_an_error(tiny_sam3_dir, tmp_path):
    import torch

    model_dir = copy_model(tiny_sam3_dir, tmp_path / "extra")
    weights = load_file(model_dir / "model.safetensors")
    weights["detr_decoder.surprise.weight"] = torch.zeros(3)
    save_file(weights, model_dir / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match="unexpected keys.*surprise"):
        promptseg.load_segmenter(str(model_dir), cache_dir=False)


def test_truncated_checkpoint_is_an_error(tiny_sam3_dir, tmp_path):
    model_dir = copy_model(tiny_sam3_dir, tmp_path / "truncated")
    data = (model_dir / "model.safetensors").read_bytes()
    (model_dir / "model.safetensors").write_bytes(data[: len(data) // 3])
    with pytest.raises(ModelLoadError, match="Cannot load SAM 3 weights"):
        promptseg.load_segmenter(str(model_dir), cache_dir=False)


def test_directory_without_weights_says_the_checkpoint_is_missing(tiny_sam3_dir, tmp_path):
    model_dir = tmp_path / "config-only"
    model_dir.mkdir()
    shutil.copy(tiny_sam3_dir / "config.json", model_dir)
    with pytest.raises(ModelLoadError, match="checkpoint is missing"):
        promptseg.load_segmenter(str(model_dir), cache_dir=False)


def test_missing_directory_is_an_error(tmp_path):
    with pytest.raises(ModelLoadError, match="No model directory"):
        promptseg.load_segmenter(str(tmp_path / "nowhere" / "sam3"), cache_dir=False)


def test_unreachable_hub_model_explains_the_gate_and_the_fix(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError) as info:
        promptseg.load_segmenter("facebook/sam3", cache_dir=False)
    message = str(info.value)
    assert "accept the licence" in message and "hf auth login" in message and "--model DIR" in message


def test_promptseg_model_env_overrides_the_default(tiny_sam3_dir, monkeypatch, rgb_image):
    monkeypatch.setenv("PROMPTSEG_MODEL", str(tiny_sam3_dir))
    assert promptseg.default_model() == str(tiny_sam3_dir)
    seg = promptseg.load_segmenter(cache_dir=False)
    assert seg.model_name == str(tiny_sam3_dir)
    assert len(seg.segment(rgb_image, "cat", threshold=0.0)) > 0


def test_model_identity_is_content_based(tiny_sam3_dir, tmp_path):
    copy = copy_model(tiny_sam3_dir, tmp_path / "copy")
    a = promptseg.load_segmenter(str(tiny_sam3_dir), cache_dir=False).backend.model_id
    b = promptseg.load_segmenter(str(copy), cache_dir=False).backend.model_id
    assert a == b  # a copied model directory shares cache entries


def test_local_weights_keep_the_fingerprints_earlier_versions_wrote(tmp_path):
    """Local weights are named in every cache key by a fingerprint of their files (one function for
    both SAM 3 backends and CLIP); changing it would orphan every disk cache users have filled."""
    from promptseg.backends import meta, sam3_hf
    from promptseg.clip import openclip

    hf, pt, clip = tmp_path / "hf", tmp_path / "meta", tmp_path / "clip"
    for folder in (hf, pt, clip):
        folder.mkdir()
    (hf / "config.json").write_bytes(b'{"a": 1}')
    (hf / "model.safetensors").write_bytes(bytes(range(256)) * 9000)  # > 2 MiB: both ends are read
    (hf / "model-2.safetensors").write_bytes(b"xyz" * 10)
    (pt / "sam3.pt").write_bytes(bytes(range(255, -1, -1)) * 5000)
    (pt / "sam3.pt.arch.json").write_bytes(b'{"image_size": 112}')
    (clip / "open_clip_config.json").write_bytes(b'{"model_cfg": {}}')
    (clip / "open_clip_model.safetensors").write_bytes(b"w" * 3000)

    assert sam3_hf.resolve_model_dir(str(hf))[1] == "local:c4e2217e4706e250da85725f"
    assert meta.resolve_checkpoint(str(pt / "sam3.pt"))[1] == "local:6faad34e6b07eb7dbef74be0"
    assert openclip.parse_model(f"local-dir:{clip}")[2] == "local-dir:b5e7f4dd42808894b4f8a5f1"
    weights = clip / "open_clip_model.safetensors"
    assert openclip.parse_model(f"ViT-B-32/{weights}")[2] == "ViT-B-32/file:4ee690b71c68993e013618d6"


@pytest.mark.parametrize("device, dtype, words", [("tpu", "auto", "Unknown device"), ("cpu", "int8", "Unknown dtype")])
def test_bad_device_or_dtype_is_a_clear_error(tiny_sam3_dir, device, dtype, words):
    with pytest.raises(OptionError, match=words):
        promptseg.load_segmenter(str(tiny_sam3_dir), device=device, dtype=dtype, cache_dir=False)


def test_cuda_is_used_when_present_and_refused_clearly_when_absent(tiny_sam3_dir):
    import torch

    if torch.cuda.is_available():
        assert promptseg.load_segmenter(str(tiny_sam3_dir), device="cuda:0", cache_dir=False).device.type == "cuda"
    else:
        with pytest.raises(OptionError, match="CUDA is not available"):
            promptseg.load_segmenter(str(tiny_sam3_dir), device="cuda:0", cache_dir=False)


def test_explicit_dtypes_resolve_as_named():
    import torch

    from promptseg.device import resolve_dtype

    assert resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    assert resolve_dtype("fp32", torch.device("cpu")) == torch.float32
    assert resolve_dtype(torch.float16, torch.device("cpu")) == torch.float16


def test_fp16_runs_on_cpu_for_parity_checks(tiny_sam3_dir, rgb_image):
    seg = promptseg.load_segmenter(str(tiny_sam3_dir), dtype="fp16", cache_dir=False)
    result = seg.segment(rgb_image, "cat", threshold=0.0)
    assert len(result) > 0 and np.isfinite(result.scores).all()


def test_hub_layout_loads_through_the_loader_and_segments_text(tiny_sam3_hub_dir, rgb_image):
    import torch

    weights = load_file(tiny_sam3_hub_dir / "model.safetensors")
    assert {name.split(".")[0] for name in weights} == {"detector_model", "tracker_model", "tracker_neck"}
    assert not any(name.startswith("tracker_model.tracker_model.") for name in weights)  # the hub's names
    seg = promptseg.load_segmenter(str(tiny_sam3_hub_dir), device="cpu", cache_dir=False)
    detector = seg.backend.model.state_dict()
    from_checkpoint = {name[len("detector_model."):]: t for name, t in weights.items() if name.startswith("detector_model.")}
    assert set(from_checkpoint) <= set(detector)
    assert all(torch.equal(detector[name], tensor) for name, tensor in from_checkpoint.items())
    result = seg.segment(rgb_image, ["cat", "dog"], threshold=0.0)
    assert len(result) > 0 and set(result.labels) <= {"cat", "dog"}


def test_prompt_batch_defaults_to_one_on_the_cpu_and_eight_on_a_gpu(tiny_sam3_dir):
    import torch

    from promptseg.device import prompt_batch_for

    assert prompt_batch_for(torch.device("cpu")) == 1
    assert prompt_batch_for(torch.device("cuda")) == 8
    assert promptseg.load_segmenter(str(tiny_sam3_dir), device="cpu", cache_dir=False).prompt_batch_size == 1
    stated = promptseg.load_segmenter(str(tiny_sam3_dir), device="cpu", cache_dir=False, prompt_batch_size=4)
    assert stated.prompt_batch_size == 4
