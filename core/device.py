"""Device and precision policy: CUDA, then MPS, then CPU; fp16 on CUDA, bf16 on CPUs with native
bf16, fp32 elsewhere.

A CPU has native bf16 when torch says it runs bf16 matrix products in hardware (x86 AVX512-BF16 or
AMX; aarch64 with the BF16 extension): there SAM 3 runs about twice as fast in bf16 as in fp32, with
masks within `docs/backends.md`'s stated tolerances. Without it bf16 is emulated and slower than
fp32, so ``"auto"`` keeps fp32. ``PROMPTSEG_DTYPE`` replaces what ``"auto"`` means (e.g. ``fp32`` for
results that match across machines). fp16 on the CPU is allowed but slow and only useful for parity
checks.
"""

from __future__ import annotations

import os
import platform

import torch

from promptseg.errors import OptionError

DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
}
DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` picks CUDA, then Apple MPS, then the CPU; anything else must be available."""
    if isinstance(device, torch.device):
        device = str(device)
    name = (device or "auto").lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        resolved = torch.device(name)
    except RuntimeError as exc:
        raise OptionError(f"Unknown device {device!r}: use auto, cpu, cuda, cuda:N or mps.") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise OptionError(
            f"device={device!r} but CUDA is not available here (torch {torch.__version__}, "
            f"CUDA build: {torch.version.cuda or 'no'}). Use device='auto' or 'cpu'."
        )
    if resolved.type == "cuda" and resolved.index is not None:
        if resolved.index >= torch.cuda.device_count():
            raise OptionError(
                f"device={device!r} but only {torch.cuda.device_count()} CUDA device(s) exist."
            )
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise OptionError(f"device={device!r} but Apple MPS is not available here. Use 'auto' or 'cpu'.")
    return resolved


DTYPE_ENV = "PROMPTSEG_DTYPE"


def native_cpu_bf16() -> str | None:
    """The CPU feature that runs bf16 in hardware, as torch reports it, or None (emulated or unknown)."""
    cpu = getattr(torch, "cpu", None)
    for feature, check in (("AMX", "_is_amx_tile_supported"), ("AVX512-BF16", "_is_avx512_bf16_supported")):
        probe = getattr(cpu, check, None)
        if probe is not None and probe():
            return feature
    if platform.machine().lower() in ("aarch64", "arm64"):
        # oneDNN answers for the BF16 extension on Arm; on x86 it also says yes for emulation
        probe = getattr(getattr(torch.ops, "mkldnn", None), "_is_mkldnn_bf16_supported", None)
        if probe is not None and probe():
            return "Arm BF16"
    return None


def auto_dtype(device: torch.device) -> tuple[torch.dtype, str]:
    """What ``dtype="auto"`` picks on `device`, and why (one line, as `promptseg doctor` says it)."""
    override = os.environ.get(DTYPE_ENV, "").strip().lower()
    if override and override != "auto":
        if override not in DTYPES:
            raise OptionError(f"{DTYPE_ENV}={override!r} is not a precision: set it to fp32, fp16, bf16 or auto.")
        return DTYPES[override], f"{DTYPE_ENV}={override}"
    if device.type == "cuda":
        return torch.float16, "CUDA runs fp16 at full speed"
    if device.type == "cpu":
        feature = native_cpu_bf16()
        if feature:
            return torch.bfloat16, f"the CPU has native bf16 ({feature}, detected by torch)"
        return torch.float32, "the CPU has no native bf16 (it would be emulated, slower than fp32)"
    return torch.float32, f"fp32 on {device.type}"


def resolve_dtype(dtype: str | torch.dtype = "auto", device: torch.device | None = None) -> torch.dtype:
    """``"auto"``: see `auto_dtype` (fp16 on CUDA, bf16 on CPUs with native bf16, else fp32).
    ``"bf16"`` is checked for support on CUDA."""
    device = device or torch.device("cpu")
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPE_NAMES:
            raise OptionError(f"Unsupported dtype {dtype}: use fp32, fp16 or bf16.")
        chosen = dtype
    else:
        name = (dtype or "auto").lower()
        if name == "auto":
            chosen = auto_dtype(device)[0]
        elif name not in DTYPES:
            raise OptionError(f"Unknown dtype {dtype!r}: use auto, fp32, fp16 or bf16.")
        else:
            chosen = DTYPES[name]
    if chosen == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise OptionError("This GPU does not support bf16: use dtype='fp16' (the CUDA default).")
    return chosen


def dtype_name(dtype: torch.dtype) -> str:
    return DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))


def prompt_batch_for(device: torch.device) -> int:
    """How many prompts one decoder forward takes by default on `device`: one on the CPU, where a
    batch is slower per prompt than one at a time (full SAM 3: 2.3 s against 2.0 s per prompt,
    `bench/cpu_speed.py`), eight on a GPU, where a batch fills the device."""
    return 1 if device.type == "cpu" else 8
