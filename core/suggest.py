"""Split into `promptseg.clip.suggest` (suggestions) and `promptseg.clip.mapping` (text to labels
and to English); this old path still imports their names, with a DeprecationWarning."""

from promptseg._moved import warn_moved

warn_moved(__name__, "promptseg.clip.suggest and promptseg.clip.mapping")

from promptseg.clip.mapping import looks_english, map_to_labels, model_phrases  # noqa: E402
from promptseg.clip.suggest import suggest_prompts  # noqa: E402

__all__ = ["looks_english", "map_to_labels", "model_phrases", "suggest_prompts"]
