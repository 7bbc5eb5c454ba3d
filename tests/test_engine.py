"""The SSE event stream of one request, over a real engine (no HTTP): with
`--stream-interval`, text gathered for the next event is never lost to an error; and an
engine stopped with requests unfinished leaves no gauge counting them; a waiting request
cancelled frees its place in the queue at once; a prompt scored in the same prefill as
another leaves the other's output as it was alone."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from server_harness import english_tokenizer, random_checkpoint

from server.engine import MIN_SHARED_PREFIX, Engine, RequestOutput, RequestStream
from server.loading import load_serving
from server.metrics import Metrics
from server.protocol import GenerateRequest
from server.routes import Serving, _events
from server.settings import Settings
from server.validation import GenerationRequest, Validator


def random_serving(tmp_path: Path, **settings: int) -> tuple[Engine, Validator]:
    """An engine (not started) and its validator for a random tiny model: its outputs
    depend strongly on the context, so a K/V cache mixed up shows."""
    checkpoint = random_checkpoint(tmp_path, english_tokenizer())
    serving = load_serving(
        Settings(checkpoint=str(checkpoint), device="cpu", **settings), Metrics()
    )
    return serving.engine, serving.validator


async def drawn(stream: RequestStream) -> list[int]:
    """Every token id the stream's request draws."""
    return [token_id async for output in stream for token_id in output.token_ids]


@pytest.fixture
def serving(tiny_checkpoint: Path) -> Iterator[Serving]:
    settings = Settings(checkpoint=str(tiny_checkpoint), device="cpu", max_batch=2)
    serving = load_serving(settings, Metrics())
    yield serving
    serving.engine.stop()  # its thread, had the test failed before stopping it


def test_tokens_gathered_for_an_event_are_sent_before_an_engine_error(
    serving: Serving,
) -> None:
    async def scenario() -> list[str]:
        serving.engine.start(asyncio.get_running_loop())
        body = GenerateRequest(prompt="the cat", max_tokens=200, seed=7, ignore_eos=True)
        stream = serving.engine.submit(serving.validator.validate(body))
        deadline = time.monotonic() + 60
        while stream.queue.qsize() < 3 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)  # poll: a few steps delivered, none read
        serving.engine.stop()  # fails the unfinished request, its thread joined
        await asyncio.sleep(0)  # run the deliveries it scheduled: all are queued now
        # An interval the stream never reaches: everything is still gathered at the error.
        events = [e.decode() async for e in _events(stream, interval=256)]
        return [e.removeprefix("data: ").strip() for e in events]

    text, error = asyncio.run(asyncio.wait_for(scenario(), timeout=120))
    chunk = json.loads(text)
    assert len(chunk["token_ids"]) >= 3 and chunk["text"] and chunk["finish_reason"] is None
    assert json.loads(error)["error"]["type"] == "unavailable"


def test_an_engine_that_stopped_with_requests_unfinished_shows_none_running(
    serving: Serving,
) -> None:
    # The path an engine failure takes too (a lost CUDA device): every unfinished request
    # gets an error, and no step runs again to bring the gauges back.
    metrics = serving.engine.metrics

    async def scenario() -> None:
        serving.engine.start(asyncio.get_running_loop())
        body = GenerateRequest(prompt="the cat", max_tokens=200, ignore_eos=True)
        streams = [serving.engine.submit(serving.validator.validate(body)) for _ in range(3)]
        deadline = time.monotonic() + 60
        while not all(s.queue.qsize() for s in streams[:2]) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)  # two running in the two slots, one waiting
        assert metrics.registry.get_sample_value("pocketgpt_requests_running") == 2
        assert metrics.registry.get_sample_value("pocketgpt_requests_waiting") == 1
        # Every slot's cache is in use: a ratio, not a count of slots.
        assert metrics.registry.get_sample_value("pocketgpt_kv_cache_usage_ratio") == 1.0
        serving.engine.stop()

    asyncio.run(asyncio.wait_for(scenario(), timeout=120))
    registry = metrics.registry
    assert registry.get_sample_value("pocketgpt_request_finished_total", {"reason": "error"}) == 3
    for gauge in ("requests_running", "requests_waiting", "kv_cache_usage_ratio"):
        assert registry.get_sample_value(f"pocketgpt_{gauge}") == 0, gauge


def test_a_waiting_request_cancelled_frees_its_queue_place_at_once(tiny_checkpoint: Path) -> None:
    # One slot, one queue place: with the place's client gone, the next client is admitted,
    # not refused (429) until the model thread's next step applied the cancellation.
    settings = Settings(checkpoint=str(tiny_checkpoint), device="cpu", max_batch=1, max_queue=1)
    serving = load_serving(settings, Metrics())
    engine = serving.engine
    body = GenerateRequest(prompt="the cat", max_tokens=200, ignore_eos=True)

    async def scenario() -> None:
        engine.start(asyncio.get_running_loop())
        running = engine.submit(serving.validator.validate(body))
        await running.__anext__()  # it holds the slot
        waiting = engine.submit(serving.validator.validate(body))
        waiting.close()
        engine.submit(serving.validator.validate(body)).close()  # QueueFull before the fix

    try:
        asyncio.run(asyncio.wait_for(scenario(), timeout=120))
    finally:
        engine.stop()
    registry = engine.metrics.registry
    assert (
        registry.get_sample_value("pocketgpt_request_finished_total", {"reason": "cancelled"}) == 2
    )


def test_a_prompt_scored_in_one_prefill_with_another_leaves_each_its_own_output(
    tmp_path: Path,
) -> None:
    # Scoring a prompt (echo with logprobs) takes the prefill's logits at every position:
    # the unscored prompt beside it, shorter and so padded, still samples from its own end.
    engine, validator = random_serving(tmp_path, max_batch=2)
    fields = GenerateRequest(prompt="", max_tokens=6, temperature=0, ignore_eos=True)
    unscored = "the cat"
    scored = "a dog ran far away from home"

    def requests() -> list[GenerationRequest]:
        [echoing] = validator.echoing([validator.validate_prompt(scored, fields, 1)], scored)
        return [validator.validate_prompt(unscored, fields), echoing]

    async def outputs(submitted: list[GenerationRequest]) -> list[RequestOutput]:
        wholes = []
        for stream in engine.submit_all(submitted):
            whole = await stream.__anext__()
            async for output in stream:
                whole = whole.followed_by(output)
            wholes.append(whole)
        return wholes

    async def scenario() -> tuple[list[RequestOutput], list[RequestOutput]]:
        engine.start(asyncio.get_running_loop())
        alone = [(await outputs([request]))[0] for request in requests()]
        return alone, await outputs(requests())  # admitted and prefilled in one step

    try:
        alone, together = asyncio.run(asyncio.wait_for(scenario(), timeout=120))
    finally:
        engine.stop()
    assert [o.token_ids for o in together] == [o.token_ids for o in alone]
    assert [o.text for o in together] == [o.text for o in alone]
    assert together[1].text.startswith(scored) and not together[0].logprobs
    prompt_tokens = len(validator.tokenize(scored, None))
    scores = [t.logprob for t in together[1].logprobs]
    assert len(scores) == prompt_tokens + 6 and scores[0] is None
    assert scores[1:] == pytest.approx([t.logprob for t in alone[1].logprobs][1:], abs=1e-5)


def test_choices_of_one_prompt_share_its_prefill_and_each_samples_as_alone(
    tmp_path: Path,
) -> None:
    # Three choices of one prompt (n = 3): the first prefills it over several chunks, the
    # others copy its K/V and compute only the last token. Each draws what it draws alone,
    # the prompt penalised as its own (the sampler's state is the prompt's whole).
    engine, validator = random_serving(tmp_path, max_batch=4, prefill_chunk=8)
    ids = validator.tokenize("the quick brown fox jumps over the lazy dog and runs away", None)
    assert len(ids) > 2 * 8  # three chunks

    def choices() -> list[GenerationRequest]:
        sampling = {"temperature": 0.9, "repetition_penalty": 1.5, "ignore_eos": True}
        fields = [GenerateRequest(prompt="", max_tokens=12, seed=s, **sampling) for s in (5, 6, 7)]
        return [validator.validate_prompt(ids, f) for f in fields]

    async def tokens(submitted: list[GenerationRequest]) -> list[list[int]]:
        return [await drawn(stream) for stream in engine.submit_all(submitted)]

    async def scenario() -> tuple[list[list[int]], list[list[int]]]:
        engine.start(asyncio.get_running_loop())
        alone = [(await tokens([request]))[0] for request in choices()]
        return alone, await tokens(choices())

    try:
        alone, together = asyncio.run(asyncio.wait_for(scenario(), timeout=120))
    finally:
        engine.stop()
    assert together == alone
    assert len({tuple(drawn) for drawn in together}) == 3  # each choice its own draw
    shared = engine.metrics.registry.get_sample_value("pocketgpt_prompt_tokens_shared_total")
    assert shared == 2 * (len(ids) - 1)  # nothing shared alone; each other choice's prompt


def test_a_request_whose_prompt_begins_as_a_running_ones_copies_that_prefix(
    tmp_path: Path,
) -> None:
    # A system prompt many requests begin with: a request arriving while another with the
    # same start decodes copies the common prefix's K/V and prefills only the rest of its
    # prompt, and draws what it draws alone.
    engine, validator = random_serving(tmp_path, max_batch=2)
    system = "the quick brown fox jumps over the lazy dog"
    first, second = (validator.tokenize(system + tail, None) for tail in (" and runs", " or naps"))
    common = next(i for i, (a, b) in enumerate(zip(first, second, strict=False)) if a != b)
    assert common >= MIN_SHARED_PREFIX

    def request(ids: list[int], max_tokens: int) -> GenerationRequest:
        fields = GenerateRequest(
            prompt="", max_tokens=max_tokens, seed=3, repetition_penalty=1.5, ignore_eos=True
        )
        return validator.validate_prompt(ids, fields)

    async def scenario() -> tuple[list[int], list[int]]:
        engine.start(asyncio.get_running_loop())
        alone = await drawn(engine.submit(request(second, 10)))
        running = engine.submit(request(first, 40))
        await running.__anext__()  # its prompt is in: it decodes
        beside = await drawn(engine.submit(request(second, 10)))
        running.close()
        return alone, beside

    try:
        alone, beside = asyncio.run(asyncio.wait_for(scenario(), timeout=120))
    finally:
        engine.stop()
    assert beside == alone
    shared = engine.metrics.registry.get_sample_value("pocketgpt_prompt_tokens_shared_total")
    assert shared == common
