"""Device and precision policy: CUDA, then MPS, then CPU; fp16 on CUDA, fp32 elsewhere.

bf16 can be chosen wherever torch runs it (CUDA with bf16 support, recent CPUs); fp16 on the CPU
is allowed but slow and only useful for parity checks.
"""

from __future__ import annotations

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


def resolve_dtype(dtype: str | torch.dtype = "auto", device: torch.device | None = None) -> torch.dtype:
    """``"auto"``: fp16 on CUDA, fp32 on MPS and CPU. ``"bf16"`` is checked for support."""
    device = device or torch.device("cpu")
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPE_NAMES:
            raise OptionError(f"Unsupported dtype {dtype}: use fp32, fp16 or bf16.")
        chosen = dtype
    else:
        name = (dtype or "auto").lower()
        if name == "auto":
            return torch.float16 if device.type == "cuda" else torch.float32
        if name not in DTYPES:
            raise OptionError(f"Unknown dtype {dtype!r}: use auto, fp32, fp16 or bf16.")
        chosen = DTYPES[name]
    if chosen == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise OptionError("This GPU does not support bf16: use dtype='fp16' (the CUDA default).")
    return chosen


def dtype_name(dtype: torch.dtype) -> str:
    return DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))
