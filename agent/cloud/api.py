"""``serve``'s HTTP API (FastAPI; its OpenAPI document at ``/openapi.json``, docs at ``/docs``).

- ``GET /v1/vehicles/{vid}``: the verified state, each signal with value, quality and as-of;
- ``GET /v1/vehicles/{vid}/answer?lang=en|zh``: the owner's answer (:mod:`agent.cloud.answer`);
- ``POST /v1/vehicles/{vid}/refresh?lang=en|zh``: ask the car for a snapshot, wait at most
  5 s; 200 with the fresh answer, else 504 with the last-known one;
- ``GET /healthz``, ``GET /metrics`` (Prometheus text): no token.

Every ``/v1`` request needs ``Authorization: Bearer TOKEN``: none or unknown -> 401; a vehicle
that is not the token's owner's -> 404, word for word the answer for a vehicle that does not
exist, so ids cannot be probed; over the token's rate -> 429. A failing store is 503, never a
500 with a traceback.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Literal

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from agent import __version__
from agent.cloud.answer import NoAnswer, answer
from agent.cloud.checks import iso_utc
from agent.cloud.metrics import CONTENT_TYPE_LATEST, ServeMetrics
from agent.cloud.owners import OwnerDirectory, RateLimiter, token_hash
from agent.cloud.store import Store
from agent.cloud.view import VehicleView

log = logging.getLogger("car_agent.serve")

NOT_FOUND = "no such vehicle"
Lang = Literal["en", "zh"]


def _iso(ts: float | None) -> str | None:
    return None if ts is None else iso_utc(ts)


#: Requests with more header bytes (or lines) than this are refused with 431: a real client
#: sends a few hundred bytes, and the server reads them all before anything else.
MAX_HEADER_BYTES = 16 * 1024
MAX_HEADERS = 100


class _Front:
    """ASGI middleware in front of the app: refuses oversized headers (431) and counts every
    HTTP response by status (404s of unknown routes and 503s too)."""

    def __init__(self, app: Any, metrics: ServeMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        started = False

        async def counting_send(message: dict) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                self.metrics.requests.labels(str(message["status"])).inc()
            await send(message)

        headers = scope.get("headers") or []
        if len(headers) > MAX_HEADERS or \
                sum(len(k) + len(v) for k, v in headers) > MAX_HEADER_BYTES:
            await JSONResponse({"detail": "request headers too large"}, status_code=431)(
                scope, receive, counting_send)
            return
        try:
            await self.app(scope, receive, counting_send)
        except Exception:  # noqa: BLE001 - answered (503) and logged in one line by the app's
            if not started:  # handler; Starlette re-raises it for a traceback we do not want
                await JSONResponse({"detail": "service unavailable"}, status_code=503)(
                    scope, receive, counting_send)


def create_app(store: Store, owners: OwnerDirectory, limiter: RateLimiter,
               metrics: ServeMetrics, refresh: Callable[[str], bool] | None = None,
               healthy: Callable[[], dict[str, Any]] | None = None,
               clock: Callable[[], float] = time.time) -> FastAPI:
    app = FastAPI(title="car-agent serve", version=__version__,
                  description="The owner's view of their car, from verified data only.")
    bearer = HTTPBearer(auto_error=False, description="The owner's token (car-agent owner add)")

    def unauthorized(detail: str) -> HTTPException:
        return HTTPException(401, detail, headers={"WWW-Authenticate": "Bearer"})

    def owned(vid: str,
              credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> str:
        """The vehicle id, once the token is known, within its rate, and owns the vehicle."""
        if credentials is None:
            raise unauthorized("missing bearer token")
        token = credentials.credentials
        vehicles = owners.vehicles(token)
        if vehicles is None:
            raise unauthorized("unknown token")
        if not limiter.allow(token_hash(token)):
            raise HTTPException(429, "too many requests for this token",
                                headers={"Retry-After": str(max(1, round(1 / limiter.rate)))})
        if vid not in vehicles:
            raise HTTPException(404, NOT_FOUND)
        return vid

    def load(vid: str) -> VehicleView:
        with metrics.store_seconds.labels("view").time():
            view = store.view(vid)
        if view is None or view.source is None:
            raise HTTPException(404, f"no verified state for {vid} yet")
        return view

    @app.exception_handler(Exception)
    async def unavailable(request: Request, exc: Exception) -> JSONResponse:
        # Store down, database gone: the client can retry; the log has the cause.
        log.error("%s %s failed: %s: %s", request.method, request.url.path, type(exc).__name__,
                  str(exc).strip().splitlines()[0] if str(exc).strip() else "")
        return JSONResponse({"detail": "service unavailable"}, status_code=503)

    @app.get("/v1/vehicles/{vid}", summary="The vehicle's verified state")
    def vehicle_state(vid: str = Depends(owned)) -> dict[str, Any]:
        view = load(vid)
        now = clock()
        return {
            "vid": vid,
            "as_of": _iso(view.as_of),
            "age_s": max(0, int(now - view.as_of)) if view.as_of is not None else None,
            "online": view.online,
            "verified": True,
            "source": view.source.as_dict() if view.source else None,
            "signals": {path: {"value": r.value, "quality": r.quality, "as_of": _iso(r.as_of),
                               "valid_as_of": _iso(r.valid_as_of)}
                        for path, r in sorted(view.readings.items())},
        }

    @app.get("/v1/vehicles/{vid}/answer", summary="The owner's answer in words and JSON")
    def vehicle_answer(vid: str = Depends(owned), lang: Lang = Query("en")) -> dict[str, Any]:
        try:
            return answer(load(vid), lang, now=clock())
        except NoAnswer as exc:
            raise HTTPException(404, str(exc)) from None

    @app.post("/v1/vehicles/{vid}/refresh",
              summary="Ask the car for a snapshot (at most 5 s), then answer",
              responses={504: {"description": "No snapshot within 5 s: the last-known answer "
                                              "(or a detail if there is none)"}})
    def vehicle_refresh(vid: str = Depends(owned), lang: Lang = Query("en")) -> Any:
        fresh = refresh(vid) if refresh is not None else False
        view = store.view(vid)
        if view is None or view.source is None:
            status = 504 if not fresh else 404
            return JSONResponse({"detail": f"no verified state for {vid} yet"}, status_code=status)
        body = answer(view, lang, now=clock())
        return body if fresh else JSONResponse(body, status_code=504)

    @app.get("/healthz", summary="Liveness: the store answers; broker connection state")
    def healthz() -> Any:
        body = {"status": "ok", **(healthy() if healthy else {})}
        try:
            store.ping()
        except Exception as exc:  # noqa: BLE001
            body.update(status="store unavailable", store=type(exc).__name__)
            return JSONResponse(body, status_code=503)
        return body

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    def prometheus() -> Response:
        return Response(metrics.text(), media_type=CONTENT_TYPE_LATEST)

    return _Front(app, metrics)  # type: ignore[return-value]
