"""HTTP routes: /v1/generate (JSON or SSE), /v1/completions and /v1/chat/completions
(OpenAI's APIs, JSON or SSE), /tokenize and /detokenize (vLLM's), /health, /v1/models (and
/v1/models/{id}), /metrics.

Routes translate only: validation.py turns the body (each prompt of a completions
request; a chat's messages, through chat.py's template) into a GenerationRequest, the
engine runs it, and its outputs become a JSON body or SSE events (one per engine step, or
per `--stream-interval` tokens).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TypeVar

from fastapi import APIRouter, Request, Response
from fastapi.routing import APIRoute
from fastapi.sse import EventSourceResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic_core import to_json
from starlette.types import Receive, Scope

from model.chat_template import ChatError, ChatTemplate
from server.engine import (
    FAILED,
    Engine,
    EngineUnavailable,
    RequestOutput,
    RequestStream,
    TokenLogprob,
)
from server.http11 import log_unsent_answer
from server.protocol import (
    ApiError,
    ChatCompletion,
    ChatCompletionRequest,
    ChatMessage,
    Completion,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorResponse,
    GenerateRequest,
    GenerateResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
    Usage,
)
from server.scheduler import QueueFull
from server.validation import GenerationRequest, Validator, parse_json_body

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
_JSON = "application/json"
_T = TypeVar("_T")


class _JsonBodyRequest(Request):
    """A request whose JSON body is read by validation.parse_json_body, for a model of
    `fields` fields."""

    def __init__(self, scope: Scope, receive: Receive, fields: int) -> None:
        super().__init__(scope, receive)
        self.fields = fields

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
            self._json = parse_json_body(await self.body(), self.fields)
        return self._json


class _JsonBodyRoute(APIRoute):
    """FastAPI's route, reading JSON bodies as _JsonBodyRequest does (FastAPI's way to
    change how a body is read: a custom APIRoute)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[None, None, Response]]:
        handle = super().get_route_handler()
        body = self.body_field
        fields = 0 if body is None else len(body.field_info.annotation.model_fields)

        async def handle_json_body(request: Request) -> Response:
            return await handle(_JsonBodyRequest(request.scope, request.receive, fields))

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
    chat: ChatTemplate | None  # the checkpoint's chat template, if it has one
    token_names: list[str]  # id -> its name in logprobs (loading.logprob_names)
    # When it was loaded (Unix time, seconds): the model card's `created`, which OpenAI's
    # Model schema requires.
    loaded_at: int = field(default_factory=lambda: int(time.time()))


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
# /tokenize and /detokenize: as the generation routes, but nothing is queued (no 429).
_TOKEN_ERRORS = (400, 401, 404, 408, 413, 415, 422, 431, 503)


def _streaming_responses(chunk: str, extra_errors: tuple[int, ...] = ()) -> dict[int | str, dict]:
    """With `stream`, 200 is an SSE stream: one `chunk` (a component's name) per `data:`
    line, then [DONE]. Documented, so that the schema covers every 200 the route sends."""
    data = {
        "description": f"one {chunk} as JSON, or the error envelope if generation fails "
        "midway; after the last chunk, [DONE]",
        "anyOf": [
            {
                "type": "string",
                "contentMediaType": "application/json",
                "contentSchema": {
                    "anyOf": [
                        {"$ref": f"#/components/schemas/{chunk}"},
                        {"$ref": "#/components/schemas/ErrorResponse"},
                    ]
                },
            },
            {"const": "[DONE]"},
        ],
    }
    events = {"itemSchema": {"type": "object", "required": ["data"], "properties": {"data": data}}}
    return {
        200: {"content": {"text/event-stream": events}},
        **_ERROR_RESPONSES,
        **_error_responses(*extra_errors),
    }


@router.post(
    "/v1/generate", response_model=GenerateResponse, responses=_streaming_responses("StreamChunk")
)
async def generate(body: GenerateRequest, request: Request) -> Response | GenerateResponse:
    """Generate a continuation of `prompt`: one JSON body, or SSE events with `stream`."""
    serving = _serving(request)
    [stream] = _submit(serving, [serving.validator.validate(body)])
    if body.stream:
        events = _events(stream, serving.stream_interval)
        return EventSourceResponse(events, headers=_SSE_HEADERS)
    collected = await _collect([stream], request)
    if collected is None:
        return _client_gone(request)
    [whole] = collected
    response = GenerateResponse(
        id=whole.request_id,
        model=serving.model_name,
        text=whole.text,
        finish_reason=whole.finish_reason,
        stop_reason=whole.stop_string,
        usage=_usage(whole),
    )
    return Response(response.model_dump_json(), media_type=_JSON)


@router.post(
    "/v1/completions",
    response_model=Completion,
    responses=_streaming_responses("Completion", (404,)),
)
async def completions(body: CompletionRequest, request: Request) -> Response | Completion:
    """OpenAI's completions API: a choice per prompt, as one JSON body or, with `stream`,
    SSE chunks of the same shape, then [DONE]."""
    serving = _serving(request)
    _check_model(serving, body.model)
    _check_capacity(serving, len(body.prompts) * body.n, "completions (prompts x n)")
    streams = _submit(serving, _validated_prompts(serving.validator, body))
    header = _header("cmpl", "text_completion", serving)
    names = serving.token_names
    if body.stream:
        events = _choice_events(
            streams,
            serving.stream_interval,
            {**header, "choices": []},
            _include_usage(body),
            body.n,
            lambda index, output: _choice(index, output, names),
        )
        return EventSourceResponse(events, headers=_SSE_HEADERS)
    return await _whole_answer(
        streams, request, header, body.n, lambda index, whole: _choice(index, whole, names)
    )


@router.post(
    "/v1/chat/completions",
    response_model=ChatCompletion,
    responses=_streaming_responses("ChatCompletionChunk", (404,)),
)
async def chat_completions(
    body: ChatCompletionRequest, request: Request
) -> Response | ChatCompletion:
    """OpenAI's chat completions API: the messages through the checkpoint's chat template,
    then n choices of the assistant's answer, as one JSON body or, with `stream`, SSE
    chunks (a role chunk per choice, then their text), then [DONE]."""
    serving = _serving(request)
    _check_model(serving, body.model)
    _check_capacity(serving, body.n, "choices (n)")
    validator = serving.validator
    prompt_ids = _chat_prompt(serving, body.messages, body.add_generation_prompt, body.max_tokens)
    logprobs = body.reported_logprobs
    choices = body.choice_fields()
    streams = _submit(
        serving, [validator.validate_prompt(prompt_ids, f, logprobs) for f in choices]
    )
    header = _header("chatcmpl", "chat.completion", serving)
    tokens = _LogprobTokens(serving.token_names, serving.engine.token_table)
    if body.stream:
        chunk = {**header, "object": "chat.completion.chunk", "choices": []}
        roles = [_chat_role_chunk(index) for index in range(body.n)]
        events = _choice_events(
            streams,
            serving.stream_interval,
            chunk,
            _include_usage(body),
            body.n,
            lambda index, output: _chat_choice(index, output, tokens, streamed=True),
            roles,
        )
        return EventSourceResponse(events, headers=_SSE_HEADERS)
    return await _whole_answer(
        streams,
        request,
        header,
        body.n,
        lambda index, whole: _chat_choice(index, whole, tokens),
    )


async def _whole_answer(
    streams: list[RequestStream],
    request: Request,
    header: dict[str, object],
    n: int,
    choice: Callable[[int, RequestOutput], dict[str, object]],
) -> Response:
    """An OpenAI answer as one JSON body: `header`, `choice` of each stream's whole output
    (n of each prompt), their usage; 499 if the client left first."""
    collected = await _collect(streams, request)
    if collected is None:
        return _client_gone(request)
    choices = [choice(index, whole) for index, whole in enumerate(collected)]
    usage = _usage(*collected, n=n).model_dump()
    return Response(to_json({**header, "choices": choices, "usage": usage}), media_type=_JSON)


def _chat_prompt(
    serving: Serving,
    messages: list[ChatMessage],
    add_generation_prompt: bool,
    max_tokens: int | None,
) -> list[int]:
    """The prompt's token ids the checkpoint's chat template makes of `messages`; a 400 if
    it has none, if it refuses them, or for a chat too long by its bytes alone to leave room
    for `max_tokens`."""
    chat, validator = serving.chat, serving.validator
    if chat is None:
        message = (
            "the served checkpoint has no chat template (chat_template.jinja): send the text "
            "to /v1/completions or /v1/generate instead"
        )
        raise ApiError(400, "no_chat_template", message)
    try:
        rendered = chat.render([m.for_template() for m in messages], add_generation_prompt)
        validator.check_bytes(chat.ordinary_text(rendered), max_tokens)
        return chat.encode(rendered) or [validator.bos_id]
    except ChatError as e:
        raise ApiError(400, "invalid_messages", str(e)) from None


def _check_capacity(serving: Serving, asked: int, what: str) -> None:
    """The 400 for a request of more choices than the server holds at once."""
    capacity = serving.engine.scheduler.capacity
    if asked > capacity:
        message = (
            f"{asked} {what}: the server holds at most {capacity} requests at once "
            "(--max-batch + --max-queue)"
        )
        raise ApiError(400, "too_many_completions", message)


def _header(prefix: str, kind: str, serving: Serving) -> dict[str, object]:
    """What every body and chunk of an OpenAI answer begins with."""
    return {
        "id": f"{prefix}-{uuid.uuid4().hex}",
        "object": kind,
        "created": int(time.time()),
        "model": serving.model_name,
    }


def _include_usage(body: CompletionRequest | ChatCompletionRequest) -> bool:
    return body.stream_options is not None and body.stream_options.include_usage


def _validated_prompts(validator: Validator, body: CompletionRequest) -> list[GenerationRequest]:
    """Each choice's request, validated (a text prompt tokenized once for its n choices);
    a refusal names the prompt of a list."""
    prompts = len(body.prompts)
    validated = []
    for number, (prompt, choices) in enumerate(body.choices(), start=1):
        try:
            ids = (
                prompt if isinstance(prompt, list) else validator.tokenize(prompt, body.max_tokens)
            )
            requests = [validator.validate_prompt(ids, fields, body.logprobs) for fields in choices]
            validated += validator.echoing(requests, prompt) if body.echo else requests
        except ApiError as e:
            # One that names the prompt ("prompt (40 tokens) + ...") names which one; another
            # (a logit_bias's unknown id) is the body's, whichever prompt met it first.
            if prompts == 1 or not e.message.startswith(("prompt (", "prompt: ")):
                raise
            message = f"prompt {number} of {prompts}" + e.message.removeprefix("prompt")
            raise ApiError(e.status_code, e.type, message, e.headers) from None
    return validated


def _submit(serving: Serving, generations: list[GenerationRequest]) -> list[RequestStream]:
    try:
        return serving.engine.submit_all(generations)
    except QueueFull:
        raise ApiError(
            429,
            "queue_full",
            "too many requests are waiting; retry later",
            {"Retry-After": RETRY_AFTER_SECONDS},
        ) from None
    except EngineUnavailable as e:
        raise ApiError(503, "unavailable", str(e)) from None


def _usage(*outputs: RequestOutput, n: int = 1) -> Usage:
    """The tokens of the requests whose last outputs these are, together: `outputs` in
    choice order, n choices of each prompt, whose prompt counts once (as OpenAI's and
    vLLM's usage count it; its choices share its prefill, too)."""
    prompt_tokens = sum(output.prompt_tokens for output in outputs[::n])
    completion_tokens = sum(output.completion_tokens for output in outputs)
    return Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
    )


def _engine_error(output: RequestOutput) -> ApiError:
    if isinstance(output.error, EngineUnavailable):
        return ApiError(503, "unavailable", str(output.error))
    # The exception's text stays in the server log (engine.py logs the step's failure).
    return ApiError(500, "internal_error", "generation failed: see the server log")


async def _gathered(stream: RequestStream, interval: int) -> AsyncIterator[RequestOutput]:
    """The stream's outputs joined per `interval` new tokens (1: one per engine step); the
    last, and an error after the text gathered before it, as they come.

    Closed (a client that disconnects cancels the generator that reads this one), it
    closes the stream, which cancels the request.
    """
    gathered: RequestOutput | None = None
    try:
        async for output in stream:
            if output.error is not None:
                if gathered is not None:  # the text before the error still arrives
                    yield gathered
                yield output
                return
            gathered = output if gathered is None else gathered.followed_by(output)
            if len(gathered.token_ids) >= interval or gathered.finished:
                yield gathered
                gathered = None
    finally:
        stream.close()


async def _events(stream: RequestStream, interval: int) -> AsyncIterator[bytes]:
    """An SSE event per `interval` new tokens, the last one with usage, then [DONE]."""
    async with aclosing(_gathered(stream, interval)) as outputs:
        async for output in outputs:
            if output.error is not None:
                yield _error_event(output)
                return
            yield _chunk_event(output)
    yield _DONE_EVENT


def _error_event(output: RequestOutput) -> bytes:
    return _data_event(_engine_error(output).body().model_dump_json().encode())


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


async def _choice_events(
    streams: list[RequestStream],
    interval: int,
    header: dict[str, object],
    include_usage: bool,
    n: int,
    choice: Callable[[int, RequestOutput], dict[str, object]],
    opening: Sequence[dict[str, object]] = (),
) -> AsyncIterator[bytes]:
    """An OpenAI stream: a chunk per choice of `opening` first, then one per `interval` new
    tokens of a choice (`choice` of its index and output; the choices interleaved as their
    tokens come, `n` of each prompt), optionally a usage chunk, then [DONE]. A chunk is
    `header` with its one choice (and, with `include_usage`, `usage: null`)."""
    if include_usage:
        header = {**header, "usage": None}
    finished: dict[int, RequestOutput] = {}  # by choice index
    outputs = _merged([_gathered(stream, interval) for stream in streams])
    try:
        for first in opening:
            yield _data_event(to_json({**header, "choices": [first]}))
        async for index, output in outputs:
            if output.error is not None:
                yield _error_event(output)
                return
            yield _data_event(to_json({**header, "choices": [choice(index, output)]}))
            if output.finished:
                finished[index] = output
        if include_usage:
            usage = _usage(*(finished[i] for i in sorted(finished)), n=n).model_dump()
            yield _data_event(to_json({**header, "choices": [], "usage": usage}))
        yield _DONE_EVENT
    finally:
        await outputs.aclose()
        for stream in streams:  # also those whose reader never started
            stream.close()


async def _merged(iterators: list[AsyncIterator[_T]]) -> AsyncIterator[tuple[int, _T]]:
    """The items of every iterator as they come, each with its iterator's index."""
    if len(iterators) == 1:  # the usual case: no task, no queue
        async for item in iterators[0]:
            yield 0, item
        return
    arrived: asyncio.Queue[tuple[int, _T] | asyncio.Task[None]] = asyncio.Queue()

    async def read(index: int, iterator: AsyncIterator[_T]) -> None:
        async for item in iterator:
            arrived.put_nowait((index, item))

    readers = [asyncio.ensure_future(read(i, iterator)) for i, iterator in enumerate(iterators)]
    for reader in readers:
        reader.add_done_callback(arrived.put_nowait)  # the reader itself: it is done
    try:
        for _ in readers:
            while not isinstance(item := await arrived.get(), asyncio.Task):
                yield item
            if not item.cancelled() and (error := item.exception()) is not None:
                raise error
    finally:
        for reader in readers:
            reader.cancel()


def _choice(index: int, output: RequestOutput, names: list[str]) -> dict[str, object]:
    """One CompletionChoice of `output`, as a dict (built per event, as _chunk_event's)."""
    return {
        "index": index,
        "text": output.text,
        "logprobs": _logprobs(output.logprobs, names) if output.logprobs else None,
        "finish_reason": output.finish_reason,
        "stop_reason": output.stop_string,
    }


def _chat_choice(
    index: int, output: RequestOutput, tokens: _LogprobTokens, *, streamed: bool = False
) -> dict[str, object]:
    """One ChatChoice of a whole `output`, or (`streamed`) a ChatChunkChoice of its text
    since the last, as a dict."""
    text = {"content": output.text}
    return {
        "index": index,
        **({"delta": text} if streamed else {"message": {"role": "assistant", **text}}),
        "logprobs": _chat_logprobs(output.logprobs, tokens) if output.logprobs else None,
        "finish_reason": output.finish_reason,
        "stop_reason": output.stop_string,
    }


def _chat_role_chunk(index: int) -> dict[str, object]:
    """The ChatChunkChoice that opens choice `index` of a stream: its role, as OpenAI's."""
    delta = {"role": "assistant", "content": ""}
    return {"index": index, "delta": delta, "logprobs": None, "finish_reason": None}


@dataclass(frozen=True)
class _LogprobTokens:
    """What chat logprobs say of a token id: its name, and its bytes (none for a special
    token, which adds no text)."""

    names: list[str]
    table: list[bytes]

    def entry(self, token_id: int, logprob: float | None) -> dict[str, object]:
        return {
            "token": self.names[token_id],
            "logprob": logprob,
            "bytes": list(self.table[token_id]),
        }


def _chat_logprobs(
    logprobs: tuple[TokenLogprob, ...], tokens: _LogprobTokens
) -> dict[str, list[dict[str, object]]]:
    """ChatLogprobs of these tokens, in OpenAI's form."""
    return {
        "content": [
            {
                **tokens.entry(t.token_id, t.logprob),
                "top_logprobs": [tokens.entry(i, value) for i, value in t.top or ()],
            }
            for t in logprobs
        ]
    }


def _logprobs(logprobs: tuple[TokenLogprob, ...], names: list[str]) -> dict[str, list]:
    """CompletionLogprobs of these tokens, in OpenAI's form."""
    return {
        "tokens": [names[t.token_id] for t in logprobs],
        "token_logprobs": [t.logprob for t in logprobs],
        "top_logprobs": [None if t.top is None else _top(t, names) for t in logprobs],
        "text_offset": [t.text_offset for t in logprobs],
    }


def _top(logprob: TokenLogprob, names: list[str]) -> dict[str, float]:
    """The likeliest tokens' log-probabilities and, as OpenAI's and vLLM's, the drawn
    token's among them (so up to logprobs + 1)."""
    top = dict(logprob.top)
    top.setdefault(logprob.token_id, logprob.logprob)
    return {names[i]: value for i, value in top.items()}


async def _collect(streams: list[RequestStream], request: Request) -> list[RequestOutput] | None:
    """Each stream's outputs as one (_whole); None if the client disconnected first (the
    requests are cancelled then). Raises the first stream's error, if any."""
    collecting = asyncio.gather(*(_whole(stream) for stream in streams))
    disconnect = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait((collecting, disconnect), return_when=asyncio.FIRST_COMPLETED)
    finally:
        disconnect.cancel()
        if collecting.cancel():
            # Cancelled while its streams still ran, the gather ends in an exception (a
            # CancelledError) that nobody reads: asyncio would log it as an error.
            collecting.add_done_callback(_read_outcome)
        for stream in streams:
            stream.close()
    if not collecting.done() or collecting.cancelled():
        return None
    collected: list[RequestOutput] = collecting.result()
    for whole in collected:
        if whole.error is not None:
            raise _engine_error(whole)
    return collected


def _read_outcome(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()


def _client_gone(request: Request) -> Response:
    log_unsent_answer(request.scope, CLIENT_CLOSED_REQUEST)
    return Response(status_code=CLIENT_CLOSED_REQUEST)


async def _whole(stream: RequestStream) -> RequestOutput:
    """The stream's outputs joined into one (each list joined once, not per output); its
    error output, if it ends in one."""
    texts: list[str] = []
    token_ids: list[int] = []
    logprobs: list[TokenLogprob] = []
    async for output in stream:
        if output.error is not None:
            return output
        texts.append(output.text)
        token_ids += output.token_ids
        logprobs += output.logprobs
        last = output
    return replace(last, text="".join(texts), token_ids=token_ids, logprobs=tuple(logprobs))


async def _wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


# As vLLM serves them (at the root, not under /v1): a client counts a prompt's tokens
# before sending it, or reads the token ids of a stream or of logprobs as text.
@router.post(
    "/tokenize", response_model=TokenizeResponse, responses=_error_responses(*_TOKEN_ERRORS)
)
async def tokenize(body: TokenizeRequest, request: Request) -> TokenizeResponse:
    """The prompt's token ids, as /v1/generate and /v1/completions read it; or the chat's,
    as /v1/chat/completions does."""
    serving = _serving(request)
    _check_model(serving, body.model)
    validator = serving.validator
    if body.messages is not None:
        ids = _chat_prompt(serving, body.messages, body.add_generation_prompt, None)
    else:
        assert body.prompt is not None  # one of the two: TokenizeRequest says so
        ids = validator.tokenize(body.prompt, None)
    token_strs = None
    if body.return_token_strs:
        token_strs = [validator.tokenizer.id_to_token(token_id) for token_id in ids]
    return TokenizeResponse(
        count=len(ids), max_model_len=serving.max_context, tokens=ids, token_strs=token_strs
    )


@router.post(
    "/detokenize", response_model=DetokenizeResponse, responses=_error_responses(*_TOKEN_ERRORS)
)
async def detokenize(body: DetokenizeRequest, request: Request) -> DetokenizeResponse:
    """The text of token ids."""
    serving = _serving(request)
    _check_model(serving, body.model)
    return DetokenizeResponse(prompt=serving.validator.detokenize(body.tokens))


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
    return ModelList(data=[_model_card(_serving(request))])


# `path`: a model id may hold slashes (`org/name`), as OpenAI's API and the SDKs allow.
@router.get(
    "/v1/models/{model_id:path}",
    response_model=ModelCard,
    responses=_error_responses(401, 404, 408, 431, 503),
)
@router.head("/v1/models/{model_id:path}", response_model=ModelCard, include_in_schema=False)
async def model(model_id: str, request: Request) -> ModelCard:
    """The served model, as OpenAI's API retrieves one by id; any other id is a 404."""
    serving = _serving(request)
    _check_model(serving, model_id)
    return _model_card(serving)


def _model_card(serving: Serving) -> ModelCard:
    return ModelCard(
        id=serving.model_name,
        created=serving.loaded_at,
        max_context=serving.max_context,
        checkpoint=serving.checkpoint.resolve().name,
    )


def _check_model(serving: Serving, model_id: str | None) -> None:
    """A 404 for a model id other than the served one (not repeated: it may be long);
    None (a request that names no model) is the served one."""
    if model_id is not None and model_id != serving.model_name:
        message = f"model: this server serves {serving.model_name!r} only (GET /v1/models)"
        raise ApiError(404, "model_not_found", message)


@router.get("/metrics", include_in_schema=False)
@router.head("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    app_metrics = request.app.state.metrics
    app_metrics.server_state.state(_server_state(request))
    return Response(app_metrics.render(), media_type=CONTENT_TYPE_LATEST)


def _server_state(request: Request) -> str:
    """One of metrics.SERVER_STATES, read when scraped: what /health would say."""
    serving: Serving | None = request.app.state.serving
    status: str = request.app.state.status  # loading, ready, draining, failed to load: ...
    if status.startswith("failed") or (serving is not None and serving.engine.failed):
        return "failed"
    return status
