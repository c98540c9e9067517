"""ASGI middleware: the request body limit (413) and the request metrics (Prometheus)."""

from __future__ import annotations

import time

from service.api.errors import error_response


class BodyLimitMiddleware:
    """Refuse bodies over `max_bytes` with 413, by Content-Length or while streaming."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._too_big(scope, receive, send)
        received = 0
        response_started = False

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _BodyTooLarge
            return message

        async def tracking_send(message):
            nonlocal response_started
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _BodyTooLarge:
            if not response_started:
                await self._too_big(scope, receive, send)

    async def _too_big(self, scope, receive, send):
        # Built only when needed: making it for every request cost 3% of the submit path.
        response = error_response("body_too_large", f"request body exceeds {self.max_bytes} bytes")
        await response(scope, receive, send)


class _BodyTooLarge(Exception):
    pass


class RequestMetricsMiddleware:
    """Count requests by method, route template and status; time them."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status_holder = {"status": 500}

        async def tracking_send(message):
            if message["type"] == "http.response.start":
                status_holder["status"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        finally:
            # The app's services exist once it has started (service/api/app.py's lifespan).
            services = (
                getattr(scope.get("app").state, "services", None) if scope.get("app") else None
            )
            if services is not None:
                route = scope.get("route")
                template = getattr(route, "path", None) or "unmatched"
                services.metrics.observe_request(
                    scope["method"],
                    template,
                    status_holder["status"],
                    time.perf_counter() - started,
                )
