"""uvicorn's configuration for a pocketgpt app: HTTP/1.1 by h11, the head bounded, and
uvicorn's own refusals in the JSON error envelope.

h11 stops buffering a head still incomplete past `--max-header-bytes` (so a slow,
endless head cannot grow memory); HeaderLimitMiddleware answers 431 for a head that
arrived whole in one socket read. uvicorn answers the first case, and any request h11
cannot parse, itself, before the app runs: a plain-text 400. `EnvelopeH11Protocol`
makes those answers the envelope every other error uses (431 for the oversized head).
httptools, if installed, would ignore the head bound: h11 is named explicitly.
"""

from __future__ import annotations

import h11
from fastapi import FastAPI
from uvicorn import Config
from uvicorn.protocols.http.h11_impl import H11Protocol

from server.protocol import ApiError
from server.settings import Settings


class EnvelopeH11Protocol(H11Protocol):
    def send_400_response(self, msg: str) -> None:
        # What h11 holds unparsed tells the two refusals apart (trailing_data is public).
        buffered = len(self.conn.trailing_data[0])
        limit = self.config.h11_max_incomplete_event_size
        if limit is not None and buffered > limit:
            error = ApiError(
                431, "request_header_fields_too_large", f"the request head exceeds {limit} bytes"
            )
        else:
            error = ApiError(400, "invalid_http", "the request is not valid HTTP/1.1")
        body = error.body().model_dump_json().encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
        for event in (
            h11.Response(status_code=error.status_code, headers=headers),
            h11.Data(data=body),
            h11.EndOfMessage(),
        ):
            self.transport.write(self.conn.send(event))
        self.transport.close()


def uvicorn_config(app: FastAPI, settings: Settings, **overrides: object) -> Config:
    """The uvicorn Config `python -m server` runs `app` with (tests pass `overrides`)."""
    options: dict = {
        "host": settings.host,
        "port": settings.port,
        "log_level": settings.log_level,
        "http": EnvelopeH11Protocol,
        "h11_max_incomplete_event_size": settings.max_header_bytes,
        "timeout_graceful_shutdown": 5,
    }
    return Config(app, **(options | overrides))
