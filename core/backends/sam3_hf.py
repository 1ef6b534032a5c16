"""SAM 3 through Hugging Face transformers (``Sam3Model``), the default backend.

Loads a hub id (default ``facebook/sam3``, gated) or a directory written by
``Sam3Model.save_pretrained``, with or without tokenizer and processor files. Every weight must
load: missing or unexpected keys are an error. The image encoder's FPN levels are the cached
embedding; positional encodings depend on resolution only and are recomputed, not stored.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from promptseg.backends.protocol import BackendSpec
from promptseg.errors import ModelLoadError
from promptseg.hookspecs import hookimpl

if TYPE_CHECKING:  # registering this backend must stay cheap: torch loads when a model does
    import numpy as np
    import torch

    from promptseg.backends.protocol import Detections, Tensors

logger = logging.getLogger(__name__)

NAME = "sam3"
DEFAULT_HUB_ID = "facebook/sam3"
TEXT_LENGTH = 32  # SAM 3's processor pads every phrase to 32 tokens
WEIGHT_PATTERNS = ("*.safetensors", "*.safetensors.index.json")
HUB_PATTERNS = [
    "config.json",
    *WEIGHT_PATTERNS,
    "tokenizer*",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "preprocessor_config.json",
    "processor_config.json",
]
GATED_HELP = (
    "SAM 3 weights are gated on the Hugging Face hub: accept the licence at "
    "https://huggingface.co/{repo}, then run `hf auth login` (or set HF_TOKEN), "
    "or pass a local directory written by Sam3Model.save_pretrained with --model DIR "
    "(or PROMPTSEG_MODEL=DIR)."
)


@hookimpl
def promptseg_register_backends(registry) -> None:
    registry.add_segmenter(
        BackendSpec(
            name=NAME,
            load=load,
            accepts=_accepts,
            priority=0,
            description="SAM 3 through Hugging Face transformers (hub id or save_pretrained directory)",
            requires=("transformers", "torch"),
        )
    )


def _accepts(model: str) -> bool:
    path = Path(model).expanduser()
    if path.is_dir():
        return (path / "config.json").exists()
    return "/" in model and not model.endswith((".pt", ".pth"))


def load(
    model: str = DEFAULT_HUB_ID,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    revision: str | None = None,
    token: str | None = None,
) -> Sam3Backend:
    """Load SAM 3 from a hub id or a local directory; see the module docstring."""
    import torch

    dtype = dtype or torch.float32
    directory, model_id = resolve_model_dir(model, revision=revision, token=token)
    return Sam3Backend.from_directory(directory, model_id, torch.device(device), dtype)


def resolve_model_dir(model: str, revision: str | None = None, token: str | None = None) -> tuple[Path, str]:
    """A local directory holding the model files, and the model's identity for cache keys."""
    path = Path(model).expanduser()
    if path.is_dir():
        _check_local_dir(path)
        return path.resolve(), f"local:{_weights_digest(path)}"
    if path.exists():
        raise ModelLoadError(
            f"{model} is a file; the transformers SAM 3 backend needs a directory written by "
            "Sam3Model.save_pretrained (config.json + model.safetensors), or a hub id."
        )
    if model.startswith((".", "/", "~")) or os.sep in model and model.count("/") != 1:
        raise ModelLoadError(
            f"No model directory at {model}. Pass an existing directory written by "
            f"Sam3Model.save_pretrained, or a hub id such as {DEFAULT_HUB_ID}."
        )
    return _download(model, revision, token)


def _check_local_dir(path: Path) -> None:
    if not (path / "config.json").exists():
        raise ModelLoadError(
            f"{path} has no config.json: it is not a directory written by Sam3Model.save_pretrained."
        )
    if not any(any(path.glob(pattern)) for pattern in WEIGHT_PATTERNS):
        raise ModelLoadError(
            f"{path} has a config.json but no model.safetensors: the checkpoint is missing. "
            "Copy the weights there, or save the model again with Sam3Model.save_pretrained."
        )


def _download(repo: str, revision: str | None, token: str | None) -> tuple[Path, str]:
    from huggingface_hub import snapshot_download

    from promptseg.hub import fetch

    directory = fetch(
        lambda offline: snapshot_download(
            repo, revision=revision, token=token, allow_patterns=HUB_PATTERNS, local_files_only=offline
        ),
        repo, repo, GATED_HELP.format(repo=repo), revision,
    )
    try:
        _check_local_dir(directory)
    except ModelLoadError as exc:
        raise ModelLoadError(f"The hub snapshot of {repo} is incomplete: {exc}") from exc
    return directory, f"hub:{repo}@{directory.name}"


def _weights_digest(path: Path) -> str:
    """The fingerprint of a model directory: its config, then each weight file."""
    from promptseg.hub import weights_fingerprint

    weights = sorted(p for pattern in WEIGHT_PATTERNS for p in path.glob(pattern))
    return weights_fingerprint((path / "config.json").read_bytes(), *weights)


@lru_cache(maxsize=1)
def _text_embeds_takes_output() -> bool:
    """transformers changed `text_embeds` during 5.x from a tensor to the text-encoder output."""
    from transformers import Sam3Model

    return "text_embeds.pooler_output" in inspect.getsource(Sam3Model.forward)


class Sam3Backend:
    """A loaded ``Sam3Model`` with its tokenizer and image processor."""

    name = NAME

    def __init__(self, model, tokenizer, image_processor, model_id: str, device, dtype) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.model_id = model_id
        self.device = device
        self.dtype = dtype
        size = model.config.vision_config.backbone_config.image_size
        size = size if isinstance(size, (list, tuple)) else (size, size)
        self.input_size = (int(size[0]), int(size[1]))
        self._positions: dict[tuple, torch.Tensor] = {}

    @classmethod
    def from_directory(cls, directory: Path, model_id: str, device: torch.device, dtype: torch.dtype):
        from transformers import Sam3Config, Sam3Model

        try:
            config = Sam3Config.from_pretrained(directory)
        except Exception as exc:
            raise ModelLoadError(f"{directory}/config.json is not a SAM 3 config: {exc}") from exc
        try:
            model, info = Sam3Model.from_pretrained(
                directory, config=config, dtype=dtype, output_loading_info=True
            )
        except Exception as exc:
            raise ModelLoadError(
                f"Cannot load SAM 3 weights from {directory}: {exc}. The checkpoint may be "
                "truncated or from another model; download it again."
            ) from exc
        problems = {
            kind: sorted(info.get(kind) or [])
            for kind in ("missing_keys", "unexpected_keys", "mismatched_keys")
            if info.get(kind)
        }
        if problems:
            detail = "; ".join(f"{k.replace('_', ' ')}: {', '.join(map(str, v[:5]))}"
                               + (f" (+{len(v) - 5} more)" if len(v) > 5 else "")
                               for k, v in problems.items())
            raise ModelLoadError(
                f"The checkpoint in {directory} does not match the SAM 3 architecture in its "
                f"config ({detail}). Refusing a partial load: use the checkpoint that belongs "
                "to this config."
            )
        model = model.to(device).eval()
        return cls(model, _load_tokenizer(directory), _load_image_processor(directory, config),
                   model_id, device, dtype)

    def preprocess(self, rgb: np.ndarray) -> torch.Tensor:
        if not rgb.flags.writeable:  # Pillow's arrays are read-only; torch warns on those
            rgb = rgb.copy()
        # stated, not guessed: the processor reads a 1- or 3-pixel-high image as channel-first
        pixels = self.image_processor(
            images=rgb, return_tensors="pt", input_data_format="channels_last"
        )["pixel_values"]
        return pixels.to(self.device, self.dtype)

    def encode_image(self, pixel_values: torch.Tensor) -> Tensors:
        import torch

        with torch.inference_mode():
            output = self.model.get_vision_features(pixel_values=pixel_values)
        levels = output.fpn_hidden_states[:-1]  # the last level is never consumed by forward
        return {f"fpn_{i}": level for i, level in enumerate(levels)}

    def embedding_spec(self, image_size: tuple[int, int]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """What `encode_image` returns whatever the image size (every image is resized to `input_size`)."""
        from promptseg.backends.sam3_common import sam3_embedding_spec

        vision = self.model.config.vision_config
        scales = tuple(vision.scale_factors[:-1])  # the last level is not kept (see encode_image)
        return sam3_embedding_spec(
            self.input_size, vision.backbone_config.patch_size, vision.fpn_hidden_size, scales, self.dtype
        )

    def encode_text(self, phrases: list[str]) -> list[Tensors]:
        import torch

        tokens = self.tokenizer(
            phrases, padding="max_length", max_length=TEXT_LENGTH, truncation=True, return_tensors="pt"
        ).to(self.device)
        with torch.inference_mode():
            features = self.model.get_text_features(
                input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]
            ).pooler_output
        return [
            {"features": features[i : i + 1], "mask": tokens["attention_mask"][i : i + 1]}
            for i in range(len(phrases))
        ]

    def decode(
        self,
        image: Tensors,
        texts: list[Tensors],
        threshold: float,
        boxes: torch.Tensor | None = None,
        box_labels: torch.Tensor | None = None,
    ) -> list[Detections]:
        import torch
        from transformers.modeling_outputs import BaseModelOutputWithPooling
        from transformers.models.sam3.modeling_sam3 import Sam3VisionEncoderOutput

        from promptseg.backends.sam3_common import exemplar_inputs, split_detections

        batch = len(texts)
        levels = [image[f"fpn_{i}"].to(self.device, self.dtype) for i in range(len(image))]
        vision = Sam3VisionEncoderOutput(
            fpn_hidden_states=tuple(level.expand(batch, -1, -1, -1) for level in levels) + (None,),
            fpn_position_encoding=tuple(self._position(level).expand(batch, -1, -1, -1) for level in levels)
            + (None,),
        )
        features = torch.cat([t["features"] for t in texts]).to(self.device, self.dtype)
        mask = torch.cat([t["mask"] for t in texts]).to(self.device)
        text_embeds = (
            BaseModelOutputWithPooling(pooler_output=features) if _text_embeds_takes_output() else features
        )
        extra = {}
        if boxes is not None and len(boxes):
            cxcywh, labels = exemplar_inputs(boxes, box_labels, self.device, self.dtype)
            extra = {
                "input_boxes": cxcywh[None].expand(batch, -1, -1),
                "input_boxes_labels": labels[None].expand(batch, -1),
            }
        with torch.inference_mode():
            out = self.model(vision_embeds=vision, text_embeds=text_embeds, attention_mask=mask, **extra)
        return split_detections(out.pred_logits, out.presence_logits, out.pred_masks, out.pred_boxes, threshold)

    def _position(self, level: torch.Tensor) -> torch.Tensor:
        key = (tuple(level.shape[1:]), level.device, level.dtype)
        if key not in self._positions:
            encode = self.model.vision_encoder.neck.position_encoding
            self._positions[key] = encode((1, *level.shape[1:]), level.device, level.dtype)
        return self._positions[key]


def _load_tokenizer(directory: Path):
    has_files = any((directory / name).exists() for name in ("tokenizer.json", "vocab.json", "tokenizer_config.json"))
    if has_files:
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(directory)
        except Exception as exc:
            logger.warning("Tokenizer files in %s do not load (%s); using open_clip's CLIP BPE.", directory, exc)
    from promptseg.tokenizer import clip_tokenizer

    return clip_tokenizer()


def _load_image_processor(directory: Path, config):
    from transformers import Sam3ImageProcessor

    size = config.vision_config.backbone_config.image_size
    height, width = (size, size) if isinstance(size, int) else size
    if (directory / "preprocessor_config.json").exists():
        processor = Sam3ImageProcessor.from_pretrained(directory)
        processor_size = json.loads((directory / "preprocessor_config.json").read_text()).get("size") or {}
        if processor_size and (processor_size.get("height"), processor_size.get("width")) != (height, width):
            raise ModelLoadError(
                f"{directory}: preprocessor_config.json resizes to {processor_size} but the model "
                f"expects {height}x{width}. Fix or delete preprocessor_config.json."
            )
        return processor
    return Sam3ImageProcessor(size={"height": height, "width": width})
