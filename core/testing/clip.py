"""Build tiny OpenCLIP models with random weights: for tests, benchmarks and offline checks.

``make_random_clip`` registers a tiny architecture with ``open_clip.add_model_config`` (a 32x32
ViT and a one-layer text transformer using CLIP's BPE), builds it, and writes both a weights file
(load as ``NAME/PATH``) and an open_clip ``local-dir`` (load as ``local-dir:DIR``).
``multilingual=True`` swaps in a tiny xlm-roberta text tower built from a local transformers
config and a word-piece tokenizer made on the spot, so nothing is downloaded. Both models are
the same on every run (seeded weights, a fixed vocabulary).
"""

from __future__ import annotations

import json
from pathlib import Path

TINY_CLIP = "promptseg-tiny-clip"
TINY_MULTILINGUAL_CLIP = "promptseg-tiny-xlmr-clip"
VISION = {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16}


def tiny_clip_config(text_dir: Path | None = None) -> dict:
    """An open_clip model config; with `text_dir`, its text tower is the HF model described there."""
    if text_dir is None:
        text = {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}
    else:
        text = {"hf_model_name": str(text_dir), "hf_tokenizer_name": str(text_dir),
                "hf_pooler_type": "mean_pooler", "hf_proj_type": "linear", "context_length": 24}
    return {"embed_dim": 16, "vision_cfg": dict(VISION), "text_cfg": text}


def make_random_clip(directory: str | Path, multilingual: bool = False, seed: int = 0) -> dict[str, str]:
    """Save a random tiny CLIP under `directory`; return the specs that load it.

    Keys: ``"file"`` (``NAME/PATH`` of a weights file; monolingual only) and ``"local_dir"``
    (``local-dir:DIR``).
    """
    import open_clip
    import torch

    from promptseg.clip.openclip import save_local_dir

    directory = Path(directory)
    local = directory / "local-dir"
    name = TINY_MULTILINGUAL_CLIP if multilingual else TINY_CLIP
    specs = {"local_dir": f"local-dir:{local}"}
    config_dir = directory / "configs"
    if multilingual:
        _write_tiny_xlmr(local)
        config = tiny_clip_config(local)
    else:
        config = tiny_clip_config()
    config_dir.mkdir(parents=True, exist_ok=True)
    (config_dir / f"{name}.json").write_text(json.dumps(config))
    open_clip.add_model_config(config_dir)
    weights = directory / "tiny_clip.safetensors"
    if not multilingual:
        specs["file"] = f"{name}/{weights}"
    if (local / "open_clip_model.safetensors").exists():
        return specs
    torch.manual_seed(seed)
    model = open_clip.create_model(name, pretrained=None, pretrained_text=False).eval()
    save_local_dir(model, config, local)
    if not multilingual:
        from safetensors.torch import save_file

        save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, weights)
    return specs


def _write_tiny_xlmr(directory: Path) -> None:
    """A 1-layer xlm-roberta config plus a word-piece tokenizer, both saved in `directory`."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, XLMRobertaConfig

    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(models.WordPiece(vocab=_word_pieces(), unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.save_pretrained(directory)
    XLMRobertaConfig(
        vocab_size=fast.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=40, pad_token_id=1, bos_token_id=0, eos_token_id=2,
    ).save_pretrained(directory)


def _word_pieces() -> dict[str, int]:
    """Every word of the shipped vocabulary and a few non-English prompts, then every character
    alone and as a continuation, in sorted order: the same ids on every run (a trained
    vocabulary orders tied pieces differently from run to run, and the random weights follow)."""
    from tokenizers import pre_tokenizers

    from promptseg.clip.vocabulary import default_vocabulary

    corpus = list(default_vocabulary()) + ["红色的汽车", "一只猫", "собака", "voiture rouge", "犬"]
    split = pre_tokenizers.BertPreTokenizer().pre_tokenize_str
    words = sorted({word for text in corpus for word, _ in split(text)})
    characters = sorted({char for word in words for char in word})
    pieces = ["<s>", "<pad>", "</s>", "<unk>", *words, *characters, *(f"##{char}" for char in characters)]
    return {piece: index for index, piece in enumerate(dict.fromkeys(pieces))}
