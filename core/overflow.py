"""fp16 overflow: detect non-finite outputs and redo that call in a precision with fp32's range.

fp16 tops out at 65504; a large activation in SAM 3's ViT or DETR layers becomes infinite and then
NaN, and NaN scores silently fail every threshold: an image would seem to hold nothing. Meta runs
SAM 3 in bf16 (fp32's range) for this reason. promptseg keeps fp16 as the CUDA default (it is
faster on most GPUs) and guards it: when an fp16 call returns a non-finite value, the call is
redone on a twin of the backend in `promptseg.device.safe_dtype` (bf16 on GPUs with native bf16,
else fp32), made on first need, with a warning. Images whose image encoder overflowed are
remembered, so later prompts on them go to the twin directly. Other precisions are not checked:
bf16 and fp32 share fp32's range.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch

from promptseg.device import dtype_name, safe_dtype

logger = logging.getLogger(__name__)

T = TypeVar("T")


def tensors_in(value: Any) -> Iterator[torch.Tensor]:
    """The tensors in a backend's output: tensors, dicts, lists, tuples and dataclasses of them."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from tensors_in(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from tensors_in(item)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for item in dataclasses.fields(value):
            yield from tensors_in(getattr(value, item.name))


def finite(value: Any) -> bool:
    """Whether every floating tensor in `value` is finite, and no backend flagged a non-finite
    value it filtered out (`Detections.finite`)."""
    if any(getattr(item, "finite", True) is False for item in (value if isinstance(value, list) else [value])):
        return False
    return all(bool(torch.isfinite(t).all()) for t in tensors_in(value) if t.is_floating_point())


class OverflowGuard:
    """Runs backend calls, redoing in a safe precision those whose fp16 outputs are not finite."""

    def __init__(self, backend: Any) -> None:
        self.backend = backend
        self.watching = backend.dtype == torch.float16
        self._safe: Any = None
        self.overflowing: set[str] = set()
        """Images (pixel hashes) whose fp16 image encoder overflowed: encoded by the twin from now on."""
        self.redone = 0
        """Calls redone in the safe precision, for tests and the hosts' logs."""

    def safe_backend(self) -> Any | None:
        """The backend's twin in the safe precision, or None when the backend cannot make one."""
        if self._safe is None:
            make = getattr(self.backend, "with_dtype", None)
            if make is None:
                return None
            self._safe = make(safe_dtype(self.backend.device))
        return self._safe

    def encoder_for(self, image_id: str) -> Any:
        """The backend that encodes this image: the twin for images known to overflow in fp16."""
        if image_id in self.overflowing and self.safe_backend() is not None:
            return self._safe
        return self.backend

    def for_features(self, features: dict[str, torch.Tensor]) -> Any:
        """The backend whose precision `features` are in (the twin's for an overflowing image)."""
        first = next(iter(features.values()), None)
        if self._safe is not None and first is not None and first.dtype == self._safe.dtype != self.backend.dtype:
            return self._safe
        return self.backend

    def encode(self, rgb, image_id: str) -> dict[str, torch.Tensor]:
        """The image encoder's output for `rgb`, from the twin when fp16 overflows."""
        backend = self.encoder_for(image_id)
        features = backend.encode_image(backend.preprocess(rgb))
        if backend is self.backend and self._overflowed(features, "the image encoder"):
            self.overflowing.add(image_id)
            backend = self._safe
            features = backend.encode_image(backend.preprocess(rgb))
        return features

    def run(self, what: str, features: dict[str, torch.Tensor], call: Callable[[Any], T]) -> T:
        """`call(backend)` on the backend matching `features`; redone on the twin when fp16 overflows."""
        backend = self.for_features(features)
        result = call(backend)
        if backend is self.backend and self._overflowed(result, what):
            return call(self._safe)
        return result

    def _overflowed(self, output: Any, what: str) -> bool:
        """Whether fp16 `output` is not finite and a twin is there to redo it (warns once per call)."""
        if not self.watching or finite(output):
            return False
        safe = self.safe_backend()
        if safe is None:
            logger.warning("fp16 overflowed in %s (non-finite values) and %s cannot change precision: load "
                           "the model with dtype='bf16' or 'fp32'.", what, self.backend.name)
            return False
        self.redone += 1
        logger.warning("fp16 overflowed in %s (non-finite values): redoing it in %s. If this happens often, "
                       "load the model with dtype='%s'.", what, dtype_name(safe.dtype), dtype_name(safe.dtype))
        return True

    def release(self) -> None:
        """Drop the twin (its weights) and what it knows of overflowing images."""
        self._safe = None
        self.overflowing.clear()
