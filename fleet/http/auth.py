"""The API's one credential: a bearer token read from ``--api-token-file``.

Requests carry it as ``Authorization: Bearer TOKEN``; the dashboard's event stream, which a
browser's ``EventSource`` cannot give headers, may carry it as ``?token=TOKEN`` instead (that
endpoint only reads, and the server writes no access log, so the token is not logged).
Tokens are compared in constant time (digests of both, so not even the length leaks).
"""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path
from typing import Optional, Union

from sdk.errors import AuthenticationError, ConfigError

__all__ = ["TokenCheck", "read_token", "MIN_TOKEN_LENGTH"]

#: shorter tokens are refused at start: a guessable token protects nothing
MIN_TOKEN_LENGTH = 16


def read_token(path: Union[str, os.PathLike]) -> str:
    """The token in ``path`` (surrounding whitespace stripped); ConfigError when unusable."""
    p = Path(path)
    try:
        token = p.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the API token file {p}: {getattr(exc, 'strerror', None) or exc}") from exc
    if len(token) < MIN_TOKEN_LENGTH or any(c.isspace() for c in token):
        raise ConfigError(f"the API token in {p} must be one word of at least {MIN_TOKEN_LENGTH} characters: "
                          "make one with  head -c 32 /dev/urandom | base64 > " + str(p))
    return token


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode("utf-8", "surrogatepass")).digest()


class TokenCheck:
    """Checks a presented token against the configured one (``None``: the API is open, which
    ``serve`` allows on a loopback address only)."""

    def __init__(self, token: Optional[str]) -> None:
        self._expected = _digest(token) if token else None

    @property
    def required(self) -> bool:
        return self._expected is not None

    def check(self, authorization: Optional[str], query_token: Optional[str] = None) -> None:
        """Raise AuthenticationError unless ``authorization`` (the header) or ``query_token`` holds the token."""
        if self._expected is None:
            return
        presented = None
        if authorization:
            scheme, _, value = authorization.partition(" ")
            if scheme.lower() == "bearer" and value.strip():
                presented = value.strip()
        if presented is None and query_token:
            presented = query_token
        if presented is None:
            raise AuthenticationError("this API needs a token: send the header 'Authorization: Bearer TOKEN' "
                                      "(the token is in the file given to --api-token-file)")
        if not hmac.compare_digest(_digest(presented), self._expected):
            raise AuthenticationError("the token is not the one this fleet was started with (--api-token-file): "
                                      "check it and send it again")
