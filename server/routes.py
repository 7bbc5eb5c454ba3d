"""HTTP routes: /v1/generate (JSON or SSE), /health, /v1/models, /metrics.

Routes translate only: validation.py turns the body into a GenerationRequest, the
engine runs it, and its outputs become a JSON body or SSE events (one per engine step,
or per `--stream-interval` tokens).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path

from fastapi import APIRouter, Request, Response
from fastapi.routing import APIRoute
from fastapi.sse import EventSourceResponse
from pydantic_core import to_json

from server.engine import FAILED, Engine, EngineUnavailable, RequestOutput, RequestStream
from server.http11 import log_unsent_answer
from server.metrics import CONTENT_TYPE
from server.protocol import (
    ApiError,
    ErrorResponse,
    GenerateRequest,
    GenerateResponse,
    ModelCard,
    ModelList,
    Usage,
)
from server.scheduler import QueueFull
from server.validation import Validator, parse_json_body

CLIENT_CLOSED_REQUEST = 499  # nginx's status for "the client went away first"
RETRY_AFTER_SECONDS = "1"
# As FastAPI's own SSE endpoints send: no caching, and no buffering in nginx.
_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
# Line breaks to str.splitlines that SSE and JSON leave as they are (see _data_event), in
# UTF-8, and their JSON escapes.
_SPLITLINES_ONLY_BREAKS = tuple(
    (char.encode(), f"\\u{ord(char):04x}".encode()) for char in "\x85\u2028\u2029"
)
_DONE_EVENT = b"data: [DONE]\n\n"


class _JsonBodyRequest(Request):
    """A request whose JSON body is read by validation.parse_json_body."""

    async def json(self) -> object:
        if not hasattr(self, "_json"):
            # A compressed body read as JSON is "not UTF-8"; say what is wrong instead. The
            # codings of every Content-Encoding header, in order; none (or an empty one)
            # means identity.
            codings = [
                coding.strip().lower()
                for header in self.headers.getlist("content-encoding")
                for coding in header.split(",")
                if coding.strip()
            ]
            if any(coding != "identity" for coding in codings):
                message = (
                    f"Content-Encoding {', '.join(codings)} is not supported: send the body "
                    "as it is"
                )
                # RFC 9110 15.5.16: a 415 for a coding says which codings are accepted.
                headers = {"Accept-Encoding": "identity"}
                raise ApiError(415, "unsupported_media_type", message, headers)
            self._json = parse_json_body(await self.body())
        return self._json


class _JsonBodyRoute(APIRoute):
    """FastAPI's route, reading JSON bodies as _JsonBodyRequest does (FastAPI's way to
    change how a body is read: a custom APIRoute)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[None, None, Response]]:
        handle = super().get_route_handler()

        async def handle_json_body(request: Request) -> Response:
            return await handle(_JsonBodyRequest(request.scope, request.receive))

        return handle_json_body


router = APIRouter(route_class=_JsonBodyRoute)


@dataclass(frozen=True)
class Serving:
    """What the routes need once the model is loaded (app.state.serving)."""

    engine: Engine
    validator: Validator
    model_name: str
    max_context: int
    stream_interval: int
    checkpoint: Path  # the step folder loaded


def _serving(request: Request) -> Serving:
    serving: Serving | None = request.app.state.serving
    if serving is None:
        status: str = request.app.state.status
        # Why it failed (paths, device errors) is in the server log, not for any client.
        shown = "failed to load: see the server log" if status.startswith("failed") else status
        raise ApiError(503, "unavailable", f"the model is not ready ({shown})")
    if serving.engine.failed:
        raise ApiError(503, "unavailable", FAILED)
    if serving.engine.draining:
        raise ApiError(503, "unavailable", "the server is shutting down")
    return serving


def _error_responses(*statuses: int) -> dict[int | str, dict]:
    return {status: {"model": ErrorResponse} for status in statuses}


# Every route may get 408 (a request not sent in time; server/http11.py) and 431 (head
# size), and 503 while loading, draining or after the engine failed; with --api-key all
# but /health need the key (401).
_ERROR_RESPONSES = _error_responses(400, 401, 408, 413, 415, 422, 429, 431, 503)
# With `stream`, 200 is an SSE stream (one StreamChunk per `data:` line, then [DONE]);
# documented, so the schema covers every 200 the route sends.
_GENERATE_RESPONSES: dict[int | str, dict] = {
    200: {
        "content": {
            "text/event-stream": {
                "itemSchema": {
                    "type": "object",
                    "required": ["data"],
                    "properties": {
                        "data": {
                            "description": "one StreamChunk as JSON, or the error envelope "
                            "if generation fails midway; after the last chunk, [DONE]",
                            "anyOf": [
                                {
                                    "type": "string",
                                    "contentMediaType": "application/json",
                                    "contentSchema": {
                                        "anyOf": [
                                            {"$ref": "#/components/schemas/StreamChunk"},
                                            {"$ref": "#/components/schemas/ErrorResponse"},
                                        ]
                                    },
                                },
                                {"const": "[DONE]"},
                            ],
                        }
                    },
                }
            }
        }
    },
    **_ERROR_RESPONSES,
}


@router.post("/v1/generate", response_model=GenerateResponse, responses=_GENERATE_RESPONSES)
async def generate(body: GenerateRequest, request: Request) -> Response | GenerateResponse:
    """Generate a continuation of `prompt`: one JSON body, or SSE events with `stream`."""
    serving = _serving(request)
    generation = serving.validator.validate(body)
    try:
        stream = serving.engine.submit(generation)
    except QueueFull:
        raise ApiError(
            429,
            "queue_full",
            "too many requests are waiting; retry later",
            {"Retry-After": RETRY_AFTER_SECONDS},
        ) from None
    except EngineUnavailable as e:
        raise ApiError(503, "unavailable", str(e)) from None
    if body.stream:
        events = _events(stream, serving.stream_interval)
        return EventSourceResponse(events, headers=_SSE_HEADERS)
    return await _complete(stream, request, serving.model_name)


def _usage(output: RequestOutput) -> Usage:
    return Usage(
        prompt_tokens=output.prompt_tokens,
        completion_tokens=output.completion_tokens,
        total_tokens=output.prompt_tokens + output.completion_tokens,
    )


def _engine_error(output: RequestOutput) -> ApiError:
    if isinstance(output.error, EngineUnavailable):
        return ApiError(503, "unavailable", str(output.error))
    # The exception's text stays in the server log (engine.py logs the step's failure).
    return ApiError(500, "internal_error", "generation failed: see the server log")


async def _events(stream: RequestStream, interval: int) -> AsyncIterator[bytes]:
    """An SSE event per `interval` new tokens (1: per engine step), the last one with
    usage, then [DONE].

    A client that disconnects cancels this generator; `close()` cancels the request.
    """
    gathered: RequestOutput | None = None
    try:
        async for output in stream:
            if output.error is not None:
                if gathered is not None:  # the text before the error still arrives
                    yield _chunk_event(gathered)
                yield _data_event(_engine_error(output).body().model_dump_json().encode())
                return
            gathered = output if gathered is None else gathered.followed_by(output)
            if len(gathered.token_ids) >= interval or gathered.finished:
                yield _chunk_event(gathered)
                gathered = None
        yield _DONE_EVENT
    finally:
        stream.close()


def _chunk_event(output: RequestOutput) -> bytes:
    """The StreamChunk of `output` as an SSE event.

    Built as a dict (StreamChunk documents it; a test validates every event against it):
    ~0.4 us instead of ~3 for the model and its JSON, for each of the thousands of events
    a second the event loop writes at 32 and more streams.
    """
    chunk: dict[str, object] = {
        "id": output.request_id,
        "text": output.text,
        "token_ids": output.token_ids,
        "finish_reason": output.finish_reason,
    }
    if output.finish_reason is not None:  # the last event
        chunk["stop_reason"] = output.stop_string
        chunk["usage"] = _usage(output).model_dump()
    return _data_event(to_json(chunk))


def _data_event(data: bytes) -> bytes:
    """One SSE event of `data` (JSON, so without CR or LF): one `data:` line for every
    client.

    JSON leaves NEL, LINE SEPARATOR and PARAGRAPH SEPARATOR unescaped, and SSE does not
    end a line there, but line readers built on str.splitlines (httpx's iter_lines) do:
    a generated U+2028 split the event and its JSON. Escaped, the JSON decodes to the
    same text.
    """
    if not data.isascii():
        for char, escape in _SPLITLINES_ONLY_BREAKS:
            data = data.replace(char, escape)
    return b"data: " + data + b"\n\n"


async def _complete(stream: RequestStream, request: Request, model_name: str) -> Response:
    """Collect the whole text; stop early (and cancel) if the client disconnects."""
    collect = asyncio.ensure_future(_collect(stream))
    disconnect = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait((collect, disconnect), return_when=asyncio.FIRST_COMPLETED)
    finally:
        disconnect.cancel()
        collect.cancel()
        stream.close()
    if not collect.done() or collect.cancelled():
        log_unsent_answer(request.scope, CLIENT_CLOSED_REQUEST)
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    text, last = collect.result()
    if last.error is not None:
        raise _engine_error(last)
    response = GenerateResponse(
        id=last.request_id,
        model=model_name,
        text=text,
        finish_reason=last.finish_reason,
        stop_reason=last.stop_string,
        usage=_usage(last),
    )
    return Response(response.model_dump_json(), media_type="application/json")


async def _collect(stream: RequestStream) -> tuple[str, RequestOutput]:
    parts = []
    async for output in stream:
        parts.append(output.text)
        last = output
    return "".join(parts), last


async def _wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


# HEAD answers as GET does on every GET route (RFC 9110 9.1: uptime checks probe with it);
# only GET is in the schema (one route with both methods gave both operations one
# operationId, which client generators refuse).
@router.get("/health", responses=_error_responses(408, 431, 503))
@router.head("/health", include_in_schema=False)
async def health(request: Request) -> dict[str, str]:
    """200 once the model is loaded and warm; 503 while loading or draining, or after
    the engine failed (so that an orchestrator replaces the process)."""
    _serving(request)
    return {"status": "ready"}


@router.get("/v1/models", response_model=ModelList, responses=_error_responses(401, 408, 431, 503))
@router.head("/v1/models", response_model=ModelList, include_in_schema=False)
async def models(request: Request) -> ModelList:
    serving = _serving(request)
    card = ModelCard(
        id=serving.model_name,
        max_context=serving.max_context,
        checkpoint=serving.checkpoint.resolve().name,
    )
    return ModelList(data=[card])


@router.get("/metrics", include_in_schema=False)
@router.head("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    app_metrics = request.app.state.metrics
    app_metrics.server_state.state(_server_state(request))
    return Response(app_metrics.render(), media_type=CONTENT_TYPE)


def _server_state(request: Request) -> str:
    """One of metrics.SERVER_STATES, read when scraped: what /health would say."""
    serving: Serving | None = request.app.state.serving
    status: str = request.app.state.status  # loading, ready, draining, failed to load: ...
    if status.startswith("failed") or (serving is not None and serving.engine.failed):
        return "failed"
    return status
