"""Turn whatever the user has (a path, a PIL image, a numpy array) into RGB uint8 pixels.

SAM 3 sees 8-bit RGB. Files get their EXIF orientation applied; palette, grayscale, RGBA and
16-bit images are converted; scientific arrays (uint16, int, float, with NaNs) are scaled by
percentiles. The caller's array is never modified.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from promptseg.errors import ImageError, OptionError

ImageLike = "str | os.PathLike | PIL.Image.Image | np.ndarray"

TIFF_SUFFIXES = {".tif", ".tiff", ".ome.tif", ".ome.tiff"}
DEFAULT_PERCENTILES = (0.5, 99.5)


def load_image(
    image: Any,
    percentiles: tuple[float, float] = DEFAULT_PERCENTILES,
    channels: tuple[int, ...] | None = None,
) -> np.ndarray:
    """Return ``(H, W, 3)`` uint8 RGB pixels for a path, PIL image or numpy array.

    `percentiles` sets the low/high percentiles mapped to 0/255 for non-uint8 pixels.
    `channels` picks up to three channels of a multichannel array (channel-last) to show as RGB.
    """
    array = read_pixels(image)
    return to_rgb8(array, percentiles=percentiles, channels=channels)


def read_pixels(image: Any) -> np.ndarray:
    """Read `image` into a numpy array without changing its dtype (a copy-free view for arrays)."""
    from PIL import Image

    if isinstance(image, (str, os.PathLike)):
        return _read_file(Path(image))
    if isinstance(image, Image.Image):
        return _pil_to_array(image, str(getattr(image, "filename", "") or "PIL image"))
    if isinstance(image, np.ndarray):
        return image
    if hasattr(image, "__array__"):
        return np.asarray(image)
    raise ImageError(
        f"Cannot use an object of type {type(image).__name__} as an image: pass a file path, "
        "a PIL.Image or a numpy array of shape (H, W) or (H, W, C)."
    )


def _read_file(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    if not path.exists():
        raise ImageError(f"No such image file: {path}. Check the path.")
    if path.is_dir():
        raise ImageError(f"{path} is a directory, not an image file.")
    if path.stat().st_size == 0:
        raise ImageError(f"Image file {path} is empty (0 bytes): re-export or re-download it.")
    if "".join(path.suffixes[-2:]).lower() in TIFF_SUFFIXES or path.suffix.lower() in TIFF_SUFFIXES:
        import tifffile

        try:
            return tifffile.imread(path)
        except Exception as exc:
            raise ImageError(f"Cannot read TIFF {path}: {exc}. The file may be truncated.") from exc
    try:
        with Image.open(path) as pil:
            pil.load()
            return _pil_to_array(pil, str(path))
    except UnidentifiedImageError as exc:
        raise ImageError(
            f"Cannot read {path} as an image: the file is corrupt or not in an image format "
            "that Pillow or tifffile can read."
        ) from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"Cannot read {path}: {exc}. The file may be truncated or corrupt.") from exc


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
        array = np.moveaxis(array, 0, -1)  # channel-first (C, H, W) -> channel-last
    if array.ndim not in (2, 3):
        raise ImageError(
            f"Expected an image of shape (H, W) or (H, W, C), got shape {array.shape}. "
            "For stacks, segment one slice at a time or use the stack API."
        )
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ImageError(f"Image is empty: shape {array.shape}.")
    if array.ndim == 3:
        array = _select_channels(array, channels)
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


def _select_channels(array: np.ndarray, channels: tuple[int, ...] | None) -> np.ndarray:
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
    low_p, high_p = percentiles
    if not 0 <= low_p < high_p <= 100:
        raise OptionError(
            f"percentiles={percentiles} is not a valid range: use (low, high) with 0 <= low < high <= 100."
        )
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
