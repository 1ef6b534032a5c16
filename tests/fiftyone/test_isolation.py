"""The FiftyOne database of tests and benchmarks is their own: a user's running service is never joined.

FiftyOne shares one database service per user: a FiftyOne process that names no database finds
the service another FiftyOne process of the same user started (by scanning the user's processes)
and joins it, whatever FIFTYONE_DATABASE_DIR says. Here a "user" service is started first, the
way FiftyOne starts its shared one, with a dataset in it; then `use_temporary_database` runs in
another process and must neither see nor change it. HOME points at a temporary directory, so the
"user" and everything under ``~/.fiftyone`` are fake.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from importlib.util import find_spec
from pathlib import Path
from urllib.parse import urlsplit

import psutil
import pymongo
import pytest

pytestmark = pytest.mark.slow

USER_DATASET = "users-real-data"
SHARED_SERVICE_ARGS = ["--51-service", "db", "--multi"]  # how FiftyOne marks (and finds) the shared service

ISOLATED_RUN = """
import json, os
import psutil
from promptseg_fiftyone.testing import use_temporary_database

root = use_temporary_database("promptseg-isolation-")
import fiftyone as fo
import fiftyone.core.odm.database as fod

seen = fo.list_datasets()
written = fo.Dataset("written-by-tests", persistent=True)
written.add_sample(fo.Sample(filepath=os.path.join(str(root), "image.png")))
server_pid = fod.get_db_conn().client.admin.command("serverStatus")["pid"]
print("RESULT " + json.dumps({
    "seen": seen,
    "after": fo.list_datasets(),
    "uri": fo.config.database_uri,
    "server_pid": server_pid,
    "server_parent": psutil.Process(server_pid).ppid(),
    "pid": os.getpid(),
    "joined_shared_service": fod._db_service is not None,
    "root": str(root),
}))
"""

USER_WRITES = """
import fiftyone as fo
dataset = fo.Dataset("%s", persistent=True)
dataset.add_sample(fo.Sample(filepath="/home/user/photos/cat.png"))
""" % USER_DATASET


def user_env(home: Path, **extra: str) -> dict[str, str]:
    """A fresh login of the fake user: no FiftyOne settings inherited from this test process."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FIFTYONE_")}
    return {**env, "HOME": str(home), "FIFTYONE_DO_NOT_TRACK": "true", **extra}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_mongod(port: int, process: psutil.Process, timeout: float = 60.0) -> pymongo.MongoClient:
    """A client of the mongod on `port` once it answers; fails if `process` exits or time runs out."""
    client = pymongo.MongoClient(f"mongodb://127.0.0.1:{port}", serverSelectionTimeoutMS=500)
    deadline = time.monotonic() + timeout
    while True:
        try:
            client.admin.command("ping")
            return client
        except pymongo.errors.PyMongoError:
            if not process.is_running() or time.monotonic() > deadline:
                client.close()
                raise AssertionError(f"the user's mongod on port {port} did not start") from None
            time.sleep(0.2)


def stop_by_pid(processes: list[psutil.Process]) -> None:
    """Terminate, then kill, each process still running; wait for all of them."""
    for process in processes:
        try:
            process.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(processes, timeout=30)
    for process in alive:
        process.kill()
    psutil.wait_procs(alive, timeout=30)


def snapshot(client: pymongo.MongoClient) -> dict[str, dict[str, int]]:
    """Every user collection of the server with its document count (server-internal databases left out)."""
    return {
        name: {coll: client[name][coll].count_documents({}) for coll in sorted(client[name].list_collection_names())}
        for name in client.list_database_names()
        if name not in ("admin", "config", "local")
    }


@pytest.fixture(scope="module")
def user_service(tmp_path_factory):
    """A running per-user FiftyOne database service, started as FiftyOne starts it, holding USER_DATASET."""
    home = tmp_path_factory.mktemp("user") / "home"
    dbpath = home / ".fiftyone" / "var" / "lib" / "mongo"
    dbpath.mkdir(parents=True)
    package = Path(find_spec("fiftyone").submodule_search_locations[0])
    port = free_port()
    mongod = [str(package / "db" / "bin" / "mongod"), "--dbpath", str(dbpath), "--logpath", str(dbpath / "mongo.log"),
              "--port", str(port), "--bind_ip", "127.0.0.1", "--nounixsocket"]
    wrapper = psutil.Popen(
        [sys.executable, str(package / "service" / "main.py"), *SHARED_SERVICE_ARGS, *mongod],
        stdin=subprocess.PIPE, env=user_env(home, FIFTYONE_DISABLE_SERVICES="1"),
    )
    started = [wrapper]
    client = None
    try:
        client = wait_for_mongod(port, wrapper)
        started += wrapper.children(recursive=True)
        subprocess.run([sys.executable, "-c", USER_WRITES], check=True, timeout=300,
                       env=user_env(home, FIFTYONE_DATABASE_URI=f"mongodb://127.0.0.1:{port}"))
        yield {"home": home, "port": port, "client": client, "wrapper": wrapper, "mongod": started[1:]}
    finally:
        if client is not None:
            client.close()
        wrapper.stdin.close()  # FiftyOne's own way to stop it; then by PID whatever is left
        stop_by_pid(started)


def assert_isolated_from(user_service, env: dict[str, str]) -> None:
    """Run the test setup in a process with `env`: it must neither see nor change the user's database."""
    client, port = user_service["client"], user_service["port"]
    before = snapshot(client)
    assert [d["name"] for d in client.fiftyone.datasets.find()] == [USER_DATASET]

    run = subprocess.run([sys.executable, "-c", ISOLATED_RUN], capture_output=True, text=True, timeout=300, env=env)
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    assert run.returncode == 0 and lines, run.stderr[-3000:]
    result = json.loads(lines[-1][len("RESULT "):])
    try:
        assert result["seen"] == [] and USER_DATASET not in result["after"]
        assert result["after"] == ["written-by-tests"]
        uri = urlsplit(result["uri"])
        assert uri.hostname == "127.0.0.1" and uri.port != port
        assert not result["joined_shared_service"]
        assert result["server_parent"] == result["pid"]  # its server is a process it started itself
        assert result["server_pid"] not in [p.pid for p in user_service["mongod"]]
        assert snapshot(client) == before  # the user's databases are exactly as they were
        assert not psutil.pid_exists(result["server_pid"])  # stopped at exit...
        assert not Path(result["root"]).exists()  # ...and its files removed
    finally:  # a mongod the isolated process failed to stop is stopped here (never the user's)
        with contextlib.suppress(psutil.NoSuchProcess):
            server = psutil.Process(result["server_pid"])
            if result["root"] in " ".join(server.cmdline()):
                stop_by_pid([server])


def test_a_running_user_service_is_never_joined_read_or_written(user_service):
    from fiftyone.service.util import find_processes_by_args

    # What made the old setup unsafe: FiftyOne's own scan finds this service and would join it.
    assert user_service["wrapper"].pid in [p.pid for p in find_processes_by_args(SHARED_SERVICE_ARGS)]
    assert_isolated_from(user_service, user_env(user_service["home"]))


def test_a_user_database_named_in_the_environment_or_config_is_not_used_either(user_service):
    home, uri = user_service["home"], f"mongodb://127.0.0.1:{user_service['port']}"
    (home / ".fiftyone" / "config.json").write_text(json.dumps({"database_uri": uri, "database_name": "fiftyone"}))
    env = user_env(home, FIFTYONE_DATABASE_URI=uri, FIFTYONE_PRIVATE_DATABASE_PORT=str(user_service["port"]),
                   FIFTYONE_DATABASE_NAME="fiftyone", FIFTYONE_CONFIG_PATH=str(home / ".fiftyone" / "config.json"))
    try:
        assert_isolated_from(user_service, env)
    finally:
        (home / ".fiftyone" / "config.json").unlink()
