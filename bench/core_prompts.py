"""k prompts on one image: promptseg vs the per-prompt loop other integrations run.

    python -m bench.core_prompts               # tiny random SAM 3, seconds
    python -m bench.core_prompts --size full   # the real 840M architecture, random weights, minutes

The baseline is what FiftyOne's SAM 3 zoo plugins and similar tools do: for each prompt, the
processor prepares image and text, the full model runs (image encoder included), and transformers
post-processes. promptseg encodes the image once (cold cache) and batches the prompts.
Same weights, same image, same prompts.
"""

from __future__ import annotations

import numpy as np

from bench._common import model_dir, parser, print_table, timed

PROMPTS = ["cat", "dog", "car", "person", "tree", "bicycle", "cup", "chair", "bird", "boat"]


def main() -> None:
    args = parser(__doc__).parse_args()
    import torch
    from transformers import Sam3ImageProcessor, Sam3Processor

    import promptseg
    from promptseg.tokenizer import clip_tokenizer

    directory = model_dir(args.size)
    image = np.asarray(__import__("PIL.Image", fromlist=["Image"]).open("examples/chelsea.jpg").convert("RGB"))
    height, width = image.shape[:2]
    seg = promptseg.load_segmenter(str(directory), device="cpu", dtype="fp32", cache_dir=False)  # both sides fp32
    size = seg.backend.input_size
    processor = Sam3Processor(image_processor=Sam3ImageProcessor(size={"height": size[0], "width": size[1]}),
                              tokenizer=clip_tokenizer())
    model = seg.backend.model

    def baseline(prompts):
        for prompt in prompts:
            inputs = processor(images=image, text=prompt, return_tensors="pt")
            with torch.inference_mode():
                out = model(**inputs)
            processor.post_process_instance_segmentation(out, threshold=0.5, target_sizes=[(height, width)])

    def ours(prompts):
        seg.cache.memory.clear()  # cold: the image encoder runs once per call
        seg.text_cache.clear()
        seg.segment(image, prompts, threshold=0.5)

    repeat = 3 if args.size == "tiny" else 1
    ours(PROMPTS[:1])
    baseline(PROMPTS[:1])  # warm up both
    rows = []
    for k in (1, 3, 10):
        base_time, _ = timed(lambda: baseline(PROMPTS[:k]), repeat)
        our_time, _ = timed(lambda: ours(PROMPTS[:k]), repeat)
        warm_time, _ = timed(lambda: seg.segment(image, PROMPTS[:k], threshold=0.5), repeat)
        rows.append([k, base_time, our_time, warm_time, f"{base_time / our_time:.1f}x", f"{base_time / warm_time:.1f}x"])
    print_table(f"k prompts on one {width}x{height} image, {args.size} SAM 3 on CPU (seconds)",
                ["k", "per-prompt loop", "promptseg cold", "promptseg cached", "speed-up cold", "speed-up cached"], rows)


if __name__ == "__main__":
    main()
