"""Text to text through CLIP's text tower: prompts in any language, free text to a label set.

* `model_phrases`: with a multilingual CLIP, map each non-English prompt to the nearest English
  phrase of the vocabulary plus the call's English prompts, because SAM 3 reads English only;
  with a monolingual CLIP, warn instead. Runs before SAM 3 (see `promptseg.clip.verify.prompt_phrases`).
* `map_to_labels`: map free text to the nearest entry of a fixed label set (hosts' schemas).
"""

from __future__ import annotations

import difflib
import logging
import unicodedata
import warnings
from collections.abc import Sequence
from typing import Any

from promptseg.clip.vocabulary import load_vocabulary
from promptseg.errors import OptionError, PromptError

logger = logging.getLogger(__name__)


def map_to_labels(text: str | Sequence[str], labels: Sequence[str], clip: Any = None) -> str | list[str]:
    """The entry of `labels` nearest to `text` (or to each text of a list).

    An exact match (ignoring case, spacing, ``_``/``-``) wins outright. Otherwise, with `clip`
    (a `ClipScorer`, or a `Segmenter` loaded with one) the nearest label by CLIP text embedding;
    without it, the closest spelling (difflib), which only catches typos and plurals.
    """
    label_list = [label for label in labels] if labels is not None else []
    if not label_list or not all(isinstance(label, str) and label.strip() for label in label_list):
        raise OptionError("labels must be a non-empty list of non-empty strings, e.g. ['cat', 'dog'].")
    single = isinstance(text, str)
    texts = [text] if single else list(text)
    if not all(isinstance(t, str) and t.strip() for t in texts):
        raise PromptError("map_to_labels needs non-empty text, e.g. 'a small kitten'.")
    scorer = getattr(clip, "clip", clip)
    normal = {_normal(label): label for label in label_list}
    mapped: list[str | None] = [normal.get(_normal(t)) for t in texts]
    todo = [i for i, m in enumerate(mapped) if m is None]
    if todo and scorer is not None:
        queries = scorer.text_embeddings([texts[i] for i in todo], templates=None)
        targets = scorer.text_embeddings(label_list, templates=None)
        best = (queries @ targets.T).argmax(dim=-1)
        for i, j in zip(todo, best):
            mapped[i] = label_list[int(j)]
    elif todo:
        keys = list(normal)
        for i in todo:
            scores = [difflib.SequenceMatcher(None, _normal(texts[i]), key).ratio() for key in keys]
            mapped[i] = normal[keys[max(range(len(keys)), key=scores.__getitem__)]]
    return mapped[0] if single else mapped


def _normal(text: str) -> str:
    return " ".join(text.replace("_", " ").replace("-", " ").lower().split())


def looks_english(text: str) -> bool:
    """False when `text` has letters outside the Latin script (Chinese, Cyrillic, Arabic, ...).

    Prompts in other Latin-script languages (Spanish, German, ...) cannot be told from English
    without a language model and pass as English; the docs say so.
    """
    for char in text:
        if char.isalpha() and not unicodedata.name(char, "LATIN").startswith("LATIN"):
            return False
    return True


def model_phrases(scorer, prompts: Sequence[str]) -> dict[str, str]:
    """The phrase SAM 3 should receive for each non-English prompt (English ones are left out).

    With a multilingual CLIP, the nearest English phrase of ``scorer.vocabulary`` (default: the
    shipped list) plus the call's English prompts; with a monolingual CLIP, a warning and no
    mapping.
    """
    foreign = [p for p in prompts if not looks_english(p)]
    if not foreign:
        return {}
    if not scorer.multilingual:
        message = (
            f"Prompt(s) {', '.join(map(repr, foreign))} are not English. SAM 3 reads English noun "
            f"phrases only and the CLIP model {scorer.model_name} is monolingual, so they are passed "
            "unchanged and will likely find nothing. Translate them, or load a multilingual CLIP "
            "(e.g. clip='xlm-roberta-base-ViT-B-32/laion5b_s13b_b90k') to map them automatically."
        )
        warnings.warn(message, UserWarning, stacklevel=3)
        logger.warning(message)
        return {}
    candidates = list(dict.fromkeys(list(load_vocabulary(scorer.vocabulary)) + [p for p in prompts if looks_english(p)]))
    targets = scorer.vocabulary_embeddings(candidates, None)
    queries = scorer.text_embeddings(foreign, templates=None)
    best = (queries @ targets.T).argmax(dim=-1)
    mapping = {prompt: candidates[int(j)] for prompt, j in zip(foreign, best)}
    for prompt, phrase in mapping.items():
        logger.info("Prompt %r is read as %r (nearest English phrase for CLIP %s)", prompt, phrase, scorer.model_name)
    return mapping
