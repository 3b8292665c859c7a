"""Errors as the HTTP API answers them: JSON with the CLI's exit code and message.

Every :class:`~sdk.errors.EdgeSdkError` becomes ``{"code": exit_code, "error": kind, "message":
one line}`` (the line ``edgesdk fleet ...`` prints after ``error:``, the code it exits with) and
an HTTP status chosen by kind (:data:`STATUS`). Errors of the HTTP layer itself (an unknown
route, a malformed request, an upload over the limit) are answered in the same shape, with the
kind of the tree that fits; anything else is a 500 whose body names the exception, never a
traceback (the traceback goes to the fleet's log).
"""

from __future__ import annotations

from typing import Any, Optional

from sdk.errors import (AuthenticationError, BrokerError, BundleError, ConfigError, DataError, EdgeSdkError, FleetError,
                        JobError, MissingDependencyError, NotFoundError, RolloutError, SigningKeyError)

__all__ = ["STATUS", "status_of", "error_body", "TooLarge"]

#: kind -> HTTP status; the first class in an error's MRO that is listed here decides
STATUS: dict[type, int] = {
    AuthenticationError: 401,
    NotFoundError: 404,
    ConfigError: 400,
    DataError: 422,
    BundleError: 422,
    SigningKeyError: 422,
    RolloutError: 422,
    JobError: 422,
    BrokerError: 503,
    MissingDependencyError: 500,
    FleetError: 409,
    EdgeSdkError: 400,
}


class TooLarge(Exception):
    """An upload over its limit: answered 413 with ``error`` (a BundleError or DataError) as the body."""

    def __init__(self, error: EdgeSdkError) -> None:
        super().__init__(str(error))
        self.error = error


def status_of(err: EdgeSdkError) -> int:
    """The HTTP status of an edgesdk error (by its kind)."""
    for cls in type(err).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return 500


def error_body(err: Optional[EdgeSdkError] = None, *, kind: str = "", code: int = 1, message: str = "") -> dict[str, Any]:
    """The JSON body of an error: ``code`` (the CLI's exit code), ``error`` (the kind), ``message``."""
    if err is not None:
        return {"code": err.exit_code, "error": type(err).__name__, "message": str(err)}
    return {"code": code, "error": kind, "message": message}
