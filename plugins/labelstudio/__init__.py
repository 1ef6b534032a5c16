"""promptseg as a Label Studio ML backend: pre-annotation from label names and typed prompts.

    promptseg labelstudio serve --host 0.0.0.0 --port 9090

or, the way `label-studio-ml start` users are used to, ``waitress-serve --port 9090
promptseg_labelstudio._wsgi:app``. `create_app` builds the Flask app around one
`PromptsegMLBackend`; settings come from `BackendConfig.from_env()`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

_LAZY = {
    "create_app": "promptseg_labelstudio.app",
    "PromptsegMLBackend": "promptseg_labelstudio.model",
    "BackendConfig": "promptseg_labelstudio.config",
}
_DEPRECATED = {"PromptsegModel": "promptseg_labelstudio.model"}  # the module warns on each access

if TYPE_CHECKING:
    from promptseg_labelstudio.app import create_app
    from promptseg_labelstudio.config import BackendConfig
    from promptseg_labelstudio.model import PromptsegMLBackend


def __getattr__(name: str):
    if name in _LAZY or name in _DEPRECATED:
        import importlib

        value = getattr(importlib.import_module(_LAZY.get(name) or _DEPRECATED[name]), name)
        if name in _LAZY:
            globals()[name] = value
        return value
    raise AttributeError(f"module 'promptseg_labelstudio' has no attribute {name!r}")


__all__ = ["BackendConfig", "PromptsegMLBackend", "create_app"]
