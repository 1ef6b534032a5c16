"""Video and time-lapse: SAM 3's video model follows every object a prompt names through the frames.

`Segmenter.segment_video` is the entry point; this package does the work, one job per module:
`frames` (video files, folders of frames, arrays, TIFF time series, read one frame at a time),
`tracking` (each frame's cached embedding through the video model, then compact instances) and
`results` (`VideoResult`: per-frame instances with stable object ids, tracks and exports).
"""

from __future__ import annotations

from promptseg.video.frames import FrameSource, frame_range, is_video_path, open_frames
from promptseg.video.results import Track, VideoResult
from promptseg.video.tracking import check_video_options, segment_frames

__all__ = [
    "FrameSource", "Track", "VideoResult", "check_video_options", "frame_range", "is_video_path", "open_frames",
    "segment_frames",
]
