"""A private FiftyOne database and plugins directory for these tests, plus small image datasets.

FiftyOne reads its configuration when it is first imported, so the environment is set when this
conftest is imported (before any test module imports fiftyone). The plugin is installed into the
temporary plugins directory with the same function `promptseg fiftyone install` uses.
"""

from __future__ import annotations

import numpy as np
import pytest

from promptseg_fiftyone._commands import install_plugin  # imports no fiftyone
from promptseg_fiftyone.testing import use_temporary_database

_ROOT = use_temporary_database("promptseg-fiftyone-tests-")
install_plugin(_ROOT / "plugins")



def structured_image(seed: int, height: int, width: int) -> np.ndarray:
    """A noisy image with two coloured rectangles, so the tiny model sees some structure."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 60, (height, width, 3), dtype=np.uint8)
    image[height // 5 : height // 2, width // 6 : width // 2] = (220, 40, 40)
    image[height // 2 : height - 5, width // 2 : width - 8] = (40, 200, 60)
    return image


@pytest.fixture(scope="session")
def image_paths(tmp_path_factory) -> list[str]:
    """Six PNG images of different sizes."""
    from PIL import Image

    root = tmp_path_factory.mktemp("fo-images")
    paths = []
    for index, (height, width) in enumerate([(96, 128), (120, 90), (80, 150), (100, 100), (110, 140), (75, 95)]):
        path = root / f"image{index}.png"
        Image.fromarray(structured_image(index, height, width)).save(path)
        paths.append(str(path))
    return paths


@pytest.fixture(scope="session")
def corrupt_path(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("fo-bad") / "corrupt.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n this is not really a PNG")
    return str(path)


def write_bomb_png(path, width: int = 30000, height: int = 30000) -> None:
    """A small PNG whose header declares `width` x `height` pixels: a decompression bomb."""
    import io
    import struct
    import zlib

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    assert data[12:16] == b"IHDR"  # the first chunk: length, type, 13 bytes of data, CRC
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))


@pytest.fixture(scope="session")
def bomb_path(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("fo-bomb") / "bomb.png"
    write_bomb_png(path)
    return str(path)


@pytest.fixture(scope="session")
def fo():
    import fiftyone

    return fiftyone


@pytest.fixture
def fo_segmenter(tiny_sam3_dir):
    """The process-wide segmenter the operator also gets for model=tiny_sam3_dir, device=cpu.

    Asked for in every test: the shared cache keeps the two latest models, so another test's model
    may have replaced an earlier one (the tiny model loads again in a moment)."""
    from promptseg.sessions import shared_segmenter

    return shared_segmenter(str(tiny_sam3_dir), device="cpu")


@pytest.fixture
def make_dataset(fo, image_paths):
    """Factory for fresh (non-persistent) datasets over the test images; deleted afterwards."""
    made = []

    def make(paths=None, **fields):
        dataset = fo.Dataset()
        samples = []
        for index, path in enumerate(image_paths if paths is None else paths):
            sample = fo.Sample(filepath=path)
            for name, values in fields.items():
                sample[name] = values[index]
            samples.append(sample)
        dataset.add_samples(samples)
        made.append(dataset)
        return dataset

    yield make
    for dataset in made:
        if not dataset.deleted:
            dataset.delete()


@pytest.fixture
def dataset(make_dataset):
    return make_dataset()
