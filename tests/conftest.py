"""Session fixtures: a tiny random SAM 3 saved to disk once, and isolated caches.

Every test goes through the real loader (`load_segmenter` on a saved directory). Nothing here
touches the user's cache or the network.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest


def pytest_configure(config):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # "auto" is bf16 on CPUs with native bf16 and fp32 elsewhere; the suite states its precision so
    # parity tests mean the same on every x86-64 CPU (tests/test_precision.py covers "auto" itself)
    os.environ["PROMPTSEG_DTYPE"] = "fp32"
    os.environ.setdefault("FIFTYONE_DO_NOT_TRACK", "true")


@pytest.fixture(scope="session", autouse=True)
def isolated_cache_dir(tmp_path_factory) -> Path:
    """Point the default embedding cache at a temporary directory for the whole session."""
    path = tmp_path_factory.mktemp("promptseg-cache")
    previous = os.environ.get("PROMPTSEG_CACHE_DIR")
    os.environ["PROMPTSEG_CACHE_DIR"] = str(path)
    yield path
    if previous is None:
        os.environ.pop("PROMPTSEG_CACHE_DIR", None)
    else:
        os.environ["PROMPTSEG_CACHE_DIR"] = previous


@pytest.fixture(scope="session")
def tiny_sam3_dir(tmp_path_factory) -> Path:
    """A tiny random SAM 3 written by ``Sam3Model.save_pretrained`` (no tokenizer/processor files)."""
    from promptseg.testing import make_random_sam3

    return make_random_sam3(tmp_path_factory.mktemp("models") / "tiny-sam3")


@pytest.fixture(scope="session")
def tiny_sam3_hub_dir(tmp_path_factory) -> Path:
    """A tiny random SAM 3 in the hub's layout (``facebook/sam3`` is a video model: ``detector_model.*``,
    ``tracker_model.*``, ``tracker_neck.*``), so visual prompts load the tracker as users do."""
    from promptseg.testing import make_random_sam3_video

    return make_random_sam3_video(tmp_path_factory.mktemp("models") / "tiny-sam3-hub")


@pytest.fixture
def make_segmenter(tiny_sam3_dir, tmp_path):
    """Factory for fresh segmenters on the tiny model; each call may share or not share a cache dir."""
    from promptseg import load_segmenter

    def make(cache_dir=None, **options):
        return load_segmenter(
            str(tiny_sam3_dir), device="cpu",
            cache_dir=tmp_path / "cache" if cache_dir is None else cache_dir, **options,
        )

    return make


@pytest.fixture
def segmenter(make_segmenter):
    return make_segmenter()


@pytest.fixture
def rgb_image() -> np.ndarray:
    """A non-square RGB image with some structure."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 60, (120, 200, 3), dtype=np.uint8)
    image[30:80, 40:110] = (220, 40, 40)
    image[60:100, 130:180] = (40, 200, 60)
    return image
