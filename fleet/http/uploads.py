"""Uploads: size limits answered with a clear 413, and the uploaded file as a path for the facade.

:class:`UploadLimit` is ASGI middleware: a POST to a limited path whose ``Content-Length`` is
over the limit is refused before a byte of it is read; one that streams past it (chunked) is cut
off there. Either way the answer is a 413 whose body says which limit and which option raises
it. :func:`saved_upload` writes an upload to a temporary directory (named after the client's
file name only when :func:`sdk.paths.confined` accepts it) and removes it afterwards; errors
that name the temporary path name the uploaded file instead.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterator, Mapping, Optional

from sdk.errors import BundleError, DataError, EdgeSdkError, ProtocolError
from sdk.paths import confined

from .errors import TooLarge, error_body

__all__ = ["UploadLimits", "UploadLimit", "saved_upload", "MIB"]

MIB = 1024 * 1024
#: room for the multipart framing and the form's other fields around the file
_FORM_SLACK = 64 * 1024


@dataclass(frozen=True)
class UploadLimits:
    """Largest bundle and largest job input file the API accepts, in bytes."""

    max_bundle_bytes: int = 256 * MIB
    max_input_bytes: int = 256 * MIB

    def bundle_error(self) -> BundleError:
        return BundleError(f"the bundle is larger than this fleet accepts over HTTP ({self.max_bundle_bytes / MIB:g} MiB): "
                           "deploy it with edgesdk fleet deploy, or restart serve with a larger --max-bundle-mb")

    def input_error(self) -> DataError:
        return DataError(f"the input file is larger than this fleet accepts over HTTP ({self.max_input_bytes / MIB:g} MiB): "
                         "split the samples into several jobs, or restart serve with a larger --max-input-mb")

    def check(self, size: int, what: str) -> None:
        """Raise :class:`TooLarge` when a received file of ``size`` bytes is over its limit."""
        if what == "bundle" and size > self.max_bundle_bytes:
            raise TooLarge(self.bundle_error())
        if what == "input" and size > self.max_input_bytes:
            raise TooLarge(self.input_error())


Receive = Callable[[], Awaitable[Mapping[str, Any]]]
Send = Callable[[Mapping[str, Any]], Awaitable[None]]


class UploadLimit:
    """ASGI middleware bounding the bodies of POSTs to ``rules`` paths: ``{path: (limit, error)}``."""

    def __init__(self, app: Any, rules: Mapping[str, tuple[int, Callable[[], EdgeSdkError]]]) -> None:
        self.app = app
        self.rules = dict(rules)

    async def __call__(self, scope: Mapping[str, Any], receive: Receive, send: Send) -> None:
        rule = self.rules.get(scope.get("path", "")) if scope["type"] == "http" and scope.get("method") == "POST" else None
        if rule is None:
            await self.app(scope, receive, send)
            return
        limit, make_error = rule[0] + _FORM_SLACK, rule[1]
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            await _send_413(send, make_error())
            return
        received = 0
        over: Optional[EdgeSdkError] = None
        started = False

        async def limited_receive() -> Mapping[str, Any]:
            nonlocal received, over
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    over = make_error()
                    raise TooLarge(over)
            return message

        async def guarded_send(message: Mapping[str, Any]) -> None:
            nonlocal started
            if over is not None:  # whatever the app answers to a cut-off body, the client gets the 413
                if message["type"] == "http.response.start" and not started:
                    started = True
                    await _send_413(send, over)
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except TooLarge as exc:
            if not started:
                await _send_413(send, exc.error)


async def _send_413(send: Send, err: EdgeSdkError) -> None:
    body = json.dumps(error_body(err)).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


@contextmanager
def saved_upload(stream: Any, client_name: Optional[str], default_name: str, suffix: str = "") -> Iterator[Path]:
    """``stream`` (a file object) written to a temporary file, removed on exit.

    The file is named ``client_name`` when that is one safe name ending in ``suffix``, else
    ``default_name``; an :class:`~sdk.errors.EdgeSdkError` raised inside names the file as the
    client knows it, not the temporary directory."""
    tmp = tempfile.mkdtemp(prefix="edgesdk-upload-")
    path = Path(tmp) / default_name
    if client_name and client_name.endswith(suffix):
        try:
            path = confined(tmp, client_name)
        except ProtocolError:
            pass
    try:
        with open(path, "wb") as out:
            shutil.copyfileobj(stream, out, 1024 * 1024)
        yield path
    except EdgeSdkError as err:
        err.args = (str(err).replace(tmp + os.sep, ""),)
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
