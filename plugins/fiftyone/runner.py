"""Segment every sample of a dataset, view or selection and store the instances as FiftyOne labels.

This is the loop behind the operator and the Python entry: it picks the samples still to do
(resume), reads prompts and exemplars from sample fields, calls the core once per image, and
writes results in batches (`fo.Detections` by default, or one `fo.Segmentation` or `fo.Polylines`
per sample). A sample counts as done once its label field holds a label (possibly empty), so a
rerun after an interruption continues where the last batch ended. A sample whose own image,
prompts or exemplar boxes cannot be used (missing, corrupt or over-budget image, a prompt that is
not text, a box with NaN) is left empty, reported, and retried by the next run; the others are written.
A prompt field of Detections segments each box as one object; a bad box is skipped with a warning.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from promptseg.errors import ImageError, OptionError, PromptError
from promptseg.options import PixelOptions, SegmentOptions, resolve_options
from promptseg_fiftyone.convert import (
    BOX_PROMPT_LABELS,
    DEFAULT_MASK_PATH_MIN_PIXELS,
    add_class_ids,
    box_count,
    box_prompts_from_value,
    check_output,
    class_ids_from_targets,
    exemplars_from_value,
    label_type,
    prompts_from_value,
    to_label,
)
from promptseg_fiftyone.video import check_video_run, is_video_collection, segment_videos

logger = logging.getLogger(__name__)

DEFAULT_LABEL_FIELD = "promptseg"
DEFAULT_BATCH_SIZE = 16
MAX_REPORTED_FAILURES = 100
_FIELD_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
_REPEAT_KEYS = ("prompts", "prompt_field", "exemplar_field", "options", "model")

Progress = Callable[[int, int], None]
"""``progress(total, advance)``, the core's convention: once with ``advance=0`` to announce the
number of samples to do, then ``advance=1`` after each one (written, skipped or failed)."""


@dataclass
class RunSummary:
    """What one run did: the operator shows it and tests check it."""

    run_key: str
    label_field: str
    total: int = 0
    skipped: int = 0
    processed: int = 0
    instances: int = 0
    no_prompts: int = 0
    skipped_boxes: int = 0
    failed: list[dict[str, str]] = field(default_factory=list)
    failed_count: int = 0
    embedding_sources: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def report_failure(self, sample, exc) -> None:
        """Count a sample that could not be segmented, keep its first failures, and log it."""
        _report_failure(self, sample, exc)


def run_key_for(label_field: str) -> str:
    """The run key under which a label field's provenance is recorded (`dataset.get_run_info`)."""
    return f"promptseg_{label_field}"


def check_label_field(samples, label_field: Any, output: str = "detections") -> bool:
    """Raise `OptionError` unless `label_field` can hold the `output` labels; return whether it exists."""
    import fiftyone as fo

    wanted = label_type(output)
    if not isinstance(label_field, str) or not _FIELD_NAME.match(label_field):
        raise OptionError(
            f"Bad label field name {label_field!r}: use letters, digits and underscores, starting "
            "with a letter (for example 'promptseg' or 'cars_sam3')."
        )
    schema = samples._dataset.get_field_schema()
    if label_field not in schema:
        return False
    existing = schema[label_field]
    if isinstance(existing, fo.EmbeddedDocumentField) and issubclass(existing.document_type, wanted):
        return True
    kind = getattr(existing, "document_type", None) or type(existing)
    raise OptionError(
        f"Field {label_field!r} already holds {kind.__name__}, not {wanted.__name__}: choose another "
        "label field."
    )


PROMPT_LABELS = ("Classification", "Classifications", "Detection", "Detections")
EXEMPLAR_LABELS = ("Detection", "Detections")


def check_source_field(samples, name: str | None, what: str, labels: Sequence[str] = PROMPT_LABELS) -> None:
    """Raise `OptionError` unless `name` is a field of the dataset that can hold `what`.

    A prompt field (`labels` = PROMPT_LABELS) may also be a string or list field; an exemplar
    field (EXEMPLAR_LABELS) only holds labels.
    """
    import fiftyone as fo

    if name is None:
        return
    schema = samples._dataset.get_field_schema()
    if name not in schema:
        raise OptionError(f"The {what} {name!r} is not a field of dataset {samples._dataset.name!r}.")
    field = schema[name]
    kind = getattr(field, "document_type", None) or type(field)
    if kind.__name__ in labels:
        return
    texts = labels is PROMPT_LABELS and (
        isinstance(field, fo.StringField)
        or (isinstance(field, fo.ListField) and (field.field is None or isinstance(field.field, fo.StringField)))
    )
    if not texts:
        usable = "a string, a list of strings or " if labels is PROMPT_LABELS else ""
        raise OptionError(
            f"The {what} {name!r} holds {kind.__name__}: choose {usable}a {'/'.join(labels)} field."
        )


def prompt_field_holds_boxes(samples, prompt_field: str | None) -> bool:
    """Whether `prompt_field` is a Detection(s) field: each box then gives one object (`segment_boxes`)."""
    if prompt_field is None:
        return False
    field = samples._dataset.get_field_schema().get(prompt_field)
    kind = getattr(field, "document_type", None)
    return kind is not None and kind.__name__ in BOX_PROMPT_LABELS


def require_visual_head(segmenter) -> None:
    """Raise the core's `ModelLoadError` now when the model cannot segment boxes (a detector-only checkpoint)."""
    segmenter.require_visual_prompts()


def segment_boxes(segmenter, rgb, value, options: SegmentOptions, where: str = "") -> tuple[Any, list[str]]:
    """One object per box of a `fo.Detections` value: ``(result, problems)``.

    Each box is one `Segmenter.segment_object` call on the same image, so one image embedding
    serves them all. The object keeps the box's label; its mask, tight box and score are the
    core's. A box the core refuses (empty, outside the image, not finite) is left out and
    described in `problems`; the other boxes go on.
    """
    from promptseg.results import SegmentationResult

    instances, problems, sources = [], [], []
    for index, (label, box) in enumerate(box_prompts_from_value(value, rgb.shape[:2])):
        if box is None:
            problems.append(f"{where}box {index} ({label!r}) has no bounding_box; skipped.")
            continue
        try:
            found = segmenter.segment_object(rgb, box=box, options=options)
        except OptionError as exc:
            problems.append(f"{where}box {index} ({label!r}) skipped: {exc}")
            continue
        sources.append(found.embedding_source)
        if not found.instances:
            logger.info("%sbox %d (%r) gave no mask above mask_threshold.", where, index, label)
        instances += [dataclasses.replace(inst, label=label, phrase=label) for inst in found.instances]
    for problem in problems:
        logger.warning(problem)
    source = sources[0] if sources else "memory"  # the first box fetched the image's embedding; the rest reuse it
    result = SegmentationResult(instances=instances, image_size=rgb.shape[:2],
                                prompts=list(dict.fromkeys(inst.label for inst in instances)), embedding_source=source)
    return result, problems


# Arguments every run sets itself, per sample; never taken from the user's options.
_SET_PER_SAMPLE = ("image", "prompts", "exemplars", "exemplar_labels")


def check_segment_options(segmenter=None, options: SegmentOptions | dict[str, Any] | None = None,
                          **flat: Any) -> SegmentOptions:
    """The run's `SegmentOptions` from an options object and/or flat names; `OptionError` otherwise.

    Built once before a run, so a typo or ``threshold=2`` fails before any sample is touched.
    The names and ranges are the core's (`SegmentOptions.from_flat`); only the per-sample inputs
    (image, prompts, exemplars), which a run takes from the samples, are refused here.
    `segmenter` is not needed any more and kept for old callers.
    """
    names = list(options) if isinstance(options, dict) else []
    per_sample = [name for name in [*names, *flat] if name in _SET_PER_SAMPLE]
    if per_sample:
        raise OptionError(
            f"{per_sample[0]!r} cannot be an option: each sample's image is its filepath, its prompts come "
            "from prompts and prompt_field, its exemplar boxes from exemplar_field."
        )
    return resolve_options(options, flat)


def segment_samples(
    samples,
    prompts: str | Sequence[str] | None = None,
    label_field: str = DEFAULT_LABEL_FIELD,
    *,
    segmenter=None,
    model: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    token: str | None = None,
    prompt_field: str | None = None,
    exemplar_field: str | None = None,
    overwrite: bool = False,
    batch_size: int = DEFAULT_BATCH_SIZE,
    mask_dir: str | os.PathLike | None = None,
    mask_path_min_pixels: int | None = DEFAULT_MASK_PATH_MIN_PIXELS,
    output: str = "detections",
    progress: Progress | None = None,
    options: SegmentOptions | None = None,
    stride: int = 1,
    new_threshold: float | None = None,
    **flat: Any,
) -> RunSummary:
    """Segment `samples` (a dataset or view) with text prompts into `label_field`.

    `output` is the label type written per sample: ``"detections"`` (`fo.Detections`, one
    instance mask each), ``"segmentation"`` (one semantic `fo.Segmentation` whose pixel values
    are class ids, named by the field's ``mask_targets``; ids follow prompt order and are kept
    across runs) or ``"polylines"`` (`fo.Polylines`, the core's polygons).

    Prompts are the fixed `prompts` plus, per sample, those read from `prompt_field` (a string,
    list of strings, or Classification(s) labels); `exemplar_field` (Detections) gives
    example boxes. A `prompt_field` of Detection(s) instead makes each box one object
    (`segment_boxes`; no fixed prompts or exemplars then, and the model needs SAM 3's tracker).
    Samples that already have `label_field` are skipped unless `overwrite`.
    Images with at least `mask_path_min_pixels` pixels get their masks as PNG files under
    `mask_dir` (``None`` disables this; not used by polylines). `options` (a `SegmentOptions`) and
    the options given by name (every `SegmentOptions` field: threshold, mask_threshold, min_area,
    smooth, max_instances, tile, channels, ...) go to `Segmenter.segment`. Results are written every
    `batch_size` samples. `progress(total, advance)` is told the number of samples to do, then
    each one done (see `Progress`).

    A video dataset or view is segmented with SAM 3's video model (`promptseg_fiftyone.video`):
    frame-level Detections in ``frames.<label_field>`` with ``index`` = object id, every `stride`-th
    frame, `new_threshold` the score a detection needs to start a new object; `progress` then
    counts frames. Only text prompts and the detections output apply to videos.

    `token` is a Hugging Face token for gated hub weights (the operator passes its ``HF_TOKEN``
    secret); it is handed to the model loader only, never logged or recorded.
    """
    import fiftyone as fo
    from fiftyone.core.collections import SaveContext

    from promptseg.images import load_image, resolve_max_pixels
    from promptseg.results import ensure_prompt_list
    from promptseg.sessions import shared_segmenter

    started = time.perf_counter()
    fixed = ensure_prompt_list(prompts) if prompts not in (None, [], ()) else []
    if not fixed and prompt_field is None:
        raise PromptError("No prompt given: pass prompts such as ['car', 'person'] or a prompt_field.")
    if batch_size < 1:
        raise OptionError(f"batch_size must be at least 1, got {batch_size}.")
    check_output(output)
    options = check_segment_options(options=options, **flat)
    exists = check_label_field(samples, label_field, output)
    check_source_field(samples, prompt_field, "prompt field")
    check_source_field(samples, exemplar_field, "exemplar field", EXEMPLAR_LABELS)
    boxes = prompt_field_holds_boxes(samples, prompt_field)
    if boxes and (fixed or exemplar_field):
        raise OptionError(
            f"The prompt field {prompt_field!r} holds boxes, so each box is segmented as one object; text prompts "
            "and exemplar boxes do not apply to it: run once with the boxes and once with text, into two label fields."
        )
    dataset = samples._dataset
    video = is_video_collection(samples)
    if video:
        check_video_run(output, exemplar_field, boxes)
    elif stride != 1 or new_threshold is not None:
        raise OptionError("stride and new_threshold apply to video datasets only: leave them out for images.")
    segmenter = segmenter or shared_segmenter(model, device=device, dtype=dtype, **({"token": token} if token else {}))
    if video:
        return _segment_video_samples(samples, fixed, label_field, segmenter, prompt_field, exemplar_field, options,
                                      overwrite, output, mask_dir, mask_path_min_pixels, progress, stride, new_threshold)
    if boxes:
        require_visual_head(segmenter)
    resolve_max_pixels(getattr(segmenter, "max_pixels", None))  # a bad PROMPTSEG_MAX_PIXELS stops the run here

    summary = RunSummary(run_key=run_key_for(label_field), label_field=label_field, total=len(samples))
    config = _run_config(dataset, segmenter.describe(), fixed, prompt_field, exemplar_field, options, overwrite, output)
    if exists and not overwrite:
        _warn_if_settings_changed(dataset, summary, config)
    if not exists:
        dataset.add_sample_field(label_field, fo.EmbeddedDocumentField, embedded_doc_type=label_type(output))
    class_ids = None
    if output == "segmentation":
        class_ids = add_class_ids(class_ids_from_targets(dataset.mask_targets.get(label_field)), fixed)
        _store_mask_targets(dataset, label_field, class_ids)
    todo = samples if overwrite else samples.exists(label_field, False)
    ids = todo.values("id")
    summary.skipped = summary.total - len(ids)
    if mask_dir is None and mask_path_min_pixels is not None:
        mask_dir = os.path.join(fo.config.default_dataset_dir, "promptseg_masks", dataset.name, label_field)
    view = samples.select(ids, ordered=True).select_fields([f for f in (prompt_field, exemplar_field) if f])
    sources: Counter[str] = Counter()
    if progress:
        progress(len(ids), 0)
    try:
        with SaveContext(view, batch_size=batch_size) as writer:
            for sample in view.iter_samples():
                segment = _segment_sample_boxes if boxes else _segment_sample
                labels = segment(
                    sample, segmenter, fixed, prompt_field, exemplar_field, options,
                    mask_dir, mask_path_min_pixels, summary, load_image, output, class_ids,
                )
                if labels is not None:
                    result, label = labels
                    sample[label_field] = label
                    writer.save(sample)
                    summary.processed += 1
                    summary.instances += len(result)
                    sources[result.embedding_source] += 1
                if progress:
                    progress(len(ids), 1)
    finally:
        if class_ids is not None:
            _store_mask_targets(dataset, label_field, class_ids)
        summary.embedding_sources = dict(sources)
        summary.seconds = time.perf_counter() - started
        _record_run(samples, summary, config)
    return summary


def _segment_video_samples(samples, fixed, label_field, segmenter, prompt_field, exemplar_field, options, overwrite,
                           output, mask_dir, mask_path_min_pixels, progress, stride, new_threshold) -> RunSummary:
    """A video dataset or view through `promptseg_fiftyone.video.segment_videos`, recorded like an image run."""
    summary = RunSummary(run_key=run_key_for(label_field), label_field=label_field, total=len(samples))
    config = _run_config(samples._dataset, segmenter.describe(), fixed, prompt_field, exemplar_field, options,
                         overwrite, output)
    started = time.perf_counter()
    try:
        segment_videos(samples, fixed, label_field, segmenter=segmenter, summary=summary, prompt_field=prompt_field,
                       overwrite=overwrite, mask_dir=mask_dir, mask_path_min_pixels=mask_path_min_pixels,
                       progress=progress, options=options, stride=stride, new_threshold=new_threshold)
    finally:
        summary.seconds = time.perf_counter() - started
        _record_run(samples, summary, config)
    return summary


def _segment_sample(sample, segmenter, fixed, prompt_field, exemplar_field, options,
                    mask_dir, mask_path_min_pixels, summary, load_image, output="detections", class_ids=None):
    """The (result, label) of one sample, or None when it is skipped (reported in `summary`).

    What belongs to this sample alone (its image, its prompts, its exemplar boxes) fails only this
    sample: it is reported and left without a label, so the run goes on and a rerun retries it.
    """
    try:
        phrases = list(fixed)
        if prompt_field is not None:
            phrases += prompts_from_value(sample[prompt_field], prompt_field)
        if not phrases:
            summary.no_prompts += 1
            return None
        pixels = options.pixels  # how the file becomes RGB: read here, so a bad file fails only its sample
        rgb = load_image(sample.filepath, max_pixels=getattr(segmenter, "max_pixels", None),
                         percentiles=pixels.percentiles, channels=pixels.channels)
        exemplars = exemplars_from_value(sample[exemplar_field], rgb.shape[:2], exemplar_field) if exemplar_field else []
    except (ImageError, PromptError, OptionError) as exc:
        _report_failure(summary, sample, exc)
        return None
    result = segmenter.segment(rgb, phrases, options.replace(pixels=PixelOptions()), exemplars=exemplars or None)
    return result, to_label(result, output, phrases, class_ids, mask_dir, sample.id, mask_path_min_pixels)


def _segment_sample_boxes(sample, segmenter, fixed, prompt_field, exemplar_field, options,
                          mask_dir, mask_path_min_pixels, summary, load_image, output="detections", class_ids=None):
    """`_segment_sample` for a box prompt field: one object per box (`segment_boxes`).

    A sample without boxes is counted in ``no_prompts`` and left empty; a box the core refuses
    is skipped with a warning (``skipped_boxes``) while the sample's other boxes are written.
    """
    value = sample[prompt_field]
    if not box_count(value):
        summary.no_prompts += 1
        return None
    pixels = options.pixels
    try:
        rgb = load_image(sample.filepath, max_pixels=getattr(segmenter, "max_pixels", None),
                         percentiles=pixels.percentiles, channels=pixels.channels)
    except ImageError as exc:
        _report_failure(summary, sample, exc)
        return None
    result, problems = segment_boxes(segmenter, rgb, value, options.replace(pixels=PixelOptions()),
                                     f"Sample {sample.id} ({sample.filepath}): ")
    summary.skipped_boxes += len(problems)
    room = MAX_REPORTED_FAILURES - len(summary.warnings)
    summary.warnings += problems[: max(room, 0)]
    return result, to_label(result, output, result.prompts, class_ids, mask_dir, sample.id, mask_path_min_pixels)


def _report_failure(summary, sample, exc) -> None:
    summary.failed_count += 1
    if len(summary.failed) < MAX_REPORTED_FAILURES:
        summary.failed.append({"id": sample.id, "filepath": sample.filepath, "error": str(exc)})
    logger.warning("Skipping sample %s (%s): %s", sample.id, sample.filepath, exc)


def _store_mask_targets(dataset, label_field: str, class_ids: dict[str, int]) -> None:
    """Name the class ids of a segmentation field in the App (``dataset.mask_targets[label_field]``)."""
    targets = {value: label for label, value in class_ids.items()}
    if dataset.mask_targets.get(label_field) != targets:
        dataset.mask_targets = {**dataset.mask_targets, label_field: targets}  # the setter saves


def _run_config(dataset, description, fixed, prompt_field, exemplar_field, options, overwrite, output="detections"):
    """The run record's config; `description` is the segmenter's `describe()` (at least its "model")."""
    return dataset.init_run(
        method="promptseg",
        prompts=list(fixed),
        prompt_field=prompt_field,
        exemplar_field=exemplar_field,
        options=_recorded(options),
        model=description["model"],
        segmenter=dict(description),
        overwrite=bool(overwrite),
        output=output,
    )


def _recorded(options: SegmentOptions) -> dict[str, Any]:
    """The options that differ from the core's defaults, as the run record stores them (JSON)."""
    return {name: list(value) if isinstance(value, tuple) else value for name, value in options.changed().items()}


def _warn_if_settings_changed(dataset, summary, config) -> None:
    if summary.run_key not in dataset.list_runs():
        return
    previous = dataset.get_run_info(summary.run_key).config
    changed = [k for k in _REPEAT_KEYS if getattr(previous, k, None) != getattr(config, k, None)]
    if changed:
        message = (
            f"{summary.label_field!r} was produced with different {', '.join(changed)}; only samples "
            "without it are segmented now. Pass overwrite=True to redo every sample."
        )
        summary.warnings.append(message)
        logger.warning(message)


def _record_run(samples, summary, config) -> None:
    """Record what produced the field (`dataset.get_run_info(run_key)`) and what this run did."""
    dataset = samples._dataset
    try:
        samples.register_run(summary.run_key, config, overwrite=True, cleanup=False)
        record = {k: v for k, v in summary.to_dict().items() if k != "run_key"}
        results = dataset.init_run_results(summary.run_key, **record)
        dataset.save_run_results(summary.run_key, results, overwrite=True)
    except Exception:  # the labels are written; a failed record must not hide that
        logger.exception("Could not record run %s on %s", summary.run_key, dataset.name)
