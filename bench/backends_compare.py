"""The two SAM 3 backends on the same image and prompts: transformers (``sam3``) vs Meta's
package (``sam3-meta``), plus Meta's own ``Sam3Processor`` loop as it is meant to be used.

    python -m bench.backends_compare               # tiny random models, seconds
    python -m bench.backends_compare --size full   # the real 840M architecture, random weights, minutes

Each backend has its own random weights (the formats differ), so the table compares cost, not
masks. Ratios are against the transformers backend measured in the same run. Needs the
``meta`` extra (Meta's ``sam3`` package).
"""

from __future__ import annotations

import gc

import numpy as np

from bench._common import BENCH_CACHE, model_dir, parser, print_table, timed

PROMPTS = ["cat", "ear", "whiskers"]


def meta_checkpoint(size: str):
    from promptseg.testing import make_random_meta_sam3

    return make_random_meta_sam3(BENCH_CACHE / f"sam3-meta-{size}", size=size)


def measure(model: str, image: np.ndarray, repeat: int) -> dict:
    """Load, one cold prompt (image encoder + decoder), then all prompts on the cached embedding."""
    import promptseg
    from promptseg.cache import tensors_nbytes

    load_time, seg = timed(lambda: promptseg.load_segmenter(model, device="cpu", cache_dir=False))

    def cold():
        seg.cache.memory.clear()
        seg.text_cache.clear()
        return seg.segment(image, PROMPTS[:1], threshold=0.5)

    cold()  # warm-up
    cold_time, _ = timed(cold, repeat)
    cached_time, _ = timed(lambda: seg.segment(image, PROMPTS, threshold=0.5), repeat)
    features, _ = seg.embed(image)
    return {"seg": seg, "load": load_time, "cold": cold_time, "cached": cached_time,
            "mib": tensors_nbytes(features) / 2**20}


def meta_processor_loop(seg, image: np.ndarray, repeat: int) -> float:
    """Meta's documented use: set_image, then set_text_prompt per prompt (CPU via the redirect)."""
    from PIL import Image
    from sam3.model.sam3_image_processor import Sam3Processor

    from promptseg.backends.meta.device import DeviceRedirect

    processor = Sam3Processor(seg.backend.model, resolution=seg.backend.input_size[0], device="cpu",
                              confidence_threshold=0.5)
    picture = Image.fromarray(image)

    def run():
        with DeviceRedirect("cpu"):
            state = processor.set_image(picture)
            for prompt in PROMPTS:
                processor.reset_all_prompts(state)
                processor.set_text_prompt(prompt, state)

    run()
    return timed(run, repeat)[0]


def main() -> None:
    args = parser(__doc__).parse_args()
    from PIL import Image

    image = np.asarray(Image.open("examples/chelsea.jpg").convert("RGB"))
    repeat = 3 if args.size == "tiny" else 1
    rows = []
    hf = measure(str(model_dir(args.size)), image, repeat)
    del hf["seg"]
    gc.collect()
    meta = measure(str(meta_checkpoint(args.size)), image, repeat)
    loop = meta_processor_loop(meta.pop("seg"), image, repeat)
    for name, result in (("sam3 (transformers)", hf), ("sam3-meta", meta)):
        rows.append([name, result["load"], result["cold"], result["cached"], result["mib"],
                     f"{hf['cold'] / result['cold']:.2f}x", f"{hf['cached'] / result['cached']:.2f}x"])
    rows.append(["Meta Sam3Processor loop", "", "", loop, "", "", f"{hf['cached'] / loop:.2f}x"])
    height, width = image.shape[:2]
    print_table(
        f"{len(PROMPTS)} prompts on one {width}x{height} image, {args.size} SAM 3 on CPU, fp32 (seconds)",
        ["backend", "load", "1 prompt cold", f"{len(PROMPTS)} prompts cached", "embedding MiB",
         "cold vs sam3", "cached vs sam3"],
        rows,
    )
    print("  Meta's loop re-encodes the image each time it is called and decodes prompts one by one.")


if __name__ == "__main__":
    main()
