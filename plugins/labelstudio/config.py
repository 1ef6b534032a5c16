"""Backend settings, read from Label Studio's usual environment variables.

Label Studio's own backends are configured by environment (``LABEL_STUDIO_URL``,
``LABEL_STUDIO_API_KEY`` (a personal access token or a legacy token), ``BASIC_AUTH_USER``/
``BASIC_AUTH_PASS``, ``DEVICE``); promptseg adds its model,
its default score threshold and the limits that keep a network service safe.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from promptseg.cli import is_loopback
from promptseg.errors import OptionError
from promptseg.options import SegmentOptions
from promptseg_labelstudio.download import DEFAULT_DOWNLOAD_TIMEOUT, DEFAULT_MAX_DOWNLOAD_BYTES, DownloadLimits

DEFAULT_MAX_REQUEST_BYTES = 16 * 1024**2
DEFAULT_MAX_VIDEO_BYTES = 512 * 1024**2
DEFAULT_VIDEO_DOWNLOAD_TIMEOUT = 300.0
DEFAULT_MAX_VIDEO_FRAMES = 2000
DEFAULT_WORK_SLOTS = 2  # waitress's default 4 threads, less 2 kept for /health and /setup
DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?", re.IGNORECASE)
TRUE_WORDS, FALSE_WORDS = ("1", "true", "yes", "on"), ("", "0", "false", "no", "off")


@dataclass
class BackendConfig:
    """Everything the backend needs besides the project's labeling config.

    `label_studio_url`/`api_key` let it fetch uploaded and storage files; the key is sent to
    that URL and nowhere else. When the URL is unset, the host and token Label Studio sends with
    ``/setup`` are used only if `setup_may_name_host` (basic auth on, or `trust_setup_host`).
    `allowed_hosts` are further hosts (``host`` or ``host:port``) image URLs may point at; no
    other host is ever contacted. `document_root` confines plain file paths and Local Storage
    files; without it plain paths are refused. Downloads stop past `max_download_bytes` or
    `download_timeout` seconds. At most `work_slots` ``/predict`` requests run at once (more get
    503), so the server's other threads stay free for ``/health`` and ``/setup``; None: no limit.
    `threshold` is the default score threshold of every project (None: the core's); a project's
    extra params may set it and any other option (see `segment_options`). Videos have their own
    caps: `max_video_bytes` and `video_download_timeout` per download, and at most
    `max_video_frames` frames segmented per task (a stride or a frame range picks fewer).
    `projects_dir` holds what ``/setup`` said about each project for every worker of a server
    (`promptseg_labelstudio.shared_settings`; set for several workers); None: this process only.
    """

    model: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    cache_dir: str | Path | None = None
    threshold: float | None = None
    label_studio_url: str | None = None
    api_key: str | None = None
    basic_auth_user: str | None = None
    basic_auth_pass: str | None = None
    allowed_hosts: tuple[str, ...] = ()
    document_root: Path | None = None
    download_dir: Path | None = None
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    trust_setup_host: bool = False
    max_download_bytes: int = DEFAULT_MAX_DOWNLOAD_BYTES
    download_timeout: float = DEFAULT_DOWNLOAD_TIMEOUT
    work_slots: int | None = None
    max_video_bytes: int = DEFAULT_MAX_VIDEO_BYTES
    video_download_timeout: float = DEFAULT_VIDEO_DOWNLOAD_TIMEOUT
    max_video_frames: int = DEFAULT_MAX_VIDEO_FRAMES
    projects_dir: Path | None = None

    def __post_init__(self) -> None:
        try:
            self.segment_options  # noqa: B018 - the core checks the threshold
        except OptionError as exc:
            raise OptionError(f"PROMPTSEG_THRESHOLD (the default score threshold): {exc}") from None
        if self.label_studio_url:
            self.label_studio_url = check_base_url(self.label_studio_url, "LABEL_STUDIO_URL")
        if self.api_key:
            from promptseg_labelstudio.tokens import check_api_key

            check_api_key(self.api_key)
        if not DEVICE_PATTERN.fullmatch(str(self.device)):
            raise OptionError(f"DEVICE (or PROMPTSEG_DEVICE) must be auto, cpu, cuda, cuda:N or mps, got {self.device!r}: "
                              "set DEVICE=cuda on a GPU machine, DEVICE=cpu without one, or leave it unset (auto).")
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
        if self.projects_dir is not None and not Path(self.projects_dir).is_dir():
            raise OptionError(f"PROMPTSEG_PROJECTS_DIR {self.projects_dir} is not a folder: create it (every worker "
                              "must be able to write it) or unset it.")
        if self.max_request_bytes < 1024:
            raise OptionError("PROMPTSEG_MAX_REQUEST_BYTES must be at least 1024.")
        if self.max_download_bytes < 1:
            raise OptionError(f"PROMPTSEG_MAX_DOWNLOAD_BYTES must be a positive number of bytes, got {self.max_download_bytes}.")
        if not self.download_timeout > 0:
            raise OptionError(f"PROMPTSEG_DOWNLOAD_TIMEOUT must be a positive number of seconds, got {self.download_timeout}.")
        if self.work_slots is not None and self.work_slots < 1:
            raise OptionError(f"PROMPTSEG_WORK_SLOTS must be at least 1, got {self.work_slots}.")
        if self.max_video_bytes < 1:
            raise OptionError(f"PROMPTSEG_MAX_VIDEO_BYTES must be a positive number of bytes, got {self.max_video_bytes}.")
        if not self.video_download_timeout > 0:
            raise OptionError("PROMPTSEG_VIDEO_DOWNLOAD_TIMEOUT must be a positive number of seconds, got "
                              f"{self.video_download_timeout}.")
        if self.max_video_frames < 1:
            raise OptionError(f"PROMPTSEG_MAX_VIDEO_FRAMES must be at least 1, got {self.max_video_frames}.")

    @property
    def segment_options(self) -> SegmentOptions:
        """The options of a project whose extra params set none: the core's defaults, with `threshold`."""
        return SegmentOptions.from_flat(**({} if self.threshold is None else {"threshold": self.threshold}))

    @property
    def setup_may_name_host(self) -> bool:
        """Whether ``/setup`` may name the Label Studio host: only when callers are authenticated or the operator says so."""
        return self.trust_setup_host or bool(self.basic_auth_user)

    @property
    def download_limits(self) -> DownloadLimits:
        return DownloadLimits(self.max_download_bytes, self.download_timeout)

    @property
    def video_download_limits(self) -> DownloadLimits:
        return DownloadLimits(self.max_video_bytes, self.video_download_timeout, "Video",
                              "PROMPTSEG_MAX_VIDEO_BYTES", "PROMPTSEG_VIDEO_DOWNLOAD_TIMEOUT")

    @classmethod
    def from_env(cls, environ: dict | None = None, **overrides) -> BackendConfig:
        """Settings from the environment; keyword `overrides` (e.g. from the command line) win."""
        env = os.environ if environ is None else environ
        threshold = env.get("PROMPTSEG_THRESHOLD")
        try:
            threshold_value = float(threshold) if threshold not in (None, "") else None
        except ValueError:
            raise OptionError(f"PROMPTSEG_THRESHOLD must be a number, got {threshold!r}.") from None
        root = env.get("LOCAL_FILES_DOCUMENT_ROOT") or env.get("PROMPTSEG_DOCUMENT_ROOT")
        values = dict(
            model=env.get("PROMPTSEG_MODEL") or None,
            device=env.get("PROMPTSEG_DEVICE") or env.get("DEVICE") or "auto",  # DEVICE: as Label Studio's examples
            cache_dir=env.get("PROMPTSEG_CACHE_DIR") or None,  # a folder or a shared store's URL, as given
            threshold=threshold_value,
            label_studio_url=env.get("LABEL_STUDIO_URL") or env.get("LABEL_STUDIO_HOST") or None,
            api_key=env.get("LABEL_STUDIO_API_KEY") or env.get("LABEL_STUDIO_ACCESS_TOKEN") or None,
            basic_auth_user=env.get("BASIC_AUTH_USER") or None,
            basic_auth_pass=env.get("BASIC_AUTH_PASS") or None,
            allowed_hosts=tuple(h.strip().lower() for h in env.get("PROMPTSEG_ALLOWED_HOSTS", "").split(",") if h.strip()),
            document_root=Path(root) if root else None,
            max_request_bytes=env_number(env, "PROMPTSEG_MAX_REQUEST_BYTES", int, DEFAULT_MAX_REQUEST_BYTES),
            trust_setup_host=env_flag(env, "PROMPTSEG_TRUST_SETUP_HOST"),
            max_download_bytes=env_number(env, "PROMPTSEG_MAX_DOWNLOAD_BYTES", int, DEFAULT_MAX_DOWNLOAD_BYTES),
            download_timeout=env_number(env, "PROMPTSEG_DOWNLOAD_TIMEOUT", float, DEFAULT_DOWNLOAD_TIMEOUT),
            work_slots=env_number(env, "PROMPTSEG_WORK_SLOTS", int, DEFAULT_WORK_SLOTS),
            max_video_bytes=env_number(env, "PROMPTSEG_MAX_VIDEO_BYTES", int, DEFAULT_MAX_VIDEO_BYTES),
            video_download_timeout=env_number(env, "PROMPTSEG_VIDEO_DOWNLOAD_TIMEOUT", float,
                                              DEFAULT_VIDEO_DOWNLOAD_TIMEOUT),
            max_video_frames=env_number(env, "PROMPTSEG_MAX_VIDEO_FRAMES", int, DEFAULT_MAX_VIDEO_FRAMES),
            projects_dir=Path(env["PROMPTSEG_PROJECTS_DIR"]) if env.get("PROMPTSEG_PROJECTS_DIR") else None,
        )
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def check_base_url(url: str, what: str) -> str:
    """A Label Studio base URL must be absolute http(s): fail early with the fix."""
    try:
        parsed = urlparse(url)
        parsed.port  # noqa: B018 - raises ValueError for a port outside 0..65535
    except ValueError:
        parsed = None
    if parsed is None or parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise OptionError(f"{what} must be a full URL such as http://127.0.0.1:8080, got {url[:200]!r}.")
    return url.rstrip("/")


def env_number(env, name: str, kind: type, default):
    """A number from the environment, or `OptionError` naming the variable."""
    value = env.get(name)
    if value in (None, ""):
        return default
    try:
        return kind(value)
    except ValueError:
        raise OptionError(f"{name} must be a{'n integer' if kind is int else ' number'}, got {value!r}.") from None


def env_flag(env, name: str) -> bool:
    """A yes/no switch from the environment (1/true/yes/on or 0/false/no/off)."""
    value = env.get(name, "").strip().lower()
    if value not in TRUE_WORDS + FALSE_WORDS:
        raise OptionError(f"{name} must be 1 or 0 (true/false, yes/no, on/off), got {value!r}.")
    return value in TRUE_WORDS



def exposure_warning(host: str, config: BackendConfig) -> str | None:
    """What to tell an operator who serves beyond this machine without basic auth, else None."""
    if is_loopback(host) or config.basic_auth_user:
        return None
    return (f"Serving on {host} without basic auth: anyone who reaches this port can run predictions "
            "and read what the backend can read. Set BASIC_AUTH_USER and BASIC_AUTH_PASS (and enter "
            "them in Label Studio's Connect Model dialog), or bind --host 127.0.0.1 behind a proxy.")
