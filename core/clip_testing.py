"""Moved to `promptseg.testing.clip`; this old path still imports it, with a DeprecationWarning."""

from promptseg._moved import redirect

redirect(__name__, "promptseg.testing.clip")
