"""Throughput on Ray: 1 and 2 actors against the single-process core on the same images.

    python -m bench.ray_throughput [--size full] [--images N]

The core run is one `Segmenter` in this process (model loaded and one image segmented before the
clock starts, torch on every core). Each Ray run is `promptseg.distributed.segment_on_ray` on a local Ray started once
before timing, one CPU per actor; its time includes starting the actors and loading their models,
which is what a run pays. The overhead per image is (Ray time - core time) / images.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from bench._common import model_dir, parser, print_table, timed

PROMPTS = ["cat", "red car"]


def write_images(folder: Path, count: int) -> list[str]:
    """`count` 480x640 PNG files with some structure."""
    from PIL import Image

    paths = []
    for index in range(count):
        rng = np.random.default_rng(index)
        rgb = rng.integers(0, 80, (480, 640, 3), dtype=np.uint8)
        rgb[100:300, 150:400] = (220, 40, 40)
        path = folder / f"image{index:03d}.png"
        Image.fromarray(rgb).save(path)
        paths.append(str(path))
    return paths


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--images", type=int, default=None, help="how many images (default: 24 tiny, 4 full)")
    args = p.parse_args()
    import ray
    import torch

    import promptseg
    from promptseg.distributed import segment_on_ray

    count = args.images or (24 if args.size == "tiny" else 4)
    directory = str(model_dir(args.size))
    with tempfile.TemporaryDirectory() as folder:
        paths = write_images(Path(folder), count)
        segmenter = promptseg.load_segmenter(directory, device="cpu", cache_dir=False)
        segmenter.segment(paths[0], ["warm-up"])  # first-call set-up out of the timing
        core_time, _ = timed(lambda: [segmenter.segment(path, PROMPTS) for path in paths])
        segmenter.close()
        rows = [["core, one process", core_time, count / core_time, 1.0, 0.0]]
        ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", configure_logging=False)
        try:
            for actors in (1, 2):
                seconds, records = timed(lambda: list(segment_on_ray(
                    paths, PROMPTS, model=directory, actors=actors, cache_dir=False, progress=False)))
                assert len(records) == count and not any(record["error"] for record in records)
                rows.append([f"Ray, {actors} actor(s)", seconds, count / seconds, core_time / seconds,
                             (seconds - core_time) / count])
        finally:
            ray.shutdown()
    print_table(f"{count} images of 480x640, {len(PROMPTS)} prompts, {args.size} SAM 3 on CPU "
                f"(core: {torch.get_num_threads()} torch threads; actors: 1 each)",
                ["run", "seconds", "images/s", "speed-up vs core", "overhead s/image"], rows)


if __name__ == "__main__":
    main()
