"""Scientific pixels: uint16/int/float/NaN inputs, percentile scaling, channels, and untouched inputs."""

from __future__ import annotations

import numpy as np
import pytest

from promptseg.errors import ImageError, OptionError
from promptseg.images import intensity_limits, load_image, to_rgb8
from promptseg.tiling import tile_grid


def test_uint16_percentiles_map_to_the_full_8_bit_range():
    ramp = np.arange(10_000, dtype=np.uint16).reshape(100, 100)
    rgb = to_rgb8(ramp, percentiles=(1, 99))
    assert rgb.shape == (100, 100, 3) and rgb.dtype == np.uint8
    assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()
    flat = rgb[..., 0].ravel()
    assert flat[:100].max() == 0 and flat[-100:].min() == 255  # below 1 % black, above 99 % white
    assert np.all(np.diff(flat.astype(int)) >= 0)  # monotonic
    wide = to_rgb8(ramp, percentiles=(0, 100))[..., 0].ravel()
    assert wide[0] == 0 and wide[-1] == 255 and wide[5000] == 128


def test_signed_and_float_pixels_with_nans_are_scaled_without_touching_the_input():
    signed = np.linspace(-3000, 3000, 64 * 64).reshape(64, 64).astype(np.int16)
    out = to_rgb8(signed, percentiles=(0, 100))
    assert out[0, 0, 0] == 0 and out[-1, -1, 0] == 255

    floats = np.linspace(0.0, 1.0, 64 * 64, dtype=np.float32).reshape(64, 64)
    floats[10:20, 10:20] = np.nan
    floats[0, :5] = np.inf
    before = floats.copy()
    out = load_image(floats, percentiles=(0, 100))
    assert (out[10:20, 10:20] == 0).all() and (out[0, :5] == 0).all()
    assert out[-1, -1, 0] == 255
    np.testing.assert_array_equal(floats, before)  # NaNs and all: the caller's array is unchanged


def test_an_image_without_finite_pixels_is_a_clear_error():
    with pytest.raises(ImageError, match="no finite pixel"):
        to_rgb8(np.full((8, 8), np.nan, dtype=np.float64))


def test_each_channel_is_scaled_on_its_own():
    image = np.zeros((32, 32, 2), dtype=np.uint16)
    image[..., 0] = np.arange(32)[None, :] * 2000  # bright channel
    image[..., 1] = np.arange(32)[:, None]  # dim channel (0..31)
    rgb = to_rgb8(image, percentiles=(0, 100))
    assert rgb[:, -1, 0].min() == 255 and rgb[-1, :, 1].min() == 255  # both reach full brightness
    assert (rgb[..., 2] == 0).all()  # two channels: blue stays empty


def test_channels_pick_and_order_channels_of_a_multichannel_image():
    image = np.zeros((16, 16, 5), dtype=np.uint16)
    for c in range(5):
        image[..., c] = (c + 1) * 1000
        image[c, c, c] = 0  # give each channel a range
    rgb = to_rgb8(image, channels=(4, 2, 0), percentiles=(0, 100))
    assert rgb[4, 4, 0] == 0 and rgb[2, 2, 1] == 0 and rgb[0, 0, 2] == 0
    assert rgb[8, 8].tolist() == [255, 255, 255]
    single = to_rgb8(image, channels=(3,), percentiles=(0, 100))
    assert single[3, 3].tolist() == [0, 0, 0] and single[8, 8].tolist() == [255, 255, 255]
    with pytest.raises(OptionError, match="channels"):
        to_rgb8(image, channels=(5,))
    with pytest.raises(OptionError, match="channels"):
        to_rgb8(image, channels=(0, 1, 2, 3))


def test_channel_first_arrays_are_understood():
    image = np.random.default_rng(0).integers(0, 4096, (3, 40, 50), dtype=np.uint16)
    np.testing.assert_array_equal(to_rgb8(image), to_rgb8(np.moveaxis(image, 0, -1)))


@pytest.mark.parametrize("percentiles", [(50, 10), (-1, 99), (0, 101)])
def test_bad_percentiles_are_explained(percentiles):
    with pytest.raises(OptionError, match="percentiles"):
        to_rgb8(np.ones((8, 8), np.uint16), percentiles=percentiles)


def test_fixed_limits_give_every_slice_the_same_scale():
    dim = np.full((8, 8), 100, dtype=np.uint16)
    bright = np.full((8, 8), 900, dtype=np.uint16)
    dim[0, 0] = bright[0, 0] = 0
    limits = intensity_limits(np.stack([dim, bright]), (0, 100))
    assert limits.tolist() == [[0.0, 900.0]]
    assert to_rgb8(dim, limits=limits)[1, 1, 0] == 28
    assert to_rgb8(bright, limits=limits)[1, 1, 0] == 255


def test_large_images_are_sampled_for_percentiles_and_scaled_with_the_limits():
    big = np.random.default_rng(1).integers(0, 65535, (3000, 2000), dtype=np.uint16)
    limits = intensity_limits(big, (1, 99))
    exact = np.percentile(big, [1, 99])
    assert np.allclose(limits[0], exact, rtol=0.01)
    out = to_rgb8(big, limits=limits)
    low, high = limits[0]
    expected = np.clip(np.rint((big[:5].astype(np.float64) - low) * (255 / (high - low))), 0, 255)
    assert np.abs(out[:5, :, 0].astype(int) - expected.astype(int)).max() <= 1  # float32 rounding


def test_segmenter_takes_uint16_and_float_pixels_and_leaves_them_alone(make_segmenter):
    rng = np.random.default_rng(2)
    counts = rng.integers(200, 800, (90, 110), dtype=np.uint16)
    counts[20:60, 30:80] += 20_000
    before = counts.copy()
    seg = make_segmenter()
    result = seg.segment(counts, "bright cell", threshold=0.0, percentiles=(0.1, 99.9))
    assert result.image_size == (90, 110)
    np.testing.assert_array_equal(counts, before)
    # the same picture as float32 (a linear rescale) becomes the same 8-bit pixels: one embedding
    as_float = counts.astype(np.float32) / 65535.0
    again = seg.segment(as_float, "bright cell", threshold=0.0, percentiles=(0.1, 99.9))
    assert again.embedding_source == "memory" and seg.stats.image_encoder_runs == 1
    # other percentiles change the pixels, hence the embedding
    seg.segment(counts, "bright cell", threshold=0.0, percentiles=(5, 95))
    assert seg.stats.image_encoder_runs == 2


def test_segmenter_selects_channels_of_a_multichannel_image(make_segmenter):
    rng = np.random.default_rng(3)
    stack = rng.integers(0, 100, (80, 96, 4), dtype=np.uint16)
    stack[10:40, 10:40, 3] += 5000
    seg = make_segmenter()
    seg.segment(stack, "cell", threshold=0.0, channels=(3,))
    assert seg.is_cached(to_rgb8(stack, channels=(3,)))
    assert not seg.is_cached(to_rgb8(stack))
    with pytest.raises(OptionError, match="channels"):
        seg.segment(stack, "cell", channels=(7,))


def test_tiled_segmentation_of_a_uint16_image_never_changes_it(make_segmenter):
    image = np.random.default_rng(4).integers(0, 60000, (150, 170), dtype=np.uint16)
    before = image.copy()
    result = make_segmenter().segment(image, "cell", threshold=0.0, tile=96, overlap=24)
    assert result.info["tiles"] == len(tile_grid(image.shape, 96, 24)) == 6
    np.testing.assert_array_equal(image, before)
