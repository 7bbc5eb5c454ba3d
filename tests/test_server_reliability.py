"""Reliability of the live server (issue 7, "Server"): disconnect storms, schema fuzzing
with schemathesis, and a bounded mixed-load round. Real uvicorn on loopback, real
checkpoints; each server is stopped by the fixture that started it."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
    unsupported_method,
)
from server_harness import (
    CHATML,
    cycle_checkpoint,
    english_tokenizer,
    metric_samples,
    random_checkpoint,
    running_server,
    sse_events,
    wait_until,
    with_template,
)

from server.settings import Settings

MAX_BATCH = 16
MAX_QUEUE = 64
STORM_CLIENTS = 50
LOAD_CLIENTS = 60
IDLE_WITHIN = 30.0  # seconds after the last client went away: a hang guard

RUNNING = ("pocketgpt_requests_running", ())
WAITING = ("pocketgpt_requests_waiting", ())


def finished_key(reason: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    return ("pocketgpt_request_finished_total", (("reason", reason),))


def status_key(status: int) -> tuple[str, tuple[tuple[str, str], ...]]:
    return ("pocketgpt_requests_total", (("status", str(status)),))


@pytest.fixture(scope="module")
def base_url(tmp_path_factory) -> Iterator[str]:
    """A random tiny model (1024-token context): generations long enough to cancel."""
    checkpoint = random_checkpoint(tmp_path_factory.mktemp("ckpt"), english_tokenizer())
    settings_ = Settings(checkpoint=checkpoint, max_batch=MAX_BATCH, max_queue=MAX_QUEUE)
    with running_server(settings_) as url:
        yield url


def idle(base_url: str) -> bool:
    samples = metric_samples(base_url)
    return samples[RUNNING] == 0 and samples[WAITING] == 0


def delta(before: dict, after: dict, key) -> float:
    return after.get(key, 0.0) - before.get(key, 0.0)


def run_concurrently(jobs: list[Callable[[], object]]) -> list[object]:
    """Run every job in its own thread, all released together; results in order."""
    start = threading.Barrier(len(jobs))

    def released(job: Callable[[], object]) -> object:
        start.wait(timeout=30)
        return job()

    with ThreadPoolExecutor(len(jobs)) as pool:
        return list(pool.map(released, jobs))


def assert_normal_request_completes(base_url: str) -> None:
    body = {"prompt": "still alive?", "max_tokens": 8, "ignore_eos": True}
    response = httpx.post(f"{base_url}/v1/generate", json=body, timeout=30)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 8


# --- disconnect storm ---------------------------------------------------------------


def test_disconnect_storm_cancels_every_request_and_frees_every_slot(base_url):
    before = metric_samples(base_url)

    def drop_after_first_event(i: int) -> Callable[[], object]:
        def job() -> object:
            body = {"prompt": f"storm {i}", "max_tokens": 900, "ignore_eos": True, "stream": True}
            with (
                httpx.Client(base_url=base_url, timeout=60) as client,
                client.stream("POST", "/v1/generate", json=body) as response,
            ):
                assert response.status_code == 200
                first = next(sse_events(response))
            return first

        return job

    firsts = run_concurrently([drop_after_first_event(i) for i in range(STORM_CLIENTS)])
    assert all(isinstance(f, dict) and f["finish_reason"] is None for f in firsts)

    wait_until(lambda: idle(base_url), IDLE_WITHIN, "running and waiting back to 0")
    after = metric_samples(base_url)
    assert delta(before, after, finished_key("cancelled")) == STORM_CLIENTS
    assert delta(before, after, status_key(200)) == STORM_CLIENTS
    assert_normal_request_completes(base_url)


# --- schema fuzzing -----------------------------------------------------------------


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory):
    """The live app's OpenAPI schema, served by a tiny cycle model (256-token context),
    so even the largest generation the fuzzer asks for ends in well under a second."""
    checkpoint = cycle_checkpoint(tmp_path_factory.mktemp("cycle"), english_tokenizer())
    # Chats go through a template, as a chat model's do: the fuzzer's messages reach it.
    with_template(checkpoint, CHATML)
    with running_server(Settings(checkpoint=checkpoint, max_batch=4, max_queue=8)) as url:
        yield schemathesis.openapi.from_url(f"{url}/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(  # the same cases every run, as the detokenizer fuzz
    max_examples=25,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
def test_every_route_answers_within_its_schema_and_never_5xx(case):
    case.call_and_validate(
        checks=[
            not_a_server_error,
            status_code_conformance,
            content_type_conformance,
            response_schema_conformance,
            response_headers_conformance,
            unsupported_method,
        ],
        timeout=30,
    )


def test_a_stream_and_a_json_answer_each_conform_to_the_schema(api_schema):
    # The fuzzer above reaches a whole stream only by chance: every event, [DONE] too.
    usage_chunk = {"stream_options": {"include_usage": True}}
    chat = {"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 1}
    for path, streamed, asked in (
        ("/v1/generate", {}, {"prompt": "x"}),
        ("/v1/completions", usage_chunk, {"prompt": "x"}),
        ("/v1/chat/completions", usage_chunk, chat),
    ):
        operation = api_schema[path]["POST"]
        for body in ({**asked, "stream": True, "max_tokens": 5, **streamed}, asked):
            operation.Case(body=body, media_type="application/json").call_and_validate(timeout=30)


# --- mixed load round ---------------------------------------------------------------

INVALID_REQUESTS: list[tuple[dict, int]] = [
    ({"json": {"prompt": "x", "max_tokens": 0}}, 422),
    ({"json": {"prompt": "x", "n": 2}}, 422),
    ({"json": {"max_tokens": 4}}, 422),
    ({"content": b"{not json", "headers": {"Content-Type": "application/json"}}, 400),
    ({"json": {"prompt": "x", "max_tokens": 5000}}, 400),
    ({"json": {"prompt": "too long " * 2000, "max_tokens": 4}}, 400),
]


def test_mixed_load_round_every_admitted_request_completes_or_is_cancelled(base_url):
    before = metric_samples(base_url)
    kinds = ("stream", "complete", "cancel", "invalid", "choices")
    plan = [kinds[i % len(kinds)] for i in range(LOAD_CLIENTS)]

    def job(i: int, kind: str) -> Callable[[], object]:
        def run() -> object:
            with httpx.Client(base_url=base_url, timeout=60) as client:
                if kind == "invalid":
                    request, expected = INVALID_REQUESTS[(i // 4) % len(INVALID_REQUESTS)]
                    response = client.post("/v1/generate", **request)
                    return ("invalid", response.status_code, expected)
                body = {"prompt": f"load {i} " * (1 + i % 5), "seed": i, "ignore_eos": True}
                if kind == "choices":  # two prompts, streamed as OpenAI's completions
                    prompts = [body["prompt"], "x"]
                    two = {**body, "prompt": prompts, "max_tokens": 12, "stream": True}
                    with client.stream("POST", "/v1/completions", json=two) as response:
                        if response.status_code != 200:
                            return (kind, response.status_code, None)
                        *chunks, done = sse_events(response)
                    choices = [chunk["choices"][0] for chunk in chunks]
                    finishes = [c["finish_reason"] for c in choices if c["finish_reason"]]
                    return ("choices", 200, (done, finishes))
                if kind == "complete":
                    response = client.post("/v1/generate", json={**body, "max_tokens": 12})
                    finish = response.json().get("finish_reason") if response.is_success else None
                    return ("complete", response.status_code, finish)
                max_tokens = 900 if kind == "cancel" else 12
                body = {**body, "max_tokens": max_tokens, "stream": True}
                with client.stream("POST", "/v1/generate", json=body) as response:
                    if response.status_code != 200:
                        return (kind, response.status_code, None)
                    events = sse_events(response)
                    if kind == "cancel":
                        next(events), next(events)
                        return ("cancel", 200, None)
                    seen = list(events)
                return ("stream", 200, (seen[-1], seen[-2].get("finish_reason")))

        return run

    results = run_concurrently([job(i, kind) for i, kind in enumerate(plan)])

    allow_429 = LOAD_CLIENTS > MAX_BATCH + MAX_QUEUE
    finish_reasons = ("stop", "length")

    def as_expected(kind: str, status: int, detail) -> bool:
        if status == 429:
            return allow_429
        if kind == "invalid":
            return status == detail
        if kind == "complete":
            return status == 200 and detail in finish_reasons
        if kind == "stream":
            return status == 200 and detail[0] == "[DONE]" and detail[1] in finish_reasons
        if kind == "choices":  # each of the two choices finished, once
            done, finishes = detail
            return (
                status == 200
                and done == "[DONE]"
                and len(finishes) == 2
                and (set(finishes) <= set(finish_reasons))
            )
        return status == 200

    unexpected = [result for result in results if not as_expected(*result)]
    assert unexpected == []

    wait_until(lambda: idle(base_url), IDLE_WITHIN, "running and waiting back to 0")
    after = metric_samples(base_url)
    admitted = Counter(kind for kind, status, _ in results if kind != "invalid" and status == 200)
    finished = delta(before, after, finished_key("stop")) + delta(
        before, after, finished_key("length")
    )
    assert finished == admitted["stream"] + admitted["complete"] + 2 * admitted["choices"]
    assert delta(before, after, finished_key("cancelled")) == admitted["cancel"]
    assert delta(before, after, finished_key("error")) == 0
    assert delta(before, after, status_key(200)) == sum(admitted.values())
    invalid = Counter(status for kind, status, _ in results if kind == "invalid")
    for status, count in invalid.items():
        assert delta(before, after, status_key(status)) == count
    assert_normal_request_completes(base_url)
