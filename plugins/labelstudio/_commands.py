"""`promptseg labelstudio ...` sub-commands (registered through the promptseg_add_commands hook)."""

from __future__ import annotations

import argparse

from promptseg.hookspecs import hookimpl


@hookimpl
def promptseg_add_commands(subparsers) -> None:
    group = subparsers.add_parser("labelstudio", help="Label Studio ML backend",
                                  description="Serve promptseg as a Label Studio ML backend.")
    sub = group.add_subparsers(dest="labelstudio_command", metavar="COMMAND")
    serve = sub.add_parser(
        "serve", help="start the ML backend (waitress WSGI server)",
        description="Start the backend. Settings come from LABEL_STUDIO_URL, LABEL_STUDIO_API_KEY, "
        "BASIC_AUTH_USER/BASIC_AUTH_PASS, PROMPTSEG_MODEL, PROMPTSEG_THRESHOLD, PROMPTSEG_ALLOWED_HOSTS, "
        "LOCAL_FILES_DOCUMENT_ROOT; options given here win.",
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s; 0.0.0.0 for all)")
    serve.add_argument("--port", type=int, default=9090, help="port (default: %(default)s)")
    serve.add_argument("--model", default=None, help="hub id or local directory (default: PROMPTSEG_MODEL or facebook/sam3)")
    serve.add_argument("--device", default=None, help="auto, cpu, cuda, cuda:N or mps")
    serve.add_argument("--threshold", type=float, default=None, help="default score threshold (PROMPTSEG_THRESHOLD, else 0.5)")
    serve.add_argument("--threads", type=int, default=4, help="request threads (default: %(default)s)")
    serve.set_defaults(func=run_serve)
    group.set_defaults(func=lambda args: (group.print_help(), 2)[1])


def run_serve(args: argparse.Namespace) -> int:
    from waitress import serve

    from promptseg_labelstudio.app import create_app
    from promptseg_labelstudio.config import BackendConfig

    config = BackendConfig.from_env(model=args.model, device=args.device, threshold=args.threshold)
    app = create_app(config=config)
    print(f"promptseg Label Studio backend on http://{args.host}:{args.port} "
          f"(model {config.model or 'default'}); connect it in Project settings > Model.", flush=True)
    serve(app, host=args.host, port=args.port, threads=args.threads)
    return 0
