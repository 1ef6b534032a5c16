"""Map napari image layers to core inputs, and core results back to Labels data.

No segmentation here: this module decides which axes of a layer are slices, channels and pixels,
and turns a `SegmentationResult` / `StackResult` / `VideoResult` into an instance-id array plus a
features table (one row per id) that napari shows in the status bar.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np

from promptseg.errors import OptionError
from promptseg.images import check_pixel_budget, read_array_like

AXES_CHOICES = ("auto", "YX", "YXC", "CYX", "ZYX", "TYX", "ZYXC", "TYXC", "ZCYX", "TCYX")
"""Layouts the widget accepts: one optional slice axis (Z or T), an optional channel axis, Y, X."""


@dataclass
class LayerInput:
    """What the core gets from one image layer, and how the Labels layer must sit over it."""

    data: Any
    """The pixels (level 0 of a multiscale layer), not copied."""
    axes: str
    """Layout of `data`, e.g. ``"YX"``, ``"YXC"``, ``"ZYX"``, ``"TCYX"``."""
    labels_shape: tuple[int, ...]
    scale: tuple[float, ...]
    translate: tuple[float, ...]

    @property
    def is_stack(self) -> bool:
        return "Z" in self.axes or "T" in self.axes

    def single_image(self) -> np.ndarray:
        """A 2D image as ``(Y, X)`` or channel-last ``(Y, X, C)``, the layout `segment` reads.

        A lazy layer (dask, zarr) is read here; a failed read is an `ImageError`.
        """
        array = self.data if isinstance(self.data, np.ndarray) else read_array_like(self.data, name="the layer")
        if self.axes == "CYX":
            array = np.moveaxis(array, 0, -1)
        return array

    def frames(self) -> Any:
        """The slices as a ``(T, H, W[, C])`` video, the layout `segment_video` reads (Z slices are
        frames too). ``ZYX``, ``TYXC``... are already in that order; a ``ZCYX``/``TCYX`` layer is seen
        channel-last one slice at a time, so a lazy layer is still read slice by slice."""
        return ChannelsLast(self.data) if self.axes[1:2] == "C" else self.data


def check_trackable(source: LayerInput, name: str) -> None:
    """Track mode reads the layer as a video: it needs slices to track through. Refused before a run."""
    if not source.is_stack:
        raise OptionError(
            f"Layer {name!r} ({source.axes}) has no slices to track through: track mode needs a z-stack or "
            "time series. Choose another stack mode for a 2D image, or set 'axes' if the layer is a stack."
        )


class ChannelsLast:
    """A ``(T, C, H, W)`` array seen as ``(T, H, W, C)``; indexing one slice reads only that slice."""

    def __init__(self, data: Any) -> None:
        self.data = data

    @property
    def shape(self) -> tuple[int, ...]:
        slices, channels, height, width = self.data.shape
        return (slices, height, width, channels)

    def __len__(self) -> int:
        return int(self.data.shape[0])

    def __getitem__(self, index: int) -> np.ndarray:
        return np.moveaxis(np.asarray(self.data[index]), 0, -1)


def guess_axes(layer: Any) -> str:
    """The layout of `layer`'s data: RGB layers end in C; a 3D layer is Z (T if its axis is named so)."""
    ndim = layer.ndim
    first = str(getattr(layer, "axis_labels", ("",) * ndim)[0]).lower()
    slice_axis = "T" if first.startswith("t") else "Z"
    if layer.rgb:
        if ndim == 2:
            return "YXC"
        if ndim == 3:
            return slice_axis + "YXC"
    elif ndim == 2:
        return "YX"
    elif ndim == 3:
        return slice_axis + "YX"
    raise OptionError(
        f"Layer {layer.name!r} has {ndim} dimensions{' plus RGB' if layer.rgb else ''}; the widget "
        "cannot guess which are slices and channels. Choose the axes (e.g. ZCYX or TCYX) in the "
        "'axes' box, or split the layer."
    )


def layer_input(layer: Any, axes: str = "auto") -> LayerInput:
    """Check `layer` against `axes` (``"auto"`` guesses) and describe the Labels layer to make."""
    from napari.layers import Image

    if not isinstance(layer, Image):
        raise OptionError("Choose an image layer to segment (add one with File > Open or File > Open Sample).")
    data = layer.data[0] if layer.multiscale else layer.data
    layout = guess_axes(layer) if axes in (None, "", "auto") else axes.upper()
    if len(layout) != len(data.shape) or layout not in AXES_CHOICES:
        raise OptionError(
            f"axes={layout!r} does not fit layer {layer.name!r} of shape {tuple(data.shape)}: "
            f"choose one letter per dimension, e.g. {guess_axes_hint(len(data.shape))}, or 'auto'."
        )
    if layer.rgb and not layout.endswith("C"):
        raise OptionError(f"Layer {layer.name!r} is RGB: its axes must end in C (e.g. YXC or ZYXC).")
    if data.shape[layout.index("Y")] < 2 or data.shape[layout.index("X")] < 2:
        raise OptionError(f"Layer {layer.name!r} of shape {tuple(data.shape)} has no 2D image to segment.")
    # before any pixel is read: a lazy or multiscale layer's full resolution may not fit in memory
    check_pixel_budget(data.shape[layout.index("Y")], data.shape[layout.index("X")], None, f"layer {layer.name!r}")
    # layer.scale has one entry per layer dimension; an RGB layer's colour axis (last) has none,
    # so dropping C from the data axes gives the Labels axes and their positions in layer.scale.
    keep = [i for i, a in enumerate(layout) if a != "C"]
    scale = tuple(float(layer.scale[i]) for i in keep)
    translate = tuple(float(layer.translate[i]) for i in keep)
    labels_shape = tuple(int(data.shape[i]) for i in keep)
    return LayerInput(data=data, axes=layout, labels_shape=labels_shape, scale=scale, translate=translate)


def guess_axes_hint(ndim: int) -> str:
    return {2: "YX", 3: "ZYX, CYX or YXC", 4: "ZCYX, TCYX or ZYXC"}.get(ndim, "ZYX")


def parse_prompts(text: str) -> list[str]:
    """Prompts typed as ``"cell, nucleus; mitotic cell"`` (commas, semicolons or new lines)."""
    pieces = text.replace(";", ",").replace("\n", ",").split(",")
    return [piece.strip() for piece in pieces if piece.strip()]


def parse_channels(text: str) -> tuple[int, ...] | None:
    """``"0, 2"`` -> ``(0, 2)``; blank -> None (the first three channels)."""
    if not text.strip():
        return None
    try:
        return tuple(int(piece) for piece in text.replace(";", ",").split(",") if piece.strip())
    except ValueError as exc:
        raise OptionError(f"channels must be channel numbers such as '0, 2', got {text!r}.") from exc


def labels_from_result(result: Any) -> tuple[np.ndarray, dict[str, list]]:
    """Instance ids (``i + 1`` for instance ``i``) and one features row per id."""
    labels = result.to_label_image(np.int32)
    features = {
        "index": [i + 1 for i in range(len(result.instances))],
        "label": [inst.label for inst in result.instances],
        "score": [round(float(inst.score), 4) for inst in result.instances],
        "area": [inst.area for inst in result.instances],
    }
    return labels, features


def labels_from_stack(stack: Any) -> tuple[np.ndarray, dict[str, list]]:
    """Object ids through the stack and one features row per object (best score, total area, slices)."""
    volume = stack.to_label_volume(np.int32)
    rows: dict[int, dict[str, Any]] = {}
    for obj, pieces in sorted(stack.objects().items()):
        rows[obj] = {
            "index": obj,
            "label": pieces[0][1].label,
            "score": round(max(float(inst.score) for _, inst in pieces), 4),
            "area": sum(inst.area for _, inst in pieces),
            "slices": len({index for index, _ in pieces}),
        }
    columns = ("index", "label", "score", "area", "slices")
    return volume, {name: [row[name] for row in rows.values()] for name in columns}


def labels_from_video(video: Any) -> tuple[np.ndarray, dict[str, list]]:
    """The tracked ids through the frames (``object_id + 1``) and one features row per track."""
    volume = video.to_label_volume(np.int32)
    tracks = video.tracks()
    features = {
        "index": [track.object_id + 1 for track in tracks],
        "label": [track.label for track in tracks],
        "score": [round(track.best_score, 4) for track in tracks],
        "first_frame": [track.first_frame for track in tracks],
        "last_frame": [track.last_frame for track in tracks],
        "frames": [track.num_frames for track in tracks],
    }
    return volume, features


def parse_score(text: str, name: str) -> float | None:
    """``"0.4"`` -> 0.4; blank -> None (the core's default). The core checks the range."""
    if not text.strip():
        return None
    try:
        return float(text)
    except ValueError as exc:
        raise OptionError(f"{name} must be a score between 0 and 1 such as '0.4', or blank for the model's own; "
                          f"got {text!r}.") from exc


def embedding_source(result: Any) -> str:
    """``memory``/``disk``/``computed``/``mixed`` for an image, or over every slice of a stack or video."""
    if hasattr(result, "frame_indices"):  # a VideoResult sums its frames up in info
        return result.info.get("embedding_source", "")
    slices = getattr(result, "slices", None)
    if slices is None:
        return result.embedding_source
    sources = {s.embedding_source for s in slices}
    return sources.pop() if len(sources) == 1 else "mixed"


def summary(features: dict[str, list]) -> str:
    """``"3 x cell, 1 x nucleus"`` (or ``"nothing found"``)."""
    counts = Counter(features["label"])
    return ", ".join(f"{n} x {label}" for label, n in counts.items()) or "nothing found"
