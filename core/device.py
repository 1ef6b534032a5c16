"""Device and precision policy, in one place: which device ``"auto"`` means, which precision runs
where, and what each device's torch version must offer.

=======  ==========================  ===============================================================
device   ``dtype="auto"``            also allowed
=======  ==========================  ===============================================================
CUDA     fp16                        bf16 where the GPU runs it natively (compute capability 8.0+,
                                     checked on the requested ``cuda:N``); fp32
CPU      bf16 with native bf16,      fp16 (slow, for parity checks); bf16 without native support
         else fp32                   (emulated, slower than fp32)
MPS      fp32                        fp16 (torch 2.5+ for autocast); bf16 (torch 2.6+, macOS 14+)
=======  ==========================  ===============================================================

A CPU has native bf16 when torch says it runs bf16 matrix products in hardware (x86 AVX512-BF16 or
AMX; aarch64 with the BF16 extension): there SAM 3 runs about twice as fast in bf16 as in fp32, with
masks within `docs/backends.md`'s stated tolerances. MPS stays fp32 by default: fp16 there has no
speed record with SAM 3 and Meta runs SAM 3 in bf16, not fp16. ``PROMPTSEG_DTYPE`` replaces what
``"auto"`` means (e.g. ``fp32`` for results that match across machines).
"""

from __future__ import annotations

import contextlib
import gc
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
    if device.type == "mps":
        return torch.float32, "MPS runs fp32 by default (fp16 and bf16 on request)"
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
    if chosen == torch.bfloat16 and device.type == "cuda" and not native_cuda_bf16(device):
        raise OptionError(
            f"{cuda_name(device)} has no native bf16 (it needs compute capability 8.0+, e.g. A100, "
            "RTX 30xx or newer; older GPUs emulate it slowly): use dtype='fp16' (the CUDA default)."
        )
    if device.type == "mps":
        check_mps_dtype(chosen)
    return chosen


def torch_version() -> tuple[int, int]:
    """torch's (major, minor), e.g. (2, 7)."""
    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    return int(major), int(minor)


def _cuda_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def cuda_name(device: torch.device) -> str:
    return f"{device} ({torch.cuda.get_device_name(_cuda_index(device))})"


def native_cuda_bf16(device: torch.device) -> bool:
    """Whether the GPU `device` names runs bf16 in hardware (Ampere and newer: capability 8.0+).
    `torch.cuda.is_bf16_supported()` also says yes where bf16 is emulated (T4, V100), and asks
    the current device instead of the one requested."""
    return torch.cuda.get_device_capability(_cuda_index(device)) >= (8, 0)


MPS_MIN_TORCH = {torch.float16: (2, 5), torch.bfloat16: (2, 6)}
"""The torch version whose MPS autocast takes each precision (bf16 also needs macOS 14)."""
MPS_ANTIALIAS_MIN_TORCH = (2, 7)
"""The torch version whose MPS backend has the antialiased resize (`upsample_bilinear2d_aa`)."""


def _macos_major() -> int:
    release = platform.mac_ver()[0]
    return int(release.split(".")[0]) if release else 0


def check_mps_dtype(dtype: torch.dtype) -> None:
    """Refuse a precision this Mac's torch and macOS cannot run on MPS, naming the fix."""
    if dtype == torch.float32:
        return
    needed = MPS_MIN_TORCH[dtype]
    if torch_version() < needed:
        raise OptionError(
            f"{dtype_name(dtype)} on Apple MPS needs torch {needed[0]}.{needed[1]} or newer (this is "
            f"{torch.__version__}): upgrade torch, or use dtype='fp32' (the MPS default)."
        )
    if dtype == torch.bfloat16 and _macos_major() < 14:
        raise OptionError("bf16 on Apple MPS needs macOS 14 or newer: use dtype='fp16' or 'fp32'.")


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Autocast to `dtype` on `device`, or nothing at all in fp32: constructing a disabled
    `torch.autocast` still fails on devices whose torch has no autocast for them."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    if device.type == "mps":
        check_mps_dtype(dtype)
    return torch.autocast(device.type, dtype=dtype)


def resize_device(device: torch.device) -> torch.device:
    """Where an antialiased resize can run for a model on `device`: the device itself, or the CPU
    on MPS before torch 2.7 (the op is missing there)."""
    if device.type == "mps" and torch_version() < MPS_ANTIALIAS_MIN_TORCH:
        return torch.device("cpu")
    return device


def safe_dtype(device: torch.device) -> torch.dtype:
    """The precision a call is redone in when fp16 overflows: bf16 (fp32's range) where the device
    runs it natively, else fp32."""
    if device.type == "cuda" and native_cuda_bf16(device):
        return torch.bfloat16
    return torch.float32


def dtype_name(dtype: torch.dtype) -> str:
    return DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))


def prompt_batch_for(device: torch.device) -> int:
    """How many prompts one decoder forward takes by default on `device`: one on the CPU, where a
    batch is slower per prompt than one at a time (full SAM 3: 2.3 s against 2.0 s per prompt,
    `bench/cpu_speed.py`), eight on a GPU, where a batch fills the device."""
    return 1 if device.type == "cpu" else 8


def release_device_memory(device: torch.device) -> None:
    """Hand memory freed by dropped tensors back to the device (CUDA's and MPS's allocators keep
    freed blocks for reuse, so another process or model cannot have them otherwise)."""
    gc.collect()  # tensors held only in reference cycles go first
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif device.type == "mps":
        torch.mps.empty_cache()
