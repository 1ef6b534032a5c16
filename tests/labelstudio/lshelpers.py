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
