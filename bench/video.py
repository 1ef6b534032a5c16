"""Video: `Segmenter.segment_video` (frames streamed, features cached) vs transformers' reference loop.

    python -m bench.video                 # tiny random SAM 3 in the hub's layout, 300 frames, a minute
    python -m bench.video --size full     # the released architecture with random weights (slow)

The reference is transformers' documented whole-video loop: every frame decoded and handed to
``Sam3VideoProcessor.init_video_session(video=...)`` up front, a text prompt, then
``propagate_in_video_iterator`` and ``postprocess_outputs`` per frame. promptseg reads one frame at a
time, takes each frame's features from its embedding cache and keeps compact masks. Same weights,
frames (moving discs, 640x480) and prompt. Each run is a child process measuring its own peak
resident memory above what it held after loading the model. promptseg's peak includes its embedding
cache, which keeps every frame's features (up to `memory_cache_bytes`, 2 GiB by default) so that a
second prompt on the same video, timed against the first, runs the image encoder 0 times; a second
promptseg run caps that cache at 8 MiB to show the streaming alone. Torch runs on one thread in every run: on
a shared machine two OpenMP threads per process make the tracker's many tiny products far slower.

With random weights no detection scores above the model's threshold (0.5), so the default run measures
reading, encoding and detecting; ``--threshold 0.2545`` lets the tiny model's best detections through,
so the tracker follows objects (random weights start new objects on most frames, so the tracker's own
state grows with them: use fewer frames there).
"""

from __future__ import annotations

import json
import time

import numpy as np

from bench._common import BENCH_CACHE, mib, parser, peak_rss_self, print_table, reset_peak_rss, run_isolated

HEIGHT, WIDTH = 480, 640


def frame(t: int) -> np.ndarray:
    """Frame `t` of the benchmark video: two discs moving across a dark background."""
    from skimage.draw import disk

    image = np.full((HEIGHT, WIDTH, 3), 40, np.uint8)
    shift = (3 * t) % 1000 / 2  # a new position on every frame of the first 333: no two frames alike
    image[disk((160, 80 + shift), 60, shape=(HEIGHT, WIDTH))] = (220, 60, 60)
    image[disk((330 + (t // 333) % 50, 570 - shift), 45, shape=(HEIGHT, WIDTH))] = (60, 200, 90)
    return image


class LazyVideo:
    """The benchmark video as a lazy ``(T, H, W, 3)`` array: a frame is made when it is read."""

    def __init__(self, count: int) -> None:
        self.shape = (count, HEIGHT, WIDTH, 3)

    def __getitem__(self, t: int) -> np.ndarray:
        return frame(t)


def model_dir(size: str):
    from promptseg.testing import make_random_sam3_video

    return make_random_sam3_video(BENCH_CACHE / f"sam3-video-{size}", size=size,
                                  **({"hidden": 128} if size == "tiny" else {}))


def promptseg_run(size: str, frames: int, threshold: float, memory_cache_mib: int | None = None) -> dict:
    import promptseg

    cache = {} if memory_cache_mib is None else {"memory_cache_bytes": memory_cache_mib * 2**20}
    seg = promptseg.load_segmenter(str(model_dir(size)), device="cpu", dtype="fp32", cache_dir=False, **cache)
    base = reset_peak_rss()
    start = time.perf_counter()
    first = seg.segment_video(LazyVideo(frames), "cat", threshold=threshold)
    first_seconds = time.perf_counter() - start
    peak = peak_rss_self() - base
    runs = seg.stats.image_encoder_runs
    start = time.perf_counter()
    seg.segment_video(LazyVideo(frames), "dog", threshold=threshold)
    second_seconds = time.perf_counter() - start
    return {"seconds": first_seconds, "second_seconds": second_seconds, "peak": peak, "objects": len(first.tracks()),
            "encoder_runs": runs, "second_encoder_runs": seg.stats.image_encoder_runs - runs}


def reference_run(size: str, frames: int, threshold: float) -> dict:
    import torch
    from transformers import Sam2VideoVideoProcessor, Sam3ImageProcessor, Sam3VideoModel, Sam3VideoProcessor

    from promptseg.tokenizer import clip_tokenizer

    directory = model_dir(size)
    model = Sam3VideoModel.from_pretrained(directory).eval()
    model.score_threshold_detection = threshold
    model.new_det_thresh = min(1.0, threshold * 0.7 / 0.5)
    side = model.config.detector_config.vision_config.backbone_config.image_size
    processor = Sam3VideoProcessor(Sam3ImageProcessor(size={"height": side, "width": side}),
                                   Sam2VideoVideoProcessor(size={"height": side, "width": side}), clip_tokenizer())
    base = reset_peak_rss()
    start = time.perf_counter()
    video = [frame(t) for t in range(frames)]  # the whole video up front, as its documentation loads it
    session = processor.init_video_session(video=video, inference_device="cpu", dtype=torch.float32)
    processor.add_text_prompt(session, "cat")
    objects = set()
    for output in model.propagate_in_video_iterator(session):
        post = processor.postprocess_outputs(session, output)
        objects.update(post["object_ids"].tolist())
    return {"seconds": time.perf_counter() - start, "peak": peak_rss_self() - base, "objects": len(objects)}


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--frames", type=int, default=None, help="frames in the video (default: 300 tiny, 8 full)")
    p.add_argument("--threshold", type=float, default=0.5, help="detection threshold (default: the model's 0.5)")
    p.add_argument("--worker", choices=["promptseg", "promptseg-capped", "reference"], help=argparse_hidden())
    args = p.parse_args()
    frames = args.frames or (300 if args.size == "tiny" else 8)
    if args.worker:
        import torch

        torch.set_num_threads(1)
        if args.worker == "reference":
            print(json.dumps(reference_run(args.size, frames, args.threshold)))
        else:  # capped: an embedding cache of 8 MiB, so the second prompt recomputes what was evicted
            capped = 8 if args.worker == "promptseg-capped" else None
            print(json.dumps(promptseg_run(args.size, frames, args.threshold, capped)))
        return
    model_dir(args.size)  # built once, before either run is timed
    common = ["--size", args.size, "--frames", str(frames), "--threshold", str(args.threshold)]
    ours = run_isolated("bench.video", ["--worker", "promptseg", *common], timeout=3600)
    capped = run_isolated("bench.video", ["--worker", "promptseg-capped", *common], timeout=3600)
    reference = run_isolated("bench.video", ["--worker", "reference", *common], timeout=3600)
    rows = []
    for name, result in (("promptseg segment_video (streamed)", ours),
                         ("  same, embedding cache capped at 8 MiB", capped),
                         ("transformers (whole video loaded)", reference)):
        if result.get("seconds") is None:
            rows.append([name, "failed" if not result["killed"] else "out of memory/time", "", "", ""])
            continue
        rows.append([name, frames / result["seconds"], mib(result["peak"]), result["objects"], result["seconds"]])
    print_table(f"{frames} frames of {WIDTH}x{HEIGHT}, size {args.size}, threshold {args.threshold}, 1 thread",
                ["run", "frames/s", "peak memory", "objects", "seconds"], rows)
    if ours.get("seconds") and reference.get("seconds"):
        print(f"\n  speed ratio (promptseg / transformers): {reference['seconds'] / ours['seconds']:.2f}x; "
              f"peak memory ratio: {ours['peak'] / max(reference['peak'], 1):.3f}")
        print(f"  second prompt on the same video: {ours['second_seconds']:.2f} s vs {ours['seconds']:.2f} s for the "
              f"first ({ours['second_seconds'] / ours['seconds']:.2f}x); image encoder runs: "
              f"{ours['encoder_runs']} then {ours['second_encoder_runs']}")


def argparse_hidden():
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
