"""Frame sources: a video file, a folder of frames, a ``(T, H, W[, C])`` array or a TIFF time series,
read one frame at a time as ``(H, W, 3)`` uint8 RGB.

Nothing here holds more than one frame: a video file is decoded by PyAV as it streams, a folder
reads one file per frame, an array (numpy, dask, zarr, a memory map...) is indexed one frame at a
time, and a TIFF reads only the pages of the frame asked for. A frame range and a stride pick which
frames are read; every source knows its length before reading, so progress can say "frame k of n".
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from promptseg.errors import ImageError, OptionError
from promptseg.images import load_image
from promptseg.options import PixelOptions

VIDEO_SUFFIXES = (".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".mpg", ".mpeg", ".wmv", ".ogv")
FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
TIFF_SUFFIXES = (".tif", ".tiff")


def is_video_path(path: Any) -> bool:
    """Whether a path names a video file by its suffix (folders and TIFFs are videos only when asked)."""
    return isinstance(path, (str, os.PathLike)) and str(path).lower().endswith(VIDEO_SUFFIXES)


@dataclass
class FrameSource:
    """Frames of one video: `len` of the whole video, `read(i)` or `iterate(indices)` one at a time."""

    name: str | None
    length: int
    reader: Any
    pixels: PixelOptions
    max_pixels: int | None = None
    fps: float | None = None
    """Frames per second of a video file (its stream's average rate); None for frames without a clock
    (a folder, an array, a TIFF series) or a file that states no rate."""

    def frames(self, indices: range) -> Iterator[tuple[int, np.ndarray]]:
        """``(index, rgb)`` for each index, read lazily in order."""
        for index, frame in self.reader(indices):
            yield index, load_image(frame, percentiles=self.pixels.percentiles, channels=self.pixels.channels,
                                    max_pixels=self.max_pixels)


def open_frames(video: Any, pixels: PixelOptions | None = None, max_pixels: int | None = None) -> FrameSource:
    """A `FrameSource` for a video file, a folder of frames, a TIFF time series or an array."""
    pixels = pixels or PixelOptions()
    if isinstance(video, (str, os.PathLike)):
        path = Path(video).expanduser()
        if path.is_dir():
            return _folder(path, pixels, max_pixels)
        if not path.exists():
            raise ImageError(f"No video at {path}: check the path (a video file, a folder of frames or a TIFF).")
        if path.suffix.lower() in TIFF_SUFFIXES:
            return _tiff(path, pixels, max_pixels)
        return _video_file(path, pixels, max_pixels)
    if hasattr(video, "shape") and hasattr(video, "__getitem__"):
        return _array(video, pixels, max_pixels)
    raise ImageError(
        f"Cannot read a video from a {type(video).__name__}: pass a video file, a folder of frames, a TIFF "
        "time series or a (T, H, W[, C]) array."
    )


def frame_range(length: int, frames: Any = None, stride: Any = 1) -> range:
    """The frame indices a call reads: `frames` a slice or ``(start, stop)`` (stop exclusive, None for
    the end) inside ``0..length``, every `stride`-th frame."""
    if isinstance(stride, bool) or not isinstance(stride, (int, np.integer)) or stride < 1:
        raise OptionError(f"stride must be a whole number >= 1 (1 reads every frame, 2 every other), got {stride!r}.")
    if frames is None:
        start, stop = 0, length
    elif isinstance(frames, slice):
        if frames.step not in (None, 1):
            raise OptionError("frames takes a range without a step: give the step as stride=N.")
        start, stop = frames.start, frames.stop
    elif isinstance(frames, (tuple, list)) and len(frames) == 2:
        start, stop = frames
    else:
        raise OptionError(f"frames must be a slice or (start, stop), e.g. frames=(10, 50); got {frames!r}.")
    start = 0 if start is None else start
    stop = length if stop is None else stop
    for name, value in (("start", start), ("stop", stop)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise OptionError(f"frames {name} must be a whole number >= 0, got {value!r}.")
    if start >= length or stop <= start:
        raise OptionError(
            f"frames {start}:{stop} holds no frame of this {length}-frame video: give a range inside 0:{length} "
            "with start < stop."
        )
    return range(int(start), int(min(stop, length)), int(stride))


def natural_key(name: str) -> list:
    """Sort key putting ``frame2`` before ``frame10``."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def _folder(path: Path, pixels, max_pixels) -> FrameSource:
    files = sorted((p for p in path.iterdir() if p.suffix.lower() in FRAME_SUFFIXES and p.is_file()),
                   key=lambda p: natural_key(p.name))
    if not files:
        raise ImageError(
            f"The folder {path} holds no frames: put one image per frame in it ({', '.join(FRAME_SUFFIXES)}), "
            "named so that they sort in order (frame1.png, frame2.png, ...)."
        )

    def read(indices: range):
        for index in indices:
            yield index, files[index]

    return FrameSource(str(path), len(files), read, pixels, max_pixels)


def _array(video: Any, pixels, max_pixels) -> FrameSource:
    shape = tuple(video.shape)
    # any channel count: each frame is read like an image (the `channels` option picks up to three)
    if len(shape) not in (3, 4):
        raise ImageError(
            f"A video array must be (T, H, W) or (T, H, W, C); got shape {shape}. "
            "Move the time axis first and channels last (numpy.moveaxis)."
        )

    def read(indices: range):
        for index in indices:
            yield index, np.asarray(video[index])

    return FrameSource(None, shape[0], read, pixels, max_pixels)


def _tiff(path: Path, pixels, max_pixels) -> FrameSource:
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            shape, axes, pages = tuple(series.shape), series.axes, len(series.pages)
    except Exception as exc:
        raise ImageError(f"Cannot read the TIFF {path}: {exc}. Check that the file is complete.") from exc
    if len(shape) < 3:
        raise ImageError(f"{path} holds one {shape} image, not a time series: give a multi-page TIFF (T, Y, X).")
    per_frame = max(1, pages // shape[0])
    channel = axes[1:].find("C") if "C" in axes[1:] and per_frame > 1 else -1

    def read(indices: range):
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            for index in indices:
                planes = [series.pages[index * per_frame + k].asarray() for k in range(per_frame)]
                frame = planes[0] if per_frame == 1 else np.stack(planes).reshape(shape[1:])
                yield index, np.moveaxis(frame, channel, -1) if channel >= 0 else frame

    return FrameSource(str(path), shape[0], read, pixels, max_pixels)


def _video_file(path: Path, pixels, max_pixels) -> FrameSource:
    av = _import_av()
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise ImageError(f"The video {path} has no frames (the file holds no video stream): check that it "
                                 "is a complete video file (mp4, mov, avi, mkv, webm...), or give the frames as a "
                                 "folder of images.")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate or stream.base_rate
            length = stream.frames or sum(1 for packet in container.demux(stream) if packet.size)
    except (av.error.FFmpegError, OSError) as exc:
        raise ImageError(
            f"Cannot read the video {path}: {exc}. Check that the file is a complete video (mp4, mov, avi, mkv, "
            "webm...), or give its frames as a folder of images."
        ) from exc
    if not length:
        raise ImageError(f"The video {path} has no frames: check that the file is complete.")

    def read(indices: range):
        wanted = iter(indices)
        target = next(wanted, None)
        try:
            with av.open(str(path)) as container:
                for number, frame in enumerate(container.decode(video=0)):
                    if target is None:
                        return
                    if number == target:
                        yield number, frame.to_ndarray(format="rgb24")
                        target = next(wanted, None)
        except av.error.FFmpegError as exc:
            raise ImageError(
                f"The video {path} cannot be decoded past frame {target}: {exc}. The file may be truncated; "
                "segment the frames before it with frames=(0, N), or re-encode the video."
            ) from exc

    fps = float(rate) if rate else None
    return FrameSource(str(path), length, read, pixels, max_pixels, fps if fps and math.isfinite(fps) and fps > 0 else None)


def _import_av():
    try:
        import av
    except ImportError as exc:
        raise ImageError(
            "Reading video files needs PyAV: pip install 'promptseg[video]' (or pip install av), or give the "
            "frames as a folder of images or an array."
        ) from exc
    return av
