"""The container's health check: ``python -m promptseg_labelstudio.healthcheck`` exits 0 when the
backend on this machine answers ``/health`` with status UP, 1 otherwise.

It asks 127.0.0.1 on PORT (9090 unless set), with BASIC_AUTH_USER/BASIC_AUTH_PASS when basic
auth is on, as Label Studio itself would. Only the standard library: it runs every few seconds.
"""

from __future__ import annotations

import base64
import json
import os
import sys
import urllib.request

TIMEOUT_SECONDS = 5


def healthy(port: int, user: str | None = None, password: str | None = None) -> bool:
    """Whether http://127.0.0.1:`port`/health answers 200 with ``"status": "UP"``."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}/health")
    if user:
        request.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{password or ''}".encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_SECONDS) as response:
            return response.status == 200 and json.load(response).get("status") == "UP"
    except (OSError, ValueError):
        return False


def main() -> int:
    port = int(os.environ.get("PORT") or 9090)
    ok = healthy(port, os.environ.get("BASIC_AUTH_USER"), os.environ.get("BASIC_AUTH_PASS"))
    if not ok:
        print(f"promptseg backend on 127.0.0.1:{port} is not answering /health", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
