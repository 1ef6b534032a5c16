"""SAM 3 through Hugging Face transformers (``Sam3Model``), the default backend.

Loads a hub id (default ``facebook/sam3``, gated) or a directory written by
``Sam3Model.save_pretrained``, with or without tokenizer and processor files. Every weight must
load: missing or unexpected keys are an error. The image encoder's FPN levels are the cached
embedding; positional encodings depend on resolution only and are recomputed, not stored.

The hub's checkpoint is a video model (``detector_model.*``, ``tracker_model.*``, ``tracker_neck.*``):
its tracker head (``Sam3TrackerModel``) answers visual prompts (points, a box, a mask). It is loaded
strictly too, and shares the detector's ViT trunk module, so the trunk's weights are held once and
the trunk runs once per image: `encode_image` runs both necks on that one trunk output and the
cached embedding holds the detector's FPN levels (``fpn_i``) and the tracker's (``tracker_i``).
A detector-only checkpoint (a ``Sam3Model`` save) answers text prompts only.
"""

from __future__ import annotations

import json
import logging
import os
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


class Sam3Backend:
    """A loaded ``Sam3Model`` with its tokenizer and image processor."""

    name = NAME

    @property
    def visual_prompts_help(self) -> str:
        return VISUAL_PROMPTS_HELP

    def __init__(self, model, tokenizer, image_processor, model_id: str, device, dtype, tracker=None) -> None:
        self.model = model
        self.tracker = tracker
        """The ``Sam3TrackerModel`` for visual prompts (its trunk is the detector's), or None."""
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
        from promptseg.placement import move_plain_tensors

        model = model.to(device).eval()
        move_plain_tensors(model, device)  # caches kept as plain attributes, which .to() skips
        tracker = _load_tracker(directory, model, dtype)
        if tracker is not None:
            tracker = tracker.to(device).eval()
            move_plain_tensors(tracker, device)
        backend = cls(model, _load_tokenizer(directory), _load_image_processor(directory, config),
                      model_id, device, dtype, tracker)
        backend.directory = directory
        return backend

    def with_dtype(self, dtype: torch.dtype) -> Sam3Backend:
        """This model in another precision, on a copy of the weights (the detector and tracker keep
        sharing one trunk): the fp16 overflow guard's twin (`promptseg.overflow`)."""
        import copy

        model, tracker = copy.deepcopy((self.model, self.tracker))  # one memo: the shared trunk stays shared
        twin = type(self)(model.to(dtype=dtype), self.tokenizer, self.image_processor, self.model_id, self.device,
                          dtype, tracker.to(dtype=dtype) if tracker is not None else None)
        twin.directory = getattr(self, "directory", None)
        return twin

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

        from promptseg.backends.sam3_hf_detect import FIRST_SELF_ATTENTION, first_self_attention

        with torch.inference_mode():
            output = self.model.get_vision_features(pixel_values=pixel_values)
            levels = output.fpn_hidden_states[:-1]  # the last level is never consumed by forward
            embedding = {f"fpn_{i}": level for i, level in enumerate(levels)}
            embedding[FIRST_SELF_ATTENTION] = first_self_attention(  # the one prompt-free part of the DETR encoder
                self.model.detr_encoder, levels[-1], self._position(levels[-1])
            )
            if self.tracker is not None:  # the tracker's neck on the same trunk output: no second trunk run
                embedding.update(self._tracker_levels(output.last_hidden_state, pixel_values.shape[-2:]))
        return embedding

    @property
    def visual_prompts(self) -> bool:
        """Whether `decode_object` can answer points, boxes and masks (the checkpoint has the tracker)."""
        return self.tracker is not None

    def _tracker_levels(self, trunk: torch.Tensor, pixel_size) -> Tensors:
        """The tracker's three feature levels, as ``Sam3TrackerModel.get_image_features`` makes them
        (its neck, then the mask decoder's projections of the two finer levels), in ``(1, C, h, w)``."""
        patch = self.model.config.vision_config.backbone_config.patch_size
        rows, cols = (side // patch for side in pixel_size)
        spatial = trunk.view(trunk.shape[0], rows, cols, -1).permute(0, 3, 1, 2)
        levels = list(self.tracker.vision_encoder.neck(spatial)[0][:3])
        levels[0] = self.tracker.mask_decoder.conv_s0(levels[0])
        levels[1] = self.tracker.mask_decoder.conv_s1(levels[1])
        return {f"tracker_{i}": level for i, level in enumerate(levels)}

    directory: Path | None = None
    """Where the checkpoint was loaded from: the video model's heads load from it when first needed."""
    _video_model = None

    @property
    def video(self) -> bool:
        """Whether `video_tracker` can follow objects through frames (the checkpoint has the tracker)."""
        return self.tracker is not None

    @property
    def video_help(self) -> str:
        """What to load when `video` is False."""
        from promptseg.backends.sam3_hf_video import VIDEO_HELP

        return VIDEO_HELP

    def video_tracker(self, phrases: list[str], frame_size: tuple[int, int], threshold: float,
                      new_threshold: float | None = None):
        """A fresh streaming tracker for one video on SAM 3's video model, built on this backend's
        modules the first time (see `promptseg.backends.sam3_hf_video`); fed cached embeddings."""
        from promptseg.backends.sam3_hf_video import VIDEO_HELP, VideoTracker, load_video_model

        if self.tracker is None or self.directory is None:
            raise ModelLoadError(VIDEO_HELP)
        if self._video_model is None:
            self._video_model = load_video_model(self, self.directory)
        return VideoTracker(self._video_model, self.tokenizer, phrases, frame_size, threshold, self.device, self.dtype,
                            new_threshold)

    def embedding_spec(self, image_size: tuple[int, int]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """What `encode_image` returns whatever the image size (every image is resized to `input_size`)."""
        from promptseg.backends.sam3_common import sam3_embedding_spec

        vision = self.model.config.vision_config
        scales = tuple(vision.scale_factors[:-1])  # the last level is not kept (see encode_image)
        spec = sam3_embedding_spec(
            self.input_size, vision.backbone_config.patch_size, vision.fpn_hidden_size, scales, self.dtype
        )
        from promptseg.backends.sam3_hf_detect import FIRST_SELF_ATTENTION

        rows, cols = (side // vision.backbone_config.patch_size for side in self.input_size)
        spec[FIRST_SELF_ATTENTION] = ((1, rows * cols, self.model.config.detr_encoder_config.hidden_size), self.dtype)
        if self.tracker is not None:
            decoder = self.tracker.mask_decoder
            channels = (decoder.conv_s0.out_channels, decoder.conv_s1.out_channels, vision.fpn_hidden_size)
            rows, cols = (side // vision.backbone_config.patch_size for side in self.input_size)
            for i, (scale, width) in enumerate(zip((4, 2, 1), channels)):
                spec[f"tracker_{i}"] = ((1, width, rows * scale, cols * scale), self.dtype)
        return spec

    def decode_object(
        self,
        image: Tensors,
        points: torch.Tensor | None,
        point_labels: torch.Tensor | None,
        box: torch.Tensor | None,
        mask: torch.Tensor | None,
        multimask: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One object from visual prompts on a cached embedding: ``(K, h, w)`` mask logits at the
        tracker's mask resolution and ``(K,)`` predicted IoUs (K = 3 with `multimask`, else 1).

        `points` ``(N, 2)`` and `box` ``(4,)`` are in pixels of the model input (`input_size`);
        `mask` is ``(H, W)`` float, resized by the model to its mask-prompt size.
        """
        import torch

        from promptseg.errors import ModelLoadError

        if self.tracker is None:
            raise ModelLoadError(VISUAL_PROMPTS_HELP)
        levels = [image[f"tracker_{i}"].to(self.device, self.dtype) for i in range(3)]
        # SAM's "no memory" embedding goes on the level the mask decoder reads, as Meta's predictor and
        # transformers' video tracker add it (``Sam3TrackerModel.forward`` adds it to the 4th, unused level)
        no_memory = self.tracker.no_memory_embedding.view(1, -1, 1, 1)
        embeddings = [levels[0], levels[1], levels[2] + no_memory]
        extra = {}
        if points is not None:
            extra["input_points"] = points.to(self.device, self.dtype)[None, None]
            extra["input_labels"] = point_labels.to(self.device, torch.int32)[None, None]
        if box is not None:
            extra["input_boxes"] = box.to(self.device, self.dtype)[None, None]
        if mask is not None:
            extra["input_masks"] = mask.to(self.device, self.dtype)[None, None]
        with torch.inference_mode():
            out = self.tracker(image_embeddings=embeddings, multimask_output=multimask, **extra)
        return out.pred_masks[0, 0].float(), out.iou_scores[0, 0].float()

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

        from promptseg.backends.sam3_common import exemplar_inputs
        from promptseg.backends.sam3_hf_detect import FIRST_SELF_ATTENTION, detect

        batch = len(texts)
        count = sum(name.startswith("fpn_") for name in image)
        levels = [image[f"fpn_{i}"].to(self.device, self.dtype) for i in range(count)]
        positions = [self._position(level).expand(batch, -1, -1, -1) for level in levels]
        levels = [level.expand(batch, -1, -1, -1) for level in levels]
        features = torch.cat([t["features"] for t in texts]).to(self.device, self.dtype)
        mask = torch.cat([t["mask"] for t in texts]).to(self.device)
        exemplars = {}
        if boxes is not None and len(boxes):
            cxcywh, labels = exemplar_inputs(boxes, box_labels, self.device, self.dtype)
            exemplars = {"boxes": cxcywh[None].expand(batch, -1, -1), "box_labels": labels[None].expand(batch, -1)}
        with torch.inference_mode():
            first = image.get(FIRST_SELF_ATTENTION)  # absent from an embedding made elsewhere: computed then
            first = first.to(self.device, self.dtype) if first is not None else None
            return detect(self.model, levels, positions, features, mask, threshold, first=first, **exemplars)

    def position_encoding(self, level: torch.Tensor) -> torch.Tensor:
        """The detector's positional encoding of one FPN level (it depends on the level's size only)."""
        return self._position(level)

    def _position(self, level: torch.Tensor) -> torch.Tensor:
        key = (tuple(level.shape[1:]), level.device, level.dtype)
        if key not in self._positions:
            encode = self.model.vision_encoder.neck.position_encoding
            self._positions[key] = encode((1, *level.shape[1:]), level.device, level.dtype)
        return self._positions[key]


VISUAL_PROMPTS_HELP = (
    "Visual prompts (points, boxes, masks) need SAM 3's tracker head, which this checkpoint does not "
    "have (it holds the text detector only, as Sam3Model.save_pretrained writes it). Load the full "
    "facebook/sam3 checkpoint (or a directory saved from Sam3VideoModel) to use segment_object."
)


def _load_tracker(directory: Path, detector, dtype):
    """The tracker head of a hub-layout checkpoint, every weight loaded, sharing `detector`'s ViT trunk;
    None for a detector-only checkpoint."""
    config = json.loads((directory / "config.json").read_text())
    if not config.get("tracker_config"):
        return None
    from transformers import Sam3TrackerModel
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its "sam3_video config for sam3_tracker" notice is expected here
    try:
        tracker, info = Sam3TrackerModel.from_pretrained(directory, dtype=dtype, output_loading_info=True)
    except Exception as exc:
        raise ModelLoadError(
            f"Cannot load SAM 3's tracker weights from {directory}: {exc}. The checkpoint may be truncated; "
            "download it again."
        ) from exc
    finally:
        hf_logging.set_verbosity(verbosity)
    from promptseg.backends.sam3_common import refuse_partial_load

    refuse_partial_load(info, directory, "tracker")
    tracker.vision_encoder.backbone = detector.vision_encoder.backbone  # one trunk in memory, not two
    return tracker


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
