"""Render docs/images/napari-clicks.png: the *Segment by clicks* widget refining a label in napari.

    xvfb-run -a -s "-screen 0 1600x1000x24" python docs/make_napari_clicks_screenshot.py
    python docs/make_napari_clicks_screenshot.py --model facebook/sam3   # with real weights, if you have them

Without --model (or PROMPTSEG_MODEL) it builds the tiny SAM 3 with random weights that the tests
use (in the hub's layout, with the tracker head that clicks need), so the masks in the picture are
arbitrary: the picture shows the widget, the green and red clicks, the box and the painted labels,
not segmentation quality. The script docks the widget as the Layers > Segment menu does, draws
two objects (a box, then clicks), then refines the first one with a positive and a negative click
(the embedding comes from the cache), and grabs the whole window.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def settle(widget, app, timeout: float = 600) -> None:
    end = time.time() + timeout
    while widget.busy and time.time() < end:
        app.processEvents()
        time.sleep(0.02)
    if widget.busy:
        raise SystemExit("the segmentation did not finish in time")
    if widget.last_outcome is not None and widget.last_outcome.error:
        raise SystemExit(f"segmentation failed: {widget.last_outcome.error}")


def click(widget, app, position, positive=True) -> None:
    widget.points_layer.feature_defaults = {"positive": positive}
    widget.points_layer.add(position)
    settle(widget, app)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=os.environ.get("PROMPTSEG_MODEL"),
                        help="SAM 3 hub id or directory (default: a tiny random model, masks arbitrary)")
    parser.add_argument("--out", type=Path, default=HERE / "images" / "napari-clicks.png")
    args = parser.parse_args()

    model = args.model
    if not model:
        from promptseg.testing import make_random_sam3_video

        model = str(make_random_sam3_video(Path(tempfile.mkdtemp(prefix="promptseg-shot-")) / "tiny-sam3-hub"))
    os.environ.setdefault("PROMPTSEG_CACHE_DIR", tempfile.mkdtemp(prefix="promptseg-shot-cache-"))
    import torch  # noqa: F401  (torch's optional compilers load before napari's GL context)

    import napari
    from qtpy.QtWidgets import QApplication

    viewer = napari.Viewer(show=True)
    viewer.window._qt_window.resize(1600, 950)
    viewer.open_sample("promptseg", "nuclei")
    _dock, widget = viewer.window.add_plugin_dock_widget("promptseg", "Segment by clicks")
    app = QApplication.instance()
    widget.model.value = model
    widget.device.value = "cpu" if "cuda" not in sys.argv else "cuda"

    widget.box_layer.add_rectangles(np.array([[300.0, 60.0], [420.0, 200.0]]))  # object 1: a box
    settle(widget, app)
    widget.finish_object()
    click(widget, app, (140, 330))  # object 2: a click
    widget.finish_object()
    labels = widget.target.value
    widget.mode.value = "refine selected label"  # refine object 1: a click on it adds, a red one cuts
    inside = np.argwhere(labels.data == 1)
    nearest = lambda y, x: tuple(inside[np.argmin(np.hypot(*(inside - (y, x)).T))])  # noqa: E731
    click(widget, app, nearest(230, 230))
    click(widget, app, nearest(330, 300), positive=False)
    labels.opacity = 0.5

    from napari._qt.dialogs.qt_notification import NapariQtNotification

    for toast in viewer.window._qt_window.findChildren(NapariQtNotification):
        toast.close()  # e.g. napari's note about the Qt backend, unrelated to this plugin
    viewer.layers.selection.active = widget.points_layer
    viewer.reset_view()
    for _ in range(20):
        app.processEvents()
        time.sleep(0.02)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    viewer.screenshot(str(args.out), canvas_only=False, flash=False)
    ids = sorted(set(np.unique(labels.data)) - {0})
    print(f"wrote {args.out} (labels {ids}; {widget.status.value})")
    viewer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
