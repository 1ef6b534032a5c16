"""Run Meta's ``sam3`` package on any device without editing it.

The package hard-codes ``device="cuda"`` when it precomputes position encodings and box
coordinates, and calls ``Tensor.pin_memory()`` when it encodes exemplar boxes; on a CPU or an
Apple GPU both fail. `DeviceRedirect` is a torch function mode: while it is active (only around
this backend's own calls into the package) a CUDA device named by the package becomes the
backend's device and pinning is skipped when the target is not CUDA. Nothing in torch or in
the package is patched, so other code in the process is unaffected.
"""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode


def _is_cuda(value) -> bool:
    if isinstance(value, torch.device):
        return value.type == "cuda"
    return isinstance(value, str) and value.split(":")[0] == "cuda"


class DeviceRedirect(TorchFunctionMode):
    """Send the package's CUDA-only tensor placements to `device` (a no-op when it is CUDA)."""

    def __init__(self, device: torch.device | str) -> None:
        super().__init__()
        self.device = torch.device(device)
        self.active = self.device.type != "cuda"

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.active:
            if func is torch.Tensor.pin_memory:
                return args[0]  # pinning only speeds host-to-CUDA copies
            if func is torch.Tensor.cuda:
                return args[0].to(self.device)
            args = tuple(self.device if _is_cuda(a) else a for a in args)
            if _is_cuda(kwargs.get("device")):
                kwargs = {**kwargs, "device": self.device}
        return func(*args, **kwargs)
