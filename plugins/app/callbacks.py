"""What the quick-try page does when a file is picked or a button pressed: functions of the form's values.

The page (`promptseg_app.page`) wires these to Gradio components. They take and return plain
Python values (paths, numbers, strings, lists), so they run and are tested without a browser. A
mistake a user can make (no prompt, an unreadable file, too many pixels, an option out of range, a
model that cannot load) comes back as a message for the page's status line, never a traceback.

The segmenter is `promptseg.sessions.shared_segmenter`, loaded on the first run and kept: a second
prompt on the same image takes the image embedding from the cache and skips the image encoder.
"""

from __future__ import annotations

import html
import logging
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from promptseg.errors import ImageError, OptionError, PromptError, PromptsegError
from promptseg.options import SegmentOptions

logger = logging.getLogger(__name__)

TILING = ("off", "auto", "on")
"""'off': the whole image at the model's resolution; 'auto': tiles when the image is much larger
than the model input; 'on': tiles of the size given."""
SOURCE_TEXT = {
    "computed": "computed (first time on this image)",
    "memory": "from the cache (memory): image encoder skipped",
    "disk": "from the cache (disk): image encoder skipped",
    "mixed": "partly from the cache",
}
TABLE_HEADERS = ["#", "label", "score", "area (px)"]
CLIP_HEADER = "CLIP score"
Report = Callable[[int, int], None]
"""``report(done, total)``: tiles done so far (a whole image counts as one tile)."""


@dataclass(frozen=True)
class AppSettings:
    """How the page's segmenter is loaded: the `load_segmenter` arguments of ``promptseg app``."""

    model: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    cache_dir: str | bool | None = None
    clip: str | None = None
    max_pixels: int | None = None


@dataclass
class RunOutcome:
    """What one run shows: the overlay, one table row per instance, the status line and the downloads."""

    status: str
    overlay: np.ndarray | None = None
    rows: list[list[Any]] = field(default_factory=list)
    legend: str = ""
    coco_path: Path | None = None
    labels_path: Path | None = None
    embedding_source: str | None = None
    error: bool = False


def split_phrases(text: str | None) -> list[str]:
    """Phrases typed as ``"cat, dog"`` or one per line (semicolons too), blanks dropped."""
    pieces = (text or "").replace(";", ",").replace("\n", ",").split(",")
    return [" ".join(piece.split()) for piece in pieces if piece.strip()]


def whole(value: Any) -> Any:
    """A form number that is whole (``3.0``) as an int; anything else unchanged, for the core to check."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def form_options(
    threshold: float, mask_threshold: float, smooth: float, min_area: float, tiling: str, tile_size: float | None,
    negative: str | None = None, verify: bool | None = None, clip_threshold: float | None = None,
    exclusive: bool | None = None,
) -> SegmentOptions:
    """The `SegmentOptions` of the form (checked by the core). The CLIP fields are None where the
    page does not show them (no ``--clip``): those options, like the rest, keep their defaults."""
    if tiling not in TILING:
        raise OptionError(f"Tiling must be one of {', '.join(TILING)}, got {tiling!r}.")
    tile = {"off": None, "auto": "auto", "on": whole(tile_size)}[tiling]
    flat = {"threshold": threshold, "mask_threshold": mask_threshold, "smooth": whole(smooth),
            "min_area": whole(min_area), "tile": tile}
    if negative is not None:
        flat["negative"] = tuple(split_phrases(negative))
    if verify is not None:
        flat["verify"] = bool(verify)
    if exclusive is not None:
        flat["exclusive"] = bool(exclusive)
    if verify and clip_threshold is not None:
        flat["clip_threshold"] = clip_threshold
    return SegmentOptions.from_flat(**flat)


class QuickTry:
    """The page's state: how to load the segmenter, the loaded one, and a folder for the downloads."""

    def __init__(self, settings: AppSettings) -> None:
        self.settings = settings
        self._segmenter = None
        self._load_lock = threading.Lock()
        self._outputs = tempfile.TemporaryDirectory(prefix="promptseg-app-")
        self._runs = 0

    @property
    def loaded(self) -> bool:
        """Whether a run has loaded the segmenter yet (building the page loads nothing)."""
        return self._segmenter is not None

    @property
    def has_clip(self) -> bool:
        """Whether CLIP verification, negative phrases and suggestions are offered."""
        return bool(self.settings.clip)

    def segmenter(self) -> tuple[Any, float | None]:
        """The shared segmenter, and the seconds its load took when this call loaded it (else None)."""
        from promptseg.sessions import shared_segmenter

        with self._load_lock:
            if self._segmenter is not None:
                return self._segmenter, None
            start = time.perf_counter()
            s = self.settings
            self._segmenter = shared_segmenter(s.model, device=s.device, dtype=s.dtype, cache_dir=s.cache_dir,
                                               clip=s.clip or None, max_pixels=s.max_pixels)
            return self._segmenter, time.perf_counter() - start

    def close(self) -> None:
        """Remove the download files this page wrote."""
        self._outputs.cleanup()

    # ---- callbacks -----------------------------------------------------------------------

    def preview(self, image: str | None) -> tuple[np.ndarray | None, str]:
        """The picked file as the RGB the model will see, or a message saying why it cannot be used."""
        if not image:
            return None, "Pick an image (or one of the examples), type what to segment, press Segment."
        from promptseg.images import load_image

        try:
            rgb = load_image(image, max_pixels=self.settings.max_pixels)
        except PromptsegError as exc:
            return None, f"**Error:** {exc}"
        height, width = rgb.shape[:2]
        return rgb, f"{Path(image).name}: {width} x {height} pixels. Type what to segment and press Segment."

    def segment(
        self, image: str | None, prompts: str, threshold: float, mask_threshold: float, smooth: float,
        min_area: float, tiling: str, tile_size: float | None, negative: str | None = None,
        verify: bool | None = None, clip_threshold: float | None = None, exclusive: bool | None = None,
        report: Report | None = None,
    ) -> RunOutcome:
        """Segment `image` with the form's prompts and options; every user mistake becomes a message."""
        try:
            return self._segment(image, prompts, form_options(
                threshold, mask_threshold, smooth, min_area, tiling, tile_size, negative, verify, clip_threshold,
                exclusive), report)
        except PromptsegError as exc:
            logger.info("Run refused: %s", exc)
            return RunOutcome(status=f"**Error:** {exc}", error=True)

    def suggest(self, image: str | None, k: int = 10) -> tuple[list[str], str]:
        """The `k` phrases CLIP finds most likely in `image` (best first), and a status line."""
        if not self.has_clip:
            return [], ("**Error:** suggestions need a CLIP model: start the page with "
                        "`promptseg app --clip MODEL`.")
        if not image:
            return [], "**Error:** pick an image first: suggestions are phrases CLIP sees in it."
        try:
            segmenter, _ = self.segmenter()
            ranked = segmenter.suggest_prompts(image, k=k)
        except PromptsegError as exc:
            return [], f"**Error:** {exc}"
        listed = ", ".join(f"{phrase} ({probability:.2f})" for phrase, probability in ranked)
        return [phrase for phrase, _ in ranked], f"CLIP suggests: {listed}. Tick some to add them to the prompts."

    @staticmethod
    def add_prompts(prompts: str, picked: list[str] | None) -> str:
        """`prompts` with the `picked` suggestions added (each once)."""
        phrases = split_phrases(prompts)
        return ", ".join(dict.fromkeys(phrases + [p for p in picked or [] if p not in phrases]))

    # ---- the run -------------------------------------------------------------------------

    def _segment(self, image: str | None, prompts: str, options: SegmentOptions, report: Report | None) -> RunOutcome:
        if not image:
            raise ImageError("No image: upload one (or pick an example) before pressing Segment.")
        phrases = split_phrases(prompts)
        if not phrases:
            raise PromptError("No prompt: type what to segment, e.g. 'cat' or 'red car, tyre' "
                              "(several separated by commas or new lines).")
        segmenter, load_seconds = self.segmenter()
        query = segmenter.query(phrases, options)  # checked before any pixel is read
        start = time.perf_counter()
        rgb = segmenter.load(image, options.pixels)
        result = segmenter.segment_rgb(rgb, query, options, progress=_progress(report))
        seconds = time.perf_counter() - start
        coco_path, labels_path = self._write_downloads(image, result, query.labels)
        return RunOutcome(
            status=status_line(result, query.labels, seconds, load_seconds, segmenter.describe()),
            overlay=_overlay(rgb, result), rows=table_rows(result, self.has_clip), legend=legend_html(result),
            coco_path=coco_path, labels_path=labels_path, embedding_source=result.embedding_source,
        )

    def _write_downloads(self, image: str, result, prompts: list[str]) -> tuple[Path, Path]:
        """``NAME.coco.json`` (COCO with RLE masks) and ``NAME.labels.png`` (16-bit instance ids) of this run."""
        import json

        from promptseg.cli import CocoWriter
        from promptseg.render import save_png

        self._runs += 1
        folder = Path(self._outputs.name) / f"run-{self._runs}"
        folder.mkdir(parents=True)
        stem = Path(image).stem
        coco = CocoWriter(prompts)
        coco.add(Path(image).name, result)
        coco_path = folder / f"{stem}.coco.json"
        coco_path.write_text(json.dumps(coco.document(), indent=1))
        labels = result.to_label_image(dtype=np.uint16 if len(result) < 65536 else np.int32)
        labels_path = save_png(labels, folder / f"{stem}.labels.png")
        return coco_path, labels_path


def _progress(report: Report | None):
    """The core's ``progress(total, advance)`` as ``report(done, total)``."""
    if report is None:
        return None
    state = {"done": 0, "total": 1}

    def progress(total: int, advance: int) -> None:
        state["total"] = total
        state["done"] += advance
        report(state["done"], state["total"])

    return progress


def _overlay(rgb: np.ndarray, result) -> np.ndarray:
    from promptseg.render import overlay

    return overlay(rgb, result)


def table_rows(result, with_clip: bool = False) -> list[list[Any]]:
    """One row per instance, numbered as in the label PNG: #, label, score, area (and CLIP score)."""
    rows = []
    for number, inst in enumerate(result.instances, start=1):
        row = [number, inst.label, round(float(inst.score), 3), int(inst.area)]
        if with_clip:
            clip = inst.extra.get("clip_score")
            row.append(None if clip is None else round(float(clip), 3))
        rows.append(row)
    return rows


def legend_html(result) -> str:
    """A colour key of the overlay: one swatch per instance with its number, label and score."""
    from promptseg.render import instance_colors

    if not result.instances:
        return ""
    items = []
    for number, (inst, color) in enumerate(zip(result.instances, instance_colors(len(result))), start=1):
        swatch = "#{:02x}{:02x}{:02x}".format(*(int(c) for c in color))
        items.append(f'<span class="promptseg-key"><span style="color:{swatch}">&#9632;</span> '
                     f"{number} {html.escape(inst.label)} {inst.score:.2f}</span>")
    return " ".join(items)


def status_line(result, prompts: list[str], seconds: float, load_seconds: float | None, model: dict[str, str]) -> str:
    """How many instances of what, how long, and where the image embedding came from."""
    counts = Counter(result.labels)
    found = ", ".join(f"{label}: {counts[label]}" for label in prompts if counts[label]) or "none"
    noun = "instance" if len(result) == 1 else "instances"
    source = SOURCE_TEXT.get(result.embedding_source, result.embedding_source)
    text = f"{len(result)} {noun} ({found}) in {seconds:.2f} s. Image embedding: {source}."
    loaded = f" Model {model['model']} loaded in {load_seconds:.1f} s" if load_seconds is not None else f" Model {model['model']}"
    return text + f"{loaded} ({model['device']}, {model['dtype']})."
