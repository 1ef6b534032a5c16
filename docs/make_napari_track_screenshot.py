"""Render docs/images/napari-track.png: a time-lapse tracked in napari by *Segment by text* in track mode.

    xvfb-run -a -s "-screen 0 1600x1000x24" python docs/make_napari_track_screenshot.py
    python docs/make_napari_track_screenshot.py --model facebook/sam3   # with real weights, if you have them

Without --model (or PROMPTSEG_MODEL) it builds the tiny SAM 3 video model with random weights that
the tests use, so the masks are arbitrary: the picture shows the widget in track mode, the Labels
layer over the frames with the time slider, and the tracks table, not tracking quality. The script
docks the widget as the Layers > Segment menu does, tracks one prompt through a synthetic
time-lapse (discs drifting over 12 frames), and grabs the whole window at one frame.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
from napari_shot import grab, wait

HERE = Path(__file__).resolve().parent


def time_lapse(frames: int = 12, height: int = 240, width: int = 320) -> np.ndarray:
    """``(T, H, W)`` uint16: a few bright discs drifting over a dim, noisy background."""
    from skimage.draw import disk

    rng = np.random.default_rng(7)
    starts = [(60, 50, 22, 2, 1), (150, 90, 18, 3, -1), (110, 230, 26, -2, 2), (190, 250, 15, -3, -1)]
    video = rng.normal(400, 60, (frames, height, width)).clip(0, None).astype(np.uint16)
    for t in range(frames):
        for y, x, radius, dx, dy in starts:
            video[t][disk((y + dy * t, x + dx * t), radius, shape=(height, width))] += 2500
    return video


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=os.environ.get("PROMPTSEG_MODEL"),
                        help="SAM 3 hub id or directory (default: a tiny random video model, masks arbitrary)")
    parser.add_argument("--out", type=Path, default=HERE / "images" / "napari-track.png")
    parser.add_argument("--frame", type=int, default=5, help="the frame the picture shows")
    args = parser.parse_args()

    import napari
    import torch
    from qtpy.QtWidgets import QApplication

    from promptseg_napari._widget import TRACK

    torch.set_num_threads(1)  # the tracker's many tiny products run faster on one thread
    model, threshold, new_object = args.model, 0.5, ""
    if not model:
        from promptseg.testing import make_random_sam3_video

        model = str(make_random_sam3_video(Path(tempfile.mkdtemp(prefix="promptseg-shot-")) / "tiny-sam3-video",
                                           hidden=128))
        threshold, new_object = 0.2545, "0.2545"  # the random model scores every query near 0.25
    os.environ.setdefault("PROMPTSEG_CACHE_DIR", tempfile.mkdtemp(prefix="promptseg-shot-cache-"))

    viewer = napari.Viewer(show=True)
    viewer.window._qt_window.resize(1600, 950)
    viewer.add_image(time_lapse(), name="time-lapse", axis_labels=("t", "y", "x"), colormap="gray")
    _dock, widget = viewer.window.add_plugin_dock_widget("promptseg", "Segment by text")
    app = QApplication.instance()
    widget.model.value = model
    widget.device.value = "cpu"
    widget.stack_mode.value = TRACK
    widget.threshold.value = threshold
    widget.new_threshold.value = new_object
    widget.prompts.value = "cell"
    widget.run()
    wait(widget, app, what="tracking")

    labels = viewer.layers[-1]
    labels.opacity = 0.45  # the frame stays visible under the (arbitrary) random-model masks
    viewer.dims.set_current_step(0, args.frame)
    grab(viewer, app, labels, args.out)
    print(f"wrote {args.out} ({widget.status.value.splitlines()[0]}; {len(labels.features)} tracks)")
    viewer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
