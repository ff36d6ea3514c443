"""Pure ASGI middlewares of the service: metrics, a request deadline and a request-body cap.

Pure ASGI (not Starlette's BaseHTTPMiddleware) so that the body cap sees the bytes as they arrive, before
any multipart parser spools them, and so that a timed-out request is really cancelled.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any, Awaitable, Callable, MutableMapping

from starlette.exceptions import HTTPException

from .metrics import Metrics

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


async def send_json_error(send: Send, status: int, message: str) -> None:
    """Answer with {"error": message, "status": status}: the one error shape of the whole service."""
    body = json.dumps({"error": message, "status": status}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class _Started:
    """Wraps `send` to remember whether the response (and which status) has begun."""

    def __init__(self, send: Send):
        self._send = send
        self.status: int | None = None

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = int(message["status"])
        await self._send(message)


class _HttpMiddleware:
    """Passes lifespan (and any non-HTTP) events straight through; subclasses handle HTTP requests in `http`."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self.http(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        raise NotImplementedError


class MetricsMiddleware(_HttpMiddleware):
    """Records every HTTP request's method, route template, status and latency in `metrics`."""

    def __init__(self, app: ASGIApp, metrics: Metrics):
        super().__init__(app)
        self.metrics = metrics

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        tracked = _Started(send)
        try:
            await self.app(scope, receive, tracked)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or ("static" if scope["path"].startswith("/static/") else "other")
            self.metrics.record(scope["method"], template, tracked.status or 500, time.perf_counter() - started)


class TimeoutMiddleware(_HttpMiddleware):
    """Cancels a request that runs longer than `seconds` (slow upload, stuck batch) and answers 504."""

    def __init__(self, app: ASGIApp, seconds: float):
        super().__init__(app)
        self.seconds = seconds

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        tracked = _Started(send)
        try:
            await asyncio.wait_for(self.app(scope, receive, tracked), self.seconds)
        except asyncio.TimeoutError:
            if tracked.status is None:
                await send_json_error(
                    send, 504, f"the request took longer than the service's {self.seconds:g}-second limit (--timeout)"
                )


class BodyTooLarge(HTTPException):
    """Raised from `receive` when the body passes the cap. An HTTPException, because FastAPI turns any other
    exception from reading the body into a generic 400; should it escape the app, the middleware answers."""

    def __init__(self, message: str):
        super().__init__(status_code=413, detail=message)


class BodyLimitMiddleware(_HttpMiddleware):
    """Refuses request bodies over `max_bytes` with 413: at once from Content-Length, else while streaming."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        super().__init__(app)
        self.max_bytes = max_bytes

    def _message(self, size: str) -> str:
        return (
            f"the request body is {size}, over the service's {self.max_bytes:,}-byte cap "
            "(--max-upload-mb plus room for the form): send a smaller photo"
        )

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await send_json_error(send, 413, self._message(f"{int(declared):,} bytes"))
            return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise BodyTooLarge(self._message(f"over {self.max_bytes:,} bytes"))
            return message

        tracked = _Started(send)
        try:
            await self.app(scope, limited, tracked)
        except BodyTooLarge as error:
            if tracked.status is None:
                await send_json_error(send, 413, error.detail)
