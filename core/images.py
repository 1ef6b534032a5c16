"""Turn whatever the user has (a path, a PIL image, a numpy array) into RGB uint8 pixels.

SAM 3 sees 8-bit RGB. Files get their EXIF orientation applied; palette, grayscale, RGBA and
16-bit images are converted; scientific arrays (uint16, int, float, with NaNs) are scaled by
percentiles. The caller's array is never modified.

Decoding is bounded by a pixel budget per image plane (height x width): `DEFAULT_MAX_PIXELS`,
or the environment variable `PROMPTSEG_MAX_PIXELS`, or ``max_pixels=`` (of `load_image` and
`load_segmenter`). Files, PIL images and lazy arrays (dask, zarr...) are checked from their
declared size before any pixel is decoded; a numpy array is already in memory and is used as is.
"""

from __future__ import annotations

import logging
import math
import os
import re
import threading
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from promptseg.errors import ImageError, OptionError
from promptseg.options import PixelOptions, check_percentiles

logger = logging.getLogger(__name__)

ImageLike = "str | os.PathLike | PIL.Image.Image | np.ndarray"

TIFF_SUFFIXES = {".tif", ".tiff", ".ome.tif", ".ome.tiff"}
DEFAULT_PERCENTILES = PixelOptions().percentiles
DEFAULT_MAX_PIXELS = 2**28
"""Decoded pixels allowed per image plane (268 M, e.g. 16384 x 16384) unless raised."""
MAX_PIXELS_ENV = "PROMPTSEG_MAX_PIXELS"
_PILLOW_LIMIT_LOCK = threading.Lock()


def resolve_max_pixels(max_pixels: int | None = None) -> int:
    """The pixel budget: `max_pixels` if given, else `PROMPTSEG_MAX_PIXELS`, else `DEFAULT_MAX_PIXELS`."""
    if max_pixels is None:
        text = os.environ.get(MAX_PIXELS_ENV, "").strip()
        if not text:
            return DEFAULT_MAX_PIXELS
        try:
            max_pixels = int(text.replace("_", ""))
        except ValueError:
            raise OptionError(
                f"{MAX_PIXELS_ENV}={text!r} is not a whole number: set it to the largest number of "
                f"pixels (height x width) an image may have, e.g. {2 * DEFAULT_MAX_PIXELS}, or unset it."
            ) from None
        source = MAX_PIXELS_ENV
    else:
        source = "max_pixels"
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, (int, np.integer)) or max_pixels <= 0:
        raise OptionError(
            f"{source} must be a whole number of pixels above 0, got {max_pixels!r}: "
            f"e.g. {2 * DEFAULT_MAX_PIXELS} for images up to 2 x {DEFAULT_MAX_PIXELS:,} pixels."
        )
    return int(max_pixels)


def check_pixel_budget(height: int, width: int, max_pixels: int | None, name: str) -> None:
    """Raise `ImageError` when a ``height x width`` plane is over the pixel budget."""
    limit = resolve_max_pixels(max_pixels)
    if int(height) * int(width) > limit:
        raise ImageError(_over_budget(name, f"{width} x {height} = {int(height) * int(width):,} pixels", limit))


def _over_budget(name: str, size: str, limit: int) -> str:
    return (
        f"Image {name} is {size}, over the limit of {limit:,} pixels per image (a guard against "
        f"decompression bombs and running out of memory). If the image is genuine, raise the limit "
        f"with load_segmenter(max_pixels=...), `promptseg segment --max-pixels N` or the environment "
        f"variable {MAX_PIXELS_ENV}; for a "
        "large slide, also segment it in tiles (tile= / --tile) so the model sees it at full resolution."
    )


def load_image(
    image: Any,
    percentiles: tuple[float, float] = DEFAULT_PERCENTILES,
    channels: tuple[int, ...] | None = None,
    max_pixels: int | None = None,
) -> np.ndarray:
    """Return ``(H, W, 3)`` uint8 RGB pixels for a path, PIL image or numpy array.

    `percentiles` sets the low/high percentiles mapped to 0/255 for non-uint8 pixels.
    `channels` picks up to three channels of a multichannel array (channel-last) to show as RGB.
    `max_pixels` is the pixel budget of a file, PIL image or lazy array (see `resolve_max_pixels`).
    """
    array = read_pixels(image, max_pixels=max_pixels)
    return to_rgb8(array, percentiles=percentiles, channels=channels)


def read_pixels(image: Any, max_pixels: int | None = None) -> np.ndarray:
    """Read `image` into a numpy array without changing its dtype (a copy-free view for arrays).

    Files, PIL images and lazy arrays are checked against the pixel budget before decoding.
    """
    from PIL import Image

    if isinstance(image, (str, os.PathLike)):
        return _read_file(Path(image), resolve_max_pixels(max_pixels))
    if isinstance(image, Image.Image):
        name = str(getattr(image, "filename", "") or "PIL image")
        check_pixel_budget(image.height, image.width, max_pixels, name)
        return _pil_to_array(image, name)
    if isinstance(image, np.ndarray):
        return image
    if hasattr(image, "__array__"):
        return read_array_like(image, max_pixels)
    raise ImageError(
        f"Cannot use an object of type {type(image).__name__} as an image: pass a file path, "
        "a PIL.Image or a numpy array of shape (H, W) or (H, W, C)."
    )


def read_array_like(array: Any, max_pixels: int | None = None, name: str = "array") -> np.ndarray:
    """Materialise a lazy array (dask, zarr...) after checking its plane against the pixel budget."""
    shape = tuple(getattr(array, "shape", ()) or ())
    if len(shape) >= 2:
        height, width = _plane(shape)
        check_pixel_budget(height, width, max_pixels, f"{name} of shape {shape}")
    try:
        return np.asarray(array)
    except ImageError:
        raise
    except Exception as exc:
        raise ImageError(
            f"Cannot read the pixels of {name}: {type(exc).__name__}: {exc}. Check the files behind it."
        ) from exc


def _plane(shape: tuple[int, ...], axes: str | None = None) -> tuple[int, int]:
    """``(height, width)`` of an image plane: the Y and X axes, else the array's guessed layout."""
    if axes and "Y" in axes and "X" in axes:
        return int(shape[axes.index("Y")]), int(shape[axes.index("X")])
    if len(shape) == 3 and shape[-1] > 4 and shape[0] <= 4:  # channel-first (C, H, W)
        return int(shape[1]), int(shape[2])
    if len(shape) >= 3 and shape[-1] <= 4:  # channel-last (..., H, W, C)
        return int(shape[-3]), int(shape[-2])
    return int(shape[-2]), int(shape[-1])


def _read_file(path: Path, max_pixels: int) -> np.ndarray:
    if not path.exists():
        raise ImageError(f"No such image file: {path}. Check the path.")
    if path.is_dir():
        raise ImageError(f"{path} is a directory, not an image file.")
    if path.stat().st_size == 0:
        raise ImageError(f"Image file {path} is empty (0 bytes): re-export or re-download it.")
    if "".join(path.suffixes[-2:]).lower() in TIFF_SUFFIXES or path.suffix.lower() in TIFF_SUFFIXES:
        return _read_tiff(path, max_pixels)
    return _read_with_pillow(path, max_pixels)


def _read_tiff(path: Path, max_pixels: int) -> np.ndarray:
    """The first series of a TIFF, its plane checked against the budget from the metadata first."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            check_tiff_budget(series, max_pixels, path)
            return series.asarray()
    except ImageError:
        raise
    except MemoryError as exc:
        raise ImageError(_out_of_memory(path, exc)) from exc
    except Exception as exc:
        raise ImageError(f"Cannot read TIFF {path}: {exc}. The file may be truncated.") from exc


def check_tiff_budget(series: Any, max_pixels: int | None, path: Any) -> None:
    """Check a tifffile series' declared plane (Y x X) against the pixel budget, reading no pixels."""
    height, width = _plane(tuple(series.shape), series.axes.upper())
    check_pixel_budget(height, width, max_pixels, f"{path} ({series.dtype})")


def _read_with_pillow(path: Path, max_pixels: int) -> np.ndarray:
    """Decode with Pillow: its bomb checks at our budget, and ours on the header's size before decoding.

    Pillow refuses images over twice its limit while opening them; ours refuses those between
    once and twice the limit (Pillow only warns about them) before any pixel is decoded.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with _open_with_bomb_limit(path, max_pixels) as pil:
            check_pixel_budget(pil.height, pil.width, max_pixels, str(path))
            pil.load()
            return _pil_to_array(pil, str(path))
    except ImageError:
        raise
    except UnidentifiedImageError as exc:
        raise ImageError(
            f"Cannot read {path} as an image: the file is corrupt or not in an image format "
            "that Pillow or tifffile can read."
        ) from exc
    except Image.DecompressionBombError as exc:  # over twice the budget: Pillow stops it while opening
        counted = re.search(r"\((\d+) pixels\)", str(exc))
        size = f"{int(counted[1]):,} pixels" if counted else f"too large ({exc})"
        raise ImageError(_over_budget(str(path), size, max_pixels)) from exc
    except MemoryError as exc:
        raise ImageError(_out_of_memory(path, exc)) from exc
    except Exception as exc:  # every other decoder failure (OSError, SyntaxError, ValueError, struct...)
        raise ImageError(f"Cannot read {path}: {exc}. The file may be truncated or corrupt.") from exc


def _out_of_memory(path: Path, exc: MemoryError) -> str:
    return (
        f"Not enough memory to decode {path} ({str(exc) or 'allocation failed'}). Free memory, or lower "
        f"the pixel budget (max_pixels= or {MAX_PIXELS_ENV}) so that such images are refused before decoding."
    )


def _open_with_bomb_limit(path: Path, max_pixels: int):
    """`Image.open` with Pillow's own bomb check at promptseg's budget; decoding happens outside.

    Pillow reads its limit from the module global ``PIL.Image.MAX_IMAGE_PIXELS`` and takes no
    per-call limit, so the global is set for the duration of one open (which parses the header
    and runs the check), under a lock, and restored at once: it never stays changed, and code
    outside promptseg that opens an image at that same moment sees a limit still, never none.
    Pillow's warning for images between once and twice its limit is silenced there: the caller
    refuses them itself with a message that says what to do.
    """
    from PIL import Image

    with _PILLOW_LIMIT_LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        previous = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = max_pixels
        try:
            return Image.open(path)
        finally:
            Image.MAX_IMAGE_PIXELS = previous


def _pil_to_array(pil: Any, name: str) -> np.ndarray:
    from PIL import ImageOps

    pil = ImageOps.exif_transpose(pil)
    if pil.mode in ("P", "PA", "LA", "RGBA", "CMYK", "YCbCr", "LAB", "HSV", "1"):
        pil = pil.convert("RGB")
    elif pil.mode == "I;16" or pil.mode.startswith("I;16"):
        return np.asarray(pil, dtype=np.uint16)
    array = np.asarray(pil)
    if array.size == 0:
        raise ImageError(f"Image {name} has no pixels ({pil.width}x{pil.height}).")
    return array


def to_rgb8(
    array: np.ndarray,
    percentiles: tuple[float, float] = DEFAULT_PERCENTILES,
    channels: tuple[int, ...] | None = None,
    limits: Any = None,
) -> np.ndarray:
    """Convert a 2D or channel-last 3D array of any numeric dtype to ``(H, W, 3)`` uint8.

    Non-uint8 pixels are scaled per channel so that each channel's `percentiles` map to 0 and
    255 (a dim fluorescence channel stays visible next to a bright one); NaN and infinity become
    0. `limits` fixes the (low, high) intensities instead, as ``(2,)`` or one row per selected
    channel ``(C, 2)``: one scale for every slice of a stack (see `intensity_limits`).
    """
    array = np.asarray(array)
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise ImageError(
            f"Unsupported pixel dtype {array.dtype}: use uint8, uint16, int or float pixels."
        )
    if array.ndim == 3 and array.shape[-1] not in (1, 2, 3, 4) and array.shape[0] in (1, 2, 3, 4):
        _warn_channel_first(array.shape, channels)
        array = np.moveaxis(array, 0, -1)  # channel-first (C, H, W) -> channel-last
    if array.ndim not in (2, 3):
        raise ImageError(
            f"Expected an image of shape (H, W) or (H, W, C), got shape {array.shape}. "
            "For stacks, segment one slice at a time or use the stack API."
        )
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ImageError(f"Image is empty: shape {array.shape}.")
    if array.ndim == 3:
        array = select_channels(array, channels)
    if array.dtype == np.uint8:
        scaled = array
    else:
        scaled = _scale(array, percentiles, limits)
    if scaled.ndim == 2:
        scaled = np.repeat(scaled[:, :, None], 3, axis=2)
    elif scaled.shape[2] == 1:
        scaled = np.repeat(scaled, 3, axis=2)
    elif scaled.shape[2] == 2:
        scaled = np.concatenate([scaled, np.zeros_like(scaled[:, :, :1])], axis=2)
    return np.ascontiguousarray(scaled)


def _warn_channel_first(shape: tuple[int, ...], channels: tuple[int, ...] | None) -> None:
    """Say that a ``(C, H, W)`` guess was made: the array may be a short stack of slices instead."""
    shown = list(channels) if channels is not None else list(range(min(shape[0], 3)))
    logger.warning(
        "Reading an array of shape %s as %d channels of %d x %d pixels (channel-first) and showing "
        "channels %s as RGB. If it is a stack of %d slices, use segment_stack(stack, ..., axes='ZYX'); "
        "to choose the channels, pass channels=(...), or move the channel axis last.",
        tuple(shape), shape[0], shape[1], shape[2], shown, shape[0],
    )


def select_channels(array: np.ndarray, channels: tuple[int, ...] | None) -> np.ndarray:
    count = array.shape[2]
    if channels is None:
        if count == 4:
            return array[:, :, :3]  # RGBA: the alpha channel carries no appearance
        return array[:, :, :3] if count > 3 else array
    channels = tuple(channels)
    if not 1 <= len(channels) <= 3 or any(not 0 <= c < count for c in channels):
        raise OptionError(
            f"channels={channels} does not fit an image with {count} channels: "
            f"give one to three indices between 0 and {count - 1}."
        )
    return array[:, :, list(channels)]


def intensity_limits(
    array: np.ndarray, percentiles: tuple[float, float] = DEFAULT_PERCENTILES, channel_axis: int | None = None
) -> np.ndarray:
    """``(C, 2)`` intensities at the low/high `percentiles` of the finite pixels, one row per channel.

    Without `channel_axis` all pixels form one channel (one row). Arrays above ~4M pixels are
    sampled on a regular stride first, so the caller's array is neither copied nor changed.
    """
    low_p, high_p = check_percentiles(percentiles)
    array = np.asarray(array)
    if channel_axis is not None:
        array = np.moveaxis(array, channel_axis, -1)
    else:
        array = array[..., None]
    spatial = array.ndim - 1
    pixels = int(np.prod(array.shape[:-1]))
    step = max(1, math.ceil((pixels / 4_000_000) ** (1 / max(spatial, 1))))
    sample = array[(slice(None, None, step),) * spatial] if step > 1 else array
    rows = []
    for channel in range(array.shape[-1]):
        values = np.asarray(sample[..., channel], dtype=np.float32)
        values = values[np.isfinite(values)]
        if values.size == 0 and step > 1:  # finite pixels too sparse for the sample
            values = np.asarray(array[..., channel], dtype=np.float32)
            values = values[np.isfinite(values)]
        if values.size == 0:
            raise ImageError("Image has no finite pixel values (all NaN or infinite).")
        low, high = np.percentile(values, [low_p, high_p])
        rows.append((float(low), float(high) if high > low else float(low) + 1.0))
    return np.asarray(rows, dtype=np.float64)


def _scale(array: np.ndarray, percentiles: tuple[float, float], limits: Any = None) -> np.ndarray:
    """Map intensities to uint8 in row blocks, so memory beyond the output stays small."""
    channel_axis = -1 if array.ndim == 3 else None
    if limits is None:
        limits = intensity_limits(array, percentiles, channel_axis)
    limits = np.asarray(limits, dtype=np.float64).reshape(-1, 2)
    channels = array.shape[2] if array.ndim == 3 else 1
    if len(limits) == 1:
        limits = np.repeat(limits, channels, axis=0)
    if len(limits) != channels or (limits[:, 1] <= limits[:, 0]).any():
        raise OptionError(
            f"limits must be (low, high) with high > low, once or per channel ({channels}), got {limits.tolist()}."
        )
    low = limits[:, 0].astype(np.float32)
    gain = (255.0 / (limits[:, 1] - limits[:, 0])).astype(np.float32)
    if channel_axis is None:
        low, gain = low[0], gain[0]
    out = np.empty(array.shape, dtype=np.uint8)
    block = max(1, 4_000_000 // max(1, int(np.prod(array.shape[1:]))))
    for start in range(0, array.shape[0], block):
        values = array[start : start + block].astype(np.float32)
        values -= low
        values *= gain
        if np.issubdtype(array.dtype, np.floating):
            values[~np.isfinite(values)] = 0
        np.rint(values, out=values)
        np.clip(values, 0, 255, out=values)
        out[start : start + block] = values
    return out


def pixel_hash(rgb: np.ndarray) -> str:
    """Content hash of decoded pixels: the same picture in another file format shares a cache entry."""
    import hashlib

    digest = hashlib.blake2b(digest_size=20)
    digest.update(str(rgb.shape).encode())
    digest.update(np.ascontiguousarray(rgb).data)
    return digest.hexdigest()
