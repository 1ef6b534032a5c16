"""A 20000 x 20000 slide in a real viewer: segmented tile by tile, labels on disk, memory far below the image's.

The slide (uint16, a 5-level zarr pyramid) is written one chunk at a time and never exists whole in
memory. The widget runs in a process of its own (`slide_memory.py`), which reports its peak resident
memory growth during the run. For scale: the slide's level 0 is 763 MiB as uint16, 1144 MiB as the
RGB the model sees, and its labels would be 1526 MiB as one int32 array (two for the class layer).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from promptseg.testing.slides import slide_pixels, write_slide

pytestmark = [pytest.mark.gui, pytest.mark.slow]

SIDE = 20_000
TILE = 1024
WORKING_BOUND_MB = 500
"""Memory the run may use beyond what its result holds: a few tiles' pixels, the model's activations,
one block of labels, the viewer's drawing."""
TOTAL_BOUND_MB = 1000
"""Everything, the result included: below every whole-image array (1144 MiB RGB, 1526 MiB labels)."""


def best_score(model_dir: Path, prompt: str) -> float:
    """The tiny random model's best score on a tile of the slide (it scores about 0.25 whatever it sees)."""
    from promptseg import load_segmenter

    segmenter = load_segmenter(str(model_dir), device="cpu")
    pixels = slide_pixels(np.arange(TILE) + 5000, np.arange(TILE) + 7000)
    result = segmenter.segment(pixels, [prompt], threshold=0.0, percentiles=(0.5, 99.5))
    segmenter.close()
    return max(inst.score for inst in result)


def test_a_20000_pixel_slide_is_segmented_in_tiles_with_memory_far_below_its_size(tmp_path, tiny_sam3_dir):
    slide = tmp_path / "slide.zarr"
    levels = write_slide(slide, SIDE, chunk=1024, levels=5)
    # just under the best score: every tile keeps its best detection, so the labels hold objects everywhere
    threshold = best_score(tiny_sam3_dir, "nucleus") - 1e-5
    script = Path(__file__).with_name("slide_memory.py")

    done = subprocess.run(
        [sys.executable, str(script), str(slide), str(tiny_sam3_dir), str(TILE), repr(threshold)],
        capture_output=True, text=True, timeout=900, env={**os.environ, "PYTHONPATH": str(script.parent)},
    )

    lines = [line for line in done.stdout.splitlines() if line.startswith("REPORT ")]
    assert done.returncode == 0 and lines, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(lines[-1][len("REPORT "):])
    print("\n20000 x 20000 slide:", json.dumps(report, indent=1))
    assert report["error"] is None
    assert report["tiles"] == 529 and report["instances"] > 500, "every tile's best detection, stitched"
    assert report["labels_multiscale"] and report["labels_on_disk"]
    assert report["labels_shapes"] == [list(level.shape) for level in levels]
    assert report["coarse_ids"] > 100 and report["coarse_classes"] == [0, 1] and report["classes_where_labels"]
    assert report["peak_growth_mb"] - report["result_mask_mb"] < WORKING_BOUND_MB, report
    assert report["peak_growth_mb"] < TOTAL_BOUND_MB, report
