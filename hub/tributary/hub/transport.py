"""HTTPS as browsers should keep to it: every response to a request that arrived over HTTPS
(directly, or through a TLS proxy whose X-Forwarded-Proto uvicorn trusts) carries
Strict-Transport-Security, so a browser never falls back to plain HTTP for this hub.

A plain ASGI middleware, not Starlette's BaseHTTPMiddleware, so that the event streams
pass through it untouched."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send


class StrictTransportSecurity:
    def __init__(self, app: ASGIApp, max_age: int) -> None:
        self.app = app
        self.header = (b"strict-transport-security", f"max-age={max_age}".encode())
        self.enabled = max_age > 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self.enabled or scope["type"] != "http" or scope.get("scheme") != "https":
            await self.app(scope, receive, send)
            return

        async def send_with_header(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)

        await self.app(scope, receive, send_with_header)
