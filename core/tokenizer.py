"""SAM 3's text tokenizer rebuilt from the CLIP BPE vocabulary that open_clip ships.

A directory written by ``Sam3Model.save_pretrained`` has no tokenizer files, and Meta's own
package ships none either. SAM 3 uses the original CLIP BPE, which open_clip bundles as
``bpe_simple_vocab_16e6.txt.gz``; a ``CLIPTokenizer`` built from it gives the same ids.
"""

from __future__ import annotations

import gzip
from functools import lru_cache
from pathlib import Path

from promptseg.errors import ModelLoadError

# open_clip's vocabulary: 256 byte symbols, their word-final forms, 48894 merges, 2 specials
_MERGE_COUNT = 49152 - 256 - 2


def open_clip_vocab_path() -> Path:
    """Path of the CLIP BPE vocabulary bundled with open_clip."""
    try:
        import open_clip
    except ImportError as exc:
        raise ModelLoadError(
            "open_clip_torch is needed to build SAM 3's tokenizer when the model directory has "
            "no tokenizer files: pip install open_clip_torch"
        ) from exc
    path = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    if not path.exists():
        raise ModelLoadError(f"open_clip's BPE vocabulary is missing at {path}: reinstall open_clip_torch.")
    return path


@lru_cache(maxsize=2)
def clip_tokenizer(vocab_path: str | None = None):
    """A transformers ``CLIPTokenizer`` equal to SAM 3's, built offline."""
    from open_clip.tokenizer import bytes_to_unicode
    from transformers import CLIPTokenizer

    path = Path(vocab_path) if vocab_path else open_clip_vocab_path()
    lines = gzip.open(path).read().decode("utf-8").split("\n")[1 : _MERGE_COUNT + 1]
    merges = [tuple(line.split()) for line in lines]
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: index for index, token in enumerate(tokens)}
    # transformers 5 takes the vocabulary and merges as objects; `vocab_file=` is silently ignored
    return CLIPTokenizer(
        vocab=vocab,
        merges=merges,
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        model_max_length=77,
    )
