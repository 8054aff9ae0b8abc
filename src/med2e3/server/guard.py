"""Who may talk to the server: a bearer token, a loopback Host header, and same-origin browsers.

* With a token, every API request must send ``Authorization: Bearer TOKEN`` (401 without, 403
  when wrong). The page itself (``GET /``) is served without one: it holds nothing private, takes
  the token from ``?token=`` (a browser cannot add a header when it opens a link) or asks for it,
  and sends it with every API call; so a reload, or a link without the token, still shows the page.
* Without a token (loopback only), the Host header must name a loopback address, so a web page
  on another site cannot reach the server through DNS rebinding.
* A browser request from another origin (its ``Origin`` header differs from ``Host``) is refused,
  so other sites cannot post uploads or questions (CSRF).
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import urlsplit

from med2e3.server.settings import is_loopback

Scope = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable, Callable], Awaitable[None]]

PAGE_PATHS = ("/", "/index.html")


class Guard:
    """ASGI middleware enforcing the rules in the module docstring."""

    def __init__(self, app: ASGIApp, token: str | None):
        self.app = app
        self.token = token

    async def __call__(self, scope: Scope, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        problem = self.check(scope)
        if problem is None:
            await self.app(scope, receive, send)
            return
        status, message = problem
        await _send_json(send, status, {"error": message}, bearer=status == 401)

    def check(self, scope: Scope) -> tuple[int, str] | None:
        """(status, message) when the request is refused, else None."""
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        host = headers.get("host", "")
        if self.token is None and not is_loopback(_hostname(host)):
            return 403, f"host {host!r} is not a loopback address; this server only answers on loopback"
        origin = headers.get("origin")
        if origin is not None and urlsplit(origin).netloc != host:  # 'null' (sandboxed frames) too
            return 403, f"cross-origin request from {origin} refused"
        if self.token is None or (scope.get("method") in ("GET", "HEAD") and scope.get("path") in PAGE_PATHS):
            return None
        sent = _bearer(headers.get("authorization", ""))
        if sent is None:
            return (
                401,
                "this server needs a token: send 'Authorization: Bearer TOKEN' (or open /?token=TOKEN)",
            )
        if not secrets.compare_digest(sent.encode(), self.token.encode()):
            return 403, "wrong token"
        return None


def _bearer(value: str) -> str | None:
    scheme, _, credentials = value.partition(" ")
    if scheme.lower() != "bearer" or not credentials.strip():
        return None
    return credentials.strip()


def _hostname(host: str) -> str:
    """The host part of a Host header ('[::1]:8000' -> '::1', 'localhost:80' -> 'localhost')."""
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


async def _send_json(send: Callable, status: int, body: dict, bearer: bool = False) -> None:
    payload = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    if bearer:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})
