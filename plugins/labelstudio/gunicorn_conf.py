"""gunicorn's configuration for the backend, from HOST, PORT, WORKERS, THREADS and LOG_LEVEL:

    gunicorn --config python:promptseg_labelstudio.gunicorn_conf promptseg_labelstudio._wsgi:app

(the container's start command). The backend's own settings (LABEL_STUDIO_URL, PROMPTSEG_MODEL,
DEVICE, ...) are checked here, in the master, so a bad value stops the server at once with its fix;
the model itself loads in each worker after the fork (no ``--preload``), once per worker.
"""

from __future__ import annotations

from promptseg.errors import PromptsegError
from promptseg_labelstudio.serving import ServerSettings, configure_logging, gunicorn_options


def _checked_settings() -> ServerSettings:
    from promptseg_labelstudio.config import BackendConfig
    from promptseg_labelstudio.shared_settings import share_between_workers

    try:
        settings = ServerSettings.from_env()
        share_between_workers(settings.workers)  # what /setup tells one worker, the others read
        BackendConfig.from_env()
    except PromptsegError as exc:
        raise SystemExit(f"promptseg: error: {exc}") from None
    return settings


_settings = _checked_settings()
globals().update(gunicorn_options(_settings))


def on_starting(server) -> None:
    """Warn when the server is reachable beyond this machine without basic auth."""
    from promptseg_labelstudio.config import BackendConfig, exposure_warning

    for address in server.cfg.bind:
        warning = exposure_warning(address.rsplit(":", 1)[0], BackendConfig.from_env())
        if warning:
            server.log.warning(warning)


def post_fork(server, worker) -> None:
    """promptseg's own log lines in each worker, at LOG_LEVEL."""
    configure_logging(_settings.log_level)
