"""Hostile and broken input against the real backend over HTTP (waitress on 127.0.0.1).

Stand-in hosts record every request's headers, so the tests can say exactly where the API key
went. Downloads are bounded (size, time) and their files removed; ``/predict`` cannot take
every server thread, so ``/health`` and ``/setup`` answer at once while downloads and inference run.
"""

from __future__ import annotations

import base64
import io
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
from lshelpers import CONFIGS, free_port, stop
from standin import StandInHost, bomb_png, make_jwt, wait_until

API_KEY = "operator-api-key-0123456789"
SETUP_TOKEN = "token-sent-with-setup"
UPLOAD = "/data/upload/1/cat.png"
CONFIG = CONFIGS["brush"]


@pytest.fixture
def downloads(tmp_path) -> Path:
    folder = tmp_path / "downloads"
    folder.mkdir()
    return folder


@pytest.fixture
def backend(ls_model, downloads, serve_backend):
    """Start the real app on waitress with config `changes` (same segmenter); stopped in teardown."""
    return lambda threads=4, **changes: serve_backend(
        ls_model, threads, **{"download_dir": downloads, "download_timeout": 5.0, **changes})


def predict(url: str, images: list[str], project: str = "1.1", config=CONFIG, **kwargs) -> list[dict]:
    tasks = [{"id": i + 1, "data": {"image": image}} for i, image in enumerate(images)]
    response = requests.post(f"{url}/predict", json={"tasks": tasks, "project": project, "label_config": config},
                             timeout=120, **kwargs)
    assert response.status_code == 200, response.text
    return response.json()["results"]


def setup(url: str, project: str = "1.1", **fields) -> requests.Response:
    return requests.post(f"{url}/setup", json={"project": project, "schema": CONFIG, **fields}, timeout=30)


def tokens_seen(host: StandInHost) -> list[str]:
    return [h.get("authorization", "") for h in host.headers_seen()]


def every_header_value(host: StandInHost) -> str:
    return "\n".join(v for headers in host.headers_seen() for v in headers.values())


# -- credentials go only where the operator sent them ----------------------------------------------

def test_api_key_never_reaches_a_host_named_only_by_setup(backend, standin):
    """No LABEL_STUDIO_URL, no basic auth: /setup names a host (even one image URLs may use)."""
    url = backend(api_key=API_KEY, allowed_hosts=(standin.host,), document_root=None)
    assert setup(url, hostname=standin.url, access_token=SETUP_TOKEN).status_code == 200
    results = predict(url, [UPLOAD, "s3://bucket/cat.png", "/data/local-files/?d=cat.png", f"{standin.url}/cat.png"])
    for stored in results[:3]:
        assert "result" not in stored
        for variable in ("LABEL_STUDIO_URL", "BASIC_AUTH_USER", "PROMPTSEG_TRUST_SETUP_HOST"):
            assert variable in stored["error"]
        assert f"/setup named {standin.url}" in stored["error"]
    assert len(results[3]["result"]) > 0  # a plain image URL on an allowed host is still fetched
    assert standin.paths_seen() == ["/cat.png"]
    assert API_KEY not in every_header_value(standin) and SETUP_TOKEN not in every_header_value(standin)
    assert tokens_seen(standin) == [""]


def test_api_key_goes_to_label_studio_url_and_nowhere_else(backend, standin, other_host):
    url = backend(label_studio_url=standin.url, api_key=API_KEY, allowed_hosts=(other_host.host,))
    assert setup(url, hostname=other_host.url, access_token=SETUP_TOKEN).status_code == 200  # LABEL_STUDIO_URL pins the host
    redirect = f"{standin.url}/redirect?to={other_host.url}/moved.png"
    results = predict(url, [UPLOAD, f"{other_host.url}/direct.png", redirect, f"{standin.url}/plain.png"])
    assert all(len(r["result"]) > 0 for r in results), results
    paths = standin.paths_seen()
    assert paths[0] == "/storage-data/uploaded/?filepath=upload/1/cat.png" and paths[2] == "/plain.png"
    assert paths[1].startswith("/redirect?to=") and len(paths) == 3
    assert tokens_seen(standin) == [f"Token {API_KEY}"] * 3
    assert sorted(other_host.paths_seen()) == ["/direct.png", "/moved.png"]
    assert API_KEY not in every_header_value(other_host) and tokens_seen(other_host) == ["", ""]


@pytest.mark.parametrize("allow", [{"trust_setup_host": True}, {"basic_auth_user": "ls", "basic_auth_pass": "pw"}],
                         ids=["trust-setup-host", "basic-auth"])
def test_setup_host_gets_only_its_own_token_when_allowed(backend, standin, allow):
    url = backend(api_key=API_KEY, **allow)
    auth = ("ls", "pw") if "basic_auth_user" in allow else None
    response = requests.post(f"{url}/setup", json={"project": "5.1", "schema": CONFIG, "hostname": standin.url,
                                                   "access_token": SETUP_TOKEN}, auth=auth, timeout=30)
    assert response.status_code == 200
    [stored] = predict(url, [UPLOAD], project="5.1", auth=auth)
    assert len(stored["result"]) > 0
    assert tokens_seen(standin) == [f"Token {SETUP_TOKEN}"]
    assert API_KEY not in every_header_value(standin)
    [other_project] = predict(url, [UPLOAD], project="6.1", auth=auth)  # no /setup for it: no host, no key
    assert "set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY" in other_project["error"]
    assert len(standin.requests) == 1


def test_trust_setup_host_comes_from_environment_or_flag():
    from promptseg.cli import build_parser
    from promptseg.errors import OptionError
    from promptseg_labelstudio.config import BackendConfig

    assert BackendConfig.from_env({}).setup_may_name_host is False
    assert BackendConfig.from_env({"PROMPTSEG_TRUST_SETUP_HOST": "1"}).setup_may_name_host is True
    assert BackendConfig.from_env({"BASIC_AUTH_USER": "u", "BASIC_AUTH_PASS": "p"}).setup_may_name_host is True
    with pytest.raises(OptionError, match="PROMPTSEG_TRUST_SETUP_HOST must be 1 or 0"):
        BackendConfig.from_env({"PROMPTSEG_TRUST_SETUP_HOST": "maybe"})
    args = build_parser().parse_args(["labelstudio", "serve", "--trust-setup-host"])
    assert BackendConfig.from_env({}, trust_setup_host=args.trust_setup_host).trust_setup_host is True
    args = build_parser().parse_args(["labelstudio", "serve"])
    assert BackendConfig.from_env({"PROMPTSEG_TRUST_SETUP_HOST": "yes"}, trust_setup_host=args.trust_setup_host).trust_setup_host


def test_uploads_fall_back_to_the_legacy_path_and_cloud_files_are_presigned(backend, standin, other_host):
    standin.refresh_token = make_jwt("refresh", 3600)  # a personal access token
    url = backend(label_studio_url=standin.url, api_key=standin.refresh_token, allowed_hosts=(other_host.host,))
    standin.proxy_missing = True  # as when the storage proxy is off: /data/upload/ serves the file
    standin.redirects["/tasks/2/presign/"] = f"{other_host.url}/bucket/cat.png?X-Amz-Signature=abc"
    results = predict(url, [UPLOAD, "s3://bucket/cat.png"])
    assert all(len(r["result"]) > 0 for r in results), results
    fileuri = base64.urlsafe_b64encode(b"s3://bucket/cat.png").decode()
    assert standin.paths_seen() == ["/api/token/refresh/", "/storage-data/uploaded/?filepath=upload/1/cat.png", UPLOAD,
                                    f"/tasks/2/presign/?fileuri={fileuri}"]
    [access] = standin.issued
    assert tokens_seen(standin) == [""] + [f"Bearer {access}"] * 3  # the access token, as label-studio-sdk sends it
    assert other_host.paths_seen() == ["/bucket/cat.png?X-Amz-Signature=abc"]
    assert tokens_seen(other_host) == [""]  # the presigned redirect does not carry the token


# -- downloads are bounded ---------------------------------------------------------------------------

def test_body_over_the_cap_is_stopped_while_streaming(backend, standin, downloads):
    url = backend(allowed_hosts=(standin.host,), max_download_bytes=1024**2)
    huge, small = f"{standin.url}/huge/a.png", f"{standin.url}/small.png"
    results = predict(url, [huge, small])
    assert "over the download limit of 1,048,576 bytes" in results[0]["error"]
    assert "PROMPTSEG_MAX_DOWNLOAD_BYTES" in results[0]["error"]
    assert len(results[1]["result"]) > 0
    assert wait_until(lambda: standin.active == 0)
    assert standin.sent["/huge/a.png"] < 16 * 1024**2  # stopped early: the host could not send its 64 MiB
    assert list(downloads.iterdir()) == []  # the partial file is gone


def test_declared_size_over_the_cap_is_refused_before_reading(backend, standin, downloads):
    url = backend(allowed_hosts=(standin.host,), max_download_bytes=1024**2)
    [result] = predict(url, [f"{standin.url}/declared-huge/a.png"])
    assert "it declares 67,108,864 bytes" in result["error"]
    assert list(downloads.iterdir()) == []


def test_slow_host_is_stopped_by_the_deadline(backend, standin, downloads):
    url = backend(allowed_hosts=(standin.host,), download_timeout=1.5)
    start = time.monotonic()
    results = predict(url, [f"{standin.url}/slow/a.png", f"{standin.url}/small.png"])
    elapsed = time.monotonic() - start
    assert "took longer than 1.5 s (PROMPTSEG_DOWNLOAD_TIMEOUT)" in results[0]["error"]
    assert len(results[1]["result"]) > 0
    assert elapsed < 10
    assert list(downloads.iterdir()) == []


def test_host_that_never_answers_times_out(backend, standin):
    url = backend(allowed_hosts=(standin.host,), download_timeout=1.0)
    start = time.monotonic()
    [result] = predict(url, [f"{standin.url}/hang/a.png"])
    assert "timed out" in result["error"] and "PROMPTSEG_DOWNLOAD_TIMEOUT" in result["error"]
    assert time.monotonic() - start < 10


def test_downloaded_files_are_removed_after_use(backend, standin, downloads):
    url = backend(label_studio_url=standin.url, api_key=API_KEY)
    for _ in range(3):
        results = predict(url, [UPLOAD, f"{standin.url}/a.png", f"{standin.url}/status/500"])
        assert len(results[0]["result"]) > 0 and len(results[1]["result"]) > 0
        assert "HTTP 500" in results[2]["error"]
        assert list(downloads.iterdir()) == []


def test_unreachable_hosts_and_http_errors_fail_alone(backend, standin):
    closed = free_port()
    url = backend(allowed_hosts=(standin.host, f"127.0.0.1:{closed}"))
    results = predict(url, [f"http://127.0.0.1:{closed}/a.png", f"{standin.url}/status/404",
                            f"{standin.url}/status/403", f"{standin.url}/a.png"])
    assert f"cannot connect to 127.0.0.1:{closed}" in results[0]["error"]
    assert "HTTP 404: check the URL" in results[1]["error"]
    assert "HTTP 403: check the token" in results[2]["error"]
    assert len(results[3]["result"]) > 0


def test_busy_backend_answers_503_with_retry_after_and_health_stays_fast(backend, standin):
    url = backend(threads=3, work_slots=1, allowed_hosts=(standin.host,), download_timeout=8.0)
    with ThreadPoolExecutor(1) as pool:
        slow = pool.submit(predict, url, [f"{standin.url}/slow/a.png"])
        assert wait_until(lambda: standin.active == 1)
        refused = requests.post(f"{url}/predict", json={"tasks": [{"id": 1, "data": {"image": "image0.png"}}],
                                                        "label_config": CONFIG}, timeout=10)
        assert refused.status_code == 503
        assert refused.headers["Retry-After"] == "5"
        assert "busy" in refused.json()["error"] and "--threads" in refused.json()["error"]
        start = time.monotonic()
        assert requests.get(f"{url}/health", timeout=5).json()["status"] == "UP"
        assert time.monotonic() - start < 0.5
        standin.stopping.set()  # end the trickle; the slot frees
        assert "error" in slow.result(timeout=30)[0]
    assert len(predict(url, ["image0.png"])[0]["result"]) > 0


def serve_command(port: int, *options: str) -> list[str]:
    return [sys.executable, "-m", "promptseg.cli", "labelstudio", "serve", "--host", "127.0.0.1", "--port", str(port), *options]


def clean_env(**changes) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("LABEL_STUDIO_", "BASIC_AUTH_", "PROMPTSEG_")) and k != "LOCAL_FILES_DOCUMENT_ROOT"}
    env.update(HF_HUB_OFFLINE="1", PROMPTSEG_DEVICE="cpu", **changes)
    return env


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_health_and_setup_answer_at_once_while_downloads_and_inference_run(tiny_sam3_dir, tmp_path, standin):
    """`promptseg labelstudio serve --threads 6`: 4 prediction slots, 2 threads kept for /health and /setup.

    One request runs inference on a 1000x1000 image, three more hold their slots downloading from a
    host that trickles a byte every 0.1 s, two more find no slot. Every /health and /setup probe
    during the inference must answer well under Label Studio's 1 s.
    """
    from PIL import Image

    big = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (1000, 1000, 3), dtype=np.uint8)).save(big, format="PNG")
    standin.files["/big.png"] = big.getvalue()
    port = free_port()
    log = tmp_path / "backend.log"
    env = clean_env(PROMPTSEG_ALLOWED_HOSTS=standin.host, PROMPTSEG_THRESHOLD="0.0", PROMPTSEG_DOWNLOAD_TIMEOUT="60",
                    PROMPTSEG_CACHE_DIR=str(tmp_path / "cache"))
    with open(log, "wb") as out:
        process = subprocess.Popen(serve_command(port, "--model", str(tiny_sam3_dir), "--threads", "6"), env=env,
                                   stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    health, setups = [], []
    pool = ThreadPoolExecutor(6)
    try:
        def up():
            try:
                return requests.get(f"{url}/health", timeout=2).status_code == 200
            except requests.RequestException:
                return process.poll() is not None
        assert wait_until(up, 300) and process.poll() is None, log.read_text()[-3000:]

        def post(image):
            return requests.post(f"{url}/predict", json={"tasks": [{"id": 1, "data": {"image": image}}],
                                                          "label_config": CONFIG}, timeout=120)

        inference = pool.submit(post, f"{standin.url}/big.png")
        assert wait_until(lambda: "/big.png" in standin.paths_seen(), 30)
        slow = [pool.submit(post, f"{standin.url}/slow/{i}.png") for i in range(5)]
        assert wait_until(lambda: standin.active >= 3 and sum(f.done() for f in slow) >= 2, 30)
        while not inference.done():
            start = time.monotonic()
            assert requests.get(f"{url}/health", timeout=10).json()["status"] == "UP"
            health.append(time.monotonic() - start)
            start = time.monotonic()
            assert setup(url).status_code == 200
            setups.append(time.monotonic() - start)
            time.sleep(0.05)
        downloading = standin.active
        refused = [f.result() for f in slow if f.done()]
        response = inference.result()
    finally:
        standin.stopping.set()
        stop(process)
        pool.shutdown(wait=True, cancel_futures=True)
    assert response.status_code == 200 and len(response.json()["results"][0]["result"]) > 0
    assert downloading == 3  # the slow downloads were in flight the whole time
    assert [r.status_code for r in refused] == [503, 503] and all(r.headers["Retry-After"] for r in refused)
    assert len(health) >= 3, "the inference ended too soon to probe during it"
    assert max(health) < 1.0 and statistics.median(health) < 0.25, health
    assert max(setups) < 1.0 and statistics.median(setups) < 0.25, setups


# -- bad requests get a 4xx with cause and fix; bad tasks fail alone ---------------------------------

@pytest.mark.parametrize("config, kind", [([CONFIG], "list"), ({"xml": CONFIG}, "object"), (42, "number")])
def test_label_config_that_is_not_xml_text_is_a_400(backend, config, kind):
    url = backend()
    response = requests.post(f"{url}/predict", json={"tasks": [{"id": 1, "data": {"image": "image0.png"}}],
                                                     "label_config": config}, timeout=30)
    assert response.status_code == 400
    assert f"must be the project's XML as a string, got a JSON {kind}" in response.json()["error"]
    response = requests.post(f"{url}/setup", json={"project": "1", "schema": config}, timeout=30)
    assert response.status_code == 400 and f"got a JSON {kind}" in response.json()["error"]
    assert requests.get(f"{url}/health", timeout=5).status_code == 200


@pytest.mark.parametrize("depth", [100_000, 900])
def test_deeply_nested_json_is_a_400(backend, depth):
    url = backend()
    nested = "[" * depth + "]" * depth
    for path, body in [("/predict", '{"tasks": [{"id": 1}], "label_config": %s}' % nested),
                       ("/setup", '{"project": "1", "schema": %s}' % nested)]:
        response = requests.post(f"{url}{path}", data=body, headers={"Content-Type": "application/json"}, timeout=30)
        assert response.status_code == 400, response.text
        assert "nested too deeply" in response.json()["error"] or "got a JSON list" in response.json()["error"]


@pytest.mark.parametrize("fields, status, message", [
    ({"hostname": ["http://x"]}, 400, "'hostname' must be a string or null, got a JSON list"),
    ({"access_token": 12345}, 400, "'access_token' must be a string or null, got a JSON number"),
    ({"hostname": "http://127.0.0.1:99999"}, 422, "must be a full URL such as http://127.0.0.1:8080"),
    ({"hostname": "ftp://example.com"}, 422, "must be a full URL"),
])
def test_setup_fields_of_the_wrong_type_are_refused(backend, fields, status, message):
    response = setup(backend(), **fields)
    assert response.status_code == status and message in response.json()["error"]


@pytest.mark.parametrize("reference, message", [
    ("http://127.0.0.1:99999/cat.png", "its port must be 1-65535"),
    ("http://[::1/cat.png", "is malformed (Invalid IPv6 URL)"),
    ("a" * 100_000, "is 100,000 characters long (the limit is 8,192)"),
    ("http://127.0.0.1/" + "a" * 100_000, "characters long (the limit is 8,192)"),
    ("sub/" + "a" * 300 + ".png", "cannot be read: File name too long"),
])
def test_bad_image_references_fail_alone(backend, reference, message):
    results = predict(backend(), [reference, "image0.png"])
    assert message in results[0]["error"] and "unexpected" not in results[0]["error"]
    assert len(results[0]["error"]) < 600  # a 100 KB reference is not echoed back
    assert len(results[1]["result"]) > 0


@pytest.mark.parametrize("options, message", [
    (["--port", "99999"], "argument --port: must be a port number from 1 to 65535, got 99999"),
    (["--port", "0"], "argument --port: must be a port number from 1 to 65535, got 0"),
    (["--port", "http"], "argument --port: must be a port number from 1 to 65535, got 'http'"),
    (["--threads", "0"], "argument --threads: must be at least 1, got 0"),
])
def test_serve_refuses_bad_port_and_threads(options, message):
    command = [sys.executable, "-m", "promptseg.cli", "labelstudio", "serve", "--model", "/nonexistent", *options]
    done = subprocess.run(command, env=clean_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr
    assert "backend on http" not in done.stdout


@pytest.mark.parametrize("host, auth, warned", [
    ("0.0.0.0", {}, True), ("0.0.0.0", {"BASIC_AUTH_USER": "ls", "BASIC_AUTH_PASS": "pw"}, False), ("127.0.0.1", {}, False),
])
def test_serving_beyond_loopback_without_basic_auth_warns_at_start(host, auth, warned):
    """The warning comes before the model loads; a missing model then stops it before it binds."""
    command = [sys.executable, "-m", "promptseg.cli", "labelstudio", "serve", "--host", host, "--port", "9",
               "--model", "/nonexistent/model"]
    done = subprocess.run(command, env=clean_env(**auth), capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "No model directory at /nonexistent/model" in done.stderr
    assert ("without basic auth" in done.stderr) is warned
    if warned:
        assert "Set BASIC_AUTH_USER and BASIC_AUTH_PASS" in done.stderr


@pytest.mark.parametrize("host, warned", [
    ("0.0.0.0", True), ("::", True), ("[::]", True), ("192.0.2.7", True), ("backend.example.org", True),
    ("127.0.0.1", False), ("127.0.0.2", False), ("localhost", False), ("::1", False), ("[::1]", False),
])
def test_exposure_warning_depends_on_the_bound_address(host, warned):
    from promptseg_labelstudio.config import BackendConfig, exposure_warning

    assert (exposure_warning(host, BackendConfig()) is not None) is warned
    assert exposure_warning(host, BackendConfig(basic_auth_user="u", basic_auth_pass="p")) is None


def test_decompression_bomb_fails_alone(backend, standin, ls_image_root):
    (ls_image_root / "bomb.png").write_bytes(bomb_png())
    try:
        url = backend(allowed_hosts=(standin.host,))
        results = predict(url, ["bomb.png", f"{standin.url}/bomb.png", "image0.png", f"{standin.url}/a.png"])
    finally:
        (ls_image_root / "bomb.png").unlink()
    for failed in results[:2]:
        assert "result" not in failed
        assert "unexpected" not in failed["error"] and "PROMPTSEG_MAX_PIXELS" in failed["error"]
    assert len(results[2]["result"]) > 0 and len(results[3]["result"]) > 0


def test_fetching_needs_no_private_sdk_module(backend, standin, monkeypatch):
    """label-studio-sdk 2.1.0 and 2.1.1 lack the private download hooks 2.1.2 has; none is needed."""
    monkeypatch.setitem(sys.modules, "label_studio_sdk._extensions.label_studio_tools.core.utils.io", None)
    url = backend(label_studio_url=standin.url, api_key=API_KEY)
    results = predict(url, [UPLOAD, "/data/local-files/?d=image0.png", f"{standin.url}/a.png"])
    assert all(len(r["result"]) > 0 for r in results), results


@pytest.mark.parametrize("variable, value, message", [
    ("PROMPTSEG_MAX_DOWNLOAD_BYTES", "lots", "PROMPTSEG_MAX_DOWNLOAD_BYTES must be an integer, got 'lots'"),
    ("PROMPTSEG_MAX_DOWNLOAD_BYTES", "0", "PROMPTSEG_MAX_DOWNLOAD_BYTES must be a positive number of bytes"),
    ("PROMPTSEG_DOWNLOAD_TIMEOUT", "-1", "PROMPTSEG_DOWNLOAD_TIMEOUT must be a positive number of seconds"),
    ("PROMPTSEG_WORK_SLOTS", "0", "PROMPTSEG_WORK_SLOTS must be at least 1"),
    ("PROMPTSEG_MAX_REQUEST_BYTES", "16M", "PROMPTSEG_MAX_REQUEST_BYTES must be an integer, got '16M'"),
    ("PROMPTSEG_PROJECTS_DIR", "/nonexistent/projects", "PROMPTSEG_PROJECTS_DIR /nonexistent/projects is not a folder: create it"),
])
def test_bad_limits_in_the_environment_name_the_variable(variable, value, message):
    from promptseg.errors import OptionError
    from promptseg_labelstudio.config import BackendConfig

    with pytest.raises(OptionError, match=message):
        BackendConfig.from_env({variable: value})
