"""Map napari image layers to core inputs, and core results back to Labels data.

No segmentation here: this module decides which axes of a layer are slices, channels and pixels,
and turns a `SegmentationResult` / `StackResult` / `VideoResult` into an instance-id array plus a
features table (one row per id) that napari shows in the status bar, and, on request, a class
array (one id per prompt) with its colours. A lazy layer (dask, zarr, multiscale) is handed to
the core as it is; labels of a large image go to a zarr store on disk instead of memory.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from promptseg.errors import ImageError, OptionError
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
    levels: tuple[Any, ...] = ()
    """The coarser levels of a multiscale layer (same layout as `data`), not read."""

    @property
    def is_stack(self) -> bool:
        return "Z" in self.axes or "T" in self.axes

    @property
    def lazy(self) -> bool:
        """Pixels not in memory (dask, zarr) or a pyramid: segmented tile by tile when tiling is on."""
        return bool(self.levels) or not isinstance(self.data, np.ndarray)

    @property
    def level_shapes(self) -> list[tuple[int, ...]]:
        """The Labels shape at each level of the layer (one level unless it is multiscale)."""
        keep = [i for i, a in enumerate(self.axes) if a != "C"]
        return [self.labels_shape] + [tuple(int(level.shape[i]) for i in keep) for level in self.levels]

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


def layer_input(layer: Any, axes: str = "auto", tiled: bool = False) -> LayerInput:
    """Check `layer` against `axes` (``"auto"`` guesses) and describe the Labels layer to make.

    A lazy 2D layer segmented `tiled` is read a tile at a time, so its full plane is not held to
    the pixel budget; read whole (tiling off), it is, before any pixel is read.
    """
    from napari.layers import Image

    if not isinstance(layer, Image):
        raise OptionError("Choose an image layer to segment (add one with File > Open or File > Open Sample).")
    data = layer.data[0] if layer.multiscale else layer.data
    levels = tuple(layer.data[i] for i in range(1, len(layer.data))) if layer.multiscale else ()
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
    read_in_tiles = tiled and (levels or not isinstance(data, np.ndarray)) and not set("ZT") & set(layout)
    if not read_in_tiles:
        try:
            check_pixel_budget(data.shape[layout.index("Y")], data.shape[layout.index("X")], None,
                               f"layer {layer.name!r}")
        except ImageError as exc:
            lazy_2d = (levels or not isinstance(data, np.ndarray)) and not set("ZT") & set(layout)
            if not lazy_2d:
                raise
            raise ImageError(f"{exc} In this widget: set 'tiling' to 'on' or 'auto' to read the layer "
                             "one tile at a time.") from None
    # layer.scale has one entry per layer dimension; an RGB layer's colour axis (last) has none,
    # so dropping C from the data axes gives the Labels axes and their positions in layer.scale.
    keep = [i for i, a in enumerate(layout) if a != "C"]
    scale = tuple(float(layer.scale[i]) for i in keep)
    translate = tuple(float(layer.translate[i]) for i in keep)
    labels_shape = tuple(int(data.shape[i]) for i in keep)
    return LayerInput(data=data, axes=layout, labels_shape=labels_shape, scale=scale, translate=translate,
                      levels=levels)


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


def result_features(result: Any) -> dict[str, list]:
    """One features row per instance id (``i + 1`` for instance ``i``)."""
    return {
        "index": [i + 1 for i in range(len(result.instances))],
        "label": [inst.label for inst in result.instances],
        "score": [round(float(inst.score), 4) for inst in result.instances],
        "area": [inst.area for inst in result.instances],
    }


@dataclass
class ImageLabels:
    """The Labels data of one image: arrays in memory, or zarr pyramids in `store` on disk."""

    labels: Any
    classes: Any = None
    store: str | None = None


def image_labels(result: Any, prompts: list[str], source: LayerInput, classes: bool, disk_pixels: int,
                 store: str = "") -> ImageLabels:
    """The instance (and, if asked, class) labels of `result`: in memory for an image of at most
    `disk_pixels` pixels, else written block by block to OME-Zarr pyramids (one level per level of
    the layer) under `store`, or a temporary folder removed when Python exits."""
    from promptseg.large_images import class_ids, write_label_pyramid, write_labels

    values = class_ids(result, prompts) if classes else None
    if int(np.prod(source.labels_shape)) <= disk_pixels:
        class_image = None
        if classes:
            class_image = np.zeros(source.labels_shape, np.int32)
            write_labels(result, class_image, values)
        return ImageLabels(result.to_label_image(np.int32), class_image)
    folder = Path(store) if store else temporary_store()
    shapes = source.level_shapes
    labels = write_label_pyramid(result, folder / "instances", shapes, name="instances")
    class_levels = write_label_pyramid(result, folder / "classes", shapes, values, name="classes") if classes else None
    return ImageLabels(labels, class_levels, str(folder))


def temporary_store() -> Path:
    """A new folder for labels on disk, removed when Python exits."""
    folder = Path(tempfile.mkdtemp(prefix="promptseg-labels-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def class_legend(prompts: list[str]) -> list[tuple[str, str]]:
    """``(prompt, "#rrggbb")`` per prompt, class id = position + 1; colours from `promptseg.render`."""
    from promptseg.render import instance_colors

    return [(prompt, "#{:02x}{:02x}{:02x}".format(*map(int, color)))
            for prompt, color in zip(prompts, instance_colors(len(prompts)))]


def class_colormap(legend: list[tuple[str, str]]) -> Any:
    """A napari colormap giving class id ``i + 1`` the legend's ``i``-th colour (0 transparent)."""
    from napari.utils.colormaps import DirectLabelColormap

    colors = {None: "transparent", 0: "transparent"}
    colors.update({index + 1: color for index, (_, color) in enumerate(legend)})
    return DirectLabelColormap(color_dict=colors)


def classes_of(labels: np.ndarray, features: dict[str, list], prompts: list[str]) -> np.ndarray:
    """Class ids (prompt position + 1) of an instance-id array, through its features table."""
    lookup = np.zeros(max(features["index"], default=0) + 1, dtype=np.int32)
    for index, label in zip(features["index"], features["label"]):
        lookup[index] = prompts.index(label) + 1
    return lookup[labels]


def legend_html(legend: list[tuple[str, str]]) -> str:
    """The legend as rich text: a colour swatch and the prompt, one class a line."""
    return "<br>".join(f'<span style="color:{color}">&#9632;</span> {_escape(prompt)} ({index + 1})'
                       for index, (prompt, color) in enumerate(legend))


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


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
