"""POST /v1/generate against a real uvicorn serving a random tiny checkpoint."""

from __future__ import annotations

import collections
import itertools
import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
from server_harness import (
    abandon_request,
    english_tokenizer,
    metric_samples,
    random_checkpoint,
    running_server,
    sse_events,
    wait_until,
)

from model.checkpoint import load_model, load_tokenizer
from server.protocol import StreamChunk
from server.settings import Settings

PREFILL_CHUNK = 16  # small, so a long prompt is prefilled over several steps
LONG_PROMPT = "The engine admits waiting requests into free slots. " * 6  # > 3 chunks


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return random_checkpoint(tmp_path_factory.mktemp("ckpt"), english_tokenizer())


@pytest.fixture(scope="module")
def base_url(checkpoint: Path) -> Iterator[str]:
    settings = Settings(checkpoint=checkpoint, max_batch=8, prefill_chunk=PREFILL_CHUNK)
    with running_server(settings) as url:
        yield url


def generate(client: httpx.Client, **body) -> dict:
    response = client.post("/v1/generate", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def stream(client: httpx.Client, **body) -> list[dict | str]:
    with client.stream("POST", "/v1/generate", json={**body, "stream": True}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        # Neither cached nor held back by a proxy (nginx buffers unless told not to).
        assert response.headers["cache-control"] == "no-cache"
        assert response.headers["x-accel-buffering"] == "no"
        return list(sse_events(response))


def streamed_text(events: list[dict | str]) -> str:
    return "".join(e["text"] for e in events if isinstance(e, dict))


def streamed_ids(events: list[dict | str]) -> list[int]:
    return [i for e in events if isinstance(e, dict) for i in e["token_ids"]]


def test_stream_deltas_concatenate_to_the_non_stream_text_for_the_same_seed(client):
    body = {"prompt": "Once upon a time", "max_tokens": 24, "seed": 7, "top_k": 40}
    whole = generate(client, **body)
    events = stream(client, **body)

    assert events[-1] == "[DONE]"
    *steps, last = events[:-1]
    assert all(set(e) == {"id", "text", "token_ids", "finish_reason"} for e in steps)
    assert all(e["finish_reason"] is None and len(e["token_ids"]) == 1 for e in steps)
    # Each event is the StreamChunk the OpenAPI document describes; the last has every field.
    for event in events[:-1]:
        StreamChunk.model_validate_json(json.dumps(event), strict=True)
    assert set(last) == set(StreamChunk.model_fields)
    assert last["finish_reason"] == whole["finish_reason"]
    assert last["stop_reason"] == whole["stop_reason"]
    assert last["usage"] == whole["usage"]
    usage = whole["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert last["usage"]["completion_tokens"] == len(streamed_ids(events))
    assert len({e["id"] for e in events[:-1]}) == 1
    assert streamed_text(events) == whole["text"]


def test_every_sse_event_is_one_data_line_ended_by_a_blank_line(client):
    # An EventSource dispatches an event at its blank line only: a [DONE] without one
    # never reaches the page (a line reader, like sse_events, sees it regardless).
    body = {"prompt": "frame me", "max_tokens": 3, "ignore_eos": True, "stream": True}
    events = client.post("/v1/generate", json=body).content.split(b"\n\n")
    assert events[-2:] == [b"data: [DONE]", b""]
    assert all(e.startswith(b"data: ") and b"\n" not in e for e in events[:-1])


def test_a_prompt_with_windows_line_ends_is_served_as_with_newlines(client):
    body = {"max_tokens": 12, "seed": 5, "ignore_eos": True}
    newlines = generate(client, prompt="Dear team,\n\nThe engine", **body)
    crlf = generate(client, prompt="Dear team,\r\n\r\nThe engine", **body)
    assert crlf["usage"] == newlines["usage"]
    assert crlf["text"] == newlines["text"]


def test_stream_interval_sends_the_same_tokens_in_events_of_that_many(client, checkpoint):
    body = {"prompt": "Once upon a time", "max_tokens": 18, "seed": 3, "ignore_eos": True}
    per_token = stream(client, **body)
    text = streamed_text(per_token)
    stop = text[len(text) // 2 :][:2]  # a stop string the text reaches halfway
    settings = Settings(checkpoint=checkpoint, max_batch=2, stream_interval=4)
    with running_server(settings) as url, httpx.Client(base_url=url, timeout=60) as gathered:
        events = stream(gathered, **body)
        stopped = stream(gathered, **body, stop=["never there", stop])
    # The gathered last event names the stop string, as one event per token would.
    assert (stopped[-2]["finish_reason"], stopped[-2]["stop_reason"]) == ("stop", stop)
    assert streamed_text(stopped) == text[: text.index(stop)]
    assert events[-1] == "[DONE]"
    *full, last = events[:-1]
    assert [len(e["token_ids"]) for e in full] == [4, 4, 4, 4] and len(last["token_ids"]) == 2
    assert last["finish_reason"] == "length" and last["stop_reason"] is None
    assert last["usage"]["completion_tokens"] == 18
    assert streamed_ids(events) == streamed_ids(per_token)
    assert streamed_text(events) == streamed_text(per_token)


def test_seeds_that_differ_past_their_low_32_bits_draw_differently(client):
    # The CPU generator keeps a seed's low 32 bits: 1 and 2**32 + 1 drew the same text.
    body = {"prompt": "Seeds", "max_tokens": 24, "temperature": 1.0, "ignore_eos": True}
    texts = {
        seed: [generate(client, **body, seed=seed)["text"] for _ in range(2)]
        for seed in (1, 2**32 + 1, 2**40 + 1, 2**63 - 1)
    }
    assert all(first == again for first, again in texts.values())  # each seed its own text
    assert len({first for first, _ in texts.values()}) == len(texts)


def test_seed_2_to_the_32_is_hashed_and_draws_unlike_seed_0(client):
    # The first seed past the CPU generator's 32 bits: seeded as it is, its low 32 bits
    # (0) drew seed 0's text.
    body = {"prompt": "Seeds", "max_tokens": 24, "temperature": 1.0, "ignore_eos": True}
    zero, past = (generate(client, **body, seed=seed)["text"] for seed in (0, 2**32))
    assert zero != past


def test_greedy_and_seeded_output_is_the_same_alone_and_in_a_busy_batch(client):
    # A row leaking into another (a wrong slot, generator or penalty history) changes
    # the text at once. Rounding alone could too, where a draw falls within ~1e-6 of a
    # boundary between tokens (README, "seed"): measured at about 1 in 5,000 draws at
    # temperature 5 and none in 19,000 at 0.8-1.5; these 40 draws are far from that.
    targets = [
        {"prompt": "Hello there", "max_tokens": 20, "temperature": 0},
        {"prompt": LONG_PROMPT, "max_tokens": 20, "temperature": 0},  # chunked prefill
        {"prompt": "A seeded draw", "max_tokens": 20, "seed": 1234, "top_p": 0.9},
        {"prompt": "Penalised", "max_tokens": 20, "seed": 5, "repetition_penalty": 1.3},
        {"prompt": "A min-p draw", "max_tokens": 20, "seed": 99, "min_p": 0.2},
    ]
    alone = [streamed_ids(stream(client, **t)) for t in targets]

    noise = [
        {
            "prompt": f"background request {i} " * (i + 1),
            "max_tokens": 40,
            "seed": i,
            "temperature": 0.8 + i / 10,
            "ignore_eos": True,
        }
        for i in range(5)
    ]
    with ThreadPoolExecutor(len(noise) + len(targets)) as pool:
        busy = [pool.submit(stream, client, **n) for n in noise]
        wait_until(lambda: running(client) >= 3, 60, "a busy batch")
        batched = list(pool.map(lambda t: streamed_ids(stream(client, **t)), targets))
        assert all(f.result()[-1] == "[DONE]" for f in busy)
    assert batched == alone


def reference_greedy(
    checkpoint: Path, prompt_ids: list[int], n: int, penalties: dict[str, float]
) -> list[int]:
    """Greedy ids by full forwards, the penalties as HF and OpenAI define them: the
    repetition penalty over prompt and output, presence and frequency over the output."""
    model = load_model(checkpoint).eval()
    ids, generated = list(prompt_ids), collections.Counter()
    repetition = penalties.get("repetition_penalty", 1.0)
    for _ in range(n):
        with torch.no_grad():
            logits = model(torch.tensor([ids]), torch.arange(len(ids))[None])[0, -1]
        for token in set(ids):
            value = logits[token]
            logits[token] = value / repetition if value > 0 else value * repetition
        for token, count in generated.items():
            logits[token] -= penalties.get("presence_penalty", 0.0)
            logits[token] -= penalties.get("frequency_penalty", 0.0) * count
        token = int(logits.argmax())
        ids.append(token)
        generated[token] += 1
    return ids[len(prompt_ids) :]


@pytest.mark.parametrize(
    "penalties",
    [
        {"presence_penalty": 1.5, "frequency_penalty": 0.7},
        {"frequency_penalty": -2.0},  # rewards repeating the output, not the prompt
        {"repetition_penalty": 1.4, "presence_penalty": 0.5, "frequency_penalty": 0.5},
    ],
)
def test_penalised_greedy_output_is_the_reference_loops(client, checkpoint, penalties):
    prompt = "the cat and the hat and the cat and the hat"
    body = {"prompt": prompt, "max_tokens": 16, "temperature": 0, "ignore_eos": True}
    served = streamed_ids(stream(client, **body, **penalties))
    prompt_ids = load_tokenizer(checkpoint).encode(prompt).ids
    assert served == reference_greedy(checkpoint, prompt_ids, 16, penalties)


def test_a_reused_slot_penalises_the_tokens_of_its_own_prompt_only(client, checkpoint):
    # One request after another takes slot 0: the previous prompt, here the text the
    # next request will generate, must not count as the next one's.
    penalties = {"repetition_penalty": 10.0}
    prompt = "the cat and the hat"
    tokenizer = load_tokenizer(checkpoint)
    expected = reference_greedy(checkpoint, tokenizer.encode(prompt).ids, 16, penalties)
    generate(client, prompt=tokenizer.decode(expected), max_tokens=1)
    body = {"prompt": prompt, "max_tokens": 16, "temperature": 0, "ignore_eos": True}
    assert streamed_ids(stream(client, **body, **penalties)) == expected


def test_sampling_fields_left_out_take_the_checkpoint_generation_config(client):
    # The trainer's checkpoints (this one too) say temperature 0.8, top_p 0.95.
    body = {"prompt": "Once upon a time", "max_tokens": 20, "seed": 7, "ignore_eos": True}
    left_out = generate(client, **body)["text"]
    assert generate(client, **body, temperature=0.8, top_p=0.95)["text"] == left_out
    assert generate(client, **body, temperature=1.0, top_p=1.0)["text"] != left_out


def test_min_p_drops_the_unlikely_tokens_of_each_step(client):
    # min_p 1 keeps the likeliest token alone: a draw at any temperature is greedy. (top_p
    # 1: the checkpoint's 0.95 off, min_p the only truncation.)
    body = {"prompt": "Once upon a time", "max_tokens": 16, "ignore_eos": True, "top_p": 1.0}
    greedy = generate(client, **body, temperature=0)["text"]
    assert generate(client, **body, temperature=5.0, seed=3, min_p=1.0)["text"] == greedy
    # A looser one keeps more: at temperature 5 the draws leave the greedy path.
    assert generate(client, **body, temperature=5.0, seed=3, min_p=0.01)["text"] != greedy


def running(client: httpx.Client) -> float:
    return metric_samples(str(client.base_url))[("pocketgpt_requests_running", ())]


def test_sampling_values_at_the_edges_of_their_ranges_serve_as_their_limits(client):
    # A top_k past int64 once failed the whole step (every stream in it); a temperature
    # too small for fp32 drew NaN probabilities.
    body = {"prompt": "Once upon a time", "max_tokens": 12, "ignore_eos": True}
    sampled = generate(client, **body, seed=5)["text"]
    assert generate(client, **body, seed=5, top_k=2**70)["text"] == sampled
    greedy = generate(client, **body, temperature=0)["text"]
    assert generate(client, **body, temperature=1e-30, seed=5)["text"] == greedy


def test_a_checkpoint_padded_past_its_tokenizer_never_draws_the_padding(tmp_path):
    # Near-uniform draws over 256 rows the tokenizer has no text for: without a mask
    # nearly every step would pick one (and fail the whole batch).
    tokenizer = english_tokenizer()
    padded = random_checkpoint(tmp_path, tokenizer, padded_rows=256)
    body = {"prompt": "Once upon a time", "max_tokens": 48, "temperature": 100, "ignore_eos": True}
    with (
        running_server(Settings(checkpoint=padded, max_batch=4)) as url,
        httpx.Client(base_url=url, timeout=60) as client,
        ThreadPoolExecutor(4) as pool,
    ):
        runs = list(pool.map(lambda seed: stream(client, **body, seed=seed), range(4)))
    for events in runs:
        ids = streamed_ids(events)
        assert len(ids) == 48 and max(ids) < tokenizer.get_vocab_size()


def test_short_request_sent_after_a_long_one_finishes_first(client):
    finished: dict[str, float] = {}
    first_event = threading.Event()

    def long_request() -> None:
        body = {"prompt": "long", "max_tokens": 600, "ignore_eos": True, "stream": True}
        with client.stream("POST", "/v1/generate", json=body) as response:
            for _ in sse_events(response):
                first_event.set()
        finished["long"] = time.monotonic()

    before = metric_samples(str(client.base_url))
    worker = threading.Thread(target=long_request)
    worker.start()
    assert first_event.wait(60)
    generate(client, prompt="short", max_tokens=4, ignore_eos=True)
    finished["short"] = time.monotonic()
    worker.join(60)
    assert finished["short"] < finished["long"]

    after = metric_samples(str(client.base_url))
    one_row = ("pocketgpt_batch_size_bucket", (("le", "1.0"),))
    steps = ("pocketgpt_batch_size_count", ())
    multi_row_steps = (after[steps] - after[one_row]) - (before[steps] - before[one_row])
    assert multi_row_steps >= 1


CANCELLED = ("pocketgpt_request_finished_total", (("reason", "cancelled"),))
GENERATED = ("pocketgpt_generation_tokens_total", ())


def test_disconnect_after_two_events_cancels_the_request_and_frees_its_slot(client):
    before = metric_samples(str(client.base_url))
    body = {"prompt": "bye", "max_tokens": 900, "ignore_eos": True, "stream": True}
    with client.stream("POST", "/v1/generate", json=body) as response:
        events = sse_events(response)
        next(events), next(events)
    wait_until(lambda: running(client) == 0, 30, "requests_running back to 0")
    after = metric_samples(str(client.base_url))
    assert after[CANCELLED] == before.get(CANCELLED, 0.0) + 1
    assert after[GENERATED] - before[GENERATED] < 900  # stopped, not run to its end


def test_non_stream_client_that_gives_up_cancels_its_request(client):
    before = metric_samples(str(client.base_url))
    body = {"prompt": "impatient", "max_tokens": 900, "ignore_eos": True}
    abandon_request(str(client.base_url), body)
    wait_until(lambda: running(client) == 0, 30, "requests_running back to 0")
    after = metric_samples(str(client.base_url))
    assert after[CANCELLED] == before.get(CANCELLED, 0.0) + 1
    assert after[GENERATED] - before[GENERATED] < 900


def test_metrics_parse_and_counters_match_the_requests_made(client):
    before = metric_samples(str(client.base_url))
    usages = [
        generate(client, prompt="count me", max_tokens=3)["usage"],
        generate(client, prompt="and me too", max_tokens=5, ignore_eos=True)["usage"],
        stream(client, prompt="streamed", max_tokens=4)[-2]["usage"],
    ]
    assert client.post("/v1/generate", json={"prompt": "x", "max_tokens": 0}).status_code == 422
    assert client.post("/v1/generate", json={"prompt": "x", "max_tokens": 5000}).status_code == 400
    after = metric_samples(str(client.base_url))

    def delta(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert delta("pocketgpt_requests_total", status="200") == 3
    assert delta("pocketgpt_requests_total", status="422") == 1
    assert delta("pocketgpt_requests_total", status="400") == 1
    assert delta("pocketgpt_prompt_tokens_total") == sum(u["prompt_tokens"] for u in usages)
    assert delta("pocketgpt_generation_tokens_total") == sum(u["completion_tokens"] for u in usages)
    finished = delta("pocketgpt_request_finished_total", reason="stop") + delta(
        "pocketgpt_request_finished_total", reason="length"
    )
    assert finished == 3
    for histogram in (
        "time_to_first_token_seconds",
        "request_latency_seconds",
        "queue_time_seconds",
    ):
        assert delta(f"pocketgpt_{histogram}_count") == 3
    assert delta("pocketgpt_inter_token_latency_seconds_count") == sum(
        u["completion_tokens"] - 1 for u in usages
    )
    # An error ratio is 0, not "no data", before the first error; no `_created` series.
    for status in ("429", "499", "500", "503"):
        assert ("pocketgpt_requests_total", (("status", status),)) in after
    names = {name for name, _ in after}
    assert not [name for name in names if name.endswith("_created")]
    # The server's state, for an alert that needs no traffic to fire.
    states = {
        dict(labels)["pocketgpt_server_state"]: value
        for (name, labels), value in after.items()
        if name == "pocketgpt_server_state"
    }
    assert states == {"loading": 0, "ready": 1, "draining": 0, "failed": 0}
    # Inter-token latency resolves a GPU's ~1-3 ms steps as well as a CPU's ~3-30 ms.
    bounds = sorted(
        float(dict(labels)["le"])
        for name, labels in after
        if name == "pocketgpt_inter_token_latency_seconds_bucket"
    )
    fine = [b for b in bounds if 0.001 <= b <= 0.05]
    assert fine[0] == 0.001 and fine[-1] == 0.05
    assert all(high / low <= 1.5 for low, high in itertools.pairwise(fine))
    # A CPU queue holds a request for minutes: the latency histograms reach 5 minutes.
    for histogram in ("time_to_first_token", "request_latency", "queue_time"):
        tops = [
            float(dict(labels)["le"])
            for name, labels in after
            if name == f"pocketgpt_{histogram}_seconds_bucket" and dict(labels)["le"] != "+Inf"
        ]
        assert max(tops) == 300, histogram
        # ... and down to an idle GPU's 1 ms.
        assert min(tops) == 0.001, histogram
    for gauge in ("requests_running", "requests_waiting", "kv_cache_usage_ratio"):
        assert f"pocketgpt_{gauge}" in names
    assert after[("pocketgpt_model_load_seconds", ())] > 0
    assert "process_cpu_seconds_total" in names


def test_health_and_models_describe_the_loaded_checkpoint(client, checkpoint):
    assert client.get("/health").json() == {"status": "ready"}
    models = client.get("/v1/models").json()
    assert models["object"] == "list"
    # save_checkpoint wrote `latest` beside it: a run's step folder, named for its run.
    assert models["data"][0]["id"] == checkpoint.parent.name
    assert models["data"][0]["max_context"] == 1024
    assert models["data"][0]["checkpoint"] == "random"
    assert models["data"][0]["owned_by"] == "pocketgpt"
    # An answer names the model that wrote it as /v1/models does.
    assert generate(client, prompt="x", max_tokens=1)["model"] == checkpoint.parent.name


def test_a_checkpoint_served_through_a_link_is_named_by_the_folder_it_links_to(
    checkpoint, tmp_path
):
    # `best` or `latest-step` as a link to a step folder: the card says which step it is.
    link = tmp_path / "best"
    link.symlink_to(checkpoint, target_is_directory=True)
    with running_server(Settings(checkpoint=link)) as url:
        [card] = httpx.get(f"{url}/v1/models").json()["data"]
    assert card["checkpoint"] == checkpoint.name == "random", card


def test_a_server_compiling_its_decode_step_serves_the_same_tokens(tmp_path):
    # Two layers, not tiny's four: the graphs build in ~60% of the time, and still read
    # and write more than one layer's cache.
    checkpoint = random_checkpoint(tmp_path, english_tokenizer(), n_layers=2)
    bodies = [
        {"prompt": "Hello there", "max_tokens": 20, "temperature": 0, "ignore_eos": True},
        {"prompt": "Once upon a time", "max_tokens": 20, "seed": 3, "top_p": 0.9},
    ]
    serving = {"checkpoint": checkpoint, "max_batch": 8, "prefill_chunk": PREFILL_CHUNK}
    with (
        running_server(Settings(**serving)) as url,
        httpx.Client(base_url=url, timeout=60) as eager,
    ):
        expected = [generate(eager, **body)["text"] for body in bodies]
    compiling = Settings(**serving, compile_decode=True)
    # Ready only after the warm-up has built the graphs (~25 s on 2 cores, cold).
    with (
        running_server(compiling, ready_within=180) as url,
        httpx.Client(base_url=url, timeout=60) as compiled,
    ):
        for body, text in zip(bodies, expected, strict=True):
            assert generate(compiled, **body)["text"] == text  # alone: batch 1's graph
            assert streamed_text(stream(compiled, **body)) == text
        # Together, in slots 0 and 1: the larger batches' graph.
        with ThreadPoolExecutor(len(bodies)) as pool:
            together = list(pool.map(lambda body: generate(compiled, **body)["text"], bodies))
        assert together == expected
