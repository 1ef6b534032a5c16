"""promptseg for napari: the *Segment by text* and *Segment by clicks* dock widgets and synthetic sample data.

napari finds this plugin through the ``napari.manifest`` entry point (``napari.yaml`` here).
The widget only maps napari layers to core calls and results back to ``Labels`` layers; all
segmentation work happens in the core.
"""

from __future__ import annotations

__all__ = ["ClicksWidget", "SegmentWidget"]


def __getattr__(name: str):
    if name == "SegmentWidget":  # lazy: importing the package must not import Qt
        from promptseg_napari._widget import SegmentWidget

        return SegmentWidget
    if name == "ClicksWidget":
        from promptseg_napari._clicks import ClicksWidget

        return ClicksWidget
    raise AttributeError(name)
