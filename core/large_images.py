"""Images larger than memory: tiles read on demand, labels written block by block.

A whole-slide image in a zarr store, a dask array or a memory-mapped file is never read whole.
`LazyRGB` stands in for the RGB pixels the tiling stage slices: each tile's pixels are read from
the source when that tile is processed and converted to RGB uint8 there. Non-8-bit pixels need
one intensity scale for the whole image, so `sample_limits` estimates the percentiles from a
bounded sample: a coarse level of a multiscale image when one is small enough, else the whole
image when it is small, else windows spread on a regular grid (`SAMPLE_PIXELS` pixels at most).

Results stay instances (cropped masks and boxes). `write_labels` pastes them into any writable
array (a zarr array on disk) one block at a time, so no ``H x W`` array is ever made;
`downsample_labels` fills the coarser levels of a label pyramid from the finer ones, block by
block; `create_label_pyramid` makes such a pyramid as an OME-Zarr group.
"""

from __future__ import annotations

import logging
import math
import os
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from promptseg.errors import ImageError, OptionError
from promptseg.images import DEFAULT_PERCENTILES, intensity_limits, select_channels, to_rgb8

logger = logging.getLogger(__name__)

LAYOUTS = ("YX", "YXC", "CYX")
"""Layouts of a lazy 2D image: grey, channel-last, channel-first."""
SAMPLE_PIXELS = 4_000_000
"""Pixels read (at most) to estimate the intensity percentiles of a non-8-bit image."""
SAMPLE_WINDOW = 256
"""Side of the windows read for that estimate when no coarse level is small enough."""
BLOCK = 1024
"""Side of the blocks labels are written in (rounded up to whole chunks of the output): 4 MB of int32."""
STORE_MARKER = "promptseg"
"""Attribute that marks a label store made here (only such a store is overwritten)."""


def check_layout(array: Any, axes: str | None = None, name: str = "image") -> str:
    """The layout of a lazy 2D image (``"YX"``, ``"YXC"`` or ``"CYX"``), guessed when `axes` is None.

    Anything else (a stack, a 4D array, an object that cannot be sliced) is an `ImageError`.
    """
    shape = tuple(getattr(array, "shape", ()) or ())
    if not hasattr(array, "__getitem__") or not shape:
        raise ImageError(
            f"{name} of type {type(array).__name__} cannot be read in tiles: pass an array that numpy-style "
            "slicing reads (numpy, numpy.memmap, zarr, dask)."
        )
    if axes is None:
        axes = "YX" if len(shape) == 2 else "YXC" if len(shape) == 3 and shape[-1] <= 4 else None
    if axes not in LAYOUTS or len(axes) != len(shape):
        raise ImageError(
            f"{name} has shape {shape}: a lazy image must be one 2D plane, (H, W), (H, W, C) or (C, H, W) "
            f"with axes one of {', '.join(LAYOUTS)}. Segment a stack one slice at a time "
            "(pass stack[z]) or use segment_stack."
        )
    if shape[axes.index("Y")] < 2 or shape[axes.index("X")] < 2:
        raise ImageError(f"{name} of shape {shape} has no 2D image to segment.")
    return axes


def read_region(array: Any, axes: str, rows: slice, cols: slice, name: str = "image") -> np.ndarray:
    """Pixels ``[rows, cols]`` of a lazy image, channel-last; a failed read is an `ImageError`."""
    key = (slice(None), rows, cols) if axes == "CYX" else (rows, cols)
    try:
        region = np.asarray(array[key])
    except Exception as exc:
        raise ImageError(
            f"Cannot read pixels [{rows.start}:{rows.stop}, {cols.start}:{cols.stop}] of {name}: "
            f"{type(exc).__name__}: {exc}. Check the files or store behind it."
        ) from exc
    return np.moveaxis(region, 0, -1) if axes == "CYX" else region


def sample_limits(
    array: Any,
    axes: str,
    percentiles: tuple[float, float] = DEFAULT_PERCENTILES,
    channels: tuple[int, ...] | None = None,
    overview: Sequence[Any] = (),
    budget: int = SAMPLE_PIXELS,
) -> np.ndarray | None:
    """``(C, 2)`` intensity limits of the selected channels from a bounded sample; None for uint8.

    The sample is the largest `overview` level (coarser copies of `array`, same layout) whose
    plane holds at most `budget` pixels; else `array` itself if it is that small (then the result
    equals the in-memory path's); else up to `budget` pixels in `SAMPLE_WINDOW`-sided windows on a
    regular grid over the image.
    """
    if np.dtype(array.dtype) == np.uint8:
        return None
    sample = _sample(array, axes, overview, budget)
    if sample.ndim == 3:
        sample = select_channels(sample, channels)
    return intensity_limits(sample, percentiles, channel_axis=-1 if sample.ndim == 3 else None)


def _plane_size(array: Any, axes: str) -> tuple[int, int]:
    return int(array.shape[axes.index("Y")]), int(array.shape[axes.index("X")])


def _sample(array: Any, axes: str, overview: Sequence[Any], budget: int) -> np.ndarray:
    """The pixels the percentiles are estimated from (see `sample_limits`)."""
    fitting = [level for level in overview if math.prod(_plane_size(level, axes)) <= budget]
    if fitting:
        level = max(fitting, key=lambda lv: math.prod(_plane_size(lv, axes)))
        logger.info("Intensity percentiles from a coarse level of shape %s", tuple(level.shape))
        height, width = _plane_size(level, axes)
        return read_region(level, axes, slice(0, height), slice(0, width), "the coarse level")
    height, width = _plane_size(array, axes)
    if height * width <= budget:
        return read_region(array, axes, slice(0, height), slice(0, width))
    side = min(SAMPLE_WINDOW, height, width)
    per_axis = max(1, int(math.sqrt(budget) // side))
    ys = np.linspace(0, height - side, min(per_axis, height // side)).astype(int)
    xs = np.linspace(0, width - side, min(per_axis, width // side)).astype(int)
    logger.info("Intensity percentiles from %d windows of %d px", len(ys) * len(xs), side)
    windows = [read_region(array, axes, slice(y, y + side), slice(x, x + side)) for y in ys for x in xs]
    return np.concatenate(windows, axis=0)


class LazyRGB:
    """An ``(H, W, 3)`` uint8 RGB view of a lazy image: slicing ``[rows, cols]`` reads and converts that region.

    Every region is scaled with the same `limits` (see `sample_limits`), so tiles match each other.
    Only 2D slicing is offered; there is no way to read the whole image by accident
    (``np.asarray`` on it is refused).
    """

    def __init__(
        self, array: Any, axes: str, limits: np.ndarray | None, channels: tuple[int, ...] | None = None,
        name: str = "image",
    ) -> None:
        self.source, self.axes, self.limits, self.channels, self.name = array, axes, limits, channels, name
        height, width = _plane_size(array, axes)
        self.shape = (height, width, 3)
        self.dtype = np.dtype(np.uint8)
        self.ndim = 3

    @classmethod
    def open(
        cls,
        array: Any,
        axes: str | None = None,
        percentiles: tuple[float, float] = DEFAULT_PERCENTILES,
        channels: tuple[int, ...] | None = None,
        overview: Sequence[Any] = (),
        name: str = "image",
    ) -> LazyRGB:
        """Check `array`'s layout and channels, and estimate its intensity scale from a bounded sample."""
        axes = check_layout(array, axes, name)
        if "C" in axes:  # checked now, before any tile: to_rgb8 would only refuse them tile by tile
            select_channels(np.empty((1, 1, int(array.shape[axes.index("C")])), np.uint8), channels)
        return cls(array, axes, sample_limits(array, axes, percentiles, channels, overview), channels, name)

    def __getitem__(self, key: tuple[slice, slice]) -> np.ndarray:
        rows, cols = (key + (slice(None),))[:2] if isinstance(key, tuple) else (key, slice(None))
        height, width = self.shape[:2]
        rows, cols = slice(*rows.indices(height)), slice(*cols.indices(width))
        if rows.step != 1 or cols.step != 1:
            raise ImageError("A lazy image is read in regions: slice it with a step of 1.")
        pixels = read_region(self.source, self.axes, rows, cols, self.name)
        return to_rgb8(pixels, channels=self.channels, limits=self.limits)

    def __array__(self, *args, **kwargs):
        raise ImageError(
            f"{self.name} of {self.shape[0]} x {self.shape[1]} pixels is read in tiles and never whole: "
            "segment it with tiling on (tile=... or tile='auto')."
        )


def instance_ids(result: Any) -> np.ndarray:
    """Instance ids as `SegmentationResult.to_label_image` numbers them: ``i + 1`` for instance ``i``."""
    return np.arange(1, len(result.instances) + 1, dtype=np.int64)


def class_ids(result: Any, prompts: Sequence[str]) -> np.ndarray:
    """One id per instance: its prompt's position in `prompts` plus one (a semantic labelling)."""
    position = {prompt: index + 1 for index, prompt in enumerate(prompts)}
    missing = sorted({inst.label for inst in result.instances} - set(position))
    if missing:
        raise OptionError(f"Instances labelled {missing} have no prompt in {list(prompts)}: pass every prompt used.")
    return np.asarray([position[inst.label] for inst in result.instances], dtype=np.int64)


def write_labels(result: Any, out: Any, values: Sequence[int] | np.ndarray | None = None) -> int:
    """Paste `result`'s instances into `out` (any ``(H, W)`` array numpy-style assignment writes) block by block.

    Pixel value ``values[i]`` marks instance ``i`` (default ``i + 1``, as `to_label_image`); where
    instances overlap the higher-scoring one is on top. Only blocks an instance touches are
    written: `out` must start as background (a new zarr array reads as its fill value, 0).
    Memory: one block (`BLOCK` pixels a side, rounded up to `out`'s chunks). Returns the blocks written.
    """
    height, width = result.image_size
    if tuple(out.shape) != (height, width):
        raise OptionError(f"The labels array has shape {tuple(out.shape)}, the image {(height, width)}: they must match.")
    values = instance_ids(result) if values is None else np.asarray(values)
    if len(values) != len(result.instances):
        raise OptionError(f"{len(values)} values for {len(result.instances)} instances: give one per instance.")
    block_y, block_x = block_shape(out)
    touching: dict[tuple[int, int], list[int]] = defaultdict(list)
    for index in sorted(range(len(result.instances)), key=lambda i: result.instances[i].score):
        x0, y0, x1, y1 = result.instances[index].box
        for by in range(y0 // block_y, (y1 - 1) // block_y + 1):
            for bx in range(x0 // block_x, (x1 - 1) // block_x + 1):
                touching[(by, bx)].append(index)
    dtype = np.dtype(getattr(out, "dtype", np.int32))
    for (by, bx), indices in sorted(touching.items()):
        ry0, rx0 = by * block_y, bx * block_x
        ry1, rx1 = min(ry0 + block_y, height), min(rx0 + block_x, width)
        block = np.zeros((ry1 - ry0, rx1 - rx0), dtype=dtype)
        for index in indices:  # lowest score first: the best ends on top
            inst = result.instances[index]
            x0, y0, x1, y1 = inst.box
            iy0, iy1, ix0, ix1 = max(y0, ry0), min(y1, ry1), max(x0, rx0), min(x1, rx1)
            mask = inst.mask[iy0 - y0 : iy1 - y0, ix0 - x0 : ix1 - x0]
            block[iy0 - ry0 : iy1 - ry0, ix0 - rx0 : ix1 - rx0][mask] = values[index]
        out[ry0:ry1, rx0:rx1] = block
    logger.info("Wrote %d instances into %d blocks of %dx%d", len(values), len(touching), block_y, block_x)
    return len(touching)


def block_shape(out: Any) -> tuple[int, int]:
    """Block sides near `BLOCK` that are whole multiples of `out`'s chunks (when it has chunks)."""
    chunks = getattr(out, "chunks", None)
    if not chunks or not all(isinstance(c, (int, np.integer)) for c in chunks[:2]):
        return BLOCK, BLOCK
    return tuple(int(c) * max(1, BLOCK // int(c)) for c in chunks[:2])


def downsample_labels(source: Any, target: Any) -> None:
    """Fill `target` (a coarser level) from `source` by nearest neighbour, block by block.

    Target pixel ``(i, j)`` takes source pixel ``(i * Hs // Ht, j * Ws // Wt)``; all-background
    blocks are skipped (`target` starts as background). Memory: one source region per block.
    """
    (hs, ws), (ht, wt) = tuple(source.shape), tuple(target.shape)
    block_y, block_x = block_shape(target)
    for ty0 in range(0, ht, block_y):
        rows = np.arange(ty0, min(ty0 + block_y, ht)) * hs // ht
        for tx0 in range(0, wt, block_x):
            cols = np.arange(tx0, min(tx0 + block_x, wt)) * ws // wt
            region = np.asarray(source[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1])
            picked = region[np.ix_(rows - rows[0], cols - cols[0])]
            if picked.any():
                target[ty0 : ty0 + len(rows), tx0 : tx0 + len(cols)] = picked


def create_label_pyramid(
    path: str | os.PathLike,
    shapes: Sequence[tuple[int, int]],
    dtype: Any = np.int32,
    chunks: int = 1024,
    name: str = "labels",
) -> list[Any]:
    """Empty label arrays, one per `shapes` level (finest first), in an OME-Zarr multiscale group at `path`.

    Every array reads as 0 until written. `path` must be a new or empty folder, or a store made
    here before (which is replaced); anything else is an `OptionError` that says what to choose.
    Needs ``zarr`` and ``ome-zarr`` (the ``napari`` extra).
    """
    try:
        import zarr
        from ome_zarr.writer import write_multiscales_metadata
    except ImportError as exc:
        raise OptionError(
            f"Writing labels to disk needs zarr and ome-zarr ({exc}): pip install \"promptseg[napari]\"."
        ) from exc
    path = Path(path)
    check_store_path(path)
    try:
        group = zarr.open_group(str(path), mode="w")
        arrays = [
            group.create_array(str(level), shape=tuple(int(s) for s in shape), dtype=dtype,
                               chunks=(min(chunks, int(shape[0])), min(chunks, int(shape[1]))), fill_value=0)
            for level, shape in enumerate(shapes)
        ]
        base = shapes[0]
        datasets = [
            {"path": str(level), "coordinateTransformations": [
                {"type": "scale", "scale": [base[0] / shape[0], base[1] / shape[1]]}]}
            for level, shape in enumerate(shapes)
        ]
        write_multiscales_metadata(group, datasets, axes=["y", "x"], name=name)
        group.attrs[STORE_MARKER] = {"kind": name}
    except OSError as exc:
        raise OptionError(
            f"Cannot write the labels store {path}: {exc}. Choose a folder you can write to, "
            "or leave the path blank for a temporary folder."
        ) from exc
    return arrays


def check_store_path(path: str | os.PathLike) -> None:
    """Refuse (`OptionError`) a path that is a file, a folder holding anything but a store made here,
    or a place that cannot be written; checked before a long run, and again when the store is made."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OptionError(f"The labels store {path} is a file: choose a folder path (e.g. {path}.zarr).")
    if path.is_dir() and any(path.iterdir()) and not _is_our_store(path):
        raise OptionError(
            f"The folder {path} already holds other files: choose a new or empty folder for the labels store."
        )
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise OptionError(
            f"Cannot write the labels store {path}: {parent} is a file. Choose a folder path, "
            "or leave the path blank for a temporary folder."
        )
    if not os.access(parent, os.W_OK):
        raise OptionError(
            f"Cannot write the labels store {path}: {parent} is not writable. Choose a folder you can write "
            "to, or leave the path blank for a temporary folder."
        )


def _is_our_store(path: Path) -> bool:
    import json

    for meta in ("zarr.json", ".zattrs"):
        file = path / meta
        if file.is_file():
            try:
                text = json.loads(file.read_text())
            except (OSError, ValueError):
                return False
            return STORE_MARKER in text.get("attributes", text)
    return False


def write_label_pyramid(
    result: Any,
    path: str | os.PathLike,
    shapes: Sequence[tuple[int, int]],
    values: Sequence[int] | np.ndarray | None = None,
    name: str = "labels",
) -> list[Any]:
    """`result` as an OME-Zarr label pyramid at `path` (`create_label_pyramid`): level 0 pasted
    block by block (`write_labels`, ids `values`), each coarser level taken from the one above it."""
    levels = create_label_pyramid(path, shapes, name=name)
    write_labels(result, levels[0], values)
    for finer, coarser in zip(levels, levels[1:]):
        downsample_labels(finer, coarser)
    return levels
