"""Start ``promptseg app`` as a real server on 127.0.0.1 and drive Debian's Chromium through it
(a plain module: pytest puts this folder on sys.path)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
PROMPTSEG = Path(sys.executable).with_name("promptseg")
START_TIMEOUT = 180  # s: importing torch and gradio on a busy 2-core machine


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def app_command(*args: str) -> list[str]:
    return [str(PROMPTSEG), "app", *args]


def start_app(port: int, env: dict[str, str], *args: str, log: Path) -> subprocess.Popen:
    """``promptseg app --port PORT ARGS`` in its own process group, output to `log`."""
    with open(log, "wb") as out:
        return subprocess.Popen(app_command("--host", "127.0.0.1", "--port", str(port), *args), env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def wait_until_serving(url: str, process: subprocess.Popen, log: Path, timeout: float = START_TIMEOUT) -> None:
    """Poll `url` until it answers 200; fail with the server's output if it exits or takes too long."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if process.poll() is not None:
            raise AssertionError(f"promptseg app exited with {process.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    raise AssertionError(f"promptseg app did not answer within {timeout} s:\n{log.read_text()}")


def stop(process: subprocess.Popen, timeout: float = 20) -> None:
    """Stop the server by its process group id: SIGTERM, then SIGKILL if it lingers."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=timeout)


def app_env(model_dir: Path, cache_dir: Path) -> dict[str, str]:
    """The environment of a test server: the tiny model, its own cache, nothing sent anywhere."""
    return {**os.environ, "PROMPTSEG_MODEL": str(model_dir), "PROMPTSEG_CACHE_DIR": str(cache_dir),
            "PROMPTSEG_DTYPE": "fp32", "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}


def table_rows(page) -> tuple[int, list[list[str]]]:
    """The instance table's row count (its grid's ``aria-rowcount`` less the header) and the cell texts
    of the rows it has drawn (a virtual table draws the rows in view), in row order."""
    count = int(page.get_attribute("#instances [role=grid]", "aria-rowcount")) - 1
    rows = page.eval_on_selector_all(
        "#instances .virtual-row",
        "rows => rows.map(r => [Number(r.dataset.index),"
        " Array.from(r.querySelectorAll('[role=gridcell]')).map(c => c.innerText.trim())])",
    )
    return count, [cells for _, cells in sorted(rows)]


def download(page, elem_id: str) -> bytes:
    """The bytes of the file offered by the download field `elem_id`, fetched as the browser would."""
    href = page.get_attribute(f"#{elem_id} a[download]", "href")
    response = page.request.get(href)
    assert response.ok, (href, response.status)
    return response.body()


def set_number(page, elem_id: str, value: float) -> None:
    """Type `value` into the number box of the slider or number field `elem_id`."""
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Enter")


def run_and_wait(page, timeout_ms: int = 120_000) -> str:
    """Press Segment and wait until the run is over (Gradio's progress tracker on the status line hidden
    again) and the status line says this run's outcome; return it."""
    before = page.inner_text("#status")
    page.click("#segment")
    page.wait_for_function(
        """before => {
            const status = document.querySelector('#status');
            const tracker = status.querySelector('[data-testid=status-tracker]');
            const text = status.innerText.trim();
            return (!tracker || tracker.classList.contains('hide')) && text !== before.trim()
                && /instance|Error/.test(text);
        }""",
        arg=before, timeout=timeout_ms,
    )
    return page.inner_text("#status").strip()
