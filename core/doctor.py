"""`promptseg doctor`: say what this install can do, then prove it with a tiny model end to end."""

from __future__ import annotations

import importlib.util
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

OK, WARN, FAIL = "ok", "warn", "FAIL"


def _line(status: str, what: str, detail: str = "") -> None:
    mark = {OK: "[ ok ]", WARN: "[warn]", FAIL: "[FAIL]"}[status]
    print(f"{mark} {what}" + (f": {detail}" if detail else ""), flush=True)


def run_checks(model: str | None = None, out: Callable[[str, str, str], None] = _line) -> bool:
    """Print one line per check; return False when the install cannot segment at all."""
    healthy = True
    import torch

    out(OK, "torch", f"{torch.__version__} (CUDA build: {torch.version.cuda or 'no'})")
    from promptseg.device import resolve_device, resolve_dtype

    device = resolve_device("auto")
    out(OK, "device='auto'", f"{device} with dtype {resolve_dtype('auto', device)}")
    if torch.cuda.is_available():
        out(OK, "CUDA", f"{torch.cuda.get_device_name(0)}, bf16 {'yes' if torch.cuda.is_bf16_supported() else 'no'}")
    else:
        out(WARN, "CUDA", "not available: the CPU runs SAM 3 at about 40 s per new image (full size)")
    for dtype in (torch.bfloat16, torch.float16):
        try:
            (torch.ones(4, 4, dtype=dtype) @ torch.ones(4, 4, dtype=dtype)).sum().item()
            out(OK, f"{dtype} on CPU", "supported")
        except RuntimeError as exc:
            out(WARN, f"{dtype} on CPU", str(exc).splitlines()[0])
    try:
        import transformers

        out(OK, "transformers", transformers.__version__)
    except ImportError as exc:
        out(FAIL, "transformers", f"{exc}: pip install 'promptseg'")
        healthy = False
    for host, module in (("FiftyOne", "fiftyone"), ("napari", "napari"), ("Label Studio SDK", "label_studio_sdk")):
        found = importlib.util.find_spec(module) is not None
        out(OK if found else WARN, f"{host} adapter", "host installed" if found else
            f"host not installed (pip install 'promptseg[{module.split('_')[0]}]')")
    from promptseg.plugins import registry

    out(OK, "backends", ", ".join(sorted(registry().segmenters)))
    from promptseg.cache import default_cache_dir

    cache = default_cache_dir()
    try:
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=cache):
            pass
        out(OK, "embedding cache", f"{cache} is writable")
    except OSError as exc:
        out(WARN, "embedding cache", f"{cache} is not writable ({exc}); set PROMPTSEG_CACHE_DIR")
    _check_model(model, out)
    healthy &= _tiny_run(out)
    return healthy


def _check_model(model: str | None, out) -> None:
    from promptseg.segmenter import default_model

    model = model or default_model()
    path = Path(model).expanduser()
    if path.is_dir():
        from promptseg.backends.sam3_hf import _check_local_dir
        from promptseg.errors import ModelLoadError

        try:
            _check_local_dir(path)
            out(OK, "model", f"{path} has a config and weights")
        except ModelLoadError as exc:
            out(WARN, "model", str(exc))
        return
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(model, "config.json")
    if isinstance(cached, str):
        out(OK, "model", f"{model} is in the Hugging Face cache")
        return
    if os.environ.get("HF_HUB_OFFLINE"):
        out(WARN, "model", f"{model} is not cached and HF_HUB_OFFLINE is set")
        return
    from huggingface_hub import HfApi

    try:
        HfApi().model_info(model, timeout=10)
        out(OK, "model", f"{model} is reachable on the hub (downloaded on first use)")
    except Exception as exc:  # gated, unauthorised, offline: all mean "not usable yet"
        out(WARN, "model", f"{model} is not reachable ({exc.__class__.__name__}). SAM 3 weights are gated: "
            "accept the licence on its hub page and run `hf auth login`, or pass --model DIR")


def _tiny_run(out) -> bool:
    """Build a random tiny SAM 3, load it through the real loader, segment twice (cache hit)."""
    import numpy as np

    from promptseg.segmenter import load_segmenter
    from promptseg.testing import make_random_sam3

    try:
        with tempfile.TemporaryDirectory() as tmp:
            directory = make_random_sam3(Path(tmp) / "tiny-sam3")
            segmenter = load_segmenter(str(directory), device="cpu", dtype="fp32", cache_dir=Path(tmp) / "cache")
            image = np.random.default_rng(0).integers(0, 255, (96, 128, 3), dtype=np.uint8)
            first = segmenter.segment(image, ["cell", "dog"], threshold=0.0)
            second = segmenter.segment(image, "car", threshold=0.0)
            if segmenter.stats.image_encoder_runs != 1 or second.embedding_source != "memory":
                raise RuntimeError("the second prompt did not reuse the cached embedding")
        out(OK, "end-to-end run", f"tiny random SAM 3: {len(first)} + {len(second)} instance(s), cache reused")
        return True
    except Exception as exc:
        out(FAIL, "end-to-end run", f"{exc.__class__.__name__}: {exc}")
        return False
