"""The container's own start command, run outside Docker, against a real Label Studio server that
takes personal access tokens only.

The command is read out of plugins/labelstudio/Dockerfile and run with the environment its
docker-compose.yml sets (the /data volume becomes a temporary folder, HOST 127.0.0.1), two gunicorn
workers of two threads, the tiny SAM 3 as PROMPTSEG_MODEL and a personal access token, created
through Label Studio's API, as LABEL_STUDIO_API_KEY. Label Studio connects it, asks for
pre-annotations of uploaded images (which the backend fetches with the token) and an interactive
prompt; each worker loads the model once; ``/health`` answers while predictions run.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import numpy as np
import pytest
import requests
import yaml
from lshelpers import (
    COMPOSE_FILE,
    CONFIGS,
    DOCKERFILE,
    TOKEN,
    compose_environment,
    decode_brush,
    dockerfile_env,
    exec_form,
    free_port,
    model_loads,
    region_label,
    running_label_studio,
    server_env,
    start,
    stop,
    wait_for,
)
from standin import StandInHost

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

WORKERS, THREADS = 2, 2
SLOW_DOWNLOAD_SECONDS = 8


@pytest.fixture(scope="module")
def label_studio(tmp_path_factory):
    """A real Label Studio whose organization has legacy tokens turned off; yields (url, personal access token)."""
    with running_label_studio(tmp_path_factory.mktemp("label-studio")) as url:
        legacy = {"Authorization": f"Token {TOKEN}"}
        created = requests.post(f"{url}/api/token/", headers=legacy, timeout=60)
        assert created.status_code == 201, created.text
        settings = requests.post(f"{url}/api/jwt/settings", headers=legacy, timeout=60,
                                 json={"api_tokens_enabled": True, "legacy_api_tokens_enabled": False})
        assert settings.status_code in (200, 201), settings.text
        yield url, created.json()["token"]


@pytest.fixture(scope="module")
def slow_host():
    """An image host that trickles its answer: a prediction that holds a worker's thread for seconds."""
    host = StandInHost()
    yield host
    host.close()


@pytest.fixture(scope="module")
def container(label_studio, tiny_sam3_hub_dir, slow_host, tmp_path_factory):
    """The Dockerfile's CMD with the CPU service's environment, bound to 127.0.0.1; stopped by its process group."""
    import torch

    url, token = label_studio
    work = tmp_path_factory.mktemp("container")
    [volume] = [v.split(":")[1] for v in yaml.safe_load(COMPOSE_FILE.read_text())["services"]["promptseg"]["volumes"]]
    shell = {"LABEL_STUDIO_URL": url, "LABEL_STUDIO_API_KEY": token, "PROMPTSEG_MODEL": str(tiny_sam3_hub_dir),
             "WORKERS": str(WORKERS), "THREADS": str(THREADS), "LOG_LEVEL": "INFO"}
    service = compose_environment(yaml.safe_load(COMPOSE_FILE.read_text())["services"]["promptseg"], shell)
    image = {**dockerfile_env(), **service}
    image = {k: v.replace(volume, str(work / "data"), 1) if v.startswith(volume + "/") else v for k, v in image.items()}
    port = free_port()
    # the embeddings the backend writes are read back by the reference core, which decodes with as
    # many threads and the same precision: the same computation on the same inputs (see tests/tolerance.py)
    env = server_env(**{**image, "HOST": "127.0.0.1", "PORT": str(port), "HOME": str(work), "HF_HUB_OFFLINE": "1",
                        "PROMPTSEG_ALLOWED_HOSTS": slow_host.host, "PROMPTSEG_DOWNLOAD_TIMEOUT": str(SLOW_DOWNLOAD_SECONDS),
                        "OMP_NUM_THREADS": str(torch.get_num_threads()),
                        "PROMPTSEG_DTYPE": os.environ.get("PROMPTSEG_DTYPE", "auto")})
    log = work / "container.log"
    process = start(exec_form(DOCKERFILE, "CMD"), env, log)
    try:
        wait_for(f"http://127.0.0.1:{port}/health", process, 240, log)
        deadline = time.monotonic() + 120
        while len(model_loads(log.read_text())) < WORKERS and time.monotonic() < deadline:
            time.sleep(0.5)
        yield SimpleNamespace(url=f"http://127.0.0.1:{port}", process=process, log=log, env=env,
                              embeddings=env["PROMPTSEG_CACHE_DIR"])
    finally:
        stop(process)


def worker_pids(process) -> set[int]:
    import psutil

    return {child.pid for child in psutil.Process(process.pid).children()}


def test_container_command_serves_label_studio_with_a_personal_access_token(label_studio, container, images, tiny_sam3_hub_dir):
    import promptseg
    from label_studio_sdk import LabelStudio

    url, token = label_studio
    refused = requests.get(f"{url}/api/projects", headers={"Authorization": f"Token {TOKEN}"}, timeout=60)
    assert refused.status_code == 401  # legacy tokens are off: only the personal access token can fetch files

    ls = LabelStudio(base_url=url, api_key=token)
    project = ls.projects.create(title="promptseg container", label_config=CONFIGS["brush"])
    access = requests.post(f"{url}/api/token/refresh/", json={"refresh": token}, timeout=60).json()["access"]
    for path in images:  # uploaded files: Label Studio serves them only with a valid token
        with open(path, "rb") as handle:
            response = requests.post(f"{url}/api/projects/{project.id}/import", headers={"Authorization": f"Bearer {access}"},
                                     files={"file": (path.name, handle, "image/png")}, timeout=60)
        response.raise_for_status()
    tasks = sorted(ls.tasks.list(project=project.id), key=lambda t: t.id)
    ml = ls.ml.create(project=project.id, url=container.url, title="promptseg", is_interactive=True,
                      extra_params={"threshold": 0.0})
    assert ls.ml.get(ml.id).state == "CO", f"backend not connected: {ls.ml.get(ml.id).error_message}"
    ls.actions.create(id="retrieve_tasks_predictions", project=project.id, selected_items={"all": True, "excluded": []})

    core = promptseg.load_segmenter(str(tiny_sam3_hub_dir), device="cpu", cache_dir=container.embeddings)
    for task, path in zip(tasks, images):
        [prediction] = list(ls.predictions.list(task=task.id))
        assert prediction.model_version.startswith("promptseg-")
        result = core.segment(str(path), ["cat", "small dog"], threshold=0.0)
        assert result.embedding_source != "computed"  # the backend fetched this upload and embedded it
        assert len(prediction.result) == len(result) > 0
        for region, inst in zip(prediction.result, result.instances):
            assert region_label(region) == {"cat": "cat", "small dog": "dog"}[inst.label]
            np.testing.assert_array_equal(decode_brush(region), inst.full_mask(*result.image_size))

    context = {"result": [{"type": "textarea", "from_name": "prompt", "to_name": "image", "value": {"text": ["fluffy cat"]}}]}
    body = ls.ml.with_raw_response.predict_interactive(ml.id, task=tasks[0].id, context=context).response.json()
    assert "errors" not in body, body
    assert len(body["data"]["result"]) == len(core.segment(str(images[0]), ["fluffy cat"], threshold=0.0)) > 0

    log = container.log.read_text()
    assert "HTTP 401" not in log and "refused" not in log
    workers = worker_pids(container.process)
    assert len(workers) == WORKERS and model_loads(log) == dict.fromkeys(workers, 1)  # once per worker, none in the master


def test_health_answers_while_predictions_hold_the_workers(container, slow_host):
    def slow_predict(index: int) -> requests.Response:
        task = {"id": index, "data": {"image": f"{slow_host.url}/slow/{index}.png"}}
        return requests.post(f"{container.url}/predict", json={"tasks": [task], "label_config": CONFIGS["brush"]},
                             timeout=SLOW_DOWNLOAD_SECONDS + 60)

    with ThreadPoolExecutor(WORKERS) as pool:
        running = [pool.submit(slow_predict, i) for i in range(WORKERS)]
        deadline = time.monotonic() + 30
        while slow_host.active == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert slow_host.active > 0
        timings = []
        for _ in range(10):
            began = time.monotonic()
            response = requests.get(f"{container.url}/health", timeout=5)
            timings.append(time.monotonic() - began)
            assert response.status_code == 200 and response.json()["status"] == "UP"
        assert slow_host.active > 0, "the predictions ended before /health was asked"
        answers = [future.result() for future in running]
    assert max(timings) < 2.0, timings
    for answer in answers:  # the slow download hits its deadline (or the worker was busy): never a hang
        assert answer.status_code in (200, 503), answer.text
        if answer.status_code == 200:
            assert "PROMPTSEG_DOWNLOAD_TIMEOUT" in answer.json()["results"][0]["error"]


def test_container_health_check_command(container):
    """The Dockerfile's HEALTHCHECK command, run as Docker would (PORT from the environment)."""
    import subprocess

    command = exec_form(DOCKERFILE, "HEALTHCHECK")
    assert subprocess.run(command, env=container.env, capture_output=True, timeout=60).returncode == 0
    closed = {**container.env, "PORT": str(free_port())}
    failed = subprocess.run(command, env=closed, capture_output=True, text=True, timeout=60)
    assert failed.returncode == 1 and "not answering /health" in failed.stderr
