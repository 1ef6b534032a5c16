"""The promptseg command on bad inputs, run as a real subprocess on the tiny random model.

What a user gets: a bad image is reported and the rest is written (exit 1); a usage or setup
error is one line naming the cause and the fix (exit 2, no traceback); no result ever replaces
another result or an input.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def promptseg(*args, cwd: Path) -> subprocess.CompletedProcess:
    """Run the installed command line in `cwd`, offline, with the cache inside the test's folder."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PROMPTSEG_CACHE_DIR": str(cwd / "cache")}
    return subprocess.run([sys.executable, "-m", "promptseg.cli", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def segment(*args, cwd: Path, model: Path) -> subprocess.CompletedProcess:
    return promptseg("segment", "--model", model, "--device", "cpu", "--threshold", "0", *args, cwd=cwd)


def save_image(path: Path, height: int, width: int, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)
    pixels[height // 4: height // 2, width // 4: width // 2] = (220, 40, 40)
    Image.fromarray(pixels).save(path)
    return path


def labels_shape(path: Path) -> tuple[int, ...]:
    return np.asarray(Image.open(path)).shape


def assert_one_line_error(done: subprocess.CompletedProcess, *words: str) -> None:
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    message = done.stderr.strip().splitlines()[-1]
    assert message.startswith(("promptseg: error:", "promptseg segment: error:")), done.stderr
    for word in words:
        assert word in message, message


def png_bomb(path: Path, width: int = 30000, height: int = 30000) -> Path:
    """A small valid PNG whose header declares `width` x `height` pixels (a decompression bomb)."""
    Image.new("L", (16, 16), 128).save(path)
    data = bytearray(path.read_bytes())
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))
    return path


# Nothing overwritten: every input keeps its own result.

def test_same_file_name_in_two_folders_gives_two_results(tmp_path, tiny_sam3_dir):
    save_image(tmp_path / "a" / "same.png", 120, 200, seed=1)
    save_image(tmp_path / "b" / "same.png", 90, 70, seed=2)
    done = segment("a/same.png", "b/same.png", "-p", "cat", "--out", "out", cwd=tmp_path, model=tiny_sam3_dir)
    assert done.returncode == 0, done.stderr
    out = tmp_path / "out"
    assert labels_shape(out / "a" / "same.labels.png") == (120, 200)
    assert labels_shape(out / "b" / "same.labels.png") == (90, 70)
    assert labels_shape(out / "b" / "same.overlay.png") == (90, 70, 3)
    assert "Wrote results for 2 image(s)" in done.stdout


def test_same_stem_with_two_extensions_keeps_both_results(tmp_path, tiny_sam3_dir):
    save_image(tmp_path / "x.png", 120, 200, seed=1)
    save_image(tmp_path / "x.jpg", 90, 70, seed=2)
    save_image(tmp_path / "y.png", 40, 50, seed=3)
    done = segment("x.png", "x.jpg", "y.png", "-p", "cat", "--out", "out", cwd=tmp_path, model=tiny_sam3_dir)
    assert done.returncode == 0, done.stderr
    out = tmp_path / "out"
    assert labels_shape(out / "x.png.labels.png") == (120, 200)
    assert labels_shape(out / "x.jpg.labels.png") == (90, 70)
    assert labels_shape(out / "y.labels.png") == (40, 50)  # names without a clash stay short
    assert not (out / "x.labels.png").exists()


def test_file_given_twice_is_segmented_once(tmp_path, tiny_sam3_dir):
    save_image(tmp_path / "x.png", 60, 80)
    done = segment("x.png", "./x.png", str(tmp_path / "x.png"), "-p", "cat", "--format", "coco", "--out", "out",
                   cwd=tmp_path, model=tiny_sam3_dir)
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("given more than once") == 2
    coco = json.loads((tmp_path / "out" / "results.coco.json").read_text())
    assert [image["file_name"] for image in coco["images"]] == ["x.png"]
    assert coco["annotations"] and {a["image_id"] for a in coco["annotations"]} == {1}


def test_json_and_coco_keep_every_same_named_input(tmp_path, tiny_sam3_dir):
    save_image(tmp_path / "a" / "same.png", 120, 200, seed=1)
    save_image(tmp_path / "b" / "same.png", 90, 70, seed=2)
    done = segment("a/same.png", "b/same.png", "-p", "cat", "--format", "json", "--out", "json",
                   cwd=tmp_path, model=tiny_sam3_dir)
    assert done.returncode == 0, done.stderr
    for folder, size in (("a", [120, 200]), ("b", [90, 70])):
        record = json.loads((tmp_path / "json" / folder / "same.json").read_text())
        assert record["source"] == f"{folder}/same.png" and record["image_size"] == size
    done = segment("a/same.png", "b/same.png", "-p", "cat", "--format", "coco", "--out", "coco",
                   cwd=tmp_path, model=tiny_sam3_dir)
    assert done.returncode == 0, done.stderr
    coco = json.loads((tmp_path / "coco" / "results.coco.json").read_text())
    assert [(i["file_name"], i["height"], i["width"]) for i in coco["images"]] == [
        ("a/same.png", 120, 200), ("b/same.png", 90, 70)]
    assert {a["image_id"] for a in coco["annotations"]} == {1, 2}
    assert [path.name for path in (tmp_path / "coco").rglob("*") if path.is_file()] == ["results.coco.json"]


def test_input_named_like_a_result_is_never_overwritten(tmp_path, tiny_sam3_dir):
    save_image(tmp_path / "foo.png", 120, 200, seed=1)
    save_image(tmp_path / "foo.labels.png", 90, 70, seed=2)
    before = (tmp_path / "foo.labels.png").read_bytes()
    done = segment("foo.png", "foo.labels.png", "-p", "cat", "--out", ".", cwd=tmp_path, model=tiny_sam3_dir)
    assert_one_line_error(done, "would replace the input foo.labels.png", "another --out")
    assert (tmp_path / "foo.labels.png").read_bytes() == before
    assert not (tmp_path / "foo.overlay.png").exists()
    done = segment("foo.png", "foo.labels.png", "-p", "cat", "--out", "out", cwd=tmp_path, model=tiny_sam3_dir)
    assert done.returncode == 0, done.stderr
    assert labels_shape(tmp_path / "out" / "foo.labels.png") == (120, 200)
    assert labels_shape(tmp_path / "out" / "foo.labels.labels.png") == (90, 70)


# Bad images among good ones: reported, the rest written, exit 1.

def test_decompression_bomb_is_skipped_and_the_images_after_it_written(tmp_path, tiny_sam3_dir):
    png_bomb(tmp_path / "bomb.png")
    save_image(tmp_path / "after.png", 60, 80)
    done = segment("bomb.png", "after.png", "-p", "cat", "--out", "out", cwd=tmp_path, model=tiny_sam3_dir)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    skipped = next(line for line in done.stderr.splitlines() if line.startswith("skipped bomb.png: "))
    assert "900,000,000 pixels" in skipped and "PROMPTSEG_MAX_PIXELS" in skipped
    assert labels_shape(tmp_path / "out" / "after.labels.png") == (60, 80)
    assert not list((tmp_path / "out").glob("bomb*"))


def test_max_pixels_skips_larger_images_and_writes_the_others(tmp_path, tiny_sam3_dir):
    save_image(tmp_path / "big.png", 120, 200)
    save_image(tmp_path / "small.png", 40, 50)
    done = segment("big.png", "small.png", "-p", "cat", "--max-pixels", "10000", "--out", "out",
                   cwd=tmp_path, model=tiny_sam3_dir)
    assert done.returncode == 1, done.stderr
    skipped = next(line for line in done.stderr.splitlines() if line.startswith("skipped big.png: "))
    assert "24,000 pixels" in skipped and "limit of 10,000 pixels" in skipped
    assert labels_shape(tmp_path / "out" / "small.labels.png") == (40, 50)
    assert not (tmp_path / "out" / "big.labels.png").exists()


def test_missing_file_among_good_ones_is_skipped(tmp_path, tiny_sam3_dir):
    save_image(tmp_path / "a.png", 60, 80)
    save_image(tmp_path / "c.png", 50, 40)
    done = segment("a.png", "gone.png", "c.png", "-p", "cat", "--out", "out", cwd=tmp_path, model=tiny_sam3_dir)
    assert done.returncode == 1, done.stderr
    assert "skipped gone.png: No such image file" in done.stderr and "Traceback" not in done.stderr
    assert labels_shape(tmp_path / "out" / "a.labels.png") == (60, 80)
    assert labels_shape(tmp_path / "out" / "c.labels.png") == (50, 40)
    assert "1 image(s) skipped: gone.png" in done.stderr


# Setup errors: one line with cause and fix, exit 2, nothing half-done.

def test_out_naming_an_existing_file_is_a_setup_error(tmp_path, tiny_sam3_dir):
    save_image(tmp_path / "x.png", 60, 80)
    (tmp_path / "results").write_text("not a folder")
    done = segment("x.png", "-p", "cat", "--out", "results", cwd=tmp_path, model=tiny_sam3_dir)
    assert_one_line_error(done, "--out results is a file, not a folder", "Pass a folder")
    assert (tmp_path / "results").read_text() == "not a folder"


def test_out_that_cannot_be_created_is_a_setup_error(tmp_path, tiny_sam3_dir):
    save_image(tmp_path / "x.png", 60, 80)
    (tmp_path / "plain-file").write_text("")
    done = segment("x.png", "-p", "cat", "--out", "plain-file/results", cwd=tmp_path, model=tiny_sam3_dir)
    assert_one_line_error(done, "Cannot write to --out plain-file/results", "Not a directory", "you can write to")


def test_result_that_cannot_be_written_stops_with_a_setup_error(tmp_path, tiny_sam3_dir):
    save_image(tmp_path / "x.png", 60, 80)
    (tmp_path / "out" / "x.labels.png").mkdir(parents=True)  # a folder where the result should go
    done = segment("x.png", "-p", "cat", "--out", "out", cwd=tmp_path, model=tiny_sam3_dir)
    assert_one_line_error(done, "Cannot write the results of x.png under --out out", "Is a directory")


def test_segment_with_a_missing_model_folder_names_the_fix(tmp_path):
    save_image(tmp_path / "x.png", 60, 80)
    done = promptseg("segment", "x.png", "-p", "cat", "--model", tmp_path / "no-model", cwd=tmp_path)
    assert_one_line_error(done, "No model directory at", "save_pretrained", "facebook/sam3")


def test_doctor_diagnoses_a_missing_model_folder(tmp_path):
    done = promptseg("doctor", "--model", "/missing/dir", cwd=tmp_path)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    assert "[FAIL] model: no file or folder at /missing/dir. Pass a folder" in done.stdout
    assert "[ ok ] end-to-end run" in done.stdout  # the other checks still run


@pytest.mark.parametrize(
    ("args", "words"),
    [
        pytest.param(["--format", "tiff"], ["invalid choice: 'tiff'"], id="unknown-format"),
        pytest.param(["--threshold", "abc"], ["--threshold: invalid float value"], id="threshold-not-a-number"),
        pytest.param(["--threshold", "2"], ["threshold must be a number between 0 and 1"], id="threshold-out-of-range"),
        pytest.param(["--tile", "big"], ["--tile takes a number of pixels or 'auto'"], id="tile-not-a-number"),
        pytest.param(["--tile", "5"], ["tile must be at least 16 pixels"], id="tile-too-small"),
        pytest.param(["--channels", "7"], ["channels=(7,) does not fit an image with 3 channels"],
                     id="channels-out-of-range"),
        pytest.param(["-p", ""], ["A prompt is empty"], id="empty-prompt"),
        pytest.param(["--max-pixels", "0"], ["max_pixels must be a whole number of pixels above 0"],
                     id="max-pixels-zero"),
    ],
)
def test_bad_option_is_a_one_line_usage_error(args, words, tmp_path, tiny_sam3_dir):
    save_image(tmp_path / "x.png", 60, 80)
    prompt = [] if "-p" in args else ["-p", "cat"]
    done = segment("x.png", *prompt, *args, "--out", "out", cwd=tmp_path, model=tiny_sam3_dir)
    assert_one_line_error(done, *words)
    assert not list((tmp_path / "out").rglob("*.png"))


def test_no_prompt_is_a_usage_error(tmp_path, tiny_sam3_dir):
    save_image(tmp_path / "x.png", 60, 80)
    done = segment("x.png", "--out", "out", cwd=tmp_path, model=tiny_sam3_dir)
    assert_one_line_error(done, "No prompt given: pass -p PROMPT")
    assert "--point X,Y and/or --box" in done.stderr


def test_cache_commands_on_a_missing_or_wrong_folder(tmp_path):
    done = promptseg("cache", "clear", "--cache-dir", tmp_path / "never-made", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "nothing to clear" in done.stdout and not (tmp_path / "never-made").exists()
    (tmp_path / "a-file").write_text("keep me")
    done = promptseg("cache", "clear", "--cache-dir", tmp_path / "a-file", cwd=tmp_path)
    assert_one_line_error(done, "is a file, not a folder", "--cache-dir")
    assert (tmp_path / "a-file").read_text() == "keep me"
