"""Where a model's tensors live: find and move the ones `Module.to` leaves behind.

`Module.to(device)` moves parameters and buffers only. A tensor kept as a plain attribute (a
coordinate or position-encoding cache built at construction, a list or dict of them) stays on
the device it was made on, and the first forward pass on another device then mixes devices.
`stray_tensors` lists such tensors (and any parameter or buffer off the device); backends call
`move_plain_tensors` after `.to(device)` so caches follow the model wherever it goes.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

_MODULE_SLOTS = {"_parameters", "_buffers", "_modules"}


def _tensors_in(value: Any, path: str, depth: int = 0) -> Iterator[tuple[str, torch.Tensor]]:
    """Tensors in `value` and in the lists, tuples and dicts it holds (a few levels deep)."""
    if isinstance(value, torch.Tensor):
        yield path, value
    elif depth < 4 and isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            yield from _tensors_in(item, f"{path}[{index}]", depth + 1)
    elif depth < 4 and isinstance(value, dict):
        for key, item in value.items():
            yield from _tensors_in(item, f"{path}[{key!r}]", depth + 1)


def plain_tensors(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor held as a plain attribute (not a parameter or buffer) of `module` or a submodule."""
    for prefix, sub in module.named_modules():
        for name, value in vars(sub).items():
            if name in _MODULE_SLOTS or isinstance(value, nn.Module):
                continue
            yield from _tensors_in(value, f"{prefix}.{name}" if prefix else name)


def _same_place(tensor: torch.Tensor, device: torch.device) -> bool:
    if tensor.device.type != device.type:
        return False
    return device.index is None or tensor.device.index in (None, device.index)


def stray_tensors(module: nn.Module, device: torch.device | str) -> list[str]:
    """Names and devices of `module`'s tensors that are not on `device` (empty when all are)."""
    device = torch.device(device)
    strays = [
        f"{kind} {name} on {tensor.device}"
        for kind, named in (("parameter", module.named_parameters()), ("buffer", module.named_buffers()))
        for name, tensor in named
        if not _same_place(tensor, device)
    ]
    strays += [f"attribute {name} on {t.device}" for name, t in plain_tensors(module) if not _same_place(t, device)]
    return strays


def _moved(value: Any, device: torch.device, depth: int = 0) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if depth < 4 and isinstance(value, list):
        return [_moved(item, device, depth + 1) for item in value]
    if depth < 4 and isinstance(value, tuple) and not hasattr(value, "_fields"):
        return tuple(_moved(item, device, depth + 1) for item in value)
    if depth < 4 and isinstance(value, dict):
        return type(value)((key, _moved(item, device, depth + 1)) for key, item in value.items())
    return value


def move_plain_tensors(module: nn.Module, device: torch.device | str) -> int:
    """Move the tensors `Module.to` skips (plain attributes, also inside lists, tuples and dicts)
    to `device`; returns how many attributes changed."""
    device = torch.device(device)
    moved = 0
    for sub in module.modules():
        for name, value in list(vars(sub).items()):
            if name in _MODULE_SLOTS or isinstance(value, nn.Module):
                continue
            if any(not _same_place(t, device) for _, t in _tensors_in(value, name)):
                setattr(sub, name, _moved(value, device))
                moved += 1
    return moved
