"""`SegmentOptions`: one frozen, checked object holding every option of `segment`, each default once.

The flat names (``threshold=0.3``) the CLI and the hosts use map onto it and back; unknown names
and out-of-range values are an `OptionError` before any work; passing the object or the same
options by name gives the same result on the tiny random SAM 3.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
from pathlib import Path

import numpy as np
import pytest

import promptseg
from promptseg.errors import OptionError
from promptseg.options import (
    CleanupOptions,
    ClipOptions,
    DecodingOptions,
    PixelOptions,
    SegmentOptions,
    TilingOptions,
    describe,
    option_info,
)

CORE = Path(__file__).resolve().parents[1] / "core"
CHANGED = {  # a value other than the default for every option
    "threshold": 0.25, "mask_threshold": 0.4, "min_area": 12, "smooth": 2, "max_instances": 3,
    "iou_threshold": None, "cross_prompt_iou": 0.5, "tile": 128, "overlap": 20, "percentiles": (1.0, 99.0),
    "channels": (2, 1, 0), "verify": True, "clip_threshold": 0.6, "negative": ("toy car",),
    "negative_margin": 0.1, "exclusive": True,
}


def test_every_option_is_described_once_with_its_default_and_help():
    infos = describe()
    names = [info.name for info in infos]
    assert names == list(CHANGED) == list(SegmentOptions.names())  # one name per option, no two alike
    defaults = SegmentOptions().to_flat()
    for info in infos:
        assert defaults[info.name] == info.default
        assert info.help and "\n" not in info.help
        assert info.flag == "--" + info.name.replace("_", "-")
        group = getattr(SegmentOptions(), info.group)
        assert info.name in {f.name for f in dataclasses.fields(group)}
    assert option_info("tile").words == ("auto",) and option_info("percentiles").count == 2
    assert promptseg.SegmentOptions is SegmentOptions


def test_segment_writes_no_option_default_of_its_own():
    """The API's signatures take options by name without repeating their defaults."""
    from promptseg.segmenter import Segmenter

    for method in (Segmenter.segment, Segmenter.segment_batch, Segmenter.segment_stack):
        parameters = inspect.signature(method).parameters
        assert not set(parameters) & set(SegmentOptions.names()), method.__name__
        assert any(p.kind is p.VAR_KEYWORD for p in parameters.values())


def test_flat_round_trip_and_replace():
    options = SegmentOptions.from_flat(**CHANGED)
    assert options.to_flat() == CHANGED
    assert SegmentOptions.from_flat(**options.to_flat()) == options
    assert options.changed() == CHANGED and SegmentOptions().changed() == {}
    assert options.decoding == DecodingOptions(0.25, 0.4)
    assert options.tiling == TilingOptions(tile=128, overlap=20)
    lower = options.replace(threshold=0.1, tiling=TilingOptions())
    assert lower.decoding.threshold == 0.1 and lower.tiling.tile is None
    assert options.decoding.threshold == 0.25  # the original is unchanged
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.decoding.threshold = 0.9
    assert hash(options) == hash(SegmentOptions.from_flat(**CHANGED))  # usable as a key


def test_values_are_normalised_to_plain_python():
    options = SegmentOptions.from_flat(
        threshold=np.float32(0.5), min_area=np.int64(3), channels=[np.int32(1)], percentiles=[1, 99],
        negative=" toy   car ", tile=False, verify=np.bool_(True),
    )
    flat = options.to_flat()
    assert type(flat["threshold"]) is float and type(flat["min_area"]) is int
    assert flat["channels"] == (1,) and flat["percentiles"] == (1.0, 99.0)
    assert flat["negative"] == ("toy car",) and flat["tile"] is None and flat["verify"] is True
    assert SegmentOptions.from_flat(negative=["a", "a", "b"]).clip.negative == ("a", "b")


@pytest.mark.parametrize(
    "flat, words",
    [
        ({"threshold": 1.5}, "threshold must be a number between 0 and 1"),
        ({"mask_threshold": 0}, "strictly between 0 and 1 \\(0.5 is usual\\)"),
        ({"min_area": -3}, "min_area must be a whole number of pixels >= 0"),
        ({"max_instances": 0}, "max_instances must be None or a whole number >= 1"),
        ({"tile": "huge"}, "tile must be a number of pixels, 'auto' or None"),
        ({"tile": 8}, "tile must be at least 16 pixels"),
        ({"tile": 100, "overlap": 51}, "overlap must be between 1 and half the tile \\(50\\)"),
        ({"tile": "auto", "overlap": 0}, "overlap must be between 1 and half the tile pixels"),
        ({"percentiles": (99, 1)}, "percentiles=\\(99, 1\\) is not a valid range"),
        ({"percentiles": 5}, "percentiles=5 is not a valid range"),
        ({"channels": (0, 1, 2, 3)}, "channels must be one to three channel indices"),
        ({"channels": (-1,)}, "channels must be one to three channel indices"),
        ({"verify": "yes"}, "verify must be True or False"),
        ({"clip_threshold": 2}, "clip_threshold must be a CLIPScore between 0 and 1"),
        ({"negative": ["ok", ""]}, "Negative prompts must be non-empty strings"),
        ({"negative_margin": 3}, "negative_margin must be a cosine difference between -2 and 2"),
    ],
)
def test_bad_values_are_an_option_error_naming_the_option(flat, words):
    with pytest.raises(OptionError, match=words):
        SegmentOptions.from_flat(**flat)
    with pytest.raises(OptionError, match=words):
        SegmentOptions().replace(**flat)


def test_groups_check_their_own_values():
    with pytest.raises(OptionError, match="iou_threshold must be a number between 0 and 1"):
        CleanupOptions(iou_threshold=-0.1)
    with pytest.raises(OptionError, match="percentiles"):
        PixelOptions(percentiles=(0, 101))
    with pytest.raises(OptionError, match="SegmentOptions.cleanup must be a CleanupOptions"):
        SegmentOptions(cleanup=DecodingOptions())
    assert SegmentOptions(clip={"verify": True}).clip == ClipOptions(verify=True)
    with pytest.raises(OptionError, match="Unknown option 'verfy': ClipOptions takes verify"):
        SegmentOptions(clip={"verfy": True})


def test_unknown_names_list_the_valid_ones_and_the_nearest():
    with pytest.raises(OptionError) as caught:
        SegmentOptions.from_flat(thresold=0.3, colour="red")
    message = str(caught.value)
    assert message.startswith("Unknown options 'thresold', 'colour': Segmenter.segment takes threshold, ")
    assert ", ".join(SegmentOptions.names()) in message and "Did you mean 'threshold'?" in message
    with pytest.raises(OptionError, match="Unknown option 'exemplar': "):
        SegmentOptions().replace(exemplar=[(0, 0, 5, 5)])


def test_unknown_or_bad_option_fails_segment_before_any_work(segmenter, rgb_image):
    with pytest.raises(OptionError, match="Unknown option 'thresold': Segmenter.segment takes threshold"):
        segmenter.segment(rgb_image, "cat", thresold=0.3)
    with pytest.raises(OptionError, match="options must be a SegmentOptions"):
        segmenter.segment(rgb_image, "cat", "threshold=0.3")
    with pytest.raises(OptionError, match="tile must be at least 16"):
        list(segmenter.segment_batch([rgb_image], "cat", tile=4))
    with pytest.raises(OptionError, match="min_area"):
        segmenter.segment_stack(np.zeros((2, 32, 32), np.uint8), "cat", min_area=-1)
    assert segmenter.stats.image_encoder_runs == 0


def test_an_options_object_and_the_same_options_by_name_give_the_same_result(segmenter, rgb_image):
    by_name = segmenter.segment(rgb_image, ["red square", "green square"], threshold=0.0, min_area=5, smooth=1)
    options = SegmentOptions.from_flat(threshold=0.0, min_area=5, smooth=1)
    as_object = segmenter.segment(rgb_image, ["red square", "green square"], options)
    as_dict = segmenter.segment(rgb_image, ["red square", "green square"], {"threshold": 0.0, "min_area": 5,
                                                                            "smooth": 1})
    assert len(by_name) > 0
    for other in (as_object, as_dict):
        assert [(i.label, i.box, i.score) for i in other] == [(i.label, i.box, i.score) for i in by_name]
    # names given with an object change it
    fewer = segmenter.segment(rgb_image, ["red square", "green square"], options, max_instances=1)
    assert len(fewer) == 1 and fewer[0].score == max(i.score for i in by_name)
    batch = list(segmenter.segment_batch([rgb_image], ["red square", "green square"], options=options))
    assert [i.box for i in batch[0]] == [i.box for i in by_name]


def test_threshold_by_position_still_works_with_a_warning(segmenter, rgb_image):
    with pytest.warns(DeprecationWarning, match="threshold=... by name"):
        old = segmenter.segment(rgb_image, "red square", 0.0)
    new = segmenter.segment(rgb_image, "red square", threshold=0.0)
    assert [i.box for i in old] == [i.box for i in new] and len(new) > 0


def _literal(node):
    try:
        return True, ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError):
        return False, None


def literal_option_defaults(path: Path) -> list[str]:
    """Places in `path` that write an option's default value again: a parameter default, an
    annotated (dataclass) field or a dict entry named like the option, holding its default literal.

    None defaults are left out: there None marks an argument not given, and its meaning is written once,
    in the option's help.
    """
    defaults = {info.name: info.default for info in describe() if info.default is not None}
    found = []

    def check(name: str, node: ast.AST) -> None:
        if name in defaults:
            literal, value = _literal(node)
            if literal and value == defaults[name]:
                found.append(f"{path.name}:{node.lineno} {name}={value!r}")

    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            args = node.args
            positional = args.posonlyargs + args.args
            pairs = list(zip(positional[len(positional) - len(args.defaults):], args.defaults))
            pairs += [(arg, default) for arg, default in zip(args.kwonlyargs, args.kw_defaults) if default is not None]
            for arg, default in pairs:
                check(arg.arg, default)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value is not None:
            check(node.target.id, node.value)
        elif isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values):
                if isinstance(key, ast.Constant) and isinstance(key.value, str):
                    check(key.value, value)
    return found


def test_no_option_default_is_written_outside_the_options_module():
    """Neither the core nor an adapter writes an option's default again: they read SegmentOptions."""
    sources = [*CORE.rglob("*.py"), *(CORE.parent / "plugins").rglob("*.py")]
    found = [place for path in sorted(sources) if path != CORE / "options.py" for place in literal_option_defaults(path)]
    assert found == []


def test_the_default_scan_finds_a_repeated_default(tmp_path):
    """The scan above sees each way a default used to be repeated (a signature, a field, a dict)."""
    sample = tmp_path / "sample.py"
    sample.write_text(
        "def segment(image, threshold=0.5, *, iou_threshold=0.7, smooth=1):\n    pass\n"
        "class Plan:\n    negative_margin: float = 0.0\n"
        "DEFAULTS = {'verify': False, 'mask_threshold': 0.4, 'tile': None}\n"
    )
    assert literal_option_defaults(sample) == [
        "sample.py:1 threshold=0.5", "sample.py:1 iou_threshold=0.7", "sample.py:4 negative_margin=0.0",
        "sample.py:5 verify=False",
    ]


def _readme_row(info) -> str:
    default = str(info.default)
    if isinstance(info.default, tuple) and info.default:
        default = " ".join(map(str, info.default))
    return f"| `{info.name}` | `{info.group}` | {default} | {info.help} |"


def test_readme_options_table_matches_the_options():
    readme = (CORE.parent / "README.md").read_text()
    rows = [line for line in readme.splitlines() if line.startswith("| `") and line.count("|") == 5]
    assert rows == [_readme_row(info) for info in describe()]
