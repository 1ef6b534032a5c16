"""The quick-try page's callbacks on the tiny random SAM 3: what a run shows, the cache, clear errors.

The callbacks are what the page's buttons call; here they run without a browser, on the real
loader and the shared segmenter, and are checked against the core's own result for the same inputs.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

pytest.importorskip("gradio", reason="the quick-try page needs the app extra: pip install 'promptseg[app]'")

from promptseg.options import SegmentOptions, option_info  # noqa: E402
from promptseg.render import overlay  # noqa: E402
from promptseg.sessions import clear_shared_segmenters, shared_segmenter  # noqa: E402
from promptseg_app.callbacks import AppSettings, QuickTry, form_options, split_phrases, table_rows  # noqa: E402

THRESHOLD = 0.0  # the tiny random model scores about 0.25: keep every detection
FORM = {"threshold": THRESHOLD, "mask_threshold": 0.5, "smooth": 0, "min_area": 0, "tiling": "off", "tile_size": 1008}


@pytest.fixture(autouse=True)
def fresh_segmenters():
    clear_shared_segmenters()
    yield
    clear_shared_segmenters()


@pytest.fixture
def settings(tiny_sam3_dir, tmp_path) -> AppSettings:
    return AppSettings(model=str(tiny_sam3_dir), device="cpu", dtype="fp32", cache_dir=str(tmp_path / "cache"))


@pytest.fixture
def app(settings):
    quick_try = QuickTry(settings)
    yield quick_try
    quick_try.close()


@pytest.fixture
def image_file(rgb_image, tmp_path) -> str:
    path = tmp_path / "shapes.png"
    Image.fromarray(rgb_image).save(path)
    return str(path)


def core_segmenter(settings: AppSettings):
    """The segmenter the page shares, as the core hands it out for the same settings."""
    return shared_segmenter(settings.model, device=settings.device, dtype=settings.dtype,
                            cache_dir=settings.cache_dir, clip=None, max_pixels=None)


def test_a_run_shows_the_cores_overlay_instances_and_downloads(app, settings, image_file, rgb_image):
    outcome = app.segment(image_file, "red square, green square", **FORM)
    assert not outcome.error, outcome.status
    expected = core_segmenter(settings).segment(
        image_file, ["red square", "green square"], threshold=THRESHOLD)  # same embedding, read from the cache
    assert len(expected) > 0
    np.testing.assert_array_equal(outcome.overlay, overlay(rgb_image, expected))
    assert outcome.rows == [[i + 1, inst.label, round(inst.score, 3), inst.area] for i, inst in enumerate(expected)]
    assert f"{len(expected)} instances" in outcome.status
    assert outcome.legend.count("promptseg-key") == len(expected)

    labels = np.asarray(Image.open(outcome.labels_path))
    assert outcome.labels_path.name == "shapes.labels.png" and labels.dtype == np.uint16
    np.testing.assert_array_equal(labels, expected.to_label_image(np.uint16))

    coco = json.loads(outcome.coco_path.read_text())
    assert outcome.coco_path.name == "shapes.coco.json"
    assert [c["name"] for c in coco["categories"]] == ["red square", "green square"]
    assert coco["images"] == [{"id": 1, "file_name": "shapes.png", "height": 120, "width": 200}]
    names = {c["id"]: c["name"] for c in coco["categories"]}
    assert [names[a["category_id"]] for a in coco["annotations"]] == expected.labels
    for annotation, inst in zip(coco["annotations"], expected):
        np.testing.assert_array_equal(mask_utils.decode(annotation["segmentation"]).astype(bool),
                                      inst.full_mask(120, 200))


def test_second_prompt_on_the_same_image_skips_the_image_encoder(app, image_file):
    first = app.segment(image_file, "red square", **FORM)
    segmenter, load_seconds = app.segmenter()
    runs = segmenter.stats.image_encoder_runs
    second = app.segment(image_file, "green square", **FORM)
    assert first.embedding_source == "computed" and "first time on this image" in first.status
    assert "loaded in" in first.status  # the first run loaded the model ...
    assert load_seconds is None and "loaded in" not in second.status  # ... the second found it loaded
    assert second.embedding_source == "memory" and "image encoder skipped" in second.status
    assert segmenter.stats.image_encoder_runs == runs


def test_the_model_loads_once_on_the_first_run(app, image_file):
    assert not app.loaded  # nothing loads before the first run
    app.segment(image_file, "square", **FORM)
    loaded = app.segmenter()[0]
    app.segment(image_file, "circle", **FORM)
    assert app.segmenter()[0] is loaded


def test_tiled_runs_report_each_tile(app, image_file):
    reports = []
    outcome = app.segment(image_file, "square", **{**FORM, "tiling": "on", "tile_size": 64},
                          report=lambda done, total: reports.append((done, total)))
    assert not outcome.error, outcome.status
    total = reports[-1][1]
    assert total > 1 and reports[-1] == (total, total)
    assert [done for done, _ in reports] == sorted(done for done, _ in reports)


def unreadable(tmp_path) -> str:
    path = tmp_path / "broken.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n not really an image")
    return str(path)


@pytest.mark.parametrize("form, needle, loads_model", [
    pytest.param({"prompts": " , \n"}, "No prompt: type what to segment", False, id="no-prompt"),
    pytest.param({"image": None}, "No image: upload one", False, id="no-image"),
    pytest.param({"image": unreadable}, "broken.png", True, id="unreadable-file"),
    pytest.param({"tiling": "on", "tile_size": 8}, "tile must be at least 16 pixels", False, id="tile-too-small"),
    pytest.param({"mask_threshold": 0.0}, "mask_threshold must be strictly between 0 and 1", False,
                 id="mask-threshold-0"),
    pytest.param({"negative": "toy car"}, "need(s) a CLIP model", True, id="negatives-without-clip"),
])
def test_bad_input_gives_a_message_not_a_traceback(app, image_file, tmp_path, form, needle, loads_model):
    values = {"image": image_file, "prompts": "square", **FORM, **form}
    if callable(values["image"]):
        values["image"] = values["image"](tmp_path)
    image, prompts = values.pop("image"), values.pop("prompts")
    outcome = app.segment(image, prompts, **values)
    assert outcome.error and outcome.status.startswith("**Error:**"), outcome.status
    assert needle in outcome.status
    assert app.loaded is loads_model  # what the form alone shows wrong is refused before the model loads
    assert outcome.overlay is None and outcome.rows == [] and outcome.coco_path is None


def test_an_image_over_the_pixel_budget_gives_a_message(settings, image_file):
    app = QuickTry(AppSettings(**{**settings.__dict__, "max_pixels": 10_000}))
    image, status = app.preview(image_file)
    assert image is None and "24,000 pixels" in status and status.startswith("**Error:**")
    outcome = app.segment(image_file, "square", **FORM)
    assert outcome.error and "24,000 pixels" in outcome.status
    app.close()


def test_a_model_that_cannot_load_gives_a_message_and_the_next_run_tries_again(tmp_path, image_file):
    app = QuickTry(AppSettings(model=str(tmp_path / "no-such-model"), device="cpu"))
    outcome = app.segment(image_file, "square", **FORM)
    assert outcome.error and "no-such-model" in outcome.status
    assert not app.loaded
    app.close()


def test_preview_shows_the_picked_image_or_why_not(app, image_file, rgb_image, tmp_path):
    image, status = app.preview(image_file)
    np.testing.assert_array_equal(image, rgb_image)
    assert "200 x 120 pixels" in status
    image, status = app.preview(unreadable(tmp_path))
    assert image is None and status.startswith("**Error:**") and "broken.png" in status
    assert app.preview(None)[0] is None


def test_suggestions_without_clip_say_how_to_get_them(app, image_file):
    phrases, status = app.suggest(image_file)
    assert phrases == [] and "--clip MODEL" in status


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory) -> str:
    from promptseg.testing import make_random_clip

    return make_random_clip(tmp_path_factory.mktemp("models") / "tiny-clip")["local_dir"]


def test_with_clip_the_page_suggests_prompts_and_checks_instances(settings, tiny_clip_dir, image_file):
    app = QuickTry(AppSettings(**{**settings.__dict__, "clip": tiny_clip_dir}))
    phrases, status = app.suggest(image_file, k=5)
    assert len(phrases) == 5 and len(set(phrases)) == 5 and phrases[0] in status
    assert app.add_prompts("square", phrases[:2]) == ", ".join(["square", *phrases[:2]])
    assert app.add_prompts("square", ["square"]) == "square"

    outcome = app.segment(image_file, "red square", **FORM)
    assert not outcome.error, outcome.status
    assert len(outcome.rows) > 0 and all(len(row) == 5 and row[4] is not None for row in outcome.rows)
    verified = app.segment(image_file, "red square", **FORM, negative="blue circle", verify=True, clip_threshold=1.0)
    assert not verified.error and verified.rows == []  # no instance reaches a CLIPScore of 1
    app.close()


def test_form_values_become_the_cores_options():
    options = form_options(0.3, 0.4, 2.0, 50.0, "on", 512.0, negative="toy car; drawing", verify=True,
                           clip_threshold=0.6)
    assert options == SegmentOptions.from_flat(threshold=0.3, mask_threshold=0.4, smooth=2, min_area=50, tile=512,
                                               negative=("toy car", "drawing"), verify=True, clip_threshold=0.6)
    assert form_options(0.5, 0.5, 0, 0, "auto", 512).tiling.tile == "auto"
    assert form_options(0.5, 0.5, 0, 0, "off", 512).tiling.tile is None
    assert form_options(0.5, 0.5, 0, 0, "off", None, clip_threshold=0.9).clip.clip_threshold is None  # only with verify


def test_prompts_split_on_commas_semicolons_and_lines():
    assert split_phrases("cat,  red   car\ntyre; ;\n") == ["cat", "red car", "tyre"]
    assert split_phrases("") == split_phrases(None) == []


def test_table_rows_number_instances_as_the_label_png(segmenter, rgb_image):
    result = segmenter.segment(rgb_image, "square", threshold=THRESHOLD)
    rows = table_rows(result)
    labels = result.to_label_image()
    for number, label, _score, area in rows:
        assert label == "square" and area == result[number - 1].area
        assert np.count_nonzero(labels == number) <= area  # higher scores are drawn on top


def test_the_form_takes_ranges_defaults_and_help_from_the_options(app):
    from promptseg_app.page import build_page

    page = build_page(app)
    fields = {block.elem_id: block for block in page.blocks.values() if getattr(block, "elem_id", None)}
    for name in ("threshold", "mask_threshold", "smooth"):
        info = option_info(name)
        assert fields[name].value == info.default and fields[name].info == info.help
    assert (fields["threshold"].minimum, fields["threshold"].maximum) == (0, 1)
    assert 0 < fields["mask_threshold"].minimum and fields["mask_threshold"].maximum < 1  # open at both ends
    assert fields["min_area"].value == option_info("min_area").default
    assert not fields["suggest"].visible  # no CLIP model configured
    assert not app.loaded  # building the page loads nothing


def test_one_job_uses_the_model_at_a_time_and_nothing_is_reported(app):
    from promptseg_app.page import JOB_SLOT, build_page

    page = build_page(app)
    jobs = {fn.name: fn for fn in page.fns.values() if fn.name in ("on_segment", "on_suggest")}
    assert set(jobs) == {"on_segment", "on_suggest"}
    assert all(fn.concurrency_limit == 1 and fn.concurrency_id == JOB_SLOT for fn in jobs.values())
    assert not page.analytics_enabled

    import gradio.analytics

    assert not gradio.analytics.analytics_enabled()
