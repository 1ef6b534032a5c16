"""The plugin manager and the registry of backends the hooks fill.

Built-in backends are plugins like any other, registered the way pytest registers its own: the
modules named in `BUILTIN_PLUGINS` (imported by name, so this module imports none of them)
first, then every module of the ``promptseg`` entry-point group that installed packages declare.
Both implement the same hooks (`promptseg.hookspecs`). Nothing heavy is imported here; a
backend's `load` imports its own dependencies.
"""

from __future__ import annotations

import importlib
import inspect
import logging
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import pluggy

from promptseg import hookspecs
from promptseg.backends.protocol import BackendSpec
from promptseg.errors import OptionError

if TYPE_CHECKING:  # torch loads with a model, not with the registry
    import torch

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


def load_backend(
    kind: str, model: str, device: Any = "auto", dtype: Any = "auto", name: str | None = None,
    options: dict[str, Any] | None = None,
) -> tuple[Any, torch.device, torch.dtype]:
    """The load steps `load_segmenter` and `load_clip` share: resolve device and dtype, pick the
    registered backend of `kind` (``"segmentation"`` or ``"scorer"``) for `model` (or the one
    called `name`), check `options` against its loader, and load. Returns the loaded backend with
    the device and dtype it was given."""
    from promptseg.device import dtype_name, resolve_device, resolve_dtype

    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    if kind == "segmentation":
        spec = registry().segmenter_for(model, name)
    elif kind == "scorer":
        spec = registry().scorer_for(model, name)
    else:
        raise ValueError(f"kind must be 'segmentation' or 'scorer', got {kind!r}")
    options = options or {}
    check_loader_options(spec, options, "load_segmenter" if kind == "segmentation" else "load_clip")
    logger.info("Loading %s model %s with backend %s on %s (%s)", kind, model, spec.name, torch_device,
                dtype_name(torch_dtype))
    return spec.load(model, device=torch_device, dtype=torch_dtype, **options), torch_device, torch_dtype


def check_loader_options(spec: BackendSpec, options: dict[str, Any], caller: str) -> None:
    """Raise `OptionError` for a keyword the backend's loader does not take (`caller` takes its own)."""
    parameters = inspect.signature(spec.load).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return
    accepted = sorted(set(parameters) - {"model", "device", "dtype"})
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise OptionError(
            f"Unknown option(s) {', '.join(map(repr, unknown))} for the {spec.name} backend: besides "
            f"{caller}'s own options it takes {', '.join(accepted) or 'nothing'}. Check the spelling."
        )


__all__ = [
    "BUILTIN_PLUGINS", "BackendRegistry", "BackendSpec", "check_loader_options", "load_backend",
    "new_plugin_manager", "plugin_manager", "registry",
]
