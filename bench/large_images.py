"""Large images and stacks: time and peak memory of tiled and slice-by-slice segmentation.

    python bench/large_images.py                       # 8192x8192 uint16 image, 64-slice stack, 16000x16000 slide
    python bench/large_images.py --size 4096 --slices 16   # a quicker look
    python bench/large_images.py --only lazy --lazy-size 20000   # the zarr slide alone, another size

Two backends run the same public calls (`Segmenter.segment(..., tile=...)`,
`Segmenter.segment_stack(..., link=True)`): the deterministic ground-truth backend from
tests/truth_backend.py (exact answers, so stitching is checked on thousands of objects) and the
tiny random SAM 3 through the real loader. Each case runs in a fresh process; peak memory is the
highest resident set size sampled during the call minus the size just before it (model, input
image and scene already loaded). Baselines, measured in the same process:
* tiled image: the same tiles segmented one by one as plain images (``ratio`` = tiled time /
  sum of per-tile times, i.e. the cost of tiling and stitching on top of the model work);
* stack: a plain loop of `segment` over the slices (``ratio`` = stack time / loop time).

A slide larger than one wants in memory (``--lazy-size``, default 16000 x 16000 uint16, written to a
temp zarr store one 1024-pixel chunk at a time, so it never exists whole) runs through
`Segmenter.segment_large` (tiles read from the store on demand) and `write_labels` into a zarr
label store; the baseline, in another fresh process, is the in-memory path on the same slide:
``np.asarray`` of the zarr array, `segment(..., tile=1024)` and `to_label_image()``. Both print
time and peak memory and the ratios lazy / in-memory, also beyond the result's own mask bytes
(the cropped instance masks, which both paths hold). The tiny random SAM 3 scores every tile
about the same (~0.2545), whatever it sees, so the threshold is set just under its best score on
one tile: each tile keeps its best detection, about one tile-sized object per tile. That is a
worst case for the result's size (a real model's nuclei are far smaller), hence the figure
beyond the masks.
The run fails (exit 1) when the 8192x8192 case needs 2 GB or more beyond the model, or when a
ground-truth check fails.
"""

from __future__ import annotations

import argparse
import gc
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
sys.path.insert(0, str(ROOT))

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


LAZY_TILE = 1024
LAZY_PROMPT = "nucleus"


def lazy_threshold(model_dir, slide) -> float:
    """Just under the tiny model's best score on one tile of the slide: each tile keeps its best detection."""
    middle = slide.shape[0] // 2
    tile = np.asarray(slide[middle : middle + LAZY_TILE, middle : middle + LAZY_TILE])
    result = sam3_segmenter(model_dir).segment(tile, LAZY_PROMPT, threshold=0.0)
    return max(inst.score for inst in result) - 1e-5


def open_slide(args):
    import zarr

    return zarr.open_group(str(Path(args.workdir) / "slide.zarr"), mode="r")["0"]


def warm_on_tile(model_dir, threshold):
    """A segmenter that has run once on a tile-sized uint16 image (not one of the slide's tiles, so no
    embedding is cached for them): first-call costs of every stage are paid before the measurement."""
    noise = np.random.default_rng(7).integers(300, 4000, (LAZY_TILE, LAZY_TILE), dtype=np.uint16)
    seg = sam3_segmenter(model_dir)
    seg.segment(noise, LAZY_PROMPT, threshold=threshold)
    return seg


def case_lazy_sam3(args) -> dict:
    """`segment_large` on the zarr slide, then `write_labels` into a zarr label store on disk."""
    import ome_zarr.writer  # noqa: F401 - imported before measuring, as the libraries are not the image
    from promptseg.large_images import create_label_pyramid, write_labels

    slide = open_slide(args)
    seg = warm_on_tile(args.model_dir, args.lazy_threshold)
    gc.collect()
    with PeakRSS() as run:
        result = seg.segment_large(slide, LAZY_PROMPT, threshold=args.lazy_threshold, tile=LAZY_TILE)
        segmented = time.perf_counter() - run.start
        [labels] = create_label_pyramid(Path(args.workdir) / "labels.zarr", [slide.shape])
        blocks = write_labels(result, labels)
    return lazy_row("lazy: segment_large + write_labels to zarr", result, run, segmented,
                    f"{blocks} blocks", len(result) > 0 and blocks > 0)


def case_lazy_in_memory(args) -> dict:
    """The same slide in memory: ``np.asarray`` of the zarr array, tiled `segment`, `to_label_image`."""
    import zarr

    slide = open_slide(args)
    seg = warm_on_tile(args.model_dir, args.lazy_threshold)
    gc.collect()
    with PeakRSS() as run:
        image = np.asarray(slide)
        result = seg.segment(image, LAZY_PROMPT, threshold=args.lazy_threshold, tile=LAZY_TILE)
        segmented = time.perf_counter() - run.start
        labels = result.to_label_image()
    lazy = zarr.open_array(str(Path(args.workdir) / "labels.zarr" / "0"), mode="r")
    same = sum(int(((labels[y : y + LAZY_TILE] > 0) == (lazy[y : y + LAZY_TILE] > 0)).sum())
               for y in range(0, labels.shape[0], LAZY_TILE))
    agreement = same / labels.size  # foreground of the two label images, pixel by pixel
    return lazy_row("in memory: asarray + segment + to_label_image", result, run, segmented,
                    f"{agreement:.1%} same", len(result) > 0 and agreement > 0.95)


def lazy_row(name, result, run, segmented, check, ok) -> dict:
    return {"case": name, "tiles": int(result.info.get("tiles", 0)), "found": len(result), "seconds": run.seconds,
            "segment_seconds": segmented, "peak_mb": run.mb,
            "mask_mb": sum(inst.mask.nbytes for inst in result) / 1024**2, "check": check, "ok": bool(ok)}


def row(name, units, unit_name, run, base, found, check, ok, limit=False) -> dict:
    return {"case": name, "units": f"{units} {unit_name}", "seconds": run.seconds, "baseline": base,
            "peak_mb": run.mb, "found": int(found), "check": check, "ok": bool(ok), "limit": limit}


CASES = {
    "image-truth": case_image_truth,
    "image-sam3": case_image_sam3,
    "stack-truth": case_stack_truth,
    "stack-sam3": case_stack_sam3,
    "lazy-sam3": case_lazy_sam3,
    "lazy-in-memory": case_lazy_in_memory,  # after lazy-sam3: it compares with that case's label store
}
GROUPS = {"image": ["image-truth", "image-sam3"], "stack": ["stack-truth", "stack-sam3"],
          "lazy": ["lazy-sam3", "lazy-in-memory"]}


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
    parser.add_argument("--lazy-size", type=int, default=16000,
                        help="side of the zarr slide segmented lazily and in memory (default 16000)")
    parser.add_argument("--only", nargs="+", choices=list(GROUPS), help="run only these groups of cases (default: all)")
    parser.add_argument("--case", choices=sorted(CASES), help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    parser.add_argument("--lazy-threshold", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.case:
        print(json.dumps(CASES[args.case](args)))
        return 0
    from promptseg.testing import make_random_sam3
    from promptseg.testing.slides import write_slide

    groups = args.only or list(GROUPS)
    rows, lazy_rows = [], []
    with tempfile.TemporaryDirectory() as workdir:
        model_dir = make_random_sam3(Path(workdir) / "tiny-sam3")
        if "lazy" in groups:
            slide = write_slide(Path(workdir) / "slide.zarr", args.lazy_size, chunk=LAZY_TILE)[0]
            args.lazy_threshold = lazy_threshold(model_dir, slide)
            print(f"slide written: {args.lazy_size}^2 uint16 in zarr, threshold {args.lazy_threshold:.6f}", file=sys.stderr)
        for case in [case for group in GROUPS if group in groups for case in GROUPS[group]]:
            command = [sys.executable, __file__, "--case", case, "--model-dir", str(model_dir), "--workdir", workdir]
            command += [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                        if k not in ("case", "model_dir", "workdir", "only") and v is not None]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                print(done.stderr[-3000:], file=sys.stderr)
                return 1
            (lazy_rows if case in GROUPS["lazy"] else rows).append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"done: {case}", file=sys.stderr)
    too_big = [r["case"] for r in rows if r["limit"] and r["peak_mb"] >= LIMIT_MB]
    if rows:
        print(f"{'case':48} {'units':>11} {'time s':>8} {'baseline s':>10} {'ratio':>6} {'peak MB':>8} "
              f"{'found':>6} {'check':>6}")
        for r in rows:
            print(f"{r['case']:48} {r['units']:>11} {r['seconds']:8.1f} {r['baseline']:10.1f} "
                  f"{r['seconds'] / r['baseline']:6.2f} {r['peak_mb']:8.0f} {r['found']:6d} {r['check']:>6}")
    if "image" in groups:
        print(f"\npeak MB: resident memory beyond the loaded model, input and scene; target < {LIMIT_MB} MB "
              f"for the {args.size}x{args.size} image: {'met' if not too_big else 'MISSED: ' + ', '.join(too_big)}")
    if lazy_rows:
        print_lazy(lazy_rows, args.lazy_size)
    failed = [r["case"] for r in rows + lazy_rows if not r["ok"]]
    return 1 if failed or too_big else 0


def print_lazy(rows: list[dict], size: int) -> None:
    """The zarr slide's two paths, and the ratios lazy / in memory."""
    lazy, memory = rows
    print(f"\n{size}x{size} uint16 zarr slide, tiny SAM 3, tiles {LAZY_TILE} (slide {size * size * 2 / 1024**2:.0f} MiB "
          f"as uint16, {size * size * 3 / 1024**2:.0f} MiB as RGB, {size * size * 4 / 1024**2:.0f} MiB as int32 labels)")
    print(f"{'path':46} {'tiles':>5} {'found':>5} {'segment s':>9} {'total s':>7} {'peak MiB':>8} {'masks MiB':>9} "
          f"{'peak-masks':>10}  check")
    for r in rows:
        print(f"{r['case']:46} {r['tiles']:5d} {r['found']:5d} {r['segment_seconds']:9.1f} {r['seconds']:7.1f} "
              f"{r['peak_mb']:8.0f} {r['mask_mb']:9.0f} {r['peak_mb'] - r['mask_mb']:10.0f}  {r['check']}")

    def ratio(key):
        return lazy[key] / memory[key] if memory[key] else float("nan")

    beyond = (lazy["peak_mb"] - lazy["mask_mb"]) / max(memory["peak_mb"] - memory["mask_mb"], 1e-9)
    print(f"{'ratio lazy / in memory':46} {'':>5} {'':>5} {ratio('segment_seconds'):9.2f} {ratio('seconds'):7.2f} "
          f"{ratio('peak_mb'):8.2f} {'':>9} {beyond:10.2f}")
    print("peak MiB: resident memory growth during the call (model loaded before); peak-masks: beyond the "
          "result's own cropped masks (sum of inst.mask.nbytes)")


if __name__ == "__main__":
    sys.exit(main())
