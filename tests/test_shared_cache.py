"""An embedding cache shared by several machines: an fsspec URL as `cache_dir`.

S3 is moto's S3-compatible server on 127.0.0.1 (started here on a free port, stopped by PID); the
generic file-system path runs on ``file://`` and ``memory://``. "Another machine" is another
process, or another segmenter, with its own local tier (`PROMPTSEG_LOCAL_CACHE_DIR`).
"""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tolerance import assert_results_agree, full_size_probabilities

import promptseg
from promptseg.cache import default_cache_dir, open_disk_cache
from promptseg.errors import OptionError
from promptseg.masks import tight_box
from promptseg.remote_cache import RemoteCache
from promptseg.results import Instance, SegmentationResult

pytest.importorskip("s3fs")
pytest.importorskip("moto")

NO_NMS = {"threshold": 0.0, "iou_threshold": None, "cross_prompt_iou": None}
SECRET = "not-a-real-secret-3f9a"
S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "us-east-1",
          "AWS_EC2_METADATA_DISABLED": "true"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def s3_endpoint():
    """moto's S3 server on loopback for this module's tests."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2).close()
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError("moto's S3 server did not start within 60 s")
                time.sleep(0.2)
        yield endpoint
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=10)


def forget_s3_clients() -> None:
    """fsspec reuses one S3 client per set of options; tests that change the environment need a new one."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture
def s3_env(s3_endpoint, monkeypatch):
    """This process talks to the moto server; returns the variables a child process needs too."""
    env = {**S3_ENV, "AWS_ENDPOINT_URL": s3_endpoint}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    forget_s3_clients()
    yield env
    forget_s3_clients()


def new_bucket(prefix: str) -> str:
    """A new bucket on the moto server; the URL of a prefix in it."""
    import s3fs

    name = f"{prefix}-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem().mkdir(name)
    return f"s3://{name}/embeddings"


@pytest.fixture(params=["s3", "file", "memory"])
def shared_url(request, tmp_path):
    """A shared store of each kind: S3 (moto), a local folder as file://, fsspec's in-memory file system."""
    if request.param == "s3":
        request.getfixturevalue("s3_env")
        yield new_bucket("shared")
    elif request.param == "file":
        yield f"file://{tmp_path / 'shared-store'}"
    else:
        import fsspec

        root = f"/promptseg-{uuid.uuid4().hex[:12]}"
        yield f"memory://{root}"
        fsspec.filesystem("memory").rm(root, recursive=True)


def on_machine(monkeypatch, tmp_path: Path, name: str) -> Path:
    """Make the next segmenters "machine" `name`: their own local tier in front of the shared store."""
    local = tmp_path / f"local-{name}"
    monkeypatch.setenv("PROMPTSEG_LOCAL_CACHE_DIR", str(local))
    return local


def shared_entries(url: str) -> list[str]:
    import fsspec

    fs, base = fsspec.url_to_fs(url)
    return [path for path in fs.find(base) if path.endswith(".safetensors")]


def reference(tiny_sam3_dir, rgb, prompt):
    """The same prompt with no cache at all, and the probability map of each of its instances."""
    seg = promptseg.load_segmenter(str(tiny_sam3_dir), device="cpu", cache_dir=False)
    result = seg.segment(rgb, prompt, **NO_NMS)
    features, _ = seg.embed(rgb)
    [found] = seg.backend.decode(features, seg.text_embeddings([prompt]), 0.0)
    return result, full_size_probabilities({prompt: found}, rgb.shape[:2])


MACHINE = textwrap.dedent("""
    import json, sys
    import numpy as np
    from dataclasses import asdict
    from PIL import Image
    import promptseg

    model, image, prompt, url = sys.argv[1:5]
    seg = promptseg.load_segmenter(model, device="cpu", cache_dir=url)
    result = seg.segment(np.asarray(Image.open(image).convert("RGB")), prompt, threshold=0.0,
                         iou_threshold=None, cross_prompt_iou=None)
    print(json.dumps({"image_encoder_runs": seg.stats.image_encoder_runs, "shared": asdict(seg.cache.disk.stats),
                      "result": result.to_dict()}))
""")


def run_machine(env: dict, local: Path, *args: str) -> dict:
    """One segmentation in a new process with its own local tier; what it printed."""
    import os

    child_env = {**os.environ, **env, "PROMPTSEG_LOCAL_CACHE_DIR": str(local)}
    done = subprocess.run([sys.executable, "-c", MACHINE, *args], env=child_env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def result_from_dict(data: dict) -> SegmentationResult:
    from pycocotools import mask as mask_utils

    height, width = data["image_size"]
    instances = []
    for inst in data["instances"]:
        rle = {**inst["segmentation"], "counts": inst["segmentation"]["counts"].encode("ascii")}
        full = mask_utils.decode(rle).astype(bool)
        x0, y0, x1, y1 = tight_box(full)
        instances.append(Instance(label=inst["label"], score=inst["score"], box=(x0, y0, x1, y1),
                                  mask=full[y0:y1, x0:x1]))
    return SegmentationResult(instances=instances, image_size=(height, width), prompts=data["prompts"],
                              embedding_source=data["embedding_source"])


@pytest.mark.parametrize("store", ["s3", "file"])
def test_second_machine_asks_a_new_prompt_without_running_the_image_encoder(store, tiny_sam3_dir, rgb_image,
                                                                            tmp_path, request):
    env = request.getfixturevalue("s3_env") if store == "s3" else {}
    url = new_bucket("machines") if store == "s3" else f"file://{tmp_path / 'store'}"
    image = tmp_path / "image.png"
    Image.fromarray(rgb_image).save(image)

    first = run_machine(env, tmp_path / "local-a", str(tiny_sam3_dir), str(image), "cat", url)
    assert first["image_encoder_runs"] == 1 and first["shared"]["uploads"] == 1
    assert len(shared_entries(url)) == 1
    second = run_machine(env, tmp_path / "local-b", str(tiny_sam3_dir), str(image), "dog", url)
    assert second["image_encoder_runs"] == 0
    assert second["shared"] == {"downloads": 1, "uploads": 0, "bad_entries": 0}
    assert second["result"]["embedding_source"] == "disk"

    want, probability = reference(tiny_sam3_dir, rgb_image, "dog")
    assert len(want) > 0
    assert_results_agree(result_from_dict(second["result"]), want, probability)


def test_local_tier_keeps_what_was_downloaded(shared_url, make_segmenter, rgb_image, tmp_path, monkeypatch):
    on_machine(monkeypatch, tmp_path, "a")
    first = make_segmenter(cache_dir=shared_url)
    first.segment(rgb_image, "cat", **NO_NMS)
    key = first.cache.disk.local.files()[0].name.split(".")[0]
    on_machine(monkeypatch, tmp_path, "b")
    assert make_segmenter(cache_dir=shared_url).cache.disk.contains(key)  # in the store, not yet on b
    assert not make_segmenter(cache_dir=shared_url).cache.disk.local.contains(key)
    downloaded = make_segmenter(cache_dir=shared_url)
    assert downloaded.segment(rgb_image, "dog", **NO_NMS).embedding_source == "disk"
    assert downloaded.cache.disk.stats.downloads == 1 and downloaded.stats.image_encoder_runs == 0
    assert downloaded.cache.disk.contains(key) and downloaded.cache.disk.local.contains(key)

    again = make_segmenter(cache_dir=shared_url)  # machine b once more: its local tier answers
    assert again.segment(rgb_image, "bird", **NO_NMS).embedding_source == "disk"
    assert again.cache.disk.stats.downloads == 0 and again.stats.image_encoder_runs == 0
    assert again.is_cached(rgb_image)


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_damaged_shared_entry_is_recomputed_and_overwritten(shared_url, damage, make_segmenter, rgb_image, tmp_path,
                                                            monkeypatch, caplog):
    import fsspec

    on_machine(monkeypatch, tmp_path, "a")
    first = make_segmenter(cache_dir=shared_url)
    fresh = first.segment(rgb_image, "cat", **NO_NMS)
    computed, _ = first.embed(rgb_image)
    [path] = shared_entries(shared_url)
    fs, _ = fsspec.url_to_fs(shared_url)
    data = fs.cat_file(path)
    fs.pipe_file(path, data[: len(data) // 2] if damage == "truncated" else b"\x00" * len(data))

    on_machine(monkeypatch, tmp_path, "b")
    second = make_segmenter(cache_dir=shared_url)
    with caplog.at_level(logging.WARNING, logger="promptseg"):
        result = second.segment(rgb_image, "cat", **NO_NMS)
    assert result.embedding_source == "computed" and second.stats.image_encoder_runs == 1
    assert "Shared embedding cache entry" in caplog.text and "unreadable" in caplog.text
    assert "overwriting the shared copy" in caplog.text
    assert second.cache.disk.stats == type(second.cache.disk.stats)(downloads=1, uploads=1, bad_entries=1)
    assert [i.score for i in result] == [i.score for i in fresh]  # same code on the same input: exact
    assert fs.cat_file(path) != data[: len(data) // 2]

    caplog.clear()
    on_machine(monkeypatch, tmp_path, "c")
    read, source = make_segmenter(cache_dir=shared_url).embed(rgb_image)  # the shared copy is good again
    assert source == "disk" and "recomputing" not in caplog.text
    assert all(torch.equal(read[name], computed[name]) for name in computed)


WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import torch
    from promptseg.cache import default_cache_dir, open_disk_cache

    url, key, value, ready, go, rounds = sys.argv[1:7]
    store = open_disk_cache(url)
    tensors = {"fpn_0": torch.full((1, 32, 128, 128), float(value)), "fpn_1": torch.full((1, 64, 64, 64), float(value))}
    Path(ready).touch()
    deadline = time.monotonic() + 120
    while not Path(go).exists():
        assert time.monotonic() < deadline, "no start signal"
        time.sleep(0.01)
    for _ in range(int(rounds)):
        store.put(key, tensors, {"writer": "any"})
    assert store.failure is None, store.failure
""")


@pytest.mark.parametrize("store", ["s3", "file"])
def test_racing_writers_leave_a_valid_entry_readers_accept(store, tmp_path, request):
    import os

    env = request.getfixturevalue("s3_env") if store == "s3" else {}
    url = new_bucket("race") if store == "s3" else f"file://{tmp_path / 'store'}"
    key, go = "ab" * 32, tmp_path / "go"
    spec = {"fpn_0": ((1, 32, 128, 128), torch.float32), "fpn_1": ((1, 64, 64, 64), torch.float32)}
    writers, ready = [], []
    for n, value in enumerate((1.0, 2.0)):
        ready.append(tmp_path / f"ready-{n}")
        child_env = {**os.environ, **env, "PROMPTSEG_LOCAL_CACHE_DIR": str(tmp_path / f"writer-{n}")}
        writers.append(subprocess.Popen([sys.executable, "-c", WRITER, url, key, str(value), str(ready[-1]), str(go),
                                         "8"], env=child_env, stderr=subprocess.PIPE, text=True))
    try:
        deadline = time.monotonic() + 180
        while not all(path.exists() for path in ready):
            assert time.monotonic() < deadline and all(w.poll() is None for w in writers), "writers did not start"
            time.sleep(0.05)
        go.touch()
        reader = RemoteCache(url, open_disk_cache(tmp_path / "reader"))
        seen = []
        while any(w.poll() is None for w in writers) and time.monotonic() < deadline:
            reader.local.path_for(key).unlink(missing_ok=True)  # read the shared copy every time
            got = reader.get(key, {"writer": "any"}, spec)
            if got is not None:
                seen.append(float(got["fpn_0"][0, 0, 0, 0]))
                assert all(torch.all(t == seen[-1]) for t in got.values()), "an entry mixes two writers' bytes"
        for writer in writers:
            assert writer.wait(timeout=60) == 0, writer.stderr.read()[-3000:]
    finally:
        for writer in writers:
            if writer.poll() is None:
                writer.kill()
                writer.wait(timeout=10)
    assert reader.stats.bad_entries == 0 and reader.failure is None
    assert set(seen) <= {1.0, 2.0}
    reader.local.path_for(key).unlink(missing_ok=True)
    final = reader.get(key, {"writer": "any"}, spec)
    assert final is not None and float(final["fpn_0"].flatten()[0]) in (1.0, 2.0)
    assert len(shared_entries(url)) == 1  # no temporary name left visible as an entry


@pytest.mark.parametrize("cause", ["network down", "no such bucket", "no credentials"])
def test_unusable_shared_store_warns_once_and_segmentation_goes_on(cause, s3_endpoint, make_segmenter, rgb_image,
                                                                   tmp_path, monkeypatch, caplog):
    env = {**S3_ENV, "AWS_ENDPOINT_URL": s3_endpoint}
    if cause == "network down":
        env["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    if cause == "no credentials":
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            monkeypatch.delenv(name)
        monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
        monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    forget_s3_clients()
    fix = {"network down": "Check the network and the endpoint", "no such bucket": "Create the bucket",
           "no credentials": "Give this machine credentials"}[cause]
    on_machine(monkeypatch, tmp_path, "a")
    want = make_segmenter(cache_dir=False).segment(rgb_image, "cat", **NO_NMS)
    try:
        seg = make_segmenter(cache_dir="s3://no-such-bucket-here/embeddings")
        with caplog.at_level(logging.WARNING, logger="promptseg"):
            result = seg.segment(rgb_image, "cat", **NO_NMS)
            seg.segment(rgb_image[::-1].copy(), "cat", **NO_NMS)  # another image: no second warning
    finally:
        forget_s3_clients()
    assert [i.score for i in result] == [i.score for i in want]
    warnings = [r.getMessage() for r in caplog.records if "shared embedding cache" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert fix in warnings[0] and "s3://no-such-bucket-here/embeddings" in warnings[0]
    assert "Going on with the local cache" in warnings[0] and SECRET not in caplog.text
    assert seg.stats.image_encoder_runs == 2 and seg.cache.disk.failure is not None

    again = make_segmenter(cache_dir="s3://no-such-bucket-here/embeddings")  # the local tier kept both
    assert again.segment(rgb_image, "dog", **NO_NMS).embedding_source == "disk"
    assert again.stats.image_encoder_runs == 0


def test_missing_s3fs_is_an_option_error_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "s3fs", None)
    for protocol in ("s3", "s3a"):
        monkeypatch.delitem(sys.modules["fsspec.registry"]._registry, protocol, raising=False)
    with pytest.raises(OptionError, match=r"pip install 'promptseg\[s3\]'"):
        open_disk_cache("s3://bucket/prefix")


def test_unknown_url_scheme_is_an_option_error():
    with pytest.raises(OptionError, match="not a URL fsspec knows"):
        open_disk_cache("nosuchscheme://bucket/prefix")


def test_cache_dir_from_the_environment_may_be_a_url(tmp_path, monkeypatch):
    url = f"file://{tmp_path / 'store'}"
    monkeypatch.setenv("PROMPTSEG_CACHE_DIR", url)
    on_machine(monkeypatch, tmp_path, "a")
    store = open_disk_cache(None, folder="clip")
    assert isinstance(store, RemoteCache) and store.url == f"{url}/clip"
    assert store.local.root.parent == tmp_path / "local-a"
    assert open_disk_cache(None).local.root != store.local.root  # one local tier per shared store
    assert default_cache_dir() == open_disk_cache(None).local.root  # what `promptseg cache` and doctor look at


def test_url_mangled_by_pathlib_is_an_option_error_not_a_local_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(OptionError, match="Pass the URL as a string"):
        open_disk_cache(Path("s3://bucket/prefix"))  # Path makes it s3:/bucket/prefix
    assert not (tmp_path / "s3:").exists()


def test_the_command_line_takes_a_shared_store_url(tiny_sam3_dir, rgb_image, tmp_path, monkeypatch, capsys):
    """--cache-dir keeps a URL as given (pathlib would turn s3://b into s3:/b); `cache info` on one
    shows this machine's local tier and says the store itself is shared."""
    from promptseg.cli import main

    url = f"file://{tmp_path / 'shared-store'}"
    local = on_machine(monkeypatch, tmp_path, "cli")
    image = tmp_path / "image.png"
    Image.fromarray(rgb_image).save(image)
    code = main(["segment", str(image), "-p", "red square", "--model", str(tiny_sam3_dir), "--device", "cpu",
                 "--dtype", "fp32", "--cache-dir", url, "--out", str(tmp_path / "out")])
    assert code == 0 and len(shared_entries(url)) == 1
    capsys.readouterr()
    assert main(["cache", "info", "--cache-dir", url]) == 0
    said = capsys.readouterr().out
    assert "is a shared store" in said and "1 embedding(s)" in said and str(local) in said


def test_label_studio_passes_a_shared_store_url_as_given():
    from promptseg_labelstudio.config import BackendConfig

    config = BackendConfig.from_env({"PROMPTSEG_CACHE_DIR": "s3://bucket/embeddings"})
    assert config.cache_dir == "s3://bucket/embeddings"
