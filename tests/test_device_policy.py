"""The device and precision policy on simulated CUDA and Apple MPS machines (torch's queries
monkeypatched: no GPU runs here), and what `promptseg doctor` says about each."""

from __future__ import annotations

import contextlib

import pytest
import torch

from promptseg import device as policy
from promptseg.errors import OptionError


@pytest.fixture
def auto_means_auto(monkeypatch):
    monkeypatch.delenv("PROMPTSEG_DTYPE", raising=False)


@pytest.fixture
def two_gpus(monkeypatch):
    """cuda:0 a T4 (capability 7.5, bf16 only emulated), cuda:1 an A100 (8.0, native bf16)."""
    gpus = {0: ("Tesla T4", (7, 5), 14), 1: ("NVIDIA A100", (8, 0), 70)}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=None: gpus[i or 0][0])
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None: gpus[i or 0][1])
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i=None: (gpus[i or 0][2] * 1024**3, 80 * 1024**3))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # says yes for emulation too
    return gpus


def test_cuda_defaults_to_fp16(auto_means_auto, two_gpus):
    assert policy.resolve_dtype("auto", policy.resolve_device("auto")) == torch.float16


def test_bf16_is_refused_on_a_gpu_that_only_emulates_it(two_gpus):
    with pytest.raises(OptionError, match=r"cuda:0 \(Tesla T4\) has no native bf16.*dtype='fp16'"):
        policy.resolve_dtype("bf16", torch.device("cuda:0"))
    assert policy.resolve_dtype("bf16", torch.device("cuda:1")) == torch.bfloat16  # the GPU asked for


def test_bare_cuda_means_the_current_gpu(two_gpus, monkeypatch):
    with pytest.raises(OptionError, match="Tesla T4"):
        policy.resolve_dtype("bf16", torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert policy.resolve_dtype("bf16", torch.device("cuda")) == torch.bfloat16


def test_overflow_is_redone_in_bf16_where_native_else_fp32(two_gpus):
    assert policy.safe_dtype(torch.device("cuda:1")) == torch.bfloat16
    assert policy.safe_dtype(torch.device("cuda:0")) == torch.float32
    assert policy.safe_dtype(torch.device("cpu")) == torch.float32


@pytest.fixture
def mac(monkeypatch):
    """An Apple-silicon Mac: MPS available, torch and macOS versions set per test."""
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    def versions(torch_version=(2, 7), macos="14.5"):
        monkeypatch.setattr(policy, "torch_version", lambda: torch_version)
        monkeypatch.setattr(policy.platform, "mac_ver", lambda: (macos, ("", "", ""), ""))

    return versions


def test_mps_defaults_to_fp32(auto_means_auto, mac):
    mac()
    device = policy.resolve_device("auto")
    assert device.type == "mps"
    assert policy.auto_dtype(device) == (torch.float32, "MPS runs fp32 by default (fp16 and bf16 on request)")


@pytest.mark.parametrize(
    ("torch_version", "macos", "dtype", "problem"),
    [
        ((2, 4), "14.5", "fp16", r"fp16 on Apple MPS needs torch 2\.5"),
        ((2, 5), "14.5", "bf16", r"bf16 on Apple MPS needs torch 2\.6"),
        ((2, 7), "13.6", "bf16", r"bf16 on Apple MPS needs macOS 14"),
        ((2, 5), "13.6", "fp16", None),
        ((2, 6), "14.0", "bf16", None),
        ((2, 0), "12.0", "fp32", None),
    ],
)
def test_mps_precisions_follow_torch_and_macos(mac, torch_version, macos, dtype, problem):
    mac(torch_version, macos)
    if problem:
        with pytest.raises(OptionError, match=problem):
            policy.resolve_dtype(dtype, torch.device("mps"))
    else:
        assert policy.resolve_dtype(dtype, torch.device("mps")) == policy.DTYPES[dtype]


def test_fp32_constructs_no_autocast(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("torch.autocast constructed in fp32")

    monkeypatch.setattr(torch, "autocast", refuse)
    assert isinstance(policy.autocast(torch.device("mps"), torch.float32), contextlib.nullcontext)


def test_autocast_on_an_old_mac_names_the_fix(mac):
    mac((2, 4), "14.5")
    with pytest.raises(OptionError, match="upgrade torch, or use dtype='fp32'"):
        policy.autocast(torch.device("mps"), torch.float16)


@pytest.mark.parametrize(("torch_version", "where"), [((2, 6), "cpu"), ((2, 7), "mps")])
def test_antialiased_resize_runs_where_the_op_exists(mac, torch_version, where):
    mac(torch_version)
    assert policy.resize_device(torch.device("mps")).type == where
    assert policy.resize_device(torch.device("cuda")).type == "cuda"


def doctor_lines(monkeypatch) -> dict[str, tuple[str, str]]:
    from promptseg import doctor

    lines = {}
    doctor._check_devices(lambda status, what, detail="": lines.__setitem__(what, (status, detail)))
    return lines


def test_doctor_reports_each_gpu_its_bf16_and_free_memory(auto_means_auto, two_gpus, monkeypatch):
    lines = doctor_lines(monkeypatch)
    assert lines["device='auto'"] == ("ok", "cuda")
    assert lines["dtype='auto'"] == ("ok", "fp16: CUDA runs fp16 at full speed")
    t4, a100 = lines["CUDA cuda:0"], lines["CUDA cuda:1"]
    assert "Tesla T4, compute capability 7.5, bf16 emulated" in t4[1] and "14.0 GiB free of 80.0 GiB" in t4[1]
    assert "NVIDIA A100, compute capability 8.0, bf16 native" in a100[1] and "70.0 GiB free" in a100[1]


def test_doctor_reports_what_this_mac_can_run(auto_means_auto, mac, monkeypatch):
    mac((2, 5), "14.5")
    monkeypatch.setattr(torch.mps, "recommended_max_memory", lambda: 24 * 1024**3, raising=False)
    lines = doctor_lines(monkeypatch)
    assert lines["device='auto'"] == ("ok", "mps") and lines["dtype='auto'"][1].startswith("fp32")
    status, detail = lines["Apple MPS"]
    assert "fp16 on request" in detail and "bf16" not in detail.split(" on request")[0]
    assert "resize on the CPU" in detail and "24.0 GiB recommended" in detail


def test_doctor_reports_native_or_emulated_bf16_on_the_cpu(auto_means_auto, monkeypatch):
    for feature, said in (("AMX", "runs, native (AMX)"), (None, "runs, emulated, slower than fp32")):
        monkeypatch.setattr(policy, "native_cpu_bf16", lambda feature=feature: feature)
        lines = doctor_lines(monkeypatch)
        assert lines["bf16 on CPU"] == ("ok", said)
        assert lines["dtype='auto'"][1].startswith("bf16" if feature else "fp32")
        assert "GiB available" in lines["host memory"][1]
