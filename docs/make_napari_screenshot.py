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
from pathlib import Path

from napari_shot import grab, text_widget_on_nuclei, wait

HERE = Path(__file__).resolve().parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=os.environ.get("PROMPTSEG_MODEL"),
                        help="SAM 3 hub id or directory (default: a tiny random model, masks arbitrary)")
    parser.add_argument("--out", type=Path, default=HERE / "images" / "napari-widget.png")
    args = parser.parse_args()

    viewer, widget, app = text_widget_on_nuclei(args.model)

    widget.prompts.value = "nucleus"
    widget.run()
    wait(widget, app)
    widget.prompts.value = "nucleus, dividing cell"  # same image: the embedding comes from the cache
    widget.run()
    wait(widget, app)

    labels = viewer.layers[-1]
    labels.contour = 2  # outlines keep the image visible under the (arbitrary) random-model masks
    grab(viewer, app, labels, args.out)
    print(f"wrote {args.out} ({widget.status.value.splitlines()[0]}; {widget.status.value.splitlines()[-1]})")
    viewer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
