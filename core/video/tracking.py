"""Run SAM 3's video model over a stream of frames: frame -> cached embedding -> tracker -> compact instances.

Data moves one way, one frame at a time: the `FrameSource` reads a frame, the embedding comes from
the segmenter's cache (memory, disk, else the image encoder: the `embed` callable), the backend's
`VideoTracker` associates detections with tracked objects, and `frame_instances` turns the
tracker's low-resolution mask logits into `Instance` objects cropped to their box, post-processed
as transformers' ``Sam3VideoProcessor.postprocess_outputs`` does. Only the tracker's own state and
those compact instances outlive a frame.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable

import numpy as np
import torch

from promptseg.errors import CancelledError, ImageError, OptionError
from promptseg.options import CleanupOptions, ClipOptions, SegmentOptions, TilingOptions
from promptseg.results import Instance, SegmentationResult
from promptseg.video.frames import FrameSource, frame_range
from promptseg.video.results import VideoResult

logger = logging.getLogger(__name__)


def segment_frames(
    source: FrameSource,
    backend,
    embed: Callable,
    labels: list[str],
    phrases: list[str],
    options: SegmentOptions,
    *,
    frames=None,
    stride: int = 1,
    new_threshold: float | None = None,
    lock: threading.RLock | None = None,
    progress=None,
    cancel=None,
) -> VideoResult:
    """Track `phrases` through the chosen frames of `source`; see the module docstring.

    `new_threshold` is the score a detection needs to start a new object (None: the model's own
    ratio to `threshold`, 0.7 at 0.5). `embed(rgb)` returns ``(embedding, origin)`` through the cache; `lock` serialises each frame's
    model calls with the segmenter's other work; `progress(total, advance)` counts frames and
    `cancel()` is checked before each.
    """
    check_video_options(options)
    indices = frame_range(source.length, frames, stride)
    lock = lock or threading.RLock()
    if progress:
        progress(len(indices), 0)
    results, numbers, origins = [], [], set()
    tracker = frame_size = None
    for number, rgb in source.frames(indices):
        if cancel is not None and cancel():
            raise CancelledError("Video segmentation was cancelled.")
        if frame_size is None:
            frame_size = rgb.shape[:2]
            with lock:
                tracker = backend.video_tracker(phrases, frame_size, options.decoding.threshold, new_threshold)
        elif rgb.shape[:2] != frame_size:
            raise ImageError(
                f"Frame {number} of {source.name or 'the video'} is {rgb.shape[1]}x{rgb.shape[0]} pixels where the "
                f"first is {frame_size[1]}x{frame_size[0]}: every frame of a video must have one size; resize the "
                "frames alike or split the video where the size changes."
            )
        with lock:
            embedding, origin = embed(rgb)
            tracked = tracker.step(embedding)
        origins.add(origin)
        instances = frame_instances(tracked, frame_size, labels, phrases, options.decoding.mask_threshold, number)
        results.append(SegmentationResult(instances=instances, image_size=frame_size, prompts=list(labels),
                                          embedding_source=origin, info={"frame": number}))
        numbers.append(number)
        if progress:
            progress(len(indices), 1)
    origin = origins.pop() if len(origins) == 1 else "mixed"
    return VideoResult(results, numbers, tuple(frame_size), list(labels), source=source.name,
                       info={"embedding_source": origin, "stride": stride, "frames": len(numbers)})


def check_video_options(options: SegmentOptions) -> None:
    """Refuse options a video does not use (clean-up, tiling, CLIP), rather than ignore them."""
    unused = [
        name for group, default in ((options.cleanup, CleanupOptions()), (options.tiling, TilingOptions()),
                                    (options.clip, ClipOptions()))
        for name, value in vars(group).items() if value != vars(default)[name]
    ]
    if unused:
        raise OptionError(
            f"{', '.join(unused)} do(es) not apply to videos: SAM 3's video model keeps and de-duplicates objects "
            "itself. Leave them out; threshold, mask_threshold, percentiles and channels apply."
        )


def frame_instances(tracked, frame_size, labels, phrases, mask_threshold: float, number: int) -> list[Instance]:
    """One frame's objects as `Instance` objects: masks upsampled to the frame, cut at `mask_threshold`,
    objects transformers hides left out, one object per pixel within each prompt (the one the tracker
    trusts most), empty masks dropped, each mask cropped to its box."""
    if not tracked.object_ids:
        return []
    height, width = frame_size
    cut = math.log(mask_threshold / (1 - mask_threshold))
    masks = torch.stack([  # one object at a time: a frame-sized float map each, not one per object at once
        torch.nn.functional.interpolate(logits[None, None], size=(height, width), mode="bilinear",
                                        align_corners=False)[0, 0] > cut
        for logits in tracked.mask_logits
    ])
    keep = [i for i, obj in enumerate(tracked.object_ids) if obj not in tracked.hidden and bool(masks[i].any())]
    masks = _one_object_per_pixel(masks[keep], [tracked.tracker_scores[i] for i in keep],
                                  [tracked.prompt_ids[i] for i in keep])
    instances = []
    for row, i in enumerate(keep):
        mask = masks[row].numpy()
        instance = _cropped(mask, labels[tracked.prompt_ids[i]], phrases[tracked.prompt_ids[i]],
                            tracked.scores[i], {"object_id": tracked.object_ids[i], "frame": number,
                                                "tracker_score": tracked.tracker_scores[i]})
        if instance is not None:
            instances.append(instance)
    return instances


def _one_object_per_pixel(masks: torch.Tensor, tracker_scores: list[float], prompt_ids: list[int]) -> torch.Tensor:
    """Within each prompt, a pixel covered by several objects goes to the one with the highest tracker
    score, and to none when that score is not above 0 (transformers' object-wise non-overlap rule, which
    applies when the frame has two objects or more)."""
    if len(masks) < 2:
        return masks
    scores = torch.tensor(tracker_scores, dtype=torch.float32)
    prompts = torch.tensor(prompt_ids)
    kept = masks.clone()
    for prompt in prompts.unique():
        rows = torch.nonzero(prompts == prompt, as_tuple=True)[0]  # an object alone in its prompt too
        claims = torch.where(masks[rows], scores[rows, None, None], torch.tensor(-10.0))
        winner = claims.argmax(dim=0, keepdim=True) == torch.arange(len(rows))[:, None, None]
        kept[rows] = masks[rows] & winner & (claims > 0)
    return kept


def _cropped(mask: np.ndarray, label: str, phrase: str, score: float, extra: dict) -> Instance | None:
    rows, cols = np.any(mask, axis=1), np.any(mask, axis=0)
    if not rows.any():
        return None
    y0, y1 = np.flatnonzero(rows)[[0, -1]]
    x0, x1 = np.flatnonzero(cols)[[0, -1]]
    box = (int(x0), int(y0), int(x1) + 1, int(y1) + 1)
    return Instance(label=label, score=float(score), box=box, mask=mask[y0 : y1 + 1, x0 : x1 + 1].copy(),
                    phrase=phrase, extra=extra)
