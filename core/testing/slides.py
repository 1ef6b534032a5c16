"""A synthetic whole-slide image that is never whole in memory, for the large-image tests and benchmarks."""

from __future__ import annotations

import numpy as np


def slide_pixels(rows: np.ndarray, cols: np.ndarray, period: int = 700, radius: int = 160) -> np.ndarray:
    """uint16 pixels of a synthetic slide at level-0 coordinates ``rows x cols``: bright nuclei on a
    regular grid (every third one missing) over a dim, gently varying background."""
    y, x = rows.astype(np.int32)[:, None], cols.astype(np.int32)[None, :]
    dy, dx = (y % period) - period // 2, (x % period) - period // 2
    inside = dy * dy + dx * dx < radius * radius
    present = ((y // period) + 2 * (x // period)) % 3 != 0
    background = 400 + ((y * 7 + x * 13) % 97)
    return np.where(inside & present, 3500 + (x // period) % 5 * 50, background).astype(np.uint16)


def write_slide(path, size: int, chunk: int = 1024, levels: int = 1) -> list:
    """A ``size x size`` uint16 slide as a zarr pyramid (group at `path`, level i is ``size / 2**i``),
    written one chunk at a time so it never exists whole in memory. Returns the zarr arrays, finest first."""
    import zarr

    group = zarr.open_group(str(path), mode="w")
    arrays = []
    for level in range(levels):
        side, step = -(-size // 2**level), 2**level
        array = group.create_array(str(level), shape=(side, side), dtype=np.uint16, chunks=(chunk, chunk))
        for y0 in range(0, side, chunk):
            for x0 in range(0, side, chunk):
                rows = np.arange(y0, min(y0 + chunk, side)) * step
                cols = np.arange(x0, min(x0 + chunk, side)) * step
                array[y0 : y0 + len(rows), x0 : x0 + len(cols)] = slide_pixels(rows, cols)
        arrays.append(array)
    return arrays
