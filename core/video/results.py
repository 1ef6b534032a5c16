"""What `Segmenter.segment_video` returns: per-frame results with stable object ids, tracks, exports.

Each frame is a `promptseg.results.SegmentationResult` whose instances hold masks cropped to their
box; every instance carries its object id in ``extra["object_id"]`` (from 0, stable through the
video) and its frame number in ``extra["frame"]``. Label images number objects ``object_id + 1``
(0 is background). Exports are written frame by frame, never as one volume in memory; the tracking
JSON's format is described in docs/video.md.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from promptseg.results import SegmentationResult

TRACKING_FORMAT = "promptseg-video-tracking/1"


@dataclass(frozen=True)
class Track:
    """One object through the video: the frames it is seen on and its scores there."""

    object_id: int
    label: str
    first_frame: int
    last_frame: int
    num_frames: int
    best_score: float
    mean_score: float


@dataclass
class VideoResult:
    """Every segmented frame of a video, in order.

    `frames[k]` is the result of frame number `frame_indices[k]` of the source (a frame range and a
    stride pick which ones); `frame_size` is ``(height, width)``; `source` the file or folder read.
    """

    frames: list[SegmentationResult]
    frame_indices: list[int]
    frame_size: tuple[int, int]
    prompts: list[str]
    source: str | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.frames)

    def __iter__(self) -> Iterator[SegmentationResult]:
        return iter(self.frames)

    def __getitem__(self, index: int) -> SegmentationResult:
        return self.frames[index]

    def object_ids(self, position: int) -> list[int]:
        """The object id of each instance of the `position`-th segmented frame."""
        return [inst.extra["object_id"] for inst in self.frames[position].instances]

    def tracks(self) -> list[Track]:
        """Each object's first and last frame (source frame numbers), frame count and scores, by id."""
        seen: dict[int, list] = {}
        for number, result in zip(self.frame_indices, self.frames):
            for inst in result.instances:
                seen.setdefault(inst.extra["object_id"], []).append((number, inst.score, inst.label))
        tracks = []
        for object_id, pieces in sorted(seen.items()):
            numbers, scores, labels = zip(*pieces)
            tracks.append(Track(object_id, labels[0], min(numbers), max(numbers), len(pieces),
                                float(max(scores)), float(np.mean(scores))))
        return tracks

    def label_image(self, position: int, dtype: Any = np.uint16) -> np.ndarray:
        """The ``(H, W)`` labels of one segmented frame: ``object_id + 1`` per object, higher scores on top."""
        labels = np.zeros(self.frame_size, dtype=dtype)
        for inst in sorted(self.frames[position].instances, key=lambda inst: inst.score):
            x0, y0, x1, y1 = inst.box
            labels[y0:y1, x0:x1][inst.mask] = inst.extra["object_id"] + 1
        return labels

    def to_label_volume(self, dtype: Any = np.uint16) -> np.ndarray:
        """A ``(frames, H, W)`` array of ``object_id + 1`` (0 background), one plane per segmented frame."""
        volume = np.zeros((len(self.frames), *self.frame_size), dtype=dtype)
        for position in range(len(self.frames)):
            volume[position] = self.label_image(position, dtype)
        return volume

    def save_label_pngs(self, folder: str | os.PathLike) -> list[Path]:
        """One 16-bit label PNG per segmented frame, ``frame_NNNNNN.png`` after its source frame number."""
        from promptseg.render import save_png

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for position, number in enumerate(self.frame_indices):
            path = folder / f"frame_{number:06d}.png"
            save_png(self.label_image(position), path)
            paths.append(path)
        return paths

    def save_label_tiff(self, path: str | os.PathLike) -> Path:
        """The label volume as a ``TYX`` uint16 TIFF (one series), written plane by plane, uncompressed
        (tifffile compresses an iterated series only strip by strip)."""
        import tifffile

        path = Path(path)
        planes = (self.label_image(position) for position in range(len(self.frames)))
        tifffile.imwrite(path, planes, shape=(len(self.frames), *self.frame_size), dtype=np.uint16,
                         metadata={"axes": "TYX"})
        return path

    def to_tracking_dict(self) -> dict[str, Any]:
        """A COCO-style tracking document: videos, images (frames), categories, tracks and annotations
        (RLE masks from `SegmentationResult.to_coco`, each with its ``track_id``); see docs/video.md."""
        categories = {label: number + 1 for number, label in enumerate(self.prompts)}
        height, width = self.frame_size
        images, annotations = [], []
        for position, (number, result) in enumerate(zip(self.frame_indices, self.frames)):
            image_id = position + 1
            images.append({"id": image_id, "video_id": 1, "frame_id": number, "height": height, "width": width})
            for inst, record in zip(result.instances, result.to_coco(image_id=image_id, category_ids=categories)):
                record.pop("category_name")
                annotations.append({"id": len(annotations) + 1, "video_id": 1,
                                    "track_id": inst.extra["object_id"] + 1, **record})
        tracks = [
            {"id": track.object_id + 1, "category_id": categories[track.label], "first_frame": track.first_frame,
             "last_frame": track.last_frame, "num_frames": track.num_frames, "best_score": track.best_score,
             "mean_score": track.mean_score}
            for track in self.tracks()
        ]
        return {
            "info": {"format": TRACKING_FORMAT, **{k: v for k, v in self.info.items() if isinstance(v, (str, int, float))}},
            "videos": [{"id": 1, "name": self.source, "height": height, "width": width,
                        "frame_ids": list(self.frame_indices)}],
            "images": images,
            "categories": [{"id": number, "name": label} for label, number in categories.items()],
            "tracks": tracks,
            "annotations": annotations,
        }

    def save_tracking_json(self, path: str | os.PathLike) -> Path:
        """`to_tracking_dict` as a JSON file."""
        path = Path(path)
        path.write_text(json.dumps(self.to_tracking_dict()))
        return path
