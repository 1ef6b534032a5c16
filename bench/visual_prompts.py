"""Click to mask: a click on a cached image vs the first click on a new image vs the per-click loop.

    python -m bench.visual_prompts               # tiny random SAM 3 in the hub's layout, seconds
    python -m bench.visual_prompts --size full   # the released architecture with random weights, minutes

An annotator clicks five times on one object, each click adding a point. The baseline is how
interactive SAM backends without an embedding cache answer each click (Label Studio's SAM 2
example backend, SAM 3 zoo integrations): transformers' tracker processor prepares image and
points, `Sam3TrackerModel` runs its full forward (image trunk included) and the processor
post-processes. promptseg runs the trunk once per image; every further click only decodes.
Same weights, same image, same clicks.
"""

from __future__ import annotations

import statistics

import numpy as np

from bench._common import BENCH_CACHE, parser, print_table, timed

CLICKS = [(0.40, 0.45, 1), (0.55, 0.50, 1), (0.30, 0.60, 0), (0.50, 0.35, 1), (0.65, 0.65, 0)]
"""Relative (x, y) and label of each click, in order."""


def main() -> None:
    args = parser(__doc__).parse_args()
    import torch
    from PIL import Image
    from transformers import Sam3ImageProcessor, Sam3TrackerModel, Sam3TrackerProcessor

    import promptseg
    from promptseg.testing import make_random_sam3_video

    directory = make_random_sam3_video(BENCH_CACHE / f"sam3-hub-{args.size}", size=args.size)
    image = np.array(Image.open("examples/chelsea.jpg").convert("RGB"))  # writable, as a host hands it over
    height, width = image.shape[:2]
    points = [[x * width, y * height] for x, y, _ in CLICKS]
    labels = [label for _, _, label in CLICKS]
    seg = promptseg.load_segmenter(str(directory), device="cpu", dtype="fp32", cache_dir=False)  # as the baseline
    tracker = Sam3TrackerModel.from_pretrained(directory).eval()
    size = tracker.config.image_size
    processor = Sam3TrackerProcessor(image_processor=Sam3ImageProcessor(size={"height": size, "width": size}))

    def baseline_click(k: int) -> None:
        inputs = processor(images=image, input_points=[[points[:k]]], input_labels=[[labels[:k]]],
                           return_tensors="pt")
        original_sizes = inputs.pop("original_sizes")
        with torch.inference_mode():
            out = tracker(**inputs, multimask_output=k == 1)
        processor.post_process_masks(out.pred_masks, original_sizes)

    def our_click(k: int) -> None:
        seg.segment_object(image, points=points[:k], point_labels=labels[:k])

    repeat = 3 if args.size == "tiny" else 1
    our_click(1)
    baseline_click(1)  # warm up both
    seg.cache.memory.clear()
    runs_before = seg.stats.image_encoder_runs
    first, _ = timed(lambda: our_click(1))  # trunk + decode
    cached = [timed(lambda k=k: our_click(k), repeat)[0] for k in range(2, len(CLICKS) + 1)]
    loop = [timed(lambda k=k: baseline_click(k), repeat)[0] for k in range(1, len(CLICKS) + 1)]
    trunk_runs = seg.stats.image_encoder_runs - runs_before
    per_click, per_loop = statistics.median(cached), statistics.median(loop)
    print_table(
        f"{len(CLICKS)} clicks on one {width}x{height} image, {args.size} SAM 3 on CPU (seconds per click)",
        ["what", "seconds", "vs a click on a cached image"],
        [
            ["click on a cached image (median)", per_click, "1.0x"],
            ["click on a cached image (slowest)", max(cached), f"{max(cached) / per_click:.1f}x"],
            ["first click on a new image", first, f"{first / per_click:.1f}x"],
            ["per-click loop, full forward (median)", per_loop, f"{per_loop / per_click:.1f}x"],
        ],
    )
    print(f"\nimage trunk runs for the timed promptseg clicks: {trunk_runs} (the first click's)")


if __name__ == "__main__":
    main()
