"""What the FiftyOne adapter costs on top of the core, and what a second prompt costs.

    python -m bench.fiftyone_adapter                       # tiny random SAM 3, a database of its own
    python -m bench.fiftyone_adapter --pictures docs/images   # also render docs/images/fiftyone-*.png

The database is a mongod the benchmark starts itself on a free 127.0.0.1 port over a temporary
directory (`promptseg_fiftyone.testing`): a FiftyOne database service you have running is never
joined. Baseline: the core alone (`Segmenter.segment` on each image path, fresh caches). Adapter: the
same images as a FiftyOne dataset through `segment_samples` (the operator's loop): FiftyOne reads,
prompt handling, conversion to `fo.Detections` (masks included) and batched database writes.
Then a second prompt over the same dataset, which should skip the image encoder. Each side has its
own segmenter with its own cold caches; both are warmed up on an unrelated image first.
The adapter's overhead is measured inside its own run (total time minus time spent in
`Segmenter.segment`), so it does not depend on two separate runs seeing the same machine load.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from bench._common import model_dir, parser, print_table, timed

PROMPTS = ["cat", "person"]
SECOND = ["coffee cup"]


def make_images(root: Path, count: int) -> list[str]:
    """`count` distinct crops of scikit-image's bundled photos (distinct pixels, distinct embeddings)."""
    from PIL import Image
    from skimage import data

    photos = [data.chelsea(), data.astronaut(), data.coffee(), data.rocket()]
    paths = []
    for index in range(count):
        photo = photos[index % len(photos)]
        offset = 3 * (index // len(photos))
        crop = photo[offset : offset + 300 : 2, offset : offset + 400 : 2]
        path = root / f"photo{index:03d}.png"
        Image.fromarray(crop).save(path)
        paths.append(str(path))
    return paths


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--images", type=int, default=12, help="dataset size (default: %(default)s)")
    p.add_argument("--pictures", type=Path, default=None, help="also write fiftyone-*.png pictures here")
    args = p.parse_args()

    from promptseg_fiftyone.testing import use_temporary_database

    run(args, use_temporary_database("promptseg-bench-fo-"))


def run(args, root: Path) -> None:
    import fiftyone as fo

    import promptseg
    from promptseg_fiftyone import segment_samples

    directory = str(model_dir(args.size))
    (root / "images").mkdir()
    paths = make_images(root / "images", args.images)
    warmup = make_images(root, 1)[0]
    dataset = fo.Dataset()
    dataset.add_samples([fo.Sample(filepath=path) for path in paths])
    n = len(paths)

    core = promptseg.load_segmenter(directory, device="cpu", cache_dir=root / "cache-core")
    ours = promptseg.load_segmenter(directory, device="cpu", cache_dir=root / "cache-adapter")
    for seg in (core, ours):
        seg.segment(np.asarray(__import__("PIL.Image", fromlist=["Image"]).open(warmup))[::-1].copy(),
                    PROMPTS + SECOND, threshold=0.0)

    core_first, _ = timed(lambda: [core.segment(path, PROMPTS, threshold=0.0) for path in paths])
    core_second, _ = timed(lambda: [core.segment(path, SECOND, threshold=0.0) for path in paths])
    timed_ours = TimedSegmenter(ours)
    encoder_runs = ours.stats.image_encoder_runs
    adapter_first, first = timed(lambda: segment_samples(dataset, PROMPTS, "first", segmenter=timed_ours, threshold=0.0))
    in_core_first, timed_ours.seconds = timed_ours.seconds, 0.0
    after_first = ours.stats.image_encoder_runs
    adapter_second, second = timed(lambda: segment_samples(dataset, SECOND, "second", segmenter=timed_ours, threshold=0.0))
    in_core_second = timed_ours.seconds
    after_second = ours.stats.image_encoder_runs
    instances = first.instances

    print_table(
        f"FiftyOne adapter vs core: {n} images (150x200), {args.size} SAM 3 on CPU, prompts {PROMPTS}",
        ["run", "core alone s", "adapter s", "of which core s", "overhead ms/sample", "overhead/core",
         "image encoder runs"],
        [
            ["first prompts (cold)", core_first, adapter_first, in_core_first,
             1000 * (adapter_first - in_core_first) / n, f"{(adapter_first - in_core_first) / in_core_first:.2f}x",
             after_first - encoder_runs],
            ["second prompt (same dataset)", core_second, adapter_second, in_core_second,
             1000 * (adapter_second - in_core_second) / n,
             f"{(adapter_second - in_core_second) / in_core_second:.2f}x", after_second - after_first],
        ],
    )
    print_table(
        "Second prompt over the same dataset, through the adapter",
        ["first run s", "second run s", "second/first", "embedding sources (second run)", "instances written (first)"],
        [[adapter_first, adapter_second, f"{adapter_second / adapter_first:.2f}x", second.embedding_sources, instances]],
    )
    if args.pictures is not None:
        write_pictures(dataset, args.pictures)


class TimedSegmenter:
    """A segmenter that adds up the time spent in `segment` (everything else is the adapter's)."""

    def __init__(self, segmenter) -> None:
        self.segmenter, self.seconds = segmenter, 0.0

    def segment(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return self.segmenter.segment(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start

    def __getattr__(self, name):
        return getattr(self.segmenter, name)


def write_pictures(dataset, out: Path) -> None:
    """Overlays of what FiftyOne stored (decoded by FiftyOne), one PNG per sample shown."""
    from promptseg.images import load_image
    from promptseg.render import overlay, save_png
    from promptseg_fiftyone.convert import to_result

    out.mkdir(parents=True, exist_ok=True)
    for name, sample in zip(["cat", "astronaut"], dataset.limit(2)):
        rgb = load_image(sample.filepath)
        result = to_result(sample["first"], rgb.shape[:2])
        best = sorted(result.instances, key=lambda inst: -inst.score)[:4]
        result.instances = best
        picture = np.concatenate([rgb, overlay(rgb, result)], axis=1)
        path = save_png(picture, out / f"fiftyone-{name}.png")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
