"""Edge validation: a protocol request becomes a typed, tokenized `GenerationRequest`.

Decides a request's 400, 415 and 422: pydantic's field errors, text that is not valid
Unicode among them (422), a body not sent as JSON (415), a body that is not JSON (400),
and the bound that needs the tokenizer and the model's context (400, with the numbers).
Everything after this point trusts its input. Refused before it gets here: what is not
valid HTTP (uvicorn: server/http11.py), a Host not allowed or a body framed both ways
(400: server/middleware.py), a compressed body (415: server/routes.py).
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import NoReturn

from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from tokenizers import Tokenizer

from model.checkpoint import (
    CONFIG,
    GENERATION_CONFIG,
    CheckpointError,
    crlf_as_newline,
    read_generation_config,
    read_json_object,
)
from model.sampling import SamplingParams
from server.protocol import (
    DEFAULT_MAX_TOKENS,
    MAX_LOGIT_BIAS,
    ApiError,
    GenerateRequest,
    GenerationFields,
    lone_surrogate,
)

# generation_config.json's keys -> the request fields they give defaults to, as vLLM
# reads them (HF's generate uses the same file): a request that leaves one out samples
# as the checkpoint's author meant.
DEFAULTED_FIELDS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "repetition_penalty": "repetition_penalty",
    "max_new_tokens": "max_tokens",
}
# What HF's generate still applies when do_sample is false (greedy).
_GREEDY_TOO = ("repetition_penalty", "max_tokens")


def not_json(reason: str = "is not valid JSON") -> ApiError:
    return ApiError(400, "invalid_json", f"the request body {reason}")


MAX_JSON_OBJECTS = 1024


def parse_json_body(body: bytes, fields: int) -> object:
    """A JSON request body, read as RFC 8259 has it: UTF-8 (a leading BOM ignored), for a
    request model of `fields` fields.

    Bytes given to json.loads are guessed at: UTF-16 and UTF-32 were served too. A
    JSONDecodeError is left to FastAPI to report (then invalid_request() says 400);
    what else Python's parser raises is said here, not as "could not be parsed".
    """
    try:
        text = body.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise not_json(f"is not UTF-8 (byte 0x{body[e.start]:02x} at offset {e.start})") from None
    objects = 0

    def read_object(pairs: list[tuple[str, object]]) -> dict[str, object]:
        # A valid body is one object; a mistake (a field given an object, nested even
        # hundreds deep) keeps pydantic's message naming the field. Past the bound,
        # refused at once: a megabyte of small objects cost the event loop (every
        # stream) ~0.15 s to read and check.
        nonlocal objects
        objects += 1
        if objects > MAX_JSON_OBJECTS:
            message = (
                f"body: more than {MAX_JSON_OBJECTS} JSON objects; a request is one object "
                "whose values are strings, numbers, booleans, null, lists and few objects "
                "(a chat's messages, a logit_bias)"
            )
            raise ApiError(422, "invalid_request", message)
        return _json_object(pairs, max(fields, MAX_LOGIT_BIAS), fields)

    try:
        parsed = json.loads(text, parse_int=_json_int, object_pairs_hook=read_object)
    except RecursionError:
        raise not_json("is nested too deeply") from None
    if isinstance(parsed, dict) and len(parsed) > fields:  # the request's own object
        raise _too_many_names(len(parsed), fields)
    return parsed


def _json_int(digits: str) -> int:
    try:
        return int(digits)
    except ValueError:  # beyond Python's bound on digits converted (4300 by default)
        limit = sys.get_int_max_str_digits()
        message = f"body: a number has more than {limit} digits"
        raise ApiError(422, "invalid_request", message) from None


def _too_many_names(names: int, fields: int) -> ApiError:
    message = (
        f"body: an object of {names} names; a request has {fields} fields, and a logit_bias "
        f"at most {MAX_LOGIT_BIAS} tokens"
    )
    return ApiError(422, "invalid_request", message)


def _json_object(pairs: list[tuple[str, object]], most: int, fields: int) -> dict[str, object]:
    # No object in a valid body has more names than its request has fields, or (a
    # logit_bias) its bound. A megabyte of unknown names took pydantic ~0.3 s of the event
    # loop (every stream stalled) to list, in a 3.8 MB answer: such an object is refused
    # here, whole, as it is read; the request's own object once read (parse_json_body).
    if len(pairs) > most:
        raise _too_many_names(len(pairs), fields)
    # A lone surrogate in a name: pydantic refused the whole body as "not a valid
    # string"; one in a prompt or stop string is the protocol's to name.
    for name, _ in pairs:
        if (index := lone_surrogate(name)) is not None:
            half = f"\\u{ord(name[index]):04x} is half of a surrogate pair"
            raise ApiError(
                422, "invalid_request", f"body: a field name is not valid Unicode ({half})"
            )
    # A name given twice: json.loads keeps the last, a proxy or other reader may keep the
    # first (RFC 8259 leaves it unsaid), so the request would mean two things.
    names = Counter(name for name, _ in pairs)
    if len(names) < len(pairs):
        twice = next(name for name, count in names.items() if count > 1)
        # Cut short, as an unknown name is (_shown): repeated whole, a long one made an
        # answer longer than the body (json.dumps writes an "é" as 6 characters).
        shown = json.dumps(twice[:MAX_NAME_SHOWN])
        if len(twice) > MAX_NAME_SHOWN:
            shown += f"... ({len(twice):,} characters)"
        raise ApiError(422, "invalid_request", f"body: {shown} is given twice")
    return dict(pairs)


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    prompt_ids: list[int]
    max_tokens: int  # 0 (with echo only): nothing is generated, the prompt is scored
    sampling: SamplingParams
    seed: int | None
    stop: tuple[str, ...]
    ignore_eos: bool
    # Log-probabilities to report with each token: the sampled one's and the `logprobs`
    # likeliest alternatives' (0: the sampled one's only); None: none.
    logprobs: int | None = None
    # The text the request's first output begins with (/v1/completions' echo: the prompt
    # as sent); with `logprobs`, that output's logprobs begin with the prompt tokens'.
    echo: str | None = None
    arrival: float = field(default_factory=time.perf_counter)

    @property
    def scores_prompt(self) -> bool:
        """Whether each prompt token's log-probability is reported (echo with logprobs)."""
        return self.echo is not None and self.logprobs is not None


def sampling_defaults(folder: Path) -> dict[str, float | int]:
    """The request defaults set by generation_config.json in the step folder `folder`;
    a value no request may have is a CheckpointError naming the file and the field."""
    config = read_generation_config(folder)
    defaults = {
        field: config[key] for key, field in DEFAULTED_FIELDS.items() if config.get(key) is not None
    }
    if (do_sample := config.get("do_sample")) is not None and not isinstance(do_sample, bool):
        # "no" or 0 would sample, read as not false: how the model was meant to answer lost.
        raise CheckpointError(
            f"{folder / GENERATION_CONFIG}: do_sample: must be true or false, got {do_sample!r}"
        )
    if do_sample is False:  # HF's generate draws greedily then
        defaults = {"temperature": 0.0} | {
            field: value for field, value in defaults.items() if field in _GREEDY_TOO
        }
    try:
        GenerateRequest.model_validate({"prompt": "", **defaults})
    except ValidationError as e:
        error = e.errors()[0]
        field = str(error["loc"][0])
        key = next(key for key, name in DEFAULTED_FIELDS.items() if name == field)
        raise CheckpointError(
            f"{folder / GENERATION_CONFIG}: {key}: {error['msg']}, as in a request"
        ) from None
    return defaults


def end_of_text_ids(folder: Path, separator: int, vocab_size: int) -> frozenset[int]:
    """The ids that end a generated text: the separator, and those the step folder
    `folder` declares as `eos_token_id` (an id or a list; generation_config.json's, else
    config.json's, as HF's generate reads them: a chat model's <|im_end|>, say)."""
    path = folder / GENERATION_CONFIG
    declared = read_json_object(path).get("eos_token_id")
    if declared is None:
        path = folder / CONFIG
        declared = read_json_object(path).get("eos_token_id")
    ids = declared if isinstance(declared, list) else [declared]
    if declared is not None and not all(
        isinstance(i, int) and not isinstance(i, bool) and 0 <= i < vocab_size for i in ids
    ):
        raise CheckpointError(
            f"{path}: eos_token_id {declared!r} is not one or more token ids below {vocab_size}"
        )
    return frozenset({separator, *ids} - {None})


class Validator:
    def __init__(
        self,
        tokenizer: Tokenizer,
        token_table: list[bytes],
        max_context: int,
        bos_id: int,
        defaults: dict[str, float | int] | None = None,
        *,
        context_limited: bool = False,
    ) -> None:
        """context_limited: `max_context` is the server's --max-context, not the model's."""
        self.tokenizer = tokenizer
        self.token_table = token_table
        self.max_context = max_context
        self.context_name = "served context" if context_limited else "model's context"
        self.bos_id = bos_id
        self.defaults = defaults or {}
        self.default_max_tokens = self.defaults.get("max_tokens", DEFAULT_MAX_TOKENS)
        # Every token of a prompt stands for 1 to this many of its UTF-8 bytes, as the
        # tokenizer's normalizer leaves them (pocketgpt's reads CRLF as "\n").
        self.max_token_bytes = max(len(b) for b in token_table)
        self.vocab_size = len(token_table)  # the tokenizer's ids: 0 .. vocab_size - 1
        normalizer = tokenizer.normalizer
        self._crlf_as_newline = (
            normalizer is not None and normalizer.__getstate__() == crlf_as_newline().__getstate__()
        )

    def validate(self, body: GenerateRequest) -> GenerationRequest:
        return self.validate_prompt(body.prompt, body)

    def validate_prompt(
        self, prompt: str | list[int], fields: GenerationFields, logprobs: int | None = None
    ) -> GenerationRequest:
        """A request for `prompt`, text or (/v1/completions) token ids, and `fields`;
        `logprobs`: GenerationRequest's."""
        if isinstance(prompt, str):
            return self._request(self.tokenize(prompt, fields.max_tokens), fields, logprobs)
        request = self._request(prompt, fields, logprobs)  # the context's bound first: cheaper
        # Ids the tokenizer lacks (a padded checkpoint's extra embedding rows) have no
        # text, and the server never draws them: not taken in a prompt either.
        self._check_known("prompt", prompt)
        return request

    def echoing(
        self, requests: list[GenerationRequest], prompt: str | list[int]
    ) -> list[GenerationRequest]:
        """`requests` (validated, for `prompt`) with their outputs beginning with the prompt:
        the text as sent, or token ids as their text."""
        if isinstance(prompt, list):
            prompt = self._spelled(prompt)
        return [replace(request, echo=prompt) for request in requests]

    def detokenize(self, token_ids: list[int]) -> str:
        """The text of `token_ids` (POST /detokenize); a 400 for an id the tokenizer lacks."""
        self._check_known("tokens", token_ids)
        return self._spelled(token_ids)

    def _spelled(self, token_ids: list[int]) -> str:
        """The text of valid `token_ids`: special tokens have none, and bytes that are no
        UTF-8 (a character cut short) read as U+FFFD."""
        spelled = b"".join(self.token_table[token_id] for token_id in token_ids)
        return spelled.decode("utf-8", errors="replace")

    def tokenize(self, prompt: str, asked: int | None) -> list[int]:
        """`prompt`'s token ids, or the 400 for a prompt too long by its bytes alone to
        leave room for `asked` tokens (max_tokens)."""
        self.check_bytes(prompt, asked)
        # An empty prompt starts a new document, as in training: after end-of-text.
        return self.tokenizer.encode(prompt, add_special_tokens=False).ids or [self.bos_id]

    def check_bytes(self, prompt: str, asked: int | None) -> None:
        """The 400 for a prompt too long by its bytes alone to leave room for `asked`
        tokens; asked before it is tokenized."""
        # Tokenizing runs on the event loop and holds the GIL (~0.5 s for a 1 MB prompt,
        # every stream stalled meanwhile), so a prompt of more bytes than any prompt that
        # fits (the context's tokens, each of the vocabulary's longest) is refused before
        # it is tokenized: it has at least bytes / max_token_bytes tokens, more than the
        # context. One that might fit costs the same to tokenize refused as served, and
        # is counted exactly ("at least 1 token: 2 bytes" told a client little).
        prompt_bytes = _utf8_length(prompt)
        longest_fitting = self.max_context * self.max_token_bytes
        if prompt_bytes > longest_fitting:
            tokenized_bytes = self._normalized_bytes(prompt, prompt_bytes)
            if tokenized_bytes > longest_fitting:
                fewest = -(-tokenized_bytes // self.max_token_bytes)
                self._too_long(
                    f"at least {_count(fewest, 'token')}: {_count(prompt_bytes, 'byte')}", asked
                )

    def _request(
        self, prompt_ids: list[int], fields: GenerationFields, logprobs: int | None
    ) -> GenerationRequest:
        # Without max_tokens a request asks for the default or what the context leaves,
        # whichever is less (a `tiny` model's whole context is the default's 128).
        # A prompt leaves a position free even with max_tokens 0 (runner.prefill's padding).
        asked = fields.max_tokens
        if len(prompt_ids) + (asked or 1) > self.max_context:
            self._too_long(_count(len(prompt_ids), "token"), asked)
        if asked is None:
            asked = min(self.default_max_tokens, self.max_context - len(prompt_ids))
        return GenerationRequest(
            request_id=f"gen-{uuid.uuid4().hex}",
            prompt_ids=prompt_ids,
            max_tokens=asked,
            sampling=SamplingParams(
                temperature=self._given_or_default(fields, "temperature"),
                top_k=self._given_or_default(fields, "top_k"),
                top_p=self._given_or_default(fields, "top_p"),
                min_p=self._given_or_default(fields, "min_p"),
                repetition_penalty=self._given_or_default(fields, "repetition_penalty"),
                presence_penalty=fields.presence_penalty,
                frequency_penalty=fields.frequency_penalty,
                logit_bias=self._logit_bias(fields),
            ),
            seed=fields.seed,
            stop=fields.stop_strings,
            ignore_eos=fields.ignore_eos,
            logprobs=logprobs,
        )

    def _logit_bias(self, fields: GenerationFields) -> tuple[tuple[int, float], ...]:
        """The request's logit biases by token id; a 400 for an id the tokenizer lacks."""
        bias = tuple((int(key), value) for key, value in (fields.logit_bias or {}).items())
        for token_id, _ in bias:
            if token_id >= self.vocab_size:
                raise self._not_a_token("logit_bias", token_id)
        return bias

    def _check_known(self, field_name: str, token_ids: list[int]) -> None:
        """A 400 naming the first of `token_ids` (`field_name`) the tokenizer lacks."""
        if token_ids and max(token_ids) >= self.vocab_size:
            position, token_id = next(
                (i, t) for i, t in enumerate(token_ids) if t >= self.vocab_size
            )
            raise self._not_a_token(field_name, token_id, f" (at {position})")

    def _not_a_token(self, field_name: str, token_id: int, where: str = "") -> ApiError:
        """The 400 for an id past the tokenizer's in `field_name` (`where` in it, if said)."""
        message = (
            f"{field_name}: token id {token_id}{where} is not one of the tokenizer's "
            f"{self.vocab_size}"
        )
        return ApiError(400, "invalid_token_id", message)

    def _normalized_bytes(self, prompt: str, prompt_bytes: int) -> int:
        """The UTF-8 bytes of `prompt` (`prompt_bytes` as sent) as the tokenizer's
        normalizer leaves them: the trainer's counted (~1 ms a MB), another run (~25 ms a
        MB on the event loop: asked only of a prompt its bytes as sent would refuse)."""
        normalizer = self.tokenizer.normalizer
        if normalizer is None:
            return prompt_bytes
        if self._crlf_as_newline:
            return prompt_bytes - prompt.count("\r\n")
        return _utf8_length(normalizer.normalize_str(prompt))

    def _given_or_default(self, fields: GenerationFields, name: str) -> float | int:
        if name in fields.model_fields_set:
            return getattr(fields, name)
        return self.defaults.get(name, getattr(fields, name))

    def _too_long(self, prompt: str, max_tokens: int | None) -> NoReturn:
        context = f"the {self.context_name} of {self.max_context} tokens"
        if max_tokens is None:
            message = f"prompt ({prompt}) leaves no room to generate in {context}"
        elif max_tokens == 0:
            message = f"prompt ({prompt}) must leave a position free in {context}"
        else:
            message = f"prompt ({prompt}) + max_tokens ({max_tokens}) exceeds {context}"
        raise ApiError(400, "context_length_exceeded", message)


def _count(n: int, unit: str) -> str:
    return f"{n} {unit}" if n == 1 else f"{n} {unit}s"


def _utf8_length(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8"))


def invalid_request(exc: RequestValidationError) -> ApiError:
    """FastAPI's validation errors as one envelope: 415 if the body was not read as JSON
    (its Content-Type says otherwise), 400 if it is not JSON (an empty body included),
    else 422."""
    errors: Sequence[dict] = exc.errors()
    # FastAPI parses JSON only under a JSON Content-Type; any other type, or none, hands
    # the raw bytes to validation, e.g. `curl -d` without `-H`.
    if any(e.get("loc") == ("body",) and isinstance(e.get("input"), bytes) for e in errors):
        return ApiError(
            415,
            "unsupported_media_type",
            "the request body was not read as JSON: send it with Content-Type: application/json",
        )
    if any(e.get("type") == "json_invalid" for e in errors):
        return not_json()
    if any(e.get("loc") == ("body",) and e.get("type") == "missing" for e in errors):
        return not_json("is empty: send a JSON object")
    # The first few only: a list of a megabyte of wrong items (/detokenize's `tokens` of
    # -1s) has an error each, which, all told, made a 20 MB answer and held the event
    # loop (every stream) for 3.5 s.
    messages = []
    for e in errors[:MAX_ERRORS_SHOWN]:
        where = ".".join(_shown(part) for part in e.get("loc", ()) if part != "body") or "body"
        messages.append(f"{where}: {e.get('msg', 'invalid')}")
    if (more := len(errors) - MAX_ERRORS_SHOWN) > 0:
        messages.append(f"and {more:,} more error{'' if more == 1 else 's'}")
    return ApiError(422, "invalid_request", "; ".join(messages))


MAX_ERRORS_SHOWN = 10  # errors a 422 names (the request models' fields: at most ~30)
MAX_NAME_SHOWN = 40  # characters of a field name an error repeats (the longest field: 18)


def _shown(part: str | int) -> str:
    """A part of an error's location as its message shows it: an unknown name the client
    sent, cut short. Repeated whole, a megabyte-long name made a megabyte-long answer."""
    text = str(part)
    if len(text) <= MAX_NAME_SHOWN:
        return text
    return f"{text[:MAX_NAME_SHOWN]}... ({len(text):,} characters)"
