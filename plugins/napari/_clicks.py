"""The *Segment by clicks* dock widget: clicks and a box give one object, painted live into a Labels layer.

A Points layer holds the clicks (positive green, negative red, from its ``positive`` feature) and a
Shapes layer the box. Every change of either starts a short timer; when it fires, the prompts on
the current slice are read on the main thread and handed to a thread worker, which calls the
core's `Segmenter.segment_object` (one worker at a time; a newer change supersedes one still
waiting, and a result older than the latest change is dropped). The worker's mask is painted on
the main thread through the Labels layer's own edit history, so Ctrl+Z on the Labels layer
undoes each update. The segmenter comes from `promptseg.sessions.shared_segmenter`, so the image
embedding is computed once per slice and every further click only runs the mask decoder.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from magicgui.widgets import CheckBox, ComboBox, Container, Label, LineEdit, PushButton, SpinBox
from napari.qt.threading import create_worker
from napari.utils.notifications import show_error
from qtpy.QtCore import QTimer

from promptseg.errors import OptionError, PromptsegError
from promptseg.options import SegmentOptions, option_info
from promptseg.segmenter import default_model
from promptseg.sessions import shared_segmenter
from promptseg_napari._gl import keep_triton_out_after_mesa_llvm
from promptseg_napari._layers import AXES_CHOICES, LayerInput, layer_input, parse_channels
from promptseg_napari._widget import DEFAULT_TILE_SIZE, TILING, channels_text, tiling_choice

logger = logging.getLogger(__name__)

NEW_OBJECT, REFINE = "new object", "refine selected label"
MODES = (NEW_OBJECT, REFINE)
DEVICES = ("auto", "cpu", "cuda", "mps")
WIDGET_OPTIONS = ("tile", "channels")
"""The `SegmentOptions` the widget shows; every other option keeps the core's default."""
CLICKS_LAYER, BOX_LAYER = "promptseg clicks", "promptseg box"
POSITIVE_COLOR, NEGATIVE_COLOR = "lime", "red"
DEBOUNCE_MS = 120
"""Clicks arriving closer together than this are sent to the model as one update."""


@dataclass
class ClickRequest:
    """One update, captured on the main thread: the prompts of one slice and where to paint."""

    generation: int
    model: str
    device: str
    pixels: Any
    """The slice's pixels, ``(Y, X)``, ``(Y, X, C)`` or ``(C, Y, X)`` (a lazy layer is read in the worker)."""
    channels_first: bool
    points: np.ndarray | None
    point_labels: np.ndarray | None
    box: np.ndarray | None
    mask: np.ndarray | None
    """The object's mask when its refinement started (SAM's mask prompt), or None."""
    options: SegmentOptions
    plane: tuple[int, ...]
    """Index of the slice in the Labels layer: ``()`` for 2D, ``(z,)`` for a stack."""


@dataclass
class ClickOutcome:
    """What the worker hands back: the object's new mask on the slice, or why there is none."""

    mask: np.ndarray | None = None
    score: float = 0.0
    source: str = ""
    seconds: float = 0.0
    error: str | None = None


@dataclass
class ObjectInProgress:
    """The object the current clicks are drawing: its Labels layer, id and starting masks per slice."""

    labels: Any
    object_id: int
    mode: str
    start: dict[tuple[int, ...], np.ndarray | None]


def segment_clicks(request: ClickRequest) -> ClickOutcome:
    """Worker-thread body: load (or reuse) the segmenter and segment the one object."""
    from promptseg.images import read_array_like

    keep_triton_out_after_mesa_llvm()
    try:
        segmenter = shared_segmenter(request.model, device=request.device)
        segmenter.require_visual_prompts()
        pixels = request.pixels
        if not isinstance(pixels, np.ndarray):
            pixels = read_array_like(pixels, name="the slice")
        if request.channels_first:
            pixels = np.moveaxis(pixels, 0, -1)  # the channel-last layout segment_object reads
        start = time.perf_counter()
        result = segmenter.segment_object(
            pixels, request.points, request.point_labels, request.box, mask=request.mask,
            multimask=False if request.mask is not None else None, options=request.options,
        )
        seconds = time.perf_counter() - start
    except PromptsegError as exc:
        return ClickOutcome(error=str(exc))
    if not result.instances:
        return ClickOutcome(source=result.embedding_source, seconds=seconds)
    best = result.instances[0]
    return ClickOutcome(mask=best.full_mask(*result.image_size), score=float(best.score),
                        source=result.embedding_source, seconds=seconds)


class ClicksWidget(Container):
    """Segment one object at a time from positive/negative clicks and a box, live, into a Labels layer."""

    def __init__(self, napari_viewer: Any) -> None:
        self._viewer = napari_viewer
        self.image = ComboBox(label="image", choices=self._layer_choices("Image"), nullable=True,
                              tooltip="The image layer to click on (2D, RGB, multichannel, z-stack or time series).")
        self.axes = ComboBox(label="axes", choices=AXES_CHOICES, value="auto",
                             tooltip="Layout of the layer: Z or T = slices, C = channels. 'auto' guesses.")
        self.channels = LineEdit(label="channels", value=channels_text(option_info("channels").default),
                                 tooltip="Up to three channel numbers shown to the model as RGB, e.g. '0, 2'. "
                                         "Blank: the first three.")
        self.target = ComboBox(label="labels", choices=self._layer_choices("Labels"), nullable=True,
                               tooltip="The Labels layer to paint into. Empty: a new one is added at the first click.")
        self.mode = ComboBox(label="mode", choices=MODES, value=NEW_OBJECT,
                             tooltip="'new object': the clicks draw a new label (the next free id). 'refine "
                                     "selected label': they correct the label under the first click, else the "
                                     "Labels layer's selected label.")
        self.negative = CheckBox(text="negative clicks (T)", value=False,
                                 tooltip="Add negative (red, 'not this') clicks instead of positive (green) ones. "
                                         "Shift+click adds the other kind.")
        tile = option_info("tile")
        self.tiling = ComboBox(label="tiling", choices=TILING, value=tiling_choice(tile.default),
                               tooltip="'on': a click is answered from the tile of 'tile size' pixels that holds it, "
                                       "at the model's resolution (fine detail on a large image); 'auto' tiles images "
                                       "much larger than the model input.")
        self.tile_size = SpinBox(label="tile size (px)", min=tile.minimum, max=16384, step=16,
                                 value=tile.default if isinstance(tile.default, int) else DEFAULT_TILE_SIZE,
                                 enabled=self.tiling.value == "on")
        self.model = LineEdit(label="model", value=default_model(),
                              tooltip="Hub id or local directory of a SAM 3 model with its tracker (facebook/sam3).")
        self.device = ComboBox(label="device", choices=DEVICES, value="auto")
        self.finish_button = PushButton(text="Finish object (N)",
                                        tooltip="Keep the object and clear the clicks and the box for the next one.")
        self.status = Label(label="", value="Click on the image: positive (green) adds, Shift+click (red) removes.")
        super().__init__(widgets=[
            self.image, self.axes, self.channels, self.target, self.mode, self.negative, self.tiling,
            self.tile_size, self.model, self.device, self.finish_button, self.status,
        ])
        self.debounce_ms = DEBOUNCE_MS
        self._timer = QTimer()
        self._timer.setSingleShot(True)
        self._timer.timeout.connect(self.segment_now)
        self.points_layer = None
        self.box_layer = None
        self._object: ObjectInProgress | None = None
        self._generation = 0
        self._pending: ClickRequest | None = None
        self._worker = None
        self._quiet = False  # set while the widget itself edits the clicks (no update then)
        self.last_outcome: ClickOutcome | None = None
        self.finish_button.changed.connect(self.finish_object)
        self.image.changed.connect(self._on_image_changed)
        for control in (self.mode, self.target, self.axes, self.channels):
            control.changed.connect(self._forget_object)
        self.negative.changed.connect(self._on_negative_changed)
        self.tiling.changed.connect(lambda value: setattr(self.tile_size, "enabled", value == "on"))
        layers = napari_viewer.layers
        layers.events.inserted.connect(self._on_layer_inserted)
        layers.events.removed.connect(self._refresh_choices)
        self._refresh_choices()
        active = layers.selection.active
        if active is not None and active.__class__.__name__ == "Image":
            self.image.value = active
        self._on_image_changed()

    # ---- layer choices -------------------------------------------------------------------

    def _layer_choices(self, kind: str):
        def choices(_widget=None) -> list[tuple[str, Any]]:
            return [(layer.name, layer) for layer in self._viewer.layers if layer.__class__.__name__ == kind]

        return choices

    def _refresh_choices(self, event=None) -> None:
        self.image.reset_choices()
        self.target.reset_choices()

    def _on_layer_inserted(self, event) -> None:
        self._refresh_choices()
        if event.value.__class__.__name__ == "Image" and self.image.value is None:
            self.image.value = event.value

    def _on_image_changed(self, *_args) -> None:
        self._forget_object()
        if self.image.value is not None:
            self.prompt_layers()

    # ---- the clicks and box layers -------------------------------------------------------

    def prompt_layers(self) -> tuple[Any, Any]:
        """The Points (clicks) and Shapes (box) layers over the chosen image, added when missing."""
        image = self.image.value
        if image is None:
            raise OptionError("No image layer chosen: open an image (or File > Open Sample) and pick it in 'image'.")
        layers = self._viewer.layers
        fits = lambda layer: layer is not None and layer in layers and layer.ndim == image.ndim  # noqa: E731
        if not fits(self.box_layer):
            self.box_layer = self._viewer.add_shapes(
                ndim=image.ndim, name=BOX_LAYER, scale=image.scale, translate=image.translate,
                edge_color="yellow", face_color="transparent", edge_width=2,
            )
            self.box_layer.mode = "add_rectangle"
            self.box_layer.events.data.connect(self._on_prompts_changed)
            self._bind_keys(self.box_layer)
        if not fits(self.points_layer):
            self.points_layer = self._viewer.add_points(
                ndim=image.ndim, name=CLICKS_LAYER, scale=image.scale, translate=image.translate,
                features={"positive": np.zeros(0, dtype=bool)}, feature_defaults={"positive": True},
                face_color="positive", face_color_cycle={True: POSITIVE_COLOR, False: NEGATIVE_COLOR},
                border_color="white", size=_point_size(image),
            )
            self.points_layer.mode = "add"
            self.points_layer.events.data.connect(self._on_prompts_changed)
            self.points_layer.mouse_drag_callbacks.insert(0, self._choose_click_kind)
            self._bind_keys(self.points_layer)
            self.points_layer.bind_key("t", lambda _layer: self._toggle_negative(), overwrite=True)
            self._on_negative_changed()
            # ready to click; after the current event, as napari selects a layer it inserts after telling us
            QTimer.singleShot(0, self._select_clicks)
        return self.points_layer, self.box_layer

    def _select_clicks(self) -> None:
        if self.points_layer is not None and self.points_layer in self._viewer.layers:
            self._viewer.layers.selection.active = self.points_layer

    def _bind_keys(self, layer) -> None:
        layer.bind_key("n", lambda _layer: self.finish_object(), overwrite=True)

    def _choose_click_kind(self, layer, event) -> None:
        """Mouse press on the clicks layer in add mode: Shift flips the kind of the point this click adds."""
        if layer.mode == "add":
            negative = bool(self.negative.value) != ("Shift" in event.modifiers)
            layer.feature_defaults = {"positive": not negative}

    def _toggle_negative(self) -> None:
        self.negative.value = not self.negative.value

    def _on_negative_changed(self, *_args) -> None:
        if self.points_layer is not None:
            self.points_layer.feature_defaults = {"positive": not self.negative.value}

    # ---- updates -------------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        """An update is waiting for the timer, queued, or running in the worker."""
        return self._timer.isActive() or self._pending is not None or self._worker is not None

    def _on_prompts_changed(self, event) -> None:
        if self._quiet or str(getattr(event, "action", "changed")) not in ("added", "removed", "changed"):
            return
        self._generation += 1
        self._timer.start(self.debounce_ms)

    def segment_now(self) -> None:
        """Send the current slice's clicks and box to the model (or restore the object when none are left)."""
        try:
            request = self.make_request()
        except PromptsegError as exc:
            self._fail(str(exc))
            return
        if request is None:
            return
        self._pending = request  # a request still waiting is replaced: only the latest counts
        if self._worker is None:
            self._start_next()

    def make_request(self) -> ClickRequest | None:
        """Read the prompts of the current slice; None when there are none (the object is then
        restored to how it was before its clicks on this slice). `PromptsegError` for the user."""
        image = self.image.value
        if image is None:
            raise OptionError("No image layer chosen: open an image (or File > Open Sample) and pick it in 'image'.")
        source = layer_input(image, self.axes.value)
        options = self.segment_options()
        model = self.model.value.strip()
        if not model:
            raise OptionError("The model is empty: give a hub id such as facebook/sam3 or a local model directory.")
        plane = self.current_plane(source)
        points, point_labels = self.clicks_on(source, plane)
        box = self.box_on(source, plane)
        if points is None and box is None:
            self._pending = None
            if self._object is not None and plane in self._object.start:
                self._paint(plane, self._object.start[plane], "no clicks left on this slice: object restored")
            return None
        obj = self._object or self._begin_object(source, plane, points, point_labels)
        if plane not in obj.start:
            mask = np.asarray(obj.labels.data[plane]) == obj.object_id
            obj.start[plane] = mask if obj.mode == REFINE and mask.any() else None
        return ClickRequest(
            generation=self._generation, model=model, device=self.device.value, pixels=source.data[plane],
            channels_first=source.axes.endswith("CYX"), points=points, point_labels=point_labels, box=box,
            mask=obj.start[plane], options=options, plane=plane,
        )

    def segment_options(self) -> SegmentOptions:
        """The `SegmentOptions` the form says (`WIDGET_OPTIONS`; the rest are the core's defaults)."""
        tile = {"off": None, "auto": "auto", "on": int(self.tile_size.value)}[self.tiling.value]
        return SegmentOptions.from_flat(tile=tile, channels=parse_channels(self.channels.value))

    def current_plane(self, source: LayerInput) -> tuple[int, ...]:
        """``()`` for a 2D image, else ``(index,)`` of the slice the viewer shows."""
        if not source.is_stack:
            return ()
        image = self.image.value
        axis = _layer_axes(source, image).index(source.axes[0])
        index = int(round(float(image.world_to_data(self._viewer.dims.point)[axis])))
        count = source.labels_shape[0]
        if not 0 <= index < count:
            raise OptionError(
                f"The viewer shows slice {index}, outside {image.name!r} (slices 0..{count - 1}): move the slider "
                "onto the image."
            )
        return (index,)

    def clicks_on(self, source: LayerInput, plane: tuple[int, ...]) -> tuple[np.ndarray | None, np.ndarray | None]:
        """The clicks on `plane` as image pixel ``(x, y)`` and labels 1 (positive) / 0 (negative)."""
        layer = self.points_layer
        if layer is None or not len(layer.data):
            return None, None
        coords = self._image_coords(source, layer, layer.data)
        on_plane = _on_plane(coords, plane)
        if not on_plane.any():
            return None, None
        positive = np.asarray(layer.features["positive"], dtype=bool)[on_plane]
        return coords[on_plane][:, [-1, -2]], positive.astype(np.int64)

    def box_on(self, source: LayerInput, plane: tuple[int, ...]) -> np.ndarray | None:
        """The last shape on `plane` (a rectangle; another shape counts as its bounding box) as an
        image pixel box ``(x0, y0, x1, y1)``, or None."""
        layer = self.box_layer
        if layer is None:
            return None
        for corners in reversed(layer.data):
            coords = self._image_coords(source, layer, corners)
            if _on_plane(coords, plane).all():
                (y0, x0), (y1, x1) = coords[:, -2:].min(axis=0), coords[:, -2:].max(axis=0)
                return np.array([x0, y0, x1, y1])
        return None

    def _image_coords(self, source: LayerInput, layer: Any, data: np.ndarray) -> np.ndarray:
        """Positions in `layer`'s data -> the image's Labels axes (slice, y, x) in data pixels."""
        image = self.image.value
        keep = [i for i, axis in enumerate(_layer_axes(source, image)) if axis != "C"]
        return np.array([np.asarray(image.world_to_data(layer.data_to_world(row)))[keep] for row in data])

    def _begin_object(self, source: LayerInput, plane, points, point_labels) -> ObjectInProgress:
        """The object the first click starts: a new id, or the label to refine."""
        labels = self._target_labels(source)
        if self.mode.value == NEW_OBJECT:
            object_id = int(np.max(labels.data)) + 1
        else:
            object_id = _label_under(np.asarray(labels.data[plane]), points, point_labels) or int(labels.selected_label)
            if object_id == 0:
                raise OptionError("No label to refine: click inside a label, or select one in the Labels layer.")
        labels.selected_label = object_id
        self._object = ObjectInProgress(labels=labels, object_id=object_id, mode=self.mode.value, start={})
        return self._object

    def _target_labels(self, source: LayerInput) -> Any:
        labels = self.target.value
        if labels is None:
            image = self.image.value
            labels = self._viewer.add_labels(
                np.zeros(source.labels_shape, dtype=np.int32), name=f"{image.name} objects",
                scale=source.scale, translate=source.translate,
            )
            self.target.value = labels
            layers = self._viewer.layers
            if self.box_layer in layers:  # under the clicks and the box, which stay visible on top
                layers.move(layers.index(labels), layers.index(self.box_layer))
            self._select_clicks()  # keep clicking
        elif tuple(labels.data.shape) != source.labels_shape:
            raise OptionError(
                f"Labels layer {labels.name!r} has shape {tuple(labels.data.shape)}, the image needs "
                f"{source.labels_shape}: choose another Labels layer or leave 'labels' empty for a new one."
            )
        return labels

    def _start_next(self) -> None:
        request, self._pending = self._pending, None
        worker = create_worker(segment_clicks, request, _start_thread=False)
        worker.returned.connect(lambda outcome: self._on_returned(request, outcome))
        worker.errored.connect(self._on_errored)
        worker.finished.connect(self._on_finished)
        self._worker = worker
        self.status.value = "Segmenting..."
        worker.start()

    def _on_returned(self, request: ClickRequest, outcome: ClickOutcome) -> None:
        self.last_outcome = outcome
        if outcome.error:
            self._fail(outcome.error)
        elif request.generation == self._generation and self._object is not None:
            where = f"slice {request.plane[0]}" if request.plane else "the image"
            cached = "image encoder skipped" if outcome.source in ("memory", "disk") else "image encoded"
            if outcome.mask is None and request.mask is not None:
                self._paint(request.plane, request.mask, "the clicks leave no mask: label kept as it was")
            elif outcome.mask is None:
                self._paint(request.plane, None, "the clicks give no mask: add a positive click or a box")
            else:
                self._paint(request.plane, outcome.mask,
                            f"label {self._object.object_id} on {where} in {outcome.seconds:.2f} s ({cached})")

    def _on_errored(self, exc: Exception) -> None:
        # napari's worker already shows the exception as a notification (with its traceback).
        logger.error("Click segmentation failed: %s: %s", type(exc).__name__, exc)
        self.status.value = f"Failed: {type(exc).__name__}: {exc}"

    def _on_finished(self) -> None:
        self._worker = None
        if self._pending is not None:
            self._start_next()

    def _paint(self, plane: tuple[int, ...], mask: np.ndarray | None, message: str) -> None:
        """Make the object's pixels on `plane` equal `mask` (none where it is None), as one undo step."""
        obj = self._object
        changed = paint_object(obj.labels, plane, obj.object_id, mask)
        self.status.value = f"{message}; {changed} pixels changed"

    # ---- finishing -----------------------------------------------------------------------

    def finish_object(self, *_args) -> None:
        """Keep the painted object and clear the clicks and the box; the next click starts a new object."""
        self._timer.stop()
        self._pending = None
        self._generation += 1  # a result still in the worker belongs to the finished object: dropped
        self._quiet = True
        try:
            for layer in (self.points_layer, self.box_layer):
                if layer is not None and len(layer.data):
                    layer.data = np.empty((0, layer.ndim)) if layer is self.points_layer else []
        finally:
            self._quiet = False
        done = self._object
        self._object = None
        if self.image.value is not None and self.image.value in self._viewer.layers:
            self.prompt_layers()  # brings back a clicks or box layer that was deleted
        self.status.value = (f"Label {done.object_id} finished: click for the next object." if done
                             else "Click on the image for a new object.")

    def _forget_object(self, *_args) -> None:
        """A changed image, layer, mode or layout: the next click starts over."""
        self._object = None

    def _fail(self, message: str) -> None:
        self.status.value = f"Error: {message}"
        show_error(message)


def paint_object(labels: Any, plane: tuple[int, ...], object_id: int, mask: np.ndarray | None) -> int:
    """Set label `object_id` on slice `plane` of `labels` to `mask` through the layer's edit history.

    Pixels of the id outside `mask` become background; pixels of `mask` that are background get the
    id; other labels are never painted over. One call is one undo step. Returns the pixels changed.
    """
    region = np.asarray(labels.data[plane])
    new = np.zeros(region.shape, dtype=bool) if mask is None else mask
    clear = (region == object_id) & ~new
    add = new & (region == 0)
    rows, cols = np.nonzero(clear | add)
    if not len(rows):
        return 0
    values = np.where(add[rows, cols], object_id, 0).astype(labels.data.dtype)
    indices = (*(np.full(len(rows), index) for index in plane), rows, cols)
    labels.data_setitem(indices, values)
    return len(rows)


def _point_size(image: Any) -> float:
    """A click marker about a thirtieth of the image's larger side (in its data pixels)."""
    low, high = np.asarray(image.extent.data)[:, -2:]
    return float(max(high - low)) / 30


def _layer_axes(source: LayerInput, image: Any) -> str:
    """The axes napari gives `image`: the layout without an RGB layer's colour axis."""
    return source.axes[:-1] if image.rgb else source.axes


def _on_plane(coords: np.ndarray, plane: tuple[int, ...]) -> np.ndarray:
    """Which positions (slice, y, x) lie on slice `plane` (all of them in 2D)."""
    if not plane:
        return np.ones(len(coords), dtype=bool)
    return np.round(coords[:, 0]).astype(int) == plane[0]


def _label_under(region: np.ndarray, points: np.ndarray | None, point_labels: np.ndarray | None) -> int:
    """The label under the first positive click (else the first click), 0 on background or outside."""
    if points is None:
        return 0
    x, y = points[point_labels == 1][0] if (point_labels == 1).any() else points[0]
    row, col = int(round(y)), int(round(x))
    if not (0 <= row < region.shape[0] and 0 <= col < region.shape[1]):
        return 0
    return int(region[row, col])
