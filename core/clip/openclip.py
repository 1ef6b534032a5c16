"""OpenCLIP (``open_clip_torch``) as promptseg's image-text scorer.

Accepts every way open_clip names weights: ``NAME/TAG`` (a pretrained tag, fetched once from the
hub), ``NAME/PATH`` (a local weights file for a named architecture), ``hf-hub:ORG/REPO``, and
``local-dir:DIR`` or a bare directory holding ``open_clip_config.json`` plus a checkpoint. A model
without weights is refused: random CLIP scores would silently drop good masks.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from promptseg.backends.protocol import BackendSpec
from promptseg.errors import ModelLoadError
from promptseg.hookspecs import hookimpl
from promptseg.hub import hub_offline, weights_fingerprint

logger = logging.getLogger(__name__)

if TYPE_CHECKING:  # registering this backend must stay cheap: torch loads when a model does
    import numpy as np
    import torch

NAME = "openclip"
DEFAULT_CLIP = "ViT-B-32/laion2b_s34b_b79k"
MULTILINGUAL_CLIP = "xlm-roberta-base-ViT-B-32/laion5b_s13b_b90k"
# Hugging Face text towers trained on many languages (xlm-roberta, NLLB = m2m_100, mT5)
MULTILINGUAL_TYPES = ("xlm-roberta", "m2m_100", "mt5", "nllb")
CHECKPOINT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")
HELP = (
    "Name a CLIP as NAME/TAG (e.g. {default}, fetched once from the hub), NAME/PATH to a weights "
    "file, hf-hub:ORG/REPO, or local-dir:DIR (open_clip_config.json + weights)."
)


@hookimpl
def promptseg_register_backends(registry) -> None:
    registry.add_scorer(
        BackendSpec(
            name=NAME,
            load=load,
            accepts=lambda model: True,
            priority=0,
            description="OpenCLIP image-text scorer (name/tag, hf-hub:, local-dir:, weights file)",
            requires=("open_clip_torch", "torch"),
        )
    )


def parse_model(model: str, pretrained: str | None = None) -> tuple[str, str | None, str]:
    """Split a CLIP spec into open_clip's ``(model_name, pretrained)`` and an identity for cache keys."""
    import open_clip

    spec = str(model).strip()
    if spec.startswith("hf-hub:"):
        return spec, None, spec
    if spec.startswith("local-dir:") or Path(spec).expanduser().is_dir():
        directory = Path(spec.removeprefix("local-dir:")).expanduser()
        _check_local_dir(directory)
        return f"local-dir:{directory.resolve()}", None, f"local-dir:{_digest(directory)}"
    name, _, rest = spec.partition("/")
    if pretrained is None and rest:
        pretrained = rest
    if name not in open_clip.list_models():
        if Path(spec).expanduser().is_file():
            raise ModelLoadError(
                f"{spec} is a weights file, but open_clip needs its architecture too: pass "
                f"NAME/{spec} (NAME from open_clip.list_models(), e.g. ViT-B-32)."
            )
        raise ModelLoadError(
            f"Unknown CLIP {spec!r}: {name!r} is not an open_clip architecture and not a directory. "
            + HELP.format(default=DEFAULT_CLIP)
        )
    if not pretrained:
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(name)[:4]) or "none published"
        raise ModelLoadError(
            f"CLIP {name!r} has no weights named. Give a pretrained tag ({name}/TAG; tags: {tags}) "
            f"or a weights file ({name}/PATH): random weights would make every CLIP decision noise."
        )
    path = Path(pretrained).expanduser()
    if path.is_file():
        return name, str(path), f"{name}/file:{weights_fingerprint(path)}"
    if pretrained.startswith(("/", ".", "~")) or pretrained.endswith(CHECKPOINT_SUFFIXES):
        raise ModelLoadError(f"No CLIP weights file at {pretrained}. Check the path.")
    if pretrained not in open_clip.list_pretrained_tags_by_model(name):
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(name)) or "none"
        raise ModelLoadError(f"open_clip has no pretrained tag {pretrained!r} for {name}; known tags: {tags}.")
    return name, pretrained, f"{name}/{pretrained}"


def load(
    model: str = DEFAULT_CLIP,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    pretrained: str | None = None,
    cache_dir: str | None = None,
) -> "OpenClipBackend":
    """Build the model, its image transform and tokenizer; see the module docstring."""
    import open_clip
    import torch

    dtype = dtype or torch.float32
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ModelLoadError(f"Unsupported CLIP dtype {dtype}: use fp32, fp16 or bf16.")
    device = torch.device(device)
    name, weights, model_id = parse_model(model, pretrained)
    try:
        clip, _, preprocess = open_clip.create_model_and_transforms(
            name, pretrained=weights, precision="fp32", device=device, cache_dir=cache_dir,
            pretrained_text=False, pretrained_image=False, require_pretrained=True,
        )
        tokenizer = open_clip.get_tokenizer(name, cache_dir=cache_dir)
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(_explain(model, exc)) from exc
    logit_scale = float(clip.logit_scale.exp().clamp(max=100).item())  # read before a cast rounds it
    place_model(clip, device, dtype)
    return OpenClipBackend(clip.eval(), preprocess, tokenizer, model_id, device, dtype, logit_scale)


def place_model(model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Put every floating parameter and buffer of `model` on `device` in `dtype`, and the tensors
    held as plain attributes on `device` too.

    The whole model is cast, not only some layer types: open_clip's own low-precision mode casts
    Linear, Conv and attention weights and leaves the rest in fp32, which its own towers handle
    but a Hugging Face text tower (xlm-roberta, mT5) or a timm one does not: their fp32
    embeddings and LayerNorms meet fp16 weights and `encode_text` fails ("mat1 and mat2 must have
    the same dtype"). One cast works for every tower and halves the memory; LayerNorm and softmax
    kernels accumulate in fp32 internally on CUDA and the CPU, so embeddings stay within the
    tolerances `tests/test_clip_precision.py` states.
    """
    from promptseg.placement import move_plain_tensors

    model.to(device=device, dtype=dtype)
    move_plain_tensors(model, device)


def _explain(model: str, exc: Exception) -> str:
    text = f"{exc.__class__.__name__}: {exc}"
    offline = hub_offline()
    if any(word in text.lower() for word in ("connect", "offline", "resolve", "download", "hub", "http")):
        return (
            f"Cannot fetch CLIP weights for {model!r} ({'HF_HUB_OFFLINE is set' if offline else 'hub unreachable'}; "
            f"{text}). Download them once where the hub is reachable, or pass a local copy: "
            + HELP.format(default=DEFAULT_CLIP)
        )
    return f"Cannot load CLIP {model!r} ({text}). The weights may not match the architecture. " + HELP.format(
        default=DEFAULT_CLIP
    )


def _check_local_dir(directory: Path) -> None:
    if not directory.is_dir():
        raise ModelLoadError(f"No CLIP directory at {directory}. " + HELP.format(default=DEFAULT_CLIP))
    if not (directory / "open_clip_config.json").is_file():
        raise ModelLoadError(
            f"{directory} has no open_clip_config.json: it is not an OpenCLIP model directory "
            "(write one with open_clip's push_to_hf_hub/save helpers, or name NAME/PATH to a weights file)."
        )
    if not _checkpoints(directory):
        raise ModelLoadError(
            f"{directory} has open_clip_config.json but no weights (open_clip_model.safetensors or "
            "open_clip_pytorch_model.bin). Copy the checkpoint there."
        )


def _checkpoints(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.suffix in CHECKPOINT_SUFFIXES and p.is_file())


def _digest(directory: Path) -> str:
    """The fingerprint of a model directory: its config, then each checkpoint."""
    return weights_fingerprint((directory / "open_clip_config.json").read_bytes(), *_checkpoints(directory))


class OpenClipBackend:
    """A loaded OpenCLIP model: unit-length image and text embeddings in one shared space."""

    name = NAME

    def __init__(
        self, model, preprocess, tokenizer, model_id: str, device: torch.device, dtype: torch.dtype,
        logit_scale: float | None = None,
    ):
        self.model = model
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.device = device
        self.dtype = dtype
        cfg = getattr(model.visual, "preprocess_cfg", {}) or {}
        size = cfg.get("size") or getattr(model.visual, "image_size", 224)
        self.input_size = tuple(size) if isinstance(size, (tuple, list)) else (int(size), int(size))
        self.fill = tuple(int(round(255 * m)) for m in cfg.get("mean", (0.48145466, 0.4578275, 0.40821073)))
        if logit_scale is None:
            logit_scale = float(model.logit_scale.float().exp().clamp(max=100).item())
        self.logit_scale = logit_scale
        self.multilingual = _is_multilingual(model)

    def with_dtype(self, dtype: torch.dtype) -> "OpenClipBackend":
        """This CLIP in another precision, on a copy of the weights: where the scorer moves when
        fp16 overflows (`promptseg.clip.scorer`)."""
        import copy

        model = copy.deepcopy(self.model)
        place_model(model, self.device, dtype)
        return type(self)(model, self.preprocess, self.tokenizer, self.model_id, self.device, dtype, self.logit_scale)

    def encode_images(self, images: list[np.ndarray]) -> torch.Tensor:
        """``(N, D)`` unit-length embeddings of RGB uint8 pictures (already square-padded)."""
        import torch
        from PIL import Image

        batch = torch.stack([self.preprocess(Image.fromarray(rgb)) for rgb in images])
        with torch.inference_mode():
            features = self.model.encode_image(batch.to(self.device, self.dtype))
        return torch.nn.functional.normalize(features.float(), dim=-1).cpu()

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """``(N, D)`` unit-length embeddings of texts."""
        import torch

        tokens = self.tokenizer(texts).to(self.device)
        with torch.inference_mode():
            features = self.model.encode_text(tokens)
        return torch.nn.functional.normalize(features.float(), dim=-1).cpu()


def _is_multilingual(model) -> bool:
    config = getattr(getattr(model, "text", None), "config", None)
    names = [getattr(config, "model_type", ""), getattr(config, "_name_or_path", "")]
    return any(kind in str(name).lower() for name in names for kind in MULTILINGUAL_TYPES)


def save_local_dir(model, model_cfg: dict, directory: str | Path, preprocess_cfg: dict | None = None) -> Path:
    """Write `model` as an open_clip ``local-dir:`` (config JSON + safetensors): for tests and offline copies."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, directory / "open_clip_model.safetensors")
    config = {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg or {}}
    (directory / "open_clip_config.json").write_text(json.dumps(config, indent=1))
    return directory
