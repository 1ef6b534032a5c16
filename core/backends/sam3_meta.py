"""SAM 3 through Meta's official ``sam3`` package (backend ``sam3-meta``, extra ``meta``).

Loads the official ``sam3.pt``: a local file, a directory holding one, or the hub file
(``facebook/sam3``, gated). Keys are checked strictly (see `promptseg.backends.meta_model`),
the text tokenizer gets open_clip's CLIP vocabulary (the package ships none), and every call
into the package runs under a `DeviceRedirect`, so CUDA, Apple MPS and the CPU all work without
editing the installed package. The cached embedding is the image encoder's FPN levels
(``backbone_out["backbone_fpn"]``); position encodings depend on resolution only and are
recomputed.
"""

from __future__ import annotations

import hashlib
import logging
import os
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from promptseg.backends.base import Detections, Tensors
from promptseg.backends.meta_device import DeviceRedirect
from promptseg.errors import ModelLoadError
from promptseg.hookspecs import hookimpl
from promptseg.plugins import BackendSpec

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
    dtype: torch.dtype = torch.float32,
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
    from promptseg.backends.meta_model import load_image_model
    from promptseg.tokenizer import open_clip_vocab_path

    path, model_id = resolve_checkpoint(model, revision=revision, token=token)
    network, arch = load_image_model(path, open_clip_vocab_path())
    return Sam3MetaBackend(network, arch.image_size, model_id, torch.device(device), dtype)


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
    from huggingface_hub import errors as hub_errors
    from huggingface_hub import hf_hub_download

    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    help_text = GATED_HELP.format(repo=repo)
    try:
        local = hf_hub_download(repo, filename, revision=revision, token=token, local_files_only=offline)
    except hub_errors.GatedRepoError as exc:
        raise ModelLoadError(f"Access to {repo} is refused (gated repository). {help_text}") from exc
    except hub_errors.RepositoryNotFoundError as exc:
        raise ModelLoadError(
            f"The hub has no repository {repo!r} you can see (or you are not logged in). {help_text}"
        ) from exc
    except hub_errors.RevisionNotFoundError as exc:
        raise ModelLoadError(f"{repo} has no revision {revision!r}.") from exc
    except hub_errors.LocalEntryNotFoundError as exc:
        raise ModelLoadError(
            f"{repo}/{filename} is not in the local Hugging Face cache and the hub cannot be reached "
            f"({'HF_HUB_OFFLINE is set' if offline else 'no network'}). Download it once where the hub "
            f"is reachable. {help_text}"
        ) from exc
    except hub_errors.EntryNotFoundError as exc:
        raise ModelLoadError(f"{repo} has no file {filename!r}; Meta's checkpoint is {CHECKPOINT}.") from exc
    except hub_errors.HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status in (401, 403):
            raise ModelLoadError(f"The hub refused access to {repo} (HTTP {status}). {help_text}") from exc
        raise ModelLoadError(f"Downloading {repo}/{filename} failed: {exc}") from exc
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"Cannot fetch {repo}/{filename} from the Hugging Face hub ({exc.__class__.__name__}: {exc}). "
            f"{help_text}"
        ) from exc
    local = Path(local)
    return local, f"hub:{repo}/{filename}@{local.parent.name}"


def _file_digest(path: Path) -> str:
    """Size plus the first and last MiB of the checkpoint and its architecture file, if any."""
    from promptseg.backends.meta_model import arch_path

    size = path.stat().st_size
    digest = hashlib.sha256(f"{path.name}:{size}".encode())
    with open(path, "rb") as handle:
        digest.update(handle.read(1 << 20))
        handle.seek(max(0, size - (1 << 20)))
        digest.update(handle.read(1 << 20))
    if arch_path(path).exists():
        digest.update(arch_path(path).read_bytes())
    return digest.hexdigest()[:24]


class Sam3MetaBackend:
    """A loaded ``Sam3Image`` whose calls into the package run on this backend's device."""

    name = NAME

    def __init__(self, model, image_size: int, model_id: str, device: torch.device, dtype: torch.dtype) -> None:
        # fp32 weights, lower precisions through autocast: the recipe the package is written for
        # (it feeds fp32 tensors into layers in places, and turns autocast off around some)
        self.model = model.to(device).eval()
        self.model_id = model_id
        self.device = device
        self.dtype = dtype
        self.input_size = (int(image_size), int(image_size))
        self._positions: dict[tuple, torch.Tensor] = {}

    @contextmanager
    def _redirect(self):
        """Calls into the package: on this device, in this precision."""
        with DeviceRedirect(self.device), torch.autocast(
            self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32
        ):
            yield

    def preprocess(self, rgb: np.ndarray) -> torch.Tensor:
        """Meta's transform: resize to the square input (antialiased), scale to [-1, 1]."""
        from torchvision.transforms import v2

        image = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).to(self.device)
        image = v2.functional.resize(image, list(self.input_size), antialias=True)
        pixels = image.to(torch.float32).div_(255).sub_(0.5).div_(0.5)
        return pixels[None]  # fp32: autocast lowers it inside the first layer

    @torch.inference_mode()
    def encode_image(self, pixel_values: torch.Tensor) -> Tensors:
        with self._redirect():
            out = self.model.backbone.forward_image(pixel_values.to(self.device))
        return {f"fpn_{i}": level for i, level in enumerate(out["backbone_fpn"])}

    @torch.inference_mode()
    def encode_text(self, phrases: list[str]) -> list[Tensors]:
        with self._redirect():
            out = self.model.backbone.forward_text(list(phrases), device=self.device)
        features = out["language_features"].transpose(0, 1)  # (batch, tokens, d)
        return [
            {"features": features[i : i + 1], "padding": out["language_mask"][i : i + 1]}
            for i in range(len(phrases))
        ]

    @torch.inference_mode()
    def decode(
        self,
        image: Tensors,
        texts: list[Tensors],
        threshold: float,
        boxes: torch.Tensor | None = None,
        box_labels: torch.Tensor | None = None,
    ) -> list[Detections]:
        from sam3.model.data_misc import FindStage

        batch = len(texts)
        levels = [image[f"fpn_{i}"].to(self.device, self.dtype) for i in range(len(image))]
        backbone_out = {
            "backbone_fpn": levels,
            "vision_features": levels[-1],
            "vision_pos_enc": [self._position(level) for level in levels],
            "language_features": torch.cat([t["features"] for t in texts]).to(self.device, self.dtype).transpose(0, 1),
            "language_mask": torch.cat([t["padding"] for t in texts]).to(self.device),
        }
        find = FindStage(
            img_ids=torch.zeros(batch, dtype=torch.long, device=self.device),
            text_ids=torch.arange(batch, dtype=torch.long, device=self.device),
            input_boxes=None, input_boxes_mask=None, input_boxes_label=None,
            input_points=None, input_points_mask=None,
        )
        with self._redirect():
            prompt = self._geometry(batch, boxes, box_labels)
            out = self.model.forward_grounding(
                backbone_out=backbone_out, find_input=find, find_target=None, geometric_prompt=prompt
            )
        scores = out["pred_logits"].float().sigmoid().squeeze(-1)
        scores = scores * out["presence_logit_dec"].float().sigmoid()
        results = []
        for b in range(batch):
            keep = scores[b] > threshold
            results.append(
                Detections(
                    mask_probs=out["pred_masks"][b][keep].float().sigmoid(),
                    boxes=out["pred_boxes_xyxy"][b][keep].float().clamp(0, 1),  # cxcywh may overhang
                    scores=scores[b][keep],
                )
            )
        return results

    def _geometry(self, batch: int, boxes: torch.Tensor | None, labels: torch.Tensor | None):
        """Exemplar boxes as the package's geometric prompt (cxcywh, sequence first)."""
        from sam3.model.geometry_encoders import Prompt

        if boxes is None or not len(boxes):
            return self.model._get_dummy_prompt(num_prompts=batch)
        xyxy = boxes.to(self.device, self.dtype)
        cxcywh = torch.stack([(xyxy[:, 0] + xyxy[:, 2]) / 2, (xyxy[:, 1] + xyxy[:, 3]) / 2,
                              xyxy[:, 2] - xyxy[:, 0], xyxy[:, 3] - xyxy[:, 1]], dim=-1)
        labels = labels if labels is not None else torch.ones(len(boxes), dtype=torch.long)
        count = len(boxes)
        return Prompt(
            box_embeddings=cxcywh[:, None].expand(count, batch, 4),
            box_mask=torch.zeros(batch, count, dtype=torch.bool, device=self.device),
            box_labels=labels.to(self.device, torch.long)[:, None].expand(count, batch),
        )

    def _position(self, level: torch.Tensor) -> torch.Tensor:
        key = (tuple(level.shape[1:]), level.device, level.dtype)
        if key not in self._positions:
            with self._redirect():
                encode = self.model.backbone.vision_backbone.position_encoding
                self._positions[key] = encode(level[:1]).to(level.dtype)
        return self._positions[key]
