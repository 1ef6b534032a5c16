"""Label Studio backend: interactive latency and concurrent throughput, against the core alone.

    python bench/labelstudio_backend.py [--model DIR] [--size 256] [--clients 4] [--requests 6]
    python bench/labelstudio_backend.py --health-under-load [--size 1000] [--threads 6]
    python bench/labelstudio_backend.py --gunicorn [--clients 4] [--requests 48]

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
  * --gunicorn: the container's own start command (the CMD of plugins/labelstudio/Dockerfile,
    gunicorn with WORKERS=2 THREADS=4, the image's ENV) against, as the baseline, ``promptseg
    labelstudio serve`` with WORKERS=1 THREADS=4 (waitress), each a server process of its own on
    127.0.0.1: the same --requests batch /predict requests on fresh images from --clients
    concurrent clients. Requests/s, median and p95 latency, the 503 answers (no prediction slot
    free; the client asks again 0.1 s later, so every request is answered in the end), the peak
    resident memory of each process, and the ratios gunicorn / waitress.
    As Label Studio does when a backend is connected, /setup is sent first: it carries the
    project's labeling config and its extra params (here the threshold the tiny model needs), and
    with several workers the one that receives it shares it with the others through a folder.
With no --model, a tiny random SAM 3 is built in a temp dir, so it runs in seconds.
"""

from __future__ import annotations

import argparse
import io
import logging
import socket
import statistics
import subprocess
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "labelstudio"))  # lshelpers: the Dockerfile's CMD and ENV, server processes

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


def start_server(kind: str, model_dir: str, work: Path, workers: int, threads: int, images: Path):
    """The container's CMD (``gunicorn``) or ``promptseg labelstudio serve`` (``waitress``) on 127.0.0.1,
    in its own process group, with the image's ENV (its /data volume in `work`); returns (process, url, log)."""
    from lshelpers import DOCKERFILE, dockerfile_env, exec_form, server_env, start

    data = work / f"data-{kind}"
    image_env = {k: v.replace("/data", str(data), 1) if v.startswith("/data/") else v for k, v in dockerfile_env().items()}
    port = free_port()
    env = server_env(**{**image_env, "HOST": "127.0.0.1", "PORT": str(port), "WORKERS": str(workers),
                        "THREADS": str(threads), "LOG_LEVEL": "INFO", "PROMPTSEG_MODEL": model_dir, "DEVICE": "cpu",
                        "LOCAL_FILES_DOCUMENT_ROOT": str(images), "HOME": str(work), "HF_HUB_OFFLINE": "1"})
    serve = [str(Path(sys.executable).with_name("promptseg")), "labelstudio", "serve"]  # the venv's script
    command = exec_form(DOCKERFILE, "CMD") if kind == "gunicorn" else serve
    log = work / f"{kind}.log"
    return start(command, env, log), f"http://127.0.0.1:{port}", log


def wait_until_serving(url: str, process: subprocess.Popen, log: Path, workers: int, seconds: float = 180) -> None:
    """Until /health answers and every worker has loaded the model; RuntimeError with the log's tail if not."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            up = requests.get(f"{url}/health", timeout=2).status_code == 200
        except requests.RequestException:
            up = False
        if up and log.read_text().count("Loading shared segmenter") >= workers:  # one line per worker
            return
        time.sleep(0.5)
    raise RuntimeError(f"{url} did not serve within {seconds} s:\n{log.read_text()[-3000:]}")


def peak_rss(process: subprocess.Popen) -> dict[int, int]:
    """Peak resident memory (VmHWM) of the server and of each of its child processes, by pid."""
    import psutil

    def hwm(pid: int) -> int:
        with open(f"/proc/{pid}/status") as status:
            return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))

    server = psutil.Process(process.pid)
    return {p.pid: hwm(p.pid) for p in [server, *server.children(recursive=True)]}


def load_run(url: str, names: list[str], clients: int) -> dict:
    """/setup, a warm-up round, then `names` as batch /predict requests from `clients` concurrent clients."""
    project = "1.1"
    setup = requests.post(f"{url}/setup", json={"project": project, "schema": CONFIG, "extra_params": {"threshold": 0.0}},
                          timeout=60)
    setup.raise_for_status()

    def ask(item: tuple[int, str]) -> tuple[float, int]:
        """Seconds until the prediction came back (a 503 is asked again 0.1 s later), and the 503s met."""
        index, name = item
        body = {"tasks": [{"id": index, "data": {"image": name}}], "project": project, "label_config": CONFIG}
        start, refused = time.perf_counter(), 0
        while True:  # a new connection per request, so gunicorn's workers share them as the kernel hands them out
            response = requests.post(f"{url}/predict", json=body, timeout=600)
            if response.status_code != 503:
                break
            refused += 1
            time.sleep(0.1)
        response.raise_for_status()
        result = response.json()["results"][0]
        if "error" in result:
            raise RuntimeError(result["error"])
        if not result["result"]:
            raise RuntimeError("a prediction came back without regions: its worker did not get /setup's threshold")
        return time.perf_counter() - start, refused

    warm, timed_names = names[:clients], names[clients:]
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(ask, enumerate(warm)))  # first forwards in each worker, not timed
        start = time.perf_counter()
        answers = list(pool.map(ask, enumerate(timed_names, start=len(warm))))
        wall = time.perf_counter() - start
    latencies = [seconds for seconds, _ in answers]
    return {"rate": len(answers) / wall, "refused": sum(refused for _, refused in answers),
            "median": statistics.median(latencies), "p95": float(np.percentile(latencies, 95))}


def run_gunicorn(args, model_dir: str, work: Path) -> int:
    """The container's gunicorn (2 workers x 4 threads) vs ``promptseg labelstudio serve`` (waitress, 1 x 4)."""
    from lshelpers import stop

    count = args.clients + args.requests  # warm-up round + timed requests, fresh images for each server
    images = make_images(work, 2 * count, args.size)
    rows = {}
    for offset, (kind, workers) in enumerate((("waitress", 1), ("gunicorn", 2))):
        process, url, log = start_server(kind, model_dir, work, workers, 4, work)
        try:
            wait_until_serving(url, process, log, workers)
            out = load_run(url, [p.name for p in images[offset * count:(offset + 1) * count]], args.clients)
            out["rss"] = peak_rss(process)
        finally:
            stop(process)
        rows[kind] = out
    print(f"{args.requests} batch /predict requests (1 task, 2 labels, {args.size}x{args.size} fresh images) from "
          f"{args.clients} concurrent clients, {Path(str(model_dir)).name}, 127.0.0.1")
    print(f"{'server':<38}{'req/s':>7}{'median s':>10}{'p95 s':>8}{'503s':>6}  peak RSS per process (MiB)")
    names = {"waitress": "serve WORKERS=1 THREADS=4 (waitress)", "gunicorn": "Dockerfile CMD WORKERS=2 THREADS=4"}
    for kind, out in rows.items():
        rss = " + ".join(f"{v / 1024**2:.0f}" for v in out["rss"].values())
        print(f"{names[kind]:<38}{out['rate']:>7.2f}{out['median']:>10.3f}{out['p95']:>8.3f}{out['refused']:>6}  {rss}"
              f" = {sum(out['rss'].values()) / 1024**2:.0f}")
    g, w = rows["gunicorn"], rows["waitress"]
    print(f"{'ratio gunicorn / waitress':<38}{g['rate'] / w['rate']:>7.2f}{g['median'] / w['median']:>10.2f}"
          f"{g['p95'] / w['p95']:>8.2f}{'':>6}  {sum(g['rss'].values()) / sum(w['rss'].values()):.2f}")
    print("latency: from the first try until the prediction came back; 503s: answers 'busy' (no prediction slot free), "
          "each asked again 0.1 s later; RSS: the gunicorn master first, then its workers")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model dir or hub id (default: a tiny random SAM 3)")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (default: %(default)s)")
    parser.add_argument("--clients", type=int, default=4, help="concurrent clients (default: %(default)s)")
    parser.add_argument("--requests", type=int, default=None,
                        help="requests per throughput run (default: 6, or 48 with --gunicorn)")
    parser.add_argument("--repeats", type=int, default=3, help="repeats per latency figure (default: %(default)s)")
    parser.add_argument("--health-under-load", action="store_true",
                        help="measure /health and /setup latency during slow downloads and an inference")
    parser.add_argument("--threads", type=int, default=6, help="server threads for --health-under-load (default: %(default)s)")
    parser.add_argument("--gunicorn", action="store_true",
                        help="the container's gunicorn (2 workers) vs `promptseg labelstudio serve` (waitress), under load")
    args = parser.parse_args(argv)
    if args.requests is None:
        args.requests = 48 if args.gunicorn else 6

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
    if args.gunicorn:
        return run_gunicorn(args, model_dir, work)
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
