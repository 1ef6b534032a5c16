"""promptseg for FiftyOne: the `@promptseg/fiftyone` plugin and the `promptseg_fiftyone` package.

This directory is both a FiftyOne plugin (`fiftyone.yml` + `register` below) and an importable
package. FiftyOne is imported only when the plugin is registered or a name below is used, so
`promptseg --help` (which imports `promptseg_fiftyone._commands`) stays fast.

    from promptseg_fiftyone import PromptsegModel, segment_samples
    dataset.apply_model(PromptsegModel(["car"]), "sam3")
    video_dataset.apply_model(PromptsegVideoModel(["car"]), "sam3")   # frames.sam3, index = object id
    segment_samples(view, ["car", "person"], "sam3")          # skip/resume, run record, batches
    segment_on_ray(view, ["car"], "sam3", actors=8)            # the same on Ray actors, bulk writes
"""

from __future__ import annotations

_LAZY = {
    "SegmentWithText": "promptseg_fiftyone.operators",
    "SuggestPrompts": "promptseg_fiftyone.operators",
    "PromptsegModel": "promptseg_fiftyone.model",
    "PromptsegVideoModel": "promptseg_fiftyone.model",
    "segment_samples": "promptseg_fiftyone.runner",
    "segment_on_ray": "promptseg_fiftyone.on_ray",
    "RunSummary": "promptseg_fiftyone.runner",
    "to_detections": "promptseg_fiftyone.convert",
    "to_segmentation": "promptseg_fiftyone.convert",
    "to_polylines": "promptseg_fiftyone.convert",
}

_DEPRECATED = {"get_segmenter": "promptseg_fiftyone.segmenters"}  # warns when called

__all__ = sorted(_LAZY) + ["register"]


def __getattr__(name: str):
    if name in _LAZY or name in _DEPRECATED:
        import importlib

        return getattr(importlib.import_module(_LAZY.get(name) or _DEPRECATED[name]), name)
    raise AttributeError(f"module 'promptseg_fiftyone' has no attribute {name!r}")


def register(p):
    """Called by FiftyOne when it loads the plugin: registers the operators."""
    try:
        # Absolute import: FiftyOne loads this file under its own module name, and the operators
        # must share one module (and one loaded model) with the `promptseg_fiftyone` package.
        from promptseg_fiftyone.operators import SegmentWithText, SuggestPrompts
    except ModuleNotFoundError as exc:
        raise ImportError(
            "The @promptseg/fiftyone plugin needs promptseg in FiftyOne's Python environment: "
            "pip install 'promptseg[fiftyone]'"
        ) from exc
    p.register(SegmentWithText)
    p.register(SuggestPrompts)
