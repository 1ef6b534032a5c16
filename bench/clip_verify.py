"""What CLIP verification adds to SAM 3: time per image and per instance, against SAM 3 alone.

    python bench/clip_verify.py [--images 6] [--repeats 3]

Tiny random SAM 3 and tiny random OpenCLIP (built and saved on the spot, loaded through the real
loaders), so it runs in seconds on a CPU; the ratios, not the absolute times, are the point.
Rows (all on images whose SAM 3 embedding is already cached, i.e. the interactive case):
SAM 3 alone; + CLIP re-scoring with cold crop embeddings; + re-scoring with warm crops (the same
masks again); + verify, a negative prompt and an exclusive label set (cold crops).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np


def images(count: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    out = []
    for _ in range(count):
        rgb = rng.integers(0, 60, (240, 320, 3), dtype=np.uint8)
        for _ in range(4):
            y, x = rng.integers(0, 180), rng.integers(0, 260)
            rgb[y : y + 50, x : x + 60] = rng.integers(100, 255, 3)
        out.append(rgb)
    return out


def run(args: argparse.Namespace) -> None:
    import torch

    from promptseg import load_segmenter
    from promptseg.testing import make_random_clip
    from promptseg.testing import make_random_sam3

    torch.set_num_threads(max(1, torch.get_num_threads()))
    warnings.filterwarnings("ignore")
    root = Path(tempfile.mkdtemp(prefix="promptseg-bench-"))
    sam3 = make_random_sam3(root / "sam3")
    clip = make_random_clip(root / "clip")["local_dir"]
    prompts = ["red box", "green box"]
    plain = load_segmenter(str(sam3), device="cpu", cache_dir=False)
    scored = load_segmenter(str(sam3), device="cpu", cache_dir=False, clip=clip)
    pictures = images(args.images)
    for rgb in pictures:  # warm SAM 3's image embeddings: only the per-prompt path is compared
        plain.embed(rgb)
        scored.embed(rgb)

    def timed(segmenter, options, clear_crops) -> tuple[float, int]:
        times, count = [], 0
        for _ in range(args.repeats):
            if clear_crops and segmenter.clip is not None:
                segmenter.clip.cache.memory.clear()
            start = time.perf_counter()
            count = sum(len(segmenter.segment(rgb, prompts, threshold=0.0, **options)) for rgb in pictures)
            times.append(time.perf_counter() - start)
        return statistics.median(times), count

    rows = [
        ("SAM 3 alone", *timed(plain, {}, False)),
        ("+ CLIP re-scoring, cold crops", *timed(scored, {}, True)),
        ("+ CLIP re-scoring, warm crops", *timed(scored, {}, False)),
        ("+ verify, negative, exclusive (cold)",
         *timed(scored, {"verify": True, "clip_threshold": 0.0, "negative": ["shadow"], "exclusive": True}, True)),
    ]
    base, base_count = rows[0][1], rows[0][2]
    print(f"{len(pictures)} images x {len(prompts)} prompts, {base_count} instances from SAM 3, "
          f"median of {args.repeats} runs (tiny random models, CPU)")
    print(f"{'configuration':40s} {'ms/image':>9s} {'added ms/instance':>18s} {'ratio':>6s}")
    for name, seconds, count in rows:
        per_image = 1000 * seconds / len(pictures)
        added = 1000 * (seconds - base) / max(base_count, 1)
        print(f"{name:40s} {per_image:9.1f} {added:18.2f} {seconds / base:6.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    run(parser.parse_args())


if __name__ == "__main__":
    main()
