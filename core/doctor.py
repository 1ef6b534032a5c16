"""`promptseg doctor`: say what this install can do, then prove it with a tiny model end to end."""

from __future__ import annotations

import importlib.util
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from promptseg.hub import hub_offline

OK, WARN, FAIL = "ok", "warn", "FAIL"
# (what the user knows it as, the module that shows it is installed, the extra that installs it)
HOSTS = (
    ("FiftyOne", "fiftyone", "fiftyone"),
    ("napari", "napari", "napari"),
    ("Label Studio SDK", "label_studio_sdk", "labelstudio"),
    ("quick-try page (Gradio)", "gradio", "app"),
)


def _line(status: str, what: str, detail: str = "") -> None:
    mark = {OK: "[ ok ]", WARN: "[warn]", FAIL: "[FAIL]"}[status]
    print(f"{mark} {what}" + (f": {detail}" if detail else ""), flush=True)


def run_checks(model: str | None = None, out: Callable[[str, str, str], None] = _line) -> bool:
    """Print one line per check; return False when the install cannot segment at all, or cannot
    load `model` as given (a missing or incomplete local model, an impossible hub id)."""
    healthy = True
    import torch

    out(OK, "torch", f"{torch.__version__} (CUDA build: {torch.version.cuda or 'no'})")
    _check_devices(out)
    try:
        import transformers

        out(OK, "transformers", transformers.__version__)
    except ImportError as exc:
        out(FAIL, "transformers", f"{exc}: pip install 'promptseg'")
        healthy = False
    for host, module, extra in HOSTS:
        found = importlib.util.find_spec(module) is not None
        out(OK if found else WARN, f"{host} adapter", "host installed" if found else
            f"host not installed (pip install 'promptseg[{extra}]')")
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
    healthy &= _check_model(model, out)
    healthy &= _tiny_run(out)
    return healthy


def _check_devices(out) -> None:
    """The device "auto" picks, the precision it will use and why, and what each device can run."""
    import torch

    from promptseg.device import auto_dtype, dtype_name, resolve_device

    device = resolve_device("auto")
    out(OK, "device='auto'", str(device))
    dtype, why = auto_dtype(device)
    out(OK, "dtype='auto'", f"{dtype_name(dtype)}: {why}")
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            _check_cuda(torch.device("cuda", index), out)
    else:
        out(WARN, "CUDA", "not available: a 2-core CPU runs full-size SAM 3 at about 38 s per new image in fp32, 22 s in bf16, then about 2 s per prompt")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        _check_mps(out)
    _check_cpu(out)


def _gib(nbytes: float) -> str:
    return f"{nbytes / 1024**3:.1f} GiB"


def _check_cuda(device, out) -> None:
    import torch

    from promptseg.device import native_cuda_bf16

    major, minor = torch.cuda.get_device_capability(device.index)
    free, total = torch.cuda.mem_get_info(device.index)
    bf16 = "native" if native_cuda_bf16(device) else "emulated (slow; fp16 is used)"
    out(OK if free >= 3 * 1024**3 else WARN, f"CUDA {device}",
        f"{torch.cuda.get_device_name(device.index)}, compute capability {major}.{minor}, bf16 {bf16}, "
        f"{_gib(free)} free of {_gib(total)} (SAM 3's weights take 1.6 GiB in fp16)")


def _check_mps(out) -> None:
    import torch

    from promptseg.device import MPS_ANTIALIAS_MIN_TORCH, MPS_MIN_TORCH, torch_version

    version = torch_version()
    able = [name for name, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)) if version >= MPS_MIN_TORCH[dtype]]
    resize = "on the GPU" if version >= MPS_ANTIALIAS_MIN_TORCH else "on the CPU (torch 2.7 adds it on MPS)"
    memory = torch.mps.recommended_max_memory() if hasattr(torch.mps, "recommended_max_memory") else None
    out(OK, "Apple MPS", f"fp32 by default; {', '.join(able) or 'no lower precision'} on request with torch "
        f"{torch.__version__} (bf16 also needs macOS 14); antialiased resize {resize}"
        + (f"; {_gib(memory)} recommended for the GPU" if memory else ""))


def _check_cpu(out) -> None:
    import torch

    from promptseg.device import dtype_name, native_cpu_bf16

    cores = os.cpu_count() or 1
    out(OK if torch.get_num_threads() <= cores else WARN, "torch threads",
        f"{torch.get_num_threads()} for {cores} CPU core(s); one model call runs at a time per loaded model "
        "(set OMP_NUM_THREADS to cores / processes when several processes share the machine)")
    native = native_cpu_bf16()
    for dtype in (torch.bfloat16, torch.float16):
        try:
            (torch.ones(4, 4, dtype=dtype) @ torch.ones(4, 4, dtype=dtype)).sum().item()
            speed = f"native ({native})" if dtype == torch.bfloat16 and native else "emulated, slower than fp32"
            out(OK, f"{dtype_name(dtype)} on CPU", f"runs, {speed}")
        except RuntimeError as exc:
            out(WARN, f"{dtype_name(dtype)} on CPU", str(exc).splitlines()[0])
    available = _available_host_memory()
    if available is not None:
        out(OK if available >= 8 * 1024**3 else WARN, "host memory",
            f"{_gib(available)} available (SAM 3's weights take 3.2 GiB in fp32, 1.6 GiB in bf16; the embedding "
            "cache up to 2 GiB more)")


def _available_host_memory() -> int | None:
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        try:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None


def _check_model(model: str | None, out) -> bool:
    """Check the model `segment` would load; False when it cannot load as given (missing or
    incomplete local files, an impossible hub id). A hub model that is not reachable yet only
    warns: it downloads once the licence is accepted and the hub is reachable."""
    from promptseg.segmenter import default_model

    model = model or default_model()
    path = Path(model).expanduser()
    if path.exists() or model.startswith((".", "/", "~")):
        return _check_local_model(path, out)
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(model, "config.json")
    except ValueError as exc:  # not a valid repo id, and no such file or folder either
        out(FAIL, "model", f"{model} is neither an existing file or folder nor a hub id ({exc}). "
            "Pass a model folder, a sam3.pt file, or a hub id such as facebook/sam3")
        return False
    if isinstance(cached, str):
        out(OK, "model", f"{model} is in the Hugging Face cache")
        return True
    if hub_offline():
        out(WARN, "model", f"{model} is not cached and HF_HUB_OFFLINE is set")
        return True
    from huggingface_hub import HfApi

    try:
        HfApi().model_info(model, timeout=10)
        out(OK, "model", f"{model} is reachable on the hub (downloaded on first use)")
    except Exception as exc:  # gated, unauthorised, offline: all mean "not usable yet"
        out(WARN, "model", f"{model} is not reachable ({exc.__class__.__name__}). SAM 3 weights are gated: "
            "accept the licence on its hub page and run `hf auth login`, or pass --model DIR")
    return True


def _check_local_model(path: Path, out) -> bool:
    """A local model: a save_pretrained folder (config + weights) or Meta's sam3.pt (file or folder)."""
    from promptseg.backends.sam3_hf import _check_local_dir
    from promptseg.errors import ModelLoadError

    if not path.exists():
        out(FAIL, "model", f"no file or folder at {path}. Pass a folder written by Sam3Model.save_pretrained "
            "(config.json + model.safetensors), a sam3.pt file, or a hub id such as facebook/sam3")
        return False
    meta_folder = (path / "sam3.pt").is_file() and not (path / "config.json").exists()
    if path.is_file() or meta_folder:
        checkpoint = path / "sam3.pt" if meta_folder else path
        if checkpoint.suffix not in (".pt", ".pth"):
            out(FAIL, "model", f"{checkpoint} is a file but not a .pt checkpoint. Pass a sam3.pt file, "
                "a folder written by Sam3Model.save_pretrained, or a hub id such as facebook/sam3")
            return False
        out(OK, "model", f"{checkpoint} is a checkpoint for the sam3-meta backend")
        return True
    try:
        _check_local_dir(path)
    except ModelLoadError as exc:
        out(FAIL, "model", str(exc))
        return False
    out(OK, "model", f"{path} has a config and weights")
    return True


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
