"""Build SAM 3's image model from Meta's ``sam3`` components and load ``sam3.pt`` strictly.

Meta's builder hard-codes every dimension, so this module composes the same classes with the
dimensions as parameters: `Architecture()` is the released model (its keys and shapes equal
the ``detector`` half of the official ``sam3.pt``); smaller ones serve tests and benchmarks and
are described by a ``<checkpoint>.arch.json`` file saved beside the weights.

The official checkpoint holds the image detector (``detector.*``) and the video tracker
(``tracker.*``). Every detector key must match, with nothing missing or extra. The tracker's SAM
prompt encoder and mask decoder answer visual prompts (points, a box, a mask) on the detector's
trunk through the SAM 2 neck the detector carries, as Meta's "instance interactive" image
predictor does: when the checkpoint holds ``tracker.*`` keys, every one of them must match too.
A checkpoint without any (detector only) loads for text prompts alone. Meta's own loader is
``strict=False`` and only prints, so a wrong file would "load" with random layers.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from promptseg.backends.meta.device import DeviceRedirect
from promptseg.errors import ModelLoadError

logger = logging.getLogger(__name__)

DETECTOR = "detector."
TRACKER = "tracker."
ARCH_SUFFIX = ".arch.json"
# created with torch.empty and never initialised by the package; real checkpoints carry them
UNINITIALISED = ("backbone.language_backbone.encoder.positional_embedding",
                 "backbone.language_backbone.encoder.text_projection")


@dataclass(frozen=True)
class Architecture:
    """Every dimension of SAM 3's image model; the defaults are the released model's."""

    image_size: int = 1008
    patch_size: int = 14
    pretrain_image_size: int = 336
    vit_dim: int = 1024
    vit_depth: int = 32
    vit_heads: int = 16
    vit_mlp_ratio: float = 4.625
    vit_window: int = 24
    vit_global_blocks: tuple[int, ...] = (7, 15, 23, 31)
    d_model: int = 256
    heads: int = 8
    ffn_dim: int = 2048
    encoder_layers: int = 6
    decoder_layers: int = 6
    num_queries: int = 200
    geometry_layers: int = 3
    text_width: int = 1024
    text_heads: int = 16
    text_layers: int = 24
    tracker_mem_dim: int = 64
    tracker_memory_layers: int = 4
    tracker_ffn_dim: int = 2048
    tracker_num_maskmem: int = 7

    @classmethod
    def from_dict(cls, values: dict) -> Architecture:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ModelLoadError(f"Unknown SAM 3 architecture fields {unknown}; known: {sorted(names)}.")
        if "vit_global_blocks" in values:
            values = {**values, "vit_global_blocks": tuple(values["vit_global_blocks"])}
        return cls(**values)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def arch_path(checkpoint: Path) -> Path:
    return checkpoint.with_name(checkpoint.name + ARCH_SUFFIX)


def read_architecture(checkpoint: Path) -> Architecture:
    """The released architecture, unless a ``<checkpoint>.arch.json`` describes another."""
    path = arch_path(checkpoint)
    if not path.exists():
        return Architecture()
    try:
        return Architecture.from_dict(json.loads(path.read_text()))
    except (ValueError, TypeError) as exc:
        raise ModelLoadError(f"{path} is not a valid SAM 3 architecture description: {exc}") from exc


def build_image_model(arch: Architecture, bpe_path: str | Path):
    """SAM 3's image model (``Sam3Image``) on the CPU with uninitialised weights, in eval mode."""
    from torch import nn

    from sam3.model.decoder import TransformerDecoder, TransformerDecoderLayer
    from sam3.model.encoder import TransformerEncoderFusion, TransformerEncoderLayer
    from sam3.model.geometry_encoders import SequenceGeometryEncoder
    from sam3.model.maskformer_segmentation import PixelDecoder, UniversalSegmentationHead
    from sam3.model.model_misc import MLP, DotProductScoring, TransformerWrapper
    from sam3.model.model_misc import MultiheadAttentionWrapper as MultiheadAttention
    from sam3.model.necks import Sam3DualViTDetNeck
    from sam3.model.position_encoding import PositionEmbeddingSine
    from sam3.model.sam3_image import Sam3Image
    from sam3.model.text_encoder_ve import VETextEncoder
    from sam3.model.tokenizer_ve import SimpleTokenizer
    from sam3.model.vitdet import ViT
    from sam3.model.vl_combiner import SAM3VLBackbone

    d, heads, ffn = arch.d_model, arch.heads, arch.ffn_dim

    def position(precompute=None):
        return PositionEmbeddingSine(num_pos_feats=d, normalize=True, scale=None, temperature=10000,
                                     precompute_resolution=precompute)

    def attention(dropout=0.1, batch_first=False):
        return MultiheadAttention(num_heads=heads, dropout=dropout, embed_dim=d, batch_first=batch_first)

    with DeviceRedirect("cpu"):  # the package precomputes caches on "cuda" while it builds
        vit = ViT(
            img_size=arch.image_size, pretrain_img_size=arch.pretrain_image_size, patch_size=arch.patch_size,
            embed_dim=arch.vit_dim, depth=arch.vit_depth, num_heads=arch.vit_heads, mlp_ratio=arch.vit_mlp_ratio,
            norm_layer="LayerNorm", drop_path_rate=0.1, qkv_bias=True, use_abs_pos=True, tile_abs_pos=True,
            global_att_blocks=arch.vit_global_blocks, rel_pos_blocks=(), use_rope=True, use_interp_rope=True,
            window_size=arch.vit_window, pretrain_use_cls_token=True, retain_cls_token=False, ln_pre=True,
            ln_post=False, return_interm_layers=False, bias_patch_embed=False, compile_mode=None,
        )
        # the SAM 2 neck belongs to the interactive tracker; it is in the checkpoint's detector
        neck = Sam3DualViTDetNeck(position_encoding=position(arch.image_size), d_model=d,
                                  scale_factors=[4.0, 2.0, 1.0, 0.5], trunk=vit, add_sam2_neck=True)
        text = VETextEncoder(tokenizer=SimpleTokenizer(bpe_path=str(bpe_path)), d_model=d,
                             width=arch.text_width, heads=arch.text_heads, layers=arch.text_layers)
        backbone = SAM3VLBackbone(visual=neck, text=text, scalp=1)
        encoder = TransformerEncoderFusion(
            layer=TransformerEncoderLayer(
                activation="relu", d_model=d, dim_feedforward=ffn, dropout=0.1, pos_enc_at_attn=True,
                pos_enc_at_cross_attn_keys=False, pos_enc_at_cross_attn_queries=False, pre_norm=True,
                self_attention=attention(batch_first=True), cross_attention=attention(batch_first=True),
            ),
            num_layers=arch.encoder_layers, d_model=d, num_feature_levels=1, frozen=False,
            use_act_checkpoint=True, add_pooled_text_to_img_feat=False, pool_text_with_mask=True,
        )
        decoder = TransformerDecoder(
            layer=TransformerDecoderLayer(
                activation="relu", d_model=d, dim_feedforward=ffn, dropout=0.1,
                cross_attention=attention(), n_heads=heads, use_text_cross_attention=True,
            ),
            num_layers=arch.decoder_layers, num_queries=arch.num_queries, return_intermediate=True,
            box_refine=True, num_o2m_queries=0, dac=True, boxRPB="log", d_model=d, frozen=False,
            interaction_layer=None, dac_use_selfatt_ln=True, resolution=arch.image_size,
            stride=arch.patch_size, use_act_checkpoint=True, presence_token=True,
        )
        scoring = DotProductScoring(
            d_model=d, d_proj=d,
            prompt_mlp=MLP(input_dim=d, hidden_dim=ffn, output_dim=d, num_layers=2, dropout=0.1,
                           residual=True, out_norm=nn.LayerNorm(d)),
        )
        head = UniversalSegmentationHead(
            hidden_dim=d, upsampling_stages=3, aux_masks=False, presence_head=False, dot_product_scorer=None,
            act_ckpt=True, cross_attend_prompt=attention(dropout=0),
            pixel_decoder=PixelDecoder(num_upsampling_stages=3, interpolation_mode="nearest", hidden_dim=d,
                                       compile_mode=None),
        )
        geometry = SequenceGeometryEncoder(
            pos_enc=position(), encode_boxes_as_points=False, points_direct_project=True, points_pool=True,
            points_pos_enc=True, boxes_direct_project=True, boxes_pool=True, boxes_pos_enc=True, d_model=d,
            num_layers=arch.geometry_layers,
            layer=TransformerEncoderLayer(
                activation="relu", d_model=d, dim_feedforward=ffn, dropout=0.1, pos_enc_at_attn=False,
                pre_norm=True, self_attention=attention(), pos_enc_at_cross_attn_queries=False,
                pos_enc_at_cross_attn_keys=True, cross_attention=attention(),
            ),
            use_act_ckpt=True, add_cls=True, add_post_encode_proj=True,
        )
        model = Sam3Image(
            backbone=backbone, transformer=TransformerWrapper(encoder=encoder, decoder=decoder, d_model=d),
            input_geometry_encoder=geometry, segmentation_head=head, num_feature_levels=1,
            o2m_mask_predict=True, dot_prod_scoring=scoring, use_instance_query=False, multimask_output=True,
            inst_interactive_predictor=None, matcher=None,
        )
    return model.eval()


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a ``sam3.pt`` (flat, or under ``"model"`` as some exports nest it)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelLoadError(
            f"Cannot read {path} as a PyTorch checkpoint ({exc.__class__.__name__}: {exc}). "
            "It may be truncated: download sam3.pt again."
        ) from exc
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelLoadError(f"{path} is not a SAM 3 checkpoint: expected a dict of tensors.")
    return state


def checked_part(state: dict[str, torch.Tensor], prefix: str, model, path: Path, what: str,
                 foreign: Sequence[str] = ()) -> dict[str, torch.Tensor]:
    """The tensors under `prefix`, checked key by key and shape by shape against `model`.

    `foreign` lists keys that belong to no part (reported as unexpected too)."""
    expected = model.state_dict()
    part = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    mismatched = sorted(
        f"{prefix}{k} {tuple(part[k].shape)} vs {tuple(expected[k].shape)}"
        for k in set(expected) & set(part) if part[k].shape != expected[k].shape
    )
    problems = {"missing keys": [prefix + k for k in sorted(set(expected) - set(part))],
                "unexpected keys": [prefix + k for k in sorted(set(part) - set(expected))] + list(foreign),
                "shape mismatches": mismatched}
    problems = {kind: keys for kind, keys in problems.items() if keys}
    if problems:
        detail = "; ".join(
            f"{kind}: {', '.join(keys[:5])}" + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")
            for kind, keys in problems.items()
        )
        raise ModelLoadError(
            f"{path} does not match SAM 3's {what} ({detail}). Refusing a partial load: use the "
            f"official sam3.pt (facebook/sam3), or a checkpoint with a matching {path.name}{ARCH_SUFFIX}."
        )
    return part


def detector_state(state: dict[str, torch.Tensor], model, path: Path) -> dict[str, torch.Tensor]:
    """The detector's tensors, checked against `model`; keys of neither part are refused too."""
    other = sorted(k for k in state if not k.startswith((DETECTOR, TRACKER)))
    return checked_part(state, DETECTOR, model, path, "image model", other)


def build_tracker(arch: Architecture):
    """SAM 3's tracker as Meta's ``build_tracker`` composes it (SAM prompt encoder and mask decoder,
    memory attention and memory encoder), dimensions from `arch`; on the CPU, in eval mode.

    ``Sam3TrackerBase`` holds every tracker weight; Meta's builder wraps it in
    ``Sam3TrackerPredictor``, which adds no weight but, once constructed, leaves CUDA bf16 autocast
    on for the rest of the thread, so it is not used here.
    """
    from sam3.model.decoder import TransformerDecoderLayerv2, TransformerEncoderCrossAttention
    from sam3.model.memory import CXBlock, SimpleFuser, SimpleMaskDownSampler, SimpleMaskEncoder
    from sam3.model.model_misc import TransformerWrapper
    from sam3.model.position_encoding import PositionEmbeddingSine
    from sam3.model.sam3_tracker_base import Sam3TrackerBase
    from sam3.sam.transformer import RoPEAttention

    d, grid, mem = arch.d_model, arch.image_size // arch.patch_size, arch.tracker_mem_dim

    def rope(**extra):
        return RoPEAttention(embedding_dim=d, num_heads=1, downsample_rate=1, dropout=0.1, rope_theta=10000.0,
                             feat_sizes=[grid, grid], use_fa3=False, use_rope_real=False, **extra)

    with DeviceRedirect("cpu"):  # position caches are precomputed on "cuda" while it builds
        memory_encoder = SimpleMaskEncoder(
            out_dim=mem, in_dim=d,
            position_encoding=PositionEmbeddingSine(num_pos_feats=mem, normalize=True, scale=None, temperature=10000,
                                                    precompute_resolution=arch.image_size),
            mask_downsampler=SimpleMaskDownSampler(embed_dim=d, kernel_size=3, stride=2, padding=1,
                                                   interpol_size=[grid * 16, grid * 16]),
            fuser=SimpleFuser(layer=CXBlock(dim=d, kernel_size=7, padding=3, layer_scale_init_value=1.0e-06,
                                            use_dwconv=True), num_layers=2),
        )
        layer = TransformerDecoderLayerv2(
            cross_attention_first=False, activation="relu", dim_feedforward=arch.tracker_ffn_dim, dropout=0.1,
            pos_enc_at_attn=False, pre_norm=True, self_attention=rope(), d_model=d,
            pos_enc_at_cross_attn_keys=True, pos_enc_at_cross_attn_queries=False,
            cross_attention=rope(kv_in_dim=mem, rope_k_repeat=True),
        )
        memory_attention = TransformerEncoderCrossAttention(
            remove_cross_attention_layers=[], batch_first=True, d_model=d, frozen=False, pos_enc_at_input=True,
            layer=layer, num_layers=arch.tracker_memory_layers, use_act_checkpoint=False,
        )
        tracker = Sam3TrackerBase(
            image_size=arch.image_size, num_maskmem=arch.tracker_num_maskmem, backbone=None,
            backbone_stride=arch.patch_size,
            transformer=TransformerWrapper(encoder=memory_attention, decoder=None, d_model=d),
            maskmem_backbone=memory_encoder, multimask_output_in_sam=True, forward_backbone_per_frame_for_eval=True,
            trim_past_non_cond_mem_for_eval=False, multimask_output_for_tracking=True, multimask_min_pt_num=0,
            multimask_max_pt_num=1, non_overlap_masks_for_mem_enc=False, max_cond_frames_in_attn=4,
            offload_output_to_cpu_for_eval=False,
            sam_mask_decoder_extra_args={"dynamic_multimask_via_stability": True,
                                         "dynamic_multimask_stability_delta": 0.05,
                                         "dynamic_multimask_stability_thresh": 0.98},
            use_memory_selection=False,
        )
    return tracker.eval()


def load_image_model(path: Path, bpe_path: str | Path):
    """Build the architecture `path` needs and load its weights strictly (on the CPU).

    Returns the image model, the tracker (None when the checkpoint holds no ``tracker.*`` key)
    and the architecture.
    """
    arch = read_architecture(path)
    state = read_checkpoint(path)
    model = build_image_model(arch, bpe_path)
    model.load_state_dict(detector_state(state, model, path), strict=True)
    tracker = None
    if any(k.startswith(TRACKER) for k in state):
        tracker = build_tracker(arch)
        tracker.load_state_dict(checked_part(state, TRACKER, tracker, path, "tracker"), strict=True)
    else:  # the SAM 2 neck only feeds the tracker: skip computing it for every image
        model.backbone.vision_backbone.sam2_convs = None
    return model, tracker, arch
