"""The public API end to end on a tiny random SAM 3 loaded through the real loader."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from tolerance import MASK_EPS, assert_detections_close, assert_results_agree, full_size_probabilities

import promptseg
from promptseg.backends.protocol import Detections
from promptseg.errors import ImageError, OptionError, PromptError
from promptseg.masks import tight_box
from promptseg.results import Instance, SegmentationResult

NO_NMS = {"iou_threshold": None, "cross_prompt_iou": None}


def reference_result(segmenter, rgb: np.ndarray, prompt: str, threshold: float = 0.0):
    """transformers' own pipeline (processor, full forward, post_process_instance_segmentation) as a
    `SegmentationResult`, with the probability map of each of its instances."""
    from transformers import Sam3ImageProcessor

    backend = segmenter.backend
    tokens = backend.tokenizer([prompt], padding="max_length", max_length=32, return_tensors="pt")
    with torch.no_grad():
        out = backend.model(pixel_values=backend.preprocess(rgb), input_ids=tokens["input_ids"],
                            attention_mask=tokens["attention_mask"])
    height, width = rgb.shape[:2]
    processed = Sam3ImageProcessor().post_process_instance_segmentation(
        out, threshold=threshold, mask_threshold=0.5, target_sizes=[(height, width)]
    )[0]
    scores = out.pred_logits[0].sigmoid() * out.presence_logits[0].sigmoid()
    keep = scores > threshold
    kept = Detections(mask_probs=out.pred_masks[0][keep].sigmoid(), boxes=out.pred_boxes[0][keep], scores=scores[keep])
    instances = []
    for mask, score in zip(processed["masks"].bool().numpy(), processed["scores"].tolist()):
        box = tight_box(mask)
        if box is not None:
            x0, y0, x1, y1 = box
            instances.append(Instance(label=prompt, score=score, box=box, mask=mask[y0:y1, x0:x1]))
    instances.sort(key=lambda inst: -inst.score)
    reference = SegmentationResult(instances=instances, image_size=(height, width), prompts=[prompt])
    return reference, full_size_probabilities({prompt: kept}, (height, width))


def test_k_prompts_run_the_image_encoder_once(segmenter, rgb_image):
    result = segmenter.segment(rgb_image, ["cat", "dog", "red car"], threshold=0.0)
    assert segmenter.stats.image_encoder_runs == 1
    assert segmenter.prompt_batch_size == 1  # the CPU's default: one prompt per decoder forward
    assert segmenter.stats.decoder_runs == 3
    assert {inst.label for inst in result} <= {"cat", "dog", "red car"}
    segmenter.segment(rgb_image, "bicycle", threshold=0.0)
    assert segmenter.stats.image_encoder_runs == 1
    assert segmenter.cache.stats.memory_hits == 1


def test_second_segmenter_with_same_cache_dir_skips_the_encoder(make_segmenter, rgb_image, tmp_path):
    first = make_segmenter(cache_dir=tmp_path / "shared")
    first.segment(rgb_image, "cat", threshold=0.0)
    second = make_segmenter(cache_dir=tmp_path / "shared")
    result = second.segment(rgb_image, "dog", threshold=0.0)
    assert second.stats.image_encoder_runs == 0
    assert result.embedding_source == "disk"
    assert second.is_cached(rgb_image)


def test_cached_embedding_gives_the_same_result(make_segmenter, rgb_image, tmp_path):
    fresh = make_segmenter(cache_dir=tmp_path / "c").segment(rgb_image, "cat", threshold=0.0, **NO_NMS)
    cached = make_segmenter(cache_dir=tmp_path / "c").segment(rgb_image, "cat", threshold=0.0, **NO_NMS)
    assert cached.embedding_source == "disk"
    assert [i.box for i in fresh] == [i.box for i in cached]
    # exact: the disk entry holds the computed tensors bit for bit and the same code decodes them (tests/tolerance.py)
    assert all(np.array_equal(a.mask, b.mask) for a, b in zip(fresh, cached))
    assert [i.score for i in fresh] == [i.score for i in cached]


def test_cached_embedding_is_bit_identical_in_value_and_layout(make_segmenter, rgb_image, tmp_path):
    """Why the test above may ask for exact equality: the decoder gets the same tensors, laid out
    alike, whether the embedding was just computed or read back from disk (same code, same input)."""
    computed, origin = make_segmenter(cache_dir=tmp_path / "c").embed(rgb_image)
    read, source = make_segmenter(cache_dir=tmp_path / "c").embed(rgb_image)
    assert (origin, source) == ("computed", "disk")
    assert set(computed) == set(read)
    for name in computed:
        assert torch.equal(computed[name], read[name])
        assert computed[name].stride() == read[name].stride() and computed[name].is_contiguous()


def test_corrupted_cache_file_is_recomputed(make_segmenter, rgb_image, tmp_path, caplog):
    cache_dir = tmp_path / "c"
    make_segmenter(cache_dir=cache_dir).segment(rgb_image, "cat", threshold=0.0)
    (path,) = list(cache_dir.glob("*/*.safetensors"))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # truncated, as after a crash or a full disk
    again = make_segmenter(cache_dir=cache_dir)
    result = again.segment(rgb_image, "cat", threshold=0.0)
    assert again.stats.image_encoder_runs == 1
    assert result.embedding_source == "computed"
    assert "unreadable" in caplog.text
    assert make_segmenter(cache_dir=cache_dir).segment(rgb_image, "cat").embedding_source == "disk"


def test_dtype_change_recomputes_instead_of_failing(make_segmenter, rgb_image, tmp_path):
    make_segmenter(cache_dir=tmp_path / "c").segment(rgb_image, "cat", threshold=0.0)
    bf16 = make_segmenter(cache_dir=tmp_path / "c", dtype="bf16")
    bf16.segment(rgb_image, "cat", threshold=0.0)
    assert bf16.stats.image_encoder_runs == 1
    assert len(list((tmp_path / "c").glob("*/*.safetensors"))) == 2


def test_bf16_on_cpu_runs_close_to_fp32(make_segmenter, rgb_image):
    fp32 = make_segmenter(cache_dir=False).segment(rgb_image, "cat", threshold=0.0, **NO_NMS)
    bf16_seg = make_segmenter(cache_dir=False, dtype="bf16")
    assert bf16_seg.dtype == torch.bfloat16
    bf16 = bf16_seg.segment(rgb_image, "cat", threshold=0.0, **NO_NMS)
    assert len(bf16) > 0
    top32, top16 = max(i.score for i in fp32), max(i.score for i in bf16)
    assert top16 == pytest.approx(top32, abs=0.05)


def test_batched_prompts_equal_one_prompt_at_a_time(make_segmenter, rgb_image):
    """Equal within the tolerance rule (tests/tolerance.py): a batched forward rounds differently."""
    prompts = ["cat", "dog", "red car", "nucleus"]
    batched_seg = make_segmenter(cache_dir=False, prompt_batch_size=8)
    single_seg = make_segmenter(cache_dir=False, prompt_batch_size=1)
    batched = batched_seg.segment(rgb_image, prompts, threshold=0.0, **NO_NMS)
    single = single_seg.segment(rgb_image, prompts, threshold=0.0, **NO_NMS)
    assert (batched_seg.stats.decoder_runs, single_seg.stats.decoder_runs) == (1, len(prompts))
    assert len(single) > len(prompts)
    features, _ = single_seg.embed(rgb_image)
    texts = single_seg.text_embeddings(prompts)
    together = single_seg.backend.decode(features, texts, 0.0)
    alone = [single_seg.backend.decode(features, [text], 0.0)[0] for text in texts]
    assert_detections_close(together, alone)
    assert_results_agree(batched, single, full_size_probabilities(dict(zip(prompts, alone)), rgb_image.shape[:2]))


def test_tolerance_rule_absorbs_near_cut_flips_and_nothing_more(segmenter, rgb_image):
    """What another CPU's rounding does (probabilities a hair lower) passes; a real change fails."""
    from promptseg.masks import instances_from_probs

    features, _ = segmenter.embed(rgb_image)
    [found] = segmenter.backend.decode(features, segmenter.text_embeddings(["cat"]), 0.0)
    size = rgb_image.shape[:2]

    def result_of(shift: float) -> SegmentationResult:
        made = instances_from_probs(found.mask_probs - shift, found.scores, found.boxes, "cat", size)
        return SegmentationResult(sorted(made, key=lambda i: -i.score), size, ["cat"])

    reference, probability = result_of(0.0), full_size_probabilities({"cat": found}, size)
    rounded, changed = result_of(MASK_EPS / 2), result_of(MASK_EPS * 10)
    flipped = sum(np.count_nonzero(a.full_mask(*size) != b.full_mask(*size)) for a, b in zip(rounded, reference))
    assert flipped > 0  # bit equality would fail here...
    assert_results_agree(rounded, reference, probability)  # ...the rule does not
    with pytest.raises(AssertionError, match="differ|one side only"):
        assert_results_agree(changed, reference, probability)


@pytest.mark.parametrize("size", [(120, 200), (211, 97), (37, 500)])
def test_masks_equal_transformers_post_processing(segmenter, size):
    rgb = np.random.default_rng(size[0]).integers(0, 255, (*size, 3), dtype=np.uint8)
    result = segmenter.segment(rgb, "cat", threshold=0.0, **NO_NMS)
    reference, probability = reference_result(segmenter, rgb, "cat")
    assert result.image_size == size and len(reference) > 0
    assert_results_agree(result, reference, probability)


def test_exif_rotated_file_is_segmented_upright(segmenter, rgb_image, tmp_path):
    path = tmp_path / "rotated.jpg"
    stored = np.ascontiguousarray(np.rot90(rgb_image, k=1))  # stored sideways...
    exif = Image.Exif()
    exif[0x0112] = 6  # ...with EXIF saying "rotate 90 degrees clockwise to view"
    Image.fromarray(stored).save(path, exif=exif, quality=100, subsampling=0)
    upright = np.asarray(Image.open(path).transpose(Image.Transpose.ROTATE_270))
    from_file = segmenter.segment(path, "cat", threshold=0.0, **NO_NMS)
    from_array = segmenter.segment(upright, "cat", threshold=0.0, **NO_NMS)
    assert from_file.image_size == rgb_image.shape[:2]
    assert [i.box for i in from_file] == [i.box for i in from_array]
    assert segmenter.stats.image_encoder_runs == 1  # same pixels, same cache entry


def test_grayscale_rgba_and_palette_match_their_rgb_equivalents(segmenter, rgb_image, tmp_path):
    gray = np.asarray(Image.fromarray(rgb_image).convert("L"))
    as_rgb = np.repeat(gray[:, :, None], 3, axis=2)
    expected = segmenter.segment(as_rgb, "cat", threshold=0.0, **NO_NMS)
    assert [i.box for i in segmenter.segment(gray, "cat", threshold=0.0, **NO_NMS)] == [i.box for i in expected]
    Image.fromarray(gray).save(tmp_path / "gray.png")
    assert [i.box for i in segmenter.segment(tmp_path / "gray.png", "cat", threshold=0.0, **NO_NMS)] == [
        i.box for i in expected
    ]
    rgba = np.concatenate([rgb_image, np.full(rgb_image.shape[:2] + (1,), 128, np.uint8)], axis=2)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    plain = segmenter.segment(rgb_image, "cat", threshold=0.0, **NO_NMS)
    assert [i.box for i in segmenter.segment(tmp_path / "rgba.png", "cat", threshold=0.0, **NO_NMS)] == [
        i.box for i in plain
    ]
    Image.fromarray(rgb_image).convert("P", palette=Image.Palette.ADAPTIVE).save(tmp_path / "palette.png")
    palette_result = segmenter.segment(tmp_path / "palette.png", "cat", threshold=0.0)
    assert palette_result.image_size == rgb_image.shape[:2]


def test_uint16_input_is_scaled_and_aligned(segmenter):
    rng = np.random.default_rng(3)
    image16 = rng.integers(0, 4000, (90, 160), dtype=np.uint16)
    image16[20:50, 30:90] = 60000
    copy = image16.copy()
    result = segmenter.segment(image16, "nucleus", threshold=0.0, **NO_NMS)
    assert np.array_equal(image16, copy)  # the caller's array is untouched
    assert result.image_size == (90, 160)
    rgb = promptseg.load_image(image16)
    reference, probability = reference_result(segmenter, rgb, "nucleus")
    assert len(reference) > 0
    assert_results_agree(result, reference, probability)


def test_segment_batch_reports_and_skips_bad_images(segmenter, rgb_image, tmp_path):
    good = tmp_path / "good.png"
    Image.fromarray(rgb_image).save(good)
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    seen = []
    results = list(segmenter.segment_batch(
        [good, corrupt, tmp_path / "missing.png", good], "cat", threshold=0.0,
        progress=lambda total, advance: seen.append((total, advance)),
    ))
    assert [r.error is None for r in results] == [True, False, False, True]
    assert "corrupt" in results[1].error and "No such image file" in results[2].error
    assert len(results[0]) == len(results[3]) > 0
    assert seen[0] == (4, 0) and sum(advance for _, advance in seen) == 4


def test_segment_batch_can_be_cancelled(segmenter, rgb_image):
    from promptseg.errors import CancelledError

    calls = iter([False, True])
    with pytest.raises(CancelledError):
        list(segmenter.segment_batch([rgb_image, rgb_image], "cat", cancel=lambda: next(calls)))


@pytest.mark.parametrize(
    "image, error, words",
    [
        ("/no/such/file.png", ImageError, "No such image file"),
        (np.zeros((0, 10, 3), np.uint8), ImageError, "empty"),
        (np.zeros((10, 10), np.complex64), ImageError, "dtype"),
        (np.zeros((2, 3, 10, 10), np.uint8), ImageError, "shape"),
        (object(), ImageError, "file path"),
    ],
)
def test_bad_images_raise_clear_errors(segmenter, image, error, words):
    with pytest.raises(error, match=words):
        segmenter.segment(image, "cat")


def test_empty_and_corrupt_files_raise_clear_errors(segmenter, tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ImageError, match="empty"):
        segmenter.segment(tmp_path / "empty.png", "cat")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    with pytest.raises(ImageError, match="corrupt|truncated"):
        segmenter.segment(tmp_path / "bad.png", "cat")


@pytest.mark.parametrize("prompts", ["", "   ", [], ["cat", ""], [3]])
def test_bad_prompts_raise_clear_errors(segmenter, rgb_image, prompts):
    with pytest.raises(PromptError):
        segmenter.segment(rgb_image, prompts)


@pytest.mark.parametrize(
    "options",
    [{"threshold": 1.5}, {"threshold": -0.1}, {"mask_threshold": 0}, {"min_area": -1},
     {"smooth": 1.5}, {"max_instances": 0}, {"iou_threshold": 2}],
)
def test_bad_options_raise_clear_errors(segmenter, rgb_image, options):
    with pytest.raises(OptionError):
        segmenter.segment(rgb_image, "cat", **options)


def test_post_processing_options(segmenter, rgb_image):
    everything = segmenter.segment(rgb_image, ["cat", "dog"], threshold=0.0, **NO_NMS)
    assert len(everything) > 3
    assert len(segmenter.segment(rgb_image, ["cat", "dog"], threshold=0.0, max_instances=3)) == 3
    big = segmenter.segment(rgb_image, ["cat", "dog"], threshold=0.0, min_area=2000, **NO_NMS)
    assert all(inst.area >= 2000 for inst in big)
    assert len(big) == sum(inst.area >= 2000 for inst in everything)
    deduped = segmenter.segment(rgb_image, ["cat", "dog"], threshold=0.0, iou_threshold=0.3, cross_prompt_iou=0.3)
    assert len(deduped) < len(everything)
    assert [i.score for i in deduped] == sorted((i.score for i in deduped), reverse=True)
    high = segmenter.segment(rgb_image, ["cat", "dog"], threshold=0.255, **NO_NMS)
    assert all(inst.score > 0.255 for inst in high)


def test_exemplar_boxes_change_the_prediction(segmenter, rgb_image):
    plain = segmenter.segment(rgb_image, "cat", threshold=0.0, **NO_NMS)
    with_box = segmenter.segment(rgb_image, "cat", threshold=0.0, exemplars=[(40, 30, 110, 80)], **NO_NMS)
    assert [i.score for i in plain] != [i.score for i in with_box]
    assert segmenter.stats.image_encoder_runs == 1
    with pytest.raises(OptionError, match="x1 > x0"):
        segmenter.segment(rgb_image, "cat", exemplars=[(50, 50, 10, 10)])


def test_threads_can_share_one_segmenter(segmenter, rgb_image):
    from concurrent.futures import ThreadPoolExecutor

    expected = [i.box for i in segmenter.segment(rgb_image, "cat", threshold=0.0)]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: segmenter.segment(rgb_image, "cat", threshold=0.0), range(8)))
    assert all([i.box for i in r] == expected for r in results)
