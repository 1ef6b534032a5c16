"""Render docs/images/app.png: the quick-try page (``promptseg app``) after two prompts on an example.

    python docs/make_app_screenshot.py
    python docs/make_app_screenshot.py --model facebook/sam3   # with real weights, if you have them

Without --model (or PROMPTSEG_MODEL) it builds the tiny SAM 3 with random weights that the tests
use, so the masks in the picture are arbitrary: the picture shows the page, the overlay, the
instance table and the cache message, not segmentation quality. The script starts
``promptseg app`` on 127.0.0.1 (a free port), drives Debian's Chromium (/usr/bin/chromium) through
Playwright: it uploads examples/chelsea.jpg, runs one prompt, then another on the same image
(whose embedding comes from the cache), grabs the page and stops the server.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
RUN_OVER = """before => {
    const status = document.querySelector('#status');
    const tracker = status.querySelector('[data-testid=status-tracker]');
    const text = status.innerText.trim();
    return (!tracker || tracker.classList.contains('hide')) && text !== before.trim() && /instance|Error/.test(text);
}"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_serving(url: str, server: subprocess.Popen, timeout: float = 300) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if server.poll() is not None:
            raise SystemExit(f"promptseg app exited with {server.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.5)
    raise SystemExit(f"promptseg app did not answer at {url} within {timeout} s")


def run(page, prompts: str) -> str:
    page.fill("#prompts textarea", prompts)
    before = page.inner_text("#status")
    page.click("#segment")
    page.wait_for_function(RUN_OVER, arg=before, timeout=600_000)
    status = page.inner_text("#status").strip()
    if status.startswith("Error"):
        raise SystemExit(f"the run failed: {status}")
    return status


def shoot(url: str, image: Path, threshold: float, out: Path, chromium: str) -> str:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(url, wait_until="networkidle")
            page.set_input_files("#image-file input[type=file]", str(image))
            page.wait_for_function("document.querySelector('#status').innerText.includes('pixels')")
            box = page.locator("#threshold input[type=number]")
            box.fill(str(threshold))
            box.press("Enter")
            run(page, "cat")
            status = run(page, "cat, ear")  # same image: the embedding comes from the cache
            page.wait_for_timeout(500)
            out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(out), full_page=True)
        finally:
            browser.close()
    return status


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=os.environ.get("PROMPTSEG_MODEL"),
                        help="SAM 3 hub id or directory (default: a tiny random model, masks arbitrary)")
    parser.add_argument("--image", type=Path, default=HERE.parent / "examples" / "chelsea.jpg")
    parser.add_argument("--out", type=Path, default=HERE / "images" / "app.png")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="promptseg-shot-"))
    model, threshold = args.model, 0.5
    if not model:
        from promptseg.testing import make_random_sam3

        model = str(make_random_sam3(work / "tiny-sam3"))
        threshold = 0.2525  # the random model scores about 0.25: keep its best few detections
    env = {**os.environ, "PROMPTSEG_CACHE_DIR": str(work / "cache"), "GRADIO_ANALYTICS_ENABLED": "False"}
    port = free_port()
    command = [str(Path(sys.executable).with_name("promptseg")), "app", "--host", "127.0.0.1", "--port", str(port),
               "--model", model, "--device", "cpu"]
    server = subprocess.Popen(command, env=env, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}/"
        wait_until_serving(url, server)
        status = shoot(url, args.image, threshold, args.out, args.chromium)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    print(f"wrote {args.out} ({status.splitlines()[-1]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
