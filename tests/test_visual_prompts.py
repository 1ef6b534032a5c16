"""Visual prompts (`Segmenter.segment_object`): SAM 3's tracker head on the hub-layout checkpoint,
one trunk in memory and one trunk run per image for text and clicks, parity with transformers'
own tracker pipeline, and clear errors for bad prompts or a checkpoint without the tracker."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import promptseg
from promptseg.errors import ModelLoadError, OptionError
from tolerance import FLOAT_ATOL, assert_mask_agrees


@pytest.fixture
def hub_segmenter(tiny_sam3_hub_dir, tmp_path):
    return promptseg.load_segmenter(str(tiny_sam3_hub_dir), device="cpu", cache_dir=tmp_path / "cache")


def test_tracker_and_detector_hold_one_trunk(hub_segmenter):
    detector, tracker = hub_segmenter.backend.model, hub_segmenter.backend.tracker
    trunk = {p.data_ptr() for p in detector.vision_encoder.backbone.parameters()}
    assert {p.data_ptr() for p in tracker.vision_encoder.backbone.parameters()} == trunk
    shared = {p.data_ptr() for p in tracker.parameters()} & {p.data_ptr() for p in detector.parameters()}
    assert shared == trunk  # the trunk and nothing else: the tracker's neck and heads are its own
    held = {p.data_ptr(): p.numel() for m in (detector, tracker) for p in m.parameters()}
    trunk_size = sum(p.numel() for p in detector.vision_encoder.backbone.parameters())
    apart = sum(p.numel() for p in detector.parameters()) + sum(p.numel() for p in tracker.parameters())
    assert sum(held.values()) == apart - trunk_size


def test_every_tracker_weight_of_the_checkpoint_is_loaded(tiny_sam3_hub_dir, hub_segmenter):
    tracker = hub_segmenter.backend.tracker.state_dict()
    with safe_open(str(tiny_sam3_hub_dir / "model.safetensors"), "pt") as handle:
        for name in handle.keys():
            if name.startswith("tracker_neck."):
                assert torch.equal(tracker["vision_encoder.neck." + name[len("tracker_neck."):]], handle.get_tensor(name))
            own = name[len("tracker_model."):]
            if name.startswith("tracker_model.") and own in tracker:
                assert torch.equal(tracker[own], handle.get_tensor(name))


def test_missing_tracker_weight_is_a_load_error(tiny_sam3_hub_dir, tmp_path):
    model_dir = shutil.copytree(tiny_sam3_hub_dir, tmp_path / "partial")
    weights = load_file(model_dir / "model.safetensors")
    del weights["tracker_model.mask_decoder.iou_token.weight"]
    save_file(weights, model_dir / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match="lacks tracker weights.*mask_decoder.iou_token.weight"):
        promptseg.load_segmenter(str(model_dir), device="cpu", cache_dir=False)


def test_detector_only_checkpoint_names_the_full_checkpoint(make_segmenter, hub_segmenter, rgb_image):
    seg = make_segmenter()
    assert not seg.supports_visual_prompts and hub_segmenter.supports_visual_prompts
    hub_segmenter.require_visual_prompts()  # a model with the head passes
    with pytest.raises(ModelLoadError, match="facebook/sam3"):
        seg.require_visual_prompts()
    with pytest.raises(ModelLoadError, match="facebook/sam3"):
        seg.segment_object(rgb_image, points=[(60, 50)])
    assert seg.stats.image_encoder_runs == 0
    assert len(seg.segment(rgb_image, "cat", threshold=0.0)) > 0  # text prompts still work


def reference_pipeline(model_dir, rgb, points=None, labels=None, box=None, mask=None, multimask=True,
                       zero_no_memory=False):
    """transformers' own tracker pipeline: processor, model forward (with its own trunk), post-processing.

    transformers' ``Sam3TrackerModel.forward`` adds the "no memory" embedding to its vision encoder's
    fourth FPN level, which the mask decoder never reads; Meta's SAM 3 predictor and transformers'
    video tracker add it to the level the decoder reads. The reference does the same, through the
    model's own ``get_image_embeddings``; with `zero_no_memory` (the embedding zeroed, so the two
    agree) it is the unmodified full forward on pixel values.
    """
    from transformers import Sam3ImageProcessor, Sam3TrackerModel, Sam3TrackerProcessor

    model = Sam3TrackerModel.from_pretrained(model_dir).eval()
    size = model.config.image_size
    processor = Sam3TrackerProcessor(image_processor=Sam3ImageProcessor(size={"height": size, "width": size}))
    inputs = processor(
        images=rgb, input_points=None if points is None else [[points]],
        input_labels=None if labels is None else [[labels]], input_boxes=None if box is None else [[box]],
        return_tensors="pt",
    )
    original_sizes = inputs.pop("original_sizes")
    if mask is not None:
        inputs["input_masks"] = torch.from_numpy(mask.astype(np.float32))[None, None]
    with torch.inference_mode():
        if zero_no_memory:
            model.no_memory_embedding.zero_()
        else:
            embeddings = model.get_image_embeddings(inputs.pop("pixel_values"))
            embeddings[-1] = embeddings[-1] + model.no_memory_embedding.view(1, -1, 1, 1)
            inputs["image_embeddings"] = embeddings
        out = model(**inputs, multimask_output=multimask)
    logits = processor.post_process_masks(out.pred_masks, original_sizes, binarize=False)[0][0]
    return logits.float(), out.iou_scores[0, 0].float()


def assert_same_as_reference(result, logits, ious):
    order = torch.argsort(ious, descending=True)
    candidates = result.instances + result.alternatives
    assert len(candidates) == len(order)  # random weights: no candidate is empty
    height, width = result.image_size
    for got, index in zip(candidates, order.tolist()):
        assert got.score == pytest.approx(float(ious[index]), abs=FLOAT_ATOL)
        probs = torch.sigmoid(logits[index]).numpy()
        assert_mask_agrees(got.full_mask(height, width), logits[index].numpy() > 0, probs)


PROMPT_CASES = [
    dict(points=[[60.0, 50.0]], labels=[1]),
    dict(points=[[60.0, 50.0], [150.0, 80.0], [30.0, 100.0]], labels=[1, 0, 1]),
    dict(box=[40.0, 30.0, 110.0, 80.0]),
    dict(points=[[150.0, 80.0]], labels=[1], box=[130.0, 60.0, 180.0, 100.0]),
]
"""Visual prompts on the 200x120 test image that every parity test runs (both backends)."""
PROMPT_IDS = ["one-point", "three-points", "box", "point-and-box"]


@pytest.mark.parametrize("prompt", PROMPT_CASES, ids=PROMPT_IDS)
@pytest.mark.parametrize("multimask", [True, False])
def test_masks_equal_the_transformers_tracker_pipeline(tiny_sam3_hub_dir, hub_segmenter, rgb_image, prompt, multimask):
    result = hub_segmenter.segment_object(
        rgb_image, points=prompt.get("points"), point_labels=prompt.get("labels"), box=prompt.get("box"),
        multimask=multimask,
    )
    logits, ious = reference_pipeline(tiny_sam3_hub_dir, rgb_image, prompt.get("points"), prompt.get("labels"),
                                      prompt.get("box"), multimask=multimask)
    assert len(result.instances) == 1 and len(result.alternatives) == (2 if multimask else 0)
    assert_same_as_reference(result, logits, ious)


def test_masks_equal_the_unmodified_full_forward_when_no_memory_is_zero(tiny_sam3_hub_dir, hub_segmenter, rgb_image):
    assert hub_segmenter.backend.tracker.no_memory_embedding.abs().max() > 0  # the test model's is not zero
    with torch.no_grad():
        hub_segmenter.backend.tracker.no_memory_embedding.zero_()
    points, labels, box = [[60.0, 50.0], [150.0, 80.0]], [1, 0], [40.0, 30.0, 110.0, 80.0]
    result = hub_segmenter.segment_object(rgb_image, points=points, point_labels=labels, box=box, multimask=True)
    logits, ious = reference_pipeline(tiny_sam3_hub_dir, rgb_image, points, labels, box, zero_no_memory=True)
    assert_same_as_reference(result, logits, ious)


def test_mask_prompt_equals_the_transformers_tracker_pipeline(tiny_sam3_hub_dir, hub_segmenter, rgb_image):
    previous = hub_segmenter.segment(rgb_image, "red square", threshold=0.0)[0]
    full = previous.full_mask(*rgb_image.shape[:2])
    for mask in (previous, full):  # an Instance, or a boolean array
        result = hub_segmenter.segment_object(rgb_image, points=[(60, 50)], point_labels=[1], mask=mask, multimask=True)
        logits, ious = reference_pipeline(tiny_sam3_hub_dir, rgb_image, [[60.0, 50.0]], [1], mask=full)
        assert_same_as_reference(result, logits, ious)
    alone = hub_segmenter.segment_object(rgb_image, mask=full, multimask=False)
    logits, ious = reference_pipeline(tiny_sam3_hub_dir, rgb_image, mask=full, multimask=False)
    assert_same_as_reference(alone, logits, ious)


def test_text_then_clicks_then_a_box_run_the_image_trunk_once(tiny_sam3_hub_dir, tmp_path, rgb_image):
    def session():
        return promptseg.load_segmenter(str(tiny_sam3_hub_dir), device="cpu", cache_dir=tmp_path / "shared")

    trunk_runs = []

    def count_trunk_runs(segmenter):  # the one ViT trunk module the detector and the tracker share
        segmenter.backend.model.vision_encoder.backbone.register_forward_hook(lambda *_: trunk_runs.append(1))
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
    again = seg.segment_object(rgb_image, points=[(60, 50)])
    assert again.instances[0].box == first.instances[0].box
    assert np.array_equal(again.instances[0].mask, first.instances[0].mask)


def drop_tracker_levels(segmenter) -> None:
    """Rewrite the segmenter's one disk entry as a text-only backend would have written it (no ``tracker_i``)."""
    (path,) = segmenter.cache.disk.files()
    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata()
        detector_only = {n: handle.get_tensor(n) for n in handle.keys() if n.startswith("fpn_")}
    save_file(detector_only, path, metadata={**metadata, "tensor_names": json.dumps(sorted(detector_only))})


def test_disk_entry_without_the_tracker_levels_is_recomputed(tiny_sam3_hub_dir, tmp_path, rgb_image):
    cache = tmp_path / "shared"
    seg = promptseg.load_segmenter(str(tiny_sam3_hub_dir), device="cpu", cache_dir=cache)
    seg.segment(rgb_image, "cat", threshold=0.0)
    drop_tracker_levels(seg)
    later = promptseg.load_segmenter(str(tiny_sam3_hub_dir), device="cpu", cache_dir=cache)
    result = later.segment_object(rgb_image, points=[(60, 50)])
    assert result.embedding_source == "computed" and later.stats.image_encoder_runs == 1


@pytest.mark.parametrize(
    "prompt, words",
    [
        (dict(), "needs a prompt"),
        (dict(point_labels=[1]), "without points"),
        (dict(points=[(1, 2, 3)]), "two numbers per point"),
        (dict(points=[("a", "b")]), "numbers only"),
        (dict(points=[(float("nan"), 3)]), "NaN or infinite"),
        (dict(points=[(10, 10), (20, 20)], point_labels=[1]), "one 1 \\(positive\\) or 0"),
        (dict(points=[(10, 10)], point_labels=[2]), "1 \\(positive\\) or 0 \\(negative\\)"),
        (dict(points=[(500, 10)]), "outside the 200x120 image"),
        (dict(box=(10, 10, 20)), "four numbers"),
        (dict(box=(50, 50, 20, 80)), "empty or reversed"),
        (dict(box=(300, 10, 400, 50)), "does not overlap"),
        (dict(mask=np.zeros((10, 10), bool)), "image's \\(height, width\\)"),
        (dict(mask=np.full((120, 200), 7)), "boolean"),
        (dict(mask="mask.png"), "Instance or a boolean"),
    ],
)
def test_bad_visual_prompts_are_option_errors(hub_segmenter, rgb_image, prompt, words):
    with pytest.raises(OptionError, match=words):
        hub_segmenter.segment_object(rgb_image, **prompt)
    if "mask" not in prompt and "outside" not in words and "overlap" not in words:
        assert hub_segmenter.stats.image_encoder_runs == 0  # checked before any pixel is read


def text_result(segmenter, image):
    return segmenter.segment(image, ["red square", "green square"], threshold=0.0, max_instances=4)


def test_refine_changes_one_instance_in_place_and_keeps_ids(hub_segmenter, rgb_image):
    result = text_result(hub_segmenter, rgb_image)
    before = list(result.instances)
    target = before[1]
    x0, y0, x1, y1 = target.box
    ys, xs = np.nonzero(target.mask)
    cut = (float(x0 + xs[0]), float(y0 + ys[0]))  # a pixel of the object: a negative click there
    expected = hub_segmenter.segment_object(rgb_image, points=[cut], point_labels=[0], mask=target, multimask=False)[0]
    runs = hub_segmenter.stats.image_encoder_runs
    same = hub_segmenter.refine(result, points=[cut], point_labels=[0], image=rgb_image, index=1)
    assert same is result and len(result) == len(before)
    assert all(result.instances[i] is before[i] for i in range(len(before)) if i != 1)
    refined = result.instances[1]
    assert (refined.label, refined.score, refined.phrase) == (target.label, target.score, target.phrase)
    assert refined.box == expected.box and np.array_equal(refined.mask, expected.mask)
    assert refined.extra["refined"] is True
    assert hub_segmenter.stats.image_encoder_runs == runs  # the cached embedding answers the click


def test_refine_picks_the_instance_under_the_first_positive_click(hub_segmenter, rgb_image):
    result = text_result(hub_segmenter, rgb_image)
    labels = result.to_label_image()
    row, col = np.argwhere(labels == 3)[0]  # a pixel where instance 2 is drawn on top
    click = [(float(col), float(row))]
    by_click = hub_segmenter.refine(text_result(hub_segmenter, rgb_image), points=click, image=rgb_image)
    by_index = hub_segmenter.refine(result, points=click, image=rgb_image, index=2)
    assert by_click.instances[2].extra.get("refined") and by_click.instances[2].box == by_index.instances[2].box
    assert not any(inst.extra.get("refined") for i, inst in enumerate(by_click.instances) if i != 2)


def test_refine_with_a_negative_click_cuts_from_the_instance_under_it(hub_segmenter, rgb_image):
    result = text_result(hub_segmenter, rgb_image)
    row, col = np.argwhere(result.to_label_image() == 2)[0]  # a pixel where instance 1 is drawn on top
    click = [(float(col), float(row))]
    count = len(result)
    hub_segmenter.refine(result, points=click, point_labels=[0], image=rgb_image)
    expected = hub_segmenter.refine(text_result(hub_segmenter, rgb_image), points=click, point_labels=[0],
                                    image=rgb_image, index=1)
    assert len(result) == count and result.instances[1].extra.get("refined")
    assert np.array_equal(result.instances[1].mask, expected.instances[1].mask)
    one = hub_segmenter.segment(rgb_image, "red square", threshold=0.0, max_instances=1)
    row, col = np.argwhere(one.to_label_image() == 0)[0]
    with pytest.raises(OptionError, match="Only negative clicks"):
        hub_segmenter.refine(one, points=[(float(col), float(row))], point_labels=[0], image=rgb_image)
    assert len(one) == 1


def test_refine_adds_a_missed_object_for_a_click_on_background(hub_segmenter, rgb_image):
    result = hub_segmenter.segment(rgb_image, "red square", threshold=0.0, max_instances=1)
    row, col = np.argwhere(result.to_label_image() == 0)[0]
    count = len(result)
    hub_segmenter.refine(result, points=[(float(col), float(row))], image=rgb_image)
    alone = hub_segmenter.segment_object(rgb_image, points=[(float(col), float(row))])
    assert len(result) == count + 1 and result.instances[-1].label == "object"
    assert np.array_equal(result.instances[-1].mask, alone[0].mask)


def test_refine_reads_the_image_from_the_result_source(hub_segmenter, rgb_image, tmp_path):
    from PIL import Image

    path = tmp_path / "picture.png"
    Image.fromarray(rgb_image).save(path)
    from_file = text_result(hub_segmenter, str(path))
    in_memory = text_result(hub_segmenter, rgb_image)
    with pytest.raises(OptionError, match="pass image="):
        hub_segmenter.refine(in_memory, points=[(60, 50)], index=0)
    hub_segmenter.refine(from_file, points=[(60, 50)], index=0)
    hub_segmenter.refine(in_memory, points=[(60, 50)], index=0, image=rgb_image)
    assert np.array_equal(from_file[0].mask, in_memory[0].mask)


def test_refine_an_instance_gives_a_new_instance(hub_segmenter, rgb_image):
    original = text_result(hub_segmenter, rgb_image)[0]
    refined = hub_segmenter.refine(original, points=[(60, 50)], point_labels=[1], image=rgb_image)
    expected = hub_segmenter.segment_object(rgb_image, points=[(60, 50)], mask=original, multimask=False)[0]
    assert refined is not original and "refined" not in original.extra
    assert refined.label == original.label and np.array_equal(refined.mask, expected.mask)


@pytest.mark.parametrize(
    "call, words",
    [
        (dict(index=9), "index must be the position"),
        (dict(index="0"), "index must be the position"),
        (dict(target="result"), "SegmentationResult or one of its Instances"),
    ],
)
def test_bad_refine_calls_are_option_errors(hub_segmenter, rgb_image, call, words):
    result = text_result(hub_segmenter, rgb_image)
    target = call.pop("target", result)
    with pytest.raises(OptionError, match=words):
        hub_segmenter.refine(target, points=[(60, 50)], image=rgb_image, **call)
