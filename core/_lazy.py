"""Package attributes imported on first use, so importing a package stays light (no torch)."""

from __future__ import annotations

import importlib
import sys


def load_attribute(package: str, table: dict[str, str], name: str):
    """`name` from the module `table` names for it, kept on `package` for later lookups."""
    if name not in table:
        raise AttributeError(f"module {package!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(table[name]), name)
    setattr(sys.modules[package], name, value)
    return value
