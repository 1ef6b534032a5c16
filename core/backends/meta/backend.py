"""The loaded ``sam3-meta`` model: preprocess, encode and decode through Meta's package.

Every call into the package runs under `DeviceRedirect` (its CUDA hard-codes go to this
backend's device) and, below fp32, under ``torch.autocast`` with fp32 weights: the recipe the
package is written for (in fp32 no autocast is constructed at all, see `promptseg.device.autocast`).
The package's layers keep caches built on the CPU as plain attributes, which ``Module.to`` does not
move: `on_device` moves them with the model. See `promptseg.backends.meta` for loading.

Visual prompts go through the tracker's SAM prompt encoder and mask decoder the way Meta's
"instance interactive" image predictor (``SAM3InteractiveImagePredictor`` on
``Sam3Image.predict_inst``) runs them, on levels cached with the detector's: the predictor itself
keeps the image in its own state, so it is not shared between calls here.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager

import numpy as np
import torch

from promptseg.backends.protocol import Detections, Tensors
from promptseg.backends.sam3_common import exemplar_inputs, sam3_embedding_spec, sam3_tracker_spec, split_detections
from promptseg.backends.meta.device import DeviceRedirect
from promptseg.device import autocast, resize_device
from promptseg.errors import ModelLoadError
from promptseg.placement import move_plain_tensors

logger = logging.getLogger(__name__)

NAME = "sam3-meta"
FPN_SCALES = (4.0, 2.0, 1.0)  # the neck's levels the detector consumes (its 0.5 level is scalped off)
VISUAL_PROMPTS_HELP = (
    "Visual prompts (points, boxes, masks) need SAM 3's tracker, which this sam3.pt does not hold (it has "
    "detector.* tensors only). Load the official sam3.pt of facebook/sam3, which holds tracker.* too."
)


def on_device(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """`module` on `device` in eval mode, caches included: the package builds some on the CPU as
    plain attributes (the detector's box coordinates, the necks' position encodings, the tracker's
    rotary frequencies) and reads them on every call, so a decode on a GPU would mix devices."""
    module = module.to(device).eval()
    moved = move_plain_tensors(module, device)
    logger.debug("Moved %d cache attribute(s) of %s to %s", moved, type(module).__name__, device)
    return module


class Sam3MetaBackend:
    """A loaded ``Sam3Image`` whose calls into the package run on this backend's device."""

    name = NAME
    visual_prompts_help = VISUAL_PROMPTS_HELP
    """What to load when the checkpoint has no tracker (see `visual_prompts`)."""

    def __init__(
        self, model, image_size: int, model_id: str, device: torch.device, dtype: torch.dtype,
        patch_size: int = 14, d_model: int = 256, tracker=None,
    ) -> None:
        # fp32 weights, lower precisions through autocast: the recipe the package is written for
        # (it feeds fp32 tensors into layers in places, and turns autocast off around some)
        self.model = on_device(model, device)
        self.tracker = on_device(tracker, device) if tracker is not None else None
        """The tracker (``Sam3TrackerBase``) whose SAM heads answer visual prompts, or None."""
        self.model_id = model_id
        self.device = device
        self.dtype = dtype
        self.input_size = (int(image_size), int(image_size))
        self.patch_size = int(patch_size)
        self.d_model = int(d_model)
        self._positions: dict[tuple, torch.Tensor] = {}

    def with_dtype(self, dtype: torch.dtype) -> Sam3MetaBackend:
        """This model in another precision, e.g. to redo a call whose fp16 output overflowed. The weights
        are fp32 in every precision (the precision is autocast's), so the two share them: no memory."""
        return Sam3MetaBackend(self.model, self.input_size[0], self.model_id, self.device, dtype,
                               patch_size=self.patch_size, d_model=self.d_model, tracker=self.tracker)

    @contextmanager
    def _redirect(self):
        """Calls into the package: on this device, in this precision."""
        with DeviceRedirect(self.device), autocast(self.device, self.dtype):
            yield

    def preprocess(self, rgb: np.ndarray) -> torch.Tensor:
        """Meta's transform: resize to the square input (antialiased), scale to [-1, 1]. The resize
        runs where the antialiased op exists (`promptseg.device.resize_device`)."""
        from torchvision.transforms import v2

        image = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).to(resize_device(self.device))
        image = v2.functional.resize(image, list(self.input_size), antialias=True).to(self.device)
        pixels = image.to(torch.float32).div_(255).sub_(0.5).div_(0.5)
        return pixels[None]  # fp32: autocast lowers it inside the first layer

    @torch.inference_mode()
    def encode_image(self, pixel_values: torch.Tensor) -> Tensors:
        with self._redirect():
            out = self.model.backbone.forward_image(pixel_values.to(self.device))
            embedding = {f"fpn_{i}": level for i, level in enumerate(out["backbone_fpn"])}
            if self.tracker is not None:  # the SAM 2 neck ran on the same trunk output
                embedding.update(self._tracker_levels(out["sam2_backbone_out"]["backbone_fpn"]))
        return embedding

    @property
    def visual_prompts(self) -> bool:
        """Whether `decode_object` can answer points, boxes and masks (the checkpoint has the tracker)."""
        return self.tracker is not None

    def _tracker_levels(self, levels: list[torch.Tensor]) -> Tensors:
        """The SAM 2 neck's three levels as Meta's ``Sam3Processor.set_image`` prepares them for the
        interactive predictor: the two finer ones through the mask decoder's projections."""
        decoder = self.tracker.sam_mask_decoder
        return {"tracker_0": decoder.conv_s0(levels[0]), "tracker_1": decoder.conv_s1(levels[1]),
                "tracker_2": levels[2]}

    def embedding_spec(self, image_size: tuple[int, int]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """What `encode_image` returns whatever the image size (every image is resized to `input_size`).

        Under autocast the levels come out in the autocast precision, so they are `dtype` too.
        """
        spec = sam3_embedding_spec(self.input_size, self.patch_size, self.d_model, FPN_SCALES, self.dtype)
        if self.tracker is not None:
            decoder = self.tracker.sam_mask_decoder
            channels = (decoder.conv_s0.out_channels, decoder.conv_s1.out_channels, self.d_model)
            spec.update(sam3_tracker_spec(self.input_size, self.patch_size, channels, self.dtype))
        return spec

    @torch.inference_mode()
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

        `points` ``(N, 2)`` and `box` ``(4,)`` are in pixels of the model input (`input_size`), as
        Meta's predictor scales them; `mask` is ``(H, W)`` float, resized to the prompt encoder's
        mask size as Meta's tracker resizes mask prompts. The box goes first as two corner points
        (labels 2 and 3), then the points, as in ``SAM3InteractiveImagePredictor.predict``.
        """
        import torch.nn.functional as F

        if self.tracker is None:
            raise ModelLoadError(VISUAL_PROMPTS_HELP)
        encoder, decoder = self.tracker.sam_prompt_encoder, self.tracker.sam_mask_decoder
        levels = [image[f"tracker_{i}"].to(self.device, self.dtype) for i in range(3)]
        # the "no memory" embedding on the level the mask decoder reads, as Meta's image predictor adds it
        embedding = levels[2] + self.tracker.no_mem_embed.view(1, -1, 1, 1)
        coords, labels = [], []
        if box is not None:
            coords.append(box.reshape(1, 2, 2))
            labels.append(torch.tensor([[2, 3]], dtype=torch.int32))
        if points is not None:
            coords.append(points[None])
            labels.append(point_labels[None].to(torch.int32))
        sparse = None
        if coords:
            sparse = (torch.cat(coords, 1).to(self.device, torch.float32), torch.cat(labels, 1).to(self.device))
        dense = None
        if mask is not None:
            dense = F.interpolate(mask[None, None].to(resize_device(self.device), torch.float32),
                                  size=encoder.mask_input_size, mode="bilinear", align_corners=False,
                                  antialias=True).to(self.device)
        with self._redirect():
            sparse_embeddings, dense_embeddings = encoder(points=sparse, boxes=None, masks=dense)
            logits, ious, _, _ = decoder(
                image_embeddings=embedding, image_pe=encoder.get_dense_pe(), sparse_prompt_embeddings=sparse_embeddings,
                dense_prompt_embeddings=dense_embeddings, multimask_output=multimask, repeat_image=False,
                high_res_features=levels[:2],
            )
        return logits[0].float(), ious[0].float()

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
        levels = [image[f"fpn_{i}"].to(self.device, self.dtype) for i in range(len(FPN_SCALES))]
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
        detections = split_detections(
            out["pred_logits"].squeeze(-1), out["presence_logit_dec"], out["pred_masks"],
            out["pred_boxes_xyxy"].clamp(0, 1),  # boxes from cxcywh may overhang the image
            threshold,
        )
        # a NaN score fails every threshold: say so, or an fp16 overflow would look like an empty image
        finite = all(bool(torch.isfinite(out[name]).all()) for name in ("pred_logits", "presence_logit_dec",
                                                                        "pred_boxes_xyxy"))
        for found in detections:
            found.finite = finite
        return detections

    def _geometry(self, batch: int, boxes: torch.Tensor | None, labels: torch.Tensor | None):
        """Exemplar boxes as the package's geometric prompt (cxcywh, sequence first)."""
        from sam3.model.geometry_encoders import Prompt

        if boxes is None or not len(boxes):
            return self.model._get_dummy_prompt(num_prompts=batch)
        cxcywh, labels = exemplar_inputs(boxes, labels, self.device, self.dtype)
        count = len(boxes)
        return Prompt(
            box_embeddings=cxcywh[:, None].expand(count, batch, 4),
            box_mask=torch.zeros(batch, count, dtype=torch.bool, device=self.device),
            box_labels=labels[:, None].expand(count, batch),
        )

    def _position(self, level: torch.Tensor) -> torch.Tensor:
        key = (tuple(level.shape[1:]), level.device, level.dtype)
        if key not in self._positions:
            with self._redirect():
                encode = self.model.backbone.vision_backbone.position_encoding
                self._positions[key] = encode(level[:1]).to(level.dtype)
        return self._positions[key]
