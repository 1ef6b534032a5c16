"""The Ray runner: two single-CPU actors on a local Ray give the single-process core's results, every
item comes back exactly once (a dead actor's items are retried), bad images are error records, and
``promptseg segment --ray`` writes the files the plain command writes."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from promptseg.cli import main, output_stems
from promptseg.distributed import record_to_result, segment_on_ray
from promptseg.errors import ModelLoadError, OptionError
from tolerance import FLOAT_ATOL, assert_results_agree, full_size_probabilities

ray = pytest.importorskip("ray")

pytestmark = pytest.mark.timeout(600)

PROMPTS = ["cat", "red car"]
OPTIONS = {"threshold": 0.0}  # the tiny random model scores about 0.25: keep what it finds
SIZES = [(120, 200), (97, 131), (64, 64)]


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray for the module: two CPUs, no dashboard; pickles this module's classes by value
    so its workers need not import it."""
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    # Ray Data logs each run's DataContext at DEBUG with a format its arguments do not fit; pytest's
    # log capture turns that logging error into a failure, so keep that one logger above DEBUG
    logging.getLogger("ray.data._internal.execution.streaming_executor").setLevel(logging.INFO)
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", configure_logging=False)
    yield
    ray.shutdown()
    ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def image_paths(tmp_path_factory) -> list[str]:
    folder = tmp_path_factory.mktemp("ray-images")
    paths = []
    for index, (height, width) in enumerate(SIZES):
        rgb = np.random.default_rng(index).integers(0, 60, (height, width, 3), dtype=np.uint8)
        rgb[height // 4: height // 2, width // 5: width // 2] = (220, 40, 40)
        path = folder / f"image{index}.png"
        Image.fromarray(rgb).save(path)
        paths.append(str(path))
    return paths


@pytest.fixture(scope="module")
def core_segmenter(tiny_sam3_dir):
    from promptseg import load_segmenter

    return load_segmenter(str(tiny_sam3_dir), device="cpu", dtype="fp32", cache_dir=False)


def run_on_ray(items, tiny_sam3_dir, **keywords) -> list[dict]:
    return list(segment_on_ray(items, PROMPTS, model=str(tiny_sam3_dir), actors=2, num_cpus_per_actor=1,
                               dtype="fp32", cache_dir=False, progress=False, **OPTIONS, **keywords))


def assert_matches_core(record: dict, core_segmenter, image) -> None:
    """A record, turned back into a result, agrees with the single-process core on the same image."""
    rgb = core_segmenter.load(image)
    reference = core_segmenter.segment(rgb, PROMPTS, **OPTIONS)
    features, _ = core_segmenter.embed(rgb)
    found = core_segmenter.backend.decode(features, core_segmenter.text_embeddings(PROMPTS), 0.0)
    result = record_to_result(record)
    assert record["error"] is None and len(reference) > 0
    assert result.image_size == reference.image_size == rgb.shape[:2]
    assert len(result) == len(reference)
    assert_results_agree(result, reference, full_size_probabilities(dict(zip(PROMPTS, found)), rgb.shape[:2]))
    assert np.allclose(sorted(result.scores), sorted(reference.scores), atol=FLOAT_ATOL, rtol=0)


def test_two_actors_give_the_core_results_keyed_by_id(local_ray, tiny_sam3_dir, image_paths, core_segmenter):
    records = run_on_ray(image_paths, tiny_sam3_dir)
    assert sorted(record["id"] for record in records) == sorted(image_paths)
    for record in records:
        assert record["segmenter"] == core_segmenter.describe()
        assert record["source"] == record["id"]
        assert_matches_core(record, core_segmenter, record["id"])
        json.dumps(record)  # compact and plain: masks as RLE strings
        assert all(isinstance(inst["segmentation"]["counts"], str) for inst in record["instances"])


class DiesOnFirstRead:
    """Pixels whose first read kills the process reading them (an actor crash), then read normally:
    a marker file remembers the first time across processes."""

    def __init__(self, pixels: np.ndarray, marker: str) -> None:
        self.pixels, self.marker, self.shape = pixels, marker, pixels.shape

    def __array__(self, dtype=None, copy=None):
        if not os.path.exists(self.marker):
            Path(self.marker).write_text(str(os.getpid()))
            os._exit(1)
        return self.pixels


def test_a_dead_actor_is_restarted_and_every_item_comes_back_once(local_ray, tiny_sam3_dir, image_paths,
                                                                    core_segmenter, tmp_path):
    marker = tmp_path / "died"
    doomed = np.asarray(Image.open(image_paths[0]))
    items = [{"id": f"path-{i}", "image": path} for i, path in enumerate(image_paths)]
    items.insert(1, {"id": "dies", "image": DiesOnFirstRead(doomed, str(marker))})
    records = run_on_ray(items, tiny_sam3_dir, batch_size=2)
    assert marker.exists() and int(marker.read_text()) != os.getpid()  # an actor did die on it
    assert sorted(record["id"] for record in records) == sorted(item["id"] for item in items)
    by_id = {record["id"]: record for record in records}
    assert_matches_core(by_id["dies"], core_segmenter, doomed)
    for i, path in enumerate(image_paths):
        assert_matches_core(by_id[f"path-{i}"], core_segmenter, path)


class AlwaysDies:
    """Pixels whose every read kills the process reading them (a native crash, an out-of-memory kill)."""

    shape = (32, 32, 3)

    def __array__(self, dtype=None, copy=None):
        os._exit(1)


def test_an_image_that_kills_every_actor_is_an_error_record_after_its_retries(local_ray, tiny_sam3_dir,
                                                                              image_paths, core_segmenter):
    records = run_on_ray([{"id": "poison", "image": AlwaysDies()}, image_paths[2]], tiny_sam3_dir, max_retries=1)
    by_id = {record["id"]: record for record in records}
    assert len(records) == 2 and set(by_id) == {"poison", image_paths[2]}
    assert "died 2 time(s)" in by_id["poison"]["error"] and "without --ray" in by_id["poison"]["error"]
    assert_matches_core(by_id[image_paths[2]], core_segmenter, image_paths[2])


def test_a_model_that_does_not_load_on_the_actors_fails_the_run_with_its_error(local_ray, tmp_path, image_paths):
    with pytest.raises(ModelLoadError, match="could not load the segmenter: No model directory at .*Every machine"):
        list(segment_on_ray(image_paths[:1], PROMPTS, model=str(tmp_path / "no-model"), actors=1, progress=False))


def test_actors_asking_for_a_gpu_the_local_ray_lacks_fail_at_once(local_ray, image_paths):
    with pytest.raises(OptionError, match="asks for 1 GPU.* but the Ray cluster has 0"):
        list(segment_on_ray(image_paths[:1], PROMPTS, num_gpus_per_actor=1, progress=False))


def test_a_corrupt_image_is_an_error_record_and_the_run_completes(local_ray, tiny_sam3_dir, image_paths,
                                                                  core_segmenter, tmp_path):
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(Path(image_paths[0]).read_bytes()[:60])  # a PNG cut short
    missing = tmp_path / "missing.png"
    records = {r["id"]: r for r in run_on_ray([str(corrupt), image_paths[1], str(missing)], tiny_sam3_dir)}
    assert set(records) == {str(corrupt), image_paths[1], str(missing)}
    assert "corrupt" in records[str(corrupt)]["error"] and records[str(corrupt)]["instances"] == []
    assert "No such image file" in records[str(missing)]["error"]
    assert record_to_result(records[str(corrupt)]).error == records[str(corrupt)]["error"]
    assert_matches_core(records[image_paths[1]], core_segmenter, image_paths[1])


def test_an_unreadable_url_is_an_error_record_naming_the_fix(local_ray, tiny_sam3_dir, image_paths, tmp_path):
    url = f"memory://{tmp_path.name}/nothing-here.png"  # fsspec's in-memory file system: nothing stored
    [record] = run_on_ray([url], tiny_sam3_dir)
    assert record["id"] == url and "Cannot read" in record["error"] and "fsspec" in record["error"]


@pytest.mark.parametrize("items, words", [
    ([{"id": "a", "image": "x.png"}, {"id": "a", "image": "y.png"}], "share the id"),
    ([{"path": "x.png"}], "without an 'image' key"),
])
def test_bad_items_fail_before_ray_starts(items, words):
    with pytest.raises(OptionError, match=words):  # at the call, not at the first record
        segment_on_ray(items, PROMPTS, actors=1)


def test_bad_resources_fail_before_ray_starts():
    with pytest.raises(OptionError, match="actors must be"):  # at the call: callers prepare nothing for it
        segment_on_ray(["x.png"], PROMPTS, actors=0)
    with pytest.raises(OptionError, match="needs a CPU or a GPU"):
        segment_on_ray(["x.png"], PROMPTS, num_cpus_per_actor=0)
    with pytest.raises(OptionError, match="max_retries must be a whole number of at least 1"):
        segment_on_ray(["x.png"], PROMPTS, max_retries=0)


def run_cli(paths, tiny_sam3_dir, out: Path, *extra) -> int:
    return main(["segment", *paths, "-p", PROMPTS[0], "-p", PROMPTS[1], "--model", str(tiny_sam3_dir),
                 "--dtype", "fp32", "--no-cache", "--threshold", "0", "--out", str(out), *extra])


def test_cli_with_ray_writes_the_files_of_the_plain_command(local_ray, tiny_sam3_dir, image_paths, core_segmenter,
                                                            tmp_path):
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    inputs = [*image_paths, str(corrupt)]
    plain, on_ray = tmp_path / "plain", tmp_path / "ray"
    for kind in ("json", "png", "coco"):
        assert run_cli(inputs, tiny_sam3_dir, plain / kind, "--format", kind) == 1  # 1: the corrupt one skipped
        assert run_cli(inputs, tiny_sam3_dir, on_ray / kind, "--format", kind, "--ray", "--actors", "2") == 1
    files = sorted(p.relative_to(plain) for p in plain.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(on_ray) for p in on_ray.rglob("*") if p.is_file())
    assert len([f for f in files if f.name.endswith(".labels.png")]) == len(image_paths)
    for path in image_paths:
        stem = output_stems(inputs, Path())[path]
        written = json.loads((on_ray / "json" / f"{stem}.json").read_text())
        reference = json.loads((plain / "json" / f"{stem}.json").read_text())
        assert written["source"] == reference["source"] == path
        rgb = core_segmenter.load(path)
        features, _ = core_segmenter.embed(rgb)
        found = core_segmenter.backend.decode(features, core_segmenter.text_embeddings(PROMPTS), 0.0)
        assert_results_agree(record_to_result(written), record_to_result(reference),
                             full_size_probabilities(dict(zip(PROMPTS, found)), rgb.shape[:2]))
        for suffix in (".labels.png", ".overlay.png"):
            assert Image.open(on_ray / "png" / f"{stem}{suffix}").size == Image.open(plain / "png" / f"{stem}{suffix}").size
    coco, reference = (json.loads((root / "coco" / "results.coco.json").read_text()) for root in (on_ray, plain))
    assert coco["images"] == reference["images"] and coco["categories"] == reference["categories"]
    assert [a["image_id"] for a in coco["annotations"]] == [a["image_id"] for a in reference["annotations"]]
    for got, want in zip(coco["annotations"], reference["annotations"]):
        assert got["category_id"] == want["category_id"] and abs(got["score"] - want["score"]) <= FLOAT_ATOL


def test_cli_refuses_ray_with_visual_prompts(tiny_sam3_dir, image_paths, tmp_path, capsys):
    code = main(["segment", image_paths[0], "--point", "10,10", "--model", str(tiny_sam3_dir),
                 "--out", str(tmp_path / "out"), "--ray"])
    assert code == 2 and "--ray segments images with text prompts" in capsys.readouterr().err


def test_cli_takes_a_folder_or_a_quoted_pattern_for_its_images(tiny_sam3_dir, image_paths, tmp_path, capsys):
    folder = Path(image_paths[0]).parent
    assert run_cli([str(folder)], tiny_sam3_dir, tmp_path / "folder", "--format", "json") == 0
    assert sorted(p.name for p in (tmp_path / "folder").iterdir()) == ["image0.json", "image1.json", "image2.json"]
    assert run_cli([f"{folder}/image[02].png"], tiny_sam3_dir, tmp_path / "pattern", "--format", "json") == 0
    assert sorted(p.name for p in (tmp_path / "pattern").iterdir()) == ["image0.json", "image2.json"]
    capsys.readouterr()
    assert run_cli([f"{folder}/*.jpeg"], tiny_sam3_dir, tmp_path / "none") == 2
    assert "No file matches" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert run_cli([str(tmp_path / "empty")], tiny_sam3_dir, tmp_path / "nothing") == 2
    assert "holds no image files" in capsys.readouterr().err
