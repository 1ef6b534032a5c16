"""Run *Segment by text* on a zarr slide in a real napari viewer and print memory and time as JSON.

Run by ``test_big_slide.py`` in a process of its own, so that the memory it measures is the run's
alone: ``python slide_memory.py SLIDE.zarr MODEL_DIR TILE THRESHOLD``.
"""

from __future__ import annotations

import gc
import json
import resource
import sys
import threading
import time


class PeakRSS:
    """Samples the process' resident memory every 20 ms; `peak` is the highest seen."""

    def __init__(self) -> None:
        import psutil

        self.process = psutil.Process()
        self.peak = self.process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)


def main(slide: str, model: str, tile: int, threshold: float) -> dict:
    import napari
    import numpy as np
    import psutil
    import zarr
    from qtpy.QtWidgets import QApplication

    from promptseg.sessions import shared_segmenter
    from promptseg_napari import _widget
    from promptseg_napari._gl import keep_triton_out_after_mesa_llvm

    group = zarr.open_group(slide, mode="r")
    levels = [group[key] for key in sorted(group.array_keys(), key=int)]
    viewer = napari.Viewer()
    viewer.add_image(levels, multiscale=True, contrast_limits=(0, 4000), name="slide")
    widget = _widget.SegmentWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Segment by text")
    widget.model.value, widget.device.value = model, "cpu"
    widget.threshold.value = threshold
    widget.prompts.value = "nucleus"
    widget.tiling.value, widget.tile_size.value = "on", tile
    widget.class_layer.value = True
    app = QApplication.instance()

    def spin(seconds: float) -> None:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            app.processEvents()
            time.sleep(0.01)

    spin(1.0)  # the viewer shows the slide (napari reads the tiles it draws)
    keep_triton_out_after_mesa_llvm()  # as the widget does before it loads a model next to the canvas
    shared_segmenter(model, device="cpu")  # the model is loaded before measuring: it is not the image
    found = {}
    segment_plane = _widget.segment_plane

    def observed(*args, **kwargs):  # records what the result itself holds, passes it on unchanged
        result = segment_plane(*args, **kwargs)
        found.update(instances=len(result), mask_bytes=sum(inst.mask.nbytes for inst in result), info=result.info)
        return result

    _widget.segment_plane = observed
    gc.collect()
    before = psutil.Process().memory_info().rss
    maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with PeakRSS() as sampled:
        start = time.perf_counter()
        widget.run()
        while widget.running and time.perf_counter() - start < 600:
            spin(0.05)
        seconds = time.perf_counter() - start
        spin(1.0)  # the new Labels layers are drawn
    maxrss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    peak = max(sampled.peak, maxrss_after if maxrss_after > maxrss_before else 0)
    outcome = widget.last_outcome
    labels, classes = viewer.layers["slide segmentation"], viewer.layers["slide classes"]
    coarse_labels, coarse_classes = np.asarray(labels.data[-1][:]), np.asarray(classes.data[-1][:])
    return {
        "error": outcome.error,
        "seconds": round(seconds, 1),
        "rss_before_mb": round(before / 2**20, 1),
        "peak_growth_mb": round((peak - before) / 2**20, 1),
        "result_mask_mb": round(found.get("mask_bytes", 0) / 2**20, 1),
        "instances": found.get("instances"),
        "tiles": found.get("info", {}).get("tiles"),
        "store": outcome.store,
        "labels_multiscale": labels.multiscale,
        "labels_shapes": [list(level.shape) for level in labels.data],
        "labels_on_disk": all(isinstance(level, zarr.Array) for level in [*labels.data, *classes.data]),
        "coarse_ids": int(len(np.unique(coarse_labels)) - 1),
        "coarse_classes": sorted(int(v) for v in np.unique(coarse_classes)),
        "classes_where_labels": bool(((coarse_classes > 0) == (coarse_labels > 0)).all()),
    }


if __name__ == "__main__":
    report = main(sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]))
    print("REPORT " + json.dumps(report), flush=True)
