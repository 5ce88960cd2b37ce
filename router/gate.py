"""The HTTP port's gate: every request passes it before any route or handler runs.

    headers: count and bytes        -> 431
    API key (deny by default)       -> 401   except OPEN_PATHS, and /metrics with metrics_open
    body: Content-Length, then read -> 413   (never more than the cap is read)

The key check compares the path exactly as the router dispatches it (the ASGI scope's
decoded path): `//v1/models`, `/healthz/`, `/HEALTHZ` or `%2F` spellings are simply other
paths, so they need the key like everything outside the allowlist. The body is read here,
bounded, and handed to the app as one message, so no handler can be made to read more.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from router.limits import Limits
from services.rpc.security import ApiKeys

OPEN_PATHS = frozenset({"/health", "/healthz", "/ping"})
_BODY_METHODS = {"POST", "PUT", "PATCH"}

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


@dataclass(frozen=True)
class Gate:
    api_keys: ApiKeys | None = None
    limits: Limits = Limits()
    metrics_open: bool = False  # /metrics without a key (a scraper that cannot send one)

    def wrap(self, app: Callable) -> Callable:
        async def gated(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != "http":
                return await app(scope, receive, send)
            refusal = self.refusal(scope)
            if refusal is not None:
                return await _error(send, *refusal)
            if scope["method"] in _BODY_METHODS:
                body = await self._read_body(scope, receive)
                if body is None:
                    return await _error(send, 413, f"the request body is over {self.limits.max_request_bytes} bytes")
                receive = _replay(body, receive)
            return await app(scope, receive, send)

        return gated

    def refusal(self, scope: Scope) -> tuple[int, str] | None:
        headers = scope["headers"]
        if len(headers) > self.limits.max_header_count:
            return 431, f"more than {self.limits.max_header_count} request headers"
        if sum(len(k) + len(v) for k, v in headers) > self.limits.max_header_bytes:
            return 431, f"request headers over {self.limits.max_header_bytes} bytes"
        if self.api_keys and not self._open(scope["path"]):
            auth = next((v for k, v in headers if k == b"authorization"), None)
            if not self.api_keys.check(auth.decode("latin-1") if auth is not None else None):
                return 401, "a valid API key is required (Authorization: Bearer KEY)"
        return None

    def _open(self, path: str) -> bool:
        return path in OPEN_PATHS or (self.metrics_open and path == "/metrics")

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes | None:
        """The whole body, or None once it is over the cap (announced or read)."""
        cap = self.limits.max_request_bytes
        length = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if length is not None and (not length.isdigit() or int(length) > cap):
            return None
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left: let the app see it
                return b"".join(chunks)
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > cap:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # then whatever comes next: the disconnect

    return replay


_TYPES = {401: "authentication_error", 413: "invalid_request_error", 431: "invalid_request_error"}


async def _error(send: Send, status: int, message: str) -> None:
    """An OpenAI-shaped error, and the connection closed (a body may be left unread)."""
    body = json.dumps({"error": {"message": message, "type": _TYPES[status], "param": None,
                                 "code": str(status)}}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"connection", b"close")]
    if status == 401:
        headers.append((b"www-authenticate", b'Bearer realm="pdserve"'))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
