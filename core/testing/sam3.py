"""Build small SAM 3 models with random weights: for tests, benchmarks and `promptseg doctor`.

Every dimension of SAM 3 is a config field, so the real architecture can be built at any size.
``"tiny"`` (~2M parameters, 112x112 input) runs a forward in milliseconds on a CPU; ``"full"``
is the released 840M-parameter architecture (1008x1008 input) with random weights.
"""

from __future__ import annotations

from pathlib import Path


def sam3_config(size: str = "tiny", image_size: int = 112, num_queries: int = 20, hidden: int = 32):
    """A ``Sam3Config`` for the real architecture (``"full"``) or a tiny one (`hidden` channels wide)."""
    from transformers import Sam3Config

    if size == "full":
        return Sam3Config()
    if size != "tiny":
        raise ValueError(f"size must be 'tiny' or 'full', got {size!r}")
    patches = image_size // 14
    return Sam3Config(
        vision_config=dict(
            model_type="sam3_vision_model",
            fpn_hidden_size=hidden,
            backbone_feature_sizes=[[patches * 4] * 2, [patches * 2] * 2, [patches] * 2],
            backbone_config=dict(
                model_type="sam3_vit_model", hidden_size=32, intermediate_size=64,
                num_hidden_layers=2, num_attention_heads=2, image_size=image_size, patch_size=14,
                window_size=4, global_attn_indexes=[1], pretrain_image_size=56,
            ),
        ),
        text_config=dict(
            model_type="clip_text_model", vocab_size=49408, hidden_size=32, intermediate_size=64,
            projection_dim=hidden, num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=32,
        ),
        geometry_encoder_config=dict(hidden_size=hidden, num_layers=1, num_attention_heads=2, intermediate_size=64),
        detr_encoder_config=dict(hidden_size=hidden, num_layers=1, num_attention_heads=2, intermediate_size=64),
        detr_decoder_config=dict(
            hidden_size=hidden, num_layers=1, num_queries=num_queries, num_attention_heads=2, intermediate_size=64
        ),
        mask_decoder_config=dict(hidden_size=hidden, num_attention_heads=2),
    )


def make_random_sam3(directory: str | Path, size: str = "tiny", seed: int = 0, **config_options) -> Path:
    """Save a randomly initialised SAM 3 to `directory` (no tokenizer or processor files)."""
    import torch
    from transformers import Sam3Model

    directory = Path(directory)
    if (directory / "config.json").exists() and any(directory.glob("*.safetensors")):
        return directory
    torch.manual_seed(seed)
    model = Sam3Model(sam3_config(size, **config_options)).eval()
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    return directory


def sam3_video_config(size: str = "tiny", image_size: int = 112, num_queries: int = 20, hidden: int = 32):
    """A ``Sam3VideoConfig`` like the hub's ``facebook/sam3``: the detector of `sam3_config` and a
    tracker sharing its vision trunk (``"full"``: the released sizes).

    The tiny one is `hidden` channels wide. Tracking through video frames needs ``hidden=128`` (then
    memories are 64 channels): transformers' video memory attention reads 64-channel memories whatever
    the config says, and runs only when object pointers are wider than memories (it splits each
    pointer into memory-sized pieces), as in the released model. 32 is enough for still images."""
    from transformers import Sam3TrackerVideoConfig, Sam3VideoConfig

    if size == "full":
        return Sam3VideoConfig()
    detector = sam3_config(size, image_size=image_size, num_queries=num_queries, hidden=hidden)
    hidden = detector.vision_config.fpn_hidden_size
    tracker = Sam3TrackerVideoConfig(
        vision_config=detector.vision_config.to_dict(), image_size=image_size,
        prompt_encoder_config=dict(hidden_size=hidden, image_size=image_size, patch_size=14, mask_input_channels=8),
        mask_decoder_config=dict(hidden_size=hidden, mlp_dim=64, num_attention_heads=2, iou_head_hidden_dim=32),
        memory_attention_hidden_size=hidden, memory_attention_num_layers=1,
        memory_attention_feed_forward_hidden_size=64, memory_encoder_hidden_size=hidden,
        memory_encoder_output_channels=64 if hidden > 64 else hidden // 2, mask_downsampler_embed_dim=hidden, memory_fuser_num_layers=1,
        memory_fuser_embed_dim=hidden, memory_fuser_intermediate_dim=64,
    )
    return Sam3VideoConfig(detector_config=detector.to_dict(), tracker_config=tracker.to_dict(), low_res_mask_size=64)


def make_random_sam3_video(directory: str | Path, size: str = "tiny", seed: int = 0, **config_options) -> Path:
    """Save a randomly initialised SAM 3 in the hub's layout (``facebook/sam3`` is a video model):
    weights under ``detector_model.*``, ``tracker_model.*`` and ``tracker_neck.*``, one ViT trunk.

    ``Sam3VideoModel.save_pretrained`` writes the tracker's keys as ``tracker_model.tracker_model.*``;
    they are renamed to the hub's ``tracker_model.*`` so loaders see what users download. The tracker's
    zero-initialised tensors (biases, the no-memory embedding) get small random values, so a test
    comparing two pipelines notices one that forgets any of them. ``hidden=128`` makes one that
    tracks objects through video frames (see `sam3_video_config`).
    """
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import Sam3VideoModel

    directory = Path(directory)
    if (directory / "config.json").exists() and any(directory.glob("*.safetensors")):
        return directory
    torch.manual_seed(seed)
    model = Sam3VideoModel(sam3_video_config(size, **config_options)).eval()
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    noise = torch.Generator().manual_seed(seed)
    for path in sorted(directory.glob("*.safetensors")):
        tensors = {_hub_key(name): tensor.contiguous() for name, tensor in load_file(path).items()}
        for name, tensor in sorted(tensors.items()):
            if name.startswith(("tracker_model.", "tracker_neck.")) and tensor.is_floating_point() and not tensor.any():
                tensors[name] = (torch.randn(tensor.shape, generator=noise) * 0.02).to(tensor.dtype)
        save_file(tensors, path, metadata={"format": "pt"})
    return directory


def _hub_key(name: str) -> str:
    doubled = "tracker_model.tracker_model."
    return "tracker_model." + name[len(doubled):] if name.startswith(doubled) else name
