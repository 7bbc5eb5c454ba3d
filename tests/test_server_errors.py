"""Every error answer: status, envelope, headers. One slot and one queue place, an API
key and a small body limit make each limit easy to reach."""

from __future__ import annotations

import contextlib
import gzip
import json
import re
import socket
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager

import httpx
import openai
import pytest
from server_harness import (
    english_tokenizer,
    metric_samples,
    random_checkpoint,
    running_server,
    sse_events,
    wait_until,
)
from starlette.responses import StreamingResponse
from tokenizers import normalizers

from model.checkpoint import crlf_as_newline
from model.token_bytes import token_bytes
from server.app import create_app
from server.protocol import (
    ApiError,
    ChatCompletionChunk,
    Completion,
    GenerateRequest,
    StreamChunk,
)
from server.settings import Settings
from server.validation import Validator

API_KEY = "test-key-0123456789"
BODY_LIMIT = 4096
HEADER_LIMIT = 6144  # not BODY_LIMIT: a check bounding one by the other shows
CONTEXT = 1024


@pytest.fixture(scope="module")
def base_url(tmp_path_factory) -> Iterator[str]:
    checkpoint = random_checkpoint(tmp_path_factory.mktemp("ckpt"), english_tokenizer())
    settings = Settings(
        checkpoint=checkpoint,
        # As read from a key file: no header can send the newline, so it is not the key's.
        api_key=f" {API_KEY}\n",
        max_batch=1,
        max_queue=1,
        max_body_bytes=BODY_LIMIT,
        max_header_bytes=HEADER_LIMIT,
    )
    with running_server(settings) as url:
        yield url


@pytest.fixture(scope="module")
def client(base_url: str) -> Iterator[httpx.Client]:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.Client(base_url=base_url, headers=headers, timeout=60) as client:
        yield client


def assert_error(response: httpx.Response, status: int, error_type: str) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"type", "message"}
    assert body["error"]["type"] == error_type
    return body["error"]["message"]


INVALID_BODIES = {
    "missing prompt": {"max_tokens": 4},
    "unknown field": {"prompt": "x", "n": 2},
    "prompt not a string": {"prompt": 123},
    "max_tokens zero": {"prompt": "x", "max_tokens": 0},
    "max_tokens fractional": {"prompt": "x", "max_tokens": 1.5},
    "temperature negative": {"prompt": "x", "temperature": -0.1},
    "top_p zero": {"prompt": "x", "top_p": 0},
    "top_p above one": {"prompt": "x", "top_p": 1.01},
    "top_k negative": {"prompt": "x", "top_k": -1},
    "min_p negative": {"prompt": "x", "min_p": -0.01},
    "min_p above one": {"prompt": "x", "min_p": 1.01},
    "repetition_penalty zero": {"prompt": "x", "repetition_penalty": 0},
    "repetition_penalty below 0.01": {"prompt": "x", "repetition_penalty": 1e-300},
    "max_tokens as a string": {"prompt": "x", "max_tokens": "5"},
    "max_tokens as a boolean": {"prompt": "x", "max_tokens": True},
    "stream as a number": {"prompt": "x", "stream": 1},
    "presence_penalty too big": {"prompt": "x", "presence_penalty": 3},
    "presence_penalty too small": {"prompt": "x", "presence_penalty": -2.01},
    "frequency_penalty too big": {"prompt": "x", "frequency_penalty": 2.01},
    "frequency_penalty too small": {"prompt": "x", "frequency_penalty": -2.01},
    "temperature above 100": {"prompt": "x", "temperature": 100.01},
    "repetition_penalty above 100": {"prompt": "x", "repetition_penalty": 100.01},
    "five stop strings": {"prompt": "x", "stop": ["a", "b", "c", "d", "e"]},
    "empty stop string": {"prompt": "x", "stop": [""]},
    "stop not a string": {"prompt": "x", "stop": 5},
    "seed negative": {"prompt": "x", "seed": -1},
    "seed too big": {"prompt": "x", "seed": 2**64},
    "stream not a bool": {"prompt": "x", "stream": [True]},
    "body not an object": ["prompt"],
}


@pytest.mark.parametrize("body", INVALID_BODIES.values(), ids=INVALID_BODIES.keys())
def test_invalid_field_is_422_in_the_envelope(client, body):
    message = assert_error(client.post("/v1/generate", json=body), 422, "invalid_request")
    assert message


# Each bound itself is in its range (the values just past them are INVALID_BODIES).
EDGE_FIELDS = {
    "temperature 100": {"temperature": 100.0},
    "top_k zero (off)": {"top_k": 0},
    "min_p zero (off)": {"min_p": 0.0},
    "min_p one": {"min_p": 1.0},
    "repetition_penalty 0.01": {"repetition_penalty": 0.01},
    "repetition_penalty 100": {"repetition_penalty": 100.0},
    "presence_penalty -2": {"presence_penalty": -2.0},
    "presence_penalty 2": {"presence_penalty": 2.0},
    "frequency_penalty -2": {"frequency_penalty": -2.0},
    "frequency_penalty 2": {"frequency_penalty": 2.0},
    "largest seed": {"seed": 2**63 - 1},
    "four stop strings of 64 characters": {"stop": ["s" * 64, "t" * 64, "u" * 64, "v" * 64]},
}


@pytest.mark.parametrize("fields", EDGE_FIELDS.values(), ids=EDGE_FIELDS.keys())
def test_a_field_at_the_edge_of_its_range_is_served(client, fields):
    response = client.post("/v1/generate", json={"prompt": "x", "max_tokens": 1, **fields})
    assert response.status_code == 200, response.text


def test_a_request_giving_every_one_of_its_fields_is_served(client):
    # The bound on a body's names (validation.parse_json_body) is the request's own count
    # of fields: a client that spells out every one, defaults included, is no attack.
    body = {
        "prompt": "x",
        "max_tokens": 1,
        "temperature": 1.0,
        "top_p": 1.0,
        "top_k": 0,
        "min_p": 0.0,
        "repetition_penalty": 1.0,
        "presence_penalty": 0.0,
        "frequency_penalty": 0.0,
        "stop": ["\n\n"],
        "seed": 1,
        "ignore_eos": False,
        "logit_bias": {"5": 0.5},
        "stream": False,
    }
    assert set(body) == set(GenerateRequest.model_fields)
    response = client.post("/v1/generate", json=body)
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("stop", [["a", "b", "c", "d", "e"], [""], 5, "s" * 65])
def test_a_bad_stop_gets_one_message_saying_what_stop_may_be(client, stop):
    response = client.post("/v1/generate", json={"prompt": "x", "stop": stop})
    message = assert_error(response, 422, "invalid_request")
    expected = "must be a string or a list of at most 4 strings, each of 1 to 64 characters"
    assert message == f"stop: {expected}"


@pytest.mark.parametrize(
    "raw",
    [
        '{"prompt": "x", "temperature": NaN}',
        '{"prompt": "\\ud800"}',
        '{"prompt": "x", "max_tokens": 1e400}',
    ],
    ids=["NaN", "lone surrogate", "overflowing number"],
)
def test_values_json_allows_but_text_cannot_use_are_422(client, raw):
    headers = {"Content-Type": "application/json"}
    assert_error(client.post("/v1/generate", content=raw, headers=headers), 422, "invalid_request")


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ('{"prompt": "ab\\ud800"}', "prompt: must be valid Unicode: \\ud800 at character 2"),
        (
            '{"prompt": "x", "stop": ["y", "\\udc00"]}',
            "stop: must be valid Unicode: \\udc00 at character 0 of stop string 2 ",
        ),
        ('{"prompt": "x", "stop": "\\ud83d"}', "stop: must be valid Unicode: \\ud83d"),
    ],
    ids=["prompt", "stop list", "stop string"],
)
def test_a_lone_surrogate_is_refused_naming_its_field(client, raw, message):
    response = client.post(
        "/v1/generate", content=raw, headers={"Content-Type": "application/json"}
    )
    assert assert_error(response, 422, "invalid_request").startswith(message)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b'{"prompt": ', "is not valid JSON"),
        (b"", "is empty: send a JSON object"),
        (b'{"prompt": "\xff"}', "is not UTF-8 (byte 0xff at offset 12)"),
        # json.loads would guess these from the bytes and serve them. Without a byte
        # order mark, ASCII text so encoded is UTF-8, with NULs JSON has no place for.
        ('{"prompt": "hi"}'.encode("utf-16"), "is not UTF-8 (byte 0xff at offset 0)"),
        ('{"prompt": "hi"}'.encode("utf-16-le"), "is not valid JSON"),
        ('{"prompt": "hi"}'.encode("utf-32-be"), "is not valid JSON"),
    ],
    ids=["cut short", "empty", "bad UTF-8", "UTF-16", "UTF-16 without BOM", "UTF-32"],
)
def test_body_that_is_not_json_is_400_saying_why(client, content, message):
    response = client.post(
        "/v1/generate", content=content, headers={"Content-Type": "application/json"}
    )
    assert assert_error(response, 400, "invalid_json") == f"the request body {message}"


def test_a_body_with_a_utf8_byte_order_mark_is_served(client):
    content = b"\xef\xbb\xbf" + json.dumps({"prompt": "hi", "max_tokens": 1}).encode()
    response = client.post(
        "/v1/generate", content=content, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 200, response.text


def test_a_number_with_more_digits_than_python_converts_is_422_saying_so(client):
    # Python converts at most 4,300 digits to an int (json.loads raised ValueError); the
    # bound is lowered to its least, 640, to stay under this server's body limit (the
    # server runs in this process).
    limit = sys.get_int_max_str_digits()
    sys.set_int_max_str_digits(640)
    try:
        raw = '{"prompt": "x", "top_k": 1' + "0" * 640 + "}"
        response = client.post(
            "/v1/generate", content=raw, headers={"Content-Type": "application/json"}
        )
    finally:
        sys.set_int_max_str_digits(limit)
    message = assert_error(response, 422, "invalid_request")
    assert message == "body: a number has more than 640 digits"


def test_a_lone_surrogate_in_a_field_name_is_422_saying_so(client):
    raw = '{"prompt": "x", "a\\ud800": 1}'
    response = client.post(
        "/v1/generate", content=raw, headers={"Content-Type": "application/json"}
    )
    message = assert_error(response, 422, "invalid_request")
    assert (
        message == "body: a field name is not valid Unicode (\\ud800 is half of a surrogate pair)"
    )


@pytest.mark.parametrize(
    ("raw", "name"),
    [
        ('{"prompt": "a", "max_tokens": 1, "max_tokens": 3}', "max_tokens"),
        ('{"prompt": "a", "logit_bias": {"5": 1, "6": 2, "5": -1}}', "5"),
    ],
)
def test_a_name_given_twice_in_an_object_is_422_naming_it(client, raw, name):
    # Which of the two a reader keeps is unsaid (RFC 8259): json.loads keeps the last.
    response = client.post(
        "/v1/generate", content=raw, headers={"Content-Type": "application/json"}
    )
    message = assert_error(response, 422, "invalid_request")
    assert message == f'body: "{name}" is given twice'
    once = json.loads(raw)  # the same request with each name once is served
    assert client.post("/v1/generate", json=once).status_code == 200


def test_a_long_name_given_twice_is_named_cut_short(client):
    # Repeated whole as JSON writes it (each "é" as \\u00e9), the name made an answer
    # 1.75 times the body's size.
    name = "é" * 1000
    raw = json.dumps({"prompt": "a", name: 1}, ensure_ascii=False)[:-1] + f', "{name}": 2}}'
    response = client.post(
        "/v1/generate", content=raw.encode(), headers={"Content-Type": "application/json"}
    )
    message = assert_error(response, 422, "invalid_request")
    escaped = "\\u00e9" * 40
    assert message == f'body: "{escaped}"... (1,000 characters) is given twice'
    assert len(response.content) < 400  # from a body of 4,000 bytes


def test_a_name_of_exactly_the_shown_length_given_twice_is_named_whole(client):
    # Only a name longer than MAX_NAME_SHOWN is cut short and its length said.
    name = "k" * 40
    raw = json.dumps({"prompt": "a", name: 1})[:-1] + f', "{name}": 2}}'
    response = client.post(
        "/v1/generate", content=raw, headers={"Content-Type": "application/json"}
    )
    message = assert_error(response, 422, "invalid_request")
    assert message == f'body: "{name}" is given twice'


@contextmanager
def python_recursion_limit(limit: int) -> Iterator[None]:
    """Python's recursion limit, which json.loads' nesting counts against, set for the
    server (it runs in this process): importing torch._dynamo, as earlier tests do,
    raises it to 2000, so a depth's outcome would depend on which tests ran before."""
    before = sys.getrecursionlimit()
    sys.setrecursionlimit(limit)
    try:
        yield
    finally:
        sys.setrecursionlimit(before)


def test_json_nested_too_deeply_to_parse_is_400_saying_so(client):
    deep = b'{"prompt": ' + b"[" * 1900 + b"]" * 1900 + b"}"  # under the body limit
    with python_recursion_limit(1000):
        response = client.post(
            "/v1/generate", content=deep, headers={"Content-Type": "application/json"}
        )
    message = assert_error(response, 400, "invalid_json")
    assert message == "the request body is nested too deeply"


@pytest.mark.parametrize("content_type", ["application/x-www-form-urlencoded", "text/plain"])
def test_json_sent_under_another_content_type_is_415_naming_the_header(client, content_type):
    # `curl -d '{...}'` without `-H` sends application/x-www-form-urlencoded.
    response = client.post(
        "/v1/generate", content=b'{"prompt": "hi"}', headers={"Content-Type": content_type}
    )
    message = assert_error(response, 415, "unsupported_media_type")
    assert "Content-Type: application/json" in message


def test_json_under_a_json_suffix_content_type_is_served(client):
    response = client.post(
        "/v1/generate",
        content=b'{"prompt": "hi", "max_tokens": 2}',
        headers={"Content-Type": "application/vnd.api+json"},
    )
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 2


def test_prompt_plus_max_tokens_beyond_the_context_is_400_with_both_numbers(client):
    response = client.post("/v1/generate", json={"prompt": "one two", "max_tokens": CONTEXT})
    message = assert_error(response, 400, "context_length_exceeded")
    assert f"max_tokens ({CONTEXT})" in message and f"context of {CONTEXT}" in message
    assert "prompt (" in message
    one_byte = client.post("/v1/generate", json={"prompt": "a", "max_tokens": CONTEXT})
    message = assert_error(one_byte, 400, "context_length_exceeded")
    # Short: tokenized, and counted exactly (the bound from its bytes says "at least").
    assert message == (
        f"prompt (1 token) + max_tokens ({CONTEXT}) exceeds the model's context of {CONTEXT} tokens"
    )


def test_a_prompt_and_max_tokens_filling_the_context_exactly_are_served(client):
    body = {"prompt": " the" * 10, "ignore_eos": True, "temperature": 0}  # 10 tokens
    served = client.post("/v1/generate", json=body | {"max_tokens": CONTEXT - 10})
    assert served.status_code == 200, served.text
    usage = served.json()["usage"]
    assert usage["prompt_tokens"] + usage["completion_tokens"] == CONTEXT
    one_more = client.post("/v1/generate", json=body | {"max_tokens": CONTEXT - 9})
    assert_error(one_more, 400, "context_length_exceeded")


def test_without_max_tokens_a_long_prompt_gets_what_the_context_leaves(client):
    # The default 128 does not fit after this prompt: the rest of the context does.
    body = {"prompt": " the" * (CONTEXT - 50), "ignore_eos": True}  # " the": one token
    for request in (body, body | {"max_tokens": None}):  # null, as OpenAI clients send it
        response = client.post("/v1/generate", json=request)
        assert response.status_code == 200, response.text
        usage = response.json()["usage"]
        assert usage["prompt_tokens"] > CONTEXT - 128
        assert usage["prompt_tokens"] + usage["completion_tokens"] == CONTEXT
        assert response.json()["finish_reason"] == "length"
    # A prompt that fills the context leaves nothing to generate.
    response = client.post("/v1/generate", json={"prompt": " x" * CONTEXT})  # 2 tokens each
    message = assert_error(response, 400, "context_length_exceeded")
    assert message.endswith(
        f"leaves no room to generate in the model's context of {CONTEXT} tokens"
    )


def test_prompt_too_long_in_bytes_alone_is_400_before_it_is_tokenized(tmp_path):
    tokenizer = english_tokenizer()
    longest = max(map(len, token_bytes(tokenizer)))  # as the server reads its tokenizer
    settings = Settings(
        checkpoint=random_checkpoint(tmp_path, tokenizer), max_body_bytes=64 * CONTEXT * longest
    )
    with running_server(settings) as url:
        for prompt, refused_by_bytes in [
            # More bytes than CONTEXT tokens of the longest: refused by its bytes, not tokens.
            ("a" * (CONTEXT * longest + 1), True),
            # As many bytes as could fit: tokenized, as it would be to serve, and counted.
            ("abcdefgh " * (CONTEXT * longest // 9), False),
            # More bytes as sent, but CRLF is tokenized as "\n": as many as could fit.
            ("\r\n" * (CONTEXT * longest // 2 + 1), False),
        ]:
            body = {"prompt": prompt, "max_tokens": 1}
            response = httpx.post(f"{url}/v1/generate", json=body, timeout=60)
            message = assert_error(response, 400, "context_length_exceeded")
            assert (f"{len(prompt)} bytes" in message) is refused_by_bytes, message
            assert ("at least" in message) is refused_by_bytes, message


@pytest.mark.parametrize(
    ("normalizer", "refused_by_bytes"),
    [
        ("the trainer's", False),  # CRLF read as "\n": its bytes counted as tokenized
        ("another", False),  # the same reading, as any normalizer: run to count them
        ("none", True),  # every byte is tokenized: more than could fit
    ],
)
def test_a_long_crlf_prompt_is_measured_as_the_tokenizer_reads_it(
    normalizer: str, refused_by_bytes: bool
) -> None:
    tokenizer = english_tokenizer()
    tokenizer.normalizer = {
        "the trainer's": tokenizer.normalizer,
        "another": normalizers.Sequence([crlf_as_newline()]),
        "none": None,
    }[normalizer]
    table = token_bytes(tokenizer)
    validator = Validator(tokenizer, table, max_context=CONTEXT, bos_id=0)
    prompt = "\r\n" * (CONTEXT * max(map(len, table)) // 2 + 1)  # fits only as "\n"s
    with pytest.raises(ApiError) as refused:
        validator.validate(GenerateRequest(prompt=prompt, max_tokens=1))
    assert refused.value.status_code == 400
    assert ("at least" in refused.value.message) is refused_by_bytes, refused.value.message


def test_a_long_prompt_of_lone_carriage_returns_is_refused_by_its_bytes() -> None:
    # The trainer's normalizer reads only CRLF as "\n": a lone "\r" is a byte tokenized as
    # it is, so a prompt of more than could fit is refused before it is tokenized.
    tokenizer = english_tokenizer()
    table = token_bytes(tokenizer)
    validator = Validator(tokenizer, table, max_context=CONTEXT, bos_id=0)
    prompt = "\r" * (CONTEXT * max(map(len, table)) + 1)
    with pytest.raises(ApiError) as refused:
        validator.validate(GenerateRequest(prompt=prompt, max_tokens=1))
    assert refused.value.status_code == 400
    assert "at least" in refused.value.message, refused.value.message


def test_the_openapi_schema_names_each_operation_once_with_the_errors_it_can_answer(client):
    schema = client.get("/openapi.json").json()
    operations = [op for methods in schema["paths"].values() for op in methods.values()]
    ids = [op["operationId"] for op in operations]
    assert len(ids) == len(set(ids)) == 8  # HEAD answers as GET, outside the schema
    responses = {
        path: set(ops["get"]["responses"]) for path, ops in schema["paths"].items() if "get" in ops
    }
    assert {"200", "503"} <= responses["/health"] and "401" not in responses["/health"]
    assert {"200", "401", "503"} <= responses["/v1/models"]
    components = schema["components"]["schemas"]
    # Integer bounds stay integers: 2**63 - 1 as a float would be 2**63, a 422 here.
    for request in ("GenerateRequest", "CompletionRequest", "ChatCompletionRequest"):
        assert {"maximum": 2**63 - 1, "minimum": 0, "type": "integer"} in (
            components[request]["properties"]["seed"]["anyOf"]
        )
    # Each SSE event's data names its model, which the components hold.
    streams = [
        ("/v1/generate", StreamChunk),
        ("/v1/completions", Completion),
        ("/v1/chat/completions", ChatCompletionChunk),
    ]
    for path, chunk in streams:
        stream = schema["paths"][path]["post"]["responses"]["200"]["content"]
        data = stream["text/event-stream"]["itemSchema"]["properties"]["data"]
        json_event, done = data["anyOf"]
        refs = [one["$ref"].rsplit("/", 1)[1] for one in json_event["contentSchema"]["anyOf"]]
        assert refs == [chunk.__name__, "ErrorResponse"] and done == {"const": "[DONE]"}
        assert set(components[chunk.__name__]["properties"]) == set(chunk.model_fields)
    for path in ("/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"):
        # another model
        assert "404" in schema["paths"][path]["post"]["responses"], path


def test_with_a_key_the_docs_are_open_and_the_schema_says_which_routes_need_it(base_url):
    schema = httpx.get(f"{base_url}/openapi.json").json()  # no key: a browser's request
    assert schema["components"]["securitySchemes"]["bearerAuth"] == {
        "type": "http",
        "scheme": "bearer",
    }
    keyed = {
        "/v1/generate": "post",
        "/v1/completions": "post",
        "/v1/chat/completions": "post",
        "/tokenize": "post",
        "/detokenize": "post",
        "/v1/models": "get",
        "/v1/models/{model_id}": "get",
    }
    for path, methods in schema["paths"].items():
        for method, operation in methods.items():
            needs_key = keyed.get(path) == method
            assert (operation.get("security") == [{"bearerAuth": []}]) == needs_key, (path, method)
    # Every page of the docs opens in a browser, which sends no key: ReDoc, and the page
    # Swagger UI's Authorize returns to.
    for page in ("/docs", "/redoc", "/docs/oauth2-redirect"):
        assert httpx.get(f"{base_url}{page}").status_code == 200, page
    assert httpx.get(f"{base_url}/v1/models").status_code == 401


def test_head_is_served_where_get_is(client):
    for path in ("/health", "/v1/models", "/metrics", "/docs", "/openapi.json"):
        response = client.head(path)
        assert response.status_code == 200 and response.content == b"", path


def test_openais_sdk_sends_the_api_key_as_the_server_asks(base_url):
    # The SDK's api_key is the server's --api-key: it goes as `Authorization: Bearer`.
    with openai.OpenAI(base_url=f"{base_url}/v1", api_key=API_KEY, max_retries=0) as sdk:
        [model] = sdk.models.list().data
        completion = sdk.completions.create(model=model.id, prompt="x", max_tokens=2)
        assert completion.usage.completion_tokens <= 2
    with (
        openai.OpenAI(base_url=f"{base_url}/v1", api_key="wrong", max_retries=0) as sdk,
        pytest.raises(openai.AuthenticationError) as refused,
    ):
        sdk.completions.create(model=model.id, prompt="x", max_tokens=2)
    assert refused.value.body["type"] == "authentication_error"


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}],
    ids=["missing", "wrong key", "no Bearer scheme"],
)
def test_missing_or_wrong_api_key_is_401(base_url, headers):
    for method, path in [
        ("POST", "/v1/generate"),
        ("POST", "/v1/completions"),
        ("POST", "/v1/chat/completions"),
        ("POST", "/tokenize"),
        ("POST", "/detokenize"),
        ("GET", "/v1/models"),
        ("GET", "/v1/models/any"),
        ("GET", "/metrics"),
    ]:
        response = httpx.request(method, base_url + path, json={"prompt": "x"}, headers=headers)
        assert_error(response, 401, "authentication_error")
        assert response.headers["WWW-Authenticate"] == "Bearer"
    assert httpx.get(base_url + "/health").status_code == 200  # probes need no key


def test_body_over_the_limit_is_413_by_length_or_by_bytes_sent(client):
    big = {"prompt": "x" * BODY_LIMIT}
    assert_error(client.post("/v1/generate", json=big), 413, "request_too_large")

    def chunks() -> Iterator[bytes]:  # no Content-Length: chunked transfer encoding
        yield b'{"prompt": "'
        for _ in range(BODY_LIMIT // 512 + 1):
            yield b"y" * 512
        yield b'"}'

    response = client.post(
        "/v1/generate", content=chunks(), headers={"Content-Type": "application/json"}
    )
    assert_error(response, 413, "request_too_large")


def test_a_body_refused_unread_closes_the_connection(base_url):
    # Declared, never sent: kept alive, the connection would read the client's next
    # request (here sent at once behind it) as this body's bytes, and leave it unanswered.
    auth = f"Authorization: Bearer {API_KEY}\r\n".encode()
    head = b"POST /v1/generate HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
    following = b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n"
    for request, status in (
        (head + auth + b"Content-Length: 2000000\r\n\r\n", b"413"),
        (head + b"Content-Length: 100\r\n\r\n", b"401"),  # no key
    ):
        answer_head, body = raw_answer(base_url, request + following)
        assert answer_head.split()[1] == status and b"connection: close" in answer_head
        assert b"HTTP/1.1" not in body  # one answer: the client knows to ask again elsewhere


def test_a_client_still_uploading_a_refused_body_reads_the_answer(base_url):
    # 413 by Content-Length comes at once; the 2 MB behind the head are still on their
    # way. Closed with them unread, the socket reset the connection, and the client
    # still sending lost the answer.
    head = b"POST /v1/generate HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
    auth = f"Authorization: Bearer {API_KEY}\r\n".encode()
    body = b'{"prompt": "' + b"z" * 2_000_000 + b'"}'
    request = head + auth + f"Content-Length: {len(body)}\r\n\r\n".encode() + body
    answer_head, answer = raw_answer(base_url, request)
    assert answer_head.split()[1] == b"413"
    assert json.loads(answer)["error"]["type"] == "request_too_large"


def test_a_client_still_sending_a_refused_head_reads_the_431(base_url):
    # h11 refuses the head once it holds more than the limit; megabytes more follow.
    head = b"GET /v1/models HTTP/1.1\r\nHost: localhost\r\nX-Filler: " + b"h" * 4_000_000
    answer_head, answer = raw_answer(base_url, head + b"\r\n\r\n")
    assert answer_head.split()[1] == b"431"
    assert json.loads(answer)["error"]["type"] == "request_header_fields_too_large"


def test_request_head_over_the_limit_is_431_on_every_route(base_url, client):
    too_large = "request_header_fields_too_large"
    under = {"X-Filler": "a" * (HEADER_LIMIT // 2)}
    assert client.get("/v1/models", headers=under).status_code == 200
    over = {"X-Filler": "a" * HEADER_LIMIT}
    for method, path in (("GET", "/v1/models"), ("POST", "/v1/generate"), ("GET", "/health")):
        assert_error(
            client.request(method, path, headers=over, json={"prompt": "x"}), 431, too_large
        )
    # Checked before the API key: without one the answer is still 431, not 401.
    assert_error(httpx.get(base_url + "/v1/models", headers=over), 431, too_large)
    long_query = client.get("/v1/models", params={"q": "b" * HEADER_LIMIT})
    assert_error(long_query, 431, too_large)
    # Counted in bytes on the wire, as h11 counts a head still arriving: short headers
    # (18 bytes of name and value, 22 sent) whose names and values alone fit (5,526 bytes),
    # but not with their `: ` and CRLFs.
    many = {f"X-H{i:03d}": "v" * 12 for i in range(HEADER_LIMIT // 20)}
    assert sum(len(name) + len(value) for name, value in many.items()) < HEADER_LIMIT
    assert_error(client.get("/v1/models", headers=many), 431, too_large)


def test_a_head_of_exactly_the_limit_is_served_and_one_byte_more_is_431(base_url):
    # Counted as sent: request line (its query's `?` too), `name: value` CRLF per
    # header, and the blank line. One byte over, the head is refused by the middleware
    # whatever the network does: h11 refuses only a head still incomplete past the limit.
    def head(size: int, request_line: bytes = b"GET /health?q=1 HTTP/1.1") -> bytes:
        start = request_line + b"\r\nHost: localhost\r\nConnection: close\r\n"
        filler_line = b"X-Filler: \r\n"
        filler = b"f" * (size - len(start) - len(filler_line) - len(b"\r\n"))
        return start + filler_line[:-2] + filler + b"\r\n\r\n"

    assert len(head(HEADER_LIMIT)) == HEADER_LIMIT
    status, answer = raw_exchange(base_url, head(HEADER_LIMIT))
    assert status == 200, answer
    status, answer = raw_exchange(base_url, head(HEADER_LIMIT + 1))
    assert status == 431 and answer["error"]["type"] == "request_header_fields_too_large"
    # The refusal of a generate request is counted, as the app's own answers are.
    keyed = {"Authorization": f"Bearer {API_KEY}"}
    refused = ("pocketgpt_requests_total", (("status", "431"),))
    before = metric_samples(base_url, keyed).get(refused, 0)
    status, _ = raw_exchange(base_url, head(HEADER_LIMIT + 1, b"POST /v1/generate HTTP/1.1"))
    assert status == 431
    assert metric_samples(base_url, keyed)[refused] == before + 1


def raw_answer(base_url: str, request: bytes) -> tuple[bytes, bytes]:
    """Send bytes as they are (no client would send these); the answer's head (lower
    case) and body, read until the server closes."""
    host, port = base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    return head.lower(), body


def raw_exchange(base_url: str, request: bytes) -> tuple[int, dict]:
    """The status and JSON body `raw_answer` gets."""
    head, body = raw_answer(base_url, request)
    assert b"content-type: application/json" in head, (head, body)
    return int(head.split()[1]), json.loads(body)


# A keyed POST /v1/generate whose body follows in chunks (`chunked`), on a connection
# the server then closes.
CHUNKED_GENERATE = (
    b"POST /v1/generate HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
    + f"Authorization: Bearer {API_KEY}\r\nConnection: close\r\n".encode()
    + b"Transfer-Encoding: chunked\r\n\r\n"
)


def chunked(pieces: list[bytes]) -> bytes:
    """`pieces` in the chunked transfer coding, one chunk each, then the last chunk."""
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"


def test_a_body_in_many_tiny_chunks_is_413_and_one_in_a_few_small_chunks_is_served(base_url):
    # h11 parses each chunk in Python: a megabyte of 1-byte chunks held the event loop
    # (every stream) for seconds. Past 1,024 small pieces a body is refused.
    body = json.dumps({"prompt": "x", "max_tokens": 1}).encode() + b" " * 2000
    head = CHUNKED_GENERATE
    tiny = [body[i : i + 1] for i in range(len(body))]
    status, answer = raw_exchange(base_url, head + chunked(tiny))
    assert status == 413 and answer["error"] == {
        "type": "request_too_large",
        "message": "the request body came in more than 1024 small pieces",
    }
    status, answer = raw_exchange(base_url, head + chunked([body[:5], body[5:900], body[900:]]))
    assert status == 200 and answer["usage"]["completion_tokens"] == 1
    # The count is each request's: on a kept-alive connection, requests of 800 small
    # pieces each are all served.
    keep_alive = head.replace(b"Connection: close", b"Connection: keep-alive")
    requests = [keep_alive + chunked([*tiny[:800], body[800:]])] * 2 + [head + chunked(tiny)]
    host, port = base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        for request in requests:
            sock.sendall(request)  # each answered before the next is sent: no pipelining
            answer = sock.recv(65536)
            while b'"usage"' not in answer and b'"error"' not in answer:
                answer += sock.recv(65536)
            assert answer.startswith(
                b"HTTP/1.1 200" if request is not requests[-1] else b"HTTP/1.1 413"
            )


def test_a_server_on_loopback_answers_localhost_names_only(base_url, tmp_path):
    # DNS rebinding: a page at attacker.example, re-resolved to 127.0.0.1, sends its own
    # name as Host. Whatever the path and whatever the key, it is refused.
    port = base_url.rsplit(":", 1)[1]
    keyed = {"Authorization": f"Bearer {API_KEY}"}
    # After the last colon comes a port, or the text is part of the name (refused).
    refused_hosts = ("attacker.example", f"attacker.example:{port}", "127.0.0.1.nip.io")
    for host in (*refused_hosts, "localhost:evil.example"):
        for path in ("/health", "/v1/models"):
            refused = httpx.get(base_url + path, headers={**keyed, "Host": host})
            message = assert_error(refused, 400, "invalid_host")
            assert "--allowed-hosts" in message
    for host in (f"localhost:{port}", "LOCALHOST.", f"127.0.0.1:{port}", f"[::1]:{port}"):
        assert httpx.get(base_url + "/v1/models", headers={**keyed, "Host": host}).is_success
    # Behind a proxy that sends its own name, that name is listed (written as a Host
    # header may be); * lets any through; bound beyond loopback (the image's 0.0.0.0),
    # none is checked unless listed.
    checkpoint = random_checkpoint(tmp_path, english_tokenizer())
    cases = (
        ({"allowed_hosts": "Chat.Example.com., proxy.example:8443"}, "chat.example.com:443"),
        ({"allowed_hosts": "Chat.Example.com., proxy.example:8443"}, "PROXY.example"),
        ({"allowed_hosts": "*"}, "any.where"),
        ({"host": "0.0.0.0"}, "any.where"),
    )
    for given, served in cases:
        settings = Settings(checkpoint=checkpoint, **given)
        with running_server(settings) as url:
            assert httpx.get(url + "/v1/models", headers={"Host": served}).is_success
            assert httpx.get(url + "/v1/models").is_success  # 127.0.0.1: always
            if given.get("allowed_hosts", "*") != "*":
                other = httpx.get(url + "/v1/models", headers={"Host": "attacker.example"})
                assert_error(other, 400, "invalid_host")
    with pytest.raises(ValueError, match="must name at least one host"):
        Settings(checkpoint=checkpoint, allowed_hosts=" , ")


def preflight(url: str, origin: str, **asked: str) -> httpx.Response:
    """A browser's CORS preflight for a POST from a page at `origin`: it carries no key."""
    headers = {"Origin": origin, "Access-Control-Request-Method": "POST", **asked}
    return httpx.options(url + "/v1/generate", headers=headers)


def test_a_page_at_a_listed_origin_may_call_the_server_with_its_key(base_url, tmp_path):
    page, other = "https://app.example", "https://attacker.example"
    body = {"prompt": "Hello", "max_tokens": 2, "seed": 1}
    keyed = {"Authorization": f"Bearer {API_KEY}"}
    # Unlisted (the default): no CORS header on any answer, so a browser hides it; the
    # preflight finds the key missing.
    assert_error(preflight(base_url, page), 401, "authentication_error")
    plain = httpx.post(base_url + "/v1/generate", json=body, headers={**keyed, "Origin": page})
    assert plain.is_success and "access-control-allow-origin" not in plain.headers

    checkpoint = random_checkpoint(tmp_path, english_tokenizer())
    origins = " HTTPS://App.Example , http://localhost:3000,"  # as written by hand
    settings = Settings(checkpoint=checkpoint, api_key=API_KEY, cors_origins=origins)
    with running_server(settings) as url:
        # Any header the page asks to send (the key, an SDK's own), and to this machine.
        asked = {
            "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os",
            "Access-Control-Request-Private-Network": "true",
        }
        allowed = preflight(url, page, **asked)
        assert allowed.status_code == 200
        assert allowed.headers["access-control-allow-origin"] == page
        assert (
            allowed.headers["access-control-allow-headers"]
            == asked["Access-Control-Request-Headers"]
        )
        assert "POST" in allowed.headers["access-control-allow-methods"].split(", ")
        assert allowed.headers["access-control-allow-private-network"] == "true"
        assert preflight(url, "http://localhost:3000").status_code == 200
        # A keyed GET or HEAD (GET /v1/models) is preflighted too: the key is no simple
        # header.
        for method in ("GET", "HEAD"):
            method_asked = {**asked, "Access-Control-Request-Method": method}
            assert preflight(url, page, **method_asked).status_code == 200, method
        # The requests themselves: each answer names the page, a refusal too (so the page
        # can read why), a stream too.
        answer = httpx.post(url + "/v1/generate", json=body, headers={**keyed, "Origin": page})
        assert answer.is_success and answer.headers["access-control-allow-origin"] == page
        keyless = httpx.post(url + "/v1/generate", json=body, headers={"Origin": page})
        assert_error(keyless, 401, "authentication_error")
        assert keyless.headers["access-control-allow-origin"] == page
        streamed = {**body, "stream": True}
        with httpx.stream(
            "POST", url + "/v1/generate", json=streamed, headers={**keyed, "Origin": page}
        ) as stream:
            assert stream.headers["access-control-allow-origin"] == page
            assert list(sse_events(stream))[-1] == "[DONE]"
        # Another origin: its preflight refused in the envelope, saying what; its answers
        # carry no CORS header.
        refused = preflight(url, other)
        message = assert_error(refused, 400, "cors_refused")
        assert "its origin not allowed" in message and "--cors-origins" in message
        assert "access-control-allow-origin" not in refused.headers
        assert_error(
            preflight(url, page, **{"Access-Control-Request-Method": "DELETE"}), 400, "cors_refused"
        )
        theirs = httpx.post(url + "/v1/generate", json=body, headers={**keyed, "Origin": other})
        assert theirs.is_success and "access-control-allow-origin" not in theirs.headers
    with running_server(Settings(checkpoint=checkpoint, cors_origins="*")) as url:
        assert preflight(url, other).headers["access-control-allow-origin"] == "*"


@pytest.mark.parametrize(
    ("origins", "message"),
    [
        ("http://localhost:3000/", "'http://localhost:3000/' is no origin"),
        ("app.example", "'app.example' is no origin"),
        ("https://app.example/ui?x=1", "'https://app.example/ui?x=1' is no origin"),
        # No path, yet something after the host all the same: no Origin header has it.
        ("https://app.example?x=1", "'https://app.example?x=1' is no origin"),
        ("https://app.example#top", "'https://app.example#top' is no origin"),
        (" , ", "must name at least one origin"),
    ],
)
def test_cors_origins_are_refused_unless_written_as_a_browser_sends_them(origins, message):
    # A trailing slash or a path would match no page's Origin header: said at start.
    with pytest.raises(ValueError, match=re.escape(message)):
        Settings(checkpoint="unused", cors_origins=origins)


@pytest.mark.parametrize("host", ["localhost", "127.0.0.2", "::1"])
def test_a_loopback_host_by_any_name_or_address_lets_localhost_names_and_itself_in(host):
    # Bound to 127.0.0.2, the server is reached as 127.0.0.2; by the name localhost, it
    # is as open to DNS rebinding as on 127.0.0.1 and checked alike.
    names = Settings(checkpoint="unused", host=host).allowed_host_names()
    assert names == {"localhost", "127.0.0.1", "::1", host}


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.1", "server.example"])
def test_a_host_beyond_loopback_or_by_a_name_checks_no_host_header_unless_listed(host):
    # Bound beyond this machine, any name may reach it; bound by a name other than
    # localhost, that name may resolve anywhere: no Host is checked by default.
    assert Settings(checkpoint="unused", host=host).allowed_host_names() is None
    listed = Settings(checkpoint="unused", host=host, allowed_hosts="chat.example")
    assert listed.allowed_host_names() == {"chat.example", "localhost", "127.0.0.1", "::1"}


def test_a_host_given_with_spaces_around_it_is_the_loopback_it_names():
    # POCKETGPT_HOST= 127.0.0.1 (a stray space in an env file): read as no address, it
    # would bind nothing or, not taken for loopback, check no Host at all.
    settings = Settings(checkpoint="unused", host=" 127.0.0.1 ")
    assert settings.host == "127.0.0.1"
    assert settings.allowed_host_names() == {"localhost", "127.0.0.1", "::1"}


def test_a_stray_comma_in_allowed_hosts_lets_no_empty_host_in(tmp_path):
    # "chat.example," (a list edited by hand) names one host: the empty name after the
    # comma is none, else an empty Host header would pass the check.
    checkpoint = random_checkpoint(tmp_path, english_tokenizer())
    with running_server(Settings(checkpoint=checkpoint, allowed_hosts="chat.example,")) as url:
        assert httpx.get(url + "/health", headers={"Host": "chat.example"}).is_success
        status, body = raw_exchange(url, b"GET /health HTTP/1.1\r\nHost: \r\n\r\n")
        assert status == 400 and body["error"]["type"] == "invalid_host", body


def test_what_uvicorn_refuses_before_the_app_is_in_the_envelope_too(base_url):
    # A head still incomplete past the limit: h11 stops buffering it, uvicorn answers.
    unfinished = b"GET /health HTTP/1.1\r\nHost: localhost\r\nX-Filler: " + b"a" * (
        2 * HEADER_LIMIT
    )
    head, body = raw_answer(base_url, unfinished)
    # The status line's reason is the status's own, as in every other answer.
    assert head.startswith(b"http/1.1 431 request header fields too large\r\n")
    assert b"connection: close" in head
    assert json.loads(body)["error"] == {
        "type": "request_header_fields_too_large",
        "message": f"the request head exceeds {HEADER_LIMIT} bytes",  # h11's bound is ours
    }
    status, body = raw_exchange(base_url, b"NOT HTTP AT ALL\r\n\r\n")
    assert status == 400 and body["error"]["type"] == "invalid_http"


def test_an_invalid_head_arriving_with_a_long_body_is_400_not_431(base_url):
    # The head is short and malformed (a space in a header name); the body that came in
    # the same read, unparsed behind it, is no part of the head.
    body = b"x" * 2 * HEADER_LIMIT
    head = b"POST /v1/generate HTTP/1.1\r\nHost: localhost\r\nBad Header: x\r\n"
    head += f"Content-Length: {len(body)}\r\n\r\n".encode()
    status, answer = raw_exchange(base_url, head + body)
    assert status == 400 and answer["error"] == {
        "type": "invalid_http",
        "message": "the request is not valid HTTP/1.1",
    }


def test_a_websocket_upgrade_is_served_as_plain_http_through_every_guard(tmp_path, capfd):
    # No route is a WebSocket. Where websockets or wsproto is installed, uvicorn upgraded
    # such a request past the Host and key guards to a plain-text 403; elsewhere it logged
    # two warnings for each, one advising to install a WebSocket library.
    checkpoint = random_checkpoint(tmp_path, english_tokenizer())
    upgrade = (
        "Connection: close, Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    )
    with running_server(Settings(checkpoint=checkpoint, api_key=API_KEY)) as url:

        def upgrading(path: str, host: str = "localhost", key: bool = True) -> tuple[int, dict]:
            authorization = f"Authorization: Bearer {API_KEY}\r\n" if key else ""
            head = f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{authorization}{upgrade}\r\n"
            return raw_exchange(url, head.encode())

        status, body = upgrading("/v1/models", key=False)
        assert status == 401 and body["error"]["type"] == "authentication_error"
        status, body = upgrading("/health", host="attacker.example")
        assert status == 400 and body["error"]["type"] == "invalid_host"
        status, body = upgrading("/v1/generate")
        assert status == 405 and body["error"]["type"] == "method_not_allowed"
        status, body = upgrading("/v1/models")
        assert status == 200 and body["object"] == "list"
    log = capfd.readouterr().err
    assert "Unsupported upgrade" not in log and "WebSocket library" not in log, log


def absolute_form(target: str, host: str | None = "localhost", body: bytes = b"") -> bytes:
    """A keyed request for `target` as a proxy sends it (`GET http://host/path`), with
    `host` as its Host header (none: HTTP/1.0 without one), that closes the connection."""
    method, version = ("POST", "1.1") if body else ("GET", "1.1" if host else "1.0")
    head = f"{method} {target} HTTP/{version}\r\nAuthorization: Bearer {API_KEY}\r\n"
    head += f"Host: {host}\r\n" if host else ""
    if body:
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    return f"{head}Connection: close\r\n\r\n".encode() + body


def test_an_absolute_form_target_is_served_as_the_path_it_names(base_url):
    # RFC 9112 3.2.2: a server MUST accept it (proxies, some clients send it); uvicorn took
    # the whole URL for the path, a 404.
    authority = base_url.removeprefix("http://")
    body = json.dumps({"prompt": "x", "max_tokens": 2}).encode()
    status, answer = raw_exchange(
        base_url, absolute_form(f"http://{authority}/v1/generate", authority, body)
    )
    assert status == 200 and answer["usage"]["completion_tokens"] == 2, answer
    # The scheme and host in any case, a query, https (a TLS proxy's): each the same path.
    for target in (
        f"HTTP://LOCALHOST:{authority.split(':')[1]}/v1/models?limit=1",
        "https://localhost/v1/models",
    ):
        status, answer = raw_exchange(base_url, absolute_form(target))
        assert status == 200 and answer["object"] == "list", (target, answer)
    # An empty path is "/" (RFC 9110 4.2.3), which is no route here.
    status, answer = raw_exchange(base_url, absolute_form(f"http://{authority}"))
    assert status == 404 and answer["error"]["type"] == "not_found"


def test_an_absolute_form_target_keeps_its_fragment_as_the_origin_form_one_does(base_url):
    # A client sends no fragment; one that does gets the same answer in either form:
    # the fragment stays part of the path (no route), it is not cut off to serve one.
    auth = f"Authorization: Bearer {API_KEY}\r\n"
    origin = f"GET /v1/models#x HTTP/1.1\r\nHost: localhost\r\n{auth}Connection: close\r\n\r\n"
    for request in (origin.encode(), absolute_form("http://localhost/v1/models#x")):
        status, answer = raw_exchange(base_url, request)
        assert status == 404 and answer["error"]["type"] == "not_found", (request, answer)


def test_the_query_of_an_absolute_form_target_counts_toward_the_head_limit(base_url):
    # Read as the origin-form target it names, query and all: no way past the head bound.
    target = f"http://localhost/v1/models?q={'b' * HEADER_LIMIT}"
    status, answer = raw_exchange(base_url, absolute_form(target))
    assert status == 431 and answer["error"]["type"] == "request_header_fields_too_large"


def test_the_host_of_an_absolute_form_target_is_checked_in_place_of_the_host_header(base_url):
    # RFC 9112 3.2.2: the target's host replaces Host. The allowed-hosts check judges it,
    # so the form is no way around that check: whatever Host says, and without one.
    for host in ("localhost", "attacker.example", None):
        status, answer = raw_exchange(
            base_url, absolute_form("http://attacker.example/health", host)
        )
        assert status == 400 and answer["error"]["type"] == "invalid_host", (host, answer)
        assert "'attacker.example'" in answer["error"]["message"]
        status, answer = raw_exchange(base_url, absolute_form("http://localhost/health", host))
        assert status == 200 and answer == {"status": "ready"}, (host, answer)


@pytest.mark.parametrize(
    ("target", "why"),
    [
        ("http://", "it names no host"),
        ("http:///health", "it names no host"),
        ("http:health", "it names no host"),
        ("ftp://localhost/health", "its scheme is 'ftp', not http or https"),
        ("localhost:8000", "its scheme is 'localhost', not http or https"),
        ("http://user@localhost/health", "it gives user info before its host"),
        ("http://localhost:99999/health", "its host or port is malformed"),
        ("http://localhost:port/health", "its host or port is malformed"),
        ("http://[::1/health", "its host or port is malformed"),
    ],
)
def test_an_absolute_form_target_that_is_no_http_url_is_400_in_the_envelope(base_url, target, why):
    # Answered, never a 500, and the connection closed (raw_exchange reads to its end),
    # also with a body the server did not read.
    body = json.dumps({"prompt": "x", "max_tokens": 1}).encode()
    for request in (absolute_form(target), absolute_form(target, body=body)):
        status, answer = raw_exchange(base_url, request)
        message = f"the request target is not a valid http(s) URL: {why}"
        assert status == 400 and answer == {"error": {"type": "invalid_http", "message": message}}


def test_a_request_not_sent_whole_in_time_is_408_and_a_long_answer_is_not_cut(tmp_path):
    # A fifth of a second: the 900-token stream below outlasts it several times over.
    timeout = 0.2
    checkpoint = random_checkpoint(tmp_path, english_tokenizer())
    settings = Settings(checkpoint=checkpoint, request_timeout=timeout)
    with running_server(settings, send_buffer=4096) as url:
        # Slow clients (slowloris) held their connections for good: part of a head, or a
        # body shorter than its Content-Length, is answered 408 and the connection closed.
        head = b"POST /v1/generate HTTP/1.1\r\nHost: localhost\r\n"
        short_body = head + b"Content-Length: 100\r\n\r\n" + b'{"prompt": '
        for sent in (head, short_body):
            status, body = raw_exchange(url, sent)
            assert status == 408 and body["error"]["type"] == "request_timeout", sent
            assert f"within {timeout:g} s" in body["error"]["message"]
        # Answered mid-head, the client still sending the rest is not reset: the
        # connection lingers, reading what it sends, as for one refused mid-body.
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=30) as slow:
            slow.sendall(head)
            answer = b""
            while chunk := slow.recv(65536):  # the 408, then the end of the server's side
                answer += chunk
            assert answer.startswith(b"HTTP/1.1 408 "), answer
            for line in range(2):  # a reset fails the second, if not the first
                slow.sendall(b"X-Late-%d: y\r\n" % line)
        # A connection that sends nothing is closed without an answer: on an idle
        # keep-alive connection one could be read as the answer to the client's next request.
        with socket.create_connection((host, int(port)), timeout=30) as silent:
            assert silent.recv(65536) == b""

        # The limit is on a request's arrival, not its answer: a stream that outlasts it
        # runs to its end, and the connection then serves the next request.
        with httpx.Client(base_url=url, timeout=60) as client:
            request = {"prompt": "x", "max_tokens": 900, "ignore_eos": True, "stream": True}
            started = time.monotonic()
            with client.stream("POST", "/v1/generate", json=request) as response:
                *_, last, done = sse_events(response)
            streamed = time.monotonic() - started
            assert streamed > timeout, f"the stream took {streamed:.2f} s: lengthen it"
            assert done == "[DONE]" and last["usage"]["completion_tokens"] == 900
            assert client.get("/v1/models").status_code == 200

        # A client that stops reading a stream held its connection, and the stream's
        # undelivered outputs, for good (its request ran on to its end): one that reads
        # nothing of what waits for it for as long is disconnected, its request cancelled.
        cancelled, length = (
            ("pocketgpt_request_finished_total", (("reason", reason),))
            for reason in ("cancelled", "length")
        )

        def ended() -> bool:
            now = metric_samples(url)
            return now[cancelled] + now[length] > before[cancelled] + before[length]

        request = {"prompt": "x", "max_tokens": 900, "ignore_eos": True, "stream": True}
        # So is one that reads some at first, then stops: each read gives it as long
        # again from what it left waiting, not from what waited when the writes paused.
        for reads in (0, 10):
            before = metric_samples(url)
            with completion_on_a_small_window(url, {**request, "logprobs": 5}) as stalled:
                for _ in range(reads):
                    assert stalled.recv(4096)
                    time.sleep(timeout / 4)  # the client's pace, not a wait for the server
                wait_until(ended, 30, "the request ended")
                assert metric_samples(url)[cancelled] == before[cancelled] + 1, reads
                # Reset, not closed: a close leaves the kernel sending the rest for as
                # long as the client holds the connection, and ends it as a whole answer
                # would.
                received = b""
                with pytest.raises(ConnectionResetError):
                    while chunk := stalled.recv(65536):
                        received += chunk
                assert b"data: [DONE]" not in received


@contextlib.contextmanager
def completion_on_a_small_window(url: str, request: dict) -> Iterator[socket.socket]:
    """A raw connection to `url` that has sent /v1/completions `request`, its receive
    buffer a few kilobytes: unread, the answer fills it (and the server's small send
    buffer) at once."""
    payload = json.dumps(request).encode()
    head = (
        "POST /v1/completions HTTP/1.1\r\nHost: localhost\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
    )
    host, port = url.removeprefix("http://").split(":")
    with socket.socket() as client:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        client.settimeout(30)
        client.connect((host, int(port)))
        client.sendall(head.encode() + payload)
        yield client


def test_a_long_answer_read_slowly_arrives_whole(tmp_path):
    # A client on a slow link reads a long answer for longer than the server keeps an idle
    # connection: the close that ended it then dropped the answer's unread rest after 2 s
    # (a clean end of the connection, before its Content-Length), as for a client still
    # sending a refused request. It is sent whole, then the connection closes.
    timeout = 0.5
    checkpoint = random_checkpoint(tmp_path, english_tokenizer())
    settings = Settings(checkpoint=checkpoint, request_timeout=timeout)
    with running_server(settings, send_buffer=4096) as url:
        # ~240 kB of logprobs: ~3 s at 8 kB every 0.1 s, each read well within the timeout.
        request = {"prompt": "x", "n": 4, "max_tokens": 300, "logprobs": 5, "ignore_eos": True}
        with completion_on_a_small_window(url, request) as slow:
            answer = b""
            started = time.monotonic()
            while chunk := slow.recv(8192):
                answer += chunk
                time.sleep(0.1)  # the client's pace, not a wait for the server
            took = time.monotonic() - started
        answer_head, _, body = answer.partition(b"\r\n\r\n")
        assert answer_head.startswith(b"HTTP/1.1 200 "), answer_head
        length = int(re.search(rb"content-length: (\d+)", answer_head.lower())[1])
        assert took > timeout + 2.5, f"read in {took:.1f} s: lengthen the answer"
        assert len(body) == length and json.loads(body)["object"] == "text_completion"
        # One that reads nothing of an answer too short to pause the server's writes is
        # reset once the idle connection closes and it still reads nothing for as long:
        # closed plainly, the connection waited on it for as long as it held it open.
        request = {"prompt": "x", "max_tokens": 150, "logprobs": 5, "ignore_eos": True}
        with completion_on_a_small_window(url, request) as stalled:
            wait_until(lambda: tcp_state(stalled) == TCP_CLOSE, 10, "the connection reset")
            with pytest.raises(ConnectionResetError):
                while stalled.recv(65536):
                    pass


TCP_CLOSE = 7  # include/net/tcp_states.h


def tcp_state(sock: socket.socket) -> int:
    """The kernel's TCP state of `sock` (struct tcp_info's first byte): CLOSE once reset."""
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]


def test_unknown_path_is_404_and_wrong_method_is_405_in_the_envelope(client):
    assert assert_error(client.get("/v1/nothing"), 404, "not_found") == "Not Found"
    # A trailing slash is another path: 404, not Starlette's empty 307 to the one without.
    assert_error(client.get("/health/"), 404, "not_found")
    assert_error(client.post("/v1/generate/", json={"prompt": "x"}), 404, "not_found")
    # Allow names every method the path answers (GET and HEAD are two routes there).
    for method, path, allowed in [
        ("GET", "/v1/generate", "POST"),
        ("DELETE", "/health", "GET, HEAD"),
        ("POST", "/v1/models", "GET, HEAD"),
        ("POST", "/docs", "GET, HEAD"),
        ("POST", "/metrics", "GET, HEAD"),
    ]:
        response = client.request(method, path)
        assert assert_error(response, 405, "method_not_allowed") == "Method Not Allowed"
        assert response.headers["Allow"] == allowed, (method, path)


def test_a_body_of_many_unknown_names_is_refused_whole_in_a_short_answer(client):
    # Listing each unknown name cost the event loop ~0.3 s for a megabyte of them, and
    # answered megabytes; an object with more names than a request has fields is refused,
    # but a logit_bias, of up to 300 tokens.
    bound = "and a logit_bias at most 300 tokens"
    for names in (400, 25):
        body = {"prompt": "x"} | {f"k{i}": 0 for i in range(names)}
        response = client.post("/v1/generate", json=body)
        message = assert_error(response, 422, "invalid_request")
        assert message == f"body: an object of {names + 1} names; a request has 14 fields, {bound}"
        response = client.post("/v1/completions", json=body)  # each route counts its own
        message = assert_error(response, 422, "invalid_request")
        assert message == f"body: an object of {names + 1} names; a request has 22 fields, {bound}"
    for tokens, taken in [(300, True), (301, False)]:
        bias = {"prompt": "x", "max_tokens": 1, "logit_bias": {str(i): 1 for i in range(tokens)}}
        response = client.post("/v1/generate", json=bias)
        if taken:
            assert response.status_code == 200, response.text
        else:
            message = assert_error(response, 422, "invalid_request")
            assert message == f"body: an object of 301 names; a request has 14 fields, {bound}"
    # Many small objects: each field given one by mistake is named by its own message...
    every_one_wrong = {"prompt": {}, "max_tokens": {}, "stop": [{}]}
    message = assert_error(
        client.post("/v1/generate", json=every_one_wrong), 422, "invalid_request"
    )
    assert "prompt: " in message and "max_tokens: " in message and "stop" in message
    # ... up to 1,024 objects in all; past that, refused whole.
    for inner, whole in [(1023, False), (1024, True)]:
        many = {"prompt": "x", "stop": [{}] * inner}
        message = assert_error(client.post("/v1/generate", json=many), 422, "invalid_request")
        assert message.startswith("body: more than 1024 JSON objects; a request is one") is whole
    # A request giving every field is served.
    every_field = {
        "prompt": "x",
        "max_tokens": 1,
        "temperature": 0.5,
        "top_p": 0.9,
        "top_k": 5,
        "repetition_penalty": 1.1,
        "presence_penalty": 0.1,
        "frequency_penalty": 0.1,
        "stop": ["."],
        "seed": 1,
        "stream": False,
        "ignore_eos": True,
    }
    assert client.post("/v1/generate", json=every_field).status_code == 200


def test_an_unknown_name_of_any_length_is_named_in_a_short_answer(client):
    message = assert_error(
        client.post("/v1/generate", json={"prompt": "x", "n": 2}), 422, "invalid_request"
    )
    assert message == "n: Extra inputs are not permitted"
    # Repeated whole, a name as long as the body limit allows made an answer as long.
    name = "k" * (BODY_LIMIT - 100)
    response = client.post("/v1/generate", json={"prompt": "x", name: 1})
    message = assert_error(response, 422, "invalid_request")
    assert message == f"{'k' * 40}... (3,996 characters): Extra inputs are not permitted"
    assert len(response.content) < 200


def test_a_list_of_many_wrong_items_is_named_by_its_first_in_a_short_answer(client):
    # Each wrong item was an error of its own, all listed: a megabyte of -1s sent to
    # /detokenize made a 20 MB answer and held the event loop (every stream) for 3.5 s.
    count = (BODY_LIMIT - 100) // 3
    for route, body, message in [
        ("/detokenize", {"tokens": [-1] * count}, "tokens.0: Input should be greater than"),
        ("/detokenize", {"tokens": ["1"] * (count // 2)}, "tokens.0: Input should be a valid"),
        ("/tokenize", {"messages": [1] * (count // 2)}, "messages.0: Input should be a valid"),
    ]:
        response = client.post(route, json=body)
        assert assert_error(response, 422, "invalid_request").startswith(message)
        assert len(response.content) < 200, response.text[:300]
    # Wrong in many fields: each named, up to 10.
    wrong = {"prompt": "x"} | {name: "?" for name in ("max_tokens", "top_k", "seed")}
    message = assert_error(client.post("/v1/generate", json=wrong), 422, "invalid_request")
    assert message.count(": Input should be") == 3


def test_a_body_wrong_in_more_than_ten_fields_names_ten_and_counts_the_rest(client):
    # invalid_request names MAX_ERRORS_SHOWN (10) errors and counts the others, in
    # English: one more is "1 more error", not "1 more errors".
    wrong = [
        "max_tokens",
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "repetition_penalty",
        "presence_penalty",
        "frequency_penalty",
        "seed",
        "ignore_eos",
        "stream",
    ]
    for count, rest in [(10, None), (11, "and 1 more error"), (12, "and 2 more errors")]:
        body = {"prompt": "x"} | {name: "?" for name in wrong[:count]}
        if count == 12:
            body["logit_bias"] = "?"
        message = assert_error(client.post("/v1/generate", json=body), 422, "invalid_request")
        *named, last = message.split("; ")
        if rest is None:
            named.append(last)
        else:
            assert last == rest, message
        assert len(named) == 10 and all(": Input should be" in part for part in named), message


def test_a_compressed_body_is_415_saying_so(client):
    body = json.dumps({"prompt": "x", "max_tokens": 1}).encode()
    headers = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
    response = client.post("/v1/generate", content=gzip.compress(body), headers=headers)
    message = assert_error(response, 415, "unsupported_media_type")
    assert message == "Content-Encoding gzip is not supported: send the body as it is"
    assert response.headers["Accept-Encoding"] == "identity"
    # Every header's codings count; identity, or an empty list, is the body as it is.
    twice = [("Content-Type", "application/json")]
    twice += [("Content-Encoding", "identity"), ("Content-Encoding", "GZIP, identity")]
    response = client.post("/v1/generate", content=body, headers=twice)
    message = assert_error(response, 415, "unsupported_media_type")
    assert (
        message
        == "Content-Encoding identity, gzip, identity is not supported: send the body as it is"
    )
    for plain in ("identity", "", "Identity"):
        headers["Content-Encoding"] = plain
        assert client.post("/v1/generate", content=body, headers=headers).status_code == 200


def test_a_body_framed_by_both_length_and_chunks_is_400_and_the_connection_closed(base_url):
    # h11 reads the chunks; a proxy in front may have read the length (smuggling).
    body = json.dumps({"prompt": "x", "max_tokens": 1}).encode()
    head = b"POST /v1/generate HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
    head += f"Authorization: Bearer {API_KEY}\r\nContent-Length: 5\r\n".encode()
    head += b"Transfer-Encoding: chunked\r\n\r\n"
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    # raw_answer reads until the server closes: a kept-alive connection would hang it.
    head_read, answer = raw_answer(base_url, head + chunked)
    assert head_read.startswith(b"http/1.1 400") and b"connection: close" in head_read
    assert json.loads(answer)["error"] == {
        "type": "invalid_http",
        "message": "the request gives both Content-Length and Transfer-Encoding: send one",
    }


def test_an_unexpected_failure_is_a_500_in_the_envelope_and_counted(tmp_path):
    settings = Settings(checkpoint=random_checkpoint(tmp_path, english_tokenizer()))
    app = create_app(settings)

    async def broken() -> None:  # a bug in a route, standing in for any
        raise RuntimeError("a bug")

    app.add_api_route("/v1/generate", broken, methods=["PUT"])
    with running_server(settings, app=app) as url:
        response = httpx.put(f"{url}/v1/generate")
        assert response.status_code == 500
        assert response.json() == {
            "error": {"type": "internal_error", "message": "internal server error"}
        }
        # An error-rate alert on requests_total must see it.
        samples = metric_samples(url)
        assert samples[("pocketgpt_requests_total", (("status", "500"),))] == 1


def test_an_unexpected_failure_is_logged_once(tmp_path, capfd):
    settings = Settings(checkpoint=random_checkpoint(tmp_path, english_tokenizer()))
    app = create_app(settings)

    async def broken() -> None:
        raise RuntimeError("a bug")

    app.add_api_route("/v1/generate", broken, methods=["PUT"])
    with running_server(settings, app=app) as url:
        assert httpx.put(f"{url}/v1/generate").status_code == 500
    # The server has stopped: whatever it logged for the request is written.
    log = capfd.readouterr().err
    assert log.count("Traceback") == 1, log
    assert log.count("RuntimeError: a bug") == 1, log


def test_unloadable_checkpoint_keeps_health_and_generate_at_503(tmp_path):
    settings = Settings(checkpoint=tmp_path / "missing")  # create_app defers loading
    with running_server(settings, expect_ready=False) as url:

        def health_message() -> str:
            return assert_error(httpx.get(f"{url}/health"), 503, "unavailable")

        wait_until(lambda: "failed to load" in health_message(), 60, "the load to fail")
        # Why is the server log's to say: a keyless /health gives no paths away.
        assert health_message() == "the model is not ready (failed to load: see the server log)"
        response = httpx.post(f"{url}/v1/generate", json={"prompt": "x"})
        assert_error(response, 503, "unavailable")
        samples = metric_samples(url)
        state = ("pocketgpt_server_state", (("pocketgpt_server_state", "failed"),))
        assert samples[state] == 1
        # Exported at 0 from the start: an error or cancel ratio is 0, not "no data".
        requests = {
            status: samples[("pocketgpt_requests_total", (("status", status),))]
            for status in ("200", "429", "499", "500", "503")
        }
        assert requests == {"200": 0, "429": 0, "499": 0, "500": 0, "503": 1}  # 503: above
        for reason in ("stop", "length", "cancelled", "error"):
            assert samples[("pocketgpt_request_finished_total", (("reason", reason),))] == 0


def engine_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name == "pocketgpt-engine" and t.is_alive()}


def test_a_server_stopped_without_a_drain_of_its_own_stops_its_engine_thread(tmp_path):
    # uvicorn run on the app directly (not `python -m server`, which drains first) ends the
    # engine in the lifespan's shutdown: its model thread must not outlive the server.
    # Compared with the threads before, as this module's own server runs an engine too.
    before = engine_threads()
    settings = Settings(checkpoint=random_checkpoint(tmp_path, english_tokenizer()))
    with running_server(settings) as url:
        assert httpx.post(f"{url}/v1/generate", json={"prompt": "x", "max_tokens": 2}).is_success
        assert len(engine_threads() - before) == 1
    assert engine_threads() - before == set()


def test_queue_full_is_429_with_retry_after_while_admitted_requests_complete(client):
    long = {"prompt": "first", "max_tokens": 300, "ignore_eos": True, "stream": True}
    queued = {"prompt": "second", "max_tokens": 5, "ignore_eos": True, "stream": True}
    with client.stream("POST", "/v1/generate", json=long) as running:
        running_events = sse_events(running)
        next(running_events)  # admitted: it holds the only slot
        with client.stream("POST", "/v1/generate", json=queued) as waiting:
            assert waiting.status_code == 200  # submitted: it holds the only queue place
            rejected = client.post("/v1/generate", json={"prompt": "third", "max_tokens": 2})
            assert_error(rejected, 429, "queue_full")
            assert int(rejected.headers["Retry-After"]) >= 1
            *_, long_last, long_done = running_events
            *_, queued_last, queued_done = sse_events(waiting)
    assert long_done == queued_done == "[DONE]"
    assert long_last["finish_reason"] == queued_last["finish_reason"] == "length"
    assert long_last["usage"]["completion_tokens"] == 300
    assert queued_last["usage"]["completion_tokens"] == 5


def test_metrics_open_lets_a_keyless_prometheus_scrape_but_nothing_else(tmp_path):
    checkpoint = random_checkpoint(tmp_path, english_tokenizer())
    settings = Settings(checkpoint=checkpoint, api_key=API_KEY, metrics_open=True)
    with running_server(settings) as url:
        assert httpx.get(url + "/metrics").status_code == 200
        assert_error(httpx.get(url + "/v1/models"), 401, "authentication_error")
        keyed = httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {API_KEY}"})
        assert keyed.status_code == 200


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b'{"prompt": ' + b"[" * 500 + b"]" * 500 + b"}", "prompt: Input should be a valid string"),
        (
            b'{"prompt": "x", "stop": ' + b'{"a":' * 500 + b"1" + b"}" * 500 + b"}",
            "stop: must be a string or a list",
        ),
    ],
    ids=["prompt", "stop"],
)
def test_json_nested_deeply_but_parsed_is_422_naming_the_field(client, content, message):
    headers = {"Content-Type": "application/json"}
    with python_recursion_limit(1000):
        response = client.post("/v1/generate", content=content, headers=headers)
    assert assert_error(response, 422, "invalid_request").startswith(message)


def test_the_bearer_scheme_is_matched_in_any_case_and_the_key_whole(base_url):
    # RFC 9110: the scheme is case-insensitive. The key must match whole: a prefix of
    # it, the key with more after it, or none at all, is no key.
    def status(authorization: str) -> int:
        headers = {"Authorization": authorization}
        return httpx.get(base_url + "/v1/models", headers=headers).status_code

    for scheme in ("bearer", "BEARER"):
        assert status(f"{scheme} {API_KEY}") == 200, scheme
    # RFC 9110 11.4: one or more spaces between the scheme and the token.
    assert status(f"Bearer   {API_KEY}") == 200
    # The key under another scheme is no bearer token: Basic's is a user's password.
    for given in (
        "Bearer",
        f"Bearer {API_KEY[:4]}",
        f"Bearer {API_KEY[:-1]}",
        f"Bearer {API_KEY}x",
        f"Basic {API_KEY}",
    ):
        assert status(given) == 401, given


def test_a_request_without_a_host_header_passes_the_host_check(base_url):
    # HTTP/1.0 has no Host header; browsers (DNS rebinding) always send one.
    status, body = raw_exchange(base_url, b"GET /health HTTP/1.0\r\n\r\n")
    assert status == 200, body


def test_a_host_header_that_is_not_ascii_is_refused_as_a_host_not_served(base_url):
    # HTTP lets a header value carry bytes past ASCII (obs-text); read as Latin-1, such a
    # Host names no host served here: a 400 in the envelope, not a failure to decode it.
    request = b"GET /health HTTP/1.1\r\nHost: caf\xe9.example\r\nConnection: close\r\n\r\n"
    status, body = raw_exchange(base_url, request)
    assert status == 400, body
    assert body["error"]["type"] == "invalid_host"
    assert body["error"]["message"].startswith("Host 'caf\xe9.example' is not served here")


def test_a_body_in_exactly_1024_small_pieces_is_served_and_one_more_is_413(base_url):
    body = json.dumps({"prompt": "x", "max_tokens": 1}).encode()
    body += b" " * (1024 - len(body))
    pieces = [body[i : i + 1] for i in range(len(body))]
    status, answer = raw_exchange(base_url, CHUNKED_GENERATE + chunked(pieces))
    assert status == 200, answer
    status, answer = raw_exchange(base_url, CHUNKED_GENERATE + chunked([*pieces, b" "]))
    assert status == 413, answer


def test_pieces_of_255_bytes_count_as_small_and_pieces_of_256_do_not(tmp_path):
    # The default 1 MiB body limit is far off: 1,025 pieces alone decide.
    settings = Settings(checkpoint=random_checkpoint(tmp_path, english_tokenizer()))
    body = json.dumps({"prompt": "x", "max_tokens": 1}).encode()
    with running_server(settings) as url:
        for size, expected in ((255, 413), (256, 200)):
            padded = body + b" " * (1025 * size - len(body))
            pieces = [padded[i : i + size] for i in range(0, len(padded), size)]
            status, answer = raw_exchange(url, CHUNKED_GENERATE + chunked(pieces))
            assert status == expected, (size, answer)


def test_the_next_request_on_a_kept_alive_connection_has_its_own_deadline(tmp_path):
    # After an answer the connection waits for the next request: one that then sends
    # part of a head is answered 408 like a first one, not held open for good.
    timeout = 0.2
    checkpoint = random_checkpoint(tmp_path, english_tokenizer())
    with running_server(Settings(checkpoint=checkpoint, request_timeout=timeout)) as url:
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
            answer = b""
            while b'"status"' not in answer:
                answer += sock.recv(65536)
            assert answer.startswith(b"HTTP/1.1 200")
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: local")  # and nothing more
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 408"), answer


def test_a_body_of_exactly_the_limit_is_served_and_one_byte_more_is_413(client):
    body = json.dumps({"prompt": "x", "max_tokens": 1}).encode()
    exact = body + b" " * (BODY_LIMIT - len(body))
    json_type = {"Content-Type": "application/json"}
    assert client.post("/v1/generate", content=exact, headers=json_type).status_code == 200
    assert client.post("/v1/generate", content=exact + b" ", headers=json_type).status_code == 413


def test_a_failure_after_the_answer_started_is_counted_once_as_that_answer(tmp_path):
    # The client got a 200 (cut short): counting a 500 besides would count one
    # request twice.
    settings = Settings(checkpoint=random_checkpoint(tmp_path, english_tokenizer()))
    app = create_app(settings)

    async def broken_stream() -> StreamingResponse:
        async def body() -> AsyncIterator[bytes]:
            yield b"partial"
            raise RuntimeError("a bug mid-stream")

        return StreamingResponse(body())

    app.add_api_route("/v1/generate", broken_stream, methods=["PUT"])
    with running_server(settings, app=app) as url:
        with contextlib.suppress(httpx.HTTPError):  # the answer is cut where it failed
            httpx.put(f"{url}/v1/generate").read()
        samples = metric_samples(url)
        assert samples[("pocketgpt_requests_total", (("status", "200"),))] == 1
        assert samples.get(("pocketgpt_requests_total", (("status", "500"),)), 0) == 0


def small_context_validator(context: int = 16, bos_id: int = 0) -> Validator:
    tokenizer = english_tokenizer()
    return Validator(tokenizer, token_bytes(tokenizer), max_context=context, bos_id=bos_id)


def refusal(validator: Validator, **fields: object) -> str:
    with pytest.raises(ApiError) as refused:
        validator.validate(GenerateRequest(**fields))
    assert (refused.value.status_code, refused.value.type) == (400, "context_length_exceeded")
    return refused.value.message


def test_a_prompt_of_exactly_the_bytes_that_could_fit_is_tokenized_and_counted_exactly():
    validator = small_context_validator()
    fitting = 16 * validator.max_token_bytes  # "a" is one token a byte here
    message = refusal(validator, prompt="a" * fitting, max_tokens=1)
    assert message == (
        f"prompt ({fitting} tokens) + max_tokens (1) exceeds the model's context of 16 tokens"
    )
    # One byte more as sent, but as many as tokenized (CRLF is read as "\n").
    crlf = "a" * (fitting - 1) + "\r\n"
    counted = len(validator.tokenizer.encode(crlf, add_special_tokens=False).ids)
    message = refusal(validator, prompt=crlf, max_tokens=1)
    assert message.startswith(f"prompt ({counted} tokens) + max_tokens (1)"), message


def test_the_fewest_tokens_a_prompt_refused_by_its_bytes_has_are_rounded_up():
    validator = small_context_validator()
    prompt = "a" * (16 * validator.max_token_bytes + 1)
    message = refusal(validator, prompt=prompt, max_tokens=1)
    assert message.startswith(f"prompt (at least 17 tokens: {len(prompt)} bytes) + max_tokens")


def test_a_prompt_is_measured_in_utf8_bytes_not_in_characters():
    # As many characters as could fit, each of 2 bytes: refused by its bytes untokenized.
    validator = small_context_validator()
    prompt = "é" * (16 * validator.max_token_bytes // 2 + 1)
    size = 2 * len(prompt)
    assert len(prompt) <= 16 * validator.max_token_bytes < size
    fewest = -(-size // validator.max_token_bytes)
    message = refusal(validator, prompt=prompt, max_tokens=1)
    assert message.startswith(f"prompt (at least {fewest} tokens: {size} bytes) + max_tokens")


def test_without_max_tokens_a_prompt_of_exactly_the_context_is_refused():
    validator = small_context_validator()
    message = refusal(validator, prompt=" the" * 16)  # " the": one token
    assert message == (
        "prompt (16 tokens) leaves no room to generate in the model's context of 16 tokens"
    )
    served = validator.validate(GenerateRequest(prompt=" the" * 15))
    assert (len(served.prompt_ids), served.max_tokens) == (15, 1)


def test_an_unknown_name_of_exactly_the_shown_length_is_repeated_whole(client):
    name = "k" * 40
    response = client.post("/v1/generate", json={"prompt": "x", name: 1})
    message = assert_error(response, 422, "invalid_request")
    assert message == f"{name}: Extra inputs are not permitted"


def test_an_empty_prompt_starts_with_the_checkpoints_own_start_token():
    served = small_context_validator(bos_id=7).validate(GenerateRequest(prompt=""))
    assert (served.prompt_ids, served.max_tokens) == ([7], 15)
