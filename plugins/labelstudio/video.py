"""A `VideoResult` as Label Studio ``videorectangle`` tracks: one region per object, keyframes with boxes.

Label Studio numbers a video's frames from 1 at its ``<Video frameRate>`` (24 unless the config
says otherwise, a number or ``$field`` of the task): frame ``f`` is shown at ``(f - 1) / frameRate``
seconds. Each segmented frame of the file (at the file's own frame rate) becomes the keyframe of the
Label Studio frame shown at its time, so the boxes line up with the picture whatever the two rates
are; when they are equal, keyframe ``f`` is the file's frame ``f - 1``. Boxes are the tight mask
boxes in percent of the frame. Between enabled keyframes Label Studio interpolates the box; a
keyframe with ``enabled: false`` is the object's last before it is gone (not seen on the next
segmented frame, or the end of a track that stops before the video does). An object seen again
continues the same region. `VideoSettings` are a project's video extra params.
"""

from __future__ import annotations

import math
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from promptseg.errors import ImageError, OptionError
from promptseg.results import Instance
from promptseg.video import VideoResult
from promptseg_labelstudio.labeling import Output
from promptseg_labelstudio.regions import rectangle_value

DEFAULT_FRAME_RATE = 24.0  # Label Studio's <Video frameRate> default
VIDEO_PARAMS = ("stride", "frames", "new_threshold")
FRAMES_HELP = ('[start, stop] (file frames from 0, stop exclusive, null for the end) or "start:stop", '
               'e.g. [0, 300] or "0:300"')


@dataclass(frozen=True)
class VideoSettings:
    """A project's video extra params: every `stride`-th frame of `frames` (``(start, stop)``, None:
    all) is segmented; `new_threshold` is the score a detection needs to start a new object."""

    stride: int = 1
    frames: tuple[int, int | None] | None = None
    new_threshold: float | None = None


def video_settings(extra: dict) -> VideoSettings:
    """Take the video params out of a project's extra params (a dict, changed in place), checked."""
    stride = extra.pop("stride", None)
    frames = extra.pop("frames", None)
    new_threshold = extra.pop("new_threshold", None)
    if stride is None:
        stride = 1
    if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
        raise OptionError(f"Extra param 'stride' must be a whole number >= 1 (1 segments every frame, 5 every "
                          f"fifth), got {stride!r}.")
    if new_threshold is not None and (isinstance(new_threshold, bool) or not isinstance(new_threshold, (int, float))
                                      or not 0 <= new_threshold <= 1):
        raise OptionError(f"Extra param 'new_threshold' must be a number from 0 to 1 (the score a detection needs "
                          f"to start a new object), got {new_threshold!r}.")
    return VideoSettings(stride, _frame_span(frames), None if new_threshold is None else float(new_threshold))


def _frame_span(frames: Any) -> tuple[int, int | None] | None:
    """``(start, stop)`` from ``[start, stop]`` or ``"start:stop"`` (either end may be left out)."""
    if frames is None:
        return None
    parts = frames.split(":") if isinstance(frames, str) else frames
    if not isinstance(parts, list) or len(parts) != 2:
        raise OptionError(f"Extra param 'frames' must be {FRAMES_HELP}; got {frames!r}.")
    span = []
    for part in parts:
        if isinstance(part, str):
            part = part.strip()
            part = None if part == "" else int(part) if part.isdigit() else part
        if part is not None and (isinstance(part, bool) or not isinstance(part, int) or part < 0):
            raise OptionError(f"Extra param 'frames' must be {FRAMES_HELP}; got {frames!r}.")
        span.append(part)
    start, stop = span
    start = start or 0
    if stop is not None and stop <= start:
        raise OptionError(f"Extra param 'frames' must have start < stop, got {frames!r}: {FRAMES_HELP}.")
    return start, stop


@dataclass(frozen=True)
class VideoTiming:
    """A video file's frame count (as the core reads it) and frame rate (frames per second)."""

    frame_count: int
    fps: float

    @property
    def duration(self) -> float:
        return self.frame_count / self.fps


def read_timing(path: str) -> VideoTiming:
    """The frame count and frame rate of a video file; `ImageError` when it is not a readable video.

    Both come from the core's frame reader (`promptseg.video.open_frames`): the count is what
    `segment_video` indexes, the rate the video stream's average rate.
    """
    from promptseg.video import open_frames

    if not os.path.isfile(path):
        raise ImageError(f"The task's video {path!r} is not a file: give a video file (mp4, webm, mov...).")
    source = open_frames(path)  # ImageError for a file that is not a video, or holds no video stream or frames
    if source.fps is None:
        raise ImageError(
            "The video has no frame rate: re-encode it at a constant frame rate "
            "(e.g. ffmpeg -i in.mp4 -r 30 out.mp4), which Label Studio also needs to number frames."
        )
    return VideoTiming(source.length, source.fps)


def label_studio_rate(attribute: str | None, data: dict) -> float:
    """The frame rate Label Studio numbers the task's frames at, read as its editor reads ``frameRate``:
    a number, or ``$field`` of the task; 24 when unset or not a positive number (as the editor falls
    back); a value below 1 is a frame's duration (its inverse is the rate)."""
    text = (attribute or "").strip()
    value: Any = data.get(text[1:]) if text.startswith("$") else text
    try:
        rate = float(value)
    except (TypeError, ValueError):
        rate = 0.0
    if not (math.isfinite(rate) and rate > 0):
        return DEFAULT_FRAME_RATE
    return 1.0 / rate if rate < 1 else rate


def track_regions(
    result: VideoResult,
    output: Output,
    label_of: Callable[[Instance], str | None],
    timing: VideoTiming,
    rate: float,
) -> list[dict]:
    """One ``videorectangle`` region per object of `result` whose label `output` has, in object-id order.

    `timing` is the file's (frame count, fps); `rate` is Label Studio's frame rate for the task
    (`label_studio_rate`). The region's score is the object's best score on any frame.
    """
    pieces: dict[int, list[tuple[int, Instance]]] = {}
    for position, frame in enumerate(result.frames):
        for inst in frame.instances:
            pieces.setdefault(inst.extra["object_id"], []).append((position, inst))
    stride = int(result.info.get("stride", 1))
    reaches_end = bool(result.frame_indices) and result.frame_indices[-1] + stride >= timing.frame_count
    frames_count = max(1, round(timing.frame_count * rate / timing.fps))
    regions = []
    for _, seen in sorted(pieces.items()):
        label = label_of(seen[0][1])
        if label is None or label not in output.labels:
            continue
        sequence = keyframes(result, seen, timing.fps, rate, reaches_end, frames_count)
        regions.append({
            "id": uuid.uuid4().hex[:10],
            "from_name": output.from_name,
            "to_name": output.to_name,
            "type": output.result_type,
            "value": {"framesCount": frames_count, "duration": timing.duration, "sequence": sequence,
                      "labels": [label]},
            "score": float(max(inst.score for _, inst in seen)),
        })
    return regions


def keyframes(result: VideoResult, seen: list[tuple[int, Instance]], fps: float, rate: float,
              reaches_end: bool, frames_count: int) -> list[dict]:
    """One object's keyframes: `seen` is ``(position, instance)`` per segmented frame it is on, in order.

    A keyframe is disabled when the object is not on the next segmented frame, and at the end unless
    it is on the last one and the segmented frames reach the video's end. Two file frames shown on
    one Label Studio frame (a file faster than `rate`) keep the later one; frame numbers stay within
    `frames_count`.
    """
    height, width = result.frame_size
    last = len(result.frames) - 1
    sequence: list[dict] = []
    for k, (position, inst) in enumerate(seen):
        continues = k + 1 < len(seen) and seen[k + 1][0] == position + 1
        at_end = position == last and reaches_end
        frame = min(round(result.frame_indices[position] * rate / fps) + 1, frames_count)
        box = rectangle_value(inst, height, width)
        keyframe = {"frame": frame, "enabled": continues or at_end, "rotation": 0, "x": box["x"], "y": box["y"],
                    "width": box["width"], "height": box["height"], "time": (frame - 1) / rate}
        if sequence and sequence[-1]["frame"] == frame:
            sequence[-1] = keyframe
        else:
            sequence.append(keyframe)
    return sequence

