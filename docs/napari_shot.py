"""What the napari screenshot scripts (docs/make_napari_*_screenshot.py) share: waiting for a run
of the widget, opening *Segment by text* on the nuclei sample, and grabbing the window."""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path


def settle(app, rounds: int = 20) -> None:
    """Let Qt draw what changed."""
    for _ in range(rounds):
        app.processEvents()
        time.sleep(0.02)


def wait(widget, app, timeout: float = 600, what: str = "segmentation") -> None:
    """Process Qt events until the widget's run ends; a run that fails or never ends stops the script."""
    end = time.time() + timeout
    while widget.running and time.time() < end:
        app.processEvents()
        time.sleep(0.02)
    if widget.running:
        raise SystemExit(f"the {what} did not finish in time")
    if widget.last_outcome is None or widget.last_outcome.error:
        raise SystemExit(f"{what} failed: {widget.last_outcome and widget.last_outcome.error}")


def text_widget_on_nuclei(model: str | None):
    """A 1600x950 viewer with the synthetic nuclei sample and *Segment by text* docked as the menu
    does it, its form set for the picture. Without `model`, the tiny random SAM 3 the tests use
    (threshold 0: it scores about 0.25), so the masks are arbitrary. Returns (viewer, widget, app)."""
    import napari
    from qtpy.QtWidgets import QApplication

    threshold = 0.5
    if not model:
        from promptseg.testing import make_random_sam3

        model = str(make_random_sam3(Path(tempfile.mkdtemp(prefix="promptseg-shot-")) / "tiny-sam3"))
        threshold = 0.0
    os.environ.setdefault("PROMPTSEG_CACHE_DIR", tempfile.mkdtemp(prefix="promptseg-shot-cache-"))
    viewer = napari.Viewer(show=True)
    viewer.window._qt_window.resize(1600, 950)
    viewer.open_sample("promptseg", "nuclei")
    _dock, widget = viewer.window.add_plugin_dock_widget("promptseg", "Segment by text")
    widget.model.value = model
    widget.device.value = "cpu" if "cuda" not in sys.argv else "cuda"
    widget.threshold.value = threshold
    widget.min_area.value = 30
    widget.smooth.value = 2
    return viewer, widget, QApplication.instance()


def grab(viewer, app, active, out: Path) -> None:
    """Save the whole window to `out` with `active` the selected layer and no toast over it."""
    from napari._qt.dialogs.qt_notification import NapariQtNotification

    for toast in viewer.window._qt_window.findChildren(NapariQtNotification):
        toast.close()  # e.g. napari's note about the Qt backend, unrelated to this plugin
    viewer.layers.selection.active = active
    viewer.reset_view()
    settle(app)
    out.parent.mkdir(parents=True, exist_ok=True)
    viewer.screenshot(str(out), canvas_only=False, flash=False)
