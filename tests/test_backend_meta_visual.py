"""Visual prompts on the ``sam3-meta`` backend: the tracker's SAM heads of Meta's ``sam3`` package.

The tiny checkpoint is written in the official ``sam3.pt`` layout (``detector.*`` and ``tracker.*``)
and loaded through the backend's strict loader on the CPU. The reference is Meta's own
"instance interactive" image pipeline: the image model with a ``SAM3InteractiveImagePredictor``
(as ``build_sam3_image_model(enable_inst_interactivity=True)`` makes it), loaded by Meta's
``_load_checkpoint``, ``Sam3Processor.set_image`` and ``Sam3Image.predict_inst``, run under the
backend's `DeviceRedirect` (the unmodified package does not run on a CPU otherwise).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import sam3  # noqa: F401  (the meta extra; CI installs it)
from test_visual_prompts import PROMPT_CASES, PROMPT_IDS, assert_same_as_reference, drop_tracker_levels

import promptseg
from promptseg.errors import ModelLoadError


@pytest.fixture(scope="module")
def meta_visual_checkpoint(tmp_path_factory):
    from promptseg.testing import make_random_meta_sam3

    return make_random_meta_sam3(tmp_path_factory.mktemp("models") / "tiny-meta")


@pytest.fixture(scope="module")
def detector_only_checkpoint(tmp_path_factory):
    from promptseg.testing import make_random_meta_sam3

    return make_random_meta_sam3(tmp_path_factory.mktemp("models") / "tiny-meta-detector", tracker=False)


@pytest.fixture
def meta_segmenter(meta_visual_checkpoint, tmp_path):
    return promptseg.load_segmenter(str(meta_visual_checkpoint), device="cpu", cache_dir=tmp_path / "cache")


@pytest.fixture(scope="module")
def meta_reference(meta_visual_checkpoint):
    """Meta's image model with its interactive predictor, loaded by Meta's own (non-strict) loader.

    Meta's builder hard-codes the released size; this composes the same classes at the tiny size
    (`build_image_model`, `build_tracker`) and sets the predictor's feature sizes, which Meta
    hard-codes for 1008 pixels. Holes are not filled (``max_hole_area=0``): hole filling is
    post-processing of Meta's predictor, and promptseg's post-processing is its own stage.
    """
    from sam3.model.sam1_task_predictor import SAM3InteractiveImagePredictor
    from sam3.model_builder import _load_checkpoint

    from promptseg.backends.meta.device import DeviceRedirect
    from promptseg.backends.meta.model import build_image_model, build_tracker, read_architecture
    from promptseg.tokenizer import open_clip_vocab_path

    arch = read_architecture(meta_visual_checkpoint)
    model = build_image_model(arch, open_clip_vocab_path())
    predictor = SAM3InteractiveImagePredictor(build_tracker(arch), max_hole_area=0.0)
    grid = arch.image_size // arch.patch_size
    predictor._bb_feat_sizes = [(grid * 4, grid * 4), (grid * 2, grid * 2), (grid, grid)]
    model.inst_interactive_predictor = predictor
    with DeviceRedirect("cpu"):
        _load_checkpoint(model, str(meta_visual_checkpoint))
    return model.eval(), arch


def reference_pipeline(meta_reference, rgb, points=None, labels=None, box=None, mask=None, multimask=True):
    """Mask logits at the image's size and predicted IoUs from Meta's ``predict_inst``.

    A mask prompt is resized to the prompt encoder's mask size the way Meta's tracker resizes one
    (``Sam3TrackerBase._forward_sam_heads``): ``predict`` itself takes it already at that size.
    """
    from sam3.model.sam3_image_processor import Sam3Processor

    from promptseg.backends.meta.device import DeviceRedirect

    model, arch = meta_reference
    mask_input = None
    if mask is not None:
        size = model.inst_interactive_predictor.model.sam_prompt_encoder.mask_input_size
        full = torch.from_numpy(mask.astype(np.float32))[None, None]
        mask_input = F.interpolate(full, size=size, mode="bilinear", align_corners=False, antialias=True)[0].numpy()
    with DeviceRedirect("cpu"), torch.inference_mode():
        state = Sam3Processor(model, resolution=arch.image_size, device="cpu").set_image(Image.fromarray(rgb))
        logits, ious, _ = model.predict_inst(
            state, point_coords=None if points is None else np.array(points, dtype=np.float32),
            point_labels=None if labels is None else np.array(labels), box=None if box is None else np.array(box),
            mask_input=mask_input, multimask_output=multimask, return_logits=True, normalize_coords=True,
        )
    return torch.from_numpy(logits), torch.from_numpy(ious)


# -- loading -------------------------------------------------------------------------------------

def test_checkpoint_holds_the_tracker_in_the_official_layout_and_every_tensor_loads(
    meta_visual_checkpoint, meta_reference
):
    from promptseg.backends import meta

    state = torch.load(meta_visual_checkpoint, weights_only=True)
    assert {key.split(".")[0] for key in state} == {"detector", "tracker"}
    backend = meta.load(str(meta_visual_checkpoint), device="cpu")
    assert backend.visual_prompts
    tracker = backend.tracker.state_dict()
    held = {k[len("tracker."):]: v for k, v in state.items() if k.startswith("tracker.")}
    assert held.keys() == tracker.keys()
    assert all(torch.equal(tracker[k], v) for k, v in held.items())
    # Meta's own loader put the same tensors in its predictor: the reference runs these weights
    reference = meta_reference[0].inst_interactive_predictor.model.state_dict()
    assert all(torch.equal(reference[k], v) for k, v in held.items())
    loaded = backend.model.state_dict()  # the SAM 2 neck stays: it feeds the tracker
    assert any(".sam2_convs." in k for k in loaded)
    assert all(torch.equal(loaded[k[len("detector."):]], v) for k, v in state.items() if k.startswith("detector."))


def test_released_tracker_matches_metas_own_builder_key_for_key():
    """`build_tracker` at the released size has exactly the keys and shapes of Meta's
    ``build_tracker`` (``tracker.*`` in sam3.pt), so the official checkpoint loads strictly."""
    from sam3.model_builder import build_tracker as metas_build_tracker

    from promptseg.backends.meta.device import DeviceRedirect
    from promptseg.backends.meta.model import Architecture, build_tracker

    with DeviceRedirect("cpu"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "CUDA is not available ... Disabling autocast": its bf16 autocast
        reference = metas_build_tracker(apply_temporal_disambiguation=False)
    expected = {k: v.shape for k, v in reference.state_dict().items()}
    assert {k: v.shape for k, v in build_tracker(Architecture()).state_dict().items()} == expected


@pytest.mark.parametrize("what", ["missing", "extra", "shape"])
def test_tracker_with_wrong_keys_is_refused(meta_visual_checkpoint, tmp_path, what):
    from promptseg.backends import meta
    from promptseg.backends.meta.model import arch_path

    state = torch.load(meta_visual_checkpoint, weights_only=True)
    name = "tracker.sam_mask_decoder.iou_token.weight"
    if what == "missing":
        del state[name]
    elif what == "extra":
        state["tracker.sam_mask_decoder.surplus.weight"] = torch.zeros(3)
    else:
        state[name] = torch.zeros(3, 3)
    path = tmp_path / "edited.pt"
    torch.save(state, path)
    arch_path(path).write_bytes(arch_path(meta_visual_checkpoint).read_bytes())
    expected = {"missing": "missing keys", "extra": "unexpected keys", "shape": "shape mismatches"}[what]
    with pytest.raises(ModelLoadError, match=f"tracker .*{expected}: tracker.sam_mask_decoder.*official sam3.pt"):
        meta.load(str(path), device="cpu")


def test_detector_only_checkpoint_has_no_visual_prompts(detector_only_checkpoint, rgb_image, tmp_path):
    state = torch.load(detector_only_checkpoint, weights_only=True)
    assert state and all(key.startswith("detector.") for key in state)
    seg = promptseg.load_segmenter(str(detector_only_checkpoint), device="cpu", cache_dir=tmp_path / "cache")
    assert seg.backend.tracker is None and not seg.supports_visual_prompts
    with pytest.raises(ModelLoadError, match="tracker.*facebook/sam3"):
        seg.require_visual_prompts()
    with pytest.raises(ModelLoadError, match="tracker.*facebook/sam3"):
        seg.segment_object(rgb_image, points=[(60, 50)])
    with pytest.raises(ModelLoadError, match="detector.\\* tensors only.*official sam3.pt"):
        seg.backend.decode_object({}, torch.zeros(1, 2), torch.ones(1), None, None, True)
    assert seg.stats.image_encoder_runs == 0
    features, _ = seg.embed(rgb_image)  # text prompts only: no SAM 2 neck levels are computed or cached
    assert sorted(features) == ["fpn_0", "fpn_1", "fpn_2"]
    assert len(seg.segment(rgb_image, "red square", threshold=0.0)) > 0


# -- parity with Meta's interactive predictor ---------------------------------------------------

@pytest.mark.parametrize("prompt", PROMPT_CASES, ids=PROMPT_IDS)
@pytest.mark.parametrize("multimask", [True, False])
def test_masks_equal_metas_interactive_predictor(meta_segmenter, meta_reference, rgb_image, prompt, multimask):
    result = meta_segmenter.segment_object(
        rgb_image, points=prompt.get("points"), point_labels=prompt.get("labels"), box=prompt.get("box"),
        multimask=multimask,
    )
    logits, ious = reference_pipeline(meta_reference, rgb_image, prompt.get("points"), prompt.get("labels"),
                                      prompt.get("box"), multimask=multimask)
    assert len(result.instances) == 1 and len(result.alternatives) == (2 if multimask else 0)
    assert_same_as_reference(result, logits, ious)


def test_mask_prompt_equals_metas_interactive_predictor(meta_segmenter, meta_reference, rgb_image):
    previous = meta_segmenter.segment(rgb_image, "red square", threshold=0.0)[0]
    full = previous.full_mask(*rgb_image.shape[:2])
    for mask in (previous, full):  # an Instance, or a boolean array
        result = meta_segmenter.segment_object(rgb_image, points=[(60, 50)], point_labels=[1], mask=mask,
                                               multimask=True)
        logits, ious = reference_pipeline(meta_reference, rgb_image, [[60.0, 50.0]], [1], mask=full)
        assert_same_as_reference(result, logits, ious)
    alone = meta_segmenter.segment_object(rgb_image, mask=full, multimask=False)
    logits, ious = reference_pipeline(meta_reference, rgb_image, mask=full, multimask=False)
    assert_same_as_reference(alone, logits, ious)


def test_prompts_change_the_answer(meta_segmenter, rgb_image):
    """The parity above is not two constant answers: each prompt gives its own IoUs and logits."""
    features, _ = meta_segmenter.embed(rgb_image)
    decode, point = meta_segmenter.backend.decode_object, torch.tensor([[30.0, 40.0]])
    answers = [
        decode(features, point, torch.tensor([1]), None, None, True),
        decode(features, point, torch.tensor([0]), None, None, True),
        decode(features, None, None, torch.tensor([10.0, 10.0, 60.0, 90.0]), None, True),
    ]
    for i in range(len(answers)):
        for j in range(i + 1, len(answers)):
            assert not torch.allclose(answers[i][0], answers[j][0], atol=1e-6, rtol=0), (i, j)


# -- one trunk run per image ----------------------------------------------------------------------

def test_text_then_clicks_then_a_box_run_the_image_trunk_once(meta_visual_checkpoint, tmp_path, rgb_image):
    def session():
        return promptseg.load_segmenter(str(meta_visual_checkpoint), device="cpu", cache_dir=tmp_path / "shared")

    trunk_runs = []

    def count_trunk_runs(segmenter):  # the one ViT trunk both necks read
        segmenter.backend.model.backbone.vision_backbone.trunk.register_forward_hook(lambda *_: trunk_runs.append(1))
        return segmenter

    seg = count_trunk_runs(session())
    seg.segment(rgb_image, ["cat", "red square"], threshold=0.0)
    clicks = [(60, 50), (150, 80), (30, 100), (100, 20), (190, 110)]
    for i in range(1, len(clicks) + 1):  # each click adds one point, as an annotator does
        result = seg.segment_object(rgb_image, points=clicks[:i], point_labels=[1, 0, 1, 0, 1][:i])
        assert result.embedding_source == "memory"
    seg.segment_object(rgb_image, box=(40, 30, 110, 80))
    assert seg.stats.image_encoder_runs == 1 and len(trunk_runs) == 1

    later = count_trunk_runs(session())  # another process sharing the disk cache
    first = later.segment_object(rgb_image, points=[(60, 50)])
    assert first.embedding_source == "disk"
    later.segment(rgb_image, "cat", threshold=0.0)
    later.segment_object(rgb_image, box=(40, 30, 110, 80))
    assert later.stats.image_encoder_runs == 0 and len(trunk_runs) == 1
    again = seg.segment_object(rgb_image, points=[(60, 50)])  # exact: the same tensors decoded by the same code
    assert again.instances[0].box == first.instances[0].box
    assert np.array_equal(again.instances[0].mask, first.instances[0].mask)


def test_embedding_spec_holds_the_tracker_levels(meta_visual_checkpoint, rgb_image):
    for dtype in ("fp32", "bf16"):
        seg = promptseg.load_segmenter(str(meta_visual_checkpoint), device="cpu", cache_dir=False, dtype=dtype)
        features = seg.backend.encode_image(seg.backend.preprocess(rgb_image))
        assert {"tracker_0", "tracker_1", "tracker_2"} <= set(features)
        assert {name: (tuple(t.shape), t.dtype) for name, t in features.items()} == seg.backend.embedding_spec(
            rgb_image.shape[:2])


def test_disk_entry_without_the_tracker_levels_is_recomputed(meta_visual_checkpoint, tmp_path, rgb_image):
    """An entry written for text prompts alone (no ``tracker_i``) fails the spec check and is recomputed."""
    cache = tmp_path / "shared"
    seg = promptseg.load_segmenter(str(meta_visual_checkpoint), device="cpu", cache_dir=cache)
    seg.segment(rgb_image, "cat", threshold=0.0)
    drop_tracker_levels(seg)
    later = promptseg.load_segmenter(str(meta_visual_checkpoint), device="cpu", cache_dir=cache)
    result = later.segment_object(rgb_image, points=[(60, 50)])
    assert result.embedding_source == "computed" and later.stats.image_encoder_runs == 1


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_low_precision_visual_prompts_match_fp32(meta_visual_checkpoint, rgb_image, dtype):
    """Same tolerances as text prompts (tests/tolerance.py LOW_PRECISION): predicted IoUs like scores,
    mask probabilities, and the share of mask pixels on the same side of the cut."""
    from tolerance import LOW_PRECISION

    score_tol, mask_tol, _, agreement = LOW_PRECISION[dtype]
    answers = []
    for precision in ("fp32", dtype):
        seg = promptseg.load_segmenter(str(meta_visual_checkpoint), device="cpu", cache_dir=False, dtype=precision)
        features, _ = seg.embed(rgb_image)
        assert features["tracker_2"].dtype == seg.dtype
        decode = seg.backend.decode_object
        mask = torch.zeros(rgb_image.shape[:2])
        mask[30:80, 40:110] = 1
        answers.append([
            decode(features, torch.tensor([[40.0, 60.0], [90.0, 20.0]]), torch.tensor([1, 0]), None, None, True),
            decode(features, None, None, torch.tensor([20.0, 30.0, 60.0, 90.0]), mask, False),
        ])
    for (ref_logits, ref_ious), (low_logits, low_ious) in zip(*answers):
        assert torch.isfinite(low_logits).all() and low_logits.shape == ref_logits.shape
        torch.testing.assert_close(low_ious, ref_ious, atol=score_tol, rtol=0)
        torch.testing.assert_close(low_logits.sigmoid(), ref_logits.sigmoid(), atol=mask_tol, rtol=0)
        same = ((ref_logits > 0) == (low_logits > 0)).float().mean().item()
        assert same >= agreement, f"{dtype}: only {same:.4f} of mask pixels agree with fp32"
