"""Post-processing time and peak memory: promptseg's lean path vs transformers' full-size path.

    python -m bench.core_postprocess            # 2048x2048 and 4096x4096, 100 instances

Both start from the same model output (288x288 mask logits, 100 confident instances as SAM 3
returns them); each measurement runs in its own process so peak memory is its own.
"""

from __future__ import annotations

import json
import sys
import time

from bench._common import mib, parser, peak_rss_self, print_table, reset_peak_rss, run_isolated

SIZES = [2048, 4096]
INSTANCES = 100


def synthetic_output(instances: int = INSTANCES, queries: int = 200, low: int = 288, seed: int = 0):
    """A Sam3ImageSegmentationOutput-like object: `instances` blobs scored high, the rest low."""
    import torch
    from transformers.models.sam3.modeling_sam3 import Sam3ImageSegmentationOutput

    gen = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(low), torch.arange(low), indexing="ij")
    centers = torch.rand(queries, 2, generator=gen) * low
    radii = 4 + torch.rand(queries, generator=gen) * 20
    masks = torch.stack([  # logits: positive inside each disc
        (radii[q] - ((yy - centers[q, 0]) ** 2 + (xx - centers[q, 1]) ** 2).sqrt()) / 2 for q in range(queries)
    ])
    logits = torch.full((queries,), -6.0)
    logits[:instances] = 6.0
    boxes = torch.stack([(centers[:, 1] - radii) / low, (centers[:, 0] - radii) / low,
                         (centers[:, 1] + radii) / low, (centers[:, 0] + radii) / low], dim=-1).clamp(0, 1)
    return Sam3ImageSegmentationOutput(pred_masks=masks[None], pred_boxes=boxes[None], pred_logits=logits[None],
                                       presence_logits=torch.full((1, 1), 6.0))


def worker(method: str, size: int) -> None:
    out = synthetic_output()
    base = reset_peak_rss()
    start = time.perf_counter()
    if method == "transformers":
        from transformers import Sam3ImageProcessor

        result = Sam3ImageProcessor().post_process_instance_segmentation(out, threshold=0.5, target_sizes=[(size, size)])[0]
        count = len(result["masks"])
    else:
        from promptseg.masks import instances_from_probs, postprocess
        from promptseg.options import CleanupOptions

        scores = out.pred_logits[0].sigmoid() * out.presence_logits[0].sigmoid()
        keep = scores > 0.5
        found = instances_from_probs(out.pred_masks[0][keep].sigmoid(), scores[keep], out.pred_boxes[0][keep],
                                     "object", (size, size), 0.5)
        count = len(postprocess(found, (size, size), CleanupOptions(iou_threshold=None, cross_prompt_iou=None)))
    elapsed = time.perf_counter() - start
    print(json.dumps({"seconds": elapsed, "peak_rss": peak_rss_self(), "base_rss": base, "instances": count}))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], int(sys.argv[3]))
        return
    parser(__doc__).parse_args()
    rows = []
    for size in SIZES:
        lean = run_isolated("bench.core_postprocess", ["--worker", "promptseg", str(size)])
        full = run_isolated("bench.core_postprocess", ["--worker", "transformers", str(size)], limit_bytes=16 * 1024**3)
        lean_extra = lean["peak_rss"] - lean["base_rss"]
        if full["killed"] or full["peak_rss"] is None:
            rows.append([f"{size}x{size}", lean["instances"], f"{lean['seconds']:.2f} s", mib(lean_extra),
                         "out of memory (>16 GiB, killed)", "-", "-", "-"])
            continue
        full_extra = full["peak_rss"] - full["base_rss"]
        rows.append([f"{size}x{size}", lean["instances"], f"{lean['seconds']:.2f} s", mib(lean_extra),
                     f"{full['seconds']:.2f} s", mib(full_extra),
                     f"{full['seconds'] / lean['seconds']:.1f}x", f"{full_extra / max(lean_extra, 1):.0f}x"])
    print_table(f"Post-processing {INSTANCES} instances (peak memory above the loaded inputs)",
                ["image", "instances", "promptseg", "promptseg mem", "transformers", "transformers mem",
                 "speed-up", "memory ratio"], rows)


if __name__ == "__main__":
    main()
