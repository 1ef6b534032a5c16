"""Model files: fetched from the Hugging Face hub with what-to-do messages, and fingerprinted.

SAM 3 is gated, so the common failures are a licence not accepted, no login, no network, or
``HF_HUB_OFFLINE`` with nothing cached; each becomes a `ModelLoadError` that says how to fix it.
Local weights are named in cache keys by `weights_fingerprint`.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

from promptseg.errors import ModelLoadError


FINGERPRINT_BYTES = 1 << 20
"""How much of each end of a weights file the fingerprint reads."""


def weights_fingerprint(*parts: bytes | Path) -> str:
    """A cheap content digest of local weights, for cache keys: every part in order, where a file
    counts by its name, size and first and last MiB, and bytes (a config file's text) count whole.

    Reading only the ends keeps this instant on multi-GB checkpoints; any re-save changes them.
    """
    digest = hashlib.sha256()
    for part in parts:
        if isinstance(part, bytes):
            digest.update(part)
            continue
        size = part.stat().st_size
        digest.update(f"{part.name}:{size}".encode())
        with open(part, "rb") as handle:
            digest.update(handle.read(FINGERPRINT_BYTES))
            handle.seek(max(0, size - FINGERPRINT_BYTES))
            digest.update(handle.read(FINGERPRINT_BYTES))
    return digest.hexdigest()[:24]


def hub_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` asks for cached files only."""
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def fetch(
    download: Callable[[bool], str],
    repo: str,
    what: str,
    help_text: str,
    revision: str | None = None,
    missing_file: str | None = None,
) -> Path:
    """Run ``download(local_files_only)`` and return its local path, explaining any failure.

    `what` names the thing fetched in messages (a repo, or repo/file); `help_text` says how to
    get access or use a local copy; `missing_file` is the message for a repo without the file.
    """
    from huggingface_hub import errors as hub_errors

    offline = hub_offline()
    try:
        return Path(download(offline))
    except hub_errors.GatedRepoError as exc:
        raise ModelLoadError(f"Access to {repo} is refused (gated repository). {help_text}") from exc
    except hub_errors.RepositoryNotFoundError as exc:
        raise ModelLoadError(
            f"The hub has no repository {repo!r} you can see (or you are not logged in). "
            f"Check the spelling; for a gated repository: {help_text}"
        ) from exc
    except hub_errors.RevisionNotFoundError as exc:
        raise ModelLoadError(f"{repo} has no revision {revision!r}.") from exc
    except hub_errors.LocalEntryNotFoundError as exc:
        raise ModelLoadError(
            f"{what} is not in the local Hugging Face cache and the hub cannot be reached "
            f"({'HF_HUB_OFFLINE is set' if offline else 'no network'}). Download it once where the "
            f"hub is reachable. {help_text}"
        ) from exc
    except hub_errors.EntryNotFoundError as exc:
        raise ModelLoadError(missing_file or f"{what} is missing on the hub: {exc}") from exc
    except hub_errors.HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status in (401, 403):
            raise ModelLoadError(f"The hub refused access to {repo} (HTTP {status}). {help_text}") from exc
        raise ModelLoadError(f"Downloading {what} failed: {exc}") from exc
    except (OSError, ValueError) as exc:  # connection errors, bad repo id syntax
        raise ModelLoadError(
            f"Cannot fetch {what} from the Hugging Face hub ({exc.__class__.__name__}: {exc}). {help_text}"
        ) from exc
