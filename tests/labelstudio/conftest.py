"""Fixtures for the Label Studio backend: one model per session on the tiny SAM 3, test images,
labeling configs of each supported kind, and helpers that decode Label Studio regions."""

from __future__ import annotations

from pathlib import Path

import pytest

import flask  # noqa: F401
import label_studio_sdk  # noqa: F401

from lshelpers import THRESHOLD, make_image  # noqa: E402
from standin import LiveBackend, StandInHost  # noqa: E402


@pytest.fixture(scope="session")
def ls_image_root(tmp_path_factory) -> Path:
    """A document root holding a few PNGs (and nothing else)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("ls-images")
    for seed in range(4):
        Image.fromarray(make_image(seed)).save(root / f"image{seed}.png")
    (root / "sub").mkdir()
    Image.fromarray(make_image(9)).save(root / "sub" / "nested.png")
    return root


@pytest.fixture(scope="session")
def ls_model(tiny_sam3_dir, ls_image_root, tmp_path_factory):
    """One backend model per session: loading once per process is the point."""
    from promptseg_labelstudio.config import BackendConfig
    from promptseg_labelstudio.model import PromptsegMLBackend

    config = BackendConfig(model=str(tiny_sam3_dir), device="cpu", threshold=THRESHOLD,
                           document_root=ls_image_root, cache_dir=tmp_path_factory.mktemp("ls-cache"))
    return PromptsegMLBackend(config)


@pytest.fixture(scope="session")
def ls_hub_model(tiny_sam3_hub_dir, ls_image_root, tmp_path_factory):
    """A backend on the tiny SAM 3 in the hub's layout, whose tracker head answers clicks and boxes."""
    from promptseg_labelstudio.config import BackendConfig
    from promptseg_labelstudio.model import PromptsegMLBackend

    config = BackendConfig(model=str(tiny_sam3_hub_dir), device="cpu", threshold=THRESHOLD,
                           document_root=ls_image_root, cache_dir=tmp_path_factory.mktemp("ls-hub-cache"))
    return PromptsegMLBackend(config)


@pytest.fixture
def make_app(ls_model):
    """An app around the session model, optionally with another config (same segmenter)."""
    from promptseg_labelstudio.app import create_app
    from promptseg_labelstudio.model import PromptsegMLBackend

    def make(**changes):
        if not changes:
            return create_app(ls_model)
        from dataclasses import replace

        return create_app(PromptsegMLBackend(replace(ls_model.config, **changes), segmenter=ls_model.segmenter))

    return make


@pytest.fixture
def client(make_app):
    return make_app().test_client()


@pytest.fixture
def standin():
    """A stand-in host on 127.0.0.1 that records every request it gets (Label Studio, or a file host)."""
    host = StandInHost()
    yield host
    host.close()


@pytest.fixture
def other_host():
    """A second stand-in host: one the backend was not told about."""
    host = StandInHost()
    yield host
    host.close()


@pytest.fixture
def serve_backend():
    """`start(model, threads=4, **config_changes)`: the real app around `model`'s segmenter with its
    config changed, served by waitress on 127.0.0.1; returns the URL. Every server stops in teardown."""
    from dataclasses import replace

    from promptseg_labelstudio.app import create_app
    from promptseg_labelstudio.model import PromptsegMLBackend

    servers = []

    def start(model, threads: int = 4, **changes) -> str:
        backend = PromptsegMLBackend(replace(model.config, **changes), segmenter=model.segmenter)
        server = LiveBackend(create_app(backend), threads)
        servers.append(server)
        return server.url

    yield start
    for server in servers:
        server.close()


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    """Two small photos to upload to a real Label Studio server."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("upload")
    paths = []
    for seed in (0, 1):
        path = folder / f"photo{seed}.png"
        Image.fromarray(make_image(seed, size=(72, 96))).save(path)
        paths.append(path)
    return paths
