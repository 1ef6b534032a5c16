"""`promptseg labelstudio ...` sub-commands (registered through the promptseg_add_commands hook)."""

from __future__ import annotations

import argparse
import logging
import os

from promptseg.hookspecs import hookimpl
from promptseg.options import option_info

logger = logging.getLogger(__name__)
RESERVED_THREADS = 2  # kept free of /predict so /health and /setup answer at once


def port_number(text: str) -> int:
    """An argparse type: a TCP port, 1..65535."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a port number from 1 to 65535, got {text!r}") from None
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number from 1 to 65535, got {value}")
    return value


def thread_count(text: str) -> int:
    """An argparse type: a number of request threads, at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number of threads, at least 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def work_slots_for(threads: int) -> int | None:
    """Prediction slots for a server of `threads` threads (None: PROMPTSEG_WORK_SLOTS decides)."""
    if os.environ.get("PROMPTSEG_WORK_SLOTS"):
        return None
    if threads <= RESERVED_THREADS:
        logger.warning("With %d request thread(s), /health can wait behind /predict: use --threads %d or more.",
                       threads, RESERVED_THREADS + 1)
    return max(1, threads - RESERVED_THREADS)


@hookimpl
def promptseg_add_commands(subparsers) -> None:
    group = subparsers.add_parser("labelstudio", help="Label Studio ML backend",
                                  description="Serve promptseg as a Label Studio ML backend.")
    sub = group.add_subparsers(dest="labelstudio_command", metavar="COMMAND")
    serve = sub.add_parser(
        "serve", help="start the ML backend (waitress WSGI server)",
        description="Start the backend. Settings come from LABEL_STUDIO_URL, LABEL_STUDIO_API_KEY, "
        "BASIC_AUTH_USER/BASIC_AUTH_PASS, PROMPTSEG_MODEL, PROMPTSEG_THRESHOLD, PROMPTSEG_ALLOWED_HOSTS, "
        "LOCAL_FILES_DOCUMENT_ROOT, PROMPTSEG_TRUST_SETUP_HOST, PROMPTSEG_MAX_DOWNLOAD_BYTES, "
        "PROMPTSEG_DOWNLOAD_TIMEOUT, PROMPTSEG_MAX_VIDEO_BYTES, PROMPTSEG_VIDEO_DOWNLOAD_TIMEOUT, "
        "PROMPTSEG_MAX_VIDEO_FRAMES; options given here win.",
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s; 0.0.0.0 for all)")
    serve.add_argument("--port", type=port_number, default=9090, help="port, 1-65535 (default: %(default)s)")
    serve.add_argument("--model", default=None, help="hub id or local directory (default: PROMPTSEG_MODEL or facebook/sam3)")
    serve.add_argument("--device", default=None, help="auto, cpu, cuda, cuda:N or mps")
    serve.add_argument("--threshold", type=float, default=None,
                       help=f"default score threshold (PROMPTSEG_THRESHOLD, else {option_info('threshold').default})")
    serve.add_argument("--threads", type=thread_count, default=4,
                       help="request threads; all but 2 may run predictions at once (default: %(default)s)")
    serve.add_argument("--trust-setup-host", action="store_true", default=None,
                       help="without LABEL_STUDIO_URL, fetch Label Studio files from the host (with the token) "
                       "that /setup sends, even without basic auth (PROMPTSEG_TRUST_SETUP_HOST=1)")
    serve.set_defaults(func=run_serve)
    group.set_defaults(func=lambda args: (group.print_help(), 2)[1])


def run_serve(args: argparse.Namespace) -> int:
    from waitress import serve

    from promptseg_labelstudio.app import create_app
    from promptseg_labelstudio.config import BackendConfig, exposure_warning

    config = BackendConfig.from_env(model=args.model, device=args.device, threshold=args.threshold,
                                    trust_setup_host=args.trust_setup_host, work_slots=work_slots_for(args.threads))
    warning = exposure_warning(args.host, config)
    if warning:
        logger.warning(warning)
    app = create_app(config=config)
    print(f"promptseg Label Studio backend on http://{args.host}:{args.port} "
          f"(model {config.model or 'default'}); connect it in Project settings > Model.", flush=True)
    serve(app, host=args.host, port=args.port, threads=args.threads)
    return 0
