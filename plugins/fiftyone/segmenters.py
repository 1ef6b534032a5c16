"""Deprecated: the FiftyOne adapter's segmenters come from `promptseg.sessions`, shared with napari
and Label Studio in the same process (`shared_segmenter`, `clear_shared_segmenters`)."""

from __future__ import annotations

import os
import warnings
from typing import Any


def get_segmenter(
    model: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    cache_dir: str | os.PathLike | None = None,
    clip: str | bool | None = None,
):
    """Deprecated alias of `promptseg.sessions.shared_segmenter`."""
    from promptseg.sessions import shared_segmenter

    _warn("get_segmenter", "promptseg.sessions.shared_segmenter")
    extra = {"clip": clip} if clip not in (None, False) else {}
    return shared_segmenter(model, device=device, dtype=dtype, cache_dir=cache_dir, **extra)


def clear_segmenters() -> None:
    """Deprecated alias of `promptseg.sessions.clear_shared_segmenters`."""
    from promptseg.sessions import clear_shared_segmenters

    _warn("clear_segmenters", "promptseg.sessions.clear_shared_segmenters")
    clear_shared_segmenters()


def check_segment_options(segmenter, options: dict[str, Any]):
    """Deprecated: moved to `promptseg_fiftyone.runner.check_segment_options`."""
    from promptseg_fiftyone.runner import check_segment_options as check

    _warn("check_segment_options", "promptseg_fiftyone.runner.check_segment_options")
    return check(segmenter, options)


def _warn(name: str, replacement: str) -> None:
    warnings.warn(f"promptseg_fiftyone.segmenters.{name} is deprecated: use {replacement}.",
                  DeprecationWarning, stacklevel=3)
