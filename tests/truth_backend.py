"""A deterministic segmentation backend that returns the ground truth visible in its input.

A scene is a label image (0 background, 1..N objects) plus a class per object. It is rendered to
RGB with the object id in the red and green bytes and the class code in the blue byte, so a tile
of the picture carries exactly the objects visible in it. `TruthBackend` implements the backend
protocol of `promptseg.backends.protocol` by decoding those bytes, so a real
`promptseg.segmenter.Segmenter` (with its cache, tiling and stitching) runs on it and every
result can be compared with the exact truth.
"""

from __future__ import annotations

import numpy as np
import torch

from promptseg.backends.protocol import Detections


def render(labels: np.ndarray, classes: dict[int, int]) -> np.ndarray:
    """RGB pixels encoding object ids (R + 256 G) and class codes (B) of a label image."""
    if labels.max() >= 65536:
        raise ValueError("at most 65535 objects")
    rgb = np.zeros(labels.shape + (3,), dtype=np.uint8)
    rgb[..., 0] = labels & 255
    rgb[..., 1] = labels >> 8
    lut = np.zeros(max(int(labels.max()), max(classes, default=0)) + 1, dtype=np.uint8)
    for obj, code in classes.items():
        lut[obj] = code
    rgb[..., 2] = lut[labels]
    return rgb


def score_of(obj: int) -> float:
    """The deterministic score the backend gives object `obj` (in 0.51..0.9)."""
    return 0.51 + (obj * 7 % 40) / 100


class TruthBackend:
    """Backend protocol implementation that "detects" exactly the objects in its input.

    `vocabulary` maps phrases to class codes. `mask_size` is the side of the returned mask
    probabilities (like SAM 3's 288 x 288 low-resolution masks); None returns them at the input's
    own resolution, which makes the decoded masks pixel-exact.
    """

    name = "truth"
    model_id = "truth-v1"
    device = torch.device("cpu")
    dtype = torch.float32

    def __init__(self, vocabulary: dict[str, int], mask_size: int | None = None, input_size: int = 1008) -> None:
        self.vocabulary = dict(vocabulary)
        self.mask_size = mask_size
        self.input_size = (input_size, input_size)
        self.images_encoded = 0

    def preprocess(self, rgb: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.array(rgb, dtype=np.uint8, copy=True))[None]

    def encode_image(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        self.images_encoded += 1
        return {"rgb": pixel_values[0].contiguous()}  # 3 bytes a pixel: what the cache stores

    def encode_text(self, phrases: list[str]) -> list[dict[str, torch.Tensor]]:
        return [{"code": torch.tensor([[self.vocabulary.get(p, -1)]])} for p in phrases]

    def decode(self, image, texts, threshold, boxes=None, box_labels=None) -> list[Detections]:
        from scipy import ndimage

        rgb = image["rgb"].numpy().astype(np.int32)
        ids, classes = rgb[..., 0] + 256 * rgb[..., 1], rgb[..., 2]
        height, width = ids.shape
        extents = ndimage.find_objects(ids)
        results = []
        for text in texts:
            code = int(text["code"])
            present = np.unique(ids[(classes == code) & (ids > 0)]).tolist() if code > 0 else []
            present = [obj for obj in present if score_of(obj) > threshold]
            masks = [self._probs(ids, obj, extents[obj - 1]) for obj in present]
            found_boxes = [
                [extents[o - 1][1].start / width, extents[o - 1][0].start / height,
                 extents[o - 1][1].stop / width, extents[o - 1][0].stop / height]
                for o in present
            ]
            size = (height, width) if self.mask_size is None else (self.mask_size, self.mask_size)
            results.append(Detections(
                mask_probs=torch.from_numpy(np.stack(masks)) if masks else torch.zeros((0,) + size),
                boxes=torch.tensor(found_boxes, dtype=torch.float32).reshape(-1, 4),
                scores=torch.tensor([score_of(o) for o in present], dtype=torch.float32),
            ))
        return results

    def _probs(self, ids: np.ndarray, obj: int, extent: tuple[slice, slice]) -> np.ndarray:
        """The object's mask probabilities over the whole input, at full or low resolution."""
        height, width = ids.shape
        rows, cols = extent
        if self.mask_size is None:
            probs = np.zeros((height, width), dtype=np.float32)
            probs[extent] = ids[extent] == obj
            return probs
        size = self.mask_size
        if height % size or width % size:
            full = torch.from_numpy((ids == obj).astype(np.float32))
            return torch.nn.functional.interpolate(full[None, None], size=(size, size), mode="area")[0, 0].numpy()
        fy, fx = height // size, width // size  # area-average whole blocks around the object
        y0, x0 = rows.start // fy * fy, cols.start // fx * fx
        y1, x1 = -(-rows.stop // fy) * fy, -(-cols.stop // fx) * fx
        block = (ids[y0:y1, x0:x1] == obj).astype(np.float32)
        block = block.reshape((y1 - y0) // fy, fy, (x1 - x0) // fx, fx).mean(axis=(1, 3))
        probs = np.zeros((size, size), dtype=np.float32)
        probs[y0 // fy : y1 // fy, x0 // fx : x1 // fx] = block
        return probs


def truth_segmenter(vocabulary: dict[str, int], cache_dir=None, memory_bytes: int = 2 * 1024**3, **backend_options):
    """A real `Segmenter` with a memory (and optional disk) cache around a `TruthBackend`."""
    from promptseg.cache import DiskCache, EmbeddingCache, MemoryCache
    from promptseg.segmenter import Segmenter

    disk = DiskCache(cache_dir) if cache_dir is not None else None
    return Segmenter(TruthBackend(vocabulary, **backend_options), EmbeddingCache(MemoryCache(memory_bytes), disk))


def random_scene(
    height: int, width: int, count: int, seed: int = 0, sizes: tuple[int, int] = (4, 40), classes: int = 2
) -> tuple[np.ndarray, dict[int, int]]:
    """A label image of non-overlapping discs, ellipses and rectangles (each one connected piece)."""
    from skimage.draw import disk, ellipse, rectangle

    rng = np.random.default_rng(seed)
    labels = np.zeros((height, width), dtype=np.int32)
    kinds: dict[int, int] = {}
    obj = 0
    for _ in range(count * 20):
        if obj == count:
            break
        size = int(rng.integers(*sizes))
        cy, cx = int(rng.integers(0, height)), int(rng.integers(0, width))
        shape = rng.integers(3)
        if shape == 0:
            rr, cc = disk((cy, cx), size / 2, shape=labels.shape)
        elif shape == 1:
            rr, cc = ellipse(cy, cx, size / 2, size / 4 + 1, shape=labels.shape, rotation=rng.uniform(0, np.pi))
        else:
            rr, cc = rectangle((cy, cx), extent=(size, max(2, size // 2)), shape=labels.shape)
            rr, cc = rr.ravel(), cc.ravel()
        if rr.size == 0 or labels[rr, cc].any():
            continue
        obj += 1
        labels[rr, cc] = obj
        kinds[obj] = 1 + obj % classes
    return labels, kinds
