"""`load_segmenter` and `Segmenter`: the public API every adapter calls.

`Segmenter.segment` composes stages that each read only their part of `SegmentOptions` and
hand their output forward; none calls back into an earlier one:

    stage     what goes in -> what comes out           reads      where
    options   flat names -> SegmentOptions                        options (every default and check)
    query     prompts, exemplars -> Query              .clip      clip.verify.prompt_phrases
    load      image -> RGB pixels                      .pixels    images.load_image
    embed     RGB -> image embedding                              cache (memory, disk), else the encoder
    decode    embedding, phrases -> raw instances      .decoding  backend.decode, masks.instances_from_probs
    clean up  raw instances -> instances               .cleanup   masks.postprocess
     (tiled)  per tile embed -> decode, then stitch    .tiling    tiling.segment_tiled(detect=...)
    CLIP      instances -> checked instances           .clip      clip.verify.check_with_clip
    result    -> SegmentationResult                               results

`Segmenter.detect` (embed + decode of one image or tile) is what `tiling` receives as a
callable; `segment_stack` hands `stacks` a callable running `segment_rgb` on each slice.
`Segmenter.segment_object` (points, a box, a previous mask -> one object) checks its prompts
(`promptseg.visual`), loads, embeds through the same cache as text prompts, and decodes with the
backend's `decode_object`; on a tiled image it does so for the one window that holds the prompts
(`promptseg.visual_tiling`: image -> window -> cached embedding -> decode -> instances in image pixels).
"""

from __future__ import annotations

import dataclasses
import logging
import numbers
import os
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from promptseg.cache import (
    DEFAULT_DISK_BYTES,
    DEFAULT_MEMORY_BYTES,
    EmbeddingCache,
    MemoryCache,
    make_key,
    on_device,
    open_disk_cache,
    owned,
)
from promptseg.device import dtype_name
from promptseg.errors import CancelledError, ImageError, ModelLoadError, OptionError
from promptseg.images import check_pixel_budget, load_image, pixel_hash, resolve_max_pixels
from promptseg.masks import instances_from_probs, postprocess
from promptseg.overflow import OverflowGuard
from promptseg.clip.verify import check_with_clip, cleanup_for_clip, prompt_phrases
from promptseg.options import CleanupOptions, DecodingOptions, PixelOptions, SegmentOptions, resolve_options
from promptseg.results import Instance, SegmentationResult, ensure_prompt_list
from promptseg.stacks import StackResult, segment_stack
from promptseg.tiling import resolve_tiling, segment_tiled

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "facebook/sam3"
Progress = Callable[[int, int], None]
"""``progress(total, advance)``: called once with ``advance=0`` to announce the total, then per unit."""
CancelCheck = Callable[[], bool]


def default_model() -> str:
    """`PROMPTSEG_MODEL` when set, else ``facebook/sam3``: the model used when none is named."""
    return os.environ.get("PROMPTSEG_MODEL") or DEFAULT_MODEL


@dataclass
class EncoderStats:
    """How often each model stage ran: the proof that caching works."""

    image_encoder_runs: int = 0
    text_encoder_runs: int = 0
    decoder_runs: int = 0


def load_segmenter(
    model: str | None = None,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "auto",
    cache_dir: str | os.PathLike | None | bool = None,
    *,
    backend: str | None = None,
    memory_cache_bytes: int = DEFAULT_MEMORY_BYTES,
    disk_cache_bytes: int = DEFAULT_DISK_BYTES,
    prompt_batch_size: int | None = None,
    clip: str | bool | None = None,
    max_pixels: int | None = None,
    **backend_options: Any,
) -> Segmenter:
    """Load a model and return a `Segmenter` that caches image embeddings.

    `model` is a hub id or a local directory (default: `PROMPTSEG_MODEL`, else
    ``facebook/sam3``). `device` is ``"auto"`` (CUDA, MPS, CPU) or a torch device; `dtype` is
    ``"auto"`` (fp16 on CUDA, bf16 on CPUs with native bf16, else fp32), ``"fp32"``, ``"fp16"`` or ``"bf16"``.
    `cache_dir` is the disk cache (default `PROMPTSEG_CACHE_DIR` or the user cache dir;
    ``False`` for memory only): a folder, or an fsspec URL (``s3://bucket/prefix``) of a store shared
    by several machines, with a local tier in front (see docs/shared-cache.md). `backend` forces a registered backend by name.
    `clip` adds a CLIP scorer (``"ViT-B-32/laion2b_s34b_b79k"``, a path, ``hf-hub:``/``local-dir:``,
    or True for the default) for verification, negatives, label sets and suggestions
    (see `promptseg.clip.load_clip`); None (the default) changes nothing.
    `max_pixels` is the most pixels (height x width) an image file may decode to (default
    `PROMPTSEG_MAX_PIXELS`, else 2**28); larger images are an `ImageError` naming it.
    `prompt_batch_size` is how many prompts one decoder forward takes (None: 1 on the CPU, 8 on a GPU).
    """
    from promptseg.device import prompt_batch_for
    from promptseg.plugins import load_backend

    model = model or default_model()
    _check_load_options(prompt_batch_size, memory_cache_bytes, disk_cache_bytes)
    if max_pixels is not None:
        resolve_max_pixels(max_pixels)  # a bad budget fails before the model loads
    loaded, torch_device, torch_dtype = load_backend(
        "segmentation", str(model), device, dtype, backend, backend_options
    )
    cache = EmbeddingCache(MemoryCache(memory_cache_bytes), open_disk_cache(cache_dir, disk_cache_bytes))
    if prompt_batch_size is None:
        prompt_batch_size = prompt_batch_for(torch_device)
    scorer = None
    if clip not in (None, False):
        from promptseg.clip.scorer import load_clip

        scorer = load_clip(clip, device=torch_device, dtype=torch_dtype, cache_dir=cache_dir)
    return Segmenter(
        loaded, cache, prompt_batch_size=prompt_batch_size, model_name=str(model), clip=scorer, max_pixels=max_pixels
    )


class Segmenter:
    """A loaded model plus its caches. Thread-safe: calls are serialised on one lock.

    Use `segment` for one image and `segment_batch` for many. Every further prompt on an image
    seen before (in this process, or in an earlier one sharing the disk cache) skips the image
    encoder.
    """

    def __init__(
        self,
        backend: Any,
        cache: EmbeddingCache | None = None,
        prompt_batch_size: int = 8,
        model_name: str | None = None,
        clip: Any = None,
        max_pixels: int | None = None,
    ) -> None:
        self.backend = backend
        self.max_pixels = None if max_pixels is None else resolve_max_pixels(max_pixels)
        """Pixel budget of each image this segmenter decodes; None: `PROMPTSEG_MAX_PIXELS` or 2**28."""
        self.clip = clip
        """The `ClipScorer` used for CLIP options and suggestions, or None."""
        self.cache = cache if cache is not None else EmbeddingCache()
        self.text_cache = MemoryCache(256 * 1024**2)
        """Text features per phrase, in host memory (copied to the device per decode: a few KiB)."""
        self.guard = OverflowGuard(backend)
        """Redoes fp16 calls that overflow in a precision with fp32's range (`promptseg.overflow`)."""
        self.prompt_batch_size = prompt_batch_size
        self.model_name = model_name or backend.model_id
        self.stats = EncoderStats()
        self._lock = threading.RLock()

    def close(self) -> None:
        """Free the model, its fp32 twin and the in-memory caches, on the device too (the disk cache
        stays). A closed segmenter refuses further calls; load another with `load_segmenter`."""
        from promptseg.device import release_device_memory

        with self._lock:
            device = self.device
            self.backend = self.guard.backend = ClosedBackend(self.model_name)
            self.guard.release()
            self.cache.release()
            self.text_cache.clear()
            self.clip = None
        release_device_memory(device)

    @property
    def device(self) -> torch.device:
        return self.backend.device

    @property
    def dtype(self) -> torch.dtype:
        return self.backend.dtype

    def describe(self) -> dict[str, str]:
        """What produced a result, for the run records the hosts keep."""
        return {
            "model": self.model_name,
            "model_id": self.backend.model_id,
            "backend": self.backend.name,
            "device": str(self.device),
            "dtype": dtype_name(self.dtype),
            **(self.clip.describe() if self.clip is not None else {}),
        }

    def segment(
        self,
        image: Any,
        prompts: str | Sequence[str],
        options: SegmentOptions | None = None,
        *,
        exemplars: Sequence[Sequence[float]] | None = None,
        exemplar_labels: Sequence[int] | None = None,
        progress: Progress | None = None,
        cancel: CancelCheck | None = None,
        **flat: Any,
    ) -> SegmentationResult:
        """Find every instance of each prompt in `image`.

        `image` is a path, PIL image or array (HxW or HxWxC, uint8/uint16/int/float). `options`
        is a `SegmentOptions`; options given by name (``threshold=0.3, tile="auto"``, see
        `SegmentOptions.describe`) change it or, without it, the defaults:
        `threshold` keeps instances whose score (detection x presence) is above it;
        `mask_threshold` binarises mask probabilities; `min_area` drops smaller masks (pixels);
        `smooth` closes each mask with a disc of that radius; `max_instances` keeps the best N.
        Duplicates are removed by mask-IoU NMS within a prompt (`iou_threshold`) and across
        prompts (`cross_prompt_iou`); ``None`` turns either off. `exemplars` are pixel xyxy
        boxes of example objects (label 1) or counter-examples (label 0).

        Large images: `tile` (pixels, ``"auto"`` or None) splits the image into tiles overlapping
        by `overlap` pixels (default an eighth of the tile), each embedded and cached on its own,
        and stitches objects cut by tile borders (see `promptseg.tiling`). Scientific pixels: `percentiles`
        (low, high) map non-uint8 values to 0..255; `channels` picks up to three channels as RGB.
        `progress(total, advance)` is told the number of tiles (1 untiled) and each one done;
        `cancel()` is checked before each, raising `CancelledError`.

        With a CLIP scorer (``load_segmenter(clip=...)``) every instance gets ``clip_score`` and
        a fused ``score`` (see `promptseg.clip.verify`); `verify` drops instances whose CLIPScore is
        below `clip_threshold` (`promptseg.options.DEFAULT_CLIP_THRESHOLD` when not set); `negative`
        phrases drop instances CLIP finds closer to them than to their prompt by more than
        `negative_margin`; `exclusive` gives each
        object one label of the prompt set. Non-English prompts are mapped to English phrases
        with a multilingual CLIP.
        """
        options = _options(options, flat)
        query = self.query(prompts, options, exemplars, exemplar_labels)  # checked before any pixel is read
        return self._segment_image(image, query, options, progress, cancel)

    def segment_large(
        self,
        image: Any,
        prompts: str | Sequence[str],
        options: SegmentOptions | None = None,
        *,
        axes: str | None = None,
        overview: Sequence[Any] = (),
        exemplars: Sequence[Sequence[float]] | None = None,
        exemplar_labels: Sequence[int] | None = None,
        progress: Progress | None = None,
        cancel: CancelCheck | None = None,
        **flat: Any,
    ) -> SegmentationResult:
        """`segment` for an image larger than memory: each tile's pixels are read when that tile runs.

        `image` is any 2D array numpy-style slicing reads (zarr, dask, ``numpy.memmap``, numpy),
        laid out as `axes` ``"YX"``, ``"YXC"`` or ``"CYX"`` (guessed when None). Non-8-bit pixels
        are scaled with percentiles estimated from a bounded sample: the largest `overview` level
        (coarser copies of the image, e.g. a multiscale pyramid's other levels) of at most
        `promptseg.large_images.SAMPLE_PIXELS` pixels, else windows spread over the image (see
        `promptseg.large_images.sample_limits`). With tiling off (or ``"auto"`` on an image small
        enough to be seen whole) the image is read whole, within the pixel budget. Options are those
        of `segment`; the result is the same small instance form (cropped masks and boxes).
        """
        from promptseg.large_images import LazyRGB, check_layout

        options = _options(options, flat)
        query = self.query(prompts, options, exemplars, exemplar_labels)
        axes = check_layout(image, axes)
        size = (int(image.shape[axes.index("Y")]), int(image.shape[axes.index("X")]))
        whole = resolve_tiling(options.tiling, size, self.backend.input_size) is None
        if whole:  # before any pixel is read
            check_pixel_budget(*size, self.max_pixels, f"of shape {tuple(image.shape)}")
        lazy = LazyRGB.open(image, axes, options.pixels.percentiles, options.pixels.channels, overview)
        return self.segment_rgb(lazy[:, :] if whole else lazy, query, options, progress=progress, cancel=cancel)

    def _segment_image(self, image, query: Query, options: SegmentOptions, progress=None, cancel=None):
        """load -> `segment_rgb`, the result named after its file when it has one."""
        rgb = self.load(image, options.pixels)
        result = self.segment_rgb(rgb, query, options, progress=progress, cancel=cancel)
        result.source = str(image) if isinstance(image, (str, os.PathLike)) else None
        return result

    def query(
        self,
        prompts: str | Sequence[str],
        options: SegmentOptions | None = None,
        exemplars: Sequence[Sequence[float]] | None = None,
        exemplar_labels: Sequence[int] | None = None,
    ) -> Query:
        """The prompts stage: checked prompts and exemplars, and the phrases the model decodes
        (non-English prompts mapped to English by a multilingual CLIP, see `prompt_phrases`)."""
        labels = ensure_prompt_list(prompts)
        boxes, box_labels = check_exemplars(exemplars, exemplar_labels)
        mapping = prompt_phrases(self.clip, labels, (options or SegmentOptions()).clip)
        return Query(labels, [mapping.get(p, p) for p in labels], mapping, boxes, box_labels)

    def load(self, image: Any, pixels: PixelOptions | None = None) -> np.ndarray:
        """The load stage: ``(H, W, 3)`` uint8 RGB of `image`, within this segmenter's pixel budget."""
        pixels = pixels or PixelOptions()
        return load_image(image, percentiles=pixels.percentiles, channels=pixels.channels, max_pixels=self.max_pixels)

    def segment_rgb(
        self,
        rgb: np.ndarray,
        query: Query,
        options: SegmentOptions | None = None,
        *,
        progress: Progress | None = None,
        cancel: CancelCheck | None = None,
    ) -> SegmentationResult:
        """Every stage after loading, for RGB pixels (`load`) and a `query`: embed (cached) ->
        decode -> post-process (whole, or per tile and stitched) -> CLIP checks -> result."""
        options = options or SegmentOptions()
        cleanup = cleanup_for_clip(options.cleanup, options.clip) if self.clip is not None else options.cleanup
        grid = resolve_tiling(options.tiling, rgb.shape[:2], self.backend.input_size)

        def detect(pixels: np.ndarray, boxes: np.ndarray | None, box_labels: np.ndarray | None):
            return self.detect(pixels, query.phrases, options.decoding, boxes, box_labels)

        if grid is None:
            instances, origin, info = _segment_whole(rgb, detect, cleanup, query, progress, cancel)
        else:
            instances, origin, info = segment_tiled(
                rgb, *grid, detect, cleanup, exemplars=query.exemplars, exemplar_labels=query.exemplar_labels,
                progress=progress, cancel=cancel,
            )
        result = SegmentationResult(
            instances=instances, image_size=rgb.shape[:2], prompts=list(query.phrases),
            embedding_source=origin, info=info,
        )
        return check_with_clip(self.clip, rgb, result, query.labels, query.mapping, options.clip)

    def detect(
        self,
        rgb: np.ndarray,
        phrases: Sequence[str],
        decoding: DecodingOptions | None = None,
        exemplars: np.ndarray | None = None,
        exemplar_labels: np.ndarray | None = None,
    ) -> tuple[list[Instance], str]:
        """The embed and decode stages for one image (or tile): its instances before post-processing,
        in its own pixel coordinates, and where its embedding came from (memory, disk or computed).

        `exemplars` are checked pixel boxes (see `check_exemplars`). Serialised on the segmenter's lock.
        """
        decoding = decoding or DecodingOptions()
        with self._lock:
            features, origin = self.embed(rgb)
            return self._decode(features, list(phrases), decoding, rgb.shape[:2], exemplars, exemplar_labels), origin

    def segment_object(
        self,
        image: Any,
        points: Sequence[Sequence[float]] | None = None,
        point_labels: Sequence[int] | None = None,
        box: Sequence[float] | None = None,
        mask: Instance | np.ndarray | None = None,
        *,
        multimask: bool | None = None,
        options: SegmentOptions | None = None,
        **flat: Any,
    ) -> SegmentationResult:
        """One object's mask from visual prompts (SAM 3's tracker head, SAM 2 style).

        `points` are pixel ``(x, y)`` with `point_labels` 1 (on the object, the default) or 0 (not
        on it); `box` is a pixel ``(x0, y0, x1, y1)``; `mask` is a previous mask to refine (an
        `Instance` of a result on this image, or a boolean ``(H, W)`` array). At least one is needed.
        `multimask` asks SAM for three candidates (None: only for one point alone, SAM's rule for an
        ambiguous click). The result holds the candidate with the best predicted IoU (its `score`);
        the others are `result.alternatives`, best first. The image embedding is the one text
        prompts use: an image seen by either runs no image encoder again. Masks are cut at
        `mask_threshold` (`options` or by name) and cropped like every other result.

        Large images: with tiling on (`tile`, ``"auto"`` by the same rule as `segment`) the prompts
        are answered from one window of the image at the model's resolution: the grid tile holding
        them all (its embedding is the one text prompts on that tile use), else a tile-sized window
        placed over them, else the grid tiles they touch (see `promptseg.visual_tiling`); the
        instances are in image pixels and ``result.info`` names the window.
        Needs a checkpoint with the tracker (the hub's ``facebook/sam3``): `ModelLoadError` otherwise.
        """
        from promptseg.visual import check_inside, check_visual_prompts

        options = _options(options, flat)
        prompts = check_visual_prompts(points, point_labels, box, mask)  # before any pixel is read
        self.require_visual_prompts()
        rgb = self.load(image, options.pixels)
        check_inside(prompts, rgb.shape[:2])
        if multimask is None:
            multimask = prompts.points is not None and len(prompts.points) == 1 and prompts.box is None and mask is None
        window, info = self._object_window(prompts, rgb.shape[:2], options)
        if window is None:
            found, origin = self._decode_object(rgb, prompts, bool(multimask), options.decoding.mask_threshold)
        else:
            from promptseg.visual_tiling import prompts_in_window, to_image

            local = prompts_in_window(prompts, window, rgb.shape[:2])
            found, origin = self._decode_object(window.pixels(rgb), local, bool(multimask), options.decoding.mask_threshold)
            found = [to_image(inst, window) for inst in found]
        return SegmentationResult(
            instances=found[:1], image_size=rgb.shape[:2], prompts=[], embedding_source=origin, info=info,
            source=str(image) if isinstance(image, (str, os.PathLike)) else None, alternatives=found[1:],
        )

    def _object_window(self, prompts, image_size, options: SegmentOptions):
        """The window of a tiled image that answers `prompts` and what the result says of it, or
        ``(None, {})`` untiled (tiling off, the image too small for ``"auto"``, or only an empty mask)."""
        from promptseg.visual_tiling import object_window, prompt_extent

        grid = resolve_tiling(options.tiling, image_size, self.backend.input_size)
        extent = None if grid is None else prompt_extent(prompts, image_size)
        if extent is None:
            return None, {}
        window = object_window(extent, image_size, *grid)
        logger.debug("Visual prompts over %s answered from the %s window %s", extent, window.kind, window.box)
        return window, {"tile": grid[0], "overlap": grid[1], "window": window.box, "window_kind": window.kind}

    def _decode_object(self, rgb: np.ndarray, prompts, multimask: bool, mask_threshold: float):
        """embed (cached) -> the tracker head -> instances in `rgb`'s pixels, best first; and the embedding's origin."""
        from promptseg.visual import object_instances, to_model_input

        inputs = to_model_input(prompts, rgb.shape[:2], self.backend.input_size)
        with self._lock:
            features, origin = self.embed(rgb)
            logits, ious = self.guard.run(
                "the visual prompt decoder", features, lambda backend: backend.decode_object(features, *inputs, multimask)
            )
            self.stats.decoder_runs += 1
        return object_instances(logits, ious, rgb.shape[:2], mask_threshold), origin

    @property
    def supports_visual_prompts(self) -> bool:
        """Whether the model has SAM 3's visual-prompt head (points, boxes, masks): the hub's checkpoint has."""
        return bool(getattr(self.backend, "visual_prompts", False))

    def require_visual_prompts(self) -> None:
        """Raise `ModelLoadError` saying what to load when the model has no visual-prompt head.

        Hosts call it before a run of box or click prompts, so the run stops before any work.
        """
        if not self.supports_visual_prompts:
            fix = getattr(self.backend, "visual_prompts_help", None) or (
                "Points, boxes and masks need SAM 3's tracker, which the full facebook/sam3 checkpoint holds (a "
                "Sam3Model save holds the text detector only). Load facebook/sam3, or a directory saved from "
                "Sam3VideoModel."
            )
            raise ModelLoadError(f"{self.model_name} ({self.backend.name} backend) has no visual-prompt head. {fix}")

    @property
    def supports_video(self) -> bool:
        """Whether the model can track objects through video frames (`segment_video`): the hub's
        facebook/sam3 can, through the transformers backend."""
        return bool(getattr(self.backend, "video", False))

    def require_video(self) -> None:
        """Raise `ModelLoadError` saying what to load when the model cannot track through frames.

        Hosts call it before a run over videos, so the run stops before any frame is read.
        """
        if not self.supports_video:
            raise ModelLoadError(getattr(self.backend, "video_help", None) or (
                f"The {self.backend.name} backend cannot track objects through video frames: load facebook/sam3 "
                "with the transformers backend (the default) to segment videos."
            ))

    def refine(
        self,
        target: SegmentationResult | Instance,
        points: Sequence[Sequence[float]] | None = None,
        point_labels: Sequence[int] | None = None,
        box: Sequence[float] | None = None,
        *,
        image: Any = None,
        index: int | None = None,
        options: SegmentOptions | None = None,
        **flat: Any,
    ) -> SegmentationResult | Instance:
        """Correct one object of an earlier result with clicks (or a box): add area with positive
        points (label 1), cut it with negative ones (label 0, e.g. to split two merged objects).

        The object's mask is SAM's mask prompt and the points refine it (`segment_object`).
        A `SegmentationResult` is changed in place and returned: the instance at `index` (default:
        the one under the first positive point, or under the first point when all are negative) gets the new mask and box and keeps its position,
        label, phrase and score, so ids stay stable; a positive point on no instance adds the missed
        object at the end (label ``"object"``). An `Instance` (immutable) gives a new refined
        `Instance`. `image` is the image the result came from (default: the file it was read from);
        its embedding is cached, so a refinement runs no image encoder. A tiled result is refined
        with its own `tile` and `overlap` unless `options` or ``tile=``/``overlap=`` say otherwise:
        the click is answered from a tile of the same grid (see `segment_object`).
        """
        from promptseg.visual import check_visual_prompts

        result = target if isinstance(target, SegmentationResult) else None
        if result is None and not isinstance(target, Instance):
            raise OptionError(f"refine takes a SegmentationResult or one of its Instances, got {type(target).__name__}.")
        image = image if image is not None else getattr(result, "source", None)
        if image is None:
            raise OptionError(
                "refine needs the image the result came from: pass image=... (the result was not read from a file)."
            )
        prompts = check_visual_prompts(points, point_labels, box)
        if result is not None and options is None and not {"tile", "overlap"} & set(flat) and "tile" in result.info:
            flat = {**flat, "tile": result.info["tile"], "overlap": result.info["overlap"]}  # the result's tiles
        if result is None:
            return self._refined(target, image, points, point_labels, box, options, flat)
        if index is None:
            index = _instance_under(result, prompts.points, prompts.point_labels)
            positive = prompts.box is not None or (prompts.point_labels is not None and (prompts.point_labels == 1).any())
            if index is None and not positive:
                raise OptionError(
                    "Only negative clicks, on no instance: nothing to cut from or to add. Click inside the instance "
                    "to correct, or pass index= to name it."
                )
        elif not _whole(index) or not 0 <= index < len(result.instances):
            raise OptionError(f"index must be the position of an instance (0..{len(result.instances) - 1}), got {index!r}.")
        if index is None:
            found = self.segment_object(image, points, point_labels, box, options=options, **flat)
            result.instances.extend(found.instances)  # the missed object, labelled "object"
        else:
            result.instances[index] = self._refined(
                result.instances[index], image, points, point_labels, box, options, flat
            )
        return result

    def _refined(self, instance: Instance, image, points, point_labels, box, options, flat) -> Instance:
        """`instance` with the mask SAM gives for its mask plus the new prompts (unchanged, with a
        warning, when the prompts leave no mask)."""
        found = self.segment_object(
            image, points, point_labels, box, mask=instance, multimask=False, options=options, **flat
        )
        if not found.instances:
            logger.warning("The refinement left no mask; %s is kept as it was.", instance.label)
            return instance
        new = found.instances[0]
        extra = {**instance.extra, "refined": True, "predicted_iou": new.extra["predicted_iou"]}
        return dataclasses.replace(instance, box=new.box, mask=new.mask, extra=extra)

    def suggest_prompts(self, image: Any, vocabulary: Any = None, k: int = 10) -> list[tuple[str, float]]:
        """The `k` phrases of `vocabulary` (default: the shipped COCO + LVIS names, or a file or
        list) CLIP finds most likely in `image`, as ``(phrase, probability)``; needs ``clip=``."""
        if self.clip is None:
            raise OptionError("suggest_prompts needs a CLIP model: load_segmenter(..., clip=True) or --clip MODEL.")
        from promptseg.clip.suggest import suggest_prompts

        return suggest_prompts(self.clip, load_image(image, max_pixels=self.max_pixels), vocabulary, k)

    def segment_batch(
        self,
        images: Iterable[Any],
        prompts: str | Sequence[str],
        *,
        progress: Progress | None = None,
        cancel: CancelCheck | None = None,
        skip_errors: bool = True,
        options: SegmentOptions | None = None,
        exemplars: Sequence[Sequence[float]] | None = None,
        exemplar_labels: Sequence[int] | None = None,
        **flat: Any,
    ) -> Iterator[SegmentationResult]:
        """Segment many images with the same prompts, yielding one result per image in order.

        With `skip_errors` (the default) an image that cannot be read (missing, corrupt, over the
        pixel budget...) yields a result whose `error` names the problem and whose `instances` is
        empty, and the run goes on; setup errors (bad prompt or option) are raised at once.
        `progress(total, advance)` and `cancel()` let hosts show progress and stop between images.
        `options` and the options given by name are those of `segment`, checked once before any image.
        """
        options = _options(options, flat)
        query = self.query(prompts, options, exemplars, exemplar_labels)
        images = list(images) if not isinstance(images, list) else images
        if progress:
            progress(len(images), 0)
        for image in images:
            if cancel is not None and cancel():
                raise CancelledError("Segmentation was cancelled.")
            try:
                yield self._segment_image(image, query, options)
            except ImageError as exc:
                if not skip_errors:
                    raise
                logger.warning("Skipping %s: %s", image if isinstance(image, (str, os.PathLike)) else "image", exc)
                yield SegmentationResult(
                    instances=[], image_size=(0, 0), prompts=list(query.labels),
                    source=str(image) if isinstance(image, (str, os.PathLike)) else None,
                    error=str(exc),
                )
            if progress:
                progress(len(images), 1)

    def segment_stack(
        self,
        stack: Any,
        prompts: str | Sequence[str],
        options: SegmentOptions | None = None,
        *,
        axes: str | None = None,
        link: bool | float = False,
        normalize: str = "stack",
        exemplars: Sequence[Sequence[float]] | None = None,
        exemplar_labels: Sequence[int] | None = None,
        progress: Progress | None = None,
        cancel: CancelCheck | None = None,
        **flat: Any,
    ) -> StackResult:
        """Segment each slice of a Z-stack or time series; optionally link instances into 3D objects.

        `stack` is an array, a multi-page or OME-TIFF path, or a list of images (one per slice).
        `axes` names the array's layout, e.g. ``"ZYX"``, ``"TYXC"``, ``"ZCYX"`` (guessed when
        None; TIFF files use their recorded axes). `link` (True, or a mask IoU in (0, 1]; True
        means 0.3) gives an instance the id of the same-label instance it overlaps most in the
        previous slice. `normalize` ``"stack"`` scales intensities with one percentile range for
        the whole stack, ``"slice"`` per slice. `options` and the options given by name
        (`percentiles`, `channels`, `tile`, `threshold`, ...) are those of `segment`.
        `progress(total, advance)` counts slices; `cancel()` is checked before each slice.
        Returns a `StackResult` (``.slices``, ``.object_ids``, ``.to_label_volume()``).
        """
        options = _options(options, flat)
        query = self.query(prompts, options, exemplars, exemplar_labels)

        def segment_slice(rgb: np.ndarray) -> SegmentationResult:
            return self.segment_rgb(rgb, query, options)

        return segment_stack(
            stack, query.labels, segment_slice, options.pixels, axes=axes, link=link, normalize=normalize,
            max_pixels=self.max_pixels, progress=progress, cancel=cancel,
        )

    def segment_video(
        self,
        video: Any,
        prompts: str | Sequence[str],
        *,
        frames: slice | tuple[int | None, int | None] | None = None,
        stride: int = 1,
        new_threshold: float | None = None,
        options: SegmentOptions | None = None,
        progress: Progress | None = None,
        cancel: CancelCheck | None = None,
        **flat: Any,
    ) -> Any:
        """Follow every object each prompt names through a video with SAM 3's video model.

        `video` is a video file (PyAV), a folder of frames (natural order), a TIFF/OME-TIFF time
        series or a ``(T, H, W[, C])`` array (numpy or lazy); frames are read one at a time.
        `frames` (a slice or ``(start, stop)``) and `stride` pick which frames are segmented.
        `threshold`, `mask_threshold`, `percentiles` and `channels` apply (by name or in `options`);
        `new_threshold` is the score a detection needs to start a new object (None: 0.7 at the default
        threshold 0.5, the model's ratio at others).
        Each frame's image embedding goes through this segmenter's cache, so another prompt on the
        same video runs no image encoder. `progress(total, advance)` counts frames; `cancel()` is
        checked before each. Returns a `promptseg.video.VideoResult` (stable object ids per frame,
        ``tracks()``, ``to_label_volume()``, PNG, TIFF and tracking JSON exports).
        """
        from promptseg.video import open_frames, segment_frames

        options = _options(options, flat)
        query = self.query(prompts, options)
        self.require_video()  # before any frame is read
        source = open_frames(video, options.pixels, self.max_pixels)
        return segment_frames(
            source, self.backend, self.embed, query.labels, query.phrases, options, frames=frames, stride=stride,
            new_threshold=_unit_or_none(new_threshold), lock=self._lock, progress=progress, cancel=cancel,
        )

    def embed(self, rgb: np.ndarray) -> tuple[dict[str, torch.Tensor], str]:
        """The image embedding of RGB pixels and where it came from (memory, disk or computed)."""
        pixels = pixel_hash(rgb)
        with self._lock:
            encoder = self.guard.encoder_for(pixels)  # the fp32-range twin for images that overflow fp16
            key, key_parts = self._embedding_key(pixels, encoder.dtype)
            spec = getattr(encoder, "embedding_spec", None)  # optional: what a disk entry must hold
            features, origin = self.cache.get(key, key_parts, self.device, spec(rgb.shape[:2]) if spec else None)
            if features is not None:
                return features, origin
            features = self.guard.encode(rgb, pixels)
            self.stats.image_encoder_runs += 1
            actual = self.guard.for_features(features)
            if actual is not encoder:  # overflowed just now: store it under the twin's precision
                key, key_parts = self._embedding_key(pixels, actual.dtype)
            features = self.cache.put(key, features, key_parts)  # as stored, so a later hit decodes alike
            return features, "computed"

    def is_cached(self, image: Any) -> bool:
        """Whether `image`'s embedding is in the memory or disk cache (does not compute it)."""
        key, _ = self._embedding_key(pixel_hash(load_image(image, max_pixels=self.max_pixels)), self.dtype)
        if self.cache.memory.get(key) is not None:
            return True
        return self.cache.disk is not None and self.cache.disk.contains(key)

    def _embedding_key(self, pixels: str, dtype: torch.dtype) -> tuple[str, dict[str, str]]:
        """Everything that changes an embedding: backend, weights, precision, the kind of device (a GPU's
        kernels round differently from a CPU's, so a shared cache keeps them apart), input size, pixels."""
        parts = {
            "backend": self.backend.name,
            "model": self.backend.model_id,
            "dtype": dtype_name(dtype),
            "device": self.device.type,
            "input_size": "x".join(map(str, self.backend.input_size)),
            "pixels": pixels,
        }
        return make_key(**parts), parts

    def text_embeddings(self, phrases: list[str]) -> list[dict[str, torch.Tensor]]:
        """Text embeddings per phrase, encoding only the phrases not seen before."""
        with self._lock:
            prefix = f"{self.backend.name}|{self.backend.model_id}|{dtype_name(self.dtype)}|{self.device.type}|"
            missing = [p for p in phrases if self.text_cache.get(prefix + p) is None]
            found = {}
            if missing:
                for phrase, tensors in zip(missing, self.backend.encode_text(missing)):
                    found[phrase] = {name: owned(t) for name, t in tensors.items()}  # not the batch's storage
                    self.text_cache.put(prefix + phrase, found[phrase])
                self.stats.text_encoder_runs += 1
            texts = [found.get(p) or self.text_cache.get(prefix + p) or self.backend.encode_text([p])[0] for p in phrases]
            return [on_device(t, self.device) for t in texts]

    def _decode(self, features, phrases, decoding: DecodingOptions, image_size, exemplars, exemplar_labels):
        boxes = labels = None
        if exemplars is not None and len(exemplars):
            boxes, labels = _normalise_exemplars(exemplars, exemplar_labels, image_size)
        texts = self.text_embeddings(phrases)
        instances = []
        for start in range(0, len(phrases), self.prompt_batch_size):
            chunk = phrases[start : start + self.prompt_batch_size]
            batch = texts[start : start + self.prompt_batch_size]
            detections = self.guard.run(
                "the decoder", features,
                lambda backend, batch=batch: backend.decode(features, batch, decoding.threshold, boxes, labels),
            )
            self.stats.decoder_runs += 1
            for phrase, found in zip(chunk, detections):
                instances += instances_from_probs(
                    found.mask_probs, found.scores, found.boxes, phrase, image_size, decoding.mask_threshold
                )
        return instances


class ClosedBackend:
    """Stands in for the model of a closed segmenter: every use says what happened and what to do."""

    def __init__(self, model_name: str) -> None:
        self._model_name = model_name

    def __getattr__(self, name: str) -> Any:
        raise ModelLoadError(
            f"This segmenter ({self._model_name}) was closed and its model freed: load it again with "
            "promptseg.load_segmenter (or shared_segmenter)."
        )


@dataclass(frozen=True)
class Query:
    """What one call asks for, checked before any pixel is read (see `Segmenter.query`)."""

    labels: list[str]
    """The prompts as the user gave them: the labels of the result."""
    phrases: list[str]
    """What the model decodes: each prompt, or its English phrase when CLIP mapped it."""
    mapping: dict[str, str]
    """prompt -> English phrase, for the prompts that were mapped."""
    exemplars: np.ndarray | None = None
    """``(N, 4)`` pixel boxes of example objects, or None."""
    exemplar_labels: np.ndarray | None = None
    """``(N,)`` 1 (positive) or 0 (negative) per box, or None."""


def _segment_whole(rgb, detect, cleanup: CleanupOptions, query: Query, progress, cancel):
    """The untiled path: one `detect` of the whole image, then `postprocess`."""
    if cancel is not None and cancel():
        raise CancelledError("Segmentation was cancelled.")
    if progress:
        progress(1, 0)
    raw, origin = detect(rgb, query.exemplars, query.exemplar_labels)
    if progress:
        progress(1, 1)
    return postprocess(raw, rgb.shape[:2], cleanup), origin, {}


def _instance_under(result: SegmentationResult, points: np.ndarray | None, labels: np.ndarray | None) -> int | None:
    """The position of the instance drawn under the first positive point (else the first point),
    the top one where instances overlap as `to_label_image` draws them; None on background.

    Reads each instance's compact mask at that pixel: no image-sized label array is made."""
    if points is None:
        return None
    x, y = points[labels == 1][0] if (labels == 1).any() else points[0]
    height, width = result.image_size
    row, col = min(int(y), height - 1), min(int(x), width - 1)
    under = [
        index for index, inst in enumerate(result.instances)
        if inst.box[0] <= col < inst.box[2] and inst.box[1] <= row < inst.box[3]
        and inst.mask[row - inst.box[1], col - inst.box[0]]
    ]
    # to_label_image draws by rising score, ties in order: the last drawn is on top
    return max(under, key=lambda index: (result.instances[index].score, index)) if under else None


def _normalise_exemplars(boxes: np.ndarray, labels: np.ndarray, image_size) -> tuple[torch.Tensor, torch.Tensor]:
    """Checked pixel boxes (see `check_exemplars`) -> normalised xyxy inside the image, and labels."""
    height, width = image_size
    scale = torch.tensor([width, height, width, height], dtype=torch.float32)
    normalised = (torch.as_tensor(np.asarray(boxes), dtype=torch.float32) / scale).clamp(0, 1)
    return normalised, torch.as_tensor(np.asarray(labels), dtype=torch.long)


EXEMPLAR_FORM = "pixel corner boxes (x0, y0, x1, y1) with x1 > x0 and y1 > y0, e.g. exemplars=[(40, 30, 110, 80)]"


def check_exemplars(
    exemplars: Any, exemplar_labels: Any = None
) -> tuple[np.ndarray, np.ndarray] | tuple[None, None]:
    """Check visual exemplars once, before any work, and return them as ``(N, 4)`` float pixel
    boxes and ``(N,)`` labels (1 positive, 0 negative; all 1 when not given), or ``(None, None)``.

    Raises `OptionError` naming what is wrong (shape, non-numbers, NaN or infinite coordinates,
    empty or reversed boxes, label count or values) and the expected form.
    """
    if exemplars is None or _empty(exemplars):
        if exemplar_labels is not None and not _empty(exemplar_labels):
            raise OptionError(
                "exemplar_labels were given without exemplars: pass exemplars as "
                f"{EXEMPLAR_FORM} (one label each), or leave exemplar_labels out."
            )
        return None, None
    boxes = _numbers(exemplars, "exemplars", EXEMPLAR_FORM)
    if boxes.shape == (4,):
        boxes = boxes[None]  # one box given flat
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise OptionError(
            f"exemplars must be four numbers per box, got an array of shape {boxes.shape}: give {EXEMPLAR_FORM}."
        )
    for index, box in enumerate(boxes):
        if not np.isfinite(box).all():
            raise OptionError(f"Exemplar box {index} {box.tolist()} has a NaN or infinite coordinate: give {EXEMPLAR_FORM}.")
        if box[2] <= box[0] or box[3] <= box[1]:
            raise OptionError(
                f"Exemplar box {index} {box.tolist()} is empty or reversed: boxes are {EXEMPLAR_FORM} "
                "(corners, not width and height)."
            )
    if exemplar_labels is None:
        return boxes, np.ones(len(boxes), dtype=np.int64)
    labels = _numbers(exemplar_labels, "exemplar_labels", "1 (positive) or 0 (negative) per box")
    if labels.shape != (len(boxes),):
        raise OptionError(
            f"exemplar_labels has shape {labels.shape} for {len(boxes)} exemplar box(es): give one 1 (positive) "
            "or 0 (negative) per box, or leave it out to mark every box positive."
        )
    if not np.isin(labels, (0, 1)).all():
        raise OptionError(
            f"exemplar_labels must be 1 (positive) or 0 (negative), got {labels.tolist()}."
        )
    return boxes, labels.astype(np.int64)


def _numbers(value: Any, name: str, form: str) -> np.ndarray:
    """`value` as a float array, or an `OptionError` when it holds anything but real numbers."""
    try:
        array = np.asarray(value)
        numeric = array.dtype.kind in "biuf"
        array = array.astype(np.float64) if numeric else array
    except (TypeError, ValueError) as exc:  # ragged nesting, objects that are not numbers
        raise OptionError(f"{name} must be {form}; got {_short(value)} ({exc}).") from None
    if not numeric:
        raise OptionError(f"{name} must hold numbers only: give {form}; got {_short(value)}.")
    return array


def _empty(value: Any) -> bool:
    try:
        return len(value) == 0
    except TypeError:  # a scalar: not empty, and refused later as the wrong shape
        return False


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_load_options(prompt_batch_size: Any, memory_cache_bytes: Any, disk_cache_bytes: Any) -> None:
    """Raise `OptionError` for a bad `load_segmenter` size option, before the model loads."""
    if prompt_batch_size is not None and (not _whole(prompt_batch_size) or prompt_batch_size < 1):
        raise OptionError(f"prompt_batch_size must be a whole number >= 1 (8 is usual), got {prompt_batch_size!r}.")
    for name, value in (("memory_cache_bytes", memory_cache_bytes), ("disk_cache_bytes", disk_cache_bytes)):
        if not _whole(value) or value < 0:
            raise OptionError(
                f"{name} must be a whole number of bytes >= 0, got {value!r}"
                + (" (use cache_dir=False to turn the disk cache off)." if name == "disk_cache_bytes" else ".")
            )


def _unit_or_none(value: Any) -> float | None:
    """A score threshold in [0, 1], or None; else an `OptionError`."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value <= 1:
        raise OptionError(f"new_threshold must be a number between 0 and 1 (or None for the model's own), got {value!r}.")
    return float(value)


def _whole(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def check_options(**flat: Any) -> SegmentOptions:
    """The `SegmentOptions` of flat option names, or an `OptionError` for an unknown name or a value
    out of range; hosts validate forms with it before a run (see `SegmentOptions.from_flat`)."""
    return SegmentOptions.from_flat(**flat)


def _options(options: Any, flat: dict[str, Any]) -> SegmentOptions:
    """`segment`'s options: a `SegmentOptions` (or dict, or None) with the options given by name on top.

    A number where the options go is the threshold of the old positional form
    ``segment(image, prompts, 0.3)``: it still works, with a `DeprecationWarning`.
    """
    if isinstance(options, numbers.Real) and not isinstance(options, bool):
        warnings.warn(
            "segment(image, prompts, threshold) with the threshold by position is deprecated: pass "
            "threshold=... by name, or a SegmentOptions.", DeprecationWarning, stacklevel=3,
        )
        options, flat = None, {"threshold": options, **flat}
    return resolve_options(options, flat)


__all__ = [
    "DEFAULT_MODEL", "Query", "SegmentOptions", "Segmenter", "check_exemplars", "check_options", "default_model",
    "load_segmenter",
]
