"""The plugin manager and the registry of backends the hooks fill.

Built-in backends register exactly as third-party ones do: through the entry-point group
``promptseg``. Nothing heavy is imported here; a backend's `load` imports its own dependencies.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import pluggy

from promptseg import hookspecs
from promptseg.errors import OptionError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BackendSpec:
    """How to recognise and load one backend.

    `load(model, device, dtype, **options)` returns a backend object; `accepts(model)` says
    whether a model string (hub id, directory, file) is meant for this backend, so
    ``load_segmenter(model=...)`` can pick the backend without being told. Higher `priority`
    is asked first.
    """

    name: str
    load: Callable[..., Any]
    accepts: Callable[[str], bool] = lambda model: False
    priority: int = 0
    description: str = ""
    requires: tuple[str, ...] = field(default_factory=tuple)


class BackendRegistry:
    """What the ``promptseg_register_backends`` hook fills: segmenters and scorers by name."""

    def __init__(self) -> None:
        self.segmenters: dict[str, BackendSpec] = {}
        self.scorers: dict[str, BackendSpec] = {}

    def add_segmenter(self, spec: BackendSpec) -> None:
        self._add(self.segmenters, spec)

    def add_scorer(self, spec: BackendSpec) -> None:
        self._add(self.scorers, spec)

    @staticmethod
    def _add(table: dict[str, BackendSpec], spec: BackendSpec) -> None:
        if spec.name in table:
            logger.warning("Backend %r is registered twice; the later one wins.", spec.name)
        table[spec.name] = spec

    def segmenter_for(self, model: str, backend: str | None = None) -> BackendSpec:
        return self._pick(self.segmenters, model, backend, "segmentation")

    def scorer_for(self, model: str, backend: str | None = None) -> BackendSpec:
        return self._pick(self.scorers, model, backend, "scorer")

    @staticmethod
    def _pick(table: dict[str, BackendSpec], model: str, name: str | None, kind: str) -> BackendSpec:
        if name is not None:
            if name not in table:
                known = ", ".join(sorted(table)) or "none"
                raise OptionError(
                    f"Unknown {kind} backend {name!r}; installed: {known}. "
                    "A backend package registers itself through the 'promptseg' entry-point group."
                )
            return table[name]
        for spec in sorted(table.values(), key=lambda s: -s.priority):
            if spec.accepts(model):
                return spec
        if not table:
            raise OptionError(f"No {kind} backend is installed: reinstall promptseg.")
        return max(table.values(), key=lambda s: s.priority)


@lru_cache(maxsize=1)
def plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager, with every ``promptseg`` entry point loaded."""
    manager = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    manager.add_hookspecs(hookspecs)
    manager.load_setuptools_entrypoints(hookspecs.PROJECT_NAME)
    if not manager.has_plugin("sam3"):  # running from a source tree without installed metadata
        from promptseg.backends import sam3_hf

        manager.register(sam3_hf, name="sam3")
    if not manager.has_plugin("sam3-meta"):  # Meta's package; its `load` says how to install it
        from promptseg.backends import meta

        manager.register(meta, name="sam3-meta")
    if not manager.has_plugin("openclip"):  # likewise for the built-in CLIP scorer
        from promptseg.clip import openclip

        manager.register(openclip, name="openclip")
    return manager


@lru_cache(maxsize=1)
def registry() -> BackendRegistry:
    """All registered backends (filled once)."""
    reg = BackendRegistry()
    plugin_manager().hook.promptseg_register_backends(registry=reg)
    return reg
