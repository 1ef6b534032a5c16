"""`SegmentOptions`: every option of `Segmenter.segment`, its default, its check and its help, once.

The options are frozen dataclasses in groups, one per stage that reads them:

* `decoding` (`DecodingOptions`): which detections and mask pixels the prompt decoder keeps;
* `cleanup` (`CleanupOptions`): post-processing of the masks (specks, smoothing, duplicates, top N);
* `tiling` (`TilingOptions`): tiles of a large image;
* `pixels` (`PixelOptions`): how scientific pixels become RGB;
* `clip` (`ClipOptions`): CLIP checks (needs ``load_segmenter(clip=...)``).

A value is checked when its group is made, so a bad option is an `OptionError` before any
work. Hosts that speak in flat names (the CLI, FiftyOne parameters, napari widgets, Label
Studio extra params) use `SegmentOptions.from_flat`, `replace` and `to_flat`; `describe` gives
each option's name, default, type and one-line help for building arguments and forms. Per-call
inputs (the image, prompts, exemplars, progress, cancel) are arguments of `segment`, not options.

This module imports nothing else from promptseg but its errors, so every stage can import it.
"""

from __future__ import annotations

import dataclasses
import difflib
import numbers
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from promptseg.errors import OptionError

DEFAULT_CLIP_THRESHOLD = 0.5
"""CLIPScore below which ``verify=True`` drops an instance when no `clip_threshold` is given (cosine 0.2)."""
MIN_TILE = 16
"""Smallest tile side in pixels."""


def option(default: Any, help: str, *, kind: type, optional: bool = False, minimum: float | None = None,
           maximum: float | None = None, count: int | str | None = None, words: tuple[str, ...] = ()) -> Any:
    """A dataclass field carrying its default and what `OptionInfo` tells hosts about it."""
    meta = {"help": help, "kind": kind, "optional": optional, "minimum": minimum, "maximum": maximum,
            "count": count, "words": words}
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class OptionInfo:
    """One option as hosts need it to build an argument or a form field."""

    name: str
    """The flat name, e.g. ``"threshold"`` (``segment(..., threshold=0.3)``, ``--threshold``)."""
    group: str
    """The `SegmentOptions` field holding it, e.g. ``"decoding"``."""
    default: Any
    help: str
    """One line saying what the option does."""
    kind: type
    """`float`, `int`, `bool` or `str`: the type of the value, or of each item when `count` is set."""
    optional: bool = False
    """Whether None is allowed (its meaning is in `help`)."""
    minimum: float | None = None
    maximum: float | None = None
    count: int | str | None = None
    """None for one value; a number of items (2 for percentiles), or ``"+"`` for one or more."""
    words: tuple[str, ...] = ()
    """Words accepted besides values of `kind` (``("auto",)`` for `tile`)."""

    @property
    def flag(self) -> str:
        """The command-line spelling, e.g. ``--mask-threshold``."""
        return "--" + self.name.replace("_", "-")


# ---------------------------------------------------------------------------------------------------------
# checks, each written once (the messages name the option, the range and the fix)


def _whole(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not _is_bool(value)


def _is_bool(value: Any) -> bool:
    return type(value).__name__ in ("bool", "bool_")  # Python's and numpy's, without importing numpy


def _real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not _is_bool(value)


def _unit(name: str, value: Any, allow_none: bool = False) -> float | None:
    if value is None and allow_none:
        return None
    if not _real(value) or not 0 <= value <= 1:
        raise OptionError(f"{name} must be a number between 0 and 1, got {value!r}.")
    return float(value)


def _pixels(name: str, value: Any) -> int:
    if not _whole(value) or value < 0:
        raise OptionError(f"{name} must be a whole number of pixels >= 0, got {value!r}.")
    return int(value)


def _flag(name: str, value: Any) -> bool:
    if _is_bool(value) or (_whole(value) and value in (0, 1)):
        return bool(value)
    raise OptionError(f"{name} must be True or False, got {value!r}.")


def _set(instance: Any, name: str, value: Any) -> None:
    object.__setattr__(instance, name, value)  # normalise a field of a frozen dataclass in __post_init__


def check_percentiles(percentiles: Any) -> tuple[float, float]:
    """``(low, high)`` as floats, or an `OptionError` unless ``0 <= low < high <= 100``."""
    try:
        low, high = percentiles
        valid = _real(low) and _real(high) and 0 <= low < high <= 100
    except (TypeError, ValueError):
        valid = False
    if not valid:
        raise OptionError(
            f"percentiles={percentiles} is not a valid range: use (low, high) with 0 <= low < high <= 100."
        )
    return float(low), float(high)


def default_overlap(tile: int) -> int:
    """The tile overlap used when none is given: an eighth of the tile."""
    return max(1, tile // 8)


def check_overlap(overlap: Any, tile: int | None) -> int:
    """`overlap` as an int: at least 1 pixel and, for a known tile size, at most half the tile."""
    if not _whole(overlap) or overlap < 1 or (tile is not None and overlap >= tile // 2 + 1):
        half = f"half the tile ({tile // 2})" if tile is not None else "half the tile"
        raise OptionError(
            f"overlap must be between 1 and {half} pixels, got {overlap!r}: "
            "pieces of an object cut by a tile border are joined where they overlap."
        )
    return int(overlap)


# ---------------------------------------------------------------------------------------------------------
# the groups


@dataclass(frozen=True)
class DecodingOptions:
    """What the prompt decoder keeps: detections above `threshold`, mask pixels above `mask_threshold`."""

    threshold: float = option(0.5, "keep instances whose score (detection x presence) is above this, 0..1",
                              kind=float, minimum=0, maximum=1)
    mask_threshold: float = option(0.5, "mask probability cut that binarises masks, strictly between 0 and 1",
                                   kind=float, minimum=0, maximum=1)

    def __post_init__(self) -> None:
        _set(self, "threshold", _unit("threshold", self.threshold))
        mask_threshold = _unit("mask_threshold", self.mask_threshold)
        if mask_threshold in (0, 1):
            usual = _default(DecodingOptions, "mask_threshold")
            raise OptionError(f"mask_threshold must be strictly between 0 and 1 ({usual} is usual).")
        _set(self, "mask_threshold", mask_threshold)


@dataclass(frozen=True)
class CleanupOptions:
    """Post-processing of the decoded masks: specks, smoothing, duplicates, the best N."""

    min_area: int = option(0, "drop masks with fewer pixels than this", kind=int, minimum=0)
    smooth: int = option(0, "close each mask with a disc of this radius in pixels (mask smoothness)",
                         kind=int, minimum=0)
    max_instances: int | None = option(None, "keep the best N instances per image (None: all)",
                                       kind=int, optional=True, minimum=1)
    iou_threshold: float | None = option(0.7, "mask IoU above which two instances of one prompt are "
                                         "duplicates (None: keep both)", kind=float, optional=True, minimum=0,
                                         maximum=1)
    cross_prompt_iou: float | None = option(0.9, "mask IoU above which instances of different prompts are "
                                            "duplicates (None: keep both)", kind=float, optional=True, minimum=0,
                                            maximum=1)

    def __post_init__(self) -> None:
        _set(self, "iou_threshold", _unit("iou_threshold", self.iou_threshold, allow_none=True))
        _set(self, "cross_prompt_iou", _unit("cross_prompt_iou", self.cross_prompt_iou, allow_none=True))
        _set(self, "min_area", _pixels("min_area", self.min_area))
        _set(self, "smooth", _pixels("smooth", self.smooth))
        if self.max_instances is not None:
            if not _whole(self.max_instances) or self.max_instances < 1:
                raise OptionError(f"max_instances must be None or a whole number >= 1, got {self.max_instances!r}.")
            _set(self, "max_instances", int(self.max_instances))


@dataclass(frozen=True)
class TilingOptions:
    """Tiles of a large image, each embedded at the model's resolution, objects stitched back."""

    tile: int | str | None = option(None, "split the image into overlapping tiles of this many pixels ('auto': "
                                    "when much larger than the model input; None: no tiling)",
                                    kind=int, optional=True, minimum=MIN_TILE, words=("auto",))
    overlap: int | None = option(None, "tile overlap in pixels (None: an eighth of the tile)",
                                 kind=int, optional=True, minimum=1)

    def __post_init__(self) -> None:
        tile = None if self.tile is False else self.tile
        if isinstance(tile, str) and tile != "auto":
            raise OptionError(f"tile must be a number of pixels, 'auto' or None, got {tile!r}.")
        if tile is not None and tile != "auto":
            if not _whole(tile) or tile < MIN_TILE:
                raise OptionError(f"tile must be at least {MIN_TILE} pixels (or 'auto' or None), got {tile!r}.")
            tile = int(tile)
        _set(self, "tile", tile)
        if self.overlap is not None:
            _set(self, "overlap", check_overlap(self.overlap, tile if isinstance(tile, int) else None))


@dataclass(frozen=True)
class PixelOptions:
    """How non-8-bit and multichannel pixels become the RGB the model sees."""

    percentiles: tuple[float, float] = option((0.5, 99.5), "for 16-bit/float images: intensity percentiles "
                                              "(low, high) mapped to black and white", kind=float, minimum=0,
                                              maximum=100, count=2)
    channels: tuple[int, ...] | None = option(None, "for multichannel images: one to three channel indices shown "
                                              "as RGB (None: the first three)", kind=int, optional=True, minimum=0,
                                              count="+")

    def __post_init__(self) -> None:
        _set(self, "percentiles", check_percentiles(self.percentiles))
        if self.channels is not None:
            channels = (self.channels,) if _whole(self.channels) else self.channels
            try:
                picked = tuple(channels)
            except TypeError:
                picked = ()
            if not 1 <= len(picked) <= 3 or not all(_whole(c) and c >= 0 for c in picked):
                raise OptionError(
                    f"channels must be one to three channel indices (whole numbers >= 0), got {self.channels!r}."
                )
            _set(self, "channels", tuple(int(c) for c in picked))


@dataclass(frozen=True)
class ClipOptions:
    """CLIP checks of the final instances; each needs a CLIP model (``load_segmenter(clip=...)``)."""

    verify: bool = option(False, "drop instances CLIP does not confirm (CLIPScore below clip_threshold)", kind=bool)
    clip_threshold: float | None = option(None, "minimum CLIPScore, 0..1; implies verify (None: "
                                          f"{DEFAULT_CLIP_THRESHOLD} with verify)", kind=float, optional=True,
                                          minimum=0, maximum=1)
    negative: tuple[str, ...] = option((), "phrases such as 'toy car': drop instances closer to one of them than "
                                       "to their prompt", kind=str, count="+")
    negative_margin: float = option(0.0, "how much closer (cosine) a negative must be to drop an instance, -2..2",
                                    kind=float, minimum=-2, maximum=2)
    exclusive: bool = option(False, "one label per object: CLIP picks among the prompts where masks overlap",
                             kind=bool)

    def __post_init__(self) -> None:
        _set(self, "verify", _flag("verify", self.verify))
        _set(self, "exclusive", _flag("exclusive", self.exclusive))
        if self.clip_threshold is not None:
            if not _real(self.clip_threshold) or not 0 <= self.clip_threshold <= 1:
                raise OptionError(f"clip_threshold must be a CLIPScore between 0 and 1, got {self.clip_threshold!r}.")
            _set(self, "clip_threshold", float(self.clip_threshold))
        if not _real(self.negative_margin) or not -2 <= self.negative_margin <= 2:
            raise OptionError(
                f"negative_margin must be a cosine difference between -2 and 2, got {self.negative_margin!r}."
            )
        _set(self, "negative_margin", float(self.negative_margin))
        _set(self, "negative", _negative_phrases(self.negative))

    @property
    def asked(self) -> list[str]:
        """The CLIP decisions asked for (empty: CLIP only re-scores, when a model is loaded)."""
        return [name for name, on in (("verify", self.verify), ("clip_threshold", self.clip_threshold is not None),
                                      ("negative", bool(self.negative)), ("exclusive", self.exclusive)) if on]

    @property
    def threshold(self) -> float:
        """The CLIPScore cut that verification uses."""
        return DEFAULT_CLIP_THRESHOLD if self.clip_threshold is None else self.clip_threshold


def _negative_phrases(negative: Any) -> tuple[str, ...]:
    if negative is None:
        return ()
    phrases = [negative] if isinstance(negative, str) else list(negative)
    cleaned = []
    for phrase in phrases:
        if not isinstance(phrase, str) or not phrase.split():
            raise OptionError(f"Negative prompts must be non-empty strings such as 'toy car', got {phrase!r}.")
        cleaned.append(" ".join(phrase.split()))
    return tuple(dict.fromkeys(cleaned))


# ---------------------------------------------------------------------------------------------------------
# all of them


GROUPS: dict[str, type] = {
    "decoding": DecodingOptions,
    "cleanup": CleanupOptions,
    "tiling": TilingOptions,
    "pixels": PixelOptions,
    "clip": ClipOptions,
}


@dataclass(frozen=True)
class SegmentOptions:
    """Every option of `Segmenter.segment`, in one frozen, checked object.

    ``SegmentOptions.from_flat(threshold=0.3, tile="auto")`` builds one from flat names (the
    keywords `segment` takes); ``options.replace(min_area=50)`` changes some; ``options.to_flat()``
    gives them all back by name; ``SegmentOptions.describe()`` lists each option's name, group,
    default, type and help. Unknown names are an `OptionError` listing the valid ones.
    """

    decoding: DecodingOptions = field(default_factory=DecodingOptions)
    cleanup: CleanupOptions = field(default_factory=CleanupOptions)
    tiling: TilingOptions = field(default_factory=TilingOptions)
    pixels: PixelOptions = field(default_factory=PixelOptions)
    clip: ClipOptions = field(default_factory=ClipOptions)

    def __post_init__(self) -> None:
        for name, kind in GROUPS.items():
            value = getattr(self, name)
            if isinstance(value, Mapping):
                value = _build(kind, value)
                _set(self, name, value)
            if not isinstance(value, kind):
                raise OptionError(f"SegmentOptions.{name} must be a {kind.__name__}, got {type(value).__name__}.")

    @classmethod
    def from_flat(cls, **flat: Any) -> SegmentOptions:
        """Options from flat names (``threshold=0.3, tile=1008, verify=True``); the rest keep their defaults."""
        return cls().replace(**flat)

    def replace(self, **flat: Any) -> SegmentOptions:
        """A copy with the named options changed (flat names, or whole groups such as ``tiling=...``)."""
        if not flat:
            return self
        check_names(flat)
        groups = {name: flat.pop(name) for name in list(flat) if name in GROUPS}
        for name, group in groups.items():
            if isinstance(group, Mapping):
                groups[name] = _build(GROUPS[name], group)
        for name in GROUPS:
            changes = {key: flat[key] for key in _group_names(name) if key in flat}
            if changes:
                groups[name] = dataclasses.replace(groups.get(name, getattr(self, name)), **changes)
        return dataclasses.replace(self, **groups)

    def to_flat(self) -> dict[str, Any]:
        """Every option by its flat name, in `describe` order (``from_flat(**o.to_flat()) == o``)."""
        return {info.name: getattr(getattr(self, info.group), info.name) for info in describe()}

    def changed(self) -> dict[str, Any]:
        """The options that differ from their defaults, by flat name (for run records and command lines)."""
        defaults = SegmentOptions().to_flat()
        return {name: value for name, value in self.to_flat().items() if value != defaults[name]}

    @staticmethod
    def describe() -> tuple[OptionInfo, ...]:
        """Each option's name, group, default, type and one-line help, in a stable order."""
        return describe()

    @staticmethod
    def names() -> tuple[str, ...]:
        """The flat option names, in `describe` order."""
        return tuple(info.name for info in describe())


def _build(kind: type, values: Mapping[str, Any]) -> Any:
    unknown = [name for name in values if name not in {f.name for f in dataclasses.fields(kind)}]
    if unknown:
        raise OptionError(_unknown_message(unknown, [f.name for f in dataclasses.fields(kind)], kind.__name__))
    return kind(**values)


def _group_names(group: str) -> list[str]:
    return [f.name for f in dataclasses.fields(GROUPS[group])]


def _default(kind: type, name: str) -> Any:
    return next(f.default for f in dataclasses.fields(kind) if f.name == name)


_DESCRIBED: tuple[OptionInfo, ...] = ()


def describe() -> tuple[OptionInfo, ...]:
    """`OptionInfo` for every option of every group (see `SegmentOptions.describe`)."""
    global _DESCRIBED
    if not _DESCRIBED:
        _DESCRIBED = tuple(
            OptionInfo(name=f.name, group=group, default=f.default, **f.metadata)
            for group, kind in GROUPS.items() for f in dataclasses.fields(kind)
        )
    return _DESCRIBED


def option_info(name: str) -> OptionInfo:
    """The `OptionInfo` of one flat name (an `OptionError` for an unknown one)."""
    check_names([name])
    return next(info for info in describe() if info.name == name)


def check_names(names: Sequence[str] | Mapping[str, Any] | Iterator[str]) -> None:
    """Raise `OptionError` naming the unknown option names and listing the valid ones."""
    valid = [*SegmentOptions.names(), *GROUPS]
    unknown = [name for name in names if name not in valid]
    if unknown:
        raise OptionError(_unknown_message(unknown, list(SegmentOptions.names()), "Segmenter.segment"))


def _unknown_message(unknown: list[str], valid: list[str], owner: str) -> str:
    hints = [repr(close[0]) for name in unknown if (close := difflib.get_close_matches(name, valid, 1))]
    plural = "s" if len(unknown) > 1 else ""
    return (
        f"Unknown option{plural} {', '.join(map(repr, unknown))}: {owner} takes {', '.join(valid)}."
        + (f" Did you mean {' and '.join(hints)}?" if hints else "")
    )


def resolve_options(options: Any = None, flat: Mapping[str, Any] | None = None) -> SegmentOptions:
    """One `SegmentOptions` from what `segment` received: an options object (or a mapping of flat
    names, or None) with flat keyword options applied on top."""
    flat = dict(flat or {})
    if options is None:
        return SegmentOptions.from_flat(**flat)
    if isinstance(options, Mapping):
        return SegmentOptions.from_flat(**{**options, **flat})
    if not isinstance(options, SegmentOptions):
        raise OptionError(
            f"options must be a SegmentOptions (or a dict of option names), got {type(options).__name__}: "
            "pass options=SegmentOptions(...) or the options by name, e.g. threshold=0.3."
        )
    return options.replace(**flat)


__all__ = [
    "DEFAULT_CLIP_THRESHOLD",
    "CleanupOptions",
    "ClipOptions",
    "DecodingOptions",
    "OptionInfo",
    "PixelOptions",
    "SegmentOptions",
    "TilingOptions",
    "check_names",
    "describe",
    "option_info",
    "resolve_options",
]
