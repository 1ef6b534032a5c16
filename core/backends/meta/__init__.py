"""SAM 3 through Meta's official ``sam3`` package (backend ``sam3-meta``, extra ``meta``).

Loads the official ``sam3.pt``: a local file, a directory holding one, or the hub file
(``facebook/sam3``, gated). Keys are checked strictly (see `promptseg.backends.meta.model`),
the text tokenizer gets open_clip's CLIP vocabulary (the package ships none), and every call
into the package runs under a `DeviceRedirect`, so CUDA, Apple MPS and the CPU all work without
editing the installed package. The cached embedding is the image encoder's FPN levels
(``backbone_out["backbone_fpn"]``); position encodings depend on resolution only and are
recomputed. When the checkpoint holds the tracker (the official one does), its SAM prompt
encoder and mask decoder answer visual prompts (`Sam3MetaBackend.decode_object`) on the same
trunk run: the cached embedding then also holds the SAM 2 neck's levels (``tracker_i``).

This module registers the backend and loads it (torch and the package are imported by `load`
only); `model` builds the network and checks the checkpoint's keys, `backend` runs the loaded
model, `device` holds the `DeviceRedirect`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from promptseg.backends.protocol import BackendSpec
from promptseg.errors import ModelLoadError
from promptseg.hookspecs import hookimpl

if TYPE_CHECKING:  # torch loads with the model, not with `promptseg --help`
    import torch

    from promptseg.backends.meta.backend import Sam3MetaBackend

logger = logging.getLogger(__name__)

NAME = "sam3-meta"
DEFAULT_REPO = "facebook/sam3"
CHECKPOINT = "sam3.pt"
GATED_HELP = (
    "SAM 3 weights are gated on the Hugging Face hub: accept the licence at https://huggingface.co/{repo}, "
    "then run `hf auth login` (or set HF_TOKEN), or pass a local sam3.pt with --model PATH "
    "(or PROMPTSEG_MODEL=PATH)."
)


@hookimpl
def promptseg_register_backends(registry) -> None:
    registry.add_segmenter(
        BackendSpec(
            name=NAME,
            load=load,
            accepts=_accepts,
            priority=10,
            description="SAM 3 through Meta's sam3 package (sam3.pt: local file or hub)",
            requires=("sam3", "torch"),
        )
    )


def _accepts(model: str) -> bool:
    path = Path(model).expanduser()
    if path.is_dir():
        return (path / CHECKPOINT).exists() and not (path / "config.json").exists()
    return model.endswith((".pt", ".pth"))


def load(
    model: str = DEFAULT_REPO,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    revision: str | None = None,
    token: str | None = None,
) -> Sam3MetaBackend:
    """Load ``sam3.pt`` from a file, a directory holding it, a hub repo or ``repo/file.pt``."""
    try:
        import sam3  # noqa: F401
    except ImportError as exc:
        raise ModelLoadError(
            f"The {NAME} backend needs Meta's sam3 package: pip install 'promptseg[meta]' ({exc})."
        ) from exc
    import torch

    from promptseg.backends.meta.backend import Sam3MetaBackend
    from promptseg.backends.meta.model import load_image_model
    from promptseg.tokenizer import open_clip_vocab_path

    path, model_id = resolve_checkpoint(model, revision=revision, token=token)
    network, tracker, arch = load_image_model(path, open_clip_vocab_path())
    return Sam3MetaBackend(
        network, arch.image_size, model_id, torch.device(device), dtype or torch.float32,
        patch_size=arch.patch_size, d_model=arch.d_model, tracker=tracker,
    )


def resolve_checkpoint(model: str, revision: str | None = None, token: str | None = None) -> tuple[Path, str]:
    """A local ``sam3.pt`` and the weights' identity for cache keys."""
    path = Path(model).expanduser()
    if path.is_dir():
        path = path / CHECKPOINT
        if not path.exists():
            raise ModelLoadError(f"{path.parent} holds no {CHECKPOINT}: pass the checkpoint file itself.")
    if path.is_file():
        return path.resolve(), f"local:{_file_digest(path)}"
    if model.startswith((".", "/", "~")) or model.count("/") not in (1, 2):
        raise ModelLoadError(
            f"No checkpoint at {model}. Pass an existing sam3.pt, or a hub repo such as {DEFAULT_REPO}."
        )
    parts = model.split("/")  # "owner/repo" or "owner/repo/file.pt"
    filename = parts[2] if len(parts) == 3 else CHECKPOINT
    return _download("/".join(parts[:2]), filename, revision, token)


def _download(repo: str, filename: str, revision: str | None, token: str | None) -> tuple[Path, str]:
    from huggingface_hub import hf_hub_download

    from promptseg.hub import fetch

    local = fetch(
        lambda offline: hf_hub_download(repo, filename, revision=revision, token=token, local_files_only=offline),
        repo, f"{repo}/{filename}", GATED_HELP.format(repo=repo), revision,
        missing_file=f"{repo} has no file {filename!r}; Meta's checkpoint is {CHECKPOINT}.",
    )
    return local, f"hub:{repo}/{filename}@{local.parent.name}"


def _file_digest(path: Path) -> str:
    """The fingerprint of the checkpoint, then of its architecture file, if any."""
    from promptseg.backends.meta.model import arch_path
    from promptseg.hub import weights_fingerprint

    arch = arch_path(path)
    return weights_fingerprint(path, *([arch.read_bytes()] if arch.exists() else []))
