"""Test support that ships with promptseg: small models with random weights, built offline.

For tests, benchmarks and `promptseg doctor` (which proves an install end to end on one):

* `make_random_sam3`, `sam3_config` (`promptseg.testing.sam3`): SAM 3 in transformers' format;
  `make_random_sam3_video`, `sam3_video_config`: the hub's layout (detector, tracker, one trunk);
* `make_random_meta_sam3` (`promptseg.testing.meta`): SAM 3 as Meta's ``sam3.pt``;
* `make_random_clip` (`promptseg.testing.clip`): a tiny OpenCLIP, monolingual or multilingual;
* `write_slide` (`promptseg.testing.slides`): a synthetic uint16 whole-slide zarr pyramid, written chunk by chunk.

The weights are random, so the outputs are noise: these models prove code paths, not accuracy.
Importing this package is light: torch loads with the first model built.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from promptseg._lazy import load_attribute
from promptseg.testing.clip import make_random_clip
from promptseg.testing.sam3 import make_random_sam3, make_random_sam3_video, sam3_config, sam3_video_config

if TYPE_CHECKING:
    from promptseg.testing.meta import make_random_meta_sam3

_LAZY = {"make_random_meta_sam3": "promptseg.testing.meta"}  # its module imports torch


def __getattr__(name: str):
    return load_attribute(__name__, _LAZY, name)


__all__ = [
    "make_random_clip", "make_random_meta_sam3", "make_random_sam3", "make_random_sam3_video", "sam3_config",
    "sam3_video_config",
]
