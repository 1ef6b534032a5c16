"""Precision parity of the transformers backend: fp16 and bf16 against fp32 on the CPU.

Same tiny weights, same image and prompts; every query is kept (threshold 0) so the outputs
line up one to one. Tolerances (absolute, on [0, 1] quantities) are `tolerance.LOW_PRECISION`:
scores 2e-3 in fp16 and 1e-2 in bf16 (8 mantissa bits), mask probabilities 1e-2 / 3e-2,
normalised boxes 5e-3 / 2e-2, and at least 99% of mask pixels on the same side of 0.5 (pixels
near 0.5 may flip). The Meta backend's parity test (tests/test_backend_meta.py) uses the same.
"""

from __future__ import annotations

import pytest
import torch
from tolerance import assert_low_precision_close

PROMPTS = ["red square", "green thing"]


def decode_all(segmenter, image, prompts, **exemplars):
    features, _ = segmenter.embed(image)
    return segmenter.backend.decode(features, segmenter.text_embeddings(prompts), 0.0, **exemplars)


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_transformers_backend_low_precision_matches_fp32(make_segmenter, rgb_image, dtype):
    reference = make_segmenter(cache_dir=False, dtype="fp32")
    lower = make_segmenter(cache_dir=False, dtype=dtype)
    assert lower.describe()["dtype"] == dtype
    features, _ = lower.embed(rgb_image)
    assert all(t.dtype == lower.dtype for t in features.values())  # the cache holds the low precision
    assert_low_precision_close(decode_all(reference, rgb_image, PROMPTS), decode_all(lower, rgb_image, PROMPTS), dtype)


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_transformers_backend_exemplars_in_low_precision_match_fp32(make_segmenter, rgb_image, dtype):
    boxes = torch.tensor([[0.2, 0.25, 0.55, 0.66], [0.65, 0.5, 0.9, 0.83]])
    labels = torch.tensor([1, 0])
    reference = decode_all(make_segmenter(cache_dir=False), rgb_image, PROMPTS, boxes=boxes, box_labels=labels)
    lower = decode_all(make_segmenter(cache_dir=False, dtype=dtype), rgb_image, PROMPTS, boxes=boxes,
                       box_labels=labels)
    assert_low_precision_close(reference, lower, dtype)


# ---- what dtype="auto" picks ---------------------------------------------------------------


@pytest.fixture
def auto_means_auto(monkeypatch):
    """Undo the suite's fixed PROMPTSEG_DTYPE so "auto" follows the machine."""
    monkeypatch.delenv("PROMPTSEG_DTYPE", raising=False)


@pytest.mark.parametrize(
    ("feature", "expected"), [("AVX512-BF16", torch.bfloat16), ("AMX", torch.bfloat16), (None, torch.float32)]
)
def test_auto_is_bf16_only_on_cpus_with_native_bf16(auto_means_auto, monkeypatch, feature, expected):
    from promptseg import device

    monkeypatch.setattr(device, "native_cpu_bf16", lambda: feature)
    chosen, reason = device.auto_dtype(torch.device("cpu"))
    assert chosen == expected
    assert (feature or "no native bf16") in reason
    assert device.resolve_dtype("auto", torch.device("cpu")) == expected


def test_auto_is_fp16_on_cuda_whatever_the_cpu(auto_means_auto, monkeypatch):
    from promptseg import device

    monkeypatch.setattr(device, "native_cpu_bf16", lambda: "AMX")
    assert device.auto_dtype(torch.device("cuda"))[0] == torch.float16


def test_native_bf16_detection_follows_torch(monkeypatch):
    from promptseg import device

    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    assert device.native_cpu_bf16() == "AVX512-BF16"
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(device.platform, "machine", lambda: "x86_64")
    assert device.native_cpu_bf16() is None  # AVX512 without BF16 emulates it: not native


def test_promptseg_dtype_replaces_auto_and_a_bad_value_is_named(monkeypatch):
    from promptseg.device import resolve_dtype
    from promptseg.errors import OptionError

    monkeypatch.setenv("PROMPTSEG_DTYPE", "bf16")
    assert resolve_dtype("auto", torch.device("cpu")) == torch.bfloat16
    assert resolve_dtype("fp32", torch.device("cpu")) == torch.float32  # a stated dtype wins
    monkeypatch.setenv("PROMPTSEG_DTYPE", "half-ish")
    with pytest.raises(OptionError, match="PROMPTSEG_DTYPE='half-ish'.*fp32, fp16, bf16 or auto"):
        resolve_dtype("auto", torch.device("cpu"))


def test_auto_loads_this_machines_precision_and_stays_within_bf16_tolerance(
    auto_means_auto, make_segmenter, rgb_image
):
    """On this CPU: "auto" loads what the detection says; in bf16 the output stays close to fp32."""
    from promptseg.device import dtype_name, native_cpu_bf16

    auto = make_segmenter(cache_dir=False)
    expected = "bf16" if native_cpu_bf16() else "fp32"
    assert auto.describe()["dtype"] == expected == dtype_name(auto.dtype)
    if expected == "bf16":
        reference = make_segmenter(cache_dir=False, dtype="fp32")
        assert_low_precision_close(
            decode_all(reference, rgb_image, PROMPTS), decode_all(auto, rgb_image, PROMPTS), "bf16"
        )


def test_doctor_says_which_precision_auto_picks_and_why(auto_means_auto, monkeypatch):
    from promptseg import device
    from promptseg.doctor import run_checks

    monkeypatch.setattr(device, "native_cpu_bf16", lambda: "AVX512-BF16")
    monkeypatch.setattr(device, "resolve_device", lambda name="auto": torch.device("cpu"))
    lines = []
    run_checks(out=lambda status, what, detail="": lines.append((status, what, detail)))
    precision = [detail for _, what, detail in lines if what == "dtype='auto'"]
    assert precision == ["bf16: the CPU has native bf16 (AVX512-BF16, detected by torch)"]
    threads = [detail for _, what, detail in lines if what == "torch threads"]
    assert threads and threads[0].startswith(f"{torch.get_num_threads()} for ")
