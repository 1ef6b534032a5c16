"""Test images for the napari widget tests."""

from __future__ import annotations

import numpy as np


def structured(shape, seed: int = 0, dtype=np.uint8, high: int = 255) -> np.ndarray:
    """Noise plus a bright rectangle (in the last two spatial axes), so masks have some structure."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, high // 4, shape).astype(dtype)
    h, w = shape[-2:] if len(shape) < 3 or shape[-1] > 4 else shape[-3:-1]
    region = (Ellipsis, slice(h // 5, h // 2), slice(w // 6, w // 2))
    if len(shape) >= 3 and shape[-1] <= 4:
        region = region + (slice(None),)
    image[region] = high
    return image
