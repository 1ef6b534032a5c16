"""`load_clip` and `ClipScorer`: CLIP embeddings of texts, whole images and masked instance crops.

Every embedding is cached the way SAM 3's are: keyed by a content hash plus the CLIP model's
identity, the precision it runs in and the kind of device. Texts and crops stay in memory;
whole-image and vocabulary embeddings also go to the disk cache, so `suggest_prompts` on a seen
image costs no model run.
A crop shows the instance's tight box with a margin of context, every pixel outside the mask
set to CLIP's mean colour (neutral after normalisation), padded to a square so the model's
centre crop cuts nothing off.

fp16 overflow: an fp16 CLIP whose embedding comes out non-finite (an activation above 65504)
moves for good to a copy in a precision with fp32's range (`promptseg.device.safe_dtype`), with
a warning, and the call starts again there. For good, not per call as for SAM 3: a CLIP is small,
its fp16 copy is freed, and the embeddings made from then on all come from one precision (the cache
keys name it).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from promptseg.backends.protocol import ScorerBackend
from promptseg.cache import EmbeddingCache, MemoryCache, make_key, open_disk_cache
from promptseg.device import dtype_name, safe_dtype
from promptseg.images import pixel_hash
from promptseg.results import Instance

OBJECT_TEMPLATES = ("a photo of a {}.", "a cropped photo of a {}.", "a close-up photo of a {}.")
"""Prompt templates averaged into one text embedding per phrase (CLIP was trained on captions)."""
VOCABULARY_TEMPLATES = ("a photo of a {}.",)
"""One template for whole vocabularies: ranking 1,200 names stays a single pass."""
CROP_MARGIN = 0.1
"""Context kept around an instance's box, as a fraction of its longer side."""
CROP_BATCH = 32

logger = logging.getLogger(__name__)


@dataclass
class ClipStats:
    """How often each CLIP tower ran: the proof that crop and text caching work."""

    image_encoder_runs: int = 0
    images_encoded: int = 0
    text_encoder_runs: int = 0
    texts_encoded: int = 0


def load_clip(
    model: str | bool | None = None,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "auto",
    cache_dir: str | os.PathLike | None | bool = None,
    *,
    backend: str | None = None,
    **backend_options: Any,
) -> "ClipScorer":
    """Load a CLIP scorer through the registered scorer backends (OpenCLIP built in).

    `model` is ``NAME/TAG`` (e.g. ``ViT-B-32/laion2b_s34b_b79k``), ``NAME/PATH`` to a weights
    file, ``hf-hub:ORG/REPO``, ``local-dir:DIR`` or a directory; ``True``/``None`` means
    `PROMPTSEG_CLIP` or ``ViT-B-32/laion2b_s34b_b79k``. Device, dtype and cache directory follow
    the same policy as `load_segmenter`.
    """
    from promptseg.clip.openclip import DEFAULT_CLIP
    from promptseg.plugins import load_backend

    if model in (None, True):
        model = os.environ.get("PROMPTSEG_CLIP") or DEFAULT_CLIP
    loaded, _, _ = load_backend("scorer", str(model), device, dtype, backend, backend_options)
    disk = open_disk_cache(cache_dir, folder="clip")
    return ClipScorer(loaded, EmbeddingCache(MemoryCache(256 * 1024**2), disk), model_name=str(model))


class ClipScorer:
    """A loaded CLIP plus its embedding caches. Thread-safe: calls are serialised on one lock.

    All embeddings are unit length on the CPU, so a similarity is a dot product.
    """

    def __init__(
        self, backend: ScorerBackend, cache: EmbeddingCache | None = None, model_name: str | None = None
    ) -> None:
        self.backend = backend
        self.cache = cache if cache is not None else EmbeddingCache(MemoryCache(256 * 1024**2))
        self.text_cache = MemoryCache(64 * 1024**2)
        self.model_name = model_name or backend.model_id
        self.stats = ClipStats()
        self.vocabulary: list[str] | None = None
        """English phrases non-English prompts are mapped to; None means the shipped vocabulary."""
        self._lock = threading.RLock()

    @property
    def model_id(self) -> str:
        return self.backend.model_id

    @property
    def multilingual(self) -> bool:
        """Whether the text tower reads many languages (xlm-roberta, NLLB, mT5)."""
        return bool(getattr(self.backend, "multilingual", False))

    @property
    def logit_scale(self) -> float:
        """CLIP's learned temperature: softmax(logit_scale * cosine) gives label probabilities."""
        return float(self.backend.logit_scale)

    def describe(self) -> dict[str, str]:
        return {
            "clip": self.model_name,
            "clip_model_id": self.model_id,
            "clip_backend": self.backend.name,
            "clip_dtype": dtype_name(self.backend.dtype),
        }

    def _key_parts(self, kind: str, **content: str) -> dict[str, str]:
        """Everything that changes a CLIP embedding: backend, weights, the precision the model runs
        in, the kind of device (a GPU rounds differently from a CPU, so a shared disk cache keeps
        them apart), and what was embedded."""
        return {"backend": self.backend.name, "model": self.model_id, "dtype": dtype_name(self.backend.dtype),
                "device": torch.device(self.backend.device).type, "kind": kind, **content}

    def _prefix(self) -> str:
        return "|".join(self._key_parts("text").values())

    def _encode(self, tower: str, call) -> torch.Tensor | None:
        """`call(backend)`, or None when fp16 overflowed in it and the scorer has just moved to a
        safe precision (the caller then starts again, so its keys name the new precision)."""
        encoded = call(self.backend)
        if self.backend.dtype != torch.float16 or bool(torch.isfinite(encoded).all()):
            return encoded
        make = getattr(self.backend, "with_dtype", None)
        if make is None:
            logger.warning("fp16 overflowed in CLIP's %s (non-finite embeddings) and the %s backend cannot change "
                           "precision: load the CLIP with dtype='bf16' or 'fp32'.", tower, self.backend.name)
            return encoded
        self.backend = make(safe_dtype(self.backend.device))
        logger.warning("fp16 overflowed in CLIP's %s (non-finite embeddings): CLIP %s runs in %s from now on. "
                       "Load it with dtype='%s' to skip the fp16 attempt.", tower, self.model_name,
                       dtype_name(self.backend.dtype), dtype_name(self.backend.dtype))
        return None

    def text_embeddings(self, texts: Sequence[str], templates: Sequence[str] | None = OBJECT_TEMPLATES) -> torch.Tensor:
        """``(N, D)`` embeddings of texts; with `templates`, the normalised mean over the templates."""
        texts = list(texts)
        if not texts:
            return torch.zeros((0, 0))
        forms = tuple(templates) if templates else ("{}",)
        key = f"{self._prefix()}|{'||'.join(forms)}|"
        with self._lock:
            missing = [t for t in dict.fromkeys(texts) if self.text_cache.get(key + t) is None]
            for start in range(0, len(missing), 256):
                chunk = missing[start : start + 256]
                filled = [form.format(text) for text in chunk for form in forms]
                encoded = self._encode("text tower", lambda backend: backend.encode_text(filled))
                if encoded is None:
                    return self.text_embeddings(texts, templates)
                encoded = encoded.reshape(len(chunk), len(forms), -1).mean(dim=1)
                encoded = torch.nn.functional.normalize(encoded, dim=-1)
                self.stats.text_encoder_runs += 1
                self.stats.texts_encoded += len(filled)
                for text, row in zip(chunk, encoded):
                    self.text_cache.put(key + text, {"e": row.clone()})
            return torch.stack([self.text_cache.get(key + t)["e"] for t in texts])

    def vocabulary_embeddings(self, phrases: Sequence[str], templates: Sequence[str] | None) -> torch.Tensor:
        """Embeddings of a whole vocabulary as one tensor, cached on disk under the list's hash."""
        phrases = list(phrases)

        def parts() -> dict[str, str]:
            return self._key_parts("vocabulary", templates="||".join(templates or ()),
                                   phrases=make_key(phrases=phrases))

        with self._lock:
            found, _ = self.cache.get(make_key(**parts()), parts())
            if found is not None:
                return found["embeddings"]
            embeddings = self.text_embeddings(phrases, templates)
            self.cache.put(make_key(**parts()), {"embeddings": embeddings}, parts())  # the precision they ran in
            return embeddings

    def image_embeddings(self, images: Sequence[np.ndarray], disk: bool = False) -> torch.Tensor:
        """``(N, D)`` embeddings of RGB uint8 images, batched, each cached by its pixel hash."""
        rows: list[torch.Tensor | None] = [None] * len(images)
        todo: list[int] = []
        keys = []
        with self._lock:
            for index, rgb in enumerate(images):
                parts = self._key_parts("image", pixels=pixel_hash(rgb))
                key = make_key(**parts)
                keys.append((key, parts))
                if disk:
                    found, _ = self.cache.get(key, parts)
                else:
                    found = self.cache.memory.get(key)
                if found is not None:
                    rows[index] = found["e"]
                else:
                    todo.append(index)
            for start in range(0, len(todo), CROP_BATCH):
                chunk = todo[start : start + CROP_BATCH]
                squares = [square_pad(images[i], self.backend.fill) for i in chunk]
                encoded = self._encode("image tower", lambda backend: backend.encode_images(squares))
                if encoded is None:
                    return self.image_embeddings(images, disk)
                self.stats.image_encoder_runs += 1
                self.stats.images_encoded += len(chunk)
                for index, row in zip(chunk, encoded):
                    rows[index] = row.clone()
                    key, parts = keys[index]
                    if disk:
                        self.cache.put(key, {"e": rows[index]}, parts)
                    else:
                        self.cache.memory.put(key, {"e": rows[index]})
        if not rows:
            return torch.zeros((0, 0))
        return torch.stack(rows)

    def crop_embeddings(self, rgb: np.ndarray, instances: Sequence[Instance]) -> torch.Tensor:
        """``(N, D)`` embeddings of each instance's masked crop (background neutralised)."""
        return self.image_embeddings([masked_crop(rgb, inst, self.backend.fill) for inst in instances])


def masked_crop(rgb: np.ndarray, instance: Instance, fill: tuple[int, int, int], margin: float = CROP_MARGIN) -> np.ndarray:
    """The instance's box plus a margin, with every pixel outside its mask set to `fill`."""
    height, width = rgb.shape[:2]
    x0, y0, x1, y1 = instance.box
    pad = int(round(margin * max(x1 - x0, y1 - y0)))
    cx0, cy0, cx1, cy1 = max(0, x0 - pad), max(0, y0 - pad), min(width, x1 + pad), min(height, y1 + pad)
    crop = np.empty((cy1 - cy0, cx1 - cx0, 3), dtype=np.uint8)
    crop[:] = fill
    inside = np.zeros(crop.shape[:2], dtype=bool)
    inside[y0 - cy0 : y1 - cy0, x0 - cx0 : x1 - cx0] = instance.mask
    crop[inside] = rgb[cy0:cy1, cx0:cx1][inside]
    return crop


def square_pad(rgb: np.ndarray, fill: tuple[int, int, int]) -> np.ndarray:
    """Centre `rgb` on a square canvas of `fill`, so a centre crop keeps all of it."""
    height, width = rgb.shape[:2]
    side = max(height, width)
    if height == width:
        return rgb
    canvas = np.empty((side, side, 3), dtype=np.uint8)
    canvas[:] = fill
    top, left = (side - height) // 2, (side - width) // 2
    canvas[top : top + height, left : left + width] = rgb
    return canvas


__all__ = ["ClipScorer", "load_clip", "masked_crop", "OBJECT_TEMPLATES"]
