"""The *Segment by text* dock widget: type prompts, get a Labels layer of instances.

The work runs in a napari thread worker so the viewer stays responsive; the core reports each
finished tile or slice through a Qt signal, which Qt delivers on the main thread, where the
progress bar and layers are updated (layers are never touched from the worker). Progress is the
core's ``progress(total, advance)``: the total sets the bar's maximum, each advance moves it.
Cancel sets an event the core checks before each tile or slice. The segmenter comes from
`promptseg.sessions.shared_segmenter` and is kept, so a second prompt on the same image skips the
image encoder.

A lazy 2D layer (dask, zarr, multiscale) segmented with tiling on is read one tile at a time by
the core (`Segmenter.segment_large`), never whole; the labels of an image above 'labels on disk
above' megapixels are written block by block to OME-Zarr on disk and shown from there (multiscale
when the image is). 'class layer' adds a second Labels layer beside the instances: one id per
prompt, one colour per class, with a legend in the widget.

A z-stack or time series is segmented in one of three stack modes: each slice on its own, slices
linked by mask overlap (`segment_stack`), or tracked with SAM 3's video model (`segment_video`),
which follows each object through the slices; its progress and Cancel count frames.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    FloatSlider,
    Label,
    LineEdit,
    ProgressBar,
    PushButton,
    SpinBox,
)
from napari.qt.threading import create_worker
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtCore import QObject, Signal

from promptseg.errors import CancelledError, PromptsegError
from promptseg.large_images import check_store_path
from promptseg.options import SegmentOptions, option_info
from promptseg.segmenter import default_model
from promptseg.sessions import shared_segmenter
from promptseg_napari._gl import keep_triton_out_after_mesa_llvm
from promptseg_napari._layers import (
    AXES_CHOICES,
    LayerInput,
    check_trackable,
    class_colormap,
    class_legend,
    classes_of,
    embedding_source,
    image_labels,
    labels_from_stack,
    labels_from_video,
    layer_input,
    legend_html,
    result_features,
    parse_channels,
    parse_prompts,
    parse_score,
    summary,
)

logger = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda", "mps")
TILING = ("off", "auto", "on")
WIDGET_OPTIONS = ("threshold", "smooth", "min_area", "tile", "channels")
"""The `SegmentOptions` the widget shows; their defaults, limits and help come from the core, and
every other option keeps the core's default."""
SEPARATE, LINK, TRACK = "separate slices", "link by overlap", "track (video model)"
STACK_MODES = (SEPARATE, LINK, TRACK)
"""How a z-stack or time series is segmented: slice by slice, slices linked by mask overlap, or
objects tracked through the slices by SAM 3's video model."""
TRACK_IGNORES = ("smooth", "min_area", "tiling", "tile_size")
"""Form fields the video model does not use (it keeps and de-duplicates objects itself): disabled
in track mode, and not passed to `segment_video`, which refuses them."""
DEFAULT_TILE_SIZE = 1008  # what 'on' starts from: SAM 3's input size
DISK_LABELS_MPX = 64
"""Images above this many megapixels get their labels written to disk (zarr) instead of memory:
64 M pixels is 256 MB of int32 labels (8192 x 8192)."""
SOURCE_TEXT = {
    "computed": "computed (first time on this image)",
    "memory": "cached (memory): image encoder skipped",
    "disk": "cached (disk): image encoder skipped",
    "mixed": "partly cached",
}

@dataclass
class Job:
    """Everything a run needs, captured on the main thread when Run is pressed."""

    image: Any
    source: LayerInput
    prompts: list[str]
    model: str
    device: str
    options: SegmentOptions
    mode: str
    keep: bool
    new_threshold: float | None = None
    """Track mode: the score a detection needs to start a new object (None: the model's own)."""
    classes: bool = False
    """Also make a class layer (one id per prompt)."""
    disk_pixels: int = DISK_LABELS_MPX * 1_000_000
    """Labels of a 2D image with more pixels than this go to a zarr store on disk."""
    store: str = ""
    """Folder of that store; blank: a temporary folder."""


@dataclass
class Outcome:
    """What the worker hands back: labels and features, or why there are none."""

    labels: Any = None
    """Instance ids: an array, or a list of zarr arrays (finest first) on disk."""
    features: dict[str, list] = field(default_factory=dict)
    classes: Any = None
    """Class ids (prompt position + 1) in the same form as `labels`, when asked for."""
    store: str | None = None
    """The folder holding the labels when they were written to disk."""
    source: str = ""
    seconds: float = 0.0
    model: dict[str, str] = field(default_factory=dict)
    error: str | None = None
    cancelled: bool = False
    skipped: dict[int, str] = field(default_factory=dict)
    """Slices of a stack that could not be used (empty in the labels), with the reason."""


class _ProgressRelay(QObject):
    """Carries ``(total, advance)`` from the worker thread to the main thread (a queued signal)."""

    advanced = Signal(int, int)


def run_job(job: Job, progress, cancel) -> Outcome:
    """Worker-thread body: load (or reuse) the segmenter and segment the image or stack."""
    keep_triton_out_after_mesa_llvm()
    try:
        segmenter = shared_segmenter(job.model, device=job.device)
        start = time.perf_counter()
        skipped, store = {}, None
        if job.source.is_stack and job.mode == TRACK:
            # frames are read one at a time, so a lazy (dask, zarr) layer stays lazy
            result = segmenter.segment_video(
                job.source.frames(), job.prompts, new_threshold=job.new_threshold, options=job.options,
                progress=progress, cancel=cancel,
            )
            labels, features = labels_from_video(result)
            classes = classes_of(labels, features, job.prompts) if job.classes else None
        elif job.source.is_stack:
            # a lazy (dask, zarr) layer is passed as it is: read one slice at a time
            result = segmenter.segment_stack(
                job.source.data, job.prompts, axes=job.source.axes, link=job.mode == LINK,
                options=job.options, progress=progress, cancel=cancel,
            )
            labels, features = labels_from_stack(result)
            classes = classes_of(labels, features, job.prompts) if job.classes else None
            skipped = result.errors
        else:
            result = segment_plane(segmenter, job, progress, cancel)
            features = result_features(result)
            written = image_labels(result, job.prompts, job.source, job.classes, job.disk_pixels, job.store)
            labels, classes, store = written.labels, written.classes, written.store
        return Outcome(
            labels=labels, features=features, source=embedding_source(result),
            seconds=time.perf_counter() - start, model=segmenter.describe(), skipped=skipped,
            classes=classes, store=store,
        )
    except CancelledError as exc:
        return Outcome(cancelled=True, error=str(exc))
    except PromptsegError as exc:
        return Outcome(error=str(exc))


def segment_plane(segmenter: Any, job: Job, progress, cancel) -> Any:
    """One 2D image: a lazy layer with tiling on is read tile by tile (`segment_large`, its coarser
    levels used for the intensity scale); anything else is read whole."""
    source = job.source
    if source.lazy and job.options.tiling.tile is not None:
        return segmenter.segment_large(
            source.data, job.prompts, job.options, axes=source.axes, overview=source.levels,
            progress=progress, cancel=cancel,
        )
    return segmenter.segment(source.single_image(), job.prompts, options=job.options, progress=progress, cancel=cancel)


class SegmentWidget(Container):
    """Segment the chosen image layer by text prompts into a Labels layer of instances."""

    def __init__(self, napari_viewer: Any) -> None:
        self._viewer = napari_viewer
        self.image = ComboBox(label="image", choices=self._image_choices, nullable=True,
                              tooltip="The image layer to segment (2D, RGB, multichannel, z-stack or time series).")
        self.axes = ComboBox(label="axes", choices=AXES_CHOICES, value="auto",
                             tooltip="Layout of the layer: Z or T = slices, C = channels. 'auto' guesses.")
        self.channels = LineEdit(label="channels", value=channels_text(option_info("channels").default),
                                 tooltip="Up to three channel numbers shown to the model as RGB, e.g. '0, 2'. "
                                         "Blank: the first three.")
        self.prompts = LineEdit(label="prompts", value="",
                                tooltip="What to segment; several prompts separated by commas, e.g. 'nucleus, mitotic cell'.")
        threshold, smooth, min_area = option_info("threshold"), option_info("smooth"), option_info("min_area")
        self.threshold = FloatSlider(label="threshold", min=threshold.minimum, max=threshold.maximum, step=0.01,
                                     value=threshold.default, tooltip=_tip(threshold))
        self.smooth = SpinBox(label="mask smoothness", min=smooth.minimum, max=50, value=smooth.default,
                              tooltip=_tip(smooth))
        self.min_area = SpinBox(label="min area (px)", min=min_area.minimum, max=10_000_000, value=min_area.default,
                                tooltip=_tip(min_area))
        tile = option_info("tile")
        self.tiling = ComboBox(label="tiling", choices=TILING, value=tiling_choice(tile.default),
                               tooltip="'on' splits the image into overlapping tiles of 'tile size' pixels, each at "
                                       "the model's resolution; 'auto' tiles images much larger than the model input.")
        self.tile_size = SpinBox(label="tile size (px)", min=tile.minimum, max=16384, step=16,
                                 value=tile.default if isinstance(tile.default, int) else DEFAULT_TILE_SIZE,
                                 enabled=self.tiling.value == "on")
        self.stack_mode = ComboBox(
            label="stack mode", choices=STACK_MODES, value=LINK,
            tooltip="Z-stacks and time series: segment each slice on its own; link each slice's objects to the "
                    "previous slice's by mask overlap; or track objects through the slices with SAM 3's video model.")
        self.new_threshold = LineEdit(
            label="new object score", value="", enabled=False,
            tooltip="Track mode: the score a detection needs to start a new object (0 to 1). "
                    "Blank: the model's own (0.7 at threshold 0.5).")
        self.model = LineEdit(label="model", value=default_model(),
                              tooltip="Hub id or local directory of a SAM 3 model (default: PROMPTSEG_MODEL).")
        self.device = ComboBox(label="device", choices=DEVICES, value="auto")
        self.keep = CheckBox(text="keep previous result layers", value=False,
                             tooltip="Add a new Labels layer on each run instead of updating the last one.")
        self.class_layer = CheckBox(text="class layer (one id per prompt)", value=False,
                                    tooltip="Also add a Labels layer where every object of prompt i has id i + 1, "
                                            "one colour per prompt (see the legend).")
        self.disk_above = SpinBox(label="labels on disk above (Mpx)", min=0, max=10_000_000, value=DISK_LABELS_MPX,
                                  tooltip="Images with more megapixels get their labels written block by block "
                                          "to OME-Zarr on disk instead of memory (0: always).")
        self.store = LineEdit(label="labels store", value="",
                              tooltip="Folder for labels written to disk (OME-Zarr: instances/ and classes/). "
                                      "Blank: a temporary folder removed when napari exits.")
        self.legend = Label(label="classes", value="")
        self.legend.visible = False
        self.legend_entries: list[tuple[str, str]] = []
        self.run_button = PushButton(text="Run")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.progress = ProgressBar(label="progress", min=0, max=1, value=0)
        self.status = Label(label="", value="Choose an image layer, type prompts, press Run.")
        super().__init__(widgets=[
            self.image, self.axes, self.channels, self.prompts, self.threshold, self.smooth,
            self.min_area, self.tiling, self.tile_size, self.stack_mode, self.new_threshold, self.model, self.device,
            self.keep, self.class_layer, self.disk_above, self.store, self.run_button, self.cancel_button,
            self.progress, self.status, self.legend,
        ])
        self.tiling.changed.connect(self._enable_fields)
        self.stack_mode.changed.connect(self._enable_fields)
        self.run_button.changed.connect(self.run)
        self.cancel_button.changed.connect(self.cancel)
        self.prompts.native.returnPressed.connect(self.run)
        self._worker = None
        self._cancel_event = threading.Event()
        self._relay = _ProgressRelay()
        self._relay.advanced.connect(self._on_progress)
        # closing the dock (or the viewer) mid-run stops the worker at its next step
        self.native.destroyed.connect(lambda *_: self._cancel_event.set())
        self._outputs: dict[int, tuple[weakref.ref, Any]] = {}
        self.last_outcome: Outcome | None = None
        layers = napari_viewer.layers
        layers.events.inserted.connect(self._on_layer_inserted)
        layers.events.removed.connect(self._refresh_choices)
        layers.events.moved.connect(self._refresh_choices)
        self._refresh_choices()
        active = layers.selection.active
        if active is not None and active.__class__.__name__ == "Image":
            self.image.value = active

    # ---- layer choices -------------------------------------------------------------------

    def _image_choices(self, _widget=None) -> list[tuple[str, Any]]:
        from napari.layers import Image

        return [(layer.name, layer) for layer in self._viewer.layers if isinstance(layer, Image)]

    def _refresh_choices(self, event=None) -> None:
        self.image.reset_choices()

    def _on_layer_inserted(self, event) -> None:
        from napari.layers import Image

        self.image.reset_choices()
        layer = event.value
        layer.events.name.connect(self._refresh_choices)
        if isinstance(layer, Image):
            self.image.value = layer

    def _enable_fields(self, *_args) -> None:
        """Track mode greys out the fields the video model does not use and offers its own."""
        track = self.stack_mode.value == TRACK
        for name in TRACK_IGNORES:
            getattr(self, name).enabled = not track
        self.tile_size.enabled = not track and self.tiling.value == "on"
        self.new_threshold.enabled = track

    # ---- running -------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._worker is not None

    def make_job(self) -> Job:
        """Read and check the form; raises `PromptsegError` with a message for the user."""
        from promptseg.errors import OptionError, PromptError

        layer = self.image.value
        if layer is None:
            raise OptionError("No image layer chosen: open an image (or File > Open Sample) and pick it in 'image'.")
        source = layer_input(layer, self.axes.value, tiled=self.tiling.value != "off")
        prompts = parse_prompts(self.prompts.value)
        if not prompts:
            raise PromptError("Type what to segment in 'prompts', e.g. 'nucleus' or 'cell, nucleus'.")
        model = self.model.value.strip()
        if not model:
            raise OptionError("The model is empty: give a hub id such as facebook/sam3 or a local model directory.")
        mode = self.stack_mode.value
        if mode == TRACK:
            check_trackable(source, layer.name)
        new_threshold = parse_score(self.new_threshold.value, "new object score") if mode == TRACK else None
        disk_pixels = int(self.disk_above.value) * 1_000_000
        store = self.store.value.strip()
        if store and not source.is_stack and int(np.prod(source.labels_shape)) > disk_pixels:
            for kind in ("instances", "classes"):
                check_store_path(Path(store) / kind)  # before a long run, not after it
        return Job(image=layer, source=source, prompts=prompts, model=model, device=self.device.value,
                   options=self.segment_options(), mode=mode, keep=bool(self.keep.value), new_threshold=new_threshold,
                   classes=bool(self.class_layer.value), disk_pixels=disk_pixels, store=store)

    def segment_options(self) -> SegmentOptions:
        """The `SegmentOptions` the form's fields say (`WIDGET_OPTIONS`; the rest are the core's defaults).

        Track mode passes only the options the video model uses (threshold, channels)."""
        if self.stack_mode.value == TRACK:
            return SegmentOptions.from_flat(threshold=float(self.threshold.value),
                                            channels=parse_channels(self.channels.value))
        tile = {"off": None, "auto": "auto", "on": int(self.tile_size.value)}[self.tiling.value]
        return SegmentOptions.from_flat(
            threshold=float(self.threshold.value), smooth=int(self.smooth.value), min_area=int(self.min_area.value),
            tile=tile, channels=parse_channels(self.channels.value),
        )

    def run(self, *_args) -> Any:
        """Start a run in a thread worker (returns it), or show why it cannot start."""
        if self.running:
            show_warning("A segmentation is already running: wait for it or press Cancel.")
            return None
        try:
            job = self.make_job()
        except PromptsegError as exc:
            self._fail(str(exc))
            return None
        self._cancel_event = threading.Event()
        worker = create_worker(run_job, job, self._relay.advanced.emit, self._cancel_event.is_set,
                               _start_thread=False)
        worker.returned.connect(lambda outcome: self._on_returned(job, outcome))
        worker.errored.connect(self._on_errored)
        worker.finished.connect(self._on_finished)
        self._worker = worker
        self.run_button.enabled = False
        self.cancel_button.enabled = True
        self.progress.max, self.progress.value = 0, 0  # busy until the total is known
        self.status.value = f"Running {', '.join(job.prompts)} on {job.image.name}..."
        worker.start()
        return worker

    def cancel(self, *_args) -> None:
        """Stop the running job before its next tile or slice."""
        if self.running:
            self._cancel_event.set()
            self.cancel_button.enabled = False
            self.status.value = "Cancelling after the current step..."

    def _on_progress(self, total: int, advance: int) -> None:
        if advance == 0:
            self.progress.max, self.progress.value = max(total, 1), 0
        else:
            self.progress.value = min(self.progress.value + advance, self.progress.max)

    def _on_returned(self, job: Job, outcome: Outcome) -> None:
        self.last_outcome = outcome
        if outcome.cancelled:
            self.status.value = f"Cancelled ({self.progress.value} of {self.progress.max} steps done)."
            show_info(f"Segmentation cancelled: {outcome.error}")
        elif outcome.error:
            self._fail(outcome.error)
        else:
            layer = self._show(job, outcome)
            found = summary(outcome.features)
            self.status.value = (
                f"{found} in {outcome.seconds:.2f} s -> '{layer.name}'\n"
                f"embedding: {SOURCE_TEXT.get(outcome.source, outcome.source)}"
            )
            self._viewer.status = f"promptseg: {found} ({outcome.seconds:.2f} s)"
            if outcome.skipped:
                self._report_skipped(outcome.skipped, job.source.labels_shape[0])

    def _report_skipped(self, skipped: dict[int, str], total: int) -> None:
        """Slices that could not be used stay empty in the labels: say which and why."""
        first, reason = next(iter(skipped.items()))
        numbers = ", ".join(map(str, list(skipped)[:10])) + (", ..." if len(skipped) > 10 else "")
        message = (f"{len(skipped)} of {total} slices could not be used and are empty in the labels "
                   f"(slices {numbers}). Slice {first}: {reason}")
        self.status.value += f"\nskipped slices: {numbers}"
        show_warning(message)

    def _on_errored(self, exc: Exception) -> None:
        # napari's worker already shows the exception as a notification (with its traceback).
        logger.error("Segmentation failed: %s: %s", type(exc).__name__, exc)
        self.status.value = f"Failed: {type(exc).__name__}: {exc}"

    def _on_finished(self) -> None:
        self._worker = None
        self.run_button.enabled = True
        self.cancel_button.enabled = False
        if self.progress.max == 0:
            self.progress.max = 1

    def _fail(self, message: str) -> None:
        self.status.value = f"Error: {message}"
        show_error(message)

    # ---- results -------------------------------------------------------------------------

    def _show(self, job: Job, outcome: Outcome) -> Any:
        """Put the labels in the viewer (and the class layer, when asked); returns the instance layer."""
        import pandas as pd

        metadata = {"promptseg": {
            "source_layer": job.image.name, "prompts": job.prompts, "axes": job.source.axes,
            "embedding": outcome.source, "seconds": round(outcome.seconds, 3), **outcome.model,
        }}
        if job.source.is_stack:
            metadata["promptseg"]["stack_mode"] = job.mode
        if outcome.store:
            metadata["promptseg"]["store"] = outcome.store
        target = self._put(job, "instances", outcome.labels, f"{job.image.name} segmentation",
                           features=pd.DataFrame(outcome.features), metadata=metadata)
        if outcome.classes is not None:
            self.legend_entries = class_legend(job.prompts)
            classes = pd.DataFrame({"index": list(range(1, len(job.prompts) + 1)), "label": job.prompts})
            self._put(job, "classes", outcome.classes, f"{job.image.name} classes", features=classes,
                      metadata=metadata, colormap=class_colormap(self.legend_entries))
            self.legend.value = legend_html(self.legend_entries)
            self.legend.visible = True
        return target

    def _put(self, job: Job, kind: str, data: Any, name: str, **properties: Any) -> Any:
        """Update this image's last `kind` layer in place, or add one (a zarr pyramid as a multiscale layer).

        An in-memory layer of the same shape is updated; a layer on disk is replaced (unless kept)."""
        previous = self._outputs.get((id(job.image), kind))
        old = None
        if previous is not None and previous[0]() is job.image and not job.keep and previous[1] in self._viewer.layers:
            old = previous[1]
        in_memory = isinstance(data, np.ndarray)
        if old is not None and in_memory and not old.multiscale and isinstance(old.data, np.ndarray) \
                and old.data.shape == data.shape:
            old.data = data
            old.features = properties["features"]
            if "colormap" in properties:
                old.colormap = properties["colormap"]
            old.scale, old.translate = job.source.scale, job.source.translate
            old.metadata.update(properties["metadata"])
            layer = old
        else:
            if old is not None:
                self._viewer.layers.remove(old)
            if not in_memory:
                data = data if len(data) > 1 else data[0]
            layer = self._viewer.add_labels(data, name=name, scale=job.source.scale, translate=job.source.translate,
                                            multiscale=not in_memory and isinstance(data, list), **properties)
        self._outputs[(id(job.image), kind)] = (weakref.ref(job.image), layer)
        return layer


def _tip(info) -> str:
    """A widget tooltip from an option's one-line help."""
    return info.help[:1].upper() + info.help[1:] + "."


def tiling_choice(tile) -> str:
    """The tiling choice that shows a `tile` value: None is off, 'auto' is auto, a size is on."""
    return {None: "off", "auto": "auto"}.get(tile, "on")


def channels_text(channels) -> str:
    """The channels field's text for a `channels` value (None: blank, the first three)."""
    return "" if channels is None else ", ".join(map(str, channels))

