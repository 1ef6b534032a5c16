"""Video datasets: SAM 3's video model follows each prompted object through a sample's frames.

Each video sample is one `Segmenter.segment_video` call on its file; each segmented frame gets a
`fo.Detections` in the frame field (``frames.<label_field>``, FiftyOne's frames are numbered from
1), one detection per object with its instance mask and ``index`` set to the core's object id, so
the App and FiftyOne's tracking tools see one track per object. A sample counts as done once any of
its frames holds the field (every segmented frame gets one, possibly empty), so a rerun skips it;
a video that cannot be read is reported and left empty while the others are written.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from promptseg.errors import ImageError, OptionError, PromptError
from promptseg_fiftyone.convert import DEFAULT_MASK_PATH_MIN_PIXELS, prompts_from_value, to_detections

logger = logging.getLogger(__name__)


def is_video_collection(samples) -> bool:
    """Whether `samples` (a dataset or view) holds videos."""
    return getattr(samples, "media_type", None) == "video"


def require_video_model(segmenter) -> None:
    """Raise `ModelLoadError` now, before any sample, when the model cannot track through frames."""
    segmenter.require_video()


def frame_labels(result, mask_dir: str | os.PathLike | None = None, mask_stem: str = "mask",
                 mask_path_min_pixels: int | None = DEFAULT_MASK_PATH_MIN_PIXELS) -> dict[int, Any]:
    """A `VideoResult` as ``{FiftyOne frame number: fo.Detections}`` with ``index`` = object id.

    Masks and boxes are the image converter's (`to_detections`); masks of frames with at least
    `mask_path_min_pixels` pixels go to PNG files under `mask_dir`.
    """
    height, width = result.frame_size
    large = mask_dir is not None and mask_path_min_pixels is not None and height * width >= mask_path_min_pixels
    labels = {}
    for number, frame in zip(result.frame_indices, result.frames):
        detections = to_detections(frame, mask_dir=mask_dir if large else None, mask_stem=f"{mask_stem}-{number + 1}")
        for detection, inst in zip(detections.detections, frame.instances):
            detection.index = int(inst.extra["object_id"])
        labels[number + 1] = detections
    return labels


def check_frame_label_field(samples, name: str) -> bool:
    """Raise `OptionError` unless the frame field `name` can hold Detections; return whether it exists.

    The name itself is checked like an image run's label field (`runner.check_label_field`).
    """
    import fiftyone as fo

    existing = samples._dataset.get_frame_field_schema().get(name)
    if existing is None:
        return False
    if isinstance(existing, fo.EmbeddedDocumentField) and issubclass(existing.document_type, fo.Detections):
        return True
    kind = getattr(existing, "document_type", None) or type(existing)
    raise OptionError(
        f"Frame field {name!r} already holds {kind.__name__}, not Detections: choose another label field."
    )


def check_video_run(output: str, exemplar_field: str | None, boxes: bool) -> None:
    """What a video run cannot do, refused before any work: other outputs, exemplar boxes, box prompts."""
    if output != "detections":
        raise OptionError(
            f"Video samples are written as frame-level Detections (one track per object); output={output!r} "
            "applies to image datasets only: leave output as 'detections'."
        )
    if exemplar_field or boxes:
        raise OptionError(
            "Video samples take text prompts (prompts or a text prompt field); exemplar and prompt boxes apply "
            "to image datasets only: leave exemplar_field out and use a text prompt field."
        )


def segment_videos(samples, fixed: list[str], label_field: str, *, segmenter, summary, prompt_field=None,
                   overwrite: bool = False, mask_dir=None, mask_path_min_pixels=DEFAULT_MASK_PATH_MIN_PIXELS,
                   progress=None, options=None, stride: int = 1, new_threshold: float | None = None):
    """The video half of `runner.segment_samples`: fills `summary` (a `runner.RunSummary`) and returns it.

    `progress(total, advance)` counts frames: the total over every video still to do is
    announced first (each video's length read from its header), then each frame segmented; a
    video that fails gives its remaining frames at once.
    """
    import fiftyone as fo
    from fiftyone import ViewField as F

    from promptseg.video import frame_range, open_frames
    from promptseg.video import check_video_options

    require_video_model(segmenter)
    check_video_options(options)  # options a video does not use stop the run here
    frame_range(1, None, stride)  # and so does a bad stride
    dataset = samples._dataset
    if not check_frame_label_field(samples, label_field):
        dataset.add_frame_field(label_field, fo.EmbeddedDocumentField, embedded_doc_type=fo.Detections)
    done = set() if overwrite else set(samples.match_frames(F(label_field).exists(), omit_empty=True).values("id"))
    view = samples.select([i for i in samples.values("id") if i not in done], ordered=True)
    summary.skipped = len(done)
    if mask_dir is None and mask_path_min_pixels is not None:
        mask_dir = os.path.join(fo.config.default_dataset_dir, "promptseg_masks", dataset.name, label_field)
    todo = _readable_videos(view, segmenter, options, stride, summary, open_frames, frame_range)
    total = sum(count for _, count in todo)
    if progress:
        progress(total, 0)
    for sample, count in todo:
        seen = [0]

        def frame_done(_total, advance, seen=seen):
            if advance and progress:
                seen[0] += advance
                progress(total, advance)

        _segment_video_sample(sample, segmenter, fixed, prompt_field, label_field, options, stride, new_threshold,
                              mask_dir, mask_path_min_pixels, summary, frame_done)
        if progress and count > seen[0]:  # a video that failed part-way: its remaining frames at once
            progress(total, count - seen[0])
    return summary


def _readable_videos(view, segmenter, options, stride, summary, open_frames, frame_range):
    """``(sample, frames to segment)`` for each video whose header can be read; the others are reported."""
    readable = []
    for sample in view.iter_samples():
        try:
            source = open_frames(sample.filepath, options.pixels, getattr(segmenter, "max_pixels", None))
            readable.append((sample, len(frame_range(source.length, None, stride))))
        except ImageError as exc:
            summary.report_failure(sample, exc)
    return readable


def _segment_video_sample(sample, segmenter, fixed, prompt_field, label_field, options, stride, new_threshold,
                          mask_dir, mask_path_min_pixels, summary, progress) -> None:
    """Segment one video sample into its frames, or report why not (its frames are then left empty)."""
    try:
        phrases = list(fixed)
        if prompt_field is not None:
            phrases += prompts_from_value(sample[prompt_field], prompt_field)
        if not phrases:
            summary.no_prompts += 1
            return
        result = segmenter.segment_video(sample.filepath, phrases, stride=stride, new_threshold=new_threshold,
                                         options=options, progress=progress)
    except (ImageError, PromptError) as exc:
        summary.report_failure(sample, exc)
        return
    for number, detections in frame_labels(result, mask_dir, sample.id, mask_path_min_pixels).items():
        sample.frames[number][label_field] = detections
    sample.save()
    summary.processed += 1
    summary.instances += sum(len(frame) for frame in result)
    source = result.info.get("embedding_source", "computed")
    summary.embedding_sources[source] = summary.embedding_sources.get(source, 0) + 1
