"""Visual prompts on a tiled image: the window of the image that answers a click or a box.

With tiling on, text prompts see a large image tile by tile at the model's resolution
(`promptseg.tiling`). A click is answered the same way: from one window of the image, cut out,
embedded through the same cache (so a grid tile that text prompts embedded runs no image encoder
again), decoded, and its mask pasted back into image pixels. The window is chosen on each axis
from the extent of all the prompts of the object (points, box, previous mask):

1. ``"grid"``: a tile of the text grid that holds the whole extent, the one whose centre is
   nearest the extent's (a click in an overlap goes to the tile that sees it with more context);
2. ``"shifted"``: else a tile-sized window on a lattice of half the grid's stride (grid borders
   fall near its middle), nearest-centred, so a box across a border is never cut and the next
   clicks on the same object find the same window and its cached embedding;
3. ``"neighbours"``: else (the extent is about a tile or larger) the union of the grid tiles the
   extent touches, which the model sees resized, at lower resolution.

Nothing here calls the segmenter: it maps prompts image -> window and instances window -> image.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from promptseg.errors import OptionError
from promptseg.masks import tight_box
from promptseg.results import Instance
from promptseg.tiling import crop_mask, tile_starts
from promptseg.visual import VisualPrompts, full_size_mask

KINDS = ("grid", "shifted", "neighbours")
"""How a window was found, from the best (the text grid's own tile) to the coarsest."""


@dataclass(frozen=True)
class Window:
    """Pixel rows ``y0:y1`` and columns ``x0:x1`` of the image that answer one object's prompts."""

    x0: int
    y0: int
    x1: int
    y1: int
    kind: str
    """``"grid"``, ``"shifted"`` or ``"neighbours"`` (see the module docstring)."""

    @property
    def box(self) -> tuple[int, int, int, int]:
        return self.x0, self.y0, self.x1, self.y1

    def pixels(self, rgb: np.ndarray) -> np.ndarray:
        """The window's pixels, contiguous as `promptseg.tiling` cuts its tiles (same cache key)."""
        return np.ascontiguousarray(rgb[self.y0 : self.y1, self.x0 : self.x1])


def prompt_extent(prompts: VisualPrompts, image_size: tuple[int, int]) -> tuple[int, int, int, int] | None:
    """Pixel box ``(x0, y0, x1, y1)`` (exclusive ends) holding every point, the box and the previous
    mask, clipped to the image; None when only an empty mask was given."""
    height, width = image_size
    boxes = []
    if prompts.points is not None:
        cols = np.clip(np.floor(prompts.points[:, 0]), 0, width - 1)
        rows = np.clip(np.floor(prompts.points[:, 1]), 0, height - 1)
        boxes.append((cols.min(), rows.min(), cols.max() + 1, rows.max() + 1))
    if prompts.box is not None:
        x0, y0, x1, y1 = prompts.box
        boxes.append((math.floor(x0), math.floor(y0), math.ceil(x1), math.ceil(y1)))
    if prompts.mask is not None:
        mask_box = prompts.mask.box if isinstance(prompts.mask, Instance) else tight_box(np.asarray(prompts.mask))
        if mask_box is not None and mask_box[2] > mask_box[0] and mask_box[3] > mask_box[1]:
            boxes.append(mask_box)
    if not boxes:
        return None
    x0, y0 = max(0, min(b[0] for b in boxes)), max(0, min(b[1] for b in boxes))
    x1, y1 = min(width, max(b[2] for b in boxes)), min(height, max(b[3] for b in boxes))
    return int(x0), int(y0), int(x1), int(y1)


def object_window(extent: tuple[int, int, int, int], image_size: tuple[int, int], tile: int, overlap: int) -> Window:
    """The window that answers prompts of pixel `extent` on an image tiled by ``(tile, overlap)``."""
    height, width = image_size
    x0, x1, kind_x = _span(extent[0], extent[2], width, tile, overlap)
    y0, y1, kind_y = _span(extent[1], extent[3], height, tile, overlap)
    return Window(x0, y0, x1, y1, max(kind_x, kind_y, key=KINDS.index))


def _span(low: int, high: int, length: int, tile: int, overlap: int) -> tuple[int, int, str]:
    """``(start, end, kind)`` along one axis for the extent ``[low, high)``: grid, shifted, neighbours."""
    if length <= tile:
        return 0, length, "grid"
    grid = tile_starts(length, tile, overlap)
    start = _nearest_holding(grid, low, high, tile)
    if start is not None:
        return start, start + tile, "grid"
    step = max(1, (tile - overlap) // 2)
    lattice = sorted({*range(0, length - tile + 1, step), length - tile})
    start = _nearest_holding(lattice, low, high, tile)
    if start is not None:
        return start, start + tile, "shifted"
    first = max(s for s in grid if s <= low)
    last = min(s + tile for s in grid if s + tile >= high)
    return first, last, "neighbours"


def _nearest_holding(starts: list[int], low: int, high: int, tile: int) -> int | None:
    """The start whose ``tile``-long span holds ``[low, high)`` with its centre nearest the extent's."""
    holding = [s for s in starts if s <= low and s + tile >= high]
    if not holding:
        return None
    middle = (low + high) / 2
    return min(holding, key=lambda s: abs(s + tile / 2 - middle))


def prompts_in_window(prompts: VisualPrompts, window: Window, image_size: tuple[int, int]) -> VisualPrompts:
    """The prompts in the window's pixels: points and box shifted, the previous mask cropped to it."""
    shift = np.array([window.x0, window.y0], dtype=np.float64)
    points = None if prompts.points is None else prompts.points - shift
    box = None if prompts.box is None else prompts.box - np.tile(shift, 2)
    mask = None if prompts.mask is None else window_mask(prompts.mask, image_size, window)
    return VisualPrompts(points, prompts.point_labels, box, mask)


def window_mask(mask: Instance | np.ndarray, image_size: tuple[int, int], window: Window) -> np.ndarray:
    """A previous mask (checked against the image as `full_size_mask` does) cut to the window.

    An `Instance` is cropped from its compact mask: no image-sized array is made for it.
    """
    if not isinstance(mask, Instance):
        return full_size_mask(mask, image_size)[window.y0 : window.y1, window.x0 : window.x1]
    height, width = image_size
    if mask.box[2] > width or mask.box[3] > height:
        raise OptionError(
            f"The mask's instance box {mask.box} lies outside this {width}x{height} image: pass an instance "
            "of a result of this same image."
        )
    return crop_mask(mask, window.y0, window.y1, window.x0, window.x1)


def to_image(instance: Instance, window: Window) -> Instance:
    """An instance found in the window, moved to image pixels (its compact mask is unchanged)."""
    x0, y0, x1, y1 = instance.box
    return dataclasses.replace(
        instance, box=(x0 + window.x0, y0 + window.y0, x1 + window.x0, y1 + window.y0),
    )
