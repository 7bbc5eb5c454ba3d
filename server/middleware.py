"""ASGI guards at the edge, before FastAPI sees a request: API key, Host, CORS, head and
body size, counting.

Plain ASGI (not BaseHTTPMiddleware) so streaming responses pass through untouched.
FastAPI applies no request-body limit unless configured to, hence `BodyLimitMiddleware`.
"""

from __future__ import annotations

import hmac

from prometheus_client import Counter
from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.protocol import ApiError


def error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(
        error.body().model_dump(), status_code=error.status_code, headers=error.headers
    )


async def refuse(error: ApiError, scope: Scope, receive: Receive, send: Send) -> None:
    """Answer `error` before the request's body is read, and close the connection: on a
    kept-alive one, the unread body (up to its Content-Length) would be taken as the
    start of the client's next request, which then hangs."""
    closing = {**error.headers, "Connection": "close"}
    response = error_response(ApiError(error.status_code, error.type, error.message, closing))
    await response(scope, receive, send)


class ApiKeyMiddleware:
    """Require `Authorization: Bearer <key>` on every path but `open_paths` (401 otherwise)."""

    def __init__(self, app: ASGIApp, api_key: str, open_paths: frozenset[str]) -> None:
        self.app = app
        self.key = api_key.encode()
        self.open_paths = open_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in self.open_paths:
            given = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, token = given.partition(b" ")
            # compare_digest: the time taken does not depend on how much of the key matched.
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
                error = ApiError(
                    401,
                    "authentication_error",
                    "missing or invalid API key (send `Authorization: Bearer <key>`)",
                    {"WWW-Authenticate": "Bearer"},
                )
                await refuse(error, scope, receive, send)
                return
        await self.app(scope, receive, send)


class CorsMiddleware(CORSMiddleware):
    """Starlette's CORS for the origins --cors-origins lists: their pages may send any
    header (the API key, an SDK's own) with GET and POST, also to a server on this
    machine (Chrome's private-network preflight); a refused preflight is answered in
    the JSON envelope."""

    def __init__(self, app: ASGIApp, origins: list[str]) -> None:
        super().__init__(
            app,
            allow_origins=origins,
            allow_methods=("GET", "HEAD", "POST"),
            allow_headers=("*",),
            allow_private_network=True,
        )

    def preflight_response(self, request_headers: Headers) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code == 200:
            return response
        # Starlette's "Disallowed CORS origin, method": what was refused.
        refused = bytes(response.body).decode().removeprefix("Disallowed CORS ")
        message = (
            f"CORS preflight refused: its {refused} not allowed (origins: those "
            "--cors-origins lists; methods: GET, HEAD, POST)"
        )
        return error_response(ApiError(400, "cors_refused", message))


class AllowedHostsMiddleware:
    """Answer 400 to a request whose Host header names none of `allowed` (any port).

    DNS rebinding: a web page at attacker.example, its name re-resolved to 127.0.0.1,
    is same-origin with a server on this machine and may read its answers; its requests
    still say `Host: attacker.example`. (A request without Host, HTTP/1.0, passes:
    browsers always send one. The host of an absolute-form target, `GET http://host/`,
    has replaced the Host header by now, server/http11.py: it is checked as one.)
    """

    def __init__(self, app: ASGIApp, allowed: frozenset[str]) -> None:
        self.app = app
        self.allowed = frozenset(map(_host_name, allowed))  # as a Host header is read

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            host = dict(scope["headers"]).get(b"host")
            name = None if host is None else _host_name(host.decode("latin-1"))
            if name is not None and name not in self.allowed:
                message = (
                    f"Host {name!r} is not served here (only localhost names and those "
                    "--allowed-hosts lists)"
                )
                await refuse(ApiError(400, "invalid_host", message), scope, receive, send)
                return
        await self.app(scope, receive, send)


def _host_name(host: str) -> str:
    """A Host header's name: lower case, without port, IPv6 brackets or a final dot."""
    host = host.strip().lower()
    if host.startswith("["):
        name = host[1:].partition("]")[0]
    elif host.count(":") > 1:  # an IPv6 address written bare (as --allowed-hosts may)
        name = host
    else:
        name, colon, port = host.rpartition(":")
        if not colon or not port.isdigit():
            name = host
    return name.rstrip(".")


class HeaderLimitMiddleware:
    """Answer 431 for a request head (request line and headers) over `max_bytes`.

    h11 bounds only a head that is still incomplete (`h11_max_incomplete_event_size`,
    server/http11.py sets it to the same limit and answers that case): one that arrives
    whole in a socket read (uvicorn reads up to 64 KiB) is parsed regardless, and reaches
    us here. Its size is counted as h11 counts, in bytes on the wire, so that the same
    head gets the same answer however the network splits it.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and _head_bytes(scope) > self.max_bytes:
            error = ApiError(
                431,
                "request_header_fields_too_large",
                f"the request head exceeds {self.max_bytes} bytes",
            )
            await refuse(error, scope, receive, send)
            return
        await self.app(scope, receive, send)


def _head_bytes(scope: Scope) -> int:
    """The size of the head as sent: `METHOD target HTTP/1.1` CRLF, `name: value` CRLF
    per header, and the blank line. (An absolute-form target counts as what it was read
    as, server/http11.py: the origin-form target, and its authority as the Host header.)"""
    query = scope.get("query_string", b"")
    target = len(scope.get("raw_path") or b"") + (len(query) + 1 if query else 0)
    request_line = len(scope["method"]) + 1 + target + len(" HTTP/1.1\r\n")
    headers = sum(len(name) + len(value) + len(": \r\n") for name, value in scope["headers"])
    return request_line + headers + len("\r\n")


class BodyLimitMiddleware:
    """Answer 413 for a body over `max_bytes`, by Content-Length or by bytes actually sent
    (400 for a request framed both ways).

    The body is read here (it is small by construction) and replayed to the app.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length")
        if declared is not None and b"transfer-encoding" in headers:
            # Two framings: h11 reads the chunked one, a proxy in front may have read the
            # other (request smuggling). RFC 9112 6.3 lets a server refuse it, and close.
            message = "the request gives both Content-Length and Transfer-Encoding: send one"
            await refuse(ApiError(400, "invalid_http", message), scope, receive, send)
            return
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._reject(scope, receive, send)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away before sending its body
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._reject(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()  # later calls wait for the disconnect
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _reject(self, scope: Scope, receive: Receive, send: Send) -> None:
        error = ApiError(
            413, "request_too_large", f"the request body exceeds {self.max_bytes} bytes"
        )
        await refuse(error, scope, receive, send)


GENERATION_PATHS = frozenset({"/v1/generate", "/v1/completions", "/v1/chat/completions"})


class RequestCounter:
    """Count the responses to the generation routes by status, whoever produced them (app
    or guard)."""

    def __init__(self, app: ASGIApp, counter: Counter) -> None:
        self.app = app
        self.counter = counter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in GENERATION_PATHS:
            await self.app(scope, receive, send)
            return

        started = False

        async def counting_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                self.counter.labels(str(message["status"])).inc()
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        except Exception:
            # A bug: Starlette's ServerErrorMiddleware, outside every middleware, answers
            # it with the 500 envelope (if nothing was sent yet), unseen by counting_send.
            if not started:
                self.counter.labels("500").inc()
            raise
