"""How the backend is served: HOST, PORT, WORKERS, THREADS and LOG_LEVEL, the variables Label Studio's
example backends use, read the same way by ``promptseg labelstudio serve``, ``python -m
promptseg_labelstudio._wsgi`` and the container's gunicorn (`promptseg_labelstudio.gunicorn_conf`).

One worker is served by waitress (it runs everywhere, Windows included); several by gunicorn's
threaded workers, each loading the model once after the fork. In each worker all but
`RESERVED_THREADS` threads may run predictions, so ``/health`` and ``/setup`` never wait behind them.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace

from promptseg.errors import OptionError

logger = logging.getLogger(__name__)

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
LOG_FORMAT = "%(asctime)s [%(process)d] %(levelname)s %(name)s: %(message)s"
RESERVED_THREADS = 2  # kept free of /predict so /health and /setup answer at once
FIXES = {
    "PORT": "set PORT=9090 (or unset it)",
    "WORKERS": "set WORKERS=1 (each worker loads its own copy of the model) or unset it",
    "THREADS": "set THREADS=4 (or unset it); each worker keeps 2 threads free for /health and /setup",
}


@dataclass(frozen=True)
class ServerSettings:
    """Where and how the backend listens. The defaults keep it on this machine: a container sets HOST=0.0.0.0."""

    host: str = "127.0.0.1"
    port: int = 9090
    workers: int = 1
    threads: int = 4
    log_level: str = "INFO"

    @classmethod
    def from_env(cls, environ=None, **overrides) -> ServerSettings:
        """Settings from the environment; keyword `overrides` that are not None (command-line flags) win."""
        env = os.environ if environ is None else environ
        settings = cls(
            host=env.get("HOST") or cls.host,
            port=whole_number(env, "PORT", cls.port, 1, 65535),
            workers=whole_number(env, "WORKERS", cls.workers),
            threads=whole_number(env, "THREADS", cls.threads),
            log_level=log_level(env.get("LOG_LEVEL") or cls.log_level),
        )
        return replace(settings, **{k: v for k, v in overrides.items() if v is not None})

    @property
    def work_slots(self) -> int | None:
        """Prediction slots per worker (None: PROMPTSEG_WORK_SLOTS decides)."""
        return work_slots_for(self.threads)


def whole_number(env, name: str, default: int, low: int = 1, high: int | None = None) -> int:
    """A whole number from the environment, or `OptionError` naming the variable and the fix."""
    text = env.get(name)
    if text in (None, ""):
        return default
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < low or (high is not None and value > high):
        span = f"from {low} to {high}" if high is not None else f"of at least {low}"
        raise OptionError(f"{name} must be a whole number {span}, got {text!r}: {FIXES[name]}.")
    return value


def log_level(text: str) -> str:
    """A logging level name, upper-cased, or `OptionError` naming LOG_LEVEL and the fix."""
    name = text.strip().upper()
    if name not in LOG_LEVELS:
        raise OptionError(f"LOG_LEVEL must be one of {', '.join(LOG_LEVELS)}, got {text!r}: "
                          "set LOG_LEVEL=INFO (or unset it).")
    return name


def work_slots_for(threads: int) -> int | None:
    """Prediction slots for a server of `threads` threads (None: PROMPTSEG_WORK_SLOTS decides)."""
    if os.environ.get("PROMPTSEG_WORK_SLOTS"):
        return None
    if threads <= RESERVED_THREADS:
        logger.warning("With %d request thread(s), /health can wait behind /predict: use THREADS=%d (--threads) or more.",
                       threads, RESERVED_THREADS + 1)
    return max(1, threads - RESERVED_THREADS)


def configure_logging(level: str) -> None:
    """promptseg's log lines (with the process id, to tell workers apart) at `level`."""
    logging.basicConfig(level=level, format=LOG_FORMAT, force=True)


def gunicorn_options(settings: ServerSettings) -> dict:
    """gunicorn's settings for `settings`: threaded workers, which keep beating while requests run."""
    return {
        "bind": [f"{settings.host}:{settings.port}"],
        "workers": settings.workers,
        "threads": settings.threads,
        "worker_class": "gthread",
        "loglevel": settings.log_level.lower(),
        "preload_app": False,  # the model loads in each worker after the fork, never in the master
        "timeout": 120,  # a worker's heartbeat, not a request's: gthread workers beat while requests run
        "graceful_timeout": 30,
    }


def serve(settings: ServerSettings, build_app) -> None:
    """Serve the app `build_app()` makes: in this process with waitress (one worker), else with gunicorn.

    With gunicorn each worker calls `build_app` once, after the fork.
    """
    if settings.workers == 1:
        from waitress import serve as waitress_serve

        waitress_serve(build_app(), host=settings.host, port=settings.port, threads=settings.threads)
        return
    try:
        from gunicorn.app.base import BaseApplication
    except ImportError as exc:  # gunicorn does not run on Windows
        raise OptionError(f"WORKERS={settings.workers} needs gunicorn, which cannot be imported here ({exc}): "
                          "set WORKERS=1 (waitress), or install gunicorn on Linux or macOS.") from None

    class Server(BaseApplication):
        def load_config(self):
            for key, value in gunicorn_options(settings).items():
                self.cfg.set(key, value)
            self.cfg.set("post_fork", lambda server, worker: configure_logging(settings.log_level))

        def load(self):
            return build_app()

    Server().run()
