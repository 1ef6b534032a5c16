"""A throwaway FiftyOne database for tests and benchmarks (never the user's own).

FiftyOne reads its configuration when first imported, so call `use_temporary_database` before
``import fiftyone``. At exit the bundled mongod is stopped first and then its files are removed.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)


def use_temporary_database(prefix: str = "promptseg-fiftyone-") -> Path:
    """Point FiftyOne's database, plugins and dataset dirs at a new temp dir; return the dir."""
    if "fiftyone" in sys.modules:
        raise RuntimeError("fiftyone is already imported: its database location can no longer be changed")
    root = Path(tempfile.mkdtemp(prefix=prefix))
    os.environ.pop("FIFTYONE_DATABASE_URI", None)
    os.environ.update(
        FIFTYONE_DATABASE_DIR=str(root / "db"),
        FIFTYONE_PLUGINS_DIR=str(root / "plugins"),
        FIFTYONE_DEFAULT_DATASET_DIR=str(root / "datasets"),
        FIFTYONE_DO_NOT_TRACK="true",
        FIFTYONE_DATABASE_VALIDATION="false",
        FIFTYONE_SHOW_PROGRESS_BARS="false",
    )
    # Registered before fiftyone's own exit hooks, so it runs after them.
    atexit.register(_stop_and_remove, root)
    return root


def _stop_and_remove(root: Path) -> None:
    database = sys.modules.get("fiftyone.core.odm.database")
    service = getattr(database, "_db_service", None)
    if service is not None:
        try:
            service.stop()  # closes the watchdog's stdin; it stops mongod and waits for it
        except Exception:  # noqa: BLE001 - best effort at interpreter exit
            logger.debug("Could not stop the temporary FiftyOne database", exc_info=True)
    shutil.rmtree(root, ignore_errors=True)
