"""Large images and stacks: time and peak memory of tiled and slice-by-slice segmentation.

    python bench/large_images.py                       # 8192x8192 uint16 image, 64-slice stack
    python bench/large_images.py --size 4096 --slices 16   # a quicker look

Two backends run the same public calls (`Segmenter.segment(..., tile=...)`,
`Segmenter.segment_stack(..., link=True)`): the deterministic ground-truth backend from
tests/truth_backend.py (exact answers, so stitching is checked on thousands of objects) and the
tiny random SAM 3 through the real loader. Each case runs in a fresh process; peak memory is the
highest resident set size sampled during the call minus the size just before it (model, input
image and scene already loaded). Baselines, measured in the same process:
* tiled image: the same tiles segmented one by one as plain images (``ratio`` = tiled time /
  sum of per-tile times, i.e. the cost of tiling and stitching on top of the model work);
* stack: a plain loop of `segment` over the slices (``ratio`` = stack time / loop time).
The run fails (exit 1) when the 8192x8192 case needs 2 GB or more beyond the model, or when a
ground-truth check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the ground-truth backend lives with the tests

VOCAB = {"cell": 1, "nucleus": 2}
LIMIT_MB = 2048


class PeakRSS:
    """Highest resident set size seen while the block runs, sampled every 5 ms."""

    def __enter__(self):
        import psutil

        self.process = psutil.Process()
        self.base = self.peak = self.process.memory_info().rss
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        self.start = time.perf_counter()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.005)

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)
        self.mb = (self.peak - self.base) / 1024**2


def sam3_segmenter(model_dir):
    from promptseg import load_segmenter

    return load_segmenter(model_dir, device="cpu", cache_dir=False)


def warm(seg, prompts):
    """One throwaway call, so one-time start-up costs (thread pools, first forward) are not timed."""
    noise = np.random.default_rng(99).integers(0, 255, (96, 96, 3), dtype=np.uint8)
    seg.segment(noise, prompts, threshold=0.99)
    return seg


def unit_baseline(make, images, prompts, **options) -> float:
    """Seconds to segment each image on its own, untiled, with a fresh segmenter (sampled like the case)."""
    seg = warm(make(), prompts)
    with PeakRSS() as run:
        for image in images:
            seg.segment(image, prompts, **options)
    return run.seconds


def case_image_truth(args) -> dict:
    from truth_backend import random_scene, render

    from promptseg.tiling import tile_grid

    labels, kinds = random_scene(args.size, args.size, args.objects, seed=0, sizes=(16, 120))
    areas = np.bincount(labels.ravel())
    truth_path = Path(args.workdir) / "truth.npy"
    np.save(truth_path, labels)
    rgb = render(labels, kinds)
    del labels
    tile, overlap = args.truth_tile, args.truth_tile // 8
    seg = warm(truth_segmenter_bounded(), list(VOCAB))
    with PeakRSS() as run:
        result = seg.segment(rgb, list(VOCAB), tile=tile, overlap=overlap)
    tiles = tile_grid(rgb.shape[:2], tile, overlap)
    sample = tiles[:: max(1, len(tiles) // 8)]
    crops = [np.ascontiguousarray(rgb[t.y0 : t.y1, t.x0 : t.x1]) for t in sample]
    base = unit_baseline(truth_segmenter_bounded, crops, list(VOCAB)) * len(tiles) / len(sample)
    labels = np.load(truth_path, mmap_mode="r")
    seen, ok = set(), len(result) == len(kinds)
    for inst in result:  # each object once, mostly covered (masks come from 256 x 256 per tile)
        x0, y0, x1, y1 = inst.box
        ids, counts = np.unique(labels[y0:y1, x0:x1][inst.mask], return_counts=True)
        obj = int(ids[np.argmax(counts)])
        ok &= obj != 0 and obj not in seen and counts.max() >= 0.6 * areas[obj]
        seen.add(obj)
    return row(f"{args.size}^2 RGB scene, truth", len(tiles), "tiles", run, base, len(result),
               "once" if ok else "WRONG", ok, limit=True)


def truth_segmenter_bounded():
    from truth_backend import truth_segmenter

    return truth_segmenter(VOCAB, memory_bytes=256 * 1024**2, mask_size=256)  # low-res masks, like SAM 3


def case_image_sam3(args) -> dict:
    from promptseg.tiling import tile_grid

    rng = np.random.default_rng(0)
    image = rng.integers(100, 1100, (args.size, args.size), dtype=np.uint16)
    for _ in range(200):  # bright blobs on a noisy background
        y, x = rng.integers(0, args.size - 200, 2)
        image[y : y + 150, x : x + 120] += 30000
    tile, overlap = args.sam_tile, args.sam_tile // 8
    seg = warm(sam3_segmenter(args.model_dir), "cell")
    with PeakRSS() as run:
        result = seg.segment(image, "cell", threshold=args.sam_threshold, tile=tile, overlap=overlap)
    tiles = tile_grid(image.shape, tile, overlap)
    sample = tiles[:: max(1, len(tiles) // 4)]
    crops = [image[t.y0 : t.y1, t.x0 : t.x1] for t in sample]
    base = unit_baseline(lambda: sam3_segmenter(args.model_dir), crops, "cell", threshold=args.sam_threshold)
    base *= len(tiles) / len(sample)
    return row(f"{args.size}^2 uint16, tiny SAM 3", len(tiles), "tiles", run, base, len(result), "-", True, limit=True)


def truth_volume(depth, size):
    from truth_backend import render

    rng = np.random.default_rng(1)
    zz, yy, xx = np.ogrid[:depth, :size, :size]
    labels = np.zeros((depth, size, size), dtype=np.int32)
    kinds = {}
    footprint = np.zeros((size, size), dtype=bool)
    while len(kinds) < 40:  # ellipsoids whose XY footprints do not touch: linking has one right answer
        cz, cy, cx = rng.uniform(0, depth), rng.uniform(20, size - 20), rng.uniform(20, size - 20)
        rz, ry, rx = rng.uniform(2, max(3, depth / 3)), rng.uniform(8, 30), rng.uniform(8, 30)
        body = ((zz - cz) / rz) ** 2 + ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1
        shadow = body.any(axis=0)
        if not shadow.any() or (footprint & shadow).any():
            continue
        footprint |= np.pad(shadow, 2)[:-4, 2:-2] | np.pad(shadow, 2)[4:, 2:-2] | shadow
        obj = len(kinds) + 1
        labels[body] = obj
        kinds[obj] = 1 + obj % 2
    return labels, kinds, np.stack([render(labels[z], kinds) for z in range(depth)])


def case_stack_truth(args) -> dict:
    from truth_backend import truth_segmenter

    labels, kinds, stack = truth_volume(args.slices, args.slice_size)
    seg = warm(truth_segmenter(VOCAB), list(VOCAB))
    with PeakRSS() as run:
        result = seg.segment_stack(stack, list(VOCAB), axes="ZYXC", link=True)
    base = unit_baseline(lambda: truth_segmenter(VOCAB), list(stack), list(VOCAB))
    volume = result.to_label_volume()
    pairs = set(zip(volume[labels > 0].tolist(), labels[labels > 0].tolist()))
    # every pixel found, no two true objects under one id (a thin ellipsoid tip may start a new id)
    ok = bool(((volume > 0) == (labels > 0)).all()) and len(pairs) == len({a for a, _ in pairs})
    truth = len(np.unique(labels)) - 1
    return row(f"{args.slices}x{args.slice_size}^2 stack, truth, linked", args.slices, "slices", run, base,
               result.num_objects, f"{truth} true" if ok else "WRONG", ok)


def case_stack_sam3(args) -> dict:
    rng = np.random.default_rng(2)
    stack = rng.integers(100, 1100, (args.slices, args.slice_size, args.slice_size), dtype=np.uint16)
    stack[:, 100:220, 150:300] += 20000
    seg = warm(sam3_segmenter(args.model_dir), "cell")
    with PeakRSS() as run:
        result = seg.segment_stack(stack, "cell", threshold=args.sam_threshold, link=True)
    base = unit_baseline(lambda: sam3_segmenter(args.model_dir), list(stack), "cell", threshold=args.sam_threshold)
    return row(f"{args.slices}x{args.slice_size}^2 uint16 stack, tiny SAM 3, linked", args.slices, "slices",
               run, base, result.num_objects, "-", True)


def row(name, units, unit_name, run, base, found, check, ok, limit=False) -> dict:
    return {"case": name, "units": f"{units} {unit_name}", "seconds": run.seconds, "baseline": base,
            "peak_mb": run.mb, "found": int(found), "check": check, "ok": bool(ok), "limit": limit}


CASES = {
    "image-truth": case_image_truth,
    "image-sam3": case_image_sam3,
    "stack-truth": case_stack_truth,
    "stack-sam3": case_stack_sam3,
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=8192, help="side of the large image (default 8192)")
    parser.add_argument("--objects", type=int, default=3000, help="objects in the ground-truth scene")
    parser.add_argument("--truth-tile", type=int, default=1024, help="tile for the ground-truth backend (a multiple of 256)")
    parser.add_argument("--sam-tile", type=int, default=2048,
                        help="tile for the tiny SAM 3 (its input is 112 px, so tile size sets only the tile count)")
    parser.add_argument("--sam-threshold", type=float, default=0.26, help="score threshold for the random tiny SAM 3")
    parser.add_argument("--slices", type=int, default=64)
    parser.add_argument("--slice-size", type=int, default=512)
    parser.add_argument("--case", choices=sorted(CASES), help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.case:
        print(json.dumps(CASES[args.case](args)))
        return 0
    from promptseg.testing import make_random_sam3

    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        model_dir = make_random_sam3(Path(workdir) / "tiny-sam3")
        for case in CASES:
            command = [sys.executable, __file__, "--case", case, "--model-dir", str(model_dir), "--workdir", workdir]
            command += [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                        if k not in ("case", "model_dir", "workdir")]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                print(done.stderr[-3000:], file=sys.stderr)
                return 1
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"done: {case}", file=sys.stderr)
    print(f"{'case':48} {'units':>11} {'time s':>8} {'baseline s':>10} {'ratio':>6} {'peak MB':>8} "
          f"{'found':>6} {'check':>6}")
    for r in rows:
        print(f"{r['case']:48} {r['units']:>11} {r['seconds']:8.1f} {r['baseline']:10.1f} "
              f"{r['seconds'] / r['baseline']:6.2f} {r['peak_mb']:8.0f} {r['found']:6d} {r['check']:>6}")
    failed = [r["case"] for r in rows if not r["ok"]]
    too_big = [r["case"] for r in rows if r["limit"] and r["peak_mb"] >= LIMIT_MB]
    print(f"\npeak MB: resident memory beyond the loaded model, input and scene; target < {LIMIT_MB} MB "
          f"for the {args.size}x{args.size} image: {'met' if not too_big else 'MISSED: ' + ', '.join(too_big)}")
    return 1 if failed or too_big else 0


if __name__ == "__main__":
    sys.exit(main())
