"""WSGI entry, as in Label Studio's backend template: ``waitress-serve promptseg_labelstudio._wsgi:app``.

The app (and the model) is built on first access of `app`, from the environment. Run this file
directly for a quick start: ``python -m promptseg_labelstudio._wsgi --port 9090``.
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

            _app = create_app()
        return _app
    raise AttributeError(name)


def main(argv: list[str] | None = None) -> int:
    from promptseg_labelstudio._commands import port_number, thread_count, work_slots_for

    parser = argparse.ArgumentParser(description="promptseg Label Studio ML backend")
    parser.add_argument("-p", "--port", type=port_number, default=9090)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--threads", type=thread_count, default=4)
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from waitress import serve

    from promptseg_labelstudio.app import create_app
    from promptseg_labelstudio.config import BackendConfig, exposure_warning

    config = BackendConfig.from_env(work_slots=work_slots_for(args.threads))
    warning = exposure_warning(args.host, config)
    if warning:
        logging.getLogger(__name__).warning(warning)
    serve(create_app(config=config), host=args.host, port=args.port, threads=args.threads)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
