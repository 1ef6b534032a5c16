"""`promptseg labelstudio ...` sub-commands (registered through the promptseg_add_commands hook)."""

from __future__ import annotations

import argparse
import logging

from promptseg.cli import port_number
from promptseg.hookspecs import hookimpl
from promptseg.options import option_info
from promptseg_labelstudio.serving import LOG_LEVELS, RESERVED_THREADS, work_slots_for  # noqa: F401 - their old home

logger = logging.getLogger(__name__)
ENV_HELP = ("HOST, PORT, WORKERS, THREADS and LOG_LEVEL come from the environment too (flags win); "
            "WORKERS=1 serves with waitress, more with gunicorn's threaded workers, one model each.")



def positive_count(text: str) -> int:
    """An argparse type: a number of threads or workers, at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, at least 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    """--host, --port, --workers, --threads, --log-level: None unless given, so the environment decides."""
    parser.add_argument("--host", default=None, help="address to bind (HOST, else 127.0.0.1; 0.0.0.0 for all, "
                        "as in a container)")
    parser.add_argument("--port", type=port_number, default=None, help="port, 1-65535 (PORT, else 9090)")
    parser.add_argument("--workers", type=positive_count, default=None,
                        help="processes, each with its own model (WORKERS, else 1; more than 1 needs gunicorn)")
    parser.add_argument("--threads", type=positive_count, default=None,
                        help="request threads per worker; all but 2 may run predictions at once (THREADS, else 4)")
    parser.add_argument("--log-level", type=str.upper, choices=LOG_LEVELS, default=None,
                        help="how much to log (LOG_LEVEL, else INFO)")


def server_settings(args: argparse.Namespace):
    """The environment's `ServerSettings` with the flags given on top."""
    from promptseg_labelstudio.serving import ServerSettings

    return ServerSettings.from_env(host=args.host, port=args.port, workers=args.workers, threads=args.threads,
                                   log_level=args.log_level)


def start(settings, **config_overrides) -> None:
    """Check the backend's settings, then serve it (the model loads in the process, or each worker, that serves)."""
    from promptseg_labelstudio.app import create_app
    from promptseg_labelstudio.config import BackendConfig, exposure_warning
    from promptseg_labelstudio.serving import serve
    from promptseg_labelstudio.shared_settings import share_between_workers

    share_between_workers(settings.workers)
    config = BackendConfig.from_env(work_slots=settings.work_slots, **config_overrides)
    warning = exposure_warning(settings.host, config)
    if warning:
        logger.warning(warning)
    logger.info("promptseg Label Studio backend on http://%s:%d (model %s, %d worker(s) of %d threads); connect it "
                "in Project settings > Model.", settings.host, settings.port, config.model or "default",
                settings.workers, settings.threads)
    serve(settings, lambda: create_app(config=config))


@hookimpl
def promptseg_add_commands(subparsers) -> None:
    group = subparsers.add_parser("labelstudio", help="Label Studio ML backend",
                                  description="Serve promptseg as a Label Studio ML backend.")
    sub = group.add_subparsers(dest="labelstudio_command", metavar="COMMAND")
    serve = sub.add_parser(
        "serve", help="start the ML backend (waitress, or gunicorn for several workers)",
        description="Start the backend. Settings come from LABEL_STUDIO_URL, LABEL_STUDIO_API_KEY, "
        "BASIC_AUTH_USER/BASIC_AUTH_PASS, PROMPTSEG_MODEL, PROMPTSEG_THRESHOLD, PROMPTSEG_ALLOWED_HOSTS, "
        "LOCAL_FILES_DOCUMENT_ROOT, PROMPTSEG_TRUST_SETUP_HOST, PROMPTSEG_MAX_DOWNLOAD_BYTES, "
        "PROMPTSEG_DOWNLOAD_TIMEOUT, PROMPTSEG_MAX_VIDEO_BYTES, PROMPTSEG_VIDEO_DOWNLOAD_TIMEOUT, "
        "PROMPTSEG_MAX_VIDEO_FRAMES, DEVICE. " + ENV_HELP,
    )
    add_server_arguments(serve)
    serve.add_argument("--model", default=None, help="hub id or local directory (default: PROMPTSEG_MODEL or facebook/sam3)")
    serve.add_argument("--device", default=None, help="auto, cpu, cuda, cuda:N or mps (DEVICE or PROMPTSEG_DEVICE, else auto)")
    serve.add_argument("--threshold", type=float, default=None,
                       help=f"default score threshold (PROMPTSEG_THRESHOLD, else {option_info('threshold').default})")
    serve.add_argument("--trust-setup-host", action="store_true", default=None,
                       help="without LABEL_STUDIO_URL, fetch Label Studio files from the host (with the token) "
                       "that /setup sends, even without basic auth (PROMPTSEG_TRUST_SETUP_HOST=1)")
    serve.set_defaults(func=run_serve)
    group.set_defaults(func=lambda args: (group.print_help(), 2)[1])


def run_serve(args: argparse.Namespace) -> int:
    settings = server_settings(args)
    logging.getLogger().setLevel(settings.log_level)
    start(settings, model=args.model, device=args.device, threshold=args.threshold,
          trust_setup_host=args.trust_setup_host)
    return 0
