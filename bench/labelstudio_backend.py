"""Label Studio backend: interactive latency and concurrent throughput, against the core alone.

    python bench/labelstudio_backend.py [--model DIR] [--size 256] [--clients 4] [--requests 6]
    python bench/labelstudio_backend.py --health-under-load [--size 1000] [--threads 6]

Serves the real app with waitress on 127.0.0.1 (a free port) and talks to it over HTTP, as Label
Studio does. Baselines are measured in the same run on the same segmenter:
  * interactive: the second typed prompt on an image already seen (embedding cached), through
    the backend, vs `Segmenter.segment` with the same prompt on the same cached image;
  * throughput: batch pre-annotation requests (one task, two label prompts each) on fresh
    images from one client and from several concurrent clients, vs the core called serially;
    plus the concurrent run again on images whose embeddings are cached (protocol overhead).
  * --health-under-load: /health and /setup latency while one request runs inference on a
    --size image and the other prediction slots download from a host trickling a byte every
    0.1 s (more /predict requests than slots get 503), with the prediction slots of
    `promptseg labelstudio serve --threads N` and, for comparison, with no slots.
With no --model, a tiny random SAM 3 is built in a temp dir, so it runs in seconds.
"""

from __future__ import annotations

import argparse
import io
import logging
import socket
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import requests

CONFIG = ('<View><Image name="image" value="$image"/><BrushLabels name="tag" toName="image">'
          '<Label value="cat"/><Label value="dog"/></BrushLabels>'
          '<TextArea name="prompt" toName="image"/></View>')


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_images(folder: Path, count: int, size: int) -> list[Path]:
    from PIL import Image

    paths = []
    for seed in range(count):
        rng = np.random.default_rng(seed)
        image = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
        image[size // 8: size // 2, size // 6: size // 2] = (220, 40, 40)
        image[size // 2: size - size // 8, size // 2: size - size // 6] = (40, 200, 60)
        path = folder / f"bench{seed}.png"
        Image.fromarray(image).save(path)
        paths.append(path)
    return paths


def context(text: str) -> dict:
    return {"result": [{"type": "textarea", "from_name": "prompt", "to_name": "image", "value": {"text": [text]}}]}


def post(session: requests.Session, url: str, image: str, ctx: dict | None = None) -> dict:
    body = {"tasks": [{"id": 1, "data": {"image": image}}], "project": "1.1", "label_config": CONFIG,
            "params": {"context": ctx}}
    response = session.post(f"{url}/predict", json=body, timeout=600)
    response.raise_for_status()
    result = response.json()["results"][0]
    if "error" in result:
        raise RuntimeError(result["error"])
    return result


def timed(fn, repeats: int) -> float:
    """Median seconds of `repeats` calls."""
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


class TrickleHost:
    """127.0.0.1 host: ``/slow/...`` declares 1 MB and sends a byte every 0.1 s; other paths get `image`."""

    def __init__(self, image: bytes) -> None:
        self.stop = threading.Event()
        host = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"

            def log_message(self, *args):
                pass

            def do_GET(self):
                slow = self.path.startswith("/slow/")
                self.send_response(200)
                self.send_header("Content-Length", str(1_000_000 if slow else len(image)))
                self.end_headers()
                try:
                    if not slow:
                        self.wfile.write(image)
                    while slow and not host.stop.wait(0.1):
                        self.wfile.write(b"\0")
                        self.wfile.flush()
                except OSError:
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self) -> None:
        self.stop.set()
        self.server.shutdown()
        self.server.server_close()


def health_under_load(model, image: bytes, threads: int, slots: int | None) -> dict:
    """Probe /health and /setup while one inference and `threads - 1` slow downloads are asked for."""
    from waitress import wasyncore
    from waitress.server import create_server

    from promptseg_labelstudio.app import create_app
    from promptseg_labelstudio.model import PromptsegMLBackend

    host = TrickleHost(image)
    config = replace(model.config, allowed_hosts=(host.url.split("//")[1],), work_slots=slots, download_timeout=120.0)
    server = create_server(create_app(PromptsegMLBackend(config, segmenter=model.segmenter)), host="127.0.0.1",
                           port=free_port(), threads=threads)
    url = f"http://127.0.0.1:{server.effective_port}"
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()

    def ask(image_url: str):
        body = {"tasks": [{"id": 1, "data": {"image": image_url}}], "label_config": CONFIG}
        return requests.post(f"{url}/predict", json=body, timeout=600)

    def probe(method, path, **kwargs) -> float:
        start = time.perf_counter()
        method(f"{url}{path}", timeout=600, **kwargs).raise_for_status()
        return time.perf_counter() - start

    setup_body = {"project": "1", "schema": CONFIG}
    idle = [probe(requests.get, "/health") for _ in range(20)]
    pool = ThreadPoolExecutor(threads)
    try:
        start = time.perf_counter()
        inference = pool.submit(ask, f"{host.url}/image.png")
        time.sleep(0.3)
        slow = [pool.submit(ask, f"{host.url}/slow/{i}.png") for i in range(threads - 1)]
        time.sleep(0.3)
        health, setup = [], []
        while not inference.done():
            health.append(probe(requests.get, "/health"))
            setup.append(probe(requests.post, "/setup", json=setup_body))
            time.sleep(0.05)
        inference_seconds = time.perf_counter() - start
        refused = sum(f.done() and f.result().status_code == 503 for f in slow)
    finally:
        host.close()
        wasyncore.close_all(server._map)
        pool.shutdown(wait=True, cancel_futures=True)
        thread.join(timeout=30)
    return {"idle": idle, "health": health, "setup": setup, "inference": inference_seconds, "refused": refused}


def run_health_under_load(args, model_dir: str, work: Path) -> int:
    from PIL import Image

    from promptseg_labelstudio._commands import RESERVED_THREADS
    from promptseg_labelstudio.config import BackendConfig
    from promptseg_labelstudio.model import PromptsegMLBackend

    def png(seed: int) -> bytes:  # a new image per run: its embedding is computed, not cached
        buffer = io.BytesIO()
        pixels = np.random.default_rng(seed).integers(0, 255, (args.size, args.size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(buffer, format="PNG")
        return buffer.getvalue()

    for name in ("promptseg_labelstudio", "waitress"):  # refused requests and failed downloads are expected here
        logging.getLogger(name).setLevel(logging.ERROR)
    model = PromptsegMLBackend(BackendConfig(model=model_dir, device="cpu", threshold=0.0, cache_dir=work / "cache"))
    slots = max(1, args.threads - RESERVED_THREADS)
    print(f"/health and /setup while 1 inference ({args.size}x{args.size}) and {args.threads - 1} slow downloads are asked "
          f"for, waitress --threads {args.threads}")
    print(f"{'prediction slots':<22}{'inference s':>12}{'503s':>6}{'probes':>8}{'health p50':>12}{'health max':>12}"
          f"{'setup max':>11}{'idle p50':>10}")
    for seed, (label, value) in enumerate(((f"{slots} (serve default)", slots), ("none (no limit)", None))):
        out = health_under_load(model, png(seed), args.threads, value)
        health = out["health"] or [float("nan")]
        print(f"{label:<22}{out['inference']:>12.2f}{out['refused']:>6}{len(out['health']):>8}"
              f"{statistics.median(health) * 1000:>10.1f}ms{max(health) * 1000:>10.1f}ms"
              f"{max(out['setup'] or [float('nan')]) * 1000:>9.1f}ms{statistics.median(out['idle']) * 1000:>8.1f}ms")
    print("A probe waits for a free server thread: with no slots, the downloads and the inference hold them all.")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model dir or hub id (default: a tiny random SAM 3)")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (default: %(default)s)")
    parser.add_argument("--clients", type=int, default=4, help="concurrent clients (default: %(default)s)")
    parser.add_argument("--requests", type=int, default=6, help="requests per throughput run (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="repeats per latency figure (default: %(default)s)")
    parser.add_argument("--health-under-load", action="store_true",
                        help="measure /health and /setup latency during slow downloads and an inference")
    parser.add_argument("--threads", type=int, default=6, help="server threads for --health-under-load (default: %(default)s)")
    args = parser.parse_args(argv)

    from waitress.server import create_server

    from promptseg_labelstudio.app import create_app
    from promptseg_labelstudio.config import BackendConfig
    from promptseg_labelstudio.model import PromptsegMLBackend

    work = Path(tempfile.mkdtemp(prefix="promptseg-bench-ls-"))
    model_dir = args.model
    if model_dir is None:
        from promptseg.testing import make_random_sam3

        model_dir = str(make_random_sam3(work / "tiny-sam3"))
    if args.health_under_load:
        return run_health_under_load(args, model_dir, work)
    images = make_images(work, 3 * args.requests, args.size)
    config = BackendConfig(model=model_dir, device="cpu", threshold=0.0, document_root=work, cache_dir=work / "cache",
                           work_slots=args.clients)
    model = PromptsegMLBackend(config)
    seg = model.segmenter
    # as `serve --threads N` does: N - 2 prediction slots, 2 threads kept for /health and /setup
    server = create_server(create_app(model), host="127.0.0.1", port=free_port(), threads=args.clients + 2)
    url = f"http://127.0.0.1:{server.effective_port}"
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    rows = []
    try:
        session = requests.Session()
        # Interactive: the image is seen once (first prompt), then a second prompt is timed.
        first = images[0]
        post(session, url, first.name, context("cat"))
        runs = seg.stats.image_encoder_runs
        backend_second = timed(lambda: post(session, url, first.name, context("small cat")), args.repeats)
        assert seg.stats.image_encoder_runs == runs, "second prompt re-ran the image encoder"
        core_second = timed(lambda: seg.segment(str(first), ["small cat"], threshold=0.0), args.repeats)
        rows.append(("interactive 2nd prompt, core alone", core_second * 1000, "ms", 1.0))
        rows.append(("interactive 2nd prompt, backend over HTTP", backend_second * 1000, "ms", backend_second / core_second))

        # Throughput: fresh images (embedding computed) in batch mode, one task per request.
        def run(clients: int, subset: list[Path]) -> float:
            sessions = [requests.Session() for _ in range(clients)]
            start = time.perf_counter()
            with ThreadPoolExecutor(clients) as pool:
                list(pool.map(lambda item: post(sessions[item[0] % clients], url, item[1].name), enumerate(subset)))
            return len(subset) / (time.perf_counter() - start)

        n = args.requests
        set_a, set_b, set_c = images[:n], images[n:2 * n], images[2 * n:3 * n]
        core_start = time.perf_counter()
        for path in set_a:
            seg.segment(str(path), ["cat", "dog"], threshold=0.0)
        core_rate = n / (time.perf_counter() - core_start)
        single_rate = run(1, set_b)
        concurrent_rate = run(args.clients, set_c)
        warm_rate = run(args.clients, set_a)  # embeddings cached by the core run: protocol overhead only
        rows.append(("pre-annotation, core alone, serial", core_rate, "img/s", 1.0))
        rows.append(("pre-annotation, backend, 1 client", single_rate, "img/s", single_rate / core_rate))
        rows.append((f"pre-annotation, backend, {args.clients} clients", concurrent_rate, "img/s", concurrent_rate / core_rate))
        rows.append((f"pre-annotation, backend, {args.clients} clients, cached", warm_rate, "img/s", warm_rate / core_rate))
    finally:
        server.close()
        thread.join(timeout=10)

    print(f"promptseg Label Studio backend, {Path(str(model_dir)).name}, {args.size}x{args.size} images, "
          f"{seg.describe()['device']}")
    print(f"{'measure':<46}{'value':>12}  {'unit':<6}{'ratio':>8}")
    for name, value, unit, ratio in rows:
        print(f"{name:<46}{value:>12.2f}  {unit:<6}{ratio:>8.2f}")
    print("ratio: vs the core alone measured in this run (latency: lower is better; throughput: higher is better)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
