"""Screenshot Label Studio showing promptseg pre-annotations: docs/images/labelstudio-*.png.

    python tests/labelstudio/make_screenshots.py [--label-studio PATH] [--model DIR]

Starts a real Label Studio (temp data dir, 127.0.0.1) and the backend, creates a brush project on
an image bundled with scikit-image, runs pre-annotation, then drives headless Chromium
(``apt-get install chromium``) over the DevTools pipe protocol (stdlib only) to log in and capture
the labeling page. Without --model it uses a tiny random SAM 3, so the masks are not meaningful:
the pictures show the workflow. Pass a real model directory for real masks.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

HERE = Path(__file__).resolve().parent
OUT = HERE.parent.parent / "docs" / "images"
TOKEN = "promptsegdocs0123456789"
CONFIG = ('<View><Image name="image" value="$image" zoom="true"/>'
          '<BrushLabels name="tag" toName="image"><Label value="cup" background="#e6194b"/>'
          '<Label value="saucer" background="#3cb44b"/></BrushLabels>'
          '<TextArea name="prompt" toName="image" editable="true" rows="1" placeholder="type what to segment"/></View>')


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(url: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(1)
    raise RuntimeError(f"{url} did not come up within {seconds} s")


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)


class Chromium:
    """Headless Chromium driven over ``--remote-debugging-pipe`` (NUL-separated JSON on fds 3/4)."""

    def __init__(self, executable: str, profile: Path) -> None:
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()

        def pipes_on_3_and_4():  # in the child only: Chromium reads fd 3 and writes fd 4
            os.dup2(to_browser_r, 3)
            os.dup2(from_browser_w, 4)

        self.process = subprocess.Popen(
            [executable, "--headless=new", "--remote-debugging-pipe", "--no-sandbox", "--disable-gpu",
             "--no-first-run", f"--user-data-dir={profile}", "--window-size=1400,900", "about:blank"],
            pass_fds=(3, 4), preexec_fn=pipes_on_3_and_4, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._buffer = b""
        self._id = 0
        self.session = None

    def call(self, method: str, timeout: float = 60, **params):
        self._id += 1
        message = {"id": self._id, "method": method, "params": params}
        if self.session:
            message["sessionId"] = self.session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            while b"\0" not in self._buffer:
                chunk = os.read(self._from_browser, 1 << 20)
                if not chunk:
                    raise RuntimeError("Chromium closed the DevTools pipe")
                self._buffer += chunk
            raw, self._buffer = self._buffer.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
        raise RuntimeError(f"{method} timed out")

    def open_page(self) -> None:
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = None
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.call("Page.enable")
        self.call("Emulation.setDeviceMetricsOverride", width=1400, height=900, deviceScaleFactor=1, mobile=False)

    def screenshot(self, url: str, path: Path, settle: float = 10.0) -> None:
        self.call("Page.navigate", url=url)
        time.sleep(settle)  # the labeling app renders after several XHRs
        data = self.call("Page.captureScreenshot", format="png")["data"]
        import base64

        path.write_bytes(base64.b64decode(data))

    def close(self) -> None:
        stop(self.process)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--label-studio", default=os.environ.get("PROMPTSEG_LABEL_STUDIO")
                        or shutil.which("label-studio")
                        or str(Path(__file__).resolve().parents[2] / ".venv-labelstudio" / "bin" / "label-studio"))
    parser.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser"))
    parser.add_argument("--model", default=None, help="model dir (default: a tiny random SAM 3)")
    args = parser.parse_args(argv)
    if not args.chromium:
        print("Chromium not found: apt-get install chromium", file=sys.stderr)
        return 2
    from label_studio_sdk import LabelStudio
    from PIL import Image
    from skimage import data as skdata

    work = Path(tempfile.mkdtemp(prefix="promptseg-shots-"))
    model = args.model
    if model is None:
        from promptseg.testing import make_random_sam3

        model = str(make_random_sam3(work / "tiny-sam3"))
    image = work / "coffee.png"
    Image.fromarray(skdata.coffee()).save(image)
    ls_port, be_port = free_port(), free_port()
    url, backend = f"http://127.0.0.1:{ls_port}", f"http://127.0.0.1:{be_port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("LABEL_STUDIO_")}
    env.update(LABEL_STUDIO_BASE_DATA_DIR=str(work / "ls"), LABEL_STUDIO_HOST=url, ML_BLOCK_LOCAL_IP="false",
               SSRF_PROTECTION_ENABLED="false", LATEST_VERSION_CHECK="false", COLLECT_ANALYTICS="false")
    email, password = "docs@example.com", "promptseg-docs-1"
    processes = []
    try:
        with open(work / "ls.log", "wb") as log:
            processes.append(subprocess.Popen(
                [args.label_studio, "start", "--no-browser", "--internal-host", "127.0.0.1", "--port", str(ls_port),
                 "--username", email, "--password", password, "--user-token", TOKEN, "--enable-legacy-api-token"],
                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        with open(work / "backend.log", "wb") as log:
            processes.append(subprocess.Popen(
                [sys.executable, "-m", "promptseg.cli", "labelstudio", "serve", "--port", str(be_port), "--model", model],
                env={**env, "PROMPTSEG_DEVICE": "cpu", "PROMPTSEG_CACHE_DIR": str(work / "cache")},
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        wait_for(f"{url}/health", 600)
        wait_for(f"{backend}/health", 180)
        ls = LabelStudio(base_url=url, api_key=TOKEN)
        project = ls.projects.create(title="promptseg pre-annotation", label_config=CONFIG)
        with open(image, "rb") as handle:
            requests.post(f"{url}/api/projects/{project.id}/import", headers={"Authorization": f"Token {TOKEN}"},
                          files={"file": (image.name, handle, "image/png")}, timeout=60).raise_for_status()
        ls.ml.create(project=project.id, url=backend, title="promptseg", is_interactive=True,
                     # the random tiny model scores about 0.25; a real one keeps the core's default threshold
                     extra_params={"max_instances": 6, **({"threshold": 0.0} if args.model is None else {})})
        ls.actions.create(id="retrieve_tasks_predictions", project=project.id, selected_items={"all": True, "excluded": []})
        task = next(iter(ls.tasks.list(project=project.id)))

        web = requests.Session()  # log in once, hand the session cookie to Chromium
        web.get(f"{url}/user/login/", timeout=30)
        web.post(f"{url}/user/login/", data={"email": email, "password": password,
                                             "csrfmiddlewaretoken": web.cookies.get("csrftoken")},
                 headers={"Referer": f"{url}/user/login/"}, timeout=30)
        browser = Chromium(args.chromium, work / "chrome")
        try:
            browser.open_page()
            for cookie in web.cookies:
                browser.call("Network.setCookie", name=cookie.name, value=cookie.value, domain="127.0.0.1", path="/")
            OUT.mkdir(parents=True, exist_ok=True)
            browser.screenshot(f"{url}/projects/{project.id}/data?task={task.id}", OUT / "labelstudio-preannotation.png")
            browser.screenshot(f"{url}/projects/{project.id}/settings/ml", OUT / "labelstudio-model-settings.png", settle=6)
        finally:
            browser.close()
        print(f"Wrote {OUT / 'labelstudio-preannotation.png'} and {OUT / 'labelstudio-model-settings.png'}")
    finally:
        for process in processes:
            stop(process)
    return 0


if __name__ == "__main__":
    sys.exit(main())
