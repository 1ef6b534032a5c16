"""The ``Authorization`` header for one Label Studio host, from a legacy token or a personal access token.

Label Studio issues personal access tokens (JWT refresh tokens, Account & Settings > Personal
Access Token) by default; they are not sent as they are but exchanged at the same host's
``/api/token/refresh/`` for an access token that lives minutes, sent as ``Bearer``. Legacy tokens
go as ``Token``. label-studio-sdk's client already decides which kind a key is, caches the access
token and refreshes it when it expires; `LabelStudioAuth` uses it with an HTTP client that
follows no redirects, so the refresh token reaches only the configured host.
"""

from __future__ import annotations

import logging
import threading

import httpx

from promptseg.errors import ImageError, OptionError

logger = logging.getLogger(__name__)

REFRESH_TIMEOUT = 10.0
NEW_TOKEN_HINT = "create a new one in Label Studio (Account & Settings > Personal Access Token)"


def check_api_key(token: str, what: str = "LABEL_STUDIO_API_KEY") -> bool:
    """Whether `token` is a personal access token; `OptionError` at start-up, not on the first task,
    when it is one that cannot work (expired, no expiry)."""
    from label_studio_sdk.core.api_error import ApiError
    from label_studio_sdk.tokens.client_ext import TokensClientExt

    try:
        checker = TokensClientExt(base_url="", api_key=token)  # checks the key's kind and expiry; no request
    except ApiError as exc:
        detail = exc.body.get("detail") if isinstance(exc.body, dict) else exc.body
        raise OptionError(f"{what} is a personal access token Label Studio will refuse ({detail}): "
                          f"{NEW_TOKEN_HINT} and set {what} to it.") from None
    return checker.jwt_token_type(token) is not None


class LabelStudioAuth:
    """Headers for requests to `base_url` with `token` (legacy, or a personal access token).

    `header()` may refresh the access token (a POST to `base_url` only); `renew()` drops it after
    Label Studio answered 401, so the next `header()` asks for a fresh one.
    """

    def __init__(self, base_url: str, token: str) -> None:
        self.is_personal = check_api_key(token, "The Label Studio token")
        self.base_url = base_url.rstrip("/") + "/"  # the SDK joins "api/token/refresh/" onto it
        self.token = token
        self._http = httpx.Client(timeout=REFRESH_TIMEOUT, follow_redirects=False)
        self._lock = threading.Lock()
        self._client = self._new_client()

    def _new_client(self):
        from label_studio_sdk.core.client_wrapper import SyncClientWrapper

        return SyncClientWrapper(api_key=self.token, base_url=self.base_url, httpx_client=self._http)

    def header(self) -> dict[str, str]:
        """``{"Authorization": ...}``, with a fresh access token when the last one has expired."""
        from label_studio_sdk.core.api_error import ApiError

        with self._lock:
            client = self._client
        try:
            return {"Authorization": client.get_headers()["Authorization"]}
        except ApiError as exc:
            raise ImageError(
                f"Label Studio at {self.base_url} refused to exchange the personal access token "
                f"(HTTP {exc.status_code} from api/token/refresh/): it was revoked or belongs to another "
                f"Label Studio; {NEW_TOKEN_HINT} and set LABEL_STUDIO_API_KEY to it."
            ) from None
        except (httpx.HTTPError, ValueError) as exc:  # ValueError: a refresh answer that is not JSON
            raise ImageError(
                f"Exchanging the personal access token at {self.base_url}api/token/refresh/ failed ({exc}): "
                "check that LABEL_STUDIO_URL is Label Studio's address and that it is up."
            ) from None

    def renew(self) -> bool:
        """Forget the access token (Label Studio answered 401); False for a legacy token, which cannot renew."""
        if not self.is_personal:
            return False
        logger.info("Label Studio refused the access token: asking %s for a new one", self.base_url)
        with self._lock:
            self._client = self._new_client()
        return True
