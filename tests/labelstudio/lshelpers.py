"""Labeling configs of each supported kind, test images, region decoders and server processes
shared by the Label Studio tests (a plain module: pytest puts this folder on sys.path for its conftest)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess

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


def make_image(seed: int, size=(48, 64)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 60, (*size, 3), dtype=np.uint8)
    image[8:30, 10:35] = (220, 40, 40)
    image[20:44, 40:60] = (40, 200, 60)
    return image



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
