"""The plugin manager and the registry of backends the hooks fill.

Built-in backends are plugins like any other, registered the way pytest registers its own: the
modules named in `BUILTIN_PLUGINS` (imported by name, so this module imports none of them)
first, then every module of the ``promptseg`` entry-point group that installed packages declare.
Both implement the same hooks (`promptseg.hookspecs`). Nothing heavy is imported here; a
backend's `load` imports its own dependencies.
"""

from __future__ import annotations

import importlib
import logging
from functools import lru_cache

import pluggy

from promptseg import hookspecs
from promptseg.backends.protocol import BackendSpec
from promptseg.errors import OptionError

logger = logging.getLogger(__name__)

BUILTIN_PLUGINS = (
    ("sam3", "promptseg.backends.sam3_hf"),
    ("sam3-meta", "promptseg.backends.meta"),
    ("openclip", "promptseg.clip.openclip"),
)
"""``(plugin name, module)`` of every plugin that ships with promptseg. An entry point of the
same name cannot replace one (the built-in is registered first); block it by name instead."""


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


def new_plugin_manager() -> pluggy.PluginManager:
    """A plugin manager with the built-in plugins, then every ``promptseg`` entry point, registered."""
    manager = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    manager.add_hookspecs(hookspecs)
    for name, module in BUILTIN_PLUGINS:
        manager.register(importlib.import_module(module), name=name)
    manager.load_setuptools_entrypoints(hookspecs.PROJECT_NAME)
    return manager


@lru_cache(maxsize=1)
def plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager (see `new_plugin_manager`)."""
    return new_plugin_manager()


@lru_cache(maxsize=1)
def registry() -> BackendRegistry:
    """All registered backends (filled once)."""
    reg = BackendRegistry()
    plugin_manager().hook.promptseg_register_backends(registry=reg)
    return reg


__all__ = ["BUILTIN_PLUGINS", "BackendRegistry", "BackendSpec", "new_plugin_manager", "plugin_manager", "registry"]
