"""create_app(settings): the FastAPI app, its error envelope and its lifespan.

The lifespan starts loading the model in a worker thread and returns at once, so
the server answers (GET /health: 503 "loading") while the weights load and warm
up; once ready the engine starts and /health turns 200. On shutdown it stops
admitting (503), lets unfinished requests run up to `drain_timeout`, then stops
the engine.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.routing import Match, Route

from model.checkpoint import CheckpointError
from model.cpu import run_in_own_thread
from server.loading import load_serving
from server.metrics import Metrics
from server.middleware import (
    AllowedHostsMiddleware,
    ApiKeyMiddleware,
    BodyLimitMiddleware,
    CorsMiddleware,
    HeaderLimitMiddleware,
    RequestCounter,
    error_response,
)
from server.protocol import (
    ApiError,
    ChatCompletionChunk,
    ChatCompletionRequest,
    CompletionRequest,
    GenerateRequest,
    StreamChunk,
)
from server.routes import Serving, router
from server.settings import Settings
from server.validation import invalid_request, not_json

log = logging.getLogger(__name__)

_HTTP_ERROR_TYPES = {404: "not_found", 405: "method_not_allowed"}


async def _load(app: FastAPI) -> None:
    started = time.perf_counter()
    try:
        # Loaded on a thread that ends, with its OpenMP team, leaving the engine thread
        # the only one running torch (two teams on few cores tripled the decode step;
        # model/cpu.py); a daemon, so that a signal during loading ends the process.
        serving = await run_in_own_thread(load_serving, app.state.settings, app.state.metrics)
    except Exception as e:
        # A checkpoint found unusable (weights a diverged run left NaN) is said in the one
        # error line the process exits with; anything else is a bug: its traceback too.
        if not isinstance(e, CheckpointError):
            log.exception("loading the model failed")
        app.state.status = f"failed to load: {e}"
        return
    # Everything alive now (torch, the model, FastAPI: ~400k objects) lives as long as
    # the server: out of the collector's sight, a full collection no longer walks it
    # (~140 ms with the event loop and the engine stopped, several times a minute at
    # 128 streams on 2 cores). vLLM does the same after start-up.
    gc.collect()
    gc.freeze()
    serving.engine.start(asyncio.get_running_loop())
    app.state.metrics.model_load.set(time.perf_counter() - started)
    # Status first: a SIGTERM handled between the two (a signal handler runs between any
    # two lines) drains once `serving` is set, and its "draining" must not be overwritten.
    app.state.status = "ready"
    app.state.serving = serving
    runner = serving.engine.runner
    defaults = ", ".join(f"{k} {v}" for k, v in serving.validator.defaults.items()) or "none"
    log.info(
        "serving %s as %r: %.1fM parameters, %s, %s, max-batch %d, sampling defaults from "
        "generation_config.json: %s; ready in %.1f s",
        serving.checkpoint,
        serving.model_name,
        runner.model.config.num_parameters() / 1e6,
        runner.device,
        str(runner.dtype).removeprefix("torch."),
        runner.cache.n_slots,
        defaults,
        time.perf_counter() - started,
    )
    if len(end_ids := serving.engine.end_ids) > 1:
        log.info("texts end at token ids %s (the checkpoint's eos_token_id)", sorted(end_ids))
    if serving.chat is not None:
        log.info("/v1/chat/completions: the chat template of %s", serving.chat.source)


def begin_drain(app: FastAPI, serving: Serving) -> None:
    """New requests and /health get 503 from now on; the running ones go on."""
    app.state.status = "draining"
    serving.engine.begin_drain()


async def _drain(app: FastAPI) -> None:
    serving: Serving | None = app.state.serving
    if serving is None:
        return
    begin_drain(app, serving)
    if not await serving.engine.wait_idle(app.state.settings.drain_timeout):
        log.warning("drain timeout: %d requests cut off", serving.engine.num_unfinished)
    serving.engine.stop()


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    loading = asyncio.create_task(_load(app))
    try:
        yield
    finally:
        if not loading.done():
            loading.cancel()  # the loading thread, a daemon, dies with the process
        await _drain(app)


async def _api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return error_response(exc)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return error_response(invalid_request(exc))


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 400:  # FastAPI's "error parsing the body": reading it failed
        return error_response(not_json("could not be read"))
    error_type = _HTTP_ERROR_TYPES.get(exc.status_code, "http_error")
    headers = exc.headers
    if exc.status_code == 405:
        headers = {**(headers or {}), "Allow": _allowed_methods(request)}
    return error_response(ApiError(exc.status_code, error_type, str(exc.detail), headers))


def _allowed_methods(request: Request) -> str:
    """The methods of every route at the request's path: the app's own (the docs) and
    the router's. Starlette's 405 names only the first route's: GET and HEAD are two
    routes here (routes.py says why)."""
    methods: set[str] = set()
    for route in [*request.app.router.routes, *router.routes]:
        if isinstance(route, Route) and route.matches(request.scope)[0] is not Match.NONE:
            methods |= route.methods or set()
    return ", ".join(sorted(methods))


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    # Not logged here: Starlette's ServerErrorMiddleware re-raises the exception once this
    # answer is sent, and uvicorn logs it with its traceback, after the access line that
    # names the request. Logged here too, each failure showed two tracebacks.
    return error_response(ApiError(500, "internal_error", "internal server error"))


_DOCS_PATHS = frozenset({"/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})
_BEARER = "bearerAuth"
_COMPONENT = "#/components/schemas/{model}"


def _complete_openapi(app: FastAPI, keyed_except: frozenset[str] | None) -> None:
    """Add to FastAPI's OpenAPI schema what it cannot say itself: exact integer bounds,
    the SSE events' model, and (`keyed_except`: the paths open without --api-key) which
    operations need the bearer key, so that /docs offers Authorize and generated clients
    send it (ApiKeyMiddleware checks it)."""
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = build()  # cached on the app; completed once
            components = schema["components"]["schemas"]
            # FastAPI's schema model types bounds as floats: seed's maximum 2**63 - 1
            # came out as 9.223372036854776e+18, which is 2**63. pydantic's are exact.
            for request_model in (GenerateRequest, CompletionRequest, ChatCompletionRequest):
                exact = request_model.model_json_schema(ref_template=_COMPONENT)
                components[request_model.__name__]["properties"] = exact["properties"]
            # Named by the streams' events (routes.py), though no JSON body uses them.
            for chunk in (StreamChunk, ChatCompletionChunk):
                events = chunk.model_json_schema(ref_template=_COMPONENT)
                for name, component in events.pop("$defs", {}).items():
                    components.setdefault(name, component)  # Usage, ChatLogprobs, ...
                components[chunk.__name__] = events
            if keyed_except is not None:
                schema["components"]["securitySchemes"] = {
                    _BEARER: {"type": "http", "scheme": "bearer"}
                }
                for path, operations in schema["paths"].items():
                    if path not in keyed_except:
                        for operation in operations.values():
                            operation["security"] = [{_BEARER: []}]
        return app.openapi_schema

    app.openapi = openapi


def create_app(settings: Settings) -> FastAPI:
    app = FastAPI(
        title="pocketgpt",
        summary="Text generation with continuous batching and SSE streaming",
        lifespan=lifespan,
        # /health/ is not /health: a 404, not a redirect (whose empty 307 no client
        # expects, and which under --api-key sat behind the key /health is open without).
        redirect_slashes=False,
    )
    app.state.settings = settings
    app.state.metrics = metrics = Metrics()
    app.state.serving = None
    app.state.status = "loading"
    app.include_router(router)
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _internal_error)
    # Added last = outermost: count every answer, bound the head, check the Host, answer
    # CORS preflights (which carry no key), authenticate, bound the body.
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    open_paths = None
    if settings.api_key is not None:
        # Health probes never carry a key; Prometheus may not either (--metrics-open); a
        # browser opening the docs cannot send one (the schema is no secret: the README
        # says as much).
        open_paths = _DOCS_PATHS | {"/health"} | ({"/metrics"} if settings.metrics_open else set())
        app.add_middleware(
            ApiKeyMiddleware, api_key=settings.api_key.get_secret_value(), open_paths=open_paths
        )
    if (origins := settings.cors_origin_list()) is not None:
        app.add_middleware(CorsMiddleware, origins=origins)
    if (allowed_hosts := settings.allowed_host_names()) is not None:
        app.add_middleware(AllowedHostsMiddleware, allowed=allowed_hosts)
    app.add_middleware(HeaderLimitMiddleware, max_bytes=settings.max_header_bytes)
    app.add_middleware(RequestCounter, counter=metrics.requests)
    _complete_openapi(app, open_paths)
    return app
