"""Draw docs/images/overview.png: how an image and a prompt flow through promptseg.

    python docs/make_overview.py
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

BOXES = [
    # (x, y, w, h, title, detail, colour)
    (0.2, 3.2, 2.2, 1.2, "image", "path, PIL or array\nuint8/uint16/float, RGB(A), gray,\nEXIF, z-stacks, tiles", "#dbe9f6"),
    (3.0, 3.2, 2.4, 1.2, "image embedding", "memory LRU (bytes) → disk\n(safetensors) → SAM 3 encoder\nonly on a miss", "#fde2c8"),
    (6.0, 3.2, 2.4, 1.2, "prompt decoding", "all prompts in one batched\nforward; text embeddings\ncached per phrase", "#fde2c8"),
    (9.0, 3.2, 2.4, 1.2, "post-processing", "threshold at mask resolution,\nupsample inside each box,\nsmooth, min area, NMS", "#e3f1dc"),
    (0.2, 1.0, 2.2, 1.2, "prompts", "\"red car\", \"nucleus\"\n(+ CLIP: verify, negatives,\nlabel sets, any language)", "#dbe9f6"),
    (6.0, 0.6, 5.4, 1.5, "result → host type", "FiftyOne Detections with masks · napari Labels layer\nLabel Studio brush / polygon / box regions\nCOCO RLE · label PNG · overlay PNG", "#ece3f5"),
]


def main(path: Path = Path(__file__).parent / "images" / "overview.png") -> Path:
    fig, ax = plt.subplots(figsize=(11.8, 4.9), dpi=110)
    ax.set_xlim(0, 11.6)
    ax.set_ylim(0.3, 4.9)
    ax.axis("off")
    for x, y, w, h, title, detail, colour in BOXES:
        ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.04,rounding_size=0.12",
                                    facecolor=colour, edgecolor="#555555", linewidth=1.2))
        ax.text(x + w / 2, y + h - 0.22, title, ha="center", va="center", fontsize=11.5, weight="bold")
        ax.text(x + w / 2, y + h / 2 - 0.16, detail, ha="center", va="center", fontsize=8.6, linespacing=1.35)
    arrows = [((2.4, 3.8), (3.0, 3.8)), ((5.4, 3.8), (6.0, 3.8)), ((8.4, 3.8), (9.0, 3.8)),
              ((10.2, 3.2), (9.6, 2.1)), ((2.4, 1.6), (6.6, 3.2))]
    for start, end in arrows:
        ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=16, color="#333333", linewidth=1.4))
    ax.text(5.8, 4.65, "the second prompt on an image starts here: no image encoder", ha="center",
            fontsize=9.5, style="italic", color="#a0522d")
    ax.add_patch(FancyArrowPatch((7.2, 4.55), (7.2, 4.42), arrowstyle="-|>", mutation_scale=12, color="#a0522d"))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


if __name__ == "__main__":
    print(main())
