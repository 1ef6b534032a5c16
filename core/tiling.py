"""Tiled segmentation of large images: a grid of overlapping tiles, one embedding per tile, stitching.

SAM 3 resizes whatever it gets to its input size (1008x1008), so on a 10k-pixel slide a cell
shrinks to a pixel. Tiling runs each tile at the model's own resolution. Each tile goes through
the `detect` callable it is given (the segmenter passes `Segmenter.detect`: the embedding, cached
under a content hash of the tile's pixels, then prompt decoding); this module never calls back
into the segmenter. Tile instances are kept as compact crops in image
coordinates; pieces of one object seen by neighbouring tiles are joined where their masks agree
inside the shared overlap (union-find), and each pixel of a joined object is taken from the tile
whose centre is nearest (the tile that saw it with the most context). No full-size array per
instance is ever made; memory grows with the objects found, not with the image.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from promptseg.errors import CancelledError
from promptseg.masks import clean, mask_iou, mask_nms, tight_box
from promptseg.options import CleanupOptions, TilingOptions, check_overlap, default_overlap
from promptseg.results import Instance
from promptseg.unionfind import UnionFind

logger = logging.getLogger(__name__)

AUTO_FACTOR = 1.5
"""`tile="auto"` tiles an image whose long side is more than this many model inputs."""
DEFAULT_MERGE_IOU = 0.5


@dataclass(frozen=True)
class Tile:
    """One tile: pixel rows ``y0:y1`` and columns ``x0:x1`` of the image, at grid ``(row, col)``."""

    index: int
    row: int
    col: int
    y0: int
    y1: int
    x0: int
    x1: int

    @property
    def centre(self) -> tuple[float, float]:
        return (self.y0 + self.y1) / 2, (self.x0 + self.x1) / 2


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Tile start offsets along one axis: stride ``tile - overlap``, the last tile flush with the end."""
    if length <= tile:
        return [0]
    count = math.ceil((length - overlap) / (tile - overlap))
    starts = [min(i * (tile - overlap), length - tile) for i in range(count)]
    return sorted(set(starts))


def tile_grid(image_size: tuple[int, int], tile: int, overlap: int) -> list[Tile]:
    """Row-major tiles of at most ``tile x tile`` pixels covering the image, overlapping by >= `overlap`."""
    height, width = image_size
    rows, cols = tile_starts(height, tile, overlap), tile_starts(width, tile, overlap)
    tiles = []
    for r, y0 in enumerate(rows):
        for c, x0 in enumerate(cols):
            tiles.append(Tile(len(tiles), r, c, y0, min(y0 + tile, height), x0, min(x0 + tile, width)))
    return tiles


def resolve_tiling(
    tiling: TilingOptions, image_size: tuple[int, int], input_size: tuple[int, int]
) -> tuple[int, int] | None:
    """``(tile, overlap)`` in pixels for an image of `image_size`, or None for no tiling.

    ``tile="auto"`` tiles at the model's input size when the image's long side exceeds
    `AUTO_FACTOR` model inputs (smaller images lose little by being resized once).
    The default overlap is an eighth of the tile (`promptseg.options.default_overlap`).
    """
    tile = tiling.tile
    if tile is None:
        return None
    if tile == "auto":
        side = max(input_size)
        if max(image_size) <= AUTO_FACTOR * side:
            return None
        tile = side
    if tiling.overlap is None:
        return tile, default_overlap(tile)
    return tile, check_overlap(tiling.overlap, tile)  # an "auto" tile is known only now


@dataclass
class _Piece:
    """An instance found in one tile, already in image coordinates."""

    instance: Instance
    tile: Tile


Detect = Callable[[np.ndarray, "np.ndarray | None", "np.ndarray | None"], tuple[list[Instance], str]]
"""``detect(rgb, exemplar_boxes, exemplar_labels) -> (instances, embedding origin)``: one image's
embedding (cached) and prompt decoding, with instances in its own pixel coordinates."""


def segment_tiled(
    rgb: np.ndarray,
    tile: int,
    overlap: int,
    detect: Detect,
    cleanup: CleanupOptions | None = None,
    *,
    exemplars: np.ndarray | None = None,
    exemplar_labels: np.ndarray | None = None,
    merge_iou: float = DEFAULT_MERGE_IOU,
    progress: Callable[[int, int], None] | None = None,
    cancel: Callable[[], bool] | None = None,
) -> tuple[list[Instance], str, dict[str, Any]]:
    """Segment `rgb` tile by tile with `detect`, stitch the pieces into whole objects, clean them up.

    Returns the instances, where the embeddings came from (``"mixed"`` when tiles differ) and
    what the tiling did (``tiles``, ``tile``, ``overlap``, ``pieces``). Two pieces with the same
    label from overlapping tiles are one object when their masks, restricted to the tiles' shared
    overlap, have IoU >= `merge_iou`. A joined object's score is the mean of its pieces' scores
    weighted by the pixels each piece contributes. `exemplars` are the checked ``(N, 4)`` pixel
    boxes and ``(N,)`` labels of the whole image. `progress(total, advance)` counts tiles and
    `cancel()` is checked before each tile. `rgb` is only ever sliced one tile at a time, so it may
    be a lazy view (`promptseg.large_images.LazyRGB`) whose pixels are read as each tile runs.
    """
    cleanup = cleanup or CleanupOptions()
    height, width = rgb.shape[:2]
    tiles = tile_grid((height, width), tile, overlap)
    neighbours = _earlier_neighbours(tiles)
    pieces: list[_Piece] = []
    by_tile: dict[int, list[int]] = defaultdict(list)
    groups = UnionFind()
    origins: set[str] = set()
    if progress:
        progress(len(tiles), 0)
    logger.info("Segmenting %dx%d image in %d tiles of %d px (overlap %d)", width, height, len(tiles), tile, overlap)
    for current in tiles:
        if cancel is not None and cancel():
            raise CancelledError(f"Segmentation was cancelled after {current.index} of {len(tiles)} tiles.")
        found, origin = _segment_tile(detect, rgb, current, cleanup, exemplars, exemplar_labels)
        origins.add(origin)
        for inst in found:
            index = groups.add()
            pieces.append(_Piece(inst, current))
            by_tile[current.index].append(index)
            for other_tile in neighbours[current.index]:
                for other in by_tile[other_tile.index]:
                    if pieces[other].instance.label == inst.label and _agree_in_overlap(
                        pieces[other], pieces[index], merge_iou
                    ):
                        groups.union(index, other)
        if progress:
            progress(len(tiles), 1)
    stitched = [_stitch([pieces[i] for i in group]) for group in groups.groups()]
    instances = clean(stitched, (height, width), cleanup)  # min_area judges whole objects, not pieces
    instances = local_nms(local_nms(instances, cleanup.iou_threshold, True, tile), cleanup.cross_prompt_iou, False, tile)
    if cleanup.max_instances is not None:
        instances = instances[: cleanup.max_instances]
    origin = origins.pop() if len(origins) == 1 else "mixed"
    return instances, origin, {"tiles": len(tiles), "tile": tile, "overlap": overlap, "pieces": len(pieces)}


def local_nms(instances: list[Instance], iou_threshold: float | None, per_label: bool, cell: int) -> list[Instance]:
    """`mask_nms` that compares each candidate only with kept instances in the grid cells its box touches.

    Same result as the all-pairs version (instances whose boxes do not meet have IoU 0), in time
    proportional to the number of neighbours rather than to the square of the instance count.
    """
    ordered = sorted(instances, key=lambda inst: -inst.score)
    if iou_threshold is None:
        return ordered
    grid: dict[tuple[int, int], list[Instance]] = defaultdict(list)
    kept: list[Instance] = []
    for candidate in ordered:
        x0, y0, x1, y1 = candidate.box
        cells = [(r, c) for r in range(y0 // cell, (y1 - 1) // cell + 1) for c in range(x0 // cell, (x1 - 1) // cell + 1)]
        near = {id(k): k for key in cells for k in grid[key]}.values()
        if all((per_label and k.label != candidate.label) or mask_iou(k, candidate) <= iou_threshold for k in near):
            kept.append(candidate)
            for key in cells:
                grid[key].append(candidate)
    return kept


def _segment_tile(
    detect: Detect, rgb: np.ndarray, tile: Tile, cleanup: CleanupOptions, exemplars, exemplar_labels
) -> tuple[list[Instance], str]:
    """One tile through `detect`; instances returned in image coordinates."""
    pixels = np.ascontiguousarray(rgb[tile.y0 : tile.y1, tile.x0 : tile.x1])
    boxes, labels = _exemplars_in_tile(exemplars, exemplar_labels, tile)
    raw, origin = detect(pixels, boxes, labels)
    # duplicates inside one tile go now, while the candidates are small
    raw = mask_nms(mask_nms(raw, cleanup.iou_threshold, per_label=True), cleanup.cross_prompt_iou, per_label=False)
    shifted = []
    for inst in raw:
        x0, y0, x1, y1 = inst.box
        model_box = inst.model_box
        if model_box is not None:
            model_box = (model_box[0] + tile.x0, model_box[1] + tile.y0, model_box[2] + tile.x0, model_box[3] + tile.y0)
        shifted.append(replace(
            inst, box=(x0 + tile.x0, y0 + tile.y0, x1 + tile.x0, y1 + tile.y0), model_box=model_box,
        ))
    return shifted, origin


def _exemplars_in_tile(exemplars, exemplar_labels, tile: Tile):
    """Exemplar boxes clipped to the tile, in tile pixels, with their labels; None when none falls inside.

    `exemplars` and `exemplar_labels` are the ``(N, 4)`` pixel boxes and ``(N,)`` labels that
    `promptseg.segmenter.check_exemplars` returns: checked once for the whole image, not per tile.
    """
    if exemplars is None or len(exemplars) == 0:
        return None, None
    boxes = np.asarray(exemplars, dtype=np.float64)
    labels = np.ones(len(boxes), dtype=np.int64) if exemplar_labels is None else np.asarray(exemplar_labels)
    clipped = boxes.copy()
    clipped[:, [0, 2]] = np.clip(boxes[:, [0, 2]], tile.x0, tile.x1) - tile.x0
    clipped[:, [1, 3]] = np.clip(boxes[:, [1, 3]], tile.y0, tile.y1) - tile.y0
    inside = (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
    if not inside.any():
        return None, None
    return clipped[inside], labels[inside]


def _earlier_neighbours(tiles: list[Tile]) -> dict[int, list[Tile]]:
    """For each tile, the tiles before it in row-major order that overlap it."""
    rows = sorted({(t.row, t.y0, t.y1) for t in tiles})
    cols = sorted({(t.col, t.x0, t.x1) for t in tiles})
    row_links = {r: [r2 for r2, a, b in rows if a < y1 and y0 < b] for r, y0, y1 in rows}
    col_links = {c: [c2 for c2, a, b in cols if a < x1 and x0 < b] for c, x0, x1 in cols}
    at = {(t.row, t.col): t for t in tiles}
    return {
        t.index: [
            at[(r, c)] for r in row_links[t.row] for c in col_links[t.col]
            if (r, c) in at and at[(r, c)].index < t.index
        ]
        for t in tiles
    }


def crop_mask(inst: Instance, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    """The instance's mask inside the image region ``[y0:y1, x0:x1]`` (zeros where it is absent)."""
    out = np.zeros((y1 - y0, x1 - x0), dtype=bool)
    bx0, by0, bx1, by1 = inst.box
    iy0, iy1, ix0, ix1 = max(y0, by0), min(y1, by1), max(x0, bx0), min(x1, bx1)
    if iy0 < iy1 and ix0 < ix1:
        out[iy0 - y0 : iy1 - y0, ix0 - x0 : ix1 - x0] = inst.mask[iy0 - by0 : iy1 - by0, ix0 - bx0 : ix1 - bx0]
    return out


def _agree_in_overlap(a: _Piece, b: _Piece, merge_iou: float) -> bool:
    """Whether two pieces from overlapping tiles cover the same pixels where both tiles see."""
    y0, y1 = max(a.tile.y0, b.tile.y0), min(a.tile.y1, b.tile.y1)
    x0, x1 = max(a.tile.x0, b.tile.x0), min(a.tile.x1, b.tile.x1)
    ax0, ay0, ax1, ay1 = a.instance.box
    bx0, by0, bx1, by1 = b.instance.box
    # only the part of the shared area that both boxes reach can hold common pixels
    y0, y1 = max(y0, min(ay0, by0)), min(y1, max(ay1, by1))
    x0, x1 = max(x0, min(ax0, bx0)), min(x1, max(ax1, bx1))
    if y0 >= y1 or x0 >= x1:
        return False
    ma, mb = crop_mask(a.instance, y0, y1, x0, x1), crop_mask(b.instance, y0, y1, x0, x1)
    inter = np.count_nonzero(ma & mb)
    if inter == 0:
        return False
    return inter / np.count_nonzero(ma | mb) >= merge_iou


def _stitch(group: list[_Piece]) -> Instance:
    """One instance from the pieces of an object: each pixel from the nearest-centred tile that saw it."""
    if len(group) == 1:
        inst = group[0].instance
        return replace(inst, extra={**inst.extra, "tiles": 1})
    x0 = min(p.instance.box[0] for p in group)
    y0 = min(p.instance.box[1] for p in group)
    x1 = max(p.instance.box[2] for p in group)
    y1 = max(p.instance.box[3] for p in group)
    per_tile: dict[int, list[_Piece]] = defaultdict(list)
    for piece in group:
        per_tile[piece.tile.index].append(piece)
    best = np.full((y1 - y0, x1 - x0), np.inf, dtype=np.float32)
    owner = np.full((y1 - y0, x1 - x0), -1, dtype=np.int32)
    mask = np.zeros((y1 - y0, x1 - x0), dtype=bool)
    tile_scores = []
    for slot, (_, parts) in enumerate(sorted(per_tile.items())):
        tile = parts[0].tile
        ry0, ry1, rx0, rx1 = max(y0, tile.y0), min(y1, tile.y1), max(x0, tile.x0), min(x1, tile.x1)
        if ry0 >= ry1 or rx0 >= rx1:
            tile_scores.append(0.0)
            continue
        cy, cx = tile.centre
        dy = np.abs(np.arange(ry0, ry1, dtype=np.float32) + 0.5 - cy)
        dx = np.abs(np.arange(rx0, rx1, dtype=np.float32) + 0.5 - cx)
        distance = np.maximum(dy[:, None], dx[None, :])
        region = (slice(ry0 - y0, ry1 - y0), slice(rx0 - x0, rx1 - x0))
        nearer = distance < best[region]
        best[region][nearer] = distance[nearer]
        owner[region][nearer] = slot
        seen = np.zeros((ry1 - ry0, rx1 - rx0), dtype=bool)
        for part in parts:
            seen |= crop_mask(part.instance, ry0, ry1, rx0, rx1)
        mask[region][nearer] = seen[nearer]
        tile_scores.append(max(p.instance.score for p in parts))
    weights = np.bincount(owner[mask], minlength=len(tile_scores)).astype(np.float64)
    scores = np.asarray(tile_scores)
    score = float((weights * scores).sum() / weights.sum()) if weights.sum() else float(scores.max())
    tight = tight_box(mask)
    if tight is None:  # every piece lost its pixels to tiles that did not see the object
        keep = max(group, key=lambda p: p.instance.area).instance
        return replace(keep, extra={**keep.extra, "tiles": len(per_tile)})
    cx0, cy0, cx1, cy1 = tight
    model_boxes = [p.instance.model_box for p in group if p.instance.model_box is not None]
    first = group[0].instance
    return Instance(
        label=first.label,
        score=score,
        box=(x0 + cx0, y0 + cy0, x0 + cx1, y0 + cy1),
        mask=np.ascontiguousarray(mask[cy0:cy1, cx0:cx1]),
        model_box=(
            min(b[0] for b in model_boxes), min(b[1] for b in model_boxes),
            max(b[2] for b in model_boxes), max(b[3] for b in model_boxes),
        ) if model_boxes else None,
        phrase=first.phrase,
        extra={**first.extra, "tiles": len(per_tile)},
    )
