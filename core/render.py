"""Pictures a person can look at: instance overlays and label images saved as PNG."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from promptseg.errors import OptionError
from promptseg.results import SegmentationResult


def instance_colors(count: int, seed: int = 7) -> np.ndarray:
    """`count` distinct, saturated RGB colours (golden-ratio hues), uint8 ``(count, 3)``."""
    import colorsys

    hues = (np.arange(count) * 0.61803398875 + seed * 0.1) % 1.0
    return np.array(
        [[int(c * 255) for c in colorsys.hsv_to_rgb(h, 0.85, 1.0)] for h in hues], dtype=np.uint8
    ).reshape(-1, 3)


def overlay(rgb: np.ndarray, result: SegmentationResult, alpha: float = 0.45, labels: bool = True) -> np.ndarray:
    """`rgb` with each instance filled in its own colour, outlined, and captioned with label and score."""
    import cv2

    canvas = rgb.astype(np.float32).copy()
    colors = instance_colors(len(result))
    for inst, color in zip(result.instances, colors):
        x0, y0, x1, y1 = inst.box
        region = canvas[y0:y1, x0:x1]
        region[inst.mask] = region[inst.mask] * (1 - alpha) + color.astype(np.float32) * alpha
    out = np.clip(canvas, 0, 255).astype(np.uint8)
    thickness = max(1, round(max(rgb.shape[:2]) / 500))
    for inst, color in zip(result.instances, colors):
        contours, _ = cv2.findContours(inst.mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(out, contours, -1, tuple(int(c) for c in color), thickness, offset=inst.box[:2])
        if labels:
            text = f"{inst.label} {inst.score:.2f}"
            scale = 0.4 * thickness
            (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)
            x, y = inst.box[0], max(th + base, inst.box[1])
            cv2.rectangle(out, (x, y - th - base), (x + tw, y), tuple(int(c) for c in color), -1)
            cv2.putText(out, text, (x, y - base), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), thickness, cv2.LINE_AA)
    return out


def save_png(array: np.ndarray, path: str | Path) -> Path:
    """Save uint8 RGB/gray or uint16 label images losslessly with Pillow."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if array.dtype not in (np.uint8, np.uint16):
        if array.max(initial=0) > 65535:
            raise OptionError(f"{path.name}: {int(array.max()):,} instances do not fit a 16-bit label PNG; "
                              "use --format coco or json.")
        array = array.astype(np.uint16)
    Image.fromarray(array).save(path)
    return path
