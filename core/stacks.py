"""Z-stacks and time series: segment slice by slice, optionally link instances into 3D objects.

A stack is an array (or a multi-page / OME-TIFF file, or a list of images) with one slice axis
(Z or T), optionally a channel axis, then Y and X. Slices are read as views, one at a time, and
scaled to 8 bits with one intensity range for the whole stack (so a dim slice stays dim and
linking compares like with like). Each slice goes to the segmentation callable it is given
(`Segmenter.segment_stack` passes its own `segment` of one RGB image), so tiling, the embedding
cache and every option work per slice; this module never calls back into the segmenter. Linking joins an instance to the instance of
the same label in the previous slice that it overlaps most (mask IoU, one-to-one), giving each
3D object one id through the stack.

A slice that cannot be used (a file that does not read, a lazy slice whose data is missing, a
slice of another size, no finite pixel) is reported in its result's ``error`` and skipped; the
other slices go on. Files and lazy arrays are checked against the pixel budget per slice plane
before anything is read (see `promptseg.images.resolve_max_pixels`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from promptseg.errors import CancelledError, ImageError, OptionError
from promptseg.images import (
    check_pixel_budget,
    check_tiff_budget,
    intensity_limits,
    read_pixels,
    to_rgb8,
)
from promptseg.masks import mask_iou
from promptseg.options import PixelOptions
from promptseg.results import Instance, SegmentationResult

logger = logging.getLogger(__name__)

DEFAULT_LINK_IOU = 0.3
SLICE_AXES = "ZT"


@dataclass
class StackResult:
    """The results of every slice, plus 3D object ids.

    `slices[i]` is the `SegmentationResult` of slice ``i``; `object_ids[i][j]` is the id (from 1)
    of instance ``j`` of slice ``i`` (also in ``instance.extra["object_id"]``). With linking, an
    object that continues through neighbouring slices keeps one id; without, every instance has
    its own. `axes` is the layout that was read, e.g. ``"ZYX"`` or ``"TCYX"``.
    """

    slices: list[SegmentationResult]
    object_ids: list[list[int]]
    axes: str
    linked: bool = False
    info: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.slices)

    def __iter__(self) -> Iterator[SegmentationResult]:
        return iter(self.slices)

    def __getitem__(self, index: int) -> SegmentationResult:
        return self.slices[index]

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(slices, height, width)`` of the label volume."""
        height, width = self.slices[0].image_size if self.slices else (0, 0)
        return len(self.slices), height, width

    @property
    def errors(self) -> dict[int, str]:
        """Slice index -> why that slice could not be used (empty when every slice was segmented)."""
        return {index: result.error for index, result in enumerate(self.slices) if result.error}

    @property
    def num_objects(self) -> int:
        return max((max(ids) for ids in self.object_ids if ids), default=0)

    def objects(self) -> dict[int, list[tuple[int, Instance]]]:
        """Each object id -> its ``(slice index, instance)`` pieces, in slice order."""
        found: dict[int, list[tuple[int, Instance]]] = {}
        for index, (result, ids) in enumerate(zip(self.slices, self.object_ids)):
            for inst, obj in zip(result.instances, ids):
                found.setdefault(obj, []).append((index, inst))
        return found

    def to_label_volume(self, dtype: Any = np.int32) -> np.ndarray:
        """A ``(slices, H, W)`` array of object ids (0 background); overlaps draw the higher score on top."""
        volume = np.zeros(self.shape, dtype=dtype)
        for index, (result, ids) in enumerate(zip(self.slices, self.object_ids)):
            for inst, obj in sorted(zip(result.instances, ids), key=lambda pair: pair[0].score):
                x0, y0, x1, y1 = inst.box
                volume[index, y0:y1, x0:x1][inst.mask] = obj
        return volume


def parse_axes(axes: str | None, shape: tuple[int, ...]) -> str:
    """Check a layout such as ``"ZYX"``, ``"TYXC"`` or ``"ZCYX"``, or guess one from `shape`."""
    if axes is None:
        if len(shape) == 3:
            return "ZYX"
        if len(shape) == 4 and shape[-1] <= 4:
            return "ZYXC"
        if len(shape) == 4 and shape[1] <= 4:
            return "ZCYX"
        raise OptionError(
            f"Cannot tell the axes of a stack of shape {shape}: pass axes= such as 'ZYX', 'ZYXC' or 'ZCYX'."
        )
    layout = axes.upper()
    if (
        len(layout) != len(shape) or sorted(layout) != sorted(set(layout))
        or set(layout) - set("ZTCYX") or "Y" not in layout or "X" not in layout
        or sum(a in SLICE_AXES for a in layout) != 1
    ):
        raise OptionError(
            f"axes={axes!r} does not describe a stack of shape {shape}: give one letter per axis from "
            "Z or T (exactly one slice axis), optional C, then Y and X, e.g. 'ZYX', 'TYXC', 'ZCYX'."
        )
    return layout


def open_stack(
    stack: Any, axes: str | None = None, max_pixels: int | None = None
) -> tuple[Sequence[np.ndarray] | np.ndarray, str]:
    """The stack as an indexable of slices and its layout, reading files without scaling them.

    A numpy array gets `axes` (or a guess) and is read as a view; a lazy array (dask, zarr...)
    is read one slice at a time; a TIFF file uses its own axes when it records them (OME-TIFF,
    ImageJ); a list holds one image (path or array) per slice. Files and lazy arrays whose slice
    plane is over `max_pixels` are refused before any pixel is read.
    """
    if isinstance(stack, (str, os.PathLike)):
        return _open_tiff(Path(stack), axes, max_pixels)
    if isinstance(stack, (list, tuple)):
        if not stack:
            raise ImageError("The stack is empty: give at least one slice.")
        return _LazySlices(stack, max_pixels), "ZYX" if axes is None else axes.upper()
    lazy = not isinstance(stack, np.ndarray) and all(hasattr(stack, a) for a in ("shape", "dtype", "__getitem__"))
    array = stack if lazy or isinstance(stack, np.ndarray) else np.asarray(stack)
    if array.ndim < 3:
        raise ImageError(f"A stack needs a slice axis; got shape {array.shape}. Use segment() for one image.")
    layout = parse_axes(axes, tuple(array.shape))
    order = [layout.index(a) for a in layout if a in SLICE_AXES] + [layout.index("Y"), layout.index("X")]
    if "C" in layout:
        order.append(layout.index("C"))
    if array.shape[order[0]] == 0:
        raise ImageError(f"The stack is empty: shape {array.shape}.")
    if lazy:
        check_pixel_budget(array.shape[order[1]], array.shape[order[2]], max_pixels,
                           f"slices of the stack of shape {tuple(array.shape)}")
        return _LazyArraySlices(array, order), layout
    return np.transpose(array, order), layout  # a view: slice, Y, X[, C]


def _open_tiff(path: Path, axes: str | None, max_pixels: int | None) -> tuple[np.ndarray, str]:
    import tifffile

    if not path.exists():
        raise ImageError(f"No such stack file: {path}. Check the path.")
    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            check_tiff_budget(series, max_pixels, path)  # from the metadata, before reading pixels
            recorded = series.axes.upper().replace("S", "C").replace("Q", "Z").replace("I", "Z")
            array = series.asarray()
    except ImageError:
        raise
    except Exception as exc:  # tifffile's errors, MemoryError...
        raise ImageError(f"Cannot read {path} as a TIFF stack: {type(exc).__name__}: {exc}.") from exc
    if axes is None and len(recorded) == array.ndim and sum(a in SLICE_AXES for a in recorded) == 1:
        axes = recorded
    return open_stack(array, axes)


class _LazySlices:
    """A list of images (paths or arrays) read one at a time."""

    def __init__(self, items: Sequence[Any], max_pixels: int | None = None) -> None:
        self.items = list(items)
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> np.ndarray:
        return read_pixels(self.items[index], max_pixels=self.max_pixels)


class _LazyArraySlices:
    """Slices of a lazy array (dask, zarr...) read one at a time as ``(Y, X[, C])`` numpy arrays."""

    def __init__(self, array: Any, order: list[int]) -> None:
        self.array = array
        self.order = order  # slice axis, Y, X[, C] in the array's numbering
        self.dtype = np.dtype(array.dtype)
        self.shape = tuple(int(array.shape[axis]) for axis in order)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index: int) -> np.ndarray:
        return self.read(index)

    def read(self, index: int, step: int = 1) -> np.ndarray:
        """Slice `index`, every `step`-th pixel in Y and X; a failed read is an `ImageError`."""
        key: list[Any] = [slice(None)] * len(self.order)
        key[self.order[0]] = index
        key[self.order[1]] = key[self.order[2]] = slice(None, None, step)
        kept = [axis for axis in range(len(self.order)) if axis != self.order[0]]
        try:
            piece = np.asarray(self.array[tuple(key)])
        except Exception as exc:  # the loader's own error: a missing chunk file, a decode failure...
            raise ImageError(f"Cannot read slice {index} of the stack: {type(exc).__name__}: {exc}.") from exc
        return np.transpose(piece, [kept.index(axis) for axis in self.order[1:]])


def segment_stack(
    stack: Any,
    phrases: list[str],
    segment_slice: Callable[[np.ndarray], SegmentationResult],
    pixels: PixelOptions | None = None,
    *,
    axes: str | None = None,
    link: bool | float = False,
    normalize: str = "stack",
    max_pixels: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    cancel: Callable[[], bool] | None = None,
) -> StackResult:
    """Segment every slice of `stack` with `segment_slice(rgb) -> SegmentationResult`, then link.

    `pixels` turns each slice into RGB (one intensity range for the whole stack with
    ``normalize="stack"``); `phrases` label the results of slices that cannot be used. See
    `Segmenter.segment_stack`, which passes its own segmentation of one RGB image.
    """
    pixels = pixels or PixelOptions()
    link_iou = _link_threshold(link)
    if normalize not in ("stack", "slice"):
        raise OptionError(f"normalize must be 'stack' or 'slice', got {normalize!r}.")
    slices, layout = open_stack(stack, axes, max_pixels=max_pixels)
    total = len(slices)
    limits = None
    if normalize == "stack" and isinstance(slices, (np.ndarray, _LazyArraySlices)) and slices.dtype != np.uint8:
        limits = _stack_limits(slices, pixels.percentiles, pixels.channels)
    if progress:
        progress(total, 0)
    results: list[SegmentationResult] = []
    object_ids: list[list[int]] = []
    next_id = 1
    size: tuple[int, int] | None = None
    for index in range(total):
        if cancel is not None and cancel():
            raise CancelledError(f"Stack segmentation was cancelled after {index} of {total} slices.")
        try:
            rgb = to_rgb8(slices[index], percentiles=pixels.percentiles, channels=pixels.channels, limits=limits)
            _check_slice_size(rgb.shape[:2], size, index)
            result = segment_slice(rgb)
            size = size or tuple(rgb.shape[:2])
        except ImageError as exc:
            logger.warning("Skipping slice %d of the stack: %s", index, exc)
            result = SegmentationResult(instances=[], image_size=(0, 0), prompts=phrases, error=str(exc))
        result.info["slice"] = index
        previous = (results[-1].instances, object_ids[-1]) if results and link_iou is not None else None
        ids, next_id = _assign_ids(result.instances, previous, link_iou, next_id)
        for inst, obj in zip(result.instances, ids):
            inst.extra.update(object_id=obj, slice=index)
        results.append(result)
        object_ids.append(ids)
        if progress:
            progress(total, 1)
    if size is None:
        raise ImageError(f"No slice of the stack could be used; slice 0: {results[0].error}")
    for result in results:
        if result.error:
            result.image_size = size  # an empty slice of the label volume
    return StackResult(
        slices=results, object_ids=object_ids, axes=layout, linked=link_iou is not None,
        info={"link_iou": link_iou, "normalize": normalize},
    )


def _link_threshold(link: bool | float) -> float | None:
    if link is False or link is None:
        return None
    if link is True:
        return DEFAULT_LINK_IOU
    if isinstance(link, (int, float)) and 0 < link <= 1:
        return float(link)
    raise OptionError(f"link must be True, False or a mask IoU in (0, 1], got {link!r}.")


def _check_slice_size(size: tuple[int, int], expected: tuple[int, int] | None, index: int) -> None:
    if expected is not None and tuple(size) != tuple(expected):
        raise ImageError(
            f"Slice {index} is {size[1]} x {size[0]} pixels but the stack's slices are "
            f"{expected[1]} x {expected[0]}: every slice of a stack needs the same size."
        )


def _stack_limits(slices: np.ndarray | _LazyArraySlices, percentiles, channels) -> np.ndarray | None:
    """Intensity limits shared by the whole stack, from a strided sample of every readable slice.

    A slice that cannot be read is left out here and reported when its turn comes; None when no
    slice can be read.
    """
    count = len(slices)
    per_slice = max(1, 4_000_000 // count)
    height, width = slices.shape[1:3]
    step = max(1, int(np.ceil(np.sqrt(height * width / per_slice))))
    samples = []
    for index in range(count):
        try:
            if isinstance(slices, _LazyArraySlices):
                samples.append(slices.read(index, step))
            else:
                samples.append(slices[index, ::step, ::step])
        except ImageError as exc:
            logger.debug("Slice %d left out of the stack's intensity range: %s", index, exc)
    if not samples:
        return None
    sample = np.stack(samples)
    if sample.ndim == 4:
        if channels is None:
            sample = sample[..., :3]  # what to_rgb8 shows by default (RGBA loses alpha)
        else:
            picked = channels
            if any(not 0 <= c < sample.shape[-1] for c in picked):
                raise OptionError(
                    f"channels={picked} does not fit a stack with {sample.shape[-1]} channels: "
                    f"give one to three indices between 0 and {sample.shape[-1] - 1}."
                )
            sample = sample[..., list(picked)]
        return intensity_limits(sample, percentiles, channel_axis=-1)
    return intensity_limits(sample, percentiles)


def _assign_ids(
    instances: list[Instance], previous: tuple[list[Instance], list[int]] | None,
    link_iou: float | None, next_id: int,
) -> tuple[list[int], int]:
    """Ids for one slice's instances: inherited from the best-overlapping previous instance, else new."""
    ids = [0] * len(instances)
    if previous is not None:
        before, before_ids = previous
        pairs = []
        for i, inst in enumerate(instances):
            for j, prev in enumerate(before):
                if prev.label == inst.label:
                    iou = mask_iou(inst, prev)
                    if iou >= link_iou:
                        pairs.append((iou, i, j))
        taken_now, taken_before = set(), set()
        for _, i, j in sorted(pairs, reverse=True):
            if i not in taken_now and j not in taken_before:
                ids[i] = before_ids[j]
                taken_now.add(i)
                taken_before.add(j)
    for i in range(len(ids)):
        if ids[i] == 0:
            ids[i] = next_id
            next_id += 1
    return ids, next_id
