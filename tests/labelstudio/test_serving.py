"""How the backend is served, in its container and outside: HOST, PORT, WORKERS, THREADS, LOG_LEVEL
and DEVICE read the same way by the container's gunicorn command, ``promptseg labelstudio serve``
and ``python -m promptseg_labelstudio._wsgi``; the Dockerfile and docker-compose.yml agree with
what the code reads. The container's command against a real Label Studio is in
test_container_e2e.py.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import yaml
from lshelpers import (
    COMPOSE_FILE,
    CONFIGS,
    DOCKERFILE,
    PACKAGING,
    compose_environment,
    dockerfile_env,
    dockerfile_instructions,
    exec_form,
    free_port,
    model_loads,
    server_env,
    start,
    stop,
    wait_for,
)

REPOSITORY = PACKAGING.parents[1]
START_COMMANDS = {
    "container": lambda: exec_form(DOCKERFILE, "CMD"),
    "serve": lambda: [sys.executable, "-m", "promptseg.cli", "labelstudio", "serve"],
    "wsgi": lambda: [sys.executable, "-m", "promptseg_labelstudio._wsgi"],
}


@pytest.mark.parametrize("command", sorted(START_COMMANDS))
@pytest.mark.parametrize("variable, value, message", [
    ("WORKERS", "abc", "WORKERS must be a whole number of at least 1, got 'abc': set WORKERS=1"),
    ("THREADS", "0", "THREADS must be a whole number of at least 1, got '0': set THREADS=4"),
    ("LOG_LEVEL", "LOUD", "LOG_LEVEL must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL, got 'LOUD': set LOG_LEVEL=INFO"),
    ("PORT", "99999", "PORT must be a whole number from 1 to 65535, got '99999': set PORT=9090"),
    ("DEVICE", "gpu", "DEVICE (or PROMPTSEG_DEVICE) must be auto, cpu, cuda, cuda:N or mps, got 'gpu': set DEVICE=cuda"),
])
def test_bad_server_variables_stop_every_start_command_with_the_fix(command, variable, value, message, tmp_path):
    env = server_env(**{variable: value}, PROMPTSEG_MODEL="/nonexistent/model", HOME=str(tmp_path))
    done = subprocess.run(START_COMMANDS[command](), env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode != 0
    assert message in done.stderr, done.stderr[-2000:]
    assert "Traceback" not in done.stderr and "Loading" not in done.stderr  # stopped before any worker or model


def test_flags_win_over_the_environment_which_wins_over_the_defaults(monkeypatch):
    from promptseg.cli import build_parser
    from promptseg_labelstudio._commands import server_settings
    from promptseg_labelstudio.config import BackendConfig
    from promptseg_labelstudio.serving import ServerSettings

    for name in ("HOST", "PORT", "WORKERS", "THREADS", "LOG_LEVEL", "DEVICE", "PROMPTSEG_DEVICE"):
        monkeypatch.delenv(name, raising=False)
    serve = lambda *flags: build_parser().parse_args(["labelstudio", "serve", *flags])  # noqa: E731
    assert server_settings(serve()) == ServerSettings("127.0.0.1", 9090, 1, 4, "INFO")  # outside a container: loopback
    for name, value in {"HOST": "0.0.0.0", "PORT": "9191", "WORKERS": "3", "THREADS": "6", "LOG_LEVEL": "debug"}.items():
        monkeypatch.setenv(name, value)
    assert server_settings(serve()) == ServerSettings("0.0.0.0", 9191, 3, 6, "DEBUG")
    flags = serve("--host", "127.0.0.1", "--port", "9092", "--workers", "1", "--threads", "5", "--log-level", "warning")
    assert server_settings(flags) == ServerSettings("127.0.0.1", 9092, 1, 5, "WARNING")
    assert server_settings(flags).work_slots == 3  # all but the 2 threads kept for /health and /setup

    assert BackendConfig.from_env({}).device == "auto"
    assert BackendConfig.from_env({"DEVICE": "cpu"}).device == "cpu"
    assert BackendConfig.from_env({"DEVICE": "cuda", "PROMPTSEG_DEVICE": "cpu"}).device == "cpu"
    assert BackendConfig.from_env({"DEVICE": "cuda"}, device=serve("--device", "cpu").device).device == "cpu"


def names_the_backend_reads(environment: dict[str, str]) -> set[str]:
    """Every variable the backend's settings readers look up, found by running them on a recording mapping."""
    from promptseg_labelstudio.config import BackendConfig
    from promptseg_labelstudio.serving import ServerSettings

    class Recording(dict):
        seen: set[str] = set()

        def get(self, key, default=None):
            self.seen.add(key)
            return super().get(key, default)

    env = Recording(environment)
    ServerSettings.from_env(env)
    BackendConfig.from_env(env)
    return env.seen


def test_hugging_face_reads_the_token_and_cache_variables_compose_sets(tmp_path):
    """HF_TOKEN and HF_HOME are read by huggingface_hub itself (the model download), not by promptseg."""
    code = "import huggingface_hub, huggingface_hub.constants as c; print(c.HF_HOME); print(huggingface_hub.get_token())"
    env = server_env(HF_HOME=str(tmp_path / "hf"), HF_TOKEN="hf_compose_token")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.split() == [str(tmp_path / "hf"), "hf_compose_token"]


def test_compose_services_set_what_the_backend_reads_and_keep_the_cache_on_the_volume():
    compose = yaml.safe_load(COMPOSE_FILE.read_text())
    image = dockerfile_env()
    instructions = dockerfile_instructions()
    [volume] = [args for kind, args in instructions if kind == "VOLUME"]
    [exposed] = [int(args) for kind, args in instructions if kind == "EXPOSE"]
    declared_args = {args.split("=", 1)[0] for kind, args in instructions if kind == "ARG"}
    services = compose["services"]
    assert set(services) == {"promptseg", "promptseg-gpu"}
    for name, service in services.items():
        env = compose_environment(service, {})
        read = names_the_backend_reads({**image, **env}) | {"HF_TOKEN", "HF_HOME"}  # see the test above
        assert set(env) <= read, f"{name} sets variables nothing reads: {set(env) - read}"
        assert {"LABEL_STUDIO_URL", "LABEL_STUDIO_API_KEY", "LOG_LEVEL", "WORKERS", "THREADS", "DEVICE",
                "PROMPTSEG_MODEL", "HF_TOKEN"} <= set(env)
        from promptseg_labelstudio.config import BackendConfig
        from promptseg_labelstudio.serving import ServerSettings

        settings = ServerSettings.from_env({**image, **env})  # the defaults pass the backend's own checks
        BackendConfig.from_env({**image, **env})
        assert (settings.host, settings.port) == ("0.0.0.0", exposed)  # reachable through the published port
        assert [port.rsplit(":", 1)[1] for port in service["ports"]] == [str(exposed)]
        mounts = dict(reversed(v.split(":")) for v in service["volumes"])
        assert mounts[volume] in compose["volumes"]  # a named volume keeps the downloads across restarts
        for cache in ("HF_HOME", "PROMPTSEG_CACHE_DIR"):
            assert env[cache] == image[cache] and env[cache].startswith(volume + "/")
        build = service["build"]
        assert (COMPOSE_FILE.parent / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE
        assert set(build.get("args", {})) <= declared_args
    cpu, gpu = services["promptseg"], services["promptseg-gpu"]
    assert compose_environment(cpu, {})["DEVICE"] == "cpu" and "deploy" not in cpu
    assert compose_environment(gpu, {})["DEVICE"] == "cuda"
    [device] = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"] and device["count"] >= 1
    cpu_index = next(args for kind, args in instructions if kind == "ARG" and args.startswith("TORCH_INDEX="))
    assert gpu["build"]["args"]["TORCH_INDEX"] != cpu_index.split("=", 1)[1]  # the GPU image gets CUDA torch
    assert compose_environment(cpu, {"WORKERS": "2", "LABEL_STUDIO_URL": "http://ls:8080"})["WORKERS"] == "2"


def test_dockerfile_installs_the_extra_with_the_torch_pins_and_runs_as_a_user():
    instructions = dockerfile_instructions()
    kinds = [kind for kind, _ in instructions]
    sources = [part for kind, args in instructions if kind == "COPY" for part in args.split()[:-1]]
    for source in sources:
        assert (REPOSITORY / source).exists(), source
    ignore = (DOCKERFILE.parent / "Dockerfile.dockerignore").read_text().split()
    assert ignore[ignore.index("*") + 1:] and all(f"!{source.rstrip('/')}" in ignore for source in sources)
    [install] = [args for kind, args in instructions if kind == "RUN" and "pip install" in args]
    assert '".[labelstudio]"' in install and "-c .ci/constraints.txt" in install
    pins = (REPOSITORY / ".ci" / "constraints.txt").read_text().splitlines()
    assert any(p.startswith("torch==") for p in pins) and any(p.startswith("torchvision==") for p in pins)
    users = [args for kind, args in instructions if kind == "USER"]
    assert users and users[-1] not in ("root", "0") and kinds.index("USER") < kinds.index("CMD")
    assert dockerfile_env()["HOST"] == "0.0.0.0"
    command, health = exec_form(DOCKERFILE, "CMD"), exec_form(DOCKERFILE, "HEALTHCHECK")
    assert command[0] == "gunicorn" and command[-1] == "promptseg_labelstudio._wsgi:app"
    for module in [command[command.index("--config") + 1].removeprefix("python:"), health[health.index("-m") + 1]]:
        assert importlib.util.find_spec(module) is not None, module


def test_serve_with_two_workers_loads_the_model_once_in_each(tiny_sam3_dir, ls_image_root, tmp_path):
    """WORKERS=2 outside a container: ``promptseg labelstudio serve`` runs gunicorn, each worker loads after the fork."""
    import psutil

    port = free_port()
    env = server_env(WORKERS="2", THREADS="3", PORT=str(port), DEVICE="cpu", PROMPTSEG_MODEL=str(tiny_sam3_dir),
                     PROMPTSEG_THRESHOLD="0.0", LOCAL_FILES_DOCUMENT_ROOT=str(ls_image_root), HF_HUB_OFFLINE="1",
                     PROMPTSEG_CACHE_DIR=str(tmp_path / "embeddings"), HOME=str(tmp_path), OMP_NUM_THREADS="1")
    log = tmp_path / "serve.log"
    process = start([sys.executable, "-m", "promptseg.cli", "labelstudio", "serve"], env, log)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for(f"{url}/health", process, 180, log)
        deadline = time.monotonic() + 120
        while len(model_loads(log.read_text())) < 2 and time.monotonic() < deadline:
            time.sleep(0.5)
        workers = {child.pid for child in psutil.Process(process.pid).children()}
        assert model_loads(log.read_text()) == dict.fromkeys(workers, 1) and len(workers) == 2
        for _ in range(6):
            response = requests.post(f"{url}/predict", timeout=60, json={
                "tasks": [{"id": 1, "data": {"image": "image0.png"}}], "label_config": CONFIGS["rectangle"]})
            assert response.status_code == 200 and len(response.json()["results"][0]["result"]) > 0
        assert model_loads(log.read_text()) == dict.fromkeys(workers, 1)  # not per request
    finally:
        stop(process)
    assert Path(log).read_text().count("Booting worker") == 2


def test_what_setup_tells_one_worker_every_worker_uses(ls_model, tmp_path):
    """Label Studio sends extra params, host and token only with /setup, which may reach another worker than /predict."""
    from dataclasses import replace

    from promptseg_labelstudio.app import create_app
    from promptseg_labelstudio.model import PromptsegMLBackend
    from promptseg_labelstudio.shared_settings import SharedProjectSettings, version

    config = replace(ls_model.config, threshold=None, projects_dir=tmp_path)
    first, second = (create_app(PromptsegMLBackend(config, segmenter=ls_model.segmenter)).test_client() for _ in range(2))
    request = {"tasks": [{"id": 1, "data": {"image": "image0.png"}}], "project": "7.1", "label_config": CONFIGS["brush"]}

    def found(client) -> int:
        response = client.post("/predict", json=request)
        assert response.status_code == 200, response.json
        return len(response.json["results"][0]["result"])

    assert found(second) == 0  # the core's default threshold: the tiny model's ~0.25 scores are below it
    setup = {"project": "7.1", "schema": CONFIGS["brush"], "extra_params": {"threshold": 0.0}}
    assert first.post("/setup", json=setup).status_code == 200
    assert found(second) > 0  # the other worker read the project's threshold
    assert second.post("/setup", json={**setup, "extra_params": {"threshold": 0.99}}).status_code == 200
    assert found(first) == 0  # and a later /setup replaces it everywhere
    [stored] = tmp_path.glob("project-7.json")
    assert stored.stat().st_mode & 0o077 == 0  # it may hold a token: its owner's only
    assert SharedProjectSettings(tmp_path).read_if_changed("7", version(stored.stat())) is None


def test_a_project_key_that_looks_like_a_path_stays_in_the_shared_folder(tmp_path):
    """The project key comes from the request: it names one file inside the folder, whatever it holds."""
    from promptseg_labelstudio.shared_settings import SharedProjectSettings

    folder = tmp_path / "projects"
    folder.mkdir()
    shared = SharedProjectSettings(folder)
    for key in ("a/b", "/etc/passwd", "..", "%2F"):
        shared.write(key, {"extra_params": {"key": key}})
        assert shared.read_if_changed(key, None)[1] == {"extra_params": {"key": key}}
    assert sorted(path.parent for path in tmp_path.rglob("*.json")) == [folder] * 4
