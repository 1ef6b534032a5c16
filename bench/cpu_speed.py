"""CPU speed: precision (fp32 vs dtype="auto") and the per-prompt cost on cached image features.

    python -m bench.cpu_speed               # tiny random SAM 3, seconds
    python -m bench.cpu_speed --size full   # the released architecture with random weights, ~15 min

One image, the same prompts and weights throughout. Three tables:

1. k prompts on a new image: the per-prompt loop (processor + full ``Sam3Model`` forward per
   prompt, as FiftyOne's SAM 3 integrations run it) in fp32, against promptseg with a cold cache in
   fp32 and in ``auto`` precision (bf16 where the CPU has native bf16).
2. Per stage, fp32 and auto: the image encoder; one prompt on cached features through
   transformers' own forward (``model(vision_embeds=..., input_ids=...)``) and through promptseg's
   detection head (5 prompts, batched and one by one); and the head at threshold 0 (every query
   kept: the mask decoder's worst case; random weights rarely pass 0.5, real ones often do).
3. Where one prompt's time goes (fp32): the DETR encoder (its first self-attention block apart:
   promptseg runs it once per image, with the image encoder), DETR decoder and mask decoder, in
   transformers' forward and in promptseg's head.
"""

from __future__ import annotations

import time

import numpy as np

from bench._common import model_dir, parser, print_table, timed

PROMPTS = ["cat", "dog", "car", "person", "tree", "bicycle", "cup", "chair", "bird", "boat"]


def main() -> None:
    args = parser(__doc__).parse_args()
    import torch
    from PIL import Image
    from transformers import Sam3ImageProcessor, Sam3Processor

    import promptseg
    from promptseg.device import auto_dtype, dtype_name
    from promptseg.tokenizer import clip_tokenizer

    directory = model_dir(args.size)
    image = np.array(Image.open("examples/chelsea.jpg").convert("RGB"))
    height, width = image.shape[:2]
    auto_name = dtype_name(auto_dtype(torch.device("cpu"))[0])
    segmenters = {"fp32": promptseg.load_segmenter(str(directory), device="cpu", dtype="fp32", cache_dir=False)}
    if auto_name != "fp32":
        segmenters["auto"] = promptseg.load_segmenter(str(directory), device="cpu", dtype="auto", cache_dir=False)
    print(f"dtype='auto' on this CPU: {auto_name} ({auto_dtype(torch.device('cpu'))[1]})")
    fp32 = segmenters["fp32"]
    size = fp32.backend.input_size
    processor = Sam3Processor(image_processor=Sam3ImageProcessor(size={"height": size[0], "width": size[1]}),
                              tokenizer=clip_tokenizer())
    repeat = 3 if args.size == "tiny" else 1

    def loop_until(ks):
        """The per-prompt loop over max(ks) prompts; elapsed seconds after each k in `ks`."""
        marks, start = {}, time.perf_counter()
        for done, prompt in enumerate(PROMPTS[: max(ks)], 1):
            inputs = processor(images=image, text=prompt, return_tensors="pt")
            with torch.inference_mode():
                out = fp32.backend.model(**inputs)
            processor.post_process_instance_segmentation(out, threshold=0.5, target_sizes=[(height, width)])
            if done in ks:
                marks[done] = time.perf_counter() - start
        return marks

    def cold(seg, k):
        seg.cache.release()
        seg.text_cache.clear()
        seg.segment(image, PROMPTS[:k], threshold=0.5)

    for seg in segmenters.values():  # warm up every path once
        cold(seg, 1)
    loop_until([1])
    ks = [1, 5, 10]
    loop = loop_until(ks)
    rows = []
    for k in ks:
        row = [k, loop[k]]
        for name, seg in segmenters.items():
            seconds, _ = timed(lambda seg=seg: cold(seg, k), repeat)
            row += [seconds, f"{seconds / loop[k]:.2f}"]
        rows.append(row)
    header = ["k", "per-prompt loop fp32"]
    for name in segmenters:
        label = f"promptseg {name}" + (f" ({auto_name})" if name == "auto" else "")
        header += [label, "ratio"]
    print_table(f"k prompts on a new {width}x{height} image, {args.size} SAM 3 on 2 CPU threads (seconds)",
                header, rows)

    stage_rows = []
    for name, seg in segmenters.items():
        stage_rows += per_prompt_rows(seg, image, name if name == "fp32" else f"auto ({auto_name})", repeat)
    print_table("Per stage (seconds; per prompt on cached features unless said)",
                ["precision", "what", "seconds", "vs transformers' forward"], stage_rows)
    print_table("Where one prompt's time goes on cached features, fp32 (seconds)",
                ["stage", "transformers' forward", "promptseg head"], stage_profile(fp32, image))


def per_prompt_rows(seg, image, label, repeat) -> list[list[object]]:
    """Image encoder, transformers' forward per prompt, and promptseg's head (batched, one by one,
    every query kept) per prompt, for 5 prompts on one cached image."""
    prompts = PROMPTS[:5]
    seg.cache.release()
    encoder, (features, _) = timed(lambda: seg.embed(image))
    texts = seg.text_embeddings(prompts)
    theirs, _ = timed(lambda: [transformers_forward(seg, features, [p]) for p in prompts], repeat)
    batched, _ = timed(lambda: seg.backend.decode(features, texts, 0.5), repeat)
    single, _ = timed(lambda: [seg.backend.decode(features, [t], 0.5) for t in texts], repeat)
    worst, _ = timed(lambda: [seg.backend.decode(features, [t], 0.0) for t in texts], repeat)
    theirs /= len(prompts)
    return [
        [label, "image encoder (once per image)", encoder, ""],
        [label, "transformers' forward on cached features", theirs, "1.00"],
        [label, "promptseg head, 5 prompts batched", batched / len(prompts), f"{batched / len(prompts) / theirs:.2f}"],
        [label, "promptseg head, one by one", single / len(prompts), f"{single / len(prompts) / theirs:.2f}"],
        [label, "promptseg head, threshold 0 (all kept)", worst / len(prompts), f"{worst / len(prompts) / theirs:.2f}"],
    ]


def transformers_forward(seg, features, prompts):
    """``Sam3Model.forward`` on the cached FPN levels with the prompts' token ids."""
    import torch
    from transformers.models.sam3.modeling_sam3 import Sam3VisionEncoderOutput

    backend = seg.backend
    levels = [features[f"fpn_{i}"] for i in range(sum(k.startswith("fpn_") for k in features))]
    vision = Sam3VisionEncoderOutput(
        fpn_hidden_states=tuple(levels) + (None,),
        fpn_position_encoding=tuple(backend._position(level) for level in levels) + (None,),
    )
    tokens = backend.tokenizer(prompts, padding="max_length", max_length=32, truncation=True, return_tensors="pt")
    with torch.inference_mode():
        return backend.model(vision_embeds=vision, input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])


def stage_modules(model) -> dict[str, list]:
    """The modules whose time makes up each stage. The DETR encoder is timed by its layers'
    attention and MLP blocks, since promptseg's head calls them without the encoder's own forward
    (its first self-attention block runs with the image encoder)."""
    layers = model.detr_encoder.layers
    return {
        "detr_encoder: first self-attention": [layers[0].self_attn],
        "detr_encoder: the rest": [m for i, layer in enumerate(layers) for m in
                                   ((layer.cross_attn, layer.mlp) if i == 0 else (layer.self_attn, layer.cross_attn, layer.mlp))],
        "detr_decoder": [model.detr_decoder],
        "mask_decoder": [model.mask_decoder],
    }


def stage_profile(seg, image) -> list[list[object]]:
    """Seconds per stage for one prompt, timed by forward hooks on the model's sub-modules."""
    features, _ = seg.embed(image)
    texts = seg.text_embeddings(PROMPTS[:1])
    stages = stage_modules(seg.backend.model)
    spent: dict[str, float] = {}
    hooks = []
    for stage, modules in stages.items():
        for module in modules:
            hooks.append(module.register_forward_pre_hook(
                lambda *_, s=stage: spent.__setitem__(s, spent.get(s, 0) - time.perf_counter())))
            hooks.append(module.register_forward_hook(
                lambda *_, s=stage: spent.__setitem__(s, spent[s] + time.perf_counter())))
    columns = []
    for run in (lambda: transformers_forward(seg, features, PROMPTS[:1]), lambda: seg.backend.decode(features, texts, 0.5)):
        run()
        spent.clear()
        total, _ = timed(run)
        columns.append({**spent, "total": total})
    for hook in hooks:
        hook.remove()
    names = [*stages, "total"]
    return [[name, columns[0].get(name, 0.0), columns[1].get(name, 0.0)] for name in names]


if __name__ == "__main__":
    main()
