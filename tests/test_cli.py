"""The promptseg command: outputs a person and a program can use, exit codes, doctor, cache."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from promptseg.cli import main


@pytest.fixture
def image_files(tmp_path, rgb_image):
    paths = []
    for name in ("a.png", "b.jpg"):
        Image.fromarray(rgb_image).save(tmp_path / name)
        paths.append(str(tmp_path / name))
    return paths


def run(args, tiny_sam3_dir, tmp_path):
    return main(["segment", *args, "--model", str(tiny_sam3_dir), "--cache-dir", str(tmp_path / "cache"),
                 "--threshold", "0.0"])


def test_segment_writes_label_and_overlay_pngs(image_files, tiny_sam3_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert run([*image_files, "-p", "cat", "-p", "dog", "--out", str(out)], tiny_sam3_dir, tmp_path) == 0
    labels = np.asarray(Image.open(out / "a.labels.png"))
    overlay = np.asarray(Image.open(out / "a.overlay.png"))
    assert labels.shape == (120, 200) and labels.max() > 0
    assert overlay.shape == (120, 200, 3)
    assert (out / "b.labels.png").exists()
    err = capsys.readouterr().err
    assert "embedding computed" in err


def test_segment_json_and_coco(image_files, tiny_sam3_dir, tmp_path):
    out = tmp_path / "json"
    assert run([image_files[0], "-p", "cat", "--format", "json", "--out", str(out)], tiny_sam3_dir, tmp_path) == 0
    record = json.loads((out / "a.json").read_text())
    assert record["image_size"] == [120, 200] and record["instances"]
    assert {"label", "score", "box", "segmentation"} <= set(record["instances"][0])
    out = tmp_path / "coco"
    assert run([*image_files, "-p", "cat", "--format", "coco", "--out", str(out)], tiny_sam3_dir, tmp_path) == 0
    coco = json.loads((out / "results.coco.json").read_text())
    assert len(coco["images"]) == 2 and coco["categories"] == [{"id": 1, "name": "cat"}]
    assert {a["image_id"] for a in coco["annotations"]} == {1, 2}


def test_bad_image_is_reported_and_the_rest_written(image_files, tiny_sam3_dir, tmp_path, capsys):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"garbage")
    out = tmp_path / "out"
    code = run([str(bad), image_files[0], "-p", "cat", "--out", str(out)], tiny_sam3_dir, tmp_path)
    assert code == 1
    assert (out / "a.labels.png").exists()
    assert "skipped" in capsys.readouterr().err


def test_unreachable_model_exits_with_the_fix(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("PROMPTSEG_MODEL", raising=False)
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    assert main(["segment", str(tmp_path / "x.png"), "-p", "cat", "--out", str(tmp_path)]) == 2
    assert "hf auth login" in capsys.readouterr().err


def test_cache_info_and_clear(image_files, tiny_sam3_dir, tmp_path, capsys):
    run([image_files[0], "-p", "cat", "--out", str(tmp_path / "o")], tiny_sam3_dir, tmp_path)
    assert main(["cache", "info", "--cache-dir", str(tmp_path / "cache")]) == 0
    assert "1 embedding(s)" in capsys.readouterr().out
    assert main(["cache", "clear", "--cache-dir", str(tmp_path / "cache")]) == 0
    assert "Removed 1" in capsys.readouterr().out


def test_doctor_proves_the_install_without_weights(capsys):
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert "[ ok ] end-to-end run" in out and "[FAIL]" not in out


def test_doctor_names_the_extra_that_installs_a_missing_host(monkeypatch):
    import importlib.util

    from promptseg.doctor import run_checks

    real_find_spec = importlib.util.find_spec
    missing = {"label_studio_sdk", "gradio"}
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in missing else real_find_spec(name, *a))
    lines = []
    run_checks(out=lambda status, what, detail="": lines.append((status, what, detail)))
    hosts = {what: (status, detail) for status, what, detail in lines if what.endswith(" adapter")}
    assert hosts["Label Studio SDK adapter"] == ("warn", "host not installed (pip install 'promptseg[labelstudio]')")
    assert hosts["quick-try page (Gradio) adapter"] == ("warn", "host not installed (pip install 'promptseg[app]')")
    assert hosts["napari adapter"] == ("ok", "host installed")


@pytest.mark.parametrize(
    ("model", "reason"),
    [("incomplete", "has a config.json but no model.safetensors"), ("not/a/hub/id", "is neither an existing file")],
    ids=["incomplete-folder", "invalid-hub-id"],
)
def test_doctor_fails_a_model_that_cannot_load(model, reason, tmp_path, monkeypatch):
    from promptseg.doctor import run_checks

    monkeypatch.chdir(tmp_path)
    (tmp_path / "incomplete").mkdir()
    (tmp_path / "incomplete" / "config.json").write_text("{}")
    lines = []
    assert run_checks(model, out=lambda status, what, detail="": lines.append((status, what, detail))) is False
    assert [(status, what) for status, what, _ in lines if status == "FAIL"] == [("FAIL", "model")]
    assert reason in next(detail for _, what, detail in lines if what == "model")


def test_help_is_fast_and_lists_commands():
    done = subprocess.run([sys.executable, "-m", "promptseg.cli", "--help"], capture_output=True, text=True, check=True)
    assert "segment" in done.stdout and "doctor" in done.stdout
    assert "Exit codes: 0 all done; 1 some images were skipped" in " ".join(done.stdout.split())


def test_segment_help_documents_output_names_and_exit_codes():
    done = subprocess.run([sys.executable, "-m", "promptseg.cli", "segment", "--help"],
                          capture_output=True, text=True, check=True)
    text = " ".join(done.stdout.split())
    assert "a/same.png and b/same.png give OUT/a/same.labels.png and OUT/b/same.labels.png" in text
    assert "OUT/x.png.labels.png, OUT/x.jpg.labels.png" in text
    assert "2 usage or setup error" in text


def test_unexpected_error_prints_the_traceback_and_exits_3(tmp_path, monkeypatch, capsys):
    import promptseg.cache

    def broken_clear(self):
        raise RuntimeError("a bug in clear")

    monkeypatch.setattr(promptseg.cache.DiskCache, "clear", broken_clear)
    (tmp_path / "cache").mkdir()
    assert main(["cache", "clear", "--cache-dir", str(tmp_path / "cache")]) == 3
    err = capsys.readouterr().err
    assert "Traceback" in err and "RuntimeError: a bug in clear" in err
    last_line = err.strip().splitlines()[-1]
    assert last_line == "promptseg: unexpected error (a bug): please report it with the traceback above"


def test_label_png_with_too_many_instances_asks_for_another_format(tmp_path):
    from promptseg.errors import OptionError
    from promptseg.render import save_png

    labels = np.zeros((4, 4), dtype=np.int32)
    labels[0, 0] = 70000
    with pytest.raises(OptionError, match="use --format coco or json"):
        save_png(labels, tmp_path / "x.labels.png")
    assert not (tmp_path / "x.labels.png").exists()


def test_segment_options_come_from_segment_options_defaults_and_help():
    """Every option has its flag; unset flags keep SegmentOptions' defaults; set ones reach it unchanged."""
    from promptseg.cli import build_parser, segment_options
    from promptseg.options import SegmentOptions

    parser = build_parser()
    plain = parser.parse_args(["segment", "x.png", "-p", "cat"])
    assert segment_options(plain) == SegmentOptions()
    given = parser.parse_args([
        "segment", "x.png", "-p", "cat", "--threshold", "0.25", "--mask-threshold", "0.4", "--min-area", "12",
        "--smooth", "2", "--max-instances", "3", "--iou-threshold", "none", "--cross-prompt-iou", "0.5",
        "--tile", "128", "--overlap", "20", "--percentiles", "1", "99", "--channels", "2", "1", "0", "--verify",
        "--clip-threshold", "0.6", "--negative", "toy car", "--negative-margin", "0.1", "--exclusive",
    ])
    options = segment_options(given)
    assert options.changed() == {
        "threshold": 0.25, "mask_threshold": 0.4, "min_area": 12, "smooth": 2, "max_instances": 3,
        "iou_threshold": None, "cross_prompt_iou": 0.5, "tile": 128, "overlap": 20, "percentiles": (1.0, 99.0),
        "channels": (2, 1, 0), "verify": True, "clip_threshold": 0.6, "negative": ("toy car",),
        "negative_margin": 0.1, "exclusive": True,
    }
    assert set(options.changed()) == set(SegmentOptions.names())  # the command line reaches every option
    done = subprocess.run([sys.executable, "-m", "promptseg.cli", "segment", "--help"],
                          capture_output=True, text=True, check=True)
    text = " ".join(done.stdout.split())
    for info in SegmentOptions.describe():
        assert info.flag in text
    assert "(default: 0.5)" in text and "(default: 0.5 99.5)" in text and "('none': keep both) (default: 0.7)" in text


def test_segment_one_object_by_points_and_box_writes_it_like_text_results(image_files, tiny_sam3_hub_dir, tmp_path):
    import promptseg

    out = tmp_path / "object"
    args = [image_files[0], "--point", "60,50", "--point", "150,80,0", "--box", "40,30,110,80", "--out", str(out)]
    assert run(args, tiny_sam3_hub_dir, tmp_path) == 0
    assert run([*args[:-1], str(tmp_path / "object-json"), "--format", "json"], tiny_sam3_hub_dir, tmp_path) == 0
    seg = promptseg.load_segmenter(str(tiny_sam3_hub_dir), device="cpu", cache_dir=False)
    expected = seg.segment_object(image_files[0], points=[(60, 50), (150, 80)], point_labels=[1, 0], box=(40, 30, 110, 80))
    assert len(expected) == 1
    labels = np.asarray(Image.open(out / "a.labels.png"))
    assert np.array_equal(labels, expected.to_label_image().astype(labels.dtype))
    record = json.loads((tmp_path / "object-json" / "a.json").read_text())
    assert [inst["label"] for inst in record["instances"]] == ["object"]
    assert record["instances"][0]["box"] == list(expected[0].box)


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--point", "1,2,5"], "is not X,Y or X,Y,LABEL"),
        (["--point", "a,b"], "is not X,Y or X,Y,LABEL"),
        (["--box", "1,2,3"], "is not X0,Y0,X1,Y1"),
        (["--box", "50,50,20,80"], "empty or reversed"),
        (["-p", "cat", "--point", "10,10"], "not both"),
        ([], "No prompt given: pass -p PROMPT"),
    ],
)
def test_bad_visual_prompts_on_the_command_line_exit_2(image_files, tmp_path, capsys, extra, words):
    args = ["segment", image_files[0], *extra, "--model", str(tmp_path / "no-model"), "--out", str(tmp_path / "o")]
    try:
        code = main(args)
    except SystemExit as exc:  # argparse refuses a malformed value itself
        code = exc.code
    assert code == 2 and words in capsys.readouterr().err
