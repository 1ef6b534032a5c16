"""WSGI entry, as in Label Studio's backend template: ``gunicorn promptseg_labelstudio._wsgi:app``
(the container runs it with `promptseg_labelstudio.gunicorn_conf`) or ``waitress-serve
promptseg_labelstudio._wsgi:app``.

The app (and the model) is built on first access of `app`, from the environment: in each gunicorn
worker after the fork, once. Run this file directly for a quick start: ``python -m
promptseg_labelstudio._wsgi --port 9090`` (HOST, PORT, WORKERS, THREADS, LOG_LEVEL from the
environment; flags win).
"""

from __future__ import annotations

import argparse
import logging

_app = None


def __getattr__(name: str):
    global _app
    if name == "app":
        if _app is None:
            from promptseg_labelstudio.app import create_app
            from promptseg_labelstudio.config import BackendConfig
            from promptseg_labelstudio.serving import ServerSettings

            _app = create_app(config=BackendConfig.from_env(work_slots=ServerSettings.from_env().work_slots))
        return _app
    raise AttributeError(name)


def main(argv: list[str] | None = None) -> int:
    from promptseg.errors import PromptsegError
    from promptseg_labelstudio._commands import add_server_arguments, server_settings, start

    parser = argparse.ArgumentParser(description="promptseg Label Studio ML backend")
    add_server_arguments(parser)
    args = parser.parse_args(argv)
    try:
        settings = server_settings(args)
        logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        start(settings)
    except PromptsegError as exc:
        parser.exit(2, f"promptseg: error: {exc}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
