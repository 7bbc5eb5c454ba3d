"""Streamed text, byte for byte: a model that walks a known cycle of pieces (Chinese,
emoji, ASCII), each non-ASCII character split over several byte tokens."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from server_harness import (
    cycle_checkpoint,
    cycle_pieces,
    english_tokenizer,
    running_server,
    sse_events,
)

from model.checkpoint import CheckpointError
from model.token_bytes import token_bytes
from server.settings import Settings
from server.validation import end_of_text_ids


@pytest.fixture(scope="module")
def pieces() -> list[tuple[str, list[int]]]:
    pieces = cycle_pieces(english_tokenizer())
    texts = [text for text, _ in pieces]
    assert texts[:2] == ["Hi", " there"] and "中" in texts and "🙂" in texts
    assert {"\x85", "\u2028"} <= set(texts)
    return pieces


@pytest.fixture(scope="module")
def client(tmp_path_factory) -> Iterator[httpx.Client]:
    checkpoint = cycle_checkpoint(tmp_path_factory.mktemp("ckpt"), english_tokenizer())
    with (
        running_server(Settings(checkpoint=checkpoint)) as url,
        httpx.Client(base_url=url, timeout=60) as client,
    ):
        yield client


def stream(client: httpx.Client, **body) -> list[dict | str]:
    body = {"prompt": "Hi", "temperature": 0, "stream": True, **body}
    with client.stream("POST", "/v1/generate", json=body) as response:
        assert response.status_code == 200
        return list(sse_events(response))


def test_chinese_and_emoji_stream_without_replacement_characters(client, pieces):
    cycle_tokens = sum(len(ids) for _, ids in pieces)
    expected = "".join(text for text, _ in pieces[1:])  # the prompt was pieces[0]
    events = stream(client, max_tokens=cycle_tokens - len(pieces[0][1]))
    deltas = [e["text"] for e in events if isinstance(e, dict)]
    assert "".join(deltas) == expected
    assert not any("\ufffd" in d for d in deltas)
    assert "" in deltas  # tokens that ended mid-character were held, not garbled
    whole = client.post(
        "/v1/generate",
        json={"prompt": "Hi", "temperature": 0, "max_tokens": cycle_tokens - len(pieces[0][1])},
    )
    assert whole.json()["text"] == expected


def test_a_paragraph_separator_streams_inside_its_event(tmp_path: Path):
    # U+2029 shares its first two byte tokens with U+2028 (in the cycle above), so it has
    # a cycle of its own. Unescaped, str.splitlines readers (sse_events) split its event.
    tokenizer = english_tokenizer()
    cycle = tokenizer.encode("\u2029 ok", add_special_tokens=False).ids
    assert len(set(cycle)) == len(cycle)
    checkpoint = cycle_checkpoint(tmp_path, tokenizer, cycle)
    with running_server(Settings(checkpoint=checkpoint)) as url, httpx.Client(base_url=url) as c:
        events = stream(c, prompt=" ok", max_tokens=2 * len(cycle))
    assert "".join(e["text"] for e in events if isinstance(e, dict)) == "\u2029 ok" * 2


@pytest.mark.parametrize("stop", ["here", "中文", "🙂 a"], ids=["ascii", "chinese", "emoji"])
def test_stop_string_spanning_tokens_is_never_emitted(client, pieces, stop):
    expected = "".join(text for text, _ in pieces[1:])
    expected = expected[: expected.index(stop)]
    events = stream(client, max_tokens=60, stop=stop)  # one string: not one per character
    deltas = [e["text"] for e in events if isinstance(e, dict)]
    assert "".join(deltas) == expected
    assert stop not in "".join(deltas)
    assert events[-2]["finish_reason"] == "stop" and events[-1] == "[DONE]"
    assert events[-2]["stop_reason"] == stop
    # Of several stop strings, the answer names the one that ended the text.
    body = {"prompt": "Hi", "temperature": 0, "max_tokens": 60, "stop": ["never", stop]}
    whole = client.post("/v1/generate", json=body).json()
    assert (whole["text"], whole["finish_reason"], whole["stop_reason"]) == (expected, "stop", stop)


def test_an_eos_token_id_the_checkpoint_declares_ends_the_text_as_end_of_text_does(
    tmp_path: Path, pieces, capfd
):
    # A chat model's <|im_end|>: generation_config.json lists it beside the separator.
    checkpoint = cycle_checkpoint(tmp_path / "ckpt", english_tokenizer())
    generation = checkpoint / "generation_config.json"
    settings = json.loads(generation.read_text(encoding="utf-8"))
    ends = pieces[3][1][0]
    settings["eos_token_id"] = [settings["eos_token_id"], ends]
    generation.write_text(json.dumps(settings), encoding="utf-8")
    body = {"prompt": pieces[0][0], "max_tokens": 40, "temperature": 0}
    with running_server(Settings(checkpoint=checkpoint)) as url:
        reply = httpx.post(f"{url}/v1/generate", json=body, timeout=60).json()
        assert (reply["text"], reply["finish_reason"]) == (pieces[1][0] + pieces[2][0], "stop")
        assert reply["stop_reason"] is None  # end-of-text, not a stop string
        past = httpx.post(f"{url}/v1/generate", json=body | {"ignore_eos": True}, timeout=60)
        assert pieces[3][0] in past.json()["text"]
    # The server log names the ids texts end at where there are several, in order.
    ids = sorted(settings["eos_token_id"])
    assert (
        f"texts end at token ids {ids} (the checkpoint's eos_token_id)\n" in capfd.readouterr().err
    )


def test_the_start_up_log_says_none_for_absent_sampling_defaults_and_no_lone_end_id(
    tmp_path: Path, capfd
):
    # A generation_config.json declaring no sampling defaults: "none", not an empty list;
    # a single end id (the separator) is the usual case, and goes unsaid.
    checkpoint = cycle_checkpoint(tmp_path / "ckpt", english_tokenizer())
    generation = checkpoint / "generation_config.json"
    settings = json.loads(generation.read_text(encoding="utf-8"))
    generation.write_text(json.dumps({"eos_token_id": settings["eos_token_id"]}))
    with running_server(Settings(checkpoint=checkpoint)):
        pass
    log = capfd.readouterr().err
    assert "sampling defaults from generation_config.json: none; ready in " in log, log
    assert "texts end at" not in log, log


def test_eos_token_id_comes_from_config_json_where_generation_config_declares_none(
    tmp_path: Path, pieces
):
    checkpoint = cycle_checkpoint(tmp_path / "ckpt", english_tokenizer())
    separator, ends = english_tokenizer().token_to_id("<|endoftext|>"), pieces[3][1][0]
    for name, value in (("generation_config.json", None), ("config.json", [ends])):
        path = checkpoint / name
        path.write_text(json.dumps(json.loads(path.read_text()) | {"eos_token_id": value}))
    assert end_of_text_ids(checkpoint, separator, 1000) == {separator, ends}


def test_a_stop_string_the_last_tokens_flush_completes_ends_by_stop(tmp_path: Path):
    # Bytes that can begin no character become U+FFFD only when the text ends: at
    # max_tokens that completed the stop string, yet the answer said "length" with it.
    tokenizer = english_tokenizer()
    table = token_bytes(tokenizer)
    cycle = [table.index(b"a"), table.index(b"\xed"), table.index(b"\xa0")]
    checkpoint = cycle_checkpoint(tmp_path / "ckpt", tokenizer, cycle)
    body = {"prompt": "a", "max_tokens": 2, "temperature": 0, "stop": ["\ufffd"]}
    with running_server(Settings(checkpoint=checkpoint)) as url:
        reply = httpx.post(f"{url}/v1/generate", json=body, timeout=60).json()
        with httpx.Client(base_url=url, timeout=60) as client:
            events = stream(client, **body)
    assert (reply["text"], reply["finish_reason"], reply["stop_reason"]) == ("", "stop", "\ufffd")
    assert [e["finish_reason"] for e in events if isinstance(e, dict)] == [None, "stop"]


def test_an_eos_token_id_equal_to_the_vocabulary_size_is_refused(tmp_path: Path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [3, 1000]}))
    with pytest.raises(CheckpointError, match=r"eos_token_id \[3, 1000\] is not one or more"):
        end_of_text_ids(tmp_path, 0, 1000)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [3, 999]}))
    assert end_of_text_ids(tmp_path, 0, 1000) == {0, 3, 999}


def test_a_negative_eos_token_id_is_refused(tmp_path: Path):
    # No token has a negative id: a checkpoint declaring one is wrong, not silently one
    # end-of-text id short.
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [3, -1]}))
    with pytest.raises(CheckpointError, match=r"eos_token_id \[3, -1\] is not one or more"):
        end_of_text_ids(tmp_path, 0, 1000)


def test_an_eos_token_id_that_is_a_boolean_is_refused(tmp_path: Path):
    # JSON's true is no token id, though Python would read it as token 1.
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [3, True]}))
    with pytest.raises(CheckpointError, match=r"eos_token_id \[3, True\] is not one or more"):
        end_of_text_ids(tmp_path, 0, 1000)


# --- /tokenize and /detokenize ---------------------------------------------------------


@pytest.mark.parametrize(
    "prompt",
    ["Hi there", "中文🙂 and", "line\r\nnext", "<|endoftext|>", ""],
    ids=["ascii", "split characters", "crlf", "special token as text", "empty"],
)
def test_tokenize_counts_a_prompt_as_generation_reads_it(client, prompt):
    counted = client.post("/tokenize", json={"prompt": prompt, "return_token_strs": True})
    assert counted.status_code == 200, counted.text
    answer = counted.json()
    served = client.post("/v1/generate", json={"prompt": prompt, "max_tokens": 1}).json()
    assert answer["count"] == len(answer["tokens"]) == served["usage"]["prompt_tokens"]
    assert answer["max_model_len"] == client.get("/v1/models").json()["data"][0]["max_context"]
    # The same ids continue the same way: completions of the ids and of the text agree.
    by_ids = {"prompt": answer["tokens"], "max_tokens": 6, "temperature": 0}
    by_text = by_ids | {"prompt": prompt}
    texts = [
        client.post("/v1/completions", json=b).json()["choices"][0]["text"]
        for b in (by_ids, by_text)
    ]
    assert texts[0] == texts[1]
    end_of_text = english_tokenizer().token_to_id("<|endoftext|>")
    strs = answer["token_strs"]
    if prompt:  # special tokens written in a prompt are text: no end-of-text id
        assert end_of_text not in answer["tokens"]
        if prompt.isascii():  # byte-level BPE spells a space Ġ, a newline Ċ
            spelled = "".join(strs).replace("Ġ", " ").replace("Ċ", "\n")
            assert spelled == prompt.replace("\r\n", "\n")
    else:  # an empty prompt starts a document: after end-of-text
        assert (answer["tokens"], strs) == ([end_of_text], ["<|endoftext|>"])
    plain = client.post("/tokenize", json={"prompt": prompt}).json()
    assert plain == answer | {"token_strs": None}


def test_detokenize_reads_a_streams_token_ids_as_its_text(client, pieces):
    events = stream(client, max_tokens=30)
    ids = [i for e in events if isinstance(e, dict) for i in e["token_ids"]]
    text = "".join(e["text"] for e in events if isinstance(e, dict))
    answer = client.post("/detokenize", json={"tokens": ids})
    assert answer.status_code == 200 and answer.json() == {"prompt": text}
    # A character cut short reads as U+FFFD; end-of-text has no text; none is "".
    chinese = next(ids for text, ids in pieces if text == "中")
    end_of_text = english_tokenizer().token_to_id("<|endoftext|>")
    for tokens, expected in (
        (chinese[:1], "\ufffd"),
        ([*chinese, end_of_text], "中"),
        ([], ""),
    ):
        assert client.post("/detokenize", json={"tokens": tokens}).json() == {"prompt": expected}


def test_tokenize_and_detokenize_refuse_what_they_cannot_read(client):
    vocab = english_tokenizer().get_vocab_size()
    model = client.get("/v1/models").json()["data"][0]["id"]
    refusals = [
        ("/detokenize", {"tokens": [5, vocab]}, 400, f"tokens: token id {vocab} (at 1) is not"),
        ("/detokenize", {"tokens": [5, -1]}, 422, "tokens.1: Input should be greater than"),
        ("/detokenize", {"tokens": [5], "model": "other"}, 404, "model: this server serves"),
        # An option this server does not take is refused, not silently ignored.
        ("/detokenize", {"tokens": [5], "skip_special_tokens": False}, 422, "skip_special_tokens:"),
        ("/tokenize", {"prompt": "x", "model": "other"}, 404, "model: this server serves"),
        ("/tokenize", {"prompt": "x", "add_special_tokens": True}, 422, "add_special_tokens: only"),
        ("/tokenize", {"prompt": "\ud800"}, 422, "prompt: must be valid Unicode"),
        ("/tokenize", {"prompt": "Hi " * 20_000}, 400, "prompt (at least"),
    ]
    for path, body, status, message in refusals:
        # json.dumps escapes a lone surrogate (\ud800), as a JSON client may send it.
        sent = json.dumps(body).encode()
        response = client.post(path, content=sent, headers={"Content-Type": "application/json"})
        assert response.status_code == status, (path, body, response.text)
        assert response.json()["error"]["message"].startswith(message), response.text
    # As vLLM's clients send it: the prompt read with no special tokens added.
    named = client.post(
        "/tokenize", json={"prompt": "Hi", "model": model, "add_special_tokens": False}
    )
    assert named.status_code == 200
    assert named.json() == client.post("/tokenize", json={"prompt": "Hi"}).json()
