"""Labeling configs of each supported kind, test images, region decoders and server processes
shared by the Label Studio tests (a plain module: pytest puts this folder on sys.path for its conftest)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

IMAGE = '<Image name="image" value="$image"/>'
PROMPT_BOX = '<TextArea name="prompt" toName="image" editable="true" rows="1"/>'
CONFIGS = {
    "brush": f'<View>{IMAGE}<BrushLabels name="tag" toName="image"><Label value="cat"/>'
             f'<Label value="dog" hint="small dog"/></BrushLabels>{PROMPT_BOX}</View>',
    "polygon": f'<View>{IMAGE}<PolygonLabels name="poly" toName="image"><Label value="cat"/>'
               f'<Label value="dog"/></PolygonLabels>{PROMPT_BOX}</View>',
    "rectangle": f'<View>{IMAGE}<RectangleLabels name="box" toName="image"><Label value="cat"/>'
                 f'<Label value="dog"/></RectangleLabels>{PROMPT_BOX}</View>',
    "labels+rectangle": f'<View>{IMAGE}<Labels name="lab" toName="image"><Label value="cat"/></Labels>'
                        f'<Rectangle name="rect" toName="image"/>{PROMPT_BOX}</View>',
    "clicks": f'<View>{IMAGE}<KeyPointLabels name="kp" toName="image" smart="true"><Label value="cat"/>'
              f'<Label value="dog"/></KeyPointLabels><RectangleLabels name="rect" toName="image" smart="true">'
              f'<Label value="cat"/><Label value="dog"/></RectangleLabels><BrushLabels name="tag" toName="image">'
              f'<Label value="cat"/><Label value="dog"/></BrushLabels>{PROMPT_BOX}</View>',
}
THRESHOLD = 0.0  # the tiny random model scores ~0.25
VIDEO_CONFIG = ('<View><Video name="video" value="$video" frameRate="5"/><Labels name="labels" toName="video">'
                '<Label value="cat"/><Label value="dog" hint="small dog"/></Labels>'
                '<VideoRectangle name="box" toName="video"/>'
                '<TextArea name="prompt" toName="video" editable="true" rows="1"/></View>')
VIDEO_FPS = 5
VIDEO_THRESHOLD = 0.2545  # keeps the tiny random video model's few best detections per frame


def make_image(seed: int, size=(48, 64)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 60, (*size, 3), dtype=np.uint8)
    image[8:30, 10:35] = (220, 40, 40)
    image[20:44, 40:60] = (40, 200, 60)
    return image



def video_scene(t: int, height: int = 72, width: int = 96) -> np.ndarray:
    """Frame `t` of two discs moving across a dark background."""
    from skimage.draw import disk

    frame = np.full((height, width, 3), 40, np.uint8)
    frame[disk((30, 20 + 3 * t), 12, shape=(height, width))] = (220, 60, 60)
    frame[disk((50, 70 - 2 * t), 9, shape=(height, width))] = (60, 200, 90)
    return frame


def write_mp4(path, count: int = 10, fps: int = VIDEO_FPS) -> str:
    """`count` frames of `video_scene` as an MPEG-4 file at `fps` (PyAV)."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 96, 72, "yuv420p"
        for t in range(count):
            for packet in stream.encode(av.VideoFrame.from_ndarray(video_scene(t), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return str(path)


def decode_brush(region: dict) -> np.ndarray:
    """A brush region's mask as a boolean (H, W) array, through the SDK's decoder."""
    from label_studio_sdk.converter.brush import decode_rle

    height, width = region["original_height"], region["original_width"]
    return decode_rle(region["value"]["rle"]).reshape(height, width, 4)[:, :, 3] > 0


def region_label(region: dict) -> str:
    return region["value"][region["type"]][0]


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop(process: subprocess.Popen) -> None:
    """Stop a server a test started, by its PID (its own process group), SIGKILL if it lingers."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


# -- a real Label Studio server ------------------------------------------------------------------------

TOKEN = "promptsegtesttoken0123456789"  # the test user's legacy token
USER, PASSWORD = "test@example.com", "promptseg-pass-1"
FALLBACK = Path(__file__).resolve().parents[2] / ".venv-labelstudio" / "bin" / "label-studio"
STARTUP_SECONDS = 480  # a first start migrates a fresh sqlite database (~30 s, minutes on a busy 2-core box)


def label_studio_executable() -> str | None:
    """`PROMPTSEG_LABEL_STUDIO`, else ``label-studio`` on PATH, else the ``.venv-labelstudio`` one."""
    configured = os.environ.get("PROMPTSEG_LABEL_STUDIO")
    if configured:
        return configured if Path(configured).exists() or shutil.which(configured) else None
    return shutil.which("label-studio") or (str(FALLBACK) if FALLBACK.exists() else None)


def wait_for(url: str, process: subprocess.Popen, seconds: float, log: Path) -> None:
    """Poll `url` until it answers 200; fail with the log's tail if `process` exits or time runs out."""
    import pytest
    import requests

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"{url} exited with {process.returncode} while starting:\n{log.read_text()[-3000:]}")
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(1)
    pytest.fail(f"{url} did not come up within {seconds} s:\n{log.read_text()[-3000:]}")


def start(command: list[str], env: dict, log: Path) -> subprocess.Popen:
    """`command` in its own process group (so `stop` ends it and its children), output to `log`."""
    with open(log, "wb") as out:
        return subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


@contextmanager
def running_label_studio(data: Path):
    """A real Label Studio on 127.0.0.1 with its data in `data`, user `USER` with legacy token `TOKEN`; yields its URL."""
    import pytest

    executable = label_studio_executable()
    if executable is None:
        pytest.fail("Label Studio is not installed: run `bash scripts/install.sh --test` (it creates "
                    ".venv-labelstudio) or set PROMPTSEG_LABEL_STUDIO to a label-studio executable.")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LABEL_STUDIO_", "DJANGO_"))}
    env.update(
        LABEL_STUDIO_BASE_DATA_DIR=str(data), LABEL_STUDIO_HOST=url, HOME=str(data),
        ML_BLOCK_LOCAL_IP="false", SSRF_PROTECTION_ENABLED="false", LATEST_VERSION_CHECK="false",
        COLLECT_ANALYTICS="false", DJANGO_DB="sqlite",
        # a busy 2-core CI runner can exceed the 1 s health / 3 s setup defaults
        ML_TIMEOUT_HEALTH="10", ML_TIMEOUT_SETUP="30",
    )
    command = [executable, "start", "--no-browser", "--internal-host", "127.0.0.1", "--port", str(port),
               "--username", USER, "--password", PASSWORD, "--user-token", TOKEN, "--enable-legacy-api-token"]
    log = data / "label-studio.log"
    process = start(command, env, log)
    try:
        wait_for(f"{url}/health", process, STARTUP_SECONDS, log)
        yield url
    finally:
        stop(process)


# -- the container's files -----------------------------------------------------------------------------

PACKAGING = Path(__file__).resolve().parents[2] / "plugins" / "labelstudio"
DOCKERFILE = PACKAGING / "Dockerfile"
COMPOSE_FILE = PACKAGING / "docker-compose.yml"


def dockerfile_instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of each instruction, continuation lines joined, comments dropped."""
    instructions, pending = [], ""
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        word, _, rest = pending.strip().partition(" ")
        instructions.append((word.upper(), rest.strip()))
        pending = ""
    return instructions


def dockerfile_env(path: Path = DOCKERFILE) -> dict[str, str]:
    """The variables the image's ENV instructions set."""
    import shlex

    return dict(pair.split("=", 1) for kind, args in dockerfile_instructions(path) if kind == "ENV"
                for pair in shlex.split(args))


def exec_form(path: Path, instruction: str) -> list[str]:
    """The JSON (exec form) command of the last `instruction` (``CMD``, or ``HEALTHCHECK``'s ``CMD``)."""
    import json

    [*_, args] = [args for kind, args in dockerfile_instructions(path) if kind == instruction]
    return json.loads(args[args.index("CMD ") + 4:] if instruction == "HEALTHCHECK" else args)


def compose_environment(service: dict, shell: dict[str, str]) -> dict[str, str]:
    """A compose service's environment as Docker Compose sets it: ``${NAME:-default}`` from `shell`."""
    import re

    def value(text) -> str:
        return re.sub(r"\$\{(\w+)(?::-([^}]*))?\}", lambda m: shell.get(m.group(1)) or m.group(2) or "", str(text))

    return {name: value(text) for name, text in service["environment"].items()}


def model_loads(log: str) -> dict[int, int]:
    """How many times each process (by the pid in its log lines) loaded the model."""
    import re
    from collections import Counter

    return dict(Counter(int(pid) for pid in re.findall(r"\[(\d+)\] INFO promptseg\.sessions: Loading shared segmenter", log)))


def server_env(**values: str) -> dict[str, str]:
    """This process's environment without any backend or server setting, plus `values`; this venv's scripts first on PATH."""
    import sys

    names = ("HOST", "PORT", "WORKERS", "THREADS", "LOG_LEVEL", "DEVICE", "HF_TOKEN", "HF_HOME", "LOCAL_FILES_DOCUMENT_ROOT")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("LABEL_STUDIO_", "BASIC_AUTH_", "PROMPTSEG_", "GUNICORN_")) and k not in names}
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env.update(values)
    return env
