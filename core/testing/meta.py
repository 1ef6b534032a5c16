"""Small SAM 3 models built from Meta's ``sam3`` components, saved as an official ``sam3.pt``.

For tests and benchmarks of the ``sam3-meta`` backend: random weights, the package's own
layers, and the checkpoint layout Meta publishes (``detector.*`` tensors for the image model,
``tracker.*`` for the tracker whose SAM heads answer visual prompts), with a
``sam3.pt.arch.json`` beside it when the size is not the released one.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from promptseg.backends.meta.model import UNINITIALISED, Architecture, arch_path, build_image_model, build_tracker

TINY = Architecture(
    image_size=112, patch_size=14, pretrain_image_size=56, vit_dim=32, vit_depth=2, vit_heads=2,
    vit_mlp_ratio=2.0, vit_window=4, vit_global_blocks=(1,), d_model=32, heads=2, ffn_dim=64,
    encoder_layers=1, decoder_layers=1, num_queries=20, geometry_layers=1, text_width=32, text_heads=2,
    text_layers=1, tracker_mem_dim=16, tracker_memory_layers=1, tracker_ffn_dim=64,
)
SIZES = {"tiny": TINY, "full": Architecture()}


def random_image_model(size: str = "tiny", seed: int = 0):
    """A randomly initialised image model; the two parameters the package leaves empty get
    small normal values (without this a random model outputs NaN)."""
    from promptseg.tokenizer import open_clip_vocab_path

    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}, got {size!r}")
    torch.manual_seed(seed)
    model = build_image_model(SIZES[size], open_clip_vocab_path())
    params = dict(model.named_parameters())
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in UNINITIALISED:
            param = params[name]
            param.copy_(torch.randn(param.shape, generator=generator) * param.shape[-1] ** -0.5)
    return model


def random_tracker(size: str = "tiny", seed: int = 0):
    """A randomly initialised tracker (``Sam3TrackerBase``) of the given size."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}, got {size!r}")
    torch.manual_seed(seed + 1)
    return build_tracker(SIZES[size])


def make_random_meta_sam3(directory: str | Path, size: str = "tiny", seed: int = 0, tracker: bool = True) -> Path:
    """Write ``directory/sam3.pt`` (and its architecture file unless full size); returns its path.

    With `tracker` the file holds the tracker too, as the official one does (visual prompts);
    without, the image detector only (text prompts only).
    """
    directory = Path(directory)
    path = directory / "sam3.pt"
    if path.exists():
        return path
    model = random_image_model(size, seed)
    directory.mkdir(parents=True, exist_ok=True)
    save_checkpoint(model.state_dict(), path, random_tracker(size, seed).state_dict() if tracker else None)
    if SIZES[size] != Architecture():
        arch_path(path).write_text(json.dumps(SIZES[size].to_dict(), indent=1))
    return path


def save_checkpoint(detector_state: dict[str, torch.Tensor], path: Path,
                    tracker_state: dict[str, torch.Tensor] | None = None) -> None:
    """Save tensors with the official key layout (``detector.<name>``, ``tracker.<name>``)."""
    state = {"detector." + k: v.contiguous() for k, v in detector_state.items()}
    state.update({"tracker." + k: v.contiguous() for k, v in (tracker_state or {}).items()})
    torch.save(state, path)
