"""Both SAM 3 backends put every tensor on the device they are loaded on, caches included.

No GPU is needed: the `meta` device stands in for CUDA or MPS. Each backend is loaded through its
real loader with ``device="meta"``, so its own device move runs (``Module.to`` plus
`promptseg.placement.move_plain_tensors`), and `stray_tensors` must then find nothing on the CPU:
a parameter, a buffer, or a plain tensor attribute such as Meta's coordinate and position caches,
which ``Module.to`` does not move and a GPU decode would mix with its own tensors. Apple MPS
limits (autocast and the antialiased resize by torch version) are simulated by patching
`promptseg.device.torch_version`.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

import sam3  # noqa: F401  (the meta extra; CI installs it)

import promptseg.device
from promptseg.backends import meta, sam3_hf
from promptseg.backends.sam3_hf_video import load_video_model
from promptseg.errors import OptionError
from promptseg.placement import stray_tensors

META = torch.device("meta")


@pytest.fixture(scope="module")
def meta_checkpoint(tmp_path_factory):
    """A tiny ``sam3.pt`` in the official layout, with the tracker (visual prompts)."""
    from promptseg.testing import make_random_meta_sam3

    return make_random_meta_sam3(tmp_path_factory.mktemp("models") / "tiny-meta")


def image_inputs():
    """Visual prompts in the model input's pixels: a click and a box, and a mask prompt of the image."""
    mask = torch.zeros(60, 80)
    mask[10:30, 20:50] = 1
    return torch.tensor([[30.0, 40.0]]), torch.tensor([1]), torch.tensor([10.0, 20.0, 70.0, 90.0]), mask


# -- every tensor on the device --------------------------------------------------------------------

def test_transformers_backend_and_its_tracker_leave_nothing_on_the_cpu(tiny_sam3_hub_dir):
    backend = sam3_hf.load(str(tiny_sam3_hub_dir), device="meta")
    assert backend.tracker is not None  # the hub layout: the tracker head is loaded too
    assert stray_tensors(backend.model, META) == []
    assert stray_tensors(backend.tracker, META) == []


def test_transformers_video_model_leaves_nothing_on_the_cpu(tiny_sam3_hub_dir):
    backend = sam3_hf.load(str(tiny_sam3_hub_dir), device="meta")
    video = load_video_model(backend, backend.directory)
    assert stray_tensors(video, META) == []


def test_transformers_video_model_on_the_cpu_keeps_nothing_of_its_meta_skeleton(tiny_sam3_hub_dir):
    """The video model is built on the meta device and its parts replaced by loaded ones: none of the
    skeleton's tensors may survive, attributes included."""
    backend = sam3_hf.load(str(tiny_sam3_hub_dir), device="cpu")
    assert stray_tensors(load_video_model(backend, backend.directory), "cpu") == []


def test_meta_backend_and_its_tracker_leave_nothing_on_the_cpu(meta_checkpoint):
    backend = meta.load(str(meta_checkpoint), device="meta")
    assert backend.tracker is not None
    assert stray_tensors(backend.model, META) == []
    assert stray_tensors(backend.tracker, META) == []


def test_a_plain_move_of_metas_model_leaves_its_caches_behind(meta_checkpoint):
    """What the check above guards against: ``Module.to`` alone leaves the detector's box coordinates,
    the necks' position encodings and the tracker's rotary frequencies on the CPU."""
    from promptseg.backends.meta.model import load_image_model
    from promptseg.tokenizer import open_clip_vocab_path

    model, tracker, _ = load_image_model(meta_checkpoint, open_clip_vocab_path())
    model_strays = " ".join(stray_tensors(model.to(META), META))
    tracker_strays = " ".join(stray_tensors(tracker.to(META), META))
    assert "attribute transformer.decoder.compilable_cord_cache[0] on cpu" in model_strays
    assert "attribute backbone.vision_backbone.position_encoding.cache[" in model_strays
    assert "freqs_cis on cpu" in tracker_strays
    assert "attribute maskmem_backbone.position_encoding.cache[" in tracker_strays


def test_meta_backend_encodes_and_answers_visual_prompts_on_the_device(meta_checkpoint):
    """Preprocessing, the image encoder, the text encoder and the visual prompt decoder run wholly on the
    device (the meta device computes shapes only, and refuses to mix with CPU tensors)."""
    backend = meta.load(str(meta_checkpoint), device="meta")
    pixels = backend.preprocess(np.zeros((60, 80, 3), np.uint8))
    assert pixels.device == META and tuple(pixels.shape[-2:]) == backend.input_size
    embedding = backend.encode_image(pixels)
    assert {t.device for t in embedding.values()} == {META}
    assert {name: tuple(t.shape) for name, t in embedding.items()} == {
        name: shape for name, (shape, _) in backend.embedding_spec((60, 80)).items()
    }
    assert backend.encode_text(["cell"])[0]["features"].device == META
    points, labels, box, mask = image_inputs()
    logits, ious = backend.decode_object(embedding, points, labels, box, mask, True)
    assert logits.device == ious.device == META and logits.shape[0] == ious.shape[0] == 3


# -- autocast only below fp32 ------------------------------------------------------------------------

def test_fp32_meta_backend_never_constructs_autocast(meta_checkpoint, monkeypatch, rgb_image):
    """A disabled ``torch.autocast`` still fails where torch has no autocast for the device (MPS before
    torch 2.5), so fp32 must not construct one at all."""
    fp32 = meta.load(str(meta_checkpoint), device="cpu", dtype=torch.float32)
    bf16 = meta.load(str(meta_checkpoint), device="cpu", dtype=torch.bfloat16)

    def no_autocast(*args, **kwargs):
        raise AssertionError(f"torch.autocast{args} constructed")

    monkeypatch.setattr(torch, "autocast", no_autocast)
    embedding = fp32.encode_image(fp32.preprocess(rgb_image))
    texts = fp32.encode_text(["red square"])
    assert fp32.decode(embedding, texts, 0.0)[0].scores.numel() > 0
    boxes = torch.tensor([[0.2, 0.25, 0.55, 0.66]])
    assert fp32.decode(embedding, texts, 0.0, boxes=boxes, box_labels=torch.tensor([1]))[0].scores.numel() > 0
    points, labels, box, mask = image_inputs()
    logits, _ = fp32.decode_object(embedding, points, labels, box, mask, False)
    assert torch.isfinite(logits).all()
    with pytest.raises(AssertionError, match="torch.autocast"):  # the patch is in force: bf16 constructs one
        bf16.encode_text(["red square"])


# -- Apple MPS, simulated ------------------------------------------------------------------------------

def _is_mps(value) -> bool:
    return (isinstance(value, torch.device) and value.type == "mps") or value == "mps"


class MpsOnMeta(TorchFunctionMode):
    """Tensors sent to "mps" go to the meta device, so a backend loaded for MPS runs here; and it records
    the device of every antialiased resize (``F.interpolate(..., antialias=True)``, which torchvision's
    resize calls too)."""

    def __init__(self) -> None:
        super().__init__()
        self.antialiased_on: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.device:  # the backend keeps its device named "mps"
            return func(*args, **kwargs)
        if func is F.interpolate and kwargs.get("antialias"):
            self.antialiased_on.append(args[0].device.type)
        args = tuple(META if _is_mps(a) else a for a in args)
        kwargs = {k: META if _is_mps(v) else v for k, v in kwargs.items()}
        return func(*args, **kwargs)


def run_on_simulated_mps(checkpoint, dtype=torch.float32) -> MpsOnMeta:
    """Load the Meta backend for MPS, preprocess an image, encode it and answer a mask prompt."""
    with MpsOnMeta() as mps:
        backend = meta.load(str(checkpoint), device="mps", dtype=dtype)
        assert backend.device.type == "mps"
        embedding = backend.encode_image(backend.preprocess(np.zeros((60, 80, 3), np.uint8)))
        points, labels, box, mask = image_inputs()
        backend.decode_object(embedding, points, labels, None, mask, False)
    return mps


@pytest.mark.parametrize(("version", "where"), [((2, 6), "cpu"), ((2, 7), "meta")])
def test_antialiased_resizes_run_on_the_cpu_for_mps_before_torch_2_7(meta_checkpoint, monkeypatch, version, where):
    """The image resize and the mask prompt's resize: on the CPU where MPS lacks the op, else on the device."""
    monkeypatch.setattr(promptseg.device, "torch_version", lambda: version)
    assert run_on_simulated_mps(meta_checkpoint).antialiased_on == [where, where]


def test_bf16_on_mps_with_a_torch_too_old_is_refused_with_the_fix(meta_checkpoint, monkeypatch):
    monkeypatch.setattr(promptseg.device, "torch_version", lambda: (2, 5))
    with pytest.raises(OptionError, match=r"bf16 on Apple MPS needs torch 2\.6 or newer.*dtype='fp32'"):
        run_on_simulated_mps(meta_checkpoint, torch.bfloat16)
