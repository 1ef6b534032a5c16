"""Moved to `promptseg.backends.meta`; this old path still imports it, with a DeprecationWarning."""

from promptseg._moved import redirect

redirect(__name__, "promptseg.backends.meta")
