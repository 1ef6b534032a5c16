"""Personal access tokens against a stand-in Label Studio that records every request.

A personal access token is a JWT refresh token: the backend exchanges it at LABEL_STUDIO_URL's
``/api/token/refresh/`` (and nowhere else) for a short-lived access token sent as ``Bearer``, asks
again when that expires or Label Studio answers 401, and never sends either token to another
host. Legacy tokens (``Token ...``) are covered in test_hardening.py.
"""

from __future__ import annotations

import time

import pytest
import requests
from lshelpers import CONFIGS
from standin import StandInHost, make_jwt

UPLOAD = "/data/upload/1/cat.png"
PROXY_PATH = "/storage-data/uploaded/?filepath=upload/1/cat.png"
REFRESH = "/api/token/refresh/"


@pytest.fixture
def label_studio(standin):
    standin.refresh_token = make_jwt("refresh", 3600)
    return standin


@pytest.fixture
def backend(ls_model, tmp_path, serve_backend):
    """The real app on waitress with config `changes` (the session's segmenter); stopped in teardown."""
    return lambda **changes: serve_backend(ls_model, download_dir=tmp_path, download_timeout=5.0, **changes)


def predict(url: str, images: list[str]) -> list[dict]:
    tasks = [{"id": i + 1, "data": {"image": image}} for i, image in enumerate(images)]
    response = requests.post(f"{url}/predict", json={"tasks": tasks, "project": "1.1", "label_config": CONFIGS["brush"]},
                             timeout=120)
    assert response.status_code == 200, response.text
    return response.json()["results"]


def seen(host: StandInHost) -> list[tuple[str, str, str]]:
    """(method, path, Authorization header) of every request `host` got."""
    return [(r["method"], r["path"], r["headers"].get("authorization", "")) for r in host.requests]


def everything_sent_to(host: StandInHost) -> str:
    return "\n".join([str(r.get("body")) for r in host.requests] + [v for h in host.headers_seen() for v in h.values()])


def test_personal_access_token_is_exchanged_only_at_label_studio_and_sent_as_bearer(backend, label_studio, other_host):
    pat = label_studio.refresh_token
    other_host.refresh_token = pat  # it would accept the token too: the backend must still never offer it
    url = backend(label_studio_url=label_studio.url, api_key=pat, allowed_hosts=(other_host.host,))
    redirect = f"{label_studio.url}/redirect?to={other_host.url}/moved.png"
    results = predict(url, [UPLOAD, f"{other_host.url}/direct.png", redirect, UPLOAD])
    assert all(len(r["result"]) > 0 for r in results), results
    [access] = label_studio.issued  # one exchange serves every download while the access token lives
    bearer = f"Bearer {access}"
    assert seen(label_studio) == [("POST", REFRESH, ""), ("GET", PROXY_PATH, bearer),
                                  ("GET", f"/redirect?to={other_host.url}/moved.png", bearer), ("GET", PROXY_PATH, bearer)]
    assert label_studio.requests[0]["body"] == {"refresh": pat}
    assert sorted(seen(other_host)) == [("GET", "/direct.png", ""), ("GET", "/moved.png", "")]
    assert pat not in everything_sent_to(other_host) and access not in everything_sent_to(other_host)
    assert pat not in "\n".join(h for _, _, h in seen(label_studio))  # the refresh token itself never goes as a header


def test_expired_access_token_is_refreshed(backend, label_studio):
    label_studio.access_seconds = 2
    url = backend(label_studio_url=label_studio.url, api_key=label_studio.refresh_token)
    assert len(predict(url, [UPLOAD])[0]["result"]) > 0
    time.sleep(3.5)  # the access token has expired
    assert len(predict(url, [UPLOAD])[0]["result"]) > 0
    first, second = label_studio.issued
    assert seen(label_studio) == [("POST", REFRESH, ""), ("GET", PROXY_PATH, f"Bearer {first}"),
                                  ("POST", REFRESH, ""), ("GET", PROXY_PATH, f"Bearer {second}")]


def test_a_401_gets_a_new_access_token_and_one_retry(backend, label_studio):
    url = backend(label_studio_url=label_studio.url, api_key=label_studio.refresh_token)
    assert len(predict(url, [UPLOAD])[0]["result"]) > 0
    label_studio.revoked.add(label_studio.issued[0])  # Label Studio stops accepting it before it expires
    assert len(predict(url, [UPLOAD])[0]["result"]) > 0
    first, second = label_studio.issued
    assert seen(label_studio) == [("POST", REFRESH, ""), ("GET", PROXY_PATH, f"Bearer {first}"),
                                  ("GET", PROXY_PATH, f"Bearer {first}"), ("POST", REFRESH, ""),
                                  ("GET", PROXY_PATH, f"Bearer {second}")]


def test_a_revoked_personal_access_token_fails_the_task_with_the_fix(backend, label_studio):
    url = backend(label_studio_url=label_studio.url, api_key=label_studio.refresh_token)
    label_studio.refresh_token = None  # revoked in Label Studio: every exchange is refused
    [failed, local] = predict(url, [UPLOAD, "image0.png"])
    assert "refused to exchange the personal access token (HTTP 401" in failed["error"]
    assert "Account & Settings > Personal Access Token" in failed["error"] and "LABEL_STUDIO_API_KEY" in failed["error"]
    assert len(local["result"]) > 0  # other tasks go on
    assert [method for method, _, _ in seen(label_studio)] == ["POST"]  # no file request without an access token


@pytest.mark.parametrize("token, message", [
    (make_jwt("refresh", -60), "API key has expired"),
    ("eyJhbGciOiJIUzI1NiJ9.eyJ0b2tlbl90eXBlIjoicmVmcmVzaCJ9.c2ln", "does not have an expiration set"),
])
def test_a_personal_access_token_that_cannot_work_stops_the_backend_at_start(token, message):
    from promptseg.errors import OptionError
    from promptseg_labelstudio.config import BackendConfig

    with pytest.raises(OptionError) as raised:
        BackendConfig.from_env({"LABEL_STUDIO_URL": "http://127.0.0.1:8080", "LABEL_STUDIO_API_KEY": token})
    assert message in str(raised.value) and "LABEL_STUDIO_API_KEY is a personal access token" in str(raised.value)
    assert "Account & Settings > Personal Access Token" in str(raised.value)
