"""Render docs/images/fiftyone-tracks.png: a video sample's tracks in the FiftyOne App.

    python docs/make_fiftyone_tracks_screenshot.py
    python docs/make_fiftyone_tracks_screenshot.py --model facebook/sam3   # with real weights, if you have them

Without --model (or PROMPTSEG_MODEL) it builds the tiny SAM 3 video model with random weights that
the tests use, so the masks are arbitrary: the picture shows where FiftyOne puts the frame-level
Detections (``frames.<field>``, coloured by ``index``, one colour per object id) in its video
player, not tracking quality. The script starts a private FiftyOne database, writes a synthetic
clip (two discs drifting over 10 frames, H.264 through PyAV), segments it with `segment_samples`,
serves the App on 127.0.0.1 and captures the sample's modal with headless Chromium
(``apt-get install chromium``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
PORT = 5199


def frame(t: int, height: int = 240, width: int = 320) -> np.ndarray:
    """Two discs drifting across a dark background, frame `t`."""
    from skimage.draw import disk

    image = np.full((height, width, 3), 40, np.uint8)
    image[disk((100, 60 + 8 * t), 40, shape=(height, width))] = (220, 60, 60)
    image[disk((170, 250 - 6 * t), 30, shape=(height, width))] = (60, 200, 90)
    return image


def write_clip(path: Path, frames: int = 10) -> str:
    """An H.264 mp4 (what the App's browser plays) of `frames` synthetic frames."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=5)
        stream.width, stream.height, stream.pix_fmt = 320, 240, "yuv420p"
        for t in range(frames):
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame(t), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return str(path)


def wait_for(url: str, seconds: float = 60.0) -> None:
    """Until the App's server answers (bounded)."""
    import time

    import requests

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if requests.get(url, timeout=2).ok:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.5)
    sys.exit(f"The FiftyOne App did not answer at {url} within {seconds:.0f} s.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=os.environ.get("PROMPTSEG_MODEL"))
    parser.add_argument("--out", type=Path, default=HERE / "images" / "fiftyone-tracks.png")
    parser.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser"))
    args = parser.parse_args()
    if not args.chromium:
        sys.exit("Chromium not found: apt-get install chromium")

    import torch

    torch.set_num_threads(1)  # the tracker's many small products are fastest on one thread
    from promptseg_fiftyone.testing import use_temporary_database

    root = use_temporary_database("promptseg-fiftyone-tracks-")
    import fiftyone as fo

    from promptseg.sessions import shared_segmenter
    from promptseg_fiftyone.runner import segment_samples

    work = Path(tempfile.mkdtemp(prefix="fiftyone-tracks-"))
    model, thresholds = args.model, {}
    if model is None:
        from promptseg.testing import make_random_sam3_video

        model = str(make_random_sam3_video(root / "tiny-sam3-video", hidden=128))
        thresholds = {"threshold": 0.2545, "new_threshold": 0.2545}  # the random model scores everything near 0.25
    dataset = fo.Dataset("tracks")
    dataset.add_sample(fo.Sample(filepath=write_clip(work / "drifting-discs.mp4")))
    dataset.compute_metadata()
    dataset.app_config.color_scheme = fo.ColorScheme(color_by="instance")  # one colour per index (object id)
    dataset.save()
    summary = segment_samples(dataset, "disc", "sam3", segmenter=shared_segmenter(model, device="cpu"), **thresholds)
    print(f"{summary.instances} detections on {len(dataset.first().frames)} frames", file=sys.stderr)

    fo.launch_app(dataset, port=PORT, address="127.0.0.1", remote=True)
    wait_for(f"http://127.0.0.1:{PORT}/")
    url = f"http://127.0.0.1:{PORT}/datasets/{dataset.name}?id={dataset.first().id}"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [args.chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
         f"--user-data-dir={work / 'chrome'}", "--window-size=1400,900", "--virtual-time-budget=30000",
         f"--screenshot={args.out}", url],
        check=True, timeout=180, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
