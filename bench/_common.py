"""Shared benchmark helpers: models, timing, isolated peak-memory runs and table printing."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

BENCH_CACHE = Path(os.environ.get("PROMPTSEG_BENCH_DIR", Path.home() / ".cache" / "promptseg-bench"))


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--size", choices=["tiny", "full"], default="tiny",
                   help="tiny random SAM 3 (seconds) or the real 840M architecture with random weights (minutes)")
    return p


def model_dir(size: str) -> Path:
    """A random SAM 3 of the given size, built once and kept under PROMPTSEG_BENCH_DIR."""
    from promptseg.testing import make_random_sam3

    return make_random_sam3(BENCH_CACHE / f"sam3-{size}", size=size)


def timed(fn, repeat: int = 1) -> tuple[float, object]:
    """Best wall time of `repeat` calls, and the last return value."""
    best, value = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        value = fn()
        best = min(best, time.perf_counter() - start)
    return best, value


def run_isolated(module: str, args: list[str], limit_bytes: int = 16 * 1024**3, timeout: float = 900) -> dict:
    """Run ``python -m module args`` alone and return the JSON it prints last.

    The child measures its own peak RSS (`peak_rss_self`), so each number is isolated from the
    others. The child is killed when its resident memory passes `limit_bytes`, so a baseline that
    cannot fit reports "out of memory" instead of taking the machine down.
    """
    import psutil

    proc = subprocess.Popen([sys.executable, "-m", module, *args], stdout=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parent.parent)
    watcher = psutil.Process(proc.pid)
    killed, start = False, time.time()
    while proc.poll() is None:
        try:
            if watcher.memory_info().rss > limit_bytes or time.time() - start > timeout:
                proc.kill()
                killed = True
        except psutil.NoSuchProcess:
            pass
        time.sleep(0.05)
    out = proc.stdout.read()
    result = {"peak_rss": None, "killed": killed, "returncode": proc.returncode}
    if not killed and proc.returncode == 0 and out.strip():
        result.update(json.loads(out.strip().splitlines()[-1]))
    return result


def print_table(title: str, header: list[str], rows: list[list[object]]) -> None:
    cells = [[str(c) for c in header]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    print(f"\n{title}")
    for n, row in enumerate(cells):
        print("  " + "  ".join(c.rjust(w) if n else c.ljust(w) for c, w in zip(row, widths)))
        if n == 0:
            print("  " + "  ".join("-" * w for w in widths))


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if value < 100 else f"{value:.0f}"
    return str(value)


def mib(nbytes: float | None) -> str:
    return "n/a" if nbytes is None else f"{nbytes / 1024**2:.0f} MiB"


def reset_peak_rss() -> int:
    """Reset this process's peak-RSS mark (Linux `clear_refs` 5) and return the current RSS."""
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
    return _status_bytes("VmRSS")


def peak_rss_self() -> int:
    """Peak resident set size of this process since the last `reset_peak_rss`, in bytes."""
    return _status_bytes("VmHWM")


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")
