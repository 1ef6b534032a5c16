"""Segmenters shared by every host adapter in one process: each loaded once, the last two kept.

A FiftyOne App server or delegated worker, a napari viewer and a Label Studio backend each live
for many runs. Keeping the model loaded (with its in-memory embedding cache) is what lets a
second prompt on the same image skip the model load and the image encoder. Two segmenters are
kept, so switching back and forth between two models (or one model with and without CLIP) does
not reload either; a third drops the least recently used one.

    from promptseg.sessions import shared_segmenter, clear_shared_segmenters
    segmenter = shared_segmenter("facebook/sam3", device="cuda")  # loads
    segmenter is shared_segmenter("facebook/sam3", device="cuda")  # True: no second load
    clear_shared_segmenters()                                      # forget them all
"""

from __future__ import annotations

import inspect
import logging
import os
import threading
from collections import OrderedDict
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from promptseg.segmenter import Segmenter

logger = logging.getLogger(__name__)

MAX_SHARED = 2
"""Segmenters kept loaded at once; beyond this the least recently used one is dropped."""

_entries: OrderedDict[tuple, Future] = OrderedDict()
_lock = threading.Lock()


def shared_segmenter(model: str | None = None, device: Any = "auto", dtype: Any = "auto",
                     **load_options: Any) -> Segmenter:
    """The process-wide `Segmenter` for these `load_segmenter` arguments, loaded on first use.

    Calls with the same arguments (a default spelled out or left out alike) get the same object.
    Threads asking for a segmenter that is being loaded wait for that one load; a load never
    blocks callers of another segmenter. A failed load is raised to every caller waiting for it
    and is not kept, so the next call tries again. Dropping a segmenter from this cache frees it
    once no caller holds it any more.
    """
    from promptseg import segmenter as core

    model = model or core.default_model()
    key = _key(core.load_segmenter, model, device, dtype, load_options)
    with _lock:
        entry = _entries.get(key)
        loads = entry is None
        if loads:
            entry = _entries[key] = Future()
        _entries.move_to_end(key)
    if not loads:
        return entry.result()
    logger.info("Loading shared segmenter %s (device %s, dtype %s)", model, device, dtype)
    try:
        segmenter = core.load_segmenter(model, device=device, dtype=dtype, **load_options)
    except BaseException as exc:
        with _lock:
            if _entries.get(key) is entry:
                del _entries[key]
        entry.set_exception(exc)
        raise
    entry.set_result(segmenter)
    with _lock:
        if _entries.get(key) is entry:
            _entries.move_to_end(key)  # a finished load counts as the latest use
        dropped = []
        while len(_entries) > MAX_SHARED:
            key, entry = _entries.popitem(last=False)
            logger.info("Dropping shared segmenter %s (keeping the %d most recently used)", dict(key)["model"], MAX_SHARED)
            dropped.append(entry)
    _release(dropped)
    return segmenter


def clear_shared_segmenters() -> None:
    """Forget every shared segmenter: the next `shared_segmenter` call loads afresh.

    Memory is freed once no run still holds a segmenter; a load under way finishes for its callers.
    """
    with _lock:
        dropped = list(_entries.values())
        _entries.clear()
    _release(dropped)


def _release(entries: list[Future]) -> None:
    """Free what dropped segmenters hold on their device once no caller holds them: their caches now
    (a caller still using one recomputes what it needs), their model when the last reference goes."""
    from promptseg.device import release_device_memory

    devices = set()
    while entries:  # emptied as it goes, so the caller's list keeps nothing alive
        entry = entries.pop()
        if entry.done() and entry.exception() is None:
            segmenter = entry.result()
            segmenter.cache.release()
            devices.add(segmenter.device)
            del segmenter
        del entry
    for device in devices:
        release_device_memory(device)


def _key(load, model, device, dtype, load_options: dict[str, Any]) -> tuple:
    """The arguments of `load` as a hashable tuple, defaults filled in (so given == left out)."""
    bound = inspect.signature(load).bind(model, device, dtype, **load_options)
    bound.apply_defaults()
    return tuple((name, _frozen(value)) for name, value in bound.arguments.items())


def _frozen(value: Any) -> Any:
    """`value` as something hashable that compares equal for equal settings (paths as strings)."""
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, dict):
        return tuple(sorted((str(k), _frozen(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_frozen(v) for v in value)
    if isinstance(value, (set, frozenset)):
        return frozenset(_frozen(v) for v in value)
    if type(value).__module__ == "torch":  # torch.device / torch.dtype: by their names
        return str(value)
    try:
        hash(value)
    except TypeError:
        return repr(value)
    return value


__all__ = ["MAX_SHARED", "clear_shared_segmenters", "shared_segmenter"]
