"""Everything CLIP: the scorer, its OpenCLIP backend, prompt mapping, re-scoring, suggestions.

In the order a `segment` call meets them:

* `mapping`: prompts in other languages -> English phrases, before SAM 3 runs
  (and `map_to_labels`: free text -> the nearest entry of a label set);
* `verify`: re-scoring SAM 3's post-processed instances (verification, negative prompts,
  exclusive label sets);
* `scorer`: `load_clip` and `ClipScorer`, the cached embeddings of texts, images and masked crops
  the two steps above compare;
* `openclip`: the built-in scorer backend (plugin ``openclip``);
* `suggest` with `vocabulary`: the phrases most likely in a whole image.

Importing this package is light: torch loads with the first name taken from `scorer`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from promptseg._lazy import load_attribute

_SCORER = "promptseg.clip.scorer"
_LAZY = {
    name: _SCORER
    for name in (
        "CROP_BATCH", "CROP_MARGIN", "OBJECT_TEMPLATES", "VOCABULARY_TEMPLATES", "ClipScorer", "ClipStats",
        "load_clip", "masked_crop", "square_pad",
    )
}

if TYPE_CHECKING:
    from promptseg.clip.scorer import (
        CROP_BATCH,
        CROP_MARGIN,
        OBJECT_TEMPLATES,
        VOCABULARY_TEMPLATES,
        ClipScorer,
        ClipStats,
        load_clip,
        masked_crop,
        square_pad,
    )


def __getattr__(name: str):
    return load_attribute(__name__, _LAZY, name)


__all__ = ["ClipScorer", "load_clip", "masked_crop", "OBJECT_TEMPLATES"]
