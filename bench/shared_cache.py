"""A second concept asked on another machine over a shared embedding cache, against a cold run.

    python -m bench.shared_cache [--size full] [--images N] [--repeat R] [--url s3://bucket/prefix]

Machine A segments N images with one prompt, filling the shared store. Machine B (a new segmenter
with its own, empty local tier) then asks a new prompt of the same images: it downloads each
embedding instead of running the image encoder. The baseline is the same run of B with no cache at
all (cold), measured in this run. B once more shows the local tier (nothing downloaded). A's fill
is compared with a run that caches on the local disk only, which is the upload's cost.

The store is by default moto's S3-compatible server on 127.0.0.1 (S3 code path, no network, moto
installed); `--url` measures a real bucket or any fsspec URL instead, with credentials from the
environment. Times cover segmentation only, not loading the model; each row is the fastest of
`--repeat` runs on fresh caches (one at full size).
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import numpy as np

from bench._common import model_dir, parser, print_table, timed


@contextlib.contextmanager
def local_s3():
    """moto's S3 server on a free loopback port with one new bucket; yields the bucket's URL."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/moto-api/", timeout=2).close()
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError("moto's S3 server did not start within 60 s") from None
                time.sleep(0.2)
        os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
                          AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_EC2_METADATA_DISABLED="true")
        import s3fs

        bucket = f"bench-{uuid.uuid4().hex[:12]}"
        s3fs.S3FileSystem().mkdir(bucket)
        yield f"s3://{bucket}/embeddings"
    finally:
        server.terminate()
        server.wait(timeout=30)


def run(directory: Path, images: list[np.ndarray], prompt: str, cache_dir, local: Path | None = None):
    """Seconds to segment `images` with `prompt` on a new segmenter; the segmenter (for its counters)."""
    import promptseg

    if local is not None:
        os.environ["PROMPTSEG_LOCAL_CACHE_DIR"] = str(local)
    seg = promptseg.load_segmenter(str(directory), device="cpu", cache_dir=cache_dir)
    seconds, _ = timed(lambda: [seg.segment(image, prompt) for image in images])
    return seconds, seg


def best_of(repeat: int, attempt):
    """The fastest of `repeat` calls of ``attempt(i)`` (each on fresh state): its seconds and segmenter."""
    return min((attempt(i) for i in range(repeat)), key=lambda outcome: outcome[0])


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--images", type=int, default=20)
    p.add_argument("--repeat", type=int, default=3, help="runs per row, on fresh caches; the fastest is shown")
    p.add_argument("--url", help="a shared store to measure instead of a local S3 server (any fsspec URL)")
    args = p.parse_args()

    directory = model_dir(args.size)
    rng = np.random.default_rng(0)
    count = min(args.images, 4) if args.size == "full" else args.images
    repeat = 1 if args.size == "full" else args.repeat
    images = [rng.integers(0, 255, (480, 640, 3), dtype=np.uint8) for _ in range(count)]
    with tempfile.TemporaryDirectory() as work, (contextlib.nullcontext(args.url) if args.url else local_s3()) as url:
        work, url = Path(work), f"{url.rstrip('/')}/{uuid.uuid4().hex[:8]}"  # fresh prefixes under it
        run(directory, images[:1], "warm up", False)  # first-call costs belong to no row
        local_only, _ = best_of(repeat, lambda i: run(directory, images, "cat", work / f"local-only-{i}"))
        fill, a = best_of(repeat, lambda i: run(directory, images, "cat", f"{url}/{i}", work / f"machine-a-{i}"))
        stored = a.cache.disk.fs.du(a.cache.disk.base)  # what the store bills for
        cold, c = best_of(repeat, lambda i: run(directory, images, "dog", False))
        shared, b = best_of(repeat, lambda i: run(directory, images, "dog", f"{url}/0", work / f"machine-b-{i}"))
        again, b2 = best_of(repeat, lambda i: run(directory, images, "bird", f"{url}/0", work / f"machine-b-{i}"))
    n = len(images)
    store = "local S3 server (moto)" if not args.url else "your store"
    print_table(
        f"Second concept over {n} images on another machine, {args.size} SAM 3 on CPU, {store}, best of {repeat}",
        ["run", "seconds", "per image", "image encoder runs", "downloads", "uploads", "vs cold"],
        [["cold (no cache)", cold, cold / n, c.stats.image_encoder_runs, 0, 0, "1.0x"],
         ["B: shared cache, empty local tier", shared, shared / n, b.stats.image_encoder_runs,
          b.cache.disk.stats.downloads, b.cache.disk.stats.uploads, f"{cold / shared:.1f}x"],
         ["B again: local tier", again, again / n, b2.stats.image_encoder_runs, b2.cache.disk.stats.downloads,
          b2.cache.disk.stats.uploads, f"{cold / again:.1f}x"]],
    )
    print_table(f"Filling the shared store (machine A, first concept), best of {repeat}",
                ["run", "seconds", "per image", "uploads", "upload cost per image", "stored per image"],
                [["local disk cache only", local_only, local_only / n, 0, "", ""],
                 ["shared cache", fill, fill / n, a.cache.disk.stats.uploads, f"{(fill - local_only) / n:.3f} s",
                  f"{stored / n / 1024**2:.2f} MiB"]])
    if b.stats.image_encoder_runs or a.cache.disk.failure or b.cache.disk.failure:
        sys.exit(f"the shared store was not used: {a.cache.disk.failure or b.cache.disk.failure or 'encoder ran'}")


if __name__ == "__main__":
    main()
