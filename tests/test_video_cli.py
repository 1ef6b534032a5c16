"""``promptseg segment clip.mp4 -p car --out out [--stride N] [--frames A:B]``: SAM 3's video model from
the command line, its files, and clear errors (exit 2) for bad video flags."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from promptseg.cli import main
from test_video import THRESHOLDS, clip, write_mp4

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # see tests/test_video.py: the tracker's tiny products on a shared machine
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def video_model(tmp_path_factory):
    from promptseg.testing import make_random_sam3_video

    return make_random_sam3_video(tmp_path_factory.mktemp("models") / "tiny-sam3-video", hidden=128)


def run(video_model, tmp_path, *args):
    return main(["segment", *args, "--model", str(video_model), "--cache-dir", str(tmp_path / "cache"),
                 "--device", "cpu", "--threshold", str(THRESHOLDS["threshold"])])


def test_segment_an_mp4_writes_frames_tiff_and_tracks(video_model, tmp_path, capsys):
    video = write_mp4(tmp_path / "clip.mp4", clip(6))
    out = tmp_path / "out"
    assert run(video_model, tmp_path, str(video), "-p", "cat", "--out", str(out), "--stride", "2", "--frames", "1:") == 0
    pngs = sorted(p.name for p in (out / "clip").iterdir())
    assert pngs == ["frame_000001.png", "frame_000003.png", "frame_000005.png"]
    volume = tifffile.imread(out / "clip.labels.tif")
    assert volume.shape == (3, 72, 96)
    for k, name in enumerate(pngs):
        assert np.array_equal(np.asarray(Image.open(out / "clip" / name)), volume[k])
    tracks = json.loads((out / "clip.tracks.json").read_text())
    assert [image["frame_id"] for image in tracks["images"]] == [1, 3, 5]
    assert {a["track_id"] for a in tracks["annotations"]} <= {t["id"] for t in tracks["tracks"]}
    assert set(np.unique(volume)) - {0} == {a["track_id"] for a in tracks["annotations"]}
    assert "3 frame(s)" in capsys.readouterr().err


def test_folder_of_frames_is_a_video_with_the_flag(video_model, tmp_path):
    folder = tmp_path / "frames"
    folder.mkdir()
    for t, frame in enumerate(clip(3)):
        Image.fromarray(frame).save(folder / f"f{t}.png")
    assert run(video_model, tmp_path, str(folder), "-p", "cat", "--out", str(tmp_path / "out"), "--video") == 0
    assert tifffile.imread(tmp_path / "out" / "frames.labels.tif").shape == (3, 72, 96)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["-p", "cat", "--frames", "9:12"], "holds no frame of this 4-frame video"),
        (["-p", "cat", "--stride", "0"], "stride must be a whole number >= 1"),
        (["-p", "cat", "--frames", "a:b"], "--frames takes A:B"),
        (["--point", "3,4"], "for a video give text prompts with -p"),
    ],
)
def test_bad_video_flags_exit_2_with_a_message(video_model, tmp_path, capsys, extra, message):
    video = write_mp4(tmp_path / "clip.mp4", clip(4))
    try:
        code = run(video_model, tmp_path, str(video), "--out", str(tmp_path / "out"), *extra)
    except SystemExit as exc:  # argparse refuses a malformed value itself, with its usage line
        code = exc.code
    assert code == 2
    assert message in capsys.readouterr().err


def test_stride_without_a_video_and_an_unreadable_video(video_model, tmp_path, capsys):
    image = tmp_path / "still.png"
    Image.fromarray(clip(1)[0]).save(image)
    assert run(video_model, tmp_path, str(image), "-p", "cat", "--out", str(tmp_path / "out"), "--stride", "2") == 2
    assert "--stride and --frames apply to videos" in capsys.readouterr().err
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\x00" * 100)
    assert run(video_model, tmp_path, str(broken), "-p", "cat", "--out", str(tmp_path / "out")) == 1
    assert "Cannot read the video" in capsys.readouterr().err
