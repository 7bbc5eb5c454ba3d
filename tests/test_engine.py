"""The engine without HTTP: what a request's stream yields to a consumer that falls behind."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from server.app import load_serving
from server.engine import EngineUnavailable, RequestOutput, RequestStream
from server.metrics import Metrics
from server.protocol import GenerateRequest
from server.routes import Serving
from server.settings import Settings

MAX_TOKENS = 12


@pytest.fixture
def serving(tiny_checkpoint: Path) -> Serving:
    settings = Settings(checkpoint=str(tiny_checkpoint), device="cpu", max_batch=4)
    return load_serving(settings, Metrics())


def submit(serving: Serving, max_tokens: int = MAX_TOKENS) -> RequestStream:
    body = GenerateRequest(
        prompt="the cat", max_tokens=max_tokens, temperature=0.8, seed=7, ignore_eos=True
    )
    return serving.engine.submit(serving.validator.validate(body))


async def drain(stream: RequestStream) -> list[RequestOutput]:
    async def read_all() -> list[RequestOutput]:
        return [output async for output in stream]

    return await asyncio.wait_for(read_all(), timeout=60)  # a stream that never ends fails


def test_a_lagging_consumer_gets_the_steps_it_missed_as_one_output(serving: Serving) -> None:
    async def scenario() -> tuple[list[RequestOutput], list[RequestOutput]]:
        serving.engine.start(asyncio.get_running_loop())
        try:
            prompt = await drain(submit(serving))
            lagging = submit(serving)  # the same seed: the same tokens
            assert await serving.engine.wait_idle(timeout=60)
            return prompt, await drain(lagging)
        finally:
            serving.engine.stop()

    prompt, lagging = asyncio.run(scenario())
    # Read only once the engine had finished it: every step but (at most) the last had
    # been delivered, so the stream yields them as one output.
    assert len(lagging) <= 2 < MAX_TOKENS
    assert lagging[-1].finish_reason == "length"
    assert lagging[-1].completion_tokens == MAX_TOKENS
    assert [i for o in lagging for i in o.token_ids] == [i for o in prompt for i in o.token_ids]
    assert "".join(o.text for o in lagging) == "".join(o.text for o in prompt)
    assert len([i for o in prompt for i in o.token_ids]) == MAX_TOKENS


def test_an_error_is_never_merged_the_text_before_it_comes_first(serving: Serving) -> None:
    async def scenario() -> list[RequestOutput]:
        serving.engine.start(asyncio.get_running_loop())
        stream = submit(serving, max_tokens=200)
        deadline = time.monotonic() + 60
        while stream.queue.qsize() < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)  # poll: a few steps delivered, none read
        serving.engine.stop()  # fails the unfinished request, its thread joined
        await asyncio.sleep(0)  # run the deliveries it scheduled: all of them are queued now
        return await drain(stream)

    outputs = asyncio.run(scenario())
    text, error = outputs
    assert text.error is None and len(text.token_ids) >= 2 and text.text
    assert isinstance(error.error, EngineUnavailable) and error.token_ids == []
