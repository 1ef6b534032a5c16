"""Prompt suggestions: rank a vocabulary by CLIP image-text similarity for one whole image.

Needs only the CLIP scorer, not SAM 3. The image's embedding and the vocabulary's embeddings go
to the disk cache, so a second call on the same image costs no model run.
"""

from __future__ import annotations

from typing import Any

import torch

from promptseg.clip.vocabulary import load_vocabulary
from promptseg.errors import OptionError


def suggest_prompts(scorer, rgb, vocabulary: Any = None, k: int = 10) -> list[tuple[str, float]]:
    """The `k` vocabulary phrases CLIP finds most likely in `rgb`, as ``(phrase, probability)``.

    Probabilities are a softmax over the whole vocabulary (they sum to 1 over it), so with the
    shipped 1,214 phrases even a clear match may score well below 1.
    """
    from promptseg.clip.scorer import VOCABULARY_TEMPLATES

    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise OptionError(f"k must be a whole number >= 1, got {k!r}.")
    phrases = load_vocabulary(vocabulary)
    image = scorer.image_embeddings([rgb], disk=True)
    texts = scorer.vocabulary_embeddings(phrases, VOCABULARY_TEMPLATES)
    probs = torch.softmax(scorer.logit_scale * image @ texts.T, dim=-1)[0]
    top = torch.topk(probs, min(k, len(phrases)))
    return [(phrases[int(i)], float(p)) for p, i in zip(top.values, top.indices)]
