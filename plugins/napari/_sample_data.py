"""Synthetic fluorescence-like nuclei, made by code (no download), for trying the widget.

Bright, blurred ellipses on a dim uneven background with shot noise, in 16 bits like a camera
image: enough structure to exercise the scientific-pixel path (percentile scaling), tiling and
z-stacks. The random model used in tests finds nothing meaningful in them; a real SAM 3 is
needed for real masks.
"""

from __future__ import annotations

import numpy as np


def make_nuclei(shape: tuple[int, ...] = (512, 512), count: int = 40, seed: int = 0) -> np.ndarray:
    """A uint16 image (``(Y, X)``) or stack (``(Z, Y, X)``) of `count` blurred elliptical nuclei.

    In a stack each nucleus is an ellipsoid: it appears, grows and shrinks over a few slices.
    """
    from scipy import ndimage
    from skimage.draw import ellipse

    rng = np.random.default_rng(seed)
    height, width = shape[-2:]
    depth = shape[0] if len(shape) == 3 else 1
    volume = np.zeros((depth, height, width), dtype=np.float32)
    for _ in range(count):
        cy, cx = rng.uniform(0.08, 0.92) * height, rng.uniform(0.08, 0.92) * width
        ry, rx = rng.uniform(0.025, 0.06) * height, rng.uniform(0.025, 0.06) * width
        cz, rz = rng.uniform(0, depth - 1), max(1.0, rng.uniform(0.2, 0.4) * depth)
        brightness = rng.uniform(0.5, 1.0)
        angle = rng.uniform(-np.pi, np.pi)
        for z in range(depth):
            factor = 1.0 if depth == 1 else 1.0 - ((z - cz) / rz) ** 2
            if factor <= 0.05:
                continue
            scale = np.sqrt(factor)
            rows, cols = ellipse(cy, cx, ry * scale, rx * scale, shape=(height, width), rotation=angle)
            volume[z, rows, cols] = np.maximum(volume[z, rows, cols], brightness)
    volume = ndimage.gaussian_filter(volume, sigma=(0, 1.5, 1.5))
    yy, xx = np.mgrid[0:height, 0:width]
    background = 0.05 + 0.05 * (xx / width + yy / height)
    photons = (volume + background) * 800.0
    noisy = rng.poisson(photons).astype(np.float32) + 100.0  # camera offset
    image = np.clip(noisy, 0, 65535).astype(np.uint16)
    return image[0] if len(shape) == 2 else image


def nuclei() -> list[tuple]:
    """napari sample: a 512x512 uint16 image of synthetic nuclei."""
    return [(make_nuclei((512, 512)), {"name": "synthetic nuclei", "colormap": "gray"}, "image")]


def nuclei_stack() -> list[tuple]:
    """napari sample: a 16x256x256 uint16 z-stack of synthetic nuclei (voxels 2 x 0.5 x 0.5)."""
    data = make_nuclei((16, 256, 256), count=25, seed=1)
    meta = {"name": "synthetic nuclei stack", "colormap": "gray", "scale": (2.0, 0.5, 0.5)}
    return [(data, meta, "image")]
