"""The HTTP application around a running :class:`fleet.Fleet`: REST API, dashboard, events, metrics.

``create_app(fleet, token=...)`` builds it (tests build it around a Fleet of their own; ``edgesdk
fleet serve --http`` around the one it runs). Routes:

* ``/api/v1/...`` — the REST API (:mod:`fleet.http.api`), ``/api/v1/openapi.json`` its document;
* ``/api/v1/snapshot`` — the fleet at a glance, once; ``/api/v1/events`` — the same as
  server-sent events (``event: snapshot``), sent when it changes (checked every
  ``events_interval`` s), with a comment line every 15 s to keep proxies from closing it;
* ``/metrics`` — Prometheus exposition (:mod:`fleet.http.metrics`);
* ``/`` and ``/static/...`` — the dashboard (plain HTML, JS and CSS shipped in the package).

Everything but the dashboard's own files needs the token when one is configured
(:mod:`fleet.http.auth`); ``/api/v1/events`` also takes it as ``?token=``.
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from typing import Any, AsyncIterator, Optional

import anyio
from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPBearer
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from sdk import __version__
from sdk.errors import AuthenticationError, ConfigError, EdgeSdkError, NotFoundError

from .api import JOBS_PATH, ROLLOUTS_PATH, api_router
from .auth import TokenCheck
from .errors import TooLarge, error_body, status_of
from .metrics import FleetMetrics
from .snapshot import fleet_snapshot
from .uploads import UploadLimit, UploadLimits

log = logging.getLogger("edgesdk.fleet.http")

__all__ = ["create_app", "STATIC"]

#: the dashboard's files (package data)
STATIC = Path(__file__).with_name("static")
_KEEPALIVE_S = 15.0
_PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
}


def create_app(fleet: Any, *, token: Optional[str] = None, limits: UploadLimits = UploadLimits(),
               events_interval: float = 1.0) -> FastAPI:
    """The application serving ``fleet`` (whose :attr:`~fleet.Fleet.on_batch` it sets: the engine's
    batch latency goes to ``/metrics``); ``app.state.closing`` (an Event) ends the event streams."""
    check = TokenCheck(token)
    bearer = HTTPBearer(auto_error=False, description="the token in the file given to --api-token-file")

    def authorized(request: Request, _: Any = Depends(bearer)) -> None:
        check.check(request.headers.get("authorization"))

    app = FastAPI(title="edgesdk fleet", version=__version__, docs_url=None, redoc_url=None, openapi_url=None,
                  description="Devices, staged rollouts and batch jobs of an edgesdk fleet. Errors are "
                              "`{\"code\": exit code, \"error\": kind, \"message\": one line}` as the CLI prints them.")
    app.state.metrics = FleetMetrics(fleet)
    fleet.on_batch = app.state.metrics.observe_batch
    app.state.closing = threading.Event()
    app.include_router(api_router(fleet, limits), dependencies=[Depends(authorized)])
    app.add_middleware(UploadLimit, rules={ROLLOUTS_PATH: (limits.max_bundle_bytes, limits.bundle_error),
                                           JOBS_PATH: (limits.max_input_bytes, limits.input_error)})
    _add_error_handlers(app)

    @app.get("/api/v1/openapi.json", include_in_schema=False, dependencies=[Depends(authorized)])
    def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get("/api/v1/snapshot", tags=["dashboard"], summary="The fleet at a glance", dependencies=[Depends(authorized)])
    def snapshot() -> Response:
        """Devices, the newest rollouts (stages, per-state counts) and jobs (progress, throughput)."""
        return Response(_dumps(fleet_snapshot(fleet)), media_type="application/json")

    @app.get("/api/v1/events", tags=["dashboard"], summary="The snapshot as server-sent events",
             response_class=StreamingResponse)
    def events(request: Request, token: Optional[str] = Query(default=None, description="the token, for EventSource")
               ) -> StreamingResponse:
        """``event: snapshot`` whenever the fleet changes. Takes the token as ``?token=`` too."""
        check.check(request.headers.get("authorization"), token)
        return StreamingResponse(_stream(fleet, events_interval, app.state.closing), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    @app.get("/metrics", tags=["metrics"], summary="Prometheus metrics", dependencies=[Depends(authorized)])
    def metrics() -> Response:
        return Response(generate_latest(app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", include_in_schema=False)
    def dashboard() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={**_PAGE_HEADERS, "Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))


async def _stream(fleet: Any, interval: float, closing: threading.Event) -> AsyncIterator[str]:
    """Snapshots as SSE events, each sent when it differs from the last one sent."""
    last, quiet = None, 0.0
    yield "retry: 2000\n\n"
    while not closing.is_set():
        try:
            snap = await anyio.to_thread.run_sync(fleet_snapshot, fleet)
        except EdgeSdkError as err:  # the database busy or gone for a moment: say so, and try again
            yield f"event: failure\ndata: {_dumps(error_body(err))}\n\n"
            snap = None
        if snap is not None:
            at = snap.pop("at")
            key = _dumps(snap)
            if key != last:
                last, quiet = key, 0.0
                yield f"event: snapshot\ndata: {_dumps({'at': at, **snap})}\n\n"
        if quiet >= _KEEPALIVE_S:
            quiet = 0.0
            yield ": keep-alive\n\n"
        await anyio.sleep(interval)
        quiet += interval


def _add_error_handlers(app: FastAPI) -> None:
    """Every error as ``{"code", "error", "message"}``: the CLI's exit code, kind and line."""

    @app.exception_handler(EdgeSdkError)
    def edgesdk_error(request: Request, err: EdgeSdkError) -> JSONResponse:
        status = status_of(err)
        headers = {"WWW-Authenticate": "Bearer"} if isinstance(err, AuthenticationError) else None
        return JSONResponse(error_body(err), status_code=status, headers=headers)

    @app.exception_handler(TooLarge)
    def too_large(request: Request, exc: TooLarge) -> JSONResponse:
        return JSONResponse(error_body(exc.error), status_code=413)

    @app.exception_handler(RequestValidationError)
    def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ())[1:]) or 'request'}: {e.get('msg', '')}"
                             for e in exc.errors())
        err = ConfigError(f"{problems}: see {request.base_url}api/v1/openapi.json for the fields this endpoint takes")
        return JSONResponse(error_body(err), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            err: EdgeSdkError = NotFoundError(f"no endpoint {request.url.path}: the endpoints are listed in "
                                              "/api/v1/openapi.json")
        else:
            err = ConfigError(f"{request.method} {request.url.path}: {exc.detail}")
        return JSONResponse(error_body(err), status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return JSONResponse(error_body(kind="InternalError", code=1,
                                       message=f"the fleet could not answer ({type(exc).__name__}: {exc}); "
                                               "its log has the details"), status_code=500)
