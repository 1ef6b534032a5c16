"""Screenshot Label Studio with promptseg: docs/images/labelstudio-*.png.

    python tests/labelstudio/make_screenshots.py [--scene preannotation|clicks|video] [--model DIR]

Starts a real Label Studio (temp data dir, 127.0.0.1) and the backend, and on an image bundled
with scikit-image makes two scenes:

* ``preannotation``: a brush project, batch pre-annotation, the labeling page and the model
  settings page;
* ``clicks``: a project with smart keypoints, a smart rectangle and brush labels. In the labeling
  page with Auto-Annotation on, the editor is driven like an annotator (label hotkey, ``M`` for
  Auto-Detect, a click, an Alt+click; then a smart box): Label Studio itself sends the requests to
  the backend and shows the returned mask as a suggestion, captured after the clicks
  (labelstudio-clicks.png) and after the box (labelstudio-box.png);
* ``video``: a ``VideoRectangle`` project on a short WebM (the image panned), batch pre-annotation
  and the labeling page with the tracks (labelstudio-video.png).

Headless Chromium (``apt-get install chromium``) is driven over the DevTools pipe protocol (stdlib
only). Without --model it uses a tiny random SAM 3 in the hub's layout, so the masks are not
meaningful: the pictures show the workflow. Pass a real model (``facebook/sam3``) for real masks.
"""

from __future__ import annotations

import argparse
import base64
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


def labels(cup: str, saucer: str) -> str:
    return f'<Label value="cup" background="{cup}"/><Label value="saucer" background="{saucer}"/>'


# The same label values on each tag (the clicks' label names the mask) and a colour per tag, so the
# clicks, the box and the mask tell apart; strokeWidth makes the keypoints and the box visible.
CLICKS_CONFIG = ('<View><Image name="image" value="$image" zoom="true"/>'
                 f'<KeyPointLabels name="kp" toName="image" smart="true" strokeWidth="8">{labels("#ffe119", "#f58231")}</KeyPointLabels>'
                 f'<RectangleLabels name="rect" toName="image" smart="true" strokeWidth="3">{labels("#4363d8", "#911eb4")}</RectangleLabels>'
                 f'<BrushLabels name="tag" toName="image">{labels("#e6194b", "#3cb44b")}</BrushLabels></View>')
# On skimage's coffee picture, in percent of the image: a click on the cup, a negative click on the
# spoon, a box around the cup (x0, y0, x1, y1).
CUP, SPOON, BOX = (48.0, 40.0), (61.0, 72.0), (28.0, 4.0, 69.0, 77.0)
# Set before the editor loads: Auto-Annotation on, suggestions shown for review (not auto-accepted),
# and every interactive request the editor sends kept in `window.sentContexts`.
EDITOR_SETUP = """
localStorage.setItem('autoAnnotation', 'true');
localStorage.setItem('autoAcceptSuggestions', 'false');
window.sentContexts = [];
const originalFetch = window.fetch;
window.fetch = async function (url, options) {
  const response = await originalFetch.apply(this, arguments);
  if (String(url).includes('/interactive-annotating')) window.sentContexts.push(JSON.parse(options.body).context);
  return response;
};
"""


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

    def before_each_page(self, script: str) -> None:
        """Run `script` in every page before the page's own scripts (e.g. to set localStorage)."""
        self.call("Page.addScriptToEvaluateOnNewDocument", source=script)

    def screenshot(self, url: str, path: Path, settle: float = 10.0) -> None:
        self.call("Page.navigate", url=url)
        time.sleep(settle)  # the labeling app renders after several XHRs
        self.capture(path)

    def capture(self, path: Path) -> None:
        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"]))

    def evaluate(self, expression: str):
        """The JSON value of a JavaScript expression in the page."""
        reply = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in reply:
            raise RuntimeError(f"{expression}: {reply['exceptionDetails']}")
        return reply["result"].get("value")

    def wait_until(self, expression: str, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.evaluate(f"(() => {{ try {{ return !!({expression}); }} catch (e) {{ return false; }} }})()"):
                return
            time.sleep(0.5)
        raise RuntimeError(f"the page did not reach `{expression}` within {seconds} s")

    def press(self, key: str) -> None:
        """A letter or digit key, as a hotkey."""
        code = f"Digit{key}" if key.isdigit() else f"Key{key.upper()}"
        common = {"key": key, "code": code, "windowsVirtualKeyCode": ord(key.upper())}
        self.call("Input.dispatchKeyEvent", type="keyDown", text=key, **common)
        self.call("Input.dispatchKeyEvent", type="keyUp", **common)

    def click(self, x: float, y: float, alt: bool = False) -> None:
        modifiers = 1 if alt else 0  # DevTools' bit for Alt
        alt_key = {"key": "Alt", "code": "AltLeft", "windowsVirtualKeyCode": 18}
        if alt:
            self.call("Input.dispatchKeyEvent", type="keyDown", modifiers=modifiers, **alt_key)
        self.call("Input.dispatchMouseEvent", type="mouseMoved", x=x, y=y, modifiers=modifiers)
        for kind, buttons in (("mousePressed", 1), ("mouseReleased", 0)):
            self.call("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", buttons=buttons,
                      clickCount=1, modifiers=modifiers)
        if alt:
            self.call("Input.dispatchKeyEvent", type="keyUp", **alt_key)

    def drag(self, x0: float, y0: float, x1: float, y1: float, steps: int = 10) -> None:
        self.call("Input.dispatchMouseEvent", type="mouseMoved", x=x0, y=y0)
        self.call("Input.dispatchMouseEvent", type="mousePressed", x=x0, y=y0, button="left", buttons=1, clickCount=1)
        for step in range(1, steps + 1):
            self.call("Input.dispatchMouseEvent", type="mouseMoved", x=x0 + (x1 - x0) * step / steps,
                      y=y0 + (y1 - y0) * step / steps, button="left", buttons=1)
            time.sleep(0.05)
        self.call("Input.dispatchMouseEvent", type="mouseReleased", x=x1, y=y1, button="left", buttons=0, clickCount=1)

    def close(self) -> None:
        stop(self.process)


def make_project(ls, url: str, title: str, config: str, image: Path, backend: str, extra_params: dict):
    """A project with `config`, `image` uploaded as its one task and the backend connected (interactive)."""
    project = ls.projects.create(title=title, label_config=config)
    with open(image, "rb") as handle:
        requests.post(f"{url}/api/projects/{project.id}/import", headers={"Authorization": f"Token {TOKEN}"},
                      files={"file": (image.name, handle, "image/png")}, timeout=60).raise_for_status()
    ml = ls.ml.create(project=project.id, url=backend, title="promptseg", is_interactive=True, extra_params=extra_params)
    return project, next(iter(ls.tasks.list(project=project.id))), ml


def preannotation_scene(ls, url, backend, image, extra_params, browser) -> list[Path]:
    project, task, _ = make_project(ls, url, "promptseg pre-annotation", CONFIG, image, backend, extra_params)
    ls.actions.create(id="retrieve_tasks_predictions", project=project.id, selected_items={"all": True, "excluded": []})
    shots = [OUT / "labelstudio-preannotation.png", OUT / "labelstudio-model-settings.png"]
    browser.screenshot(f"{url}/projects/{project.id}/data?task={task.id}", shots[0])
    browser.screenshot(f"{url}/projects/{project.id}/settings/ml", shots[1], settle=6)
    return shots


def clicks_scene(ls, url, backend, image, extra_params, browser) -> list[Path]:
    """Clicks, then a box, in the real editor with Auto-Annotation on; each suggestion captured.

    The editor sends the backend the smart regions of one kind and label: after the second click both
    keypoints (the Alt-click one with ``is_positive: false``), and a smart rectangle on its own.
    """
    project, task, _ = make_project(ls, url, "promptseg clicks", CLICKS_CONFIG, image, backend, extra_params)
    ls.projects.update(project.id, show_collab_predictions=False)  # start from an empty annotation
    browser.before_each_page(EDITOR_SETUP)
    browser.call("Page.navigate", url=f"{url}/projects/{project.id}/data?task={task.id}")
    browser.wait_until("window.Htx.annotationStore.selected && document.querySelector('.konvajs-content')", 120)
    time.sleep(2)  # the image finishes loading
    area = browser.evaluate("(() => { const r = document.querySelector('.konvajs-content').getBoundingClientRect();"
                            " return [r.x, r.y, r.width, r.height]; })()")

    def at(x_percent: float, y_percent: float) -> tuple[float, float]:
        return area[0] + area[2] * x_percent / 100, area[1] + area[3] * y_percent / 100

    def suggestion_for(requests_sent: int) -> None:
        browser.wait_until(f"window.sentContexts.length === {requests_sent}"
                           " && window.Htx.annotationStore.selected.suggestions.size > 0", 120)
        time.sleep(2)  # the brush is drawn

    browser.press("1")  # the keypoint tag's "cup"
    browser.press("m")  # Auto-Detect: the smart keypoint tool
    browser.click(*at(*CUP))
    suggestion_for(1)
    browser.press("1")  # the label is unselected after each region
    browser.click(*at(*SPOON), alt=True)
    suggestion_for(2)
    sent = browser.evaluate("window.sentContexts[1]")["result"]
    if [(r["type"], r.get("is_positive")) for r in sent] != [("keypointlabels", True), ("keypointlabels", False)]:
        raise RuntimeError(f"the editor did not send a positive and a negative keypoint: {sent}")
    shots = [OUT / "labelstudio-clicks.png", OUT / "labelstudio-box.png"]
    browser.capture(shots[0])

    browser.evaluate("document.querySelector('.lsf-auto-accept__action_type_reject').click()")  # start over
    browser.press("3")  # the rectangle tag's "cup"
    browser.evaluate("document.querySelector('.lsf-toolbar__smart [aria-label=rectangle-tool]').click()")
    x0, y0, x1, y1 = BOX
    browser.drag(*at(x0, y0), *at(x1, y1))
    suggestion_for(3)
    browser.capture(shots[1])
    return shots


VIDEO_CONFIG = ('<View><Video name="video" value="$video" frameRate="8"/>'
                '<Labels name="labels" toName="video"><Label value="cup" background="#e6194b"/>'
                '<Label value="saucer" background="#3cb44b"/></Labels>'
                '<VideoRectangle name="box" toName="video"/></View>')


def pan_video(image: Path, path: Path, frames: int = 16, fps: int = 8) -> Path:
    """A VP9 WebM (which Chromium plays) panning a 320x240 window across `image`, `frames` frames at `fps`."""
    import av
    import numpy as np
    from PIL import Image

    pixels = np.asarray(Image.open(image).convert("RGB"))
    step = (pixels.shape[1] - 320) // frames
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libvpx-vp9", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 320, 240, "yuv420p"
        for t in range(frames):
            crop = np.ascontiguousarray(pixels[100:340, t * step:t * step + 320])
            for packet in stream.encode(av.VideoFrame.from_ndarray(crop, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def video_scene(ls, url, backend, image, extra_params, browser) -> list[Path]:
    """Batch pre-annotation of a video project; the labeling page shows the tracks and their timeline."""
    video = pan_video(image, image.with_name("coffee-pan.webm"))
    project = ls.projects.create(title="promptseg video", label_config=VIDEO_CONFIG)
    with open(video, "rb") as handle:
        requests.post(f"{url}/api/projects/{project.id}/import", headers={"Authorization": f"Token {TOKEN}"},
                      files={"file": (video.name, handle, "video/webm")}, timeout=60).raise_for_status()
    task = next(iter(ls.tasks.list(project=project.id)))
    # clean-up options do not apply to videos; the tiny random model scores about 0.25
    params = {k: v for k, v in extra_params.items() if k == "threshold"}
    if "threshold" in params:
        params = {"threshold": 0.2545, "new_threshold": 0.2581}
    ls.ml.create(project=project.id, url=backend, title="promptseg", is_interactive=False, extra_params=params)
    ls.actions.create(id="retrieve_tasks_predictions", project=project.id, selected_items={"all": True, "excluded": []})
    if not list(ls.predictions.list(task=task.id)):
        raise RuntimeError("Label Studio stored no prediction for the video task: see the backend's log")
    shot = OUT / "labelstudio-video.png"
    browser.call("Emulation.setDeviceMetricsOverride", width=1400, height=1100, deviceScaleFactor=1, mobile=False)
    browser.screenshot(f"{url}/projects/{project.id}/data?task={task.id}", shot, settle=15)
    return [shot]


SCENES = {"preannotation": preannotation_scene, "clicks": clicks_scene, "video": video_scene}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--label-studio", default=os.environ.get("PROMPTSEG_LABEL_STUDIO")
                        or shutil.which("label-studio")
                        or str(Path(__file__).resolve().parents[2] / ".venv-labelstudio" / "bin" / "label-studio"))
    parser.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser"))
    parser.add_argument("--model", default=None, help="model dir or hub id (default: a tiny random SAM 3)")
    parser.add_argument("--scene", choices=sorted(SCENES), action="append",
                        help="scene to capture (repeatable; default: all)")
    args = parser.parse_args(argv)
    if not args.chromium:
        print("Chromium not found: apt-get install chromium", file=sys.stderr)
        return 2
    from label_studio_sdk import LabelStudio
    from PIL import Image
    from skimage import data as skdata

    work = Path(tempfile.mkdtemp(prefix="promptseg-shots-"))
    model = args.model
    if model is None:  # the hub's layout: the tracker head answers clicks, the detector text; 128 wide tracks video
        from promptseg.testing import make_random_sam3_video

        model = str(make_random_sam3_video(work / "tiny-sam3", hidden=128))
    # the random tiny model scores about 0.25; a real one keeps the core's default threshold
    extra_params = {"max_instances": 6, **({"threshold": 0.0} if args.model is None else {})}
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
            shots = [shot for name in args.scene or SCENES
                     for shot in SCENES[name](ls, url, backend, image, extra_params, browser)]
        finally:
            browser.close()
        print("Wrote " + ", ".join(str(shot) for shot in shots))
    finally:
        for process in processes:
            stop(process)
    return 0


if __name__ == "__main__":
    sys.exit(main())
