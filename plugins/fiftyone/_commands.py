"""`promptseg fiftyone ...` sub-commands (registered through the promptseg_add_commands hook).

FiftyOne is imported only inside the command functions, never when this module is imported.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from promptseg.hookspecs import hookimpl

PLUGIN_NAME = "@promptseg/fiftyone"
INSTALL_NAME = "promptseg-fiftyone"
PLUGIN_DIR = Path(__file__).resolve().parent


@hookimpl
def promptseg_add_commands(subparsers) -> None:
    parser = subparsers.add_parser(
        "fiftyone", help="FiftyOne integration (operator and model)",
        description="Manage the @promptseg/fiftyone plugin.",
    )
    sub = parser.add_subparsers(dest="fiftyone_command", metavar="COMMAND")
    install = sub.add_parser(
        "install", help="put the @promptseg/fiftyone plugin where FiftyOne finds it",
        description="Link (or copy) the plugin into FiftyOne's plugins directory: --dir, else "
        "FIFTYONE_PLUGINS_DIR, else fiftyone's configured plugins_dir (~/fiftyone/__plugins__).",
    )
    install.add_argument("--dir", type=Path, default=None, help="plugins directory to install into")
    install.add_argument("--copy", action="store_true", help="copy the files instead of linking to this install")
    install.add_argument("--force", action="store_true", help="replace an existing, different install")
    install.set_defaults(func=run_install)
    parser.set_defaults(func=lambda args: _help(parser))


def _help(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def plugins_dir(explicit: Path | None = None) -> Path:
    """Where FiftyOne looks for plugins: `explicit`, FIFTYONE_PLUGINS_DIR, else fiftyone's config."""
    if explicit is not None:
        return explicit
    if os.environ.get("FIFTYONE_PLUGINS_DIR"):
        return Path(os.environ["FIFTYONE_PLUGINS_DIR"])
    import fiftyone as fo

    return Path(fo.config.plugins_dir)


def install_plugin(directory: Path | None = None, copy: bool = False, force: bool = False) -> Path:
    """Link (or copy) this plugin into `directory` as ``promptseg-fiftyone``; return the path."""
    root = plugins_dir(directory).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    target = root / INSTALL_NAME
    if target.is_symlink() and target.resolve() == PLUGIN_DIR and not copy:
        return target
    if target.exists() or target.is_symlink():
        if not force:
            raise FileExistsError(
                f"{target} already exists and is not a link to {PLUGIN_DIR}: pass --force to replace it."
            )
        if target.is_symlink() or target.is_file():
            target.unlink()
        else:
            shutil.rmtree(target)
    if copy:
        shutil.copytree(PLUGIN_DIR, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    else:
        target.symlink_to(PLUGIN_DIR, target_is_directory=True)
    return target


def run_install(args: argparse.Namespace) -> int:
    try:
        target = install_plugin(args.dir, copy=args.copy, force=args.force)
    except (FileExistsError, OSError) as exc:
        print(f"promptseg: error: {exc}", file=sys.stderr)
        return 2
    print(f"Installed {PLUGIN_NAME} at {target}")
    root = target.parent.resolve()
    found = _fiftyone_plugins_dir()
    if found is not None and Path(found).expanduser().resolve() != root:
        print(
            f"Note: FiftyOne looks in {found}; set FIFTYONE_PLUGINS_DIR={root} "
            "(or plugins_dir in ~/.fiftyone/config.json) so it finds this plugin.",
            file=sys.stderr,
        )
    return 0


def _fiftyone_plugins_dir() -> str | None:
    try:
        import fiftyone as fo
    except ImportError:
        print("Note: fiftyone is not installed here: pip install 'promptseg[fiftyone]'", file=sys.stderr)
        return None
    return fo.config.plugins_dir
