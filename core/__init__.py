"""promptseg: type what you want segmented, get every instance of it as a mask.

    import promptseg
    seg = promptseg.load_segmenter()            # facebook/sam3, or PROMPTSEG_MODEL
    result = seg.segment("street.jpg", ["red car", "bicycle"])
    for inst in result:
        print(inst.label, inst.score, inst.box)

Heavy dependencies (torch, transformers, open_clip) load on first use, so importing this package
and running ``promptseg --help`` stay fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from promptseg._lazy import load_attribute as _load_attribute
from promptseg.errors import (
    CancelledError,
    ImageError,
    ModelLoadError,
    OptionError,
    PromptError,
    PromptsegError,
)
from promptseg.hookspecs import hookimpl

__version__ = "0.1.0"

_LAZY = {
    "load_segmenter": "promptseg.segmenter",
    "Segmenter": "promptseg.segmenter",
    "SegmentOptions": "promptseg.options",
    "default_model": "promptseg.segmenter",
    "DEFAULT_MODEL": "promptseg.segmenter",
    "Instance": "promptseg.results",
    "SegmentationResult": "promptseg.results",
    "load_image": "promptseg.images",
    "load_clip": "promptseg.clip.scorer",
    "map_to_labels": "promptseg.clip.mapping",
}

if TYPE_CHECKING:
    from promptseg.clip.mapping import map_to_labels
    from promptseg.clip.scorer import load_clip
    from promptseg.images import load_image
    from promptseg.results import Instance, SegmentationResult
    from promptseg.options import SegmentOptions
    from promptseg.segmenter import DEFAULT_MODEL, Segmenter, default_model, load_segmenter


def __getattr__(name: str):
    return _load_attribute(__name__, _LAZY, name)


__all__ = [
    "CancelledError",
    "DEFAULT_MODEL",
    "ImageError",
    "Instance",
    "ModelLoadError",
    "OptionError",
    "PromptError",
    "PromptsegError",
    "SegmentOptions",
    "SegmentationResult",
    "Segmenter",
    "default_model",
    "hookimpl",
    "load_clip",
    "load_image",
    "load_segmenter",
    "map_to_labels",
]
