"""Old import paths of modules that moved: each still imports, with a `DeprecationWarning`.

A shim module at the old path calls `redirect` (the old name becomes the new module itself, so
every name, private ones included, is the same object) or, when a module was split in two,
`warn_moved` and re-exports the names it held.
"""

from __future__ import annotations

import importlib
import sys
import warnings


def warn_moved(old: str, new: str, stacklevel: int = 3) -> None:
    """Warn the importer of `old` (the shim's caller, import machinery skipped) that it moved to `new`."""
    warnings.warn(
        f"{old} has moved to {new}: import from there ({old} will be removed in a later release).",
        DeprecationWarning,
        stacklevel=stacklevel,
    )


def redirect(old: str, new: str) -> None:
    """Make the module being imported as `old` be the module `new`, with a warning."""
    warn_moved(old, new, stacklevel=4)
    sys.modules[old] = importlib.import_module(new)
