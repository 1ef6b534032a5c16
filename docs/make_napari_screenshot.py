"""Render docs/images/napari-widget.png: the *Segment by text* widget next to a result in napari.

    xvfb-run -a -s "-screen 0 1600x1000x24" python docs/make_napari_screenshot.py
    python docs/make_napari_screenshot.py --model facebook/sam3   # with real weights, if you have them

Without --model (or PROMPTSEG_MODEL) it builds the tiny SAM 3 with random weights that the tests
use, so the masks in the picture are arbitrary: the picture shows the widget, the Labels layer
and the cache message, not segmentation quality. The script docks the widget exactly as the
Layers > Segment menu does, runs one prompt, then a second one on the same image (which reuses
the cached embedding), and grabs the whole window.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def wait(widget, app, timeout: float = 600) -> None:
    end = time.time() + timeout
    while widget.running and time.time() < end:
        app.processEvents()
        time.sleep(0.02)
    if widget.running:
        raise SystemExit("the segmentation did not finish in time")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=os.environ.get("PROMPTSEG_MODEL"),
                        help="SAM 3 hub id or directory (default: a tiny random model, masks arbitrary)")
    parser.add_argument("--out", type=Path, default=HERE / "images" / "napari-widget.png")
    args = parser.parse_args()

    import napari
    from qtpy.QtWidgets import QApplication

    model = args.model
    threshold = 0.5
    if not model:
        from promptseg.testing import make_random_sam3

        model = str(make_random_sam3(Path(tempfile.mkdtemp(prefix="promptseg-shot-")) / "tiny-sam3"))
        threshold = 0.0  # the random model scores about 0.25
    os.environ.setdefault("PROMPTSEG_CACHE_DIR", tempfile.mkdtemp(prefix="promptseg-shot-cache-"))

    viewer = napari.Viewer(show=True)
    viewer.window._qt_window.resize(1600, 950)
    viewer.open_sample("promptseg", "nuclei")
    _dock, widget = viewer.window.add_plugin_dock_widget("promptseg", "Segment by text")
    app = QApplication.instance()
    widget.model.value = model
    widget.device.value = "cpu" if "cuda" not in sys.argv else "cuda"
    widget.threshold.value = threshold
    widget.min_area.value = 30
    widget.smooth.value = 2

    widget.prompts.value = "nucleus"
    widget.run()
    wait(widget, app)
    widget.prompts.value = "nucleus, dividing cell"  # same image: the embedding comes from the cache
    widget.run()
    wait(widget, app)
    if widget.last_outcome is None or widget.last_outcome.error:
        raise SystemExit(f"segmentation failed: {widget.last_outcome and widget.last_outcome.error}")

    labels = viewer.layers[-1]
    labels.contour = 2  # outlines keep the image visible under the (arbitrary) random-model masks
    from napari._qt.dialogs.qt_notification import NapariQtNotification

    for toast in viewer.window._qt_window.findChildren(NapariQtNotification):
        toast.close()  # e.g. napari's note about the Qt backend, unrelated to this plugin
    viewer.layers.selection.active = labels
    viewer.reset_view()
    for _ in range(20):
        app.processEvents()
        time.sleep(0.02)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    viewer.screenshot(str(args.out), canvas_only=False, flash=False)
    print(f"wrote {args.out} ({widget.status.value.splitlines()[0]}; {widget.status.value.splitlines()[-1]})")
    viewer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
