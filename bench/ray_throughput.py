"""Throughput on Ray: 1 and 2 actors against the single-process core on the same images.

    python -m bench.ray_throughput [--size full] [--images N]

The core run is one `Segmenter` in this process (model loaded and one image segmented before the
clock starts, torch on every core). Each Ray run is `promptseg.distributed.segment_on_ray` on a local Ray started once
before timing, one CPU per actor; its time includes starting the actors and loading their models,
which is what a run pays. The speed-up is against the core with torch on every core. The overhead
per image is what Ray adds to the same compute: (Ray time x actors - core time on one thread) /
images, i.e. actor-seconds per image beyond a one-thread core (each actor has one thread); most
of it is starting the actors, shown on its own as the time to the first record.
"""

from __future__ import annotations

import tempfile
import time
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


def ray_run(paths: list[str], directory: str, actors: int) -> tuple[float, list[dict]]:
    """Seconds until the first record (starting the actors, loading their models) and every record."""
    from promptseg.distributed import segment_on_ray

    start, first, records = time.perf_counter(), None, []
    for record in segment_on_ray(paths, PROMPTS, model=directory, actors=actors, cache_dir=False, progress=False):
        first = first if first is not None else time.perf_counter() - start
        records.append(record)
    return first, records


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--images", type=int, default=None, help="how many images (default: 24 tiny, 4 full)")
    args = p.parse_args()
    import ray
    import torch

    import promptseg

    count = args.images or (24 if args.size == "tiny" else 4)
    directory = str(model_dir(args.size))
    with tempfile.TemporaryDirectory() as folder:
        paths = write_images(Path(folder), count)
        segmenter = promptseg.load_segmenter(directory, device="cpu", cache_dir=False)
        segmenter.segment(paths[0], ["warm-up"])  # first-call set-up out of the timing
        threads = torch.get_num_threads()
        core_time, _ = timed(lambda: [segmenter.segment(path, PROMPTS) for path in paths])
        torch.set_num_threads(1)  # what one actor has: the overhead is measured against this
        single_time, _ = timed(lambda: [segmenter.segment(path, PROMPTS) for path in paths])
        torch.set_num_threads(threads)
        segmenter.close()
        rows = [[f"core, one process, {threads} threads", core_time, count / core_time, 1.0, "", ""],
                ["core, one process, 1 thread", single_time, count / single_time, core_time / single_time, 0.0, ""]]
        ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", configure_logging=False)
        try:
            for actors in (1, 2):
                seconds, (first, records) = timed(lambda: ray_run(paths, directory, actors))
                assert len(records) == count and not any(record["error"] for record in records)
                rows.append([f"Ray, {actors} actor(s) of 1 thread", seconds, count / seconds, core_time / seconds,
                             (seconds * actors - single_time) / count, first])
        finally:
            ray.shutdown()
    print_table(f"{count} images of 480x640, {len(PROMPTS)} prompts, {args.size} SAM 3 on CPU",
                ["run", "seconds", "images/s", "speed-up vs core", "overhead s/image", "first record after s"], rows)


if __name__ == "__main__":
    main()
