"""What ``/setup`` told the backend about each project, kept in a folder that every worker reads.

Label Studio sends a project's extra params, host and token only with ``/setup``; with several
worker processes, ``/predict`` may reach a worker that did not get that call. Each ``/setup`` is
written here (one JSON file per project, replaced atomically, readable only by its owner as it
may hold a token), and a worker reloads a project whose file changed since it last looked.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from urllib.parse import quote

logger = logging.getLogger(__name__)

SETTINGS_DIR_VARIABLE = "PROMPTSEG_PROJECTS_DIR"


class SharedProjectSettings:
    """``/setup`` inputs per project key, as JSON files in `folder`."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)

    def _path(self, key: str) -> Path:
        """The project's file: the key (from the request) quoted, so no key names a path outside `folder`."""
        return self.folder / f"project-{quote(key or 'default', safe='')}.json"

    def write(self, key: str, inputs: dict) -> tuple[int, int]:
        """Store `inputs` for project `key`; returns the file's version for `read_if_changed`."""
        handle, name = tempfile.mkstemp(dir=self.folder, prefix=".project-", suffix=".json")  # mode 0600
        with os.fdopen(handle, "w") as out:
            json.dump(inputs, out)
        path = self._path(key)
        os.replace(name, path)
        return version(path.stat())

    def read_if_changed(self, key: str, seen: tuple[int, int] | None) -> tuple[tuple[int, int], dict] | None:
        """(version, inputs) of project `key` if its file changed since version `seen`, else None."""
        path = self._path(key)
        try:
            changed = version(path.stat())
            if changed == seen:
                return None
            return changed, json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            logger.warning("Cannot read the shared settings of project %s (%s): using this worker's own", key, exc)
            return None


def version(stat: os.stat_result) -> tuple[int, int]:
    """A file's version: each write makes a new file (new inode), and clocks are coarse, so both count."""
    return stat.st_ino, stat.st_mtime_ns


def share_between_workers(workers: int) -> None:
    """Before forking `workers` processes: a shared settings folder for them, unless one is set.

    The folder is made here, in the parent, named in the environment the workers inherit, and
    removed when the parent exits.
    """
    if workers < 2 or os.environ.get(SETTINGS_DIR_VARIABLE):
        return
    folder = tempfile.mkdtemp(prefix="promptseg-projects-")
    os.environ[SETTINGS_DIR_VARIABLE] = folder
    parent = os.getpid()
    atexit.register(lambda: os.getpid() == parent and shutil.rmtree(folder, ignore_errors=True))
