"""Moved to `promptseg.clip.verify`; this old path still imports it, with a DeprecationWarning."""

from promptseg._moved import redirect

redirect(__name__, "promptseg.clip.verify")
