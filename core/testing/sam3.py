"""Build small SAM 3 models with random weights: for tests, benchmarks and `promptseg doctor`.

Every dimension of SAM 3 is a config field, so the real architecture can be built at any size.
``"tiny"`` (~2M parameters, 112x112 input) runs a forward in milliseconds on a CPU; ``"full"``
is the released 840M-parameter architecture (1008x1008 input) with random weights.
"""

from __future__ import annotations

from pathlib import Path


def sam3_config(size: str = "tiny", image_size: int = 112, num_queries: int = 20):
    """A ``Sam3Config`` for the real architecture (``"full"``) or a tiny one."""
    from transformers import Sam3Config

    if size == "full":
        return Sam3Config()
    if size != "tiny":
        raise ValueError(f"size must be 'tiny' or 'full', got {size!r}")
    patches = image_size // 14
    return Sam3Config(
        vision_config=dict(
            model_type="sam3_vision_model",
            fpn_hidden_size=32,
            backbone_feature_sizes=[[patches * 4] * 2, [patches * 2] * 2, [patches] * 2],
            backbone_config=dict(
                model_type="sam3_vit_model", hidden_size=32, intermediate_size=64,
                num_hidden_layers=2, num_attention_heads=2, image_size=image_size, patch_size=14,
                window_size=4, global_attn_indexes=[1], pretrain_image_size=56,
            ),
        ),
        text_config=dict(
            model_type="clip_text_model", vocab_size=49408, hidden_size=32, intermediate_size=64,
            projection_dim=32, num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=32,
        ),
        geometry_encoder_config=dict(hidden_size=32, num_layers=1, num_attention_heads=2, intermediate_size=64),
        detr_encoder_config=dict(hidden_size=32, num_layers=1, num_attention_heads=2, intermediate_size=64),
        detr_decoder_config=dict(
            hidden_size=32, num_layers=1, num_queries=num_queries, num_attention_heads=2, intermediate_size=64
        ),
        mask_decoder_config=dict(hidden_size=32, num_attention_heads=2),
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
