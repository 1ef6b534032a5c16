"""Z-stacks and time series: segment slice by slice, optionally link instances into 3D objects.

A stack is an array (or a multi-page / OME-TIFF file, or a list of images) with one slice axis
(Z or T), optionally a channel axis, then Y and X. Slices are read as views, one at a time, and
scaled to 8 bits with one intensity range for the whole stack (so a dim slice stays dim and
linking compares like with like). Each slice goes through `Segmenter.segment`, so tiling, the
embedding cache and every option work per slice. Linking joins an instance to the instance of
the same label in the previous slice that it overlaps most (mask IoU, one-to-one), giving each
3D object one id through the stack.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from promptseg.errors import CancelledError, ImageError, OptionError
from promptseg.images import DEFAULT_PERCENTILES, intensity_limits, read_pixels, to_rgb8
from promptseg.masks import mask_iou
from promptseg.results import Instance, SegmentationResult, ensure_prompt_list

if TYPE_CHECKING:
    from promptseg.segmenter import Segmenter

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


def open_stack(stack: Any, axes: str | None = None) -> tuple[Sequence[np.ndarray] | np.ndarray, str]:
    """The stack as an indexable of slices and its layout, reading files without scaling them.

    An array (or array-like) gets `axes` (or a guess); a TIFF file uses its own axes when it
    records them (OME-TIFF, ImageJ); a list holds one image (path or array) per slice.
    """
    if isinstance(stack, (str, os.PathLike)):
        return _open_tiff(Path(stack), axes)
    if isinstance(stack, (list, tuple)):
        if not stack:
            raise ImageError("The stack is empty: give at least one slice.")
        return _LazySlices(stack), "ZYX" if axes is None else axes.upper()
    array = np.asarray(stack) if not isinstance(stack, np.ndarray) else stack
    if array.ndim < 3:
        raise ImageError(f"A stack needs a slice axis; got shape {array.shape}. Use segment() for one image.")
    layout = parse_axes(axes, array.shape)
    order = [layout.index(a) for a in layout if a in SLICE_AXES] + [layout.index("Y"), layout.index("X")]
    if "C" in layout:
        order.append(layout.index("C"))
    if array.shape[order[0]] == 0:
        raise ImageError(f"The stack is empty: shape {array.shape}.")
    return np.transpose(array, order), layout  # a view: slice, Y, X[, C]


def _open_tiff(path: Path, axes: str | None) -> tuple[np.ndarray, str]:
    import tifffile

    if not path.exists():
        raise ImageError(f"No such stack file: {path}. Check the path.")
    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            recorded = series.axes.upper().replace("S", "C").replace("Q", "Z").replace("I", "Z")
            array = series.asarray()
    except Exception as exc:
        raise ImageError(f"Cannot read {path} as a TIFF stack: {exc}.") from exc
    if axes is None and len(recorded) == array.ndim and sum(a in SLICE_AXES for a in recorded) == 1:
        axes = recorded
    return open_stack(array, axes)


class _LazySlices:
    """A list of images (paths or arrays) read one at a time."""

    def __init__(self, items: Sequence[Any]) -> None:
        self.items = list(items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> np.ndarray:
        return read_pixels(self.items[index])


def segment_stack(
    segmenter: Segmenter,
    stack: Any,
    prompts: str | Sequence[str],
    *,
    axes: str | None = None,
    link: bool | float = False,
    normalize: str = "stack",
    percentiles: tuple[float, float] = DEFAULT_PERCENTILES,
    channels: Sequence[int] | None = None,
    progress: Callable[[int, int], None] | None = None,
    cancel: Callable[[], bool] | None = None,
    **options: Any,
) -> StackResult:
    """Segment every slice of `stack` with `prompts`; see `Segmenter.segment_stack`."""
    phrases = ensure_prompt_list(prompts)
    link_iou = _link_threshold(link)
    if normalize not in ("stack", "slice"):
        raise OptionError(f"normalize must be 'stack' or 'slice', got {normalize!r}.")
    for name in ("progress", "cancel"):
        options.pop(name, None)
    slices, layout = open_stack(stack, axes)
    total = len(slices)
    limits = None
    if normalize == "stack" and isinstance(slices, np.ndarray) and slices.dtype != np.uint8:
        limits = _stack_limits(slices, percentiles, channels)
    if progress:
        progress(total, 0)
    results: list[SegmentationResult] = []
    object_ids: list[list[int]] = []
    next_id = 1
    for index in range(total):
        if cancel is not None and cancel():
            raise CancelledError(f"Stack segmentation was cancelled after {index} of {total} slices.")
        rgb = to_rgb8(slices[index], percentiles=percentiles, channels=_channels(channels), limits=limits)
        result = segmenter.segment(rgb, phrases, **options)
        result.info["slice"] = index
        previous = (results[-1].instances, object_ids[-1]) if results and link_iou is not None else None
        ids, next_id = _assign_ids(result.instances, previous, link_iou, next_id)
        for inst, obj in zip(result.instances, ids):
            inst.extra.update(object_id=obj, slice=index)
        results.append(result)
        object_ids.append(ids)
        if progress:
            progress(total, 1)
    return StackResult(
        slices=results, object_ids=object_ids, axes=layout, linked=link_iou is not None,
        info={"link_iou": link_iou, "normalize": normalize},
    )


def _channels(channels):
    return tuple(channels) if channels is not None else None


def _link_threshold(link: bool | float) -> float | None:
    if link is False or link is None:
        return None
    if link is True:
        return DEFAULT_LINK_IOU
    if isinstance(link, (int, float)) and 0 < link <= 1:
        return float(link)
    raise OptionError(f"link must be True, False or a mask IoU in (0, 1], got {link!r}.")


def _stack_limits(slices: np.ndarray, percentiles, channels) -> np.ndarray:
    """Intensity limits shared by the whole stack, from a strided sample of every slice."""
    count = len(slices)
    per_slice = max(1, 4_000_000 // count)
    height, width = slices.shape[1:3]
    step = max(1, int(np.ceil(np.sqrt(height * width / per_slice))))
    sample = slices[:, ::step, ::step]
    if sample.ndim == 4:
        if channels is None:
            sample = sample[..., :3]  # what to_rgb8 shows by default (RGBA loses alpha)
        else:
            picked = _channels(channels)
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
