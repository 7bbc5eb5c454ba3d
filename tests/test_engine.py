"""The SSE event stream of one request, over a real engine (no HTTP): with
`--stream-interval`, text gathered for the next event is never lost to an error; and an
engine stopped with requests unfinished leaves no gauge counting them; a waiting request
cancelled frees its place in the queue at once; a prompt scored in the same prefill as
another leaves the other's output as it was alone; a step or a row that raises fails
only the requests it holds; rows of one batch each get their own log-probabilities and
penalties; a prompt is shared only past MIN_SHARED_PREFIX tokens, and never by a request
scoring it."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from server_harness import english_tokenizer, random_checkpoint

from server.engine import MIN_SHARED_PREFIX, Engine, RequestOutput, RequestStream
from server.loading import load_serving
from server.metrics import Metrics
from server.protocol import GenerateRequest
from server.routes import Serving, _events
from server.settings import Settings
from server.validation import GenerationRequest, Validator


def random_serving(
    tmp_path: Path, padded_rows: int = 0, **settings: int
) -> tuple[Engine, Validator]:
    """An engine (not started) and its validator for a random tiny model: its outputs
    depend strongly on the context, so a K/V cache mixed up shows. `padded_rows`:
    embedding rows past the tokenizer's ids (random_checkpoint's)."""
    checkpoint = random_checkpoint(tmp_path, english_tokenizer(), padded_rows=padded_rows)
    serving = load_serving(
        Settings(checkpoint=str(checkpoint), device="cpu", **settings), Metrics()
    )
    return serving.engine, serving.validator


async def drawn(stream: RequestStream) -> list[int]:
    """Every token id the stream's request draws."""
    return [token_id async for output in stream for token_id in output.token_ids]


async def whole(stream: RequestStream) -> RequestOutput:
    """The stream's outputs as one, or its error output if it ends in one."""
    joined = await stream.__anext__()
    async for output in stream:
        joined = output if output.error is not None else joined.followed_by(output)
    return joined


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


def test_the_threads_setting_is_what_torch_runs_the_model_on(tiny_checkpoint: Path) -> None:
    # --threads 1 is the advice on a shared machine: set before the model loads, for the
    # engine thread and the rest of the process.
    before = torch.get_num_threads()
    wanted = 1 if before != 1 else 2
    settings = Settings(checkpoint=str(tiny_checkpoint), device="cpu", max_batch=1, threads=wanted)
    try:
        load_serving(settings, Metrics()).engine.stop()
        assert torch.get_num_threads() == wanted
    finally:
        torch.set_num_threads(before)


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
        return [await whole(stream) for stream in engine.submit_all(submitted)]

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


def test_a_penalised_request_moved_to_another_slot_samples_as_alone_in_an_unchanged_batch(
    tmp_path: Path,
) -> None:
    # Compaction moves the penalised request down a slot while it stays the only decoding
    # row: the batch's requests are the same, its slots not, and the penalties must read
    # the token history at the new slot.
    engine, validator = random_serving(tmp_path, max_batch=3, prefill_chunk=8)
    text = validator.tokenize(
        "the quick brown fox jumps over the lazy dog and runs away " * 3, None
    )
    other = validator.tokenize(
        "a dog ran far away from home and never came back to the sea " * 3, None
    )
    assert len(text) >= 20 and len(other) >= 30
    penalties = {"repetition_penalty": 1.5, "frequency_penalty": 1.0}

    def request(ids: list[int], max_tokens: int, **sampling: float) -> GenerationRequest:
        fields = GenerateRequest(
            prompt="", max_tokens=max_tokens, temperature=0, ignore_eos=True, **sampling
        )
        return validator.validate_prompt(ids, fields)

    def requests() -> list[GenerationRequest]:
        # In slots 0-2: A and the penalised B, short; C, prefilling in slot 2, moves below
        # B when A finishes and ends at its first token; then B moves down, its decode
        # rows unchanged, and D prefills in B's old slot.
        return [
            request(text[:2], 2),
            request(other[:2], 30, **penalties),
            request(text[:20], 1),
            request(other[:30], 3),
        ]

    async def scenario() -> tuple[list[int], list[int]]:
        engine.start(asyncio.get_running_loop())
        alone = await drawn(engine.submit(requests()[1]))
        return alone, [await drawn(stream) for stream in engine.submit_all(requests())][1]

    try:
        alone, together = asyncio.run(asyncio.wait_for(scenario(), timeout=120))
    finally:
        engine.stop()
    assert together == alone


def finished_counts(engine: Engine) -> dict[str, float | None]:
    """pocketgpt_request_finished_total by reason."""
    registry = engine.metrics.registry
    return {
        reason: registry.get_sample_value("pocketgpt_request_finished_total", {"reason": reason})
        for reason in ("stop", "length", "cancelled", "error")
    }


def test_a_step_that_raises_fails_every_request_in_it_and_the_engine_serves_on(
    tmp_path: Path,
) -> None:
    # One prefill step holds a prompt whose forward raises and the first chunk of a long
    # prompt: both end in an error (the long one's cache was never written), and the
    # engine serves the next request.
    engine, validator = random_serving(tmp_path, max_batch=2, prefill_chunk=8)
    fields = GenerateRequest(prompt="", max_tokens=3, temperature=0, ignore_eos=True)
    vocab = engine.runner.model.config.vocab_size
    # An id past the embedding table: the validator refuses it, replace() gets it through.
    raising = dataclasses.replace(
        validator.validate_prompt("the dog", fields), prompt_ids=[5, vocab + 7]
    )
    long = validator.validate_prompt("the quick brown fox jumps over the lazy dog", fields)
    assert len(long.prompt_ids) > 8 - 2  # still prefilling after the step

    async def scenario() -> tuple[list[RequestOutput], RequestOutput]:
        engine.start(asyncio.get_running_loop())
        failed = [await whole(stream) for stream in engine.submit_all([raising, long])]
        return failed, await whole(engine.submit(validator.validate_prompt("the cat", fields)))

    try:
        failed, after = asyncio.run(asyncio.wait_for(scenario(), timeout=120))
        assert not engine.failed
    finally:
        engine.stop()
    assert [type(output.error) for output in failed] == [IndexError, IndexError]
    assert [output.token_ids for output in failed] == [[], []]
    assert after.error is None and after.finish_reason == "length" and len(after.token_ids) == 3
    assert finished_counts(engine) == {"stop": 0, "length": 1, "cancelled": 0, "error": 2}


def test_a_row_that_raises_fails_its_request_only_and_its_neighbour_completes(
    tmp_path: Path,
) -> None:
    # A token whose text cannot be read (None in the table) is forced into one row by its
    # logit bias: that request ends in an error, the other row of the batch as alone.
    engine, validator = random_serving(tmp_path, max_batch=2)
    fields = GenerateRequest(prompt="", max_tokens=4, temperature=0, ignore_eos=True)

    def plain() -> GenerationRequest:
        return validator.validate_prompt("the cat", fields)

    async def scenario() -> tuple[list[int], list[RequestOutput]]:
        engine.start(asyncio.get_running_loop())
        alone = await drawn(engine.submit(plain()))
        broken = next(t for t in range(100, 200) if t not in alone)
        engine.token_table[broken] = None
        biased = GenerateRequest(
            prompt="", max_tokens=4, temperature=0, ignore_eos=True, logit_bias={str(broken): 100}
        )
        forced = validator.validate_prompt("the dog", biased)
        return alone, [await whole(stream) for stream in engine.submit_all([forced, plain()])]

    try:
        alone, (forced, beside) = asyncio.run(asyncio.wait_for(scenario(), timeout=120))
        assert not engine.failed
    finally:
        engine.stop()
    assert isinstance(forced.error, TypeError) and forced.token_ids == []
    assert beside.error is None and beside.finish_reason == "length"
    assert beside.token_ids == alone
    assert finished_counts(engine) == {"stop": 0, "length": 2, "cancelled": 0, "error": 1}


def test_rows_of_one_batch_each_get_as_many_top_logprobs_as_they_ask(tmp_path: Path) -> None:
    engine, validator = random_serving(tmp_path, max_batch=2)
    fields = GenerateRequest(prompt="", max_tokens=4, temperature=0, ignore_eos=True)

    def requests() -> list[GenerationRequest]:
        return [validator.validate_prompt("the cat sat", fields, k) for k in (1, 4)]

    async def scenario() -> tuple[list[RequestOutput], list[RequestOutput]]:
        engine.start(asyncio.get_running_loop())
        alone = [await whole(engine.submit(request)) for request in requests()]
        return alone, [await whole(stream) for stream in engine.submit_all(requests())]

    try:
        alone, together = asyncio.run(asyncio.wait_for(scenario(), timeout=120))
    finally:
        engine.stop()
    for k, output, own in zip((1, 4), together, alone, strict=True):
        assert [len(t.top) for t in output.logprobs] == [k] * 4
        assert [t.token_id for t in output.logprobs] == own.token_ids == output.token_ids
        for got, expected in zip(output.logprobs, own.logprobs, strict=True):
            assert [i for i, _ in got.top] == [i for i, _ in expected.top]
            assert [v for _, v in got.top] == pytest.approx([v for _, v in expected.top], abs=1e-5)


def test_choices_scoring_one_long_prompt_each_compute_it_and_score_it_alike(
    tmp_path: Path,
) -> None:
    # Scoring a prompt takes the logits at each of its positions: a choice copying the
    # other's prefill would have none for the copied part.
    engine, validator = random_serving(tmp_path, max_batch=2)
    prompt = "the quick brown fox jumps over the lazy dog and runs away into the woods"
    fields = GenerateRequest(prompt="", max_tokens=2, temperature=0, ignore_eos=True)
    scoring = [validator.validate_prompt(prompt, fields, 1) for _ in range(2)]
    choices = validator.echoing(scoring, prompt)
    prompt_tokens = len(choices[0].prompt_ids)
    assert prompt_tokens > MIN_SHARED_PREFIX

    async def scenario() -> list[RequestOutput]:
        engine.start(asyncio.get_running_loop())
        return [await whole(stream) for stream in engine.submit_all(choices)]

    try:
        first, second = asyncio.run(asyncio.wait_for(scenario(), timeout=120))
    finally:
        engine.stop()
    for output in (first, second):
        assert output.error is None and output.text.startswith(prompt)
        assert len(output.logprobs) == prompt_tokens + 2
    scored = [[t.logprob for t in o.logprobs[1:prompt_tokens]] for o in (first, second)]
    assert scored[1] == pytest.approx(scored[0], abs=1e-5)
    assert [t.token_id for t in second.logprobs] == [t.token_id for t in first.logprobs]
    shared = engine.metrics.registry.get_sample_value("pocketgpt_prompt_tokens_shared_total")
    assert shared == 0


def test_logprobs_of_a_checkpoint_padded_past_its_tokenizer_are_over_its_tokens_only(
    tmp_path: Path,
) -> None:
    # The padding rows have logits but no tokens: the log-probabilities are the softmax
    # over the tokenizer's ids, and no top alternative is a padding row.
    engine, validator = random_serving(tmp_path, padded_rows=256, max_batch=1)
    vocab = len(engine.token_table)
    assert engine.runner.model.config.vocab_size == vocab + 256
    fields = GenerateRequest(prompt="", max_tokens=4, temperature=0, ignore_eos=True)
    request = validator.validate_prompt("the cat sat", fields, 5)

    async def scenario() -> RequestOutput:
        engine.start(asyncio.get_running_loop())
        return await whole(engine.submit(request))

    try:
        output = asyncio.run(asyncio.wait_for(scenario(), timeout=120))
    finally:
        engine.stop()
    every = request.prompt_ids + output.token_ids
    with torch.inference_mode():
        logits = engine.runner.model(torch.tensor([every]), torch.arange(len(every))[None])
    expected = torch.log_softmax(logits[0, len(request.prompt_ids) - 1 : -1, :vocab], dim=-1)
    top = expected.topk(5, dim=-1)
    assert len(output.logprobs) == 4
    rows = zip(output.logprobs, expected, top.indices, top.values, strict=True)
    for token, scores, ids, values in rows:
        assert max(i for i, _ in token.top) < vocab
        assert [i for i, _ in token.top] == ids.tolist()
        assert [v for _, v in token.top] == pytest.approx(values.tolist(), abs=1e-4)
        assert token.logprob == pytest.approx(scores[token.token_id].item(), abs=1e-4)


def test_choices_of_a_prompt_share_its_prefill_only_when_longer_than_the_minimum(
    tmp_path: Path,
) -> None:
    # Two choices of a prompt MIN_SHARED_PREFIX tokens long compute it each; one token
    # longer, the second copies all but its last token.
    engine, validator = random_serving(tmp_path, max_batch=2)
    ids = validator.tokenize("the quick brown fox jumps over the lazy dog and runs away", None)
    fields = GenerateRequest(prompt="", max_tokens=2, temperature=0, ignore_eos=True)
    registry = engine.metrics.registry

    async def scenario() -> dict[int, float | None]:
        engine.start(asyncio.get_running_loop())
        shared = {}
        for n in (MIN_SHARED_PREFIX, MIN_SHARED_PREFIX + 1):
            choices = [validator.validate_prompt(ids[:n], fields) for _ in range(2)]
            for stream in engine.submit_all(choices):
                await drawn(stream)
            shared[n] = registry.get_sample_value("pocketgpt_prompt_tokens_shared_total")
        return shared

    try:
        shared = asyncio.run(asyncio.wait_for(scenario(), timeout=120))
    finally:
        engine.stop()
    assert shared == {MIN_SHARED_PREFIX: 0, MIN_SHARED_PREFIX + 1: MIN_SHARED_PREFIX}


def test_a_prefill_of_chunks_of_unequal_lengths_computes_at_most_twice_their_tokens(
    tmp_path: Path,
) -> None:
    # A long prompt's last chunk and a few one-token prompts admitted beside it in one step:
    # padded to one width, the step computed 5 x 12 positions for 16 prompt tokens, a step
    # costing the running streams several chunk budgets. Each request still gets its own
    # logits (greedy: what it draws alone).
    engine, validator = random_serving(tmp_path, max_batch=5, prefill_chunk=16)
    text = "the quick brown fox jumps over the lazy dog and runs away from the big cat"
    ids = validator.tokenize(text * 2, None)[:28]
    assert len(ids) == 28  # a chunk of 16, then one of 12 beside the short prompts
    prompts = [ids] + [[token] for token in ids[1:5]]
    fields = GenerateRequest(prompt="", max_tokens=3, temperature=0, ignore_eos=True)
    computed: list[int] = []  # positions each prefill forward computes, padding included

    def count(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        if kwargs.get("logits_at") is not None:
            computed.append(args[0].numel())

    async def scenario() -> tuple[list[list[int]], list[list[int]]]:
        alone = []
        engine.start(asyncio.get_running_loop())
        for prompt in prompts:
            alone.append(await drawn(engine.submit(validator.validate_prompt(prompt, fields))))
        computed.clear()
        streams = engine.submit_all([validator.validate_prompt(p, fields) for p in prompts])
        return alone, [await drawn(stream) for stream in streams]

    engine.runner.model.register_forward_pre_hook(count, with_kwargs=True)
    try:
        alone, together = asyncio.run(asyncio.wait_for(scenario(), timeout=120))
    finally:
        engine.stop()
    assert together == alone
    assert sum(computed) <= 2 * sum(len(p) for p in prompts), computed


def test_choices_generating_one_token_each_prefill_in_one_step_not_in_turn(
    tmp_path: Path,
) -> None:
    # With max_tokens 1 each choice ends at its prompt's end, so nothing can be copied from
    # it: the next choice, waiting in its slot for that prompt, then prefilled it alone a
    # step later, and the one after it waited for that: n choices took n steps, one prompt
    # each, where the budget holds them all in one.
    engine, validator = random_serving(tmp_path, max_batch=4)
    ids = validator.tokenize("the quick brown fox jumps over the lazy dog and runs away", None)
    assert len(ids) > MIN_SHARED_PREFIX and 4 * len(ids) <= 256  # one step's budget
    fields = GenerateRequest(prompt="", max_tokens=1, temperature=0, ignore_eos=True)
    forwards: list[int] = []  # the rows of each prefill forward

    def count(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        if kwargs.get("logits_at") is not None:
            forwards.append(args[0].shape[0])

    async def scenario() -> list[list[int]]:
        engine.start(asyncio.get_running_loop())
        streams = engine.submit_all([validator.validate_prompt(ids, fields) for _ in range(4)])
        return [await drawn(stream) for stream in streams]

    engine.runner.model.register_forward_pre_hook(count, with_kwargs=True)
    try:
        drawn_tokens = asyncio.run(asyncio.wait_for(scenario(), timeout=120))
    finally:
        engine.stop()
    assert len({tuple(tokens) for tokens in drawn_tokens}) == 1  # greedy: each alike
    assert forwards == [4]


def test_the_last_prompt_token_is_penalised_as_the_prompts_own(tmp_path: Path) -> None:
    # The repetition penalty covers the whole prompt, its last token (the one the first
    # draw follows) too. A prompt ending in the token the model then draws greedily shows
    # it: penalised, that token is drawn no more.
    engine, validator = random_serving(tmp_path, max_batch=1)
    base = validator.tokenize("the cat and", None)
    vocab = len(engine.token_table)
    model = engine.runner.model
    with torch.no_grad():
        prompts = torch.tensor([[*base, t] for t in range(vocab)])
        positions = torch.arange(prompts.shape[1]).expand_as(prompts)
        greedy = model(prompts, positions)[:, -1, :vocab].argmax(-1).tolist()
    last = next(t for t in range(vocab) if greedy[t] == t and t not in base)

    def first_draw(**sampling: float) -> GenerationRequest:
        fields = GenerateRequest(prompt="", max_tokens=1, temperature=0, **sampling)
        return validator.validate_prompt([*base, last], fields)

    async def scenario() -> list[list[int]]:
        engine.start(asyncio.get_running_loop())
        requests = [first_draw(), first_draw(repetition_penalty=10.0)]
        return [await drawn(engine.submit(request)) for request in requests]

    try:
        plain, penalised = asyncio.run(asyncio.wait_for(scenario(), timeout=120))
    finally:
        engine.stop()
    assert plain == [last]
    assert penalised != [last]
