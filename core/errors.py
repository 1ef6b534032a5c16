"""The exceptions promptseg raises: each names the cause and what to do about it.

Hosts catch :class:`PromptsegError` to show a message instead of a traceback; the subclasses let
them tell a per-image problem (skip the image, go on) from a setup problem (stop the run).
"""

from __future__ import annotations


class PromptsegError(Exception):
    """Base class of every error promptseg raises on purpose."""


class ModelLoadError(PromptsegError):
    """The model could not be found, fetched or loaded; the message says how to fix it."""


class ImageError(PromptsegError):
    """One image could not be read or is not usable (missing, corrupt, empty, wrong dtype)."""


class PromptError(PromptsegError):
    """A text prompt is empty or not a string."""


class OptionError(PromptsegError, ValueError):
    """An option has a value outside its allowed range or set."""


class CancelledError(PromptsegError):
    """A long call was stopped by its cancel check."""
