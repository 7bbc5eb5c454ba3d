"""POST /v1/completions (OpenAI's completions API) against a real uvicorn, driven by the
official openai SDK where a client would use it, and by httpx for the wire format."""

from __future__ import annotations

import collections
import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import torch
from server_harness import (
    english_tokenizer,
    metric_samples,
    random_checkpoint,
    running_server,
    sse_events,
    wait_until,
)

from model.checkpoint import load_model
from model.token_bytes import token_bytes
from server.detokenizer import text_offsets
from server.engine import MIN_SHARED_PREFIX
from server.protocol import Completion
from server.settings import Settings

MAX_BATCH = 2
MAX_QUEUE = 2  # with MAX_BATCH: the server holds 4 requests at once
RUNNING = ("pocketgpt_requests_running", ())
WAITING = ("pocketgpt_requests_waiting", ())
CANCELLED = ("pocketgpt_request_finished_total", (("reason", "cancelled"),))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return random_checkpoint(tmp_path_factory.mktemp("ckpt"), english_tokenizer())


@pytest.fixture(scope="module")
def base_url(checkpoint: Path) -> Iterator[str]:
    settings = Settings(checkpoint=checkpoint, max_batch=MAX_BATCH, max_queue=MAX_QUEUE)
    with running_server(settings) as url:
        yield url


def assert_error(response: httpx.Response, status: int, error_type: str) -> str:
    assert response.status_code == status, response.text
    assert response.json()["error"]["type"] == error_type
    return response.json()["error"]["message"]


def test_the_sdk_retrieves_the_served_model_by_id_and_no_other(sdk, client, model_id):
    model = sdk.models.retrieve(model_id)
    assert (model.id, model.object) == (model_id, "model")
    assert model.max_context == 1024  # pocketgpt's extra field, as GET /v1/models has it
    with pytest.raises(openai.NotFoundError) as refused:
        sdk.models.retrieve("org/another-model")
    assert refused.value.body["type"] == "model_not_found"
    head = client.head(f"/v1/models/{model_id}")
    assert head.status_code == 200 and head.content == b""


def test_model_cards_have_every_field_openais_model_schema_requires(sdk, client, model_id):
    # OpenAI's Model requires `created`; the Python SDK reads a card without it as
    # created=None, and clients that check the schema (async-openai) refuse the list.
    cards = [*client.get("/v1/models").json()["data"], client.get(f"/v1/models/{model_id}").json()]
    for card in cards:
        openai.types.Model.model_validate(card)
    created = {card["created"] for card in cards} | {sdk.models.retrieve(model_id).created}
    assert len(created) == 1  # the same time on every answer: when the model was loaded
    assert 0 < created.pop() <= time.time()


def test_the_sdk_completes_as_v1_generate_does_for_the_same_seed(sdk, client, model_id):
    body = {"prompt": "Once upon a time", "max_tokens": 12, "seed": 7, "temperature": 0.8}
    completion = sdk.completions.create(model=model_id, **body, top_p=0.95)
    generated = client.post("/v1/generate", json={**body, "top_p": 0.95}).json()
    assert completion.object == "text_completion" and completion.model == model_id
    assert completion.id.startswith("cmpl-")
    [choice] = completion.choices
    assert (choice.index, choice.text, choice.finish_reason, choice.logprobs) == (
        0,
        generated["text"],
        generated["finish_reason"],
        None,
    )
    usage = completion.usage
    assert [usage.prompt_tokens, usage.completion_tokens, usage.total_tokens] == list(
        generated["usage"].values()
    )


def test_streamed_chunks_add_up_to_the_whole_completion_and_usage_comes_last(sdk, model_id):
    body = {"model": model_id, "prompt": "The engine", "max_tokens": 20, "seed": 3}
    whole = sdk.completions.create(**body)
    with_usage = list(
        sdk.completions.create(**body, stream=True, stream_options={"include_usage": True})
    )
    *chunks, usage_chunk = with_usage
    [choice] = whole.choices
    assert "".join(c.choices[0].text for c in chunks) == choice.text
    finish_reasons = [c.choices[0].finish_reason for c in chunks]
    assert finish_reasons == [None] * (len(chunks) - 1) + [choice.finish_reason]
    assert all(c.usage is None for c in chunks)  # as OpenAI: null until the usage chunk
    assert usage_chunk.choices == [] and usage_chunk.usage == whole.usage
    assert len({c.id for c in with_usage}) == 1 and with_usage[0].id != whole.id
    without_usage = list(sdk.completions.create(**body, stream=True))
    assert [c.choices[0].text for c in without_usage] == [c.choices[0].text for c in chunks]
    # A null include_usage reads as left out, as a null field does.
    null_usage = {"include_usage": None}
    left_out = list(sdk.completions.create(**body, stream=True, stream_options=null_usage))
    assert [c.choices for c in left_out] == [c.choices for c in without_usage]


def test_an_answer_and_each_of_its_chunks_are_created_when_it_is_asked(client):
    # OpenAI's `created`: the Unix time (seconds) the completion was made, the same on
    # every chunk of a stream.
    body = {"prompt": "The engine", "max_tokens": 3}
    asked = int(time.time())
    whole = client.post("/v1/completions", json=body).json()
    with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
        *chunks, done = sse_events(response)
    answered = time.time()
    assert done == "[DONE]" and len(chunks) == 3
    assert asked <= whole["created"] <= answered, whole
    assert len({chunk["created"] for chunk in chunks}) == 1
    assert asked <= chunks[0]["created"] <= answered, chunks[0]


def test_with_include_usage_every_chunk_has_a_null_usage_and_without_it_none_has_one(client):
    # As OpenAI's stream: `usage: null` on each chunk until the usage chunk, and no
    # `usage` at all unless asked for (the SDK reads a left-out usage as null too).
    body = {"prompt": "The engine", "max_tokens": 3, "stream": True}
    usage = {"stream_options": {"include_usage": True}}
    with client.stream("POST", "/v1/completions", json={**body, **usage}) as response:
        *chunks, usage_chunk, done = sse_events(response)
    assert done == "[DONE]" and len(chunks) == 3
    assert all("usage" in chunk and chunk["usage"] is None for chunk in chunks), chunks
    assert usage_chunk["usage"]["completion_tokens"] == 3
    with client.stream("POST", "/v1/completions", json=body) as response:
        *chunks, done = sse_events(response)
    assert done == "[DONE]" and len(chunks) == 3
    assert not any("usage" in chunk for chunk in chunks), chunks


def test_a_list_of_prompts_gives_a_choice_each_as_if_each_were_sent_alone(sdk, model_id):
    prompts = ["Once upon a time", "The scheduler admits", "A"]  # 2 run, 1 waits
    body = {"model": model_id, "max_tokens": 10, "seed": 11, "extra_body": {"top_k": 50}}
    alone = [sdk.completions.create(prompt=p, **body) for p in prompts]
    batched = sdk.completions.create(prompt=prompts, **body)
    assert [c.index for c in batched.choices] == [0, 1, 2]
    assert [c.text for c in batched.choices] == [a.choices[0].text for a in alone]
    assert batched.usage.completion_tokens == sum(a.usage.completion_tokens for a in alone)
    assert batched.usage.prompt_tokens == sum(a.usage.prompt_tokens for a in alone)
    texts: dict[int, str] = collections.defaultdict(str)
    finished = []
    for chunk in sdk.completions.create(prompt=prompts, stream=True, **body):
        [choice] = chunk.choices  # one choice per chunk
        texts[choice.index] += choice.text
        if choice.finish_reason is not None:
            finished.append(choice.index)
    assert [texts[i] for i in range(3)] == [c.text for c in batched.choices]
    assert sorted(finished) == [0, 1, 2]


def test_n_completions_of_each_prompt_sample_with_seeds_counting_up(sdk, base_url, model_id):
    prompts = ["Once upon a time there was a fox", "The"]
    body = {"model": model_id, "max_tokens": 10}
    alone_usage = {}
    alone = {}
    for i, prompt in enumerate(prompts):
        for j in range(2):
            completion = sdk.completions.create(prompt=prompt, seed=5 + j, **body)
            alone[i, j], alone_usage[i, j] = completion.choices[0].text, completion.usage
    assert alone[0, 0] != alone[0, 1]  # two draws, not one twice
    shared = ("pocketgpt_prompt_tokens_shared_total", ())
    before = metric_samples(base_url)[shared]
    many = sdk.completions.create(prompt=prompts, n=2, best_of=2, seed=5, **body)
    assert [c.index for c in many.choices] == [0, 1, 2, 3]  # prompt i's j-th: 2 i + j
    assert [c.text for c in many.choices] == [alone[i, j] for i in range(2) for j in range(2)]
    # The long prompt's second choice copied all but its last token from the first's
    # prefill; the short prompt's computed its own (not worth a wait for the first's).
    long, short = (
        len(english_tokenizer().encode(p, add_special_tokens=False).ids) for p in prompts
    )
    assert short <= MIN_SHARED_PREFIX < long
    assert metric_samples(base_url)[shared] - before == long - 1
    # Each prompt counts once, as OpenAI counts it; each choice's tokens count.
    assert many.usage.prompt_tokens == long + short
    assert alone_usage[0, 0].prompt_tokens + alone_usage[1, 0].prompt_tokens == long + short
    generated = sum(usage.completion_tokens for usage in alone_usage.values())
    assert many.usage.completion_tokens == generated
    assert many.usage.total_tokens == long + short + generated
    texts: dict[int, str] = collections.defaultdict(str)
    streamed = sdk.completions.create(
        prompt=prompts, n=2, seed=5, stream=True, stream_options={"include_usage": True}, **body
    )
    for chunk in streamed:
        if chunk.usage is not None:
            assert chunk.usage == many.usage
        else:
            [choice] = chunk.choices
            texts[choice.index] += choice.text
    assert [texts[i] for i in range(4)] == [c.text for c in many.choices]


def test_the_seeds_of_n_choices_count_up_past_the_largest_to_0(client, model_id):
    # The j-th choice samples with seed + j, which stays within the seed's bounds.
    body = {"model": model_id, "prompt": "The", "max_tokens": 8}
    many = client.post("/v1/completions", json={**body, "n": 2, "seed": 2**63 - 1})
    assert many.status_code == 200, many.text
    after = client.post("/v1/completions", json={**body, "seed": 0}).json()["choices"][0]
    assert many.json()["choices"][1]["text"] == after["text"]


def test_token_id_prompts_continue_as_their_text_does(sdk, client, model_id):
    texts = ["Once upon a time", "The scheduler"]
    ids = [english_tokenizer().encode(t, add_special_tokens=False).ids for t in texts]
    body = {"model": model_id, "max_tokens": 10, "seed": 2}
    by_text = sdk.completions.create(prompt=texts, **body)
    by_ids = sdk.completions.create(prompt=ids, **body)
    assert [c.text for c in by_ids.choices] == [c.text for c in by_text.choices]
    assert by_ids.usage == by_text.usage
    [one] = sdk.completions.create(prompt=ids[0], **body).choices
    assert one.text == by_text.choices[0].text
    vocab = english_tokenizer().get_vocab_size()
    unknown = {"prompt": [ids[0], [5, vocab]], "max_tokens": 2}
    message = assert_error(client.post("/v1/completions", json=unknown), 400, "invalid_token_id")
    assert message == f"prompt 2 of 2: token id {vocab} (at 1) is not one of the " + (
        f"tokenizer's {vocab}"
    )
    # The body's logit_bias is no prompt's: refused naming no prompt.
    biased = {"prompt": ids, "max_tokens": 2, "logit_bias": {str(vocab): 1}}
    message = assert_error(client.post("/v1/completions", json=biased), 400, "invalid_token_id")
    assert message.startswith(f"logit_bias: token id {vocab} is not one of the tokenizer's")
    too_long = {"prompt": [5] * 1024, "max_tokens": 1}
    assert_error(client.post("/v1/completions", json=too_long), 400, "context_length_exceeded")


def test_logprobs_are_the_models_own_for_each_token_generated(sdk, client, checkpoint, model_id):
    # Penalties and a temperature change what is drawn, not what is reported.
    sampling = {"seed": 4, "max_tokens": 12, "temperature": 1.3, "presence_penalty": 1.0}
    body = {"prompt": "Once upon a time", "ignore_eos": True, **sampling}
    stream = client.post("/v1/generate", json={**body, "stream": True})
    ids = [i for event in sse_events(stream) if isinstance(event, dict) for i in event["token_ids"]]
    extra = {"ignore_eos": True}
    completion = sdk.completions.create(
        model=model_id, prompt=body["prompt"], logprobs=3, extra_body=extra, **sampling
    )
    [choice] = completion.choices
    logprobs = choice.logprobs
    prompt_ids = english_tokenizer().encode(body["prompt"], add_special_tokens=False).ids
    every = prompt_ids + ids
    with torch.no_grad():
        logits = load_model(checkpoint)(torch.tensor([every]), torch.arange(len(every))[None])
    expected = torch.log_softmax(logits[0, len(prompt_ids) - 1 : -1], dim=-1)  # [12, V]
    drawn = expected.gather(1, torch.tensor(ids)[:, None])[:, 0]
    assert logprobs.token_logprobs == pytest.approx(drawn.tolist(), abs=1e-4)
    table = token_bytes(english_tokenizer())
    assert_top_logprobs(logprobs.top_logprobs, expected, ids, k=3)
    assert len(logprobs.tokens) == len(logprobs.text_offset) == len(ids) == 12
    assert [spelled_bytes(token) for token in logprobs.tokens] == [table[i] for i in ids]
    assert logprobs.text_offset == offsets_in_text([table[i] for i in ids])
    # Streamed, each chunk's logprobs are its tokens': together, the same lists.
    chunks = sdk.completions.create(
        model=model_id, prompt=body["prompt"], logprobs=3, stream=True, extra_body=extra, **sampling
    )
    streamed = [c.choices[0].logprobs for c in chunks]
    assert [v for lp in streamed for v in lp.token_logprobs] == logprobs.token_logprobs
    assert [o for lp in streamed for o in lp.text_offset] == logprobs.text_offset
    # Without logprobs, none are reported.
    plain = sdk.completions.create(model=model_id, prompt=body["prompt"], **sampling)
    assert plain.choices[0].logprobs is None and plain.choices[0].text == choice.text


def test_logprobs_in_a_busy_batch_are_each_requests_own(sdk, client, model_id):
    # A stream without logprobs decodes while a request with them is prefilled, then both
    # decode: each row reports its own, or none.
    body = {"model": model_id, "max_tokens": 8, "seed": 9, "logprobs": 2}
    alone = sdk.completions.create(prompt="The scheduler", **body).choices[0].logprobs
    long = {"prompt": "a", "max_tokens": 300, "ignore_eos": True, "stream": True}
    with client.stream("POST", "/v1/completions", json=long) as plain:
        events = sse_events(plain)
        assert next(events)["choices"][0]["logprobs"] is None
        busy = sdk.completions.create(prompt="The scheduler", **body).choices[0].logprobs
        assert all(e["choices"][0]["logprobs"] is None for e in events if isinstance(e, dict))
    assert busy.tokens == alone.tokens
    assert busy.token_logprobs == pytest.approx(alone.token_logprobs, abs=1e-4)


def assert_top_logprobs(
    reported: list[dict[str, float]], expected: torch.Tensor, ids: list[int], k: int
) -> None:
    """Each token's top_logprobs are the k likeliest of `expected` [len(ids), V] and, as
    OpenAI's, the token's own (k + 1 where it is not one of them)."""
    table = token_bytes(english_tokenizer())
    likeliest = expected.topk(k, dim=-1).indices.tolist()
    for top, token_id, scores, shown in zip(likeliest, ids, expected, reported, strict=True):
        wanted = {table[i]: scores[i].item() for i in {*top, token_id}}
        spelled = {spelled_bytes(text): value for text, value in shown.items()}
        assert spelled == pytest.approx(wanted, abs=1e-4)


def spelled_bytes(token: str) -> bytes:
    """A token as logprobs name it (its text, or `bytes:` and its bytes escaped) as bytes;
    none for the special token, named by its content."""
    if token == "<|endoftext|>":
        return b""
    escaped = token.removeprefix("bytes:")
    return bytes.fromhex(escaped.replace("\\x", "")) if escaped != token else token.encode()


def offsets_in_text(tokens: list[bytes]) -> list[int]:
    """Where each token's text begins in the text of `tokens`, as text_offsets says of
    a prompt (test_detokenizer.py pins its cases): the engine's, token by token, agree."""
    return text_offsets(tokens, range(len(tokens)))


def test_text_offsets_are_where_tokens_begin_with_a_stop_string_never_met(client):
    # The stop string begins with a token of the text: that token's text is held back (it
    # might begin the stop string) until the next; where each token begins is unchanged.
    body = {"prompt": "a", "max_tokens": 10, "temperature": 0, "logprobs": 0, "ignore_eos": True}
    plain = client.post("/v1/completions", json=body).json()["choices"][0]
    tokens = plain["logprobs"]["tokens"]
    held = next(token for token in tokens[2:-1] if token.strip().isalpha())
    stopped = client.post("/v1/completions", json={**body, "stop": held + "\u0001"})
    choice = stopped.json()["choices"][0]
    assert (choice["text"], choice["finish_reason"]) == (plain["text"], "length")
    logprobs = choice["logprobs"]
    assert logprobs["text_offset"] == offsets_in_text([spelled_bytes(t) for t in tokens])
    assert logprobs == plain["logprobs"]
    # logprobs 0: the drawn token's own log-probability is its top_logprobs, as OpenAI's.
    assert logprobs["top_logprobs"] == [
        {token: value} for token, value in zip(tokens, logprobs["token_logprobs"], strict=True)
    ]


def log_probs_under(checkpoint: Path, ids: list[int]) -> torch.Tensor:
    """The model's log-probabilities [len(ids) - 1, V] of each next token after ids[: i + 1],
    from one full forward."""
    with torch.no_grad():
        logits = load_model(checkpoint)(torch.tensor([ids]), torch.arange(len(ids))[None])
    return torch.log_softmax(logits[0, :-1], dim=-1)


def test_echo_begins_each_choice_with_its_prompt_scored_by_the_model(sdk, checkpoint, model_id):
    prompt = "Once upon a time, in a far land"
    body = {"model": model_id, "prompt": prompt, "max_tokens": 6, "seed": 3, "logprobs": 2}
    extra = {"ignore_eos": True}
    [plain] = sdk.completions.create(**body, extra_body=extra).choices
    [echoed] = sdk.completions.create(**body, echo=True, extra_body=extra).choices
    assert echoed.text == prompt + plain.text
    prompt_ids = english_tokenizer().encode(prompt, add_special_tokens=False).ids
    n, logprobs = len(prompt_ids), echoed.logprobs
    table = token_bytes(english_tokenizer())
    assert logprobs.tokens[:n] == [table[t].decode() for t in prompt_ids]
    # Nothing comes before the first prompt token: OpenAI's nulls.
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    expected = log_probs_under(checkpoint, prompt_ids)  # [n - 1, V]
    scored = expected.gather(1, torch.tensor(prompt_ids[1:])[:, None])[:, 0]
    assert logprobs.token_logprobs[1:n] == pytest.approx(scored.tolist(), abs=1e-4)
    assert_top_logprobs(logprobs.top_logprobs[1:n], expected, prompt_ids[1:], k=2)
    # Each prompt token's offset is where its text begins in the echoed prompt.
    spelled = [len(table[t]) for t in prompt_ids]  # ASCII: a byte a character
    assert logprobs.text_offset[:n] == [sum(spelled[:i]) for i in range(n)]
    # Then the generated tokens, as without echo, their offsets after the prompt.
    assert logprobs.tokens[n:] == plain.logprobs.tokens
    assert logprobs.token_logprobs[n:] == pytest.approx(plain.logprobs.token_logprobs, abs=1e-5)
    assert logprobs.text_offset[n:] == [len(prompt) + o for o in plain.logprobs.text_offset]
    # Streamed, the first chunk begins with the prompt: the chunks add up to the same.
    chunks = list(sdk.completions.create(**body, echo=True, stream=True, extra_body=extra))
    assert chunks[0].choices[0].text.startswith(prompt)
    assert "".join(c.choices[0].text for c in chunks) == echoed.text
    assert [v for c in chunks for v in c.choices[0].logprobs.token_logprobs] == pytest.approx(
        logprobs.token_logprobs
    )


def test_max_tokens_0_with_echo_scores_long_prompts_without_generating(client, checkpoint):
    # lm-eval's loglikelihood requests: token-id prompts, echo, logprobs, greedy. The
    # longer prompt is prefilled in four chunks of --prefill-chunk (256) tokens: each
    # chunk's first token is scored by the chunk before it.
    vocab = english_tokenizer().get_vocab_size()
    generator = torch.Generator().manual_seed(5)
    long = torch.randint(0, vocab, (1023,), generator=generator).tolist()  # the most that fits
    short = long[:7]
    body = {"prompt": [long, short], "max_tokens": 0, "echo": True, "logprobs": 1}
    answer = client.post("/v1/completions", json={**body, "temperature": 0})
    assert answer.status_code == 200, answer.text
    completion = Completion.model_validate(answer.json())
    usage = completion.usage
    assert (usage.prompt_tokens, usage.completion_tokens) == (1023 + 7, 0)
    table = token_bytes(english_tokenizer())
    for choice, ids in zip(completion.choices, (long, short), strict=True):
        assert choice.finish_reason == "length"
        assert choice.text == b"".join(table[t] for t in ids).decode("utf-8", errors="replace")
        expected = log_probs_under(checkpoint, ids)
        scored = expected.gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
        assert len(choice.logprobs.token_logprobs) == len(ids)
        assert choice.logprobs.token_logprobs[1:] == pytest.approx(scored.tolist(), abs=1e-4)
        # One likeliest each: the greedy token's log-probability.
        best = [max(top.values()) for top in choice.logprobs.top_logprobs[1:]]
        assert best == pytest.approx(expected.max(dim=-1).values.tolist(), abs=1e-4)
    # A prompt filling the whole context does not fit: one position stays free.
    whole = {**body, "prompt": long + short[:1]}
    message = assert_error(
        client.post("/v1/completions", json=whole), 400, "context_length_exceeded"
    )
    assert (
        message
        == "prompt (1024 tokens) must leave a position free in the model's context of 1024 tokens"
    )
    # Streamed: one chunk, the whole echo.
    with client.stream(
        "POST", "/v1/completions", json={**body, "prompt": short, "stream": True}
    ) as events:
        *chunks, done = list(sse_events(events))
    assert done == "[DONE]" and len(chunks) == 1
    assert chunks[0]["choices"][0]["text"] == completion.choices[1].text


def test_a_token_after_a_byte_that_makes_no_character_begins_after_its_replacement(client):
    # A lone lead byte's U+FFFD comes out with the next token's text, but is its own: "a"
    # begins after it, in the echoed prompt and in what is generated after it.
    table = token_bytes(english_tokenizer())
    lone, a = table.index(b"\xdd"), table.index(b"a")
    body = {"prompt": [lone, a, lone, a], "echo": True, "logprobs": 0, "temperature": 0}
    scored = client.post("/v1/completions", json={**body, "max_tokens": 0}).json()
    [choice] = scored["choices"]
    assert choice["text"] == "\ufffda\ufffda"
    assert choice["logprobs"]["text_offset"] == [0, 1, 2, 3]
    # Generated, token by token: the byte drawn four times (each the next one shows to be
    # no character's start; the last, the text's end cuts).
    bias = {"logit_bias": {str(lone): 100}, "ignore_eos": True}
    body = {**body, "prompt": "x", "echo": False, "max_tokens": 4, **bias}
    [choice] = client.post("/v1/completions", json=body).json()["choices"]
    assert choice["logprobs"]["tokens"] == ["bytes:\\xdd"] * 4
    assert choice["text"] == "\ufffd" * 3
    assert choice["logprobs"]["text_offset"] == [0, 1, 2, 3]


def test_logit_bias_steers_the_draw_and_leaves_the_reported_logprobs_the_models(
    sdk, client, checkpoint, model_id
):
    body = {"prompt": "Once upon a time", "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    plain = client.post("/v1/generate", json=body).json()
    favoured = english_tokenizer().token_to_id("e")
    forced = client.post("/v1/generate", json={**body, "logit_bias": {str(favoured): 100}})
    assert forced.json()["text"] == "e" * 6
    # Banning the first token plain greedy decoding drew: another first token.
    first = english_tokenizer().encode(plain["text"], add_special_tokens=False).ids[0]
    banned = client.post("/v1/generate", json={**body, "logit_bias": {str(first): -100}})
    assert banned.status_code == 200 and not banned.json()["text"].startswith(plain["text"][:1])
    # Through the SDK, as OpenAI's field; the logprobs are the model's, not the biased ones.
    [choice] = sdk.completions.create(
        model=model_id,
        prompt=body["prompt"],
        max_tokens=6,
        temperature=0,
        logit_bias={str(favoured): 100},
        logprobs=1,
        extra_body={"ignore_eos": True},
    ).choices
    assert choice.text == "e" * 6
    prompt_ids = english_tokenizer().encode(body["prompt"], add_special_tokens=False).ids
    expected = log_probs_under(checkpoint, prompt_ids + [favoured] * 6)[len(prompt_ids) - 1 :]
    assert choice.logprobs.token_logprobs == pytest.approx(expected[:, favoured].tolist(), abs=1e-4)
    vocab = english_tokenizer().get_vocab_size()
    unknown = client.post("/v1/completions", json={"prompt": "x", "logit_bias": {str(vocab): 1}})
    message = assert_error(unknown, 400, "invalid_token_id")
    assert message == f"logit_bias: token id {vocab} is not one of the tokenizer's {vocab}"


def test_left_out_or_null_fields_take_openai_defaults(client, model_id):
    nulls = {"max_tokens": None, "temperature": None, "seed": None, "stop": None, "n": None}
    body = {"prompt": "x", "ignore_eos": True, **nulls, "logprobs": None, "suffix": None}
    sent = {**body, "model": model_id, "n": 1, "best_of": 1, "echo": False, "logit_bias": {}}
    for request in (body, {**sent, "user": "client-7"}):
        response = client.post("/v1/completions", json=request)
        assert response.status_code == 200, response.text
        completion = Completion.model_validate(response.json())
        assert completion.usage.completion_tokens == 16  # OpenAI's documented default
        assert completion.choices[0].finish_reason == "length"


def test_up_to_16_stop_strings_end_a_completion_as_lm_evals_tasks_send_them(sdk, model_id):
    # OpenAI's limit is 4 (/v1/generate's too): lm-eval adds the end-of-text to a task's
    # own stop strings, so a task of 4 was refused.
    body = {"model": model_id, "prompt": "Once upon a time", "max_tokens": 40, "temperature": 0}
    text = sdk.completions.create(**body).choices[0].text
    assert len(text) > 12, text
    never = [f"<never {number}>" for number in range(15)]
    assert not any(string in text for string in never)
    stop = text[10:12]
    [choice] = sdk.completions.create(**body, stop=[*never, stop]).choices
    assert (choice.text, choice.finish_reason) == (text[: text.index(stop)], "stop")
    assert choice.model_extra["stop_reason"] == stop


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("n", 129, "n: Input should be less than or equal to 128"),
        ("best_of", 3, "best_of: only n (1) or null: completions are not ranked"),
        ("logprobs", 6, "logprobs: Input should be less than or equal to 5"),
        ("suffix", "end", "suffix: only null"),
        ("logit_bias", {"01": 1}, "logit_bias: keys are token ids, written in digits ('42')"),
        ("logit_bias", {"-1": 1}, "logit_bias: keys are token ids, written in digits ('42')"),
        ("logit_bias", {"1": 100.5}, "logit_bias.1: Input should be less than or equal to 100"),
        (
            "logit_bias",
            {"1": -100.5},
            "logit_bias.1: Input should be greater than or equal to -100",
        ),
        # Eleven digits name no token of any vocabulary: refused as a key, not looked up.
        ("logit_bias", {"1" + "0" * 10: 1}, "logit_bias: keys are token ids, written in digits"),
        ("logit_bias", {"1": "1"}, "logit_bias.1: Input should be a valid number"),
        ("prompt", [], "prompt: must be a string, a non-empty list of strings, a non-empty"),
        ("prompt", [[]], "prompt: must be a string, a non-empty list of strings, a non-empty"),
        ("prompt", [1, -2], "prompt: must be a string, a non-empty list of strings, a non-"),
        ("prompt", [1, True], "prompt: must be a string, a non-empty list of strings, a non-"),
        ("prompt", ["a", [1]], "prompt: must be a string, a non-empty list of strings, a non-"),
        ("stream_options", {"include_usage": 1}, "stream_options.include_usage: Input should"),
        ("stream_options", {"include_usage": True}, "body: stream_options only with stream: t"),
        # vLLM's continuous_usage_stats is not done here: refused, not silently ignored.
        (
            "stream_options",
            {"include_usage": True, "continuous_usage_stats": True},
            "stream_options.continuous_usage_stats: Extra inputs are not permitted",
        ),
        ("max_tokens", -1, "max_tokens: Input should be greater than or equal to 0"),
        ("max_tokens", 0, "body: max_tokens 0 only with echo: true (the prompt scored, nothing"),
        ("best_of_three", 3, "best_of_three: Extra inputs are not permitted"),
        ("stop", ["s"] * 17, "stop: must be a string or a list of at most 16 strings, each"),
    ],
)
def test_what_the_server_cannot_do_is_refused_by_name(client, field, value, message):
    response = client.post("/v1/completions", json={"prompt": "x", field: value})
    assert assert_error(response, 422, "invalid_request").startswith(message)


def test_a_lone_surrogate_in_a_list_of_prompts_is_422_naming_the_prompt(client):
    sent = json.dumps({"prompt": ["a", "\ud800"]})  # escaped, as a JSON client may send it
    headers = {"Content-Type": "application/json"}
    response = client.post("/v1/completions", content=sent, headers=headers)
    message = assert_error(response, 422, "invalid_request")
    assert message == (
        "prompt: must be valid Unicode: \\ud800 at character 0 of prompt 2 is half of a "
        "surrogate pair"
    )


def test_best_of_fewer_than_n_is_refused_as_more_is(client):
    # OpenAI's best_of is at least n; only best_of = n asks for what this server does.
    response = client.post("/v1/completions", json={"prompt": "x", "n": 2, "best_of": 1})
    message = assert_error(response, 422, "invalid_request")
    assert message == "best_of: only n (2) or null: completions are not ranked"


def test_another_model_or_a_prompt_that_does_not_fit_is_refused(sdk, client, model_id):
    with pytest.raises(openai.NotFoundError) as refused:
        sdk.completions.create(model="gpt-3.5-turbo-instruct", prompt="x")
    assert refused.value.body["type"] == "model_not_found"
    assert model_id in refused.value.body["message"]
    too_long = {"prompt": ["fits", " x" * 1100], "max_tokens": 4}
    message = assert_error(
        client.post("/v1/completions", json=too_long), 400, "context_length_exceeded"
    )
    assert message.startswith("prompt 2 of 2 (") and "exceeds" in message
    too_many = {"prompt": ["x", "y"], "n": 3}
    message = assert_error(
        client.post("/v1/completions", json=too_many), 400, "too_many_completions"
    )
    assert message == "6 completions (prompts x n): the server holds at most 4 requests " + (
        "at once (--max-batch + --max-queue)"
    )


def test_prompts_that_do_not_all_fit_the_queue_are_all_refused(client, base_url):
    long = {"prompt": "first", "max_tokens": 500, "ignore_eos": True, "stream": True}
    with client.stream("POST", "/v1/generate", json=long) as running:
        running_events = sse_events(running)  # held: a dropped reader closes the stream
        next(running_events)  # admitted: one slot of 2 taken, 1 free + 2 to wait
        four = {"prompt": ["a", "b"], "n": 2, "max_tokens": 2}
        rejected = client.post("/v1/completions", json=four)
        assert_error(rejected, 429, "queue_full")
        assert metric_samples(base_url)[WAITING] == 0  # none of the four is queued
        three = client.post("/v1/completions", json={"prompt": "a", "n": 3, "max_tokens": 2})
        assert three.status_code == 200 and len(three.json()["choices"]) == 3


def test_a_client_leaving_a_stream_of_several_prompts_cancels_every_choice(client, base_url):
    cancelled = metric_samples(base_url)[CANCELLED]
    body = {"prompt": ["one", "two"], "max_tokens": 900, "ignore_eos": True, "stream": True}
    with client.stream("POST", "/v1/completions", json=body) as response:
        events = sse_events(response)  # held: a dropped reader closes the stream
        assert next(events)["object"] == "text_completion"
        assert metric_samples(base_url)[RUNNING] == 2
    wait_until(lambda: metric_samples(base_url)[RUNNING] == 0, 30, "both choices cancelled")
    assert metric_samples(base_url)[CANCELLED] == cancelled + 2


def test_completions_are_counted_with_the_generation_requests(client, base_url):
    ok = ("pocketgpt_requests_total", (("status", "200"),))
    before = metric_samples(base_url)[ok]
    assert client.post("/v1/completions", json={"prompt": "x", "max_tokens": 1}).status_code == 200
    assert metric_samples(base_url)[ok] == before + 1
