"""One loaded segmenter per (model, device, dtype, cache dir, CLIP), reused by every run in the process.

The App server and a delegated-operation worker both live for many runs; keeping the model (and
its in-memory embedding cache) loaded is what makes the second prompt over a view skip the image
encoder and the model load.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from typing import Any

logger = logging.getLogger(__name__)

MAX_LOADED = 2
"""Segmenters kept loaded at once; the least recently used one is dropped beyond this."""

_LOADED: OrderedDict[tuple, Any] = OrderedDict()
_LOCK = threading.Lock()


def get_segmenter(
    model: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    cache_dir: str | os.PathLike | None = None,
    clip: str | bool | None = None,
):
    """The process-wide `promptseg.Segmenter` for these settings, loading it on first use.

    `clip` adds a CLIP scorer (a spec for `promptseg.load_segmenter`, or True for the default);
    a segmenter with CLIP is a separate entry from the same model without it.
    """
    import promptseg

    name = model or promptseg.default_model()
    key = (str(name), str(device or "auto"), str(dtype or "auto"), None if cache_dir is None else str(cache_dir))
    if clip not in (None, False):
        key += (str(clip),)
    with _LOCK:
        if key in _LOADED:
            _LOADED.move_to_end(key)
            return _LOADED[key]
        extra = {"clip": clip} if clip not in (None, False) else {}
        segmenter = promptseg.load_segmenter(name, device=key[1], dtype=key[2], cache_dir=cache_dir, **extra)
        _LOADED[key] = segmenter
        while len(_LOADED) > MAX_LOADED:
            dropped, _ = _LOADED.popitem(last=False)
            logger.info("Unloading segmenter %s", dropped)
        return segmenter


def clear_segmenters() -> None:
    """Forget every loaded segmenter (frees their memory once no run holds them)."""
    with _LOCK:
        _LOADED.clear()


# Arguments every run sets itself, per sample; never taken from the user's options.
_SET_PER_SAMPLE = ("image", "prompts", "exemplars")


def check_segment_options(segmenter, options: dict[str, Any]) -> None:
    """Raise `OptionError` for an option `segmenter.segment` does not take or a value out of range.

    Checked once before a run, so a typo or ``threshold=2`` fails before any sample is touched.
    """
    import inspect

    from promptseg.errors import OptionError
    from promptseg.segmenter import check_options

    per_sample = [name for name in options if name in _SET_PER_SAMPLE]
    if per_sample:
        raise OptionError(
            f"{per_sample[0]!r} cannot be an option: each sample's image is its filepath, its prompts come "
            "from prompts and prompt_field, its exemplar boxes from exemplar_field."
        )
    parameters = inspect.signature(segmenter.segment).parameters
    # A wrapper that forwards everything (**kwargs) leaves the names to the segmenter it wraps.
    if not any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
        accepted = [name for name in parameters if name not in _SET_PER_SAMPLE]
        unknown = [name for name in options if name not in accepted]
        if unknown:
            raise OptionError(
                f"Unknown option {', '.join(map(repr, unknown))}: Segmenter.segment takes {', '.join(accepted)}."
            )
    ranged = inspect.signature(check_options).parameters
    check_options(**{name: value for name, value in options.items() if name in ranged})
