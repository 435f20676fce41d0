"""The bearer-token check, and the login that lets a browser open the status page.

A plain ASGI middleware, so it covers every route (the OpenAPI pages too) except
``/healthz``. It compares raw bytes with ``hmac.compare_digest``, so a token with
non-ASCII bytes is simply wrong (401), never an encoding error.

A browser cannot send an ``Authorization`` header to a page it opens, so under
``--token`` the page (``/`` and ``/status``) answers a login form; posting the token to
``/login`` sets it as an HttpOnly, SameSite=Strict cookie, which every route accepts
like the header. The token never travels in a URL, so no access log can hold it.
"""

from __future__ import annotations

import hmac
import urllib.parse

from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .page import login_page

__all__ = ["COOKIE", "PAGE_PATHS", "BearerAuth"]

#: The cookie holding the token once a browser has logged in.
COOKIE = "batchd_token"
#: The routes that answer the HTML status page (a login form until logged in).
PAGE_PATHS = frozenset({"/", "/status"})
_OPEN_PATHS = frozenset({"/healthz"})
_MAX_FORM_BYTES = 4096


def _header(scope: Scope, name: bytes) -> bytes:
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value)
    return b""


def _cookie(scope: Scope) -> bytes:
    for part in _header(scope, b"cookie").split(b";"):
        key, _, value = part.strip().partition(b"=")
        if key == COOKIE.encode():
            return urllib.parse.unquote_to_bytes(value)
    return b""


async def _form_token(receive: Receive) -> bytes | None:
    """The ``token`` field of a small urlencoded form body, None if there is none."""
    body = b""
    while True:
        message: Message = await receive()
        body += message.get("body", b"")
        if len(body) > _MAX_FORM_BYTES:
            return None
        if not message.get("more_body", False):
            break
    values = urllib.parse.parse_qs(body, max_num_fields=4).get(b"token")
    return values[0] if values else None


class BearerAuth:
    """Refuses every request but /healthz without the token (header or login cookie)."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self.token = token.encode("utf-8")
        self.expected = b"Bearer " + self.token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in _OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        if scope["path"] == "/login" and scope["method"] == "POST":
            await self._login(scope, receive, send)
            return
        got = _header(scope, b"authorization")
        if hmac.compare_digest(got, self.expected) or hmac.compare_digest(
            _cookie(scope), self.token
        ):
            await self.app(scope, receive, send)
            return
        if scope["path"] in PAGE_PATHS and scope["method"] == "GET":
            page = HTMLResponse(login_page(), status_code=401)
            await page(scope, receive, send)
            return
        detail = (
            "this server needs 'Authorization: Bearer <token>' (the token given to batchd serve)"
            if not got
            else "the bearer token does not match the server's"
        )
        response = JSONResponse(
            {"error": "unauthorized", "detail": detail},
            status_code=401,
            headers={"WWW-Authenticate": "Bearer"},
        )
        await response(scope, receive, send)

    async def _login(self, scope: Scope, receive: Receive, send: Send) -> None:
        given = await _form_token(receive)
        if given is None or not hmac.compare_digest(given, self.token):
            wrong = "that is not this server's token" if given else "enter the server's token"
            page = HTMLResponse(login_page(wrong), status_code=401)
            await page(scope, receive, send)
            return
        done = RedirectResponse("/status", status_code=303)
        done.set_cookie(
            COOKIE,
            urllib.parse.quote_from_bytes(self.token, safe=""),
            httponly=True,
            samesite="strict",
            path="/",
        )
        await done(scope, receive, send)
