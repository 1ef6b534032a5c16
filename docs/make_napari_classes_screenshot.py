"""Render docs/images/napari-classes.png: the class layer (one colour per prompt) and its legend.

    xvfb-run -a -s "-screen 0 1600x1000x24" python docs/make_napari_classes_screenshot.py
    python docs/make_napari_classes_screenshot.py --model facebook/sam3   # with real weights

Without --model (or PROMPTSEG_MODEL) it builds the tiny SAM 3 with random weights that the tests
use, so the masks in the picture are arbitrary: the picture shows the class layer's colours and
the widget's legend, not segmentation quality. The script docks the widget as the Layers > Segment
menu does, ticks *class layer*, runs three prompts and grabs the whole window.
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
    parser.add_argument("--out", type=Path, default=HERE / "images" / "napari-classes.png")
    args = parser.parse_args()

    viewer, widget, app = text_widget_on_nuclei(args.model)
    widget.class_layer.value = True
    widget.prompts.value = "nucleus, dividing cell, debris"
    widget.run()
    wait(widget, app)

    viewer.layers["synthetic nuclei segmentation"].visible = False
    labels = viewer.layers["synthetic nuclei classes"]
    labels.opacity = 0.6
    grab(viewer, app, labels, args.out)
    print(f"wrote {args.out} (legend: {widget.legend_entries})")
    viewer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
