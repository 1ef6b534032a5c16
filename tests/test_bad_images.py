"""Bad images: each gets a clear `ImageError` or `OptionError`, and batches and stacks go on.

The pixel budget (decompression bombs, TIFFs declaring huge planes) is checked from headers
and metadata before any pixel is decoded. Short images keep their colours on the way into the
model, and a guessed channel-first layout is logged.
"""

from __future__ import annotations

import logging
import struct
import subprocess
import sys
import textwrap
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from promptseg.errors import ImageError, OptionError
from promptseg.images import DEFAULT_MAX_PIXELS, MAX_PIXELS_ENV, load_image, resolve_max_pixels, to_rgb8


@pytest.fixture(autouse=True)
def default_budget(monkeypatch):
    """Every test starts from the default budget, whatever the calling shell sets."""
    monkeypatch.delenv(MAX_PIXELS_ENV, raising=False)


def png_declaring(path: Path, width: int, height: int) -> Path:
    """A 70-byte PNG whose header declares `width` x `height` RGB pixels (a decompression bomb)."""
    Image.new("RGB", (1, 1), (255, 0, 0)).save(path)
    data = bytearray(path.read_bytes())
    struct.pack_into(">II", data, 16, width, height)  # IHDR width and height
    struct.pack_into(">I", data, 29, zlib.crc32(bytes(data[12:29])))  # IHDR checksum
    path.write_bytes(bytes(data))
    return path


def tiff_declaring(path: Path, width: int, height: int) -> Path:
    """A tiny TIFF whose tags declare a `width` x `height` uint8 plane."""
    import tifffile

    tifffile.imwrite(path, np.zeros((8, 8), np.uint8))
    with tifffile.TiffFile(path, mode="r+") as tif:
        tif.pages[0].tags["ImageWidth"].overwrite(width)
        tif.pages[0].tags["ImageLength"].overwrite(height)
    return path


def save_png(path: Path, pixels: np.ndarray) -> Path:
    Image.fromarray(pixels).save(path)
    return path


# -- files that do not decode ---------------------------------------------------------------------

def _directory(tmp_path):
    (tmp_path / "photos.png").mkdir()
    return tmp_path / "photos.png"


def _text_named_jpg(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("these are notes, not pixels\n" * 20)
    return path


def _truncated_png(tmp_path):
    rng = np.random.default_rng(1)
    whole = save_png(tmp_path / "whole.png", rng.integers(0, 255, (200, 300, 3), dtype=np.uint8))
    path = tmp_path / "truncated.png"
    path.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    return path


def _truncated_tiff(tmp_path):
    import tifffile

    whole = tmp_path / "whole.tif"
    tifffile.imwrite(whole, np.random.default_rng(2).integers(0, 4000, (200, 300), dtype=np.uint16))
    path = tmp_path / "truncated.tif"
    path.write_bytes(whole.read_bytes()[:1000])
    return path


def _not_a_tiff(tmp_path):
    path = tmp_path / "scan.tif"
    path.write_bytes(b"II*\x00" + b"\xff" * 64)  # a TIFF signature, then garbage
    return path


@pytest.mark.parametrize(
    "make, words",
    [
        (_directory, "is a directory"),
        (_text_named_jpg, "not in an image format"),
        (_truncated_png, "truncated"),
        (_truncated_tiff, "Cannot read TIFF"),
        (_not_a_tiff, "Cannot read TIFF"),
    ],
    ids=["directory", "text-named-jpg", "truncated-png", "truncated-tiff", "corrupt-tiff"],
)
def test_files_that_do_not_decode_are_image_errors_naming_the_file(tmp_path, make, words):
    path = make(tmp_path)
    with pytest.raises(ImageError, match=words) as info:
        load_image(path)
    assert path.name in str(info.value)


# -- the pixel budget -----------------------------------------------------------------------------

def test_png_bomb_is_refused_with_its_size_the_limit_and_how_to_raise_it(tmp_path):
    bomb = png_declaring(tmp_path / "bomb.png", 30000, 30000)
    assert bomb.stat().st_size < 100

    with pytest.raises(ImageError) as info:
        load_image(bomb)

    message = str(info.value)
    assert str(bomb) in message and "900,000,000 pixels" in message
    assert f"{DEFAULT_MAX_PIXELS:,}" in message
    assert "max_pixels" in message and MAX_PIXELS_ENV in message and "--tile" in message


def test_segment_batch_reports_a_bomb_and_segments_the_images_after_it(segmenter, rgb_image, tmp_path):
    good = save_png(tmp_path / "good.png", rgb_image)
    bomb = png_declaring(tmp_path / "bomb.png", 30000, 30000)

    results = list(segmenter.segment_batch([good, bomb, good], "red square", threshold=0.0))

    assert [r.error is None for r in results] == [True, False, True]
    assert "900,000,000 pixels" in results[1].error and results[1].source == str(bomb)
    assert results[1].instances == [] and len(results[0]) == len(results[2]) > 0


def test_tiff_declaring_a_huge_plane_is_refused_from_its_metadata(tmp_path):
    bomb = tiff_declaring(tmp_path / "slide.tif", 100000, 100000)

    tracemalloc.start()
    try:
        with pytest.raises(ImageError, match="100000 x 100000") as info:
            load_image(bomb)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()

    assert MAX_PIXELS_ENV in str(info.value)
    assert peak < 32 * 1024**2, f"{peak / 1024**2:.0f} MiB allocated for a refused image"


def test_budget_comes_from_the_option_then_the_environment_then_the_default(tmp_path, monkeypatch):
    image = save_png(tmp_path / "image.png", np.zeros((60, 80, 3), np.uint8))  # 4,800 pixels
    assert resolve_max_pixels() == DEFAULT_MAX_PIXELS == 2**28
    assert load_image(image).shape == (60, 80, 3)

    monkeypatch.setenv(MAX_PIXELS_ENV, "4000")
    with pytest.raises(ImageError, match="4,000 pixels"):
        load_image(image)
    assert load_image(image, max_pixels=5000).shape == (60, 80, 3)  # the option wins
    with pytest.raises(ImageError, match="4,800"):
        load_image(image, max_pixels=4799)

    monkeypatch.setenv(MAX_PIXELS_ENV, "4800")
    assert load_image(image).shape == (60, 80, 3)  # the limit itself is allowed


def test_load_segmenter_max_pixels_is_a_per_segmenter_budget(make_segmenter, rgb_image, tmp_path, monkeypatch):
    image = save_png(tmp_path / "image.png", rgb_image)  # 120 x 200 = 24,000 pixels
    monkeypatch.setenv(MAX_PIXELS_ENV, "15000")
    strict, generous = make_segmenter(), make_segmenter(max_pixels=24000)

    [refused] = strict.segment_batch([image], "cat", threshold=0.0)
    accepted = generous.segment(image, "cat", threshold=0.0)

    assert "200 x 120 = 24,000 pixels" in refused.error and "limit of 15,000" in refused.error
    assert accepted.image_size == (120, 200) and len(accepted) > 0
    assert generous.max_pixels == 24000 and strict.max_pixels is None


@pytest.mark.parametrize(
    "where, value",
    [("option", 0), ("option", -5), ("option", True), ("option", 1.5e9), ("env", "lots"), ("env", "0")],
    ids=["zero", "negative", "bool", "float", "env-text", "env-zero"],
)
def test_a_bad_budget_is_an_option_error(tmp_path, monkeypatch, where, value):
    image = save_png(tmp_path / "image.png", np.zeros((8, 8, 3), np.uint8))
    if where == "env":
        monkeypatch.setenv(MAX_PIXELS_ENV, value)
        with pytest.raises(OptionError, match=MAX_PIXELS_ENV):
            load_image(image)
    else:
        with pytest.raises(OptionError, match="max_pixels"):
            load_image(image, max_pixels=value)


def test_load_segmenter_refuses_a_bad_budget_before_loading(tiny_sam3_dir):
    from promptseg import load_segmenter

    with pytest.raises(OptionError, match="max_pixels"):
        load_segmenter(str(tiny_sam3_dir), device="cpu", cache_dir=False, max_pixels=0)


def test_pillow_checks_at_our_budget_during_a_read_and_its_own_limit_comes_back(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50)  # a host process that set a very low limit
    image = save_png(tmp_path / "small.png", np.full((20, 20, 3), 7, np.uint8))  # 400 > 2 x 50

    assert load_image(image, max_pixels=1000)[0, 0].tolist() == [7, 7, 7]
    assert Image.MAX_IMAGE_PIXELS == 50
    with pytest.raises(ImageError, match="over the limit of 300"):
        load_image(image, max_pixels=300)
    assert Image.MAX_IMAGE_PIXELS == 50
    with pytest.raises(Image.DecompressionBombError):  # outside promptseg, Pillow's own limit stands
        Image.open(image)


def test_pil_images_and_lazy_arrays_are_checked_but_numpy_arrays_are_used_as_they_are():
    import dask.array as da

    reads = []
    lazy = da.zeros((40000, 40000), np.uint8, chunks=8192).map_blocks(
        lambda block: reads.append(block.shape) or block, meta=np.empty((0, 0), np.uint8)
    )

    with pytest.raises(ImageError, match="40000 x 40000"):
        load_image(lazy)
    assert reads == []  # refused from its shape: nothing computed
    with pytest.raises(ImageError, match="300 x 200"):
        load_image(Image.new("RGB", (300, 200)), max_pixels=1000)
    assert load_image(np.zeros((200, 300), np.uint8), max_pixels=1000).shape == (200, 300, 3)


def test_a_decoder_out_of_memory_is_an_image_error(tmp_path):
    """Under a 2 GiB address-space cap, decoding a bomb with the budget lifted fails cleanly."""
    png = png_declaring(tmp_path / "bomb.png", 30000, 30000)
    tif = tiff_declaring(tmp_path / "bomb.tif", 100000, 100000)
    script = textwrap.dedent(f"""
        import resource
        resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))
        from promptseg.errors import ImageError
        from promptseg.images import load_image
        for path in ({str(png)!r}, {str(tif)!r}):
            try:
                load_image(path, max_pixels=10**11)
            except ImageError as exc:
                print("ImageError:", exc)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)

    lines = done.stdout.splitlines()
    assert done.returncode == 0, done.stderr[-2000:]
    assert len(lines) == 2 and all("Not enough memory to decode" in line for line in lines), lines
    assert "bomb.png" in lines[0] and "bomb.tif" in lines[1] and MAX_PIXELS_ENV in lines[0]


# -- colours of short images ----------------------------------------------------------------------

@pytest.fixture(scope="module", params=["sam3", "sam3-meta"])
def backend_segmenter(request, tiny_sam3_dir, tmp_path_factory):
    from promptseg import load_segmenter

    model = str(tiny_sam3_dir)
    if request.param == "sam3-meta":
        from promptseg.testing import make_random_meta_sam3

        model = str(make_random_meta_sam3(tmp_path_factory.mktemp("models") / "tiny-meta"))
    segmenter = load_segmenter(model, device="cpu", cache_dir=False)
    assert segmenter.backend.name == request.param
    return segmenter


@pytest.mark.parametrize("height", [1, 3, 40], ids=["1-high", "3-high", "40-high"])
def test_short_images_reach_the_model_in_their_colours(backend_segmenter, height):
    red = np.zeros((height, 40, 3), np.uint8)
    red[..., 0] = 255

    pixels = backend_segmenter.backend.preprocess(to_rgb8(red))

    assert tuple(pixels.shape[:2]) == (1, 3) and tuple(pixels.shape[2:]) == backend_segmenter.backend.input_size
    means = pixels[0].float().mean(dim=(1, 2))
    # red at full intensity, green and blue at zero, after each backend's normalisation
    assert means[0] > 0.9 and means[1] < -0.9 and means[2] < -0.9, means.tolist()


# -- the channel-first guess ----------------------------------------------------------------------

def test_a_channel_first_guess_is_logged_with_the_options_that_avoid_it(caplog):
    stack_like = np.random.default_rng(3).integers(0, 4000, (4, 64, 80), dtype=np.uint16)

    with caplog.at_level(logging.WARNING, logger="promptseg.images"):
        rgb = to_rgb8(stack_like)

    assert rgb.shape == (64, 80, 3)
    [record] = [r for r in caplog.records if r.name == "promptseg.images"]
    message = record.getMessage()
    assert record.levelno == logging.WARNING and "(4, 64, 80)" in message
    assert "channels=" in message and "segment_stack" in message and "axes='ZYX'" in message

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="promptseg.images"):
        to_rgb8(np.moveaxis(stack_like, 0, -1))  # channel-last: nothing is guessed
    assert [r for r in caplog.records if r.name == "promptseg.images"] == []


# -- stacks: an unusable slice is reported, the others are segmented ------------------------------

def test_stack_reports_unreadable_and_mismatched_slices_and_segments_the_rest(segmenter, rgb_image, tmp_path):
    good = save_png(tmp_path / "good.png", rgb_image)
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    smaller = rgb_image[:60]

    result = segmenter.segment_stack(
        [good, corrupt, rgb_image, tmp_path / "missing.png", smaller, good], "red square", threshold=0.0
    )

    assert len(result) == 6 and sorted(result.errors) == [1, 3, 4]
    assert "corrupt" in result.errors[1] and "No such image file" in result.errors[3]
    assert "Slice 4 is 200 x 60" in result.errors[4] and "same size" in result.errors[4]
    assert all(len(result[i]) > 0 for i in (0, 2, 5))
    volume = result.to_label_volume()
    assert volume.shape == (6, 120, 200)
    assert not volume[[1, 3, 4]].any() and volume[[0, 2, 5]].any()


def test_stack_with_an_all_nan_slice_scaled_per_slice_skips_only_that_slice(segmenter):
    stack = np.random.default_rng(4).normal(100, 20, (3, 64, 80)).astype(np.float32)
    stack[1] = np.nan

    result = segmenter.segment_stack(stack, "cell", normalize="slice", threshold=0.0)

    assert list(result.errors) == [1] and "no finite pixel" in result.errors[1]
    assert len(result[0]) > 0 and len(result[2]) > 0


def test_lazy_stack_with_a_missing_slice_file_is_read_slice_by_slice(segmenter, tmp_path):
    import dask
    import dask.array as da

    rng = np.random.default_rng(5)
    paths = []
    for index in range(4):
        paths.append(tmp_path / f"z{index}.npy")
        np.save(paths[-1], rng.integers(100, 3000, (64, 80), dtype=np.uint16))
    lazy = da.stack([da.from_delayed(dask.delayed(np.load)(str(p)), (64, 80), np.uint16) for p in paths])
    paths[2].unlink()  # moved away after the stack was opened

    result = segmenter.segment_stack(lazy, "cell", threshold=0.0, link=True)

    assert list(result.errors) == [2] and "Cannot read slice 2" in result.errors[2]
    assert "FileNotFoundError" in result.errors[2]
    assert all(len(result[i]) > 0 for i in (0, 1, 3)) and result.shape == (4, 64, 80)


def test_stack_planes_over_the_budget_are_refused_before_reading(make_segmenter, tmp_path):
    import dask.array as da
    import tifffile

    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, np.zeros((3, 64, 80), np.uint16), metadata={"axes": "ZYX"})
    reads = []
    lazy = da.zeros((3, 64, 80), np.uint16, chunks=(1, 64, 80)).map_blocks(
        lambda block: reads.append(block.shape) or block, meta=np.empty((0, 0, 0), np.uint16)
    )
    segmenter = make_segmenter(max_pixels=5000)  # 64 x 80 = 5,120

    for stack in (path, lazy):
        with pytest.raises(ImageError, match="80 x 64 = 5,120 pixels, over the limit of 5,000"):
            segmenter.segment_stack(stack, "cell")
    assert reads == []


def test_stack_where_no_slice_can_be_used_is_an_image_error(segmenter, tmp_path):
    with pytest.raises(ImageError, match="No slice of the stack could be used; slice 0: No such image file"):
        segmenter.segment_stack([tmp_path / "a.png", tmp_path / "b.png"], "cell")
