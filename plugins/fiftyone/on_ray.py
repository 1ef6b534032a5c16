"""Segment a FiftyOne dataset or view on Ray actors and write the labels back in bulk.

The samples still to do (the resume rule of `segment_samples`: a sample is done once its label
field holds a label) go to `promptseg.distributed.segment_on_ray` as ``{"id": sample id, "image":
filepath}``. Each record that comes back becomes the label the single-process run writes (the same
converter), and labels are written with one ``set_values(..., key_field="id")`` per `batch_size`
records, so a stopped run keeps what it wrote and the next run sends only the rest. A sample whose
image cannot be read comes back as an error record: it is reported like in `segment_samples`, left
without a label (the next run retries it), and no other sample's label is touched.

The actors need the image files at the same paths (a shared file system) or URLs they can read.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from collections.abc import Sequence
from contextlib import closing
from dataclasses import dataclass
from typing import Any

from promptseg import distributed
from promptseg.distributed import record_to_result
from promptseg.errors import OptionError, PromptError
from promptseg.options import SegmentOptions
from promptseg_fiftyone.convert import (
    DEFAULT_MASK_PATH_MIN_PIXELS,
    add_class_ids,
    check_output,
    class_ids_from_targets,
    label_type,
    to_label,
)
from promptseg_fiftyone.runner import (
    DEFAULT_LABEL_FIELD,
    Progress,
    RunSummary,
    _record_run,
    _run_config,
    _store_mask_targets,
    _warn_if_settings_changed,
    check_label_field,
    check_segment_options,
    run_key_for,
)
from promptseg_fiftyone.video import is_video_collection

logger = logging.getLogger(__name__)

DEFAULT_WRITE_BATCH = 100
"""Labels per bulk write (``set_values``): one database round trip per this many samples."""


@dataclass(frozen=True)
class _Sample:
    """What a failure report names of a sample (`RunSummary.report_failure` reads these two)."""

    id: str
    filepath: str


def segment_on_ray(
    samples,
    prompts: str | Sequence[str],
    label_field: str = DEFAULT_LABEL_FIELD,
    *,
    actors: int = 2,
    address: str | None = None,
    model: str | None = None,
    device: str | None = None,
    dtype: str = "auto",
    cache_dir: str | os.PathLike | bool | None = None,
    clip: str | bool | None = None,
    max_pixels: int | None = None,
    num_cpus_per_actor: float = 1,
    num_gpus_per_actor: float = 0,
    max_retries: int = 3,
    overwrite: bool = False,
    batch_size: int = DEFAULT_WRITE_BATCH,
    mask_dir: str | os.PathLike | None = None,
    mask_path_min_pixels: int | None = DEFAULT_MASK_PATH_MIN_PIXELS,
    output: str = "detections",
    progress: Progress | None = None,
    options: SegmentOptions | None = None,
    **flat: Any,
) -> RunSummary:
    """Segment the images of `samples` (a dataset or view) with text `prompts` on `actors` Ray actors.

    Writes `label_field` exactly as `segment_samples` does (same label type for `output`, same
    masks, same run record under ``promptseg_<label_field>``) and returns the same `RunSummary`.
    Samples that already have the field are skipped unless `overwrite`; labels are written every
    `batch_size` records and whatever arrived before an interruption is written on the way out.
    `address` is a Ray cluster's address (``"auto"``: the one this machine is part of); without it a
    Ray this process already joined is used, else a local one is started. `model`, `device`,
    `dtype`, `cache_dir`, `clip` and `max_pixels` are each actor's `load_segmenter` arguments;
    `num_cpus_per_actor`, `num_gpus_per_actor` and `max_retries` go to
    `promptseg.distributed.segment_on_ray`. `options` and the options given by name are the core's.
    `progress(total, advance)` is told the number of samples sent, then each one back.
    """
    import fiftyone as fo

    from promptseg.results import ensure_prompt_list
    from promptseg.segmenter import default_model

    started = time.perf_counter()
    if prompts in (None, [], ()):
        raise PromptError("No prompt given: pass prompts such as ['car', 'person'] (runs on Ray take text prompts).")
    fixed = ensure_prompt_list(prompts)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise OptionError(f"batch_size must be a whole number of at least 1, got {batch_size!r}.")
    if is_video_collection(samples):
        raise OptionError("Runs on Ray take image datasets: segment a video dataset with segment_samples.")
    check_output(output)
    options = check_segment_options(options=options, **flat)
    exists = check_label_field(samples, label_field, output)
    dataset = samples._dataset
    model_name = str(model or default_model())

    summary = RunSummary(run_key=run_key_for(label_field), label_field=label_field, total=len(samples))
    config = _run_config(dataset, {"model": model_name}, fixed, None, None, options, overwrite, output)
    if exists and not overwrite:
        _warn_if_settings_changed(dataset, summary, config)
    if not exists:
        dataset.add_sample_field(label_field, fo.EmbeddedDocumentField, embedded_doc_type=label_type(output))
    class_ids = None
    if output == "segmentation":
        class_ids = add_class_ids(class_ids_from_targets(dataset.mask_targets.get(label_field)), fixed)
        _store_mask_targets(dataset, label_field, class_ids)
    todo = samples if overwrite else samples.exists(label_field, False)
    ids, filepaths = todo.values(["id", "filepath"])
    paths = dict(zip(ids, filepaths))
    summary.skipped = summary.total - len(ids)
    if mask_dir is None and mask_path_min_pixels is not None:
        mask_dir = os.path.join(fo.config.default_dataset_dir, "promptseg_masks", dataset.name, label_field)

    writer = _BulkWriter(dataset, label_field, batch_size)
    sources: Counter[str] = Counter()
    description: dict[str, str] = {}
    if progress:
        progress(len(ids), 0)
    try:
        if ids:
            records = distributed.segment_on_ray(
                [{"id": sample_id, "image": paths[sample_id]} for sample_id in ids], fixed,
                model=model_name, actors=actors, address=address, num_cpus_per_actor=num_cpus_per_actor,
                num_gpus_per_actor=num_gpus_per_actor, device=device, dtype=dtype, cache_dir=cache_dir,
                clip=clip, max_pixels=max_pixels, max_retries=max_retries, progress=False, options=options,
            )
            with closing(records):
                for record in records:
                    description = description or record.get("segmenter") or {}
                    sample = _Sample(record["id"], paths[record["id"]])
                    if record["error"]:
                        summary.report_failure(sample, record["error"])
                    else:
                        result = record_to_result(record)
                        writer.add(sample.id, to_label(result, output, fixed, class_ids, mask_dir, sample.id,
                                                       mask_path_min_pixels))
                        summary.processed += 1
                        summary.instances += len(result)
                        sources[result.embedding_source] += 1
                    if progress:
                        progress(len(ids), 1)
    finally:
        writer.flush()
        if class_ids is not None:
            _store_mask_targets(dataset, label_field, class_ids)
        config.segmenter = description or _previous_description(dataset, summary.run_key, model_name)
        summary.embedding_sources = dict(sources)
        summary.seconds = time.perf_counter() - started
        _record_run(samples, summary, config)
    return summary


class _BulkWriter:
    """Labels keyed by sample id, written with one ``set_values`` per `batch_size` of them.

    Only the samples given a label are written; every other sample of the dataset stays as it is.
    """

    def __init__(self, dataset, label_field: str, batch_size: int) -> None:
        self.dataset, self.label_field, self.batch_size = dataset, label_field, batch_size
        self.pending: dict[str, Any] = {}
        self.written = 0

    def add(self, sample_id: str, label) -> None:
        self.pending[sample_id] = label
        if len(self.pending) >= self.batch_size:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        batch, self.pending = self.pending, {}
        self.dataset.set_values(self.label_field, batch, key_field="id", expand_schema=False)
        self.written += len(batch)
        logger.debug("Wrote %d labels to %r (%d in all)", len(batch), self.label_field, self.written)


def _previous_description(dataset, run_key: str, model_name: str) -> dict[str, str]:
    """The segmenter a run that sent nothing to Ray records: the last run's, if it used the same model."""
    if run_key in dataset.list_runs():
        previous = getattr(dataset.get_run_info(run_key).config, "segmenter", None) or {}
        if previous.get("model") == model_name:
            return previous
    return {"model": model_name}
