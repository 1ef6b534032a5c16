"""`promptseg app`: serve the quick-try page (registered through the promptseg_add_commands hook).

Gradio is imported only when the command runs, never when this module is imported.
"""

from __future__ import annotations

import argparse
import importlib
import logging

from promptseg.cli import is_loopback, port_number
from promptseg.errors import OptionError
from promptseg.hookspecs import hookimpl

logger = logging.getLogger(__name__)

DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 7860
INSTALL_HINT = 'pip install "promptseg[app]"'



def exposure_warning(host: str, port: int) -> str | None:
    """What binding to `host` exposes, when it is not loopback (None when it is)."""
    if is_loopback(host):
        return None
    return (f"The page is bound to {host}, not to 127.0.0.1: anyone who can reach this machine on port {port} can "
            "upload images and run the model, with no login. Use --host 127.0.0.1 (the default) unless this "
            "network is yours, or put the page behind a proxy with authentication.")


@hookimpl
def promptseg_add_commands(subparsers) -> None:
    from promptseg.cli import add_model_options

    parser = subparsers.add_parser(
        "app", help="serve the quick-try web page (upload, prompt, see the masks)",
        description="Serve a local web page to try promptseg: upload or pick an image, type prompts, set the "
        "thresholds, see the overlay and the instances, download COCO JSON and a label PNG. The model loads on "
        f"the first run and stays loaded. Needs the app extra: {INSTALL_HINT}.",
    )
    parser.add_argument("--host", default=DEFAULT_HOST,
                        help="address to bind (default: %(default)s, this machine only; another address lets "
                        "other machines use the page, with no login)")
    parser.add_argument("--port", type=port_number, default=DEFAULT_PORT, help="port, 1-65535 (default: %(default)s)")
    add_model_options(parser)
    parser.set_defaults(func=run_app)


def run_app(args: argparse.Namespace) -> int:
    from promptseg_app.callbacks import AppSettings, QuickTry

    if args.max_pixels is not None:
        from promptseg.images import resolve_max_pixels

        resolve_max_pixels(args.max_pixels)  # a bad budget fails now, not at the first run
    page = _import_page()
    warning = exposure_warning(args.host, args.port)
    if warning:
        logger.warning(warning)
    settings = AppSettings(model=args.model, device=args.device, dtype=args.dtype,
                           cache_dir=False if args.no_cache else args.cache_dir, clip=args.clip,
                           max_pixels=args.max_pixels)
    print(f"promptseg app on http://{_url_host(args.host)}:{args.port} (model {args.model or 'default'}, "
          "loaded on the first run); Ctrl+C stops it.", flush=True)
    try:
        page.serve(QuickTry(settings), args.host, args.port)
    except OSError as exc:
        raise OptionError(f"Cannot serve on {args.host}:{args.port} ({exc}): pick a free port with --port, "
                          "or stop what uses this one.") from exc
    return 0


def _import_page():
    """`promptseg_app.page`, or an `OptionError` naming the extra when Gradio is missing."""
    try:
        page = importlib.import_module("promptseg_app.page")
    except ImportError as exc:
        if "gradio" not in str(exc):
            raise
        raise OptionError(f"The quick-try page needs Gradio ({exc}): {INSTALL_HINT}") from exc
    return page


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host
