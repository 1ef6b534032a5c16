"""The English phrase lists CLIP ranks: the shipped COCO + LVIS object names, or the user's own.

Used by `suggest_prompts` (what is in this picture?) and by any-language prompts (which English
phrase does this prompt mean?). The shipped list is the 80 COCO and 1,203 LVIS v1 category names
(both CC BY 4.0), cleaned into plain noun phrases; see the header of the data file.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from functools import lru_cache
from importlib import resources
from pathlib import Path

from promptseg.errors import OptionError

DEFAULT_VOCABULARY_FILE = "lvis_coco_vocabulary.txt"


@lru_cache(maxsize=1)
def default_vocabulary() -> tuple[str, ...]:
    """The shipped vocabulary (COCO names first, then LVIS), one noun phrase per entry."""
    text = resources.files("promptseg.data").joinpath(DEFAULT_VOCABULARY_FILE).read_text(encoding="utf-8")
    return tuple(_parse_lines(text.splitlines()))


def load_vocabulary(vocabulary: str | os.PathLike | Iterable[str] | None = None) -> list[str]:
    """A cleaned, de-duplicated phrase list from None (the shipped list), a text file, or phrases.

    A file has one phrase per line; blank lines and lines starting with ``#`` are ignored.
    """
    if vocabulary is None:
        return list(default_vocabulary())
    if isinstance(vocabulary, (str, os.PathLike)) and Path(vocabulary).expanduser().is_file():
        lines = Path(vocabulary).expanduser().read_text(encoding="utf-8").splitlines()
        phrases = _parse_lines(lines)
        where = f"the file {vocabulary}"
    elif isinstance(vocabulary, str):
        raise OptionError(
            f"Vocabulary {vocabulary!r} is not a file. Pass a path to a text file (one phrase per "
            "line) or a list of phrases."
        )
    else:
        phrases = []
        for phrase in vocabulary:
            if not isinstance(phrase, str):
                raise OptionError(f"Vocabulary entries must be strings, got {type(phrase).__name__}: {phrase!r}.")
            phrases.append(phrase)
        phrases = _parse_lines(phrases, comments=False)
        where = "the vocabulary list"
    if not phrases:
        raise OptionError(f"{where.capitalize()} holds no phrases: give at least one noun phrase.")
    return phrases


def _parse_lines(lines: Iterable[str], comments: bool = True) -> list[str]:
    phrases = []
    for line in lines:
        text = " ".join(line.split())
        if text and not (comments and text.startswith("#")):
            phrases.append(text)
    return list(dict.fromkeys(phrases))
