"""Segment many images on a Ray cluster: a Ray Data pipeline over a pool of actors that each keep one
loaded segmenter, with results streamed back as compact records (see `promptseg.distributed.records`).

Ray is imported only when a run starts, so ``import promptseg`` never needs it.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import warnings
from functools import partial
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import PurePosixPath
from typing import Any
from urllib.parse import urlsplit

from promptseg.distributed.records import error_record, result_to_record
from promptseg.errors import ImageError, ModelLoadError, OptionError

logger = logging.getLogger(__name__)

URL_MARK = "://"
MAX_BLOCKS = 4096


def segment_on_ray(
    items: Iterable[Any],
    prompts: str | Sequence[str],
    *,
    model: str | None = None,
    actors: int = 2,
    address: str | None = None,
    num_cpus_per_actor: float = 1,
    num_gpus_per_actor: float = 0,
    device: str | None = None,
    dtype: str = "auto",
    cache_dir: str | os.PathLike | bool | None = None,
    clip: str | bool | None = None,
    max_pixels: int | None = None,
    batch_size: int = 1,
    max_retries: int = 3,
    progress: bool = True,
    options: Any = None,
    **flat: Any,
) -> Iterator[dict[str, Any]]:
    """Segment every item with `prompts` on `actors` Ray actors; yield one record per item as it is done.

    `items` are image paths, URLs (``s3://``, ``https://``... read through fsspec), or mappings
    ``{"id": ..., "image": ...}`` whose image is a path, URL, array or PIL image (an id defaults to
    the path, else the item's position). Each record is a dict keyed by ``"id"`` with the image size,
    the instances (``segmentation`` as COCO RLE, ``box``, ``score``, ``label``...), the segmenter's
    `describe()` under ``"segmenter"`` and ``"error"``: an unreadable image gives a record whose
    ``"error"`` is the `ImageError` message, and the run goes on. `record_to_result` turns a record
    back into a `SegmentationResult`.

    Each actor loads one segmenter (`model`, `dtype` ``"auto"``: fp16 on GPUs) with
    `num_cpus_per_actor` CPUs (torch uses that many threads) and `num_gpus_per_actor` GPUs (then
    `device` defaults to ``"cuda"``). An actor that dies is restarted and the batch it was on retried
    up to `max_retries` times (at least 1); a batch that still kills its actor gives error records
    saying so. Every item is yielded exactly once. `address` is a Ray cluster's address
    (``"auto"``: the one this machine belongs to); without it, a Ray this process is already
    connected to is used, else a local one is started with ``actors x num_cpus_per_actor`` CPUs and
    stopped at the end. `options` and the options given by name are those of `Segmenter.segment`,
    checked here before any actor starts. `progress` shows a tqdm bar over the items.
    """
    from promptseg.options import resolve_options
    from promptseg.results import ensure_prompt_list
    from promptseg.segmenter import default_model

    labels = ensure_prompt_list(prompts)
    checked = resolve_options(options, flat)
    entries = _entries(items)
    _check_resources(actors, num_cpus_per_actor, num_gpus_per_actor, batch_size, max_retries)
    load = {"model": str(model or default_model()), "dtype": dtype, "max_pixels": max_pixels, "clip": clip,
            "device": device or ("cuda" if num_gpus_per_actor else "cpu"),
            "cache_dir": cache_dir if isinstance(cache_dir, bool) or cache_dir is None else str(cache_dir)}
    if not entries:
        return iter(())
    ray = _import_ray()
    # everything above runs at the call, so a bad request fails before the caller prepares anything;
    # the cluster is joined when the first record is asked for
    return _stream(ray, address, entries, labels, checked, load, actors, num_cpus_per_actor, num_gpus_per_actor,
                   batch_size, max_retries, progress)


def _stream(ray, address, entries, labels, options, load, actors, cpus, gpus, batch_size, retries, progress):
    """Join (or start) Ray, run the pipeline, and stop a Ray started here when the records end."""
    started = _connect(ray, address, actors * cpus)
    try:
        _check_cluster(ray, address, cpus, gpus)
        yield from _run(ray, entries, labels, options, load, actors, cpus, gpus, batch_size, retries, progress)
    finally:
        if started:
            ray.shutdown()


def _run(ray, entries, labels, options, load, actors, cpus, gpus, batch_size, retries, progress) -> Iterator[dict]:
    """Build the pipeline, stream its rows, drop repeats (a retried batch may be delivered twice)."""
    from ray import cloudpickle
    from tqdm import tqdm

    rows = [{"id": item_id, "image": cloudpickle.dumps(image)} for item_id, image in entries]
    batches = -(-len(rows) // batch_size)
    # one block per batch (up to MAX_BLOCKS): actors share the work evenly, and a retry redoes one batch
    items = ray.data.from_items(rows, override_num_blocks=min(batches, MAX_BLOCKS))
    # one batch in flight per actor: an actor that dies takes only the batch it was segmenting with it
    pool = ray.data.ActorPoolStrategy(size=min(actors, batches), max_tasks_in_flight_per_actor=1)
    with warnings.catch_warnings():
        # the only way Ray Data (< 2.64, pinned in the `ray` extra) takes a limit on actor restarts
        warnings.filterwarnings("ignore", message="`ray_remote_args_fn` is deprecated")
        pipeline = items.map_batches(
            SegmentWorker,
            fn_constructor_kwargs={"prompts": labels, "options": options, "load": load, "threads": max(1, int(cpus))},
            batch_size=batch_size, batch_format="numpy", compute=pool,
            num_cpus=cpus, num_gpus=gpus, ray_remote_args_fn=partial(_restarts, retries),
        )
    # a batch whose actor died on it more than `retries` times is dropped, not the run: its items
    # become error records below
    pipeline.context.max_errored_blocks = -1
    seen: set[str] = set()
    with tqdm(total=len(rows), desc="Segmenting", unit="image", disable=None if progress else True) as bar:
        for row in _rows(ray, pipeline):
            item_id = str(row["id"])
            if item_id in seen:
                logger.info("Item %s was delivered twice (its batch was retried): kept once", item_id)
                continue
            seen.add(item_id)
            bar.update(1)
            yield json.loads(row["record"])
        for item_id, image in entries:
            if item_id not in seen:
                bar.update(1)
                yield error_record(item_id, str(image) if isinstance(image, (str, os.PathLike)) else None,
                                   lost_message(retries, batch_size), {})


def _rows(ray, pipeline) -> Iterator[dict]:
    """The pipeline's rows; an actor that cannot start (the model does not load there) is that error."""
    try:
        yield from pipeline.iter_rows()
    except ray.exceptions.RayActorError as exc:
        if not getattr(exc, "_actor_init_failed", False):
            raise
        # the actor's exception reaches the driver as text only: its last line names the error
        lines = [line for line in str(getattr(exc, "error_msg", exc)).splitlines() if line.startswith("promptseg.errors.")]
        cause = lines[-1].partition(": ")[2] if lines else str(exc).splitlines()[0]
        raise ModelLoadError(
            f"The Ray actors could not load the segmenter: {cause} Every machine of the cluster needs "
            "promptseg installed and the model reachable (a hub id, or a folder at the same path on each)."
        ) from exc


def lost_message(retries: int, batch_size: int) -> str:
    """What an item gets whose actor died on its batch every time (a crash or an out-of-memory kill)."""
    batch = "" if batch_size == 1 else f" (or another item of its batch of {batch_size})"
    return (f"The Ray actor segmenting this image died {retries + 1} time(s) on it{batch}: a crash while "
            "reading or segmenting it, or the actor ran out of memory. Segment it alone (promptseg segment "
            "without --ray) to see the error, or give each actor more memory.")


def _restarts(retries: int) -> dict[str, int]:
    """Each actor's remote options: a dead actor is always restarted (a long run may lose many), and
    the batch it died on is retried `retries` times (Ray Data's own default is without limit: an
    image that always kills its reader would loop)."""
    return {"max_restarts": -1, "max_task_retries": retries}


class SegmentWorker:
    """A Ray Data actor: loads one segmenter when it starts and segments batches of pickled images."""

    def __init__(self, prompts: list[str], options: Any, load: dict[str, Any], threads: int) -> None:
        import torch

        from promptseg.segmenter import load_segmenter

        torch.set_num_threads(threads)
        self.segmenter = load_segmenter(**load)
        self.options = options
        self.query = self.segmenter.query(prompts, options)
        self.description = self.segmenter.describe()

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        from ray import cloudpickle

        records = [self.segment(str(item_id), cloudpickle.loads(payload))
                   for item_id, payload in zip(batch["id"], batch["image"])]
        return {"id": [record["id"] for record in records], "record": [json.dumps(record) for record in records]}

    def segment(self, item_id: str, image: Any) -> dict[str, Any]:
        """One item's record; an image that cannot be read is an error record, not a failed batch."""
        source = str(image) if isinstance(image, (str, os.PathLike)) else None
        try:
            rgb = self._load(image)
            result = self.segmenter.segment_rgb(rgb, self.query, self.options)
        except ImageError as exc:
            logger.warning("Skipping %s: %s", source or item_id, exc)
            return error_record(item_id, source, str(exc), self.description)
        result.source = source
        return result_to_record(item_id, result, self.description)

    def _load(self, image: Any):
        if isinstance(image, str) and URL_MARK in image and not image.startswith("file://"):
            with fetched(image) as path:
                return self.segmenter.load(path, self.options.pixels)
        return self.segmenter.load(image, self.options.pixels)


class fetched:
    """A URL's bytes in a temporary local file (same suffix), read through fsspec, removed on exit."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.path: str | None = None

    def __enter__(self) -> str:
        import fsspec

        handle, self.path = tempfile.mkstemp(suffix=PurePosixPath(urlsplit(self.url).path).suffix)
        try:
            with os.fdopen(handle, "wb") as local, fsspec.open(self.url, "rb") as remote:
                local.write(remote.read())
        except (OSError, ValueError, ImportError) as exc:
            raise ImageError(
                f"Cannot read {self.url}: {type(exc).__name__}: {exc}. Check the URL, that the workers can "
                "reach it, and its file system's package and credentials (fsspec: s3fs for s3://, gcsfs for gs://)."
            ) from exc
        return self.path

    def __exit__(self, *exc_info) -> None:
        if self.path:
            os.unlink(self.path)


def _entries(items: Iterable[Any]) -> list[tuple[str, Any]]:
    """``(id, image)`` per item; a repeated id is an `OptionError` (results are keyed by it)."""
    entries, seen = [], set()
    for position, item in enumerate(items):
        if isinstance(item, Mapping):
            if "image" not in item:
                raise OptionError(f"Item {position} is a mapping without an 'image' key: pass "
                                  "{'id': ..., 'image': path, URL or array}.")
            image = item["image"]
            item_id = item.get("id")
        else:
            image, item_id = item, None
        if item_id is None:
            item_id = str(image) if isinstance(image, (str, os.PathLike)) else str(position)
        item_id = str(item_id)
        if item_id in seen:
            raise OptionError(f"Two items share the id {item_id!r}: results are keyed by id, so give each "
                              "item its own (a path given twice is segmented once: drop the repeat).")
        seen.add(item_id)
        entries.append((item_id, image))
    return entries


def _check_resources(actors: Any, cpus: Any, gpus: Any, batch_size: Any, retries: Any) -> None:
    if not isinstance(actors, int) or isinstance(actors, bool) or actors < 1:
        raise OptionError(f"actors must be a whole number of at least 1, got {actors!r}.")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise OptionError(f"batch_size must be a whole number of at least 1, got {batch_size!r}.")
    if not isinstance(retries, int) or isinstance(retries, bool) or retries < 1:
        # measured: with no restart, Ray Data dropped another actor's batch along with the dead one's
        raise OptionError(f"max_retries must be a whole number of at least 1, got {retries!r}.")
    for name, value in (("num_cpus_per_actor", cpus), ("num_gpus_per_actor", gpus)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise OptionError(f"{name} must be a number of 0 or more, got {value!r}.")
    if cpus == 0 and gpus == 0:
        raise OptionError("An actor needs a CPU or a GPU: give num_cpus_per_actor or num_gpus_per_actor above 0.")


def _check_cluster(ray, address: str | None, cpus: float, gpus: float) -> None:
    """Refuse actors that no machine of a local Ray can hold (Ray would wait for them for ever); on a
    cluster, only warn: an autoscaler may still add such machines."""
    have = ray.cluster_resources()
    for name, need in (("CPU", cpus), ("GPU", gpus)):
        if need > have.get(name, 0):
            message = (f"Each actor asks for {need:g} {name}(s) but the Ray cluster has {have.get(name, 0):g}: "
                       "ask for fewer per actor (num_cpus_per_actor / num_gpus_per_actor; on the command line "
                       "leave out --device cuda), or run on a cluster that has them.")
            if address:
                logger.warning("%s The actors wait until the cluster has them.", message)
            else:
                raise OptionError(message)


def _import_ray():
    try:
        import ray
        import ray.data
    except ImportError as exc:
        raise OptionError(
            f"Running on Ray needs Ray Data ({exc}): install it with `pip install 'promptseg[ray]'`."
        ) from exc
    return ray


def _connect(ray, address: str | None, num_cpus: float) -> bool:
    """Join the cluster at `address`, or the Ray already running in this process, or start a local one
    (no dashboard). True when this call started the connection (and so ends it)."""
    if ray.is_initialized():
        return False
    try:
        if address:
            ray.init(address=address, configure_logging=False)
        else:
            ray.init(num_cpus=max(1, int(round(num_cpus))), include_dashboard=False,
                     _node_ip_address="127.0.0.1", configure_logging=False)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = f"the Ray cluster at {address}" if address else "a local Ray"
        raise OptionError(
            f"Cannot start or reach {where}: {exc}. Start the cluster with `ray start --head` and pass "
            "its address (HOST:6379, or 'auto' on one of its machines), or leave the address out to run "
            "a local Ray."
        ) from exc
    return True
