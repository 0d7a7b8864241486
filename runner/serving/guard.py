"""ASGI middleware in front of every route: metrics, API key (401) and the concurrency cap (429).

A plain ASGI middleware rather than Starlette's BaseHTTPMiddleware: it sees the real status of every response (including
the 413 FastAPI's body limit sends) and adds no task or stream copy per request. The body limit itself is FastAPI's
`max_body_size`; timeouts (504) and readiness (503) live in the endpoints, where the work is.
"""

from __future__ import annotations

import hmac
from time import perf_counter

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from runner.serving.metrics import Metrics

OPEN = frozenset({"/health"})  # liveness probes carry no credentials
UNLIMITED = frozenset({"/health", "/ready", "/metrics"})  # must answer even when the server is saturated


class Guard:
    def __init__(self, app: ASGIApp, *, metrics: Metrics, routes: frozenset[str], max_concurrency: int,
                 api_key: str | None) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = routes  # known paths label the metrics; anything else is "other" (bounded label values)
        self.max_concurrency = max_concurrency
        self.expected = f"Bearer {api_key}".encode() if api_key else None
        self.in_flight = 0  # the event loop is single-threaded: a plain counter is exact

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        status, start = 500, perf_counter()  # a crash before the response starts counts as 500

        async def send_seen(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self._guarded(scope, receive, send_seen, path)
        finally:
            route = path if path in self.routes else "other"
            self.metrics.requests.labels(route, scope["method"], str(status)).inc()
            self.metrics.latency.labels(route).observe(perf_counter() - start)

    async def _guarded(self, scope: Scope, receive: Receive, send: Send, path: str) -> None:
        if self.expected is not None and path not in OPEN and not self._authorized(scope):
            await _reply(scope, receive, send, 401, "missing or wrong API key", {"WWW-Authenticate": "Bearer"})
            return
        if path in UNLIMITED:
            await self.app(scope, receive, send)
            return
        if self.in_flight >= self.max_concurrency:
            # Refuse at once (as TGI does) instead of queueing: a client that retries later beats a timeout for all.
            await _reply(scope, receive, send, 429, "too many requests in flight; retry shortly", {"Retry-After": "1"})
            return
        self.in_flight += 1
        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1
            self.metrics.in_flight.dec()

    def _authorized(self, scope: Scope) -> bool:
        given = Headers(scope=scope).get("authorization", "").encode()
        return hmac.compare_digest(given, self.expected or b"")  # constant time: no key guessing by timing


async def _reply(scope: Scope, receive: Receive, send: Send, status: int, detail: str, headers: dict[str, str]) -> None:
    await JSONResponse({"detail": detail}, status_code=status, headers=headers)(scope, receive, send)
