"""The quick-try page in a real headless browser: ``promptseg app`` on 127.0.0.1, Debian's Chromium.

A user uploads an image, types a prompt and presses Segment; the result image appears and the
instance table matches the core's own result for the same file, prompt and threshold. A second
prompt on the same image says its embedding came from the cache. Nothing leaves the machine.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from app_helpers import (
    CHROMIUM,
    CHROMIUM_ARGS,
    app_env,
    download,
    free_port,
    run_and_wait,
    set_number,
    start_app,
    stop,
    table_rows,
    wait_until_serving,
)

from tolerance import FLOAT_ATOL

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.exists(), reason=f"no Chromium at {CHROMIUM} (Debian: apt-get install chromium)"),
]
pytest.importorskip("gradio", reason="the quick-try page needs the app extra: pip install 'promptseg[app]'")
pytest.importorskip("playwright", reason="the browser test drives Chromium with playwright (the test extra)")

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "chelsea.jpg"
THRESHOLD = 0.0  # the tiny random model scores about 0.25: keep every detection
PROMPT = "cat"


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    tmp: Path
    """The server's TMPDIR: where it keeps uploads and downloads."""


@pytest.fixture(scope="module")
def app_server(tiny_sam3_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("app-server")
    (folder / "tmp").mkdir()
    port = free_port()
    log = folder / "server.log"
    env = {**app_env(tiny_sam3_dir, folder / "cache"), "TMPDIR": str(folder / "tmp")}
    process = start_app(port, env, "--device", "cpu", "--dtype", "fp32", log=log)
    try:
        url = f"http://127.0.0.1:{port}/"
        wait_until_serving(url, process, log)
        yield Server(url, process, folder / "tmp")
    finally:
        stop(process)


@pytest.fixture
def server(app_server) -> str:
    return app_server.url


@pytest.fixture
def browser_page():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1400})
            page.set_default_timeout(60_000)
            yield page
        finally:
            browser.close()


def test_upload_prompt_and_run_shows_the_cores_instances(server, browser_page, tiny_sam3_dir, tmp_path):
    page = browser_page
    hosts = set()
    page.on("request", lambda request: hosts.add(request.url.split("/")[2]))
    image = tmp_path / "chelsea.jpg"
    shutil.copy(EXAMPLE, image)

    page.goto(server, wait_until="networkidle")
    page.set_input_files("#image-file input[type=file]", str(image))
    page.wait_for_function("document.querySelector('#status').innerText.includes('451 x 300 pixels')")
    page.fill("#prompts textarea", PROMPT)
    set_number(page, "threshold", THRESHOLD)
    started = time.monotonic()
    status = run_and_wait(page)
    assert "Error" not in status, status
    assert "computed (first time on this image)" in status and "loaded in" in status

    from promptseg import load_segmenter

    expected = load_segmenter(str(tiny_sam3_dir), device="cpu", dtype="fp32", cache_dir=False).segment(
        str(image), [PROMPT], threshold=THRESHOLD)
    assert len(expected) > 0
    assert f"{len(expected)} instance" in status
    count, rows = table_rows(page)
    assert count == len(rows) == len(expected)
    for row, inst in zip(rows, expected):
        number, label, score, area = row[:4]
        assert label == inst.label
        assert abs(float(score) - inst.score) <= 1e-3 / 2 + FLOAT_ATOL  # shown rounded to 3 decimals
        assert abs(int(area) - inst.area) <= max(2, 0.01 * inst.area), (area, inst.area)  # near-cut pixels may flip
    result = page.locator("#result img")
    assert result.count() == 1 and result.evaluate("img => img.complete && img.naturalWidth") == 451
    coco = json.loads(download(page, "coco"))
    assert [c["name"] for c in coco["categories"]] == [PROMPT] and len(coco["annotations"]) == len(expected)
    labels = np.asarray(Image.open(io.BytesIO(download(page, "labels"))))
    assert labels.dtype == np.uint16 and labels.shape == (300, 451) and labels.max() == len(expected)
    assert time.monotonic() - started < 120

    page.fill("#prompts textarea", "ear")
    second = run_and_wait(page)
    assert "from the cache (memory): image encoder skipped" in second and "loaded in" not in second
    assert hosts == {server.split("/")[2]}, f"the page asked other hosts: {sorted(hosts)}"


def test_picking_an_example_fills_the_form_and_a_run_without_a_prompt_says_so(server, browser_page):
    page = browser_page
    page.goto(server, wait_until="networkidle")
    page.get_by_text("chelsea.jpg", exact=True).first.click()
    page.wait_for_function("document.querySelector('#status').innerText.includes('451 x 300 pixels')")
    assert page.input_value("#prompts textarea") == "cat, ear"
    assert page.locator("#result img").count() == 1  # the picked image, shown before any run
    page.fill("#prompts textarea", " , ")
    status = run_and_wait(page)
    assert status.startswith("Error: No prompt: type what to segment"), status
    assert "Traceback" not in page.content()


def test_sigterm_stops_the_page_and_removes_its_download_files(app_server, browser_page):
    page = browser_page
    page.goto(app_server.url, wait_until="networkidle")
    page.set_input_files("#image-file input[type=file]", str(EXAMPLE))
    page.wait_for_function("document.querySelector('#status').innerText.includes('pixels')")
    page.fill("#prompts textarea", PROMPT)
    assert "Error" not in run_and_wait(page)
    assert list(app_server.tmp.glob("promptseg-app-*/run-*/chelsea.labels.png"))
    stop(app_server.process)
    assert app_server.process.returncode == 0
    assert not list(app_server.tmp.glob("promptseg-app-*"))
