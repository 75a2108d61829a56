"""ASGI guard in front of the API routes: the API key is checked from the headers before any of the body is
read, a declared ``Content-Length`` over the limit is refused at once (413) and a streamed body is read only up
to the limit; the app then parses the buffered body.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from starlette.responses import JSONResponse

from leaklab.service.store import KeyRecord

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

GUARDED_PREFIX = "/v1/"
STATE_KEY = "api_key"


def error_body(message: str, kind: str, status: int, param: str | None = None) -> dict:
    """The one error shape of the API (OpenAI style)."""
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


def _error(status: int, message: str, kind: str, headers: dict[str, str] | None = None) -> JSONResponse:
    # Connection: close, since an unread body is left on the socket
    return JSONResponse(
        error_body(message, kind, status), status_code=status, headers={**(headers or {}), "Connection": "close"}
    )


def _header(scope: Scope, name: bytes) -> str | None:
    for k, v in scope.get("headers", []):
        if k.lower() == name:
            return v.decode("latin-1")
    return None


class BodyGuard:
    """``authenticate(secret) -> KeyRecord | None``; ``max_body`` in bytes. The record of an authenticated
    key is left in the request state under ``api_key``."""

    def __init__(self, app: ASGIApp, authenticate: Callable[[str], KeyRecord | None], max_body: int) -> None:
        self.app, self.authenticate, self.max_body = app, authenticate, max_body

    def _key_error(self, scope: Scope) -> JSONResponse | None:
        auth = _header(scope, b"authorization") or ""
        scheme, _, secret = auth.partition(" ")
        if scheme.lower() != "bearer" or not secret.strip():
            return _error(
                401,
                "missing API key: send 'Authorization: Bearer <key>'",
                "invalid_request_error",
                {"WWW-Authenticate": "Bearer"},
            )
        rec = self.authenticate(secret.strip())
        if rec is None:
            return _error(401, "invalid or revoked API key", "invalid_request_error", {"WWW-Authenticate": "Bearer"})
        scope.setdefault("state", {})[STATE_KEY] = rec
        return None

    def _too_large(self, size: str) -> JSONResponse:
        return _error(413, f"request body of {size} bytes; at most {self.max_body} bytes", "request_too_large")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(GUARDED_PREFIX):
            await self.app(scope, receive, send)
            return
        refusal = self._key_error(scope)
        declared = _header(scope, b"content-length")
        if refusal is None and declared is not None:
            if not declared.strip().isdigit():
                refusal = _error(400, "malformed Content-Length header", "invalid_request_error")
            elif int(declared) > self.max_body:
                refusal = self._too_large(declared)
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_body:
                await self._too_large(f"more than {self.max_body}")(scope, receive, send)
                return
        await self.app(scope, _replay(bytes(body), receive), send)


def _replay(body: bytes, receive: Receive) -> Receive:
    """The buffered body as one message, then the connection's own messages (a disconnect, when it comes)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
