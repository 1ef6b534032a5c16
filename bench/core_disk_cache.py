"""A second run over N images with a new prompt: disk cache warm vs cold.

    python -m bench.core_disk_cache [--size full] [--images N]

Run 1 segments N images with one prompt in a fresh process-like state; run 2 is a new Segmenter
(as in a new process) on the same cache directory with a different prompt. The cold baseline
is the same second run with the cache emptied.
"""

from __future__ import annotations

import tempfile

import numpy as np

from bench._common import model_dir, parser, print_table, timed


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--images", type=int, default=20)
    args = p.parse_args()
    import promptseg

    directory = model_dir(args.size)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (480, 640, 3), dtype=np.uint8) for _ in range(args.images)]
    if args.size == "full":
        images = images[: min(args.images, 4)]
    with tempfile.TemporaryDirectory() as cache_dir:
        first = promptseg.load_segmenter(str(directory), device="cpu", cache_dir=cache_dir)
        for image in images:
            first.segment(image, "cat")

        def second_run(cache):
            seg = promptseg.load_segmenter(str(directory), device="cpu", cache_dir=cache)
            for image in images:
                seg.segment(image, "dog")
            return seg.stats.image_encoder_runs

        warm_time, warm_runs = timed(lambda: second_run(cache_dir))
        with tempfile.TemporaryDirectory() as empty:
            cold_time, cold_runs = timed(lambda: second_run(empty))
    print_table(f"Second prompt over {len(images)} images, {args.size} SAM 3 on CPU",
                ["run", "seconds", "image encoder runs", "per image"],
                [["cold cache", cold_time, cold_runs, cold_time / len(images)],
                 ["warm disk cache", warm_time, warm_runs, warm_time / len(images)],
                 ["speed-up", f"{cold_time / warm_time:.1f}x", "", ""]])


if __name__ == "__main__":
    main()
