"""uvicorn's configuration for a pocketgpt app: HTTP/1.1 by h11, the head bounded in
size, each request bounded in time, and uvicorn's own refusals in the JSON error
envelope.

h11 stops buffering a head still incomplete past `--max-header-bytes` (so a slow,
endless head cannot grow memory); HeaderLimitMiddleware answers 431 for a head that
arrived whole in one socket read. uvicorn answers the first case, and any request h11
cannot parse, itself, before the app runs: a plain-text 400. `EnvelopeH11Protocol`
makes those answers the envelope every other error uses (431 for the oversized head).
httptools, if installed, would ignore the head bound: h11 is named explicitly.

uvicorn has no deadline for receiving a request (its keep-alive timeout covers only a
silent connection between requests, and any byte received cancels it), so a client
sending a head or body a byte at a time, or connecting and sending nothing, held its
connection for good: a few hundred of them exhaust the server's file descriptors.
`EnvelopeH11Protocol` gives each request `--request-timeout` seconds, from the
connection's start or the previous response's end until its last body byte, then
answers 408 (or closes silently if nothing of a request came) and closes. A response,
however long it streams, is never cut by it.

Nor had uvicorn a deadline for a client to read its response: a stream whose client
stopped reading (its socket's buffers full) held its connection, and the outputs its
request went on generating, for as long as the client kept the connection open. Once
the server's writes are paused on a client that reads nothing of what waits for it for
`--request-timeout` seconds, the connection is reset (its request cancelled, as for a
client that disconnects); one that reads anything in that time gets as long again.

A request target in absolute-form (`POST http://127.0.0.1:8000/v1/generate HTTP/1.1`,
as proxies and some clients send) must be accepted (RFC 9112 3.2.2); uvicorn took it
whole for the path (a 404). The connection reads it as the origin-form target it names,
its authority replacing any Host header (as that section says): so the allowed-hosts
check (server/middleware.py) judges the host the request names, whichever way it names
it. One that is no http(s) URL with a host is a 400, as any request h11 cannot parse.

No route is a WebSocket, so no request is upgraded to one: a request asking to be
(`Upgrade: websocket`) is served as the plain HTTP request it also is (RFC 9110 7.8 lets a
server ignore Upgrade). Where websockets or wsproto was installed, uvicorn upgraded it, and
the Host, API-key and head-size guards, which check HTTP requests only, let it through to
a plain-text 403 (431 past the WebSocket library's own 8 KiB head bound); elsewhere it
logged two warnings a request, one advising to install such a library.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import re
import socket
import struct
from http import HTTPStatus
from urllib.parse import urlsplit

import h11
from fastapi import FastAPI
from starlette.types import Scope
from uvicorn import Config
from uvicorn.config import LOGGING_CONFIG
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.utils import get_client_addr, get_path_with_query_string

from server.protocol import ApiError
from server.settings import Settings

log = logging.getLogger(__name__)

# h11 states of the client's side once its request has arrived whole (or never will).
_REQUEST_RECEIVED = (h11.DONE, h11.MUST_CLOSE, h11.CLOSED, h11.ERROR)
# ... of which those where the client sends no more (after ERROR, a refused head, it
# may still be sending).
_CLIENT_DONE = (h11.DONE, h11.MUST_CLOSE, h11.CLOSED)
LINGER_SECONDS = 2.0
# h11 parses each piece of a body in Python (~5 us): 1 MB sent chunked in 1-byte chunks
# is a million pieces, seconds of the event loop every stream waits on, before any guard
# (the API key included) can answer. A network's packets carry hundreds of bytes each;
# a body with more pieces than this of fewer bytes than that is refused (413).
SMALL_PIECE_BYTES = 256
MAX_SMALL_PIECES = 1024
# RFC 3986 3.1: a request target that begins with a scheme is in absolute-form.
_SCHEME = re.compile(rb"[A-Za-z][A-Za-z0-9+.-]*:")


def origin_form(target: bytes) -> tuple[bytes, bytes] | None:
    """The origin-form target (path and query) and the authority that an absolute-form
    request target names; None for a target in another form (`/path`, `*`). ValueError,
    saying why, for one that is not an http(s) URL naming a host."""
    if not _SCHEME.match(target):
        return None
    try:
        # h11 admits ASCII targets only; a fragment is left in, as in an origin-form one.
        url = urlsplit(target.decode("ascii"), allow_fragments=False)
        url.port  # noqa: B018 (raises for a port that is no number up to 65535)
    except ValueError:  # or an IPv6 address without its closing bracket
        raise ValueError("its host or port is malformed") from None
    if url.scheme not in ("http", "https"):
        raise ValueError(f"its scheme is {url.scheme!r}, not http or https")
    if "@" in url.netloc:
        # RFC 9110 4.2.4: user info in an http(s) URL is an error (it disguises the host).
        raise ValueError("it gives user info before its host")
    if not url.hostname:
        raise ValueError("it names no host")
    path = url.path or "/"  # RFC 9110 4.2.3: an empty path is "/"
    query = f"?{url.query}" if url.query else ""
    return (path + query).encode("ascii"), url.netloc.encode("ascii")


def _in_origin_form(request: h11.Request) -> h11.Request:
    """`request`, an absolute-form target read as the origin-form one it names, and its
    authority as the Host header (RFC 9112 3.2.2: any Host sent is ignored)."""
    named = origin_form(request.target)
    if named is None:
        return request
    target, authority = named
    headers = [(name, value) for name, value in request.headers if name != b"host"]
    return h11.Request(
        method=request.method,
        target=target,
        headers=[*headers, (b"host", authority)],
        http_version=request.http_version,
    )


class _ServerConnection(h11.Connection):
    """h11's server connection, reading an absolute-form request target as the
    origin-form one it names, and refusing a target that is no http(s) URL or a request
    body that comes in too many small pieces (raised as h11's own protocol error, which
    uvicorn answers through `send_400_response`)."""

    small_pieces = 0  # of the current request's body
    bad_target: str | None = None  # what is wrong with the refused request's target
    head_too_large = False  # h11 refused a head still incomplete past its bound

    def next_event(self) -> object:
        try:
            event = super().next_event()
        except h11.RemoteProtocolError as e:
            # h11 hints 431 for that refusal alone: what it holds unparsed does not tell
            # it apart (a malformed head arrives with its body behind it).
            self.head_too_large = e.error_status_hint == 431
            raise
        if isinstance(event, h11.Request):
            self.small_pieces = 0
            try:
                event = _in_origin_form(event)
            except ValueError as e:
                self.bad_target = str(e)
                raise h11.RemoteProtocolError("the request target is no http(s) URL") from None
        elif isinstance(event, h11.Data) and len(event.data) < SMALL_PIECE_BYTES:
            self.small_pieces += 1
            if self.too_many_small_pieces:
                raise h11.RemoteProtocolError("the request body came in too many pieces")
        return event

    @property
    def too_many_small_pieces(self) -> bool:
        return self.small_pieces > MAX_SMALL_PIECES


class _LingeringTransport:
    """A connection's transport whose close() lingers while the client may still be
    sending the request the server answered without reading it whole (413 by
    Content-Length, 401, 431, 400, 408, 503 at shutdown).

    A socket closed with unread bytes sends RST, and a client still uploading can lose
    the answer already sent to it (async httpx raised ReadError instead of the 413).
    So, as nginx's lingering close: the write side is shut (the answer and a FIN go
    out), what the client still sends is read and dropped until it closes its side or
    LINGER_SECONDS pass, then the socket closes (at once, if the client has not even
    read the answer by then).

    A connection closed between requests (uvicorn's keep-alive timeout, or this module's
    request deadline on a silent one) has no request arriving: it closes plainly, once
    the client has read what waits for it. Lingering there cut a long answer a client
    was still reading (slowly) short after LINGER_SECONDS; one that reads nothing is
    reset by EnvelopeH11Protocol's check instead.
    """

    def __init__(self, transport: asyncio.Transport, protocol: EnvelopeH11Protocol) -> None:
        self._transport = transport
        self._protocol = protocol
        self.write = transport.write  # every SSE event: bound once, not via __getattr__

    def __getattr__(self, name: str) -> object:
        return getattr(self._transport, name)

    def is_closing(self) -> bool:
        return self._protocol.lingering is not None or self._transport.is_closing()

    def close(self) -> None:
        protocol, transport = self._protocol, self._transport
        if (
            protocol.lingering is None
            and not transport.is_closing()
            and protocol.request_arriving()
            and transport.can_write_eof()
        ):
            transport.write_eof()
            transport.resume_reading()  # uvicorn pauses reading a body nobody reads
            protocol.lingering = protocol.loop.call_later(LINGER_SECONDS, self._end_linger)
            return
        transport.close()
        if transport.get_write_buffer_size():  # sent as the client reads it
            protocol.watch_reading()

    def _end_linger(self) -> None:
        # close() would wait to send what the client has not read; abort() does not.
        if self._transport.get_write_buffer_size():
            self._transport.abort()
        else:
            self._transport.close()


class EnvelopeH11Protocol(H11Protocol):
    request_timeout: float = 30.0  # uvicorn_config() sets it from Settings
    _deadline: asyncio.TimerHandle | None = None
    lingering: asyncio.TimerHandle | None = None  # the end of a lingering close
    _stalled_check: asyncio.TimerHandle | None = None  # while writes are paused, or closing
    _unsent: int = 0  # bytes waiting for the client at the last check

    def __init__(self, config: Config, *args: object, **kwargs: object) -> None:
        super().__init__(config, *args, **kwargs)  # type: ignore[arg-type]
        self.conn = _ServerConnection(h11.SERVER, config.h11_max_incomplete_event_size)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(_LingeringTransport(transport, self))  # type: ignore[arg-type]
        self._arm_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_deadline()
        self._stop_stall_check()
        if self.lingering is not None:
            self.lingering.cancel()
        super().connection_lost(exc)

    def request_arriving(self) -> bool:
        """Whether the client may still be sending a request: one begun and not whole (or
        refused unparsed)."""
        state = self.conn.their_state
        if state is h11.IDLE:
            return bool(self.conn.trailing_data[0])  # part of a head
        return state not in _CLIENT_DONE

    def pause_writing(self) -> None:
        super().pause_writing()
        self.watch_reading()

    def resume_writing(self) -> None:
        if not self.transport.is_closing():  # else: closing once the client has read all
            self._stop_stall_check()
        super().resume_writing()

    def watch_reading(self) -> None:
        """Reset the connection unless the client reads some of what waits for it within
        each `request_timeout`. Nothing more is written meanwhile (paused: uvicorn's send
        waits; or closing), so what waits shrinks only as the client reads."""
        if self._stalled_check is None:
            self._unsent = self.transport.get_write_buffer_size()
            self._stalled_check = self.loop.call_later(self.request_timeout, self._check_reading)

    def _stop_stall_check(self) -> None:
        if self._stalled_check is not None:
            self._stalled_check.cancel()
            self._stalled_check = None

    def _check_reading(self) -> None:
        self._stalled_check = None
        unsent = self.transport.get_write_buffer_size()
        if not unsent:
            return
        if unsent < self._unsent:  # it read some: as long again, from what waits now
            self.watch_reading()
            return
        log.warning(
            "a client read nothing of its response for %g s: disconnected", self.request_timeout
        )
        # Reset, not closed: a close would leave the kernel retrying the unread bytes for
        # minutes to a client that reads none.
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.transport.abort()

    def _should_upgrade(self) -> bool:
        return False  # no WebSocket route: served as plain HTTP (the module docstring)

    def data_received(self, data: bytes) -> None:
        if self.lingering is None:  # else: the rest of a request already answered
            super().data_received(data)

    def handle_events(self) -> None:
        super().handle_events()
        if self.conn.their_state in _REQUEST_RECEIVED:
            self._disarm_deadline()

    def on_response_complete(self) -> None:
        # The next request's time starts now. Armed before uvicorn starts that request's
        # cycle, so a pipelined request that has already arrived disarms it at once.
        if not self.transport.is_closing():
            self._arm_deadline()
        super().on_response_complete()

    def _arm_deadline(self) -> None:
        self._disarm_deadline()
        self._deadline = self.loop.call_later(self.request_timeout, self._request_timed_out)

    def _disarm_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _request_timed_out(self) -> None:
        self._deadline = None
        if self.transport.is_closing() or self.conn.their_state in _REQUEST_RECEIVED:
            return
        if self.conn.their_state is h11.IDLE:
            # Part of a head, or nothing: on an idle keep-alive connection a 408 could be
            # read as the answer to the request a client is about to send on it.
            partly_sent = bool(self.conn.trailing_data[0])
        else:  # the head came, the body is still coming; unless a guard already answered
            partly_sent = not self.cycle.response_started
        if partly_sent:
            timeout = f"{self.request_timeout:g} s"
            message = f"the request did not arrive whole within {timeout}"
            self._send_error_and_close(ApiError(408, "request_timeout", message))
        else:
            self.transport.close()

    def shutdown(self) -> None:
        if self.lingering is not None:
            return  # answered; it closes itself within LINGER_SECONDS
        # uvicorn's shutdown lets a request still sending its body go on until its graceful
        # timeout, then cancels it into a plain-text 500. It will not be served: say so now
        # (unless something was answered already: a guard's refusal, a 408).
        if (
            self.cycle is not None
            and self.conn.our_state is h11.SEND_RESPONSE
            and self.conn.their_state not in _REQUEST_RECEIVED
        ):
            self._disarm_deadline()
            self._send_error_and_close(ApiError(503, "unavailable", "the server is shutting down"))
            return
        super().shutdown()

    def send_400_response(self, msg: str) -> None:
        if self.conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):  # a guard answered
            self.transport.close()
            return
        limit = self.config.h11_max_incomplete_event_size
        if self.conn.too_many_small_pieces:
            message = f"the request body came in more than {MAX_SMALL_PIECES} small pieces"
            error = ApiError(413, "request_too_large", message)
        elif self.conn.bad_target is not None:
            message = f"the request target is not a valid http(s) URL: {self.conn.bad_target}"
            error = ApiError(400, "invalid_http", message)
        elif limit is not None and self.conn.head_too_large:
            error = ApiError(
                431, "request_header_fields_too_large", f"the request head exceeds {limit} bytes"
            )
        else:
            error = ApiError(400, "invalid_http", "the request is not valid HTTP/1.1")
        self._send_error_and_close(error)

    def _send_error_and_close(self, error: ApiError) -> None:
        body = error.body().model_dump_json().encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
        for event in (
            h11.Response(
                status_code=error.status_code,
                headers=headers,
                reason=HTTPStatus(error.status_code).phrase,
            ),
            h11.Data(data=body),
            h11.EndOfMessage(),
        ):
            self.transport.write(self.conn.send(event))
        self.transport.close()


class QuietProbes(logging.Filter):
    """Keeps answered health checks and metric scrapes (Docker's and Prometheus's every
    5 s with docker compose) out of the access log, where they would bury the requests;
    a probe that got an error is still logged. `--log-level debug` logs them all."""

    PATHS = frozenset({"/health", "/metrics"})

    def filter(self, record: logging.LogRecord) -> bool:
        # uvicorn's access record: (client, method, path with query, HTTP version, status).
        if not (isinstance(record.args, tuple) and len(record.args) == 5):
            return True
        method, path, status = record.args[1], str(record.args[2]), record.args[4]
        probe = method in ("GET", "HEAD") and path.partition("?")[0] in self.PATHS
        return not (probe and int(status) < 400)


def log_unsent_answer(scope: Scope, status: int) -> None:
    """An access-log line, as uvicorn writes it, for an answer the client left before.

    uvicorn logs a response as it starts sending it, and sends nothing once the client
    has gone: without this, a request given up by its client (499) left no line.
    """
    access = logging.getLogger("uvicorn.access")
    if access.hasHandlers():
        access.info(
            '%s - "%s %s HTTP/%s" %d',
            get_client_addr(scope),
            scope["method"],
            get_path_with_query_string(scope),
            scope["http_version"],
            status,
        )


def uvicorn_config(app: FastAPI, settings: Settings, **overrides: object) -> Config:
    """The uvicorn Config `python -m server` runs `app` with (tests pass `overrides`)."""

    class Protocol(EnvelopeH11Protocol):
        request_timeout = settings.request_timeout

    # uvicorn's logging, and the same for this package's loggers (what was loaded, the
    # engine's errors), which would otherwise print warnings only, unformatted.
    log_config = copy.deepcopy(LOGGING_CONFIG)
    log_config["loggers"]["server"] = {
        "handlers": ["default"],
        "level": settings.log_level.upper(),
        "propagate": False,
    }
    if settings.log_level != "debug":
        log_config["filters"] = {"quiet_probes": {"()": QuietProbes}}
        log_config["handlers"]["access"]["filters"] = ["quiet_probes"]
    options: dict = {
        "host": settings.host,
        "port": settings.port,
        "log_level": settings.log_level,
        "log_config": log_config,
        "http": Protocol,
        "ws": "none",  # no WebSocket route (see the module docstring)
        "h11_max_incomplete_event_size": settings.max_header_bytes,
        "timeout_graceful_shutdown": 5,
    }
    return Config(app, **(options | overrides))
