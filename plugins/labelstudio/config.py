"""Backend settings, read from Label Studio's usual environment variables.

Label Studio's own backends are configured by environment (``LABEL_STUDIO_URL``,
``LABEL_STUDIO_API_KEY``, ``BASIC_AUTH_USER``/``BASIC_AUTH_PASS``); promptseg adds its model,
its default score threshold and the limits that keep a network service safe.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from promptseg.errors import OptionError

DEFAULT_MAX_REQUEST_BYTES = 16 * 1024**2


@dataclass
class BackendConfig:
    """Everything the backend needs besides the project's labeling config.

    `label_studio_url`/`api_key` let it fetch uploaded and storage files (``/setup`` can supply
    them per project when they are unset). `allowed_hosts` are further hosts (``host`` or
    ``host:port``) image URLs may point at; no other host is ever contacted. `document_root`
    confines plain file paths and Local Storage files; without it plain paths are refused.
    """

    model: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    cache_dir: Path | None = None
    threshold: float = 0.5
    label_studio_url: str | None = None
    api_key: str | None = None
    basic_auth_user: str | None = None
    basic_auth_pass: str | None = None
    allowed_hosts: tuple[str, ...] = ()
    document_root: Path | None = None
    download_dir: Path | None = None
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES

    def __post_init__(self) -> None:
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)) or not 0 <= self.threshold <= 1:
            raise OptionError(f"PROMPTSEG_THRESHOLD must be a number between 0 and 1, got {self.threshold!r}.")
        if self.label_studio_url:
            self.label_studio_url = check_base_url(self.label_studio_url, "LABEL_STUDIO_URL")
        if bool(self.basic_auth_user) != bool(self.basic_auth_pass):
            raise OptionError("Set both BASIC_AUTH_USER and BASIC_AUTH_PASS, or neither.")
        if self.document_root is not None:
            root = Path(self.document_root).resolve()
            if not root.is_dir() or root == Path(root.anchor):
                raise OptionError(
                    f"The document root {self.document_root} must be an existing directory other than "
                    "the file-system root: set LOCAL_FILES_DOCUMENT_ROOT to the folder holding your images."
                )
            self.document_root = root
        if self.max_request_bytes < 1024:
            raise OptionError("PROMPTSEG_MAX_REQUEST_BYTES must be at least 1024.")

    @classmethod
    def from_env(cls, environ: dict | None = None, **overrides) -> BackendConfig:
        """Settings from the environment; keyword `overrides` (e.g. from the command line) win."""
        env = os.environ if environ is None else environ
        threshold = env.get("PROMPTSEG_THRESHOLD")
        try:
            threshold_value = float(threshold) if threshold not in (None, "") else 0.5
        except ValueError:
            raise OptionError(f"PROMPTSEG_THRESHOLD must be a number between 0 and 1, got {threshold!r}.") from None
        max_bytes = env.get("PROMPTSEG_MAX_REQUEST_BYTES")
        root = env.get("LOCAL_FILES_DOCUMENT_ROOT") or env.get("PROMPTSEG_DOCUMENT_ROOT")
        values = dict(
            model=env.get("PROMPTSEG_MODEL") or None,
            device=env.get("PROMPTSEG_DEVICE") or "auto",
            cache_dir=Path(env["PROMPTSEG_CACHE_DIR"]) if env.get("PROMPTSEG_CACHE_DIR") else None,
            threshold=threshold_value,
            label_studio_url=env.get("LABEL_STUDIO_URL") or env.get("LABEL_STUDIO_HOST") or None,
            api_key=env.get("LABEL_STUDIO_API_KEY") or env.get("LABEL_STUDIO_ACCESS_TOKEN") or None,
            basic_auth_user=env.get("BASIC_AUTH_USER") or None,
            basic_auth_pass=env.get("BASIC_AUTH_PASS") or None,
            allowed_hosts=tuple(h.strip().lower() for h in env.get("PROMPTSEG_ALLOWED_HOSTS", "").split(",") if h.strip()),
            document_root=Path(root) if root else None,
            max_request_bytes=int(max_bytes) if max_bytes else DEFAULT_MAX_REQUEST_BYTES,
        )
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def check_base_url(url: str, what: str) -> str:
    """A Label Studio base URL must be absolute http(s): fail early with the fix."""
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise OptionError(f"{what} must be a full URL such as http://127.0.0.1:8080, got {url!r}.")
    return url.rstrip("/")
