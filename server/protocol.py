"""The HTTP contract: request and response bodies, and the error envelope.

Field bounds that need no model knowledge live here (pydantic -> 422); bounds that
need the tokenizer or the context length live in validation.py (-> 400). Requests are
strict: a number sent as a string, or `true` as a number, is a 422, not converted.
Besides DESIGN.md's fields, requests accept `presence_penalty`, `frequency_penalty`
(OpenAI semantics), `min_p` (HF's and vLLM's) and `ignore_eos` (go on past end-of-text, so
that a request without stop strings makes exactly max_tokens: for benchmarks), and answers
name the stop string that ended the text in `stop_reason` (vLLM's field; with several, a
client can tell which).
Beside DESIGN.md's /v1/generate, /v1/completions takes OpenAI's completions request and
/v1/chat/completions its chat request (their fields map onto /v1/generate's:
`OpenAIRequest.choice_fields`; a chat's messages become its prompt in model/chat_template.py).
"""

from __future__ import annotations

import re
from typing import Annotated, ClassVar, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError
from starlette.exceptions import HTTPException

from model.chat_template import CHAT_ROLES

MAX_STOP_STRINGS = 4  # /v1/generate's, and OpenAI's
# lm-eval's generation tasks send their own stop strings and the end-of-text: at OpenAI's
# 4, a task of more than 3 was refused (vLLM takes any number).
MAX_COMPLETION_STOP_STRINGS = 16
DEFAULT_MAX_TOKENS = 128
MAX_STOP_CHARS = 64
MAX_LOGIT_BIAS = 300  # OpenAI's bound on logit_bias entries

FinishReason = Literal["stop", "length"]
STOP_REASON = (
    "the stop string that ended the text (vLLM's stop_reason); null when end-of-text or "
    "max_tokens ended it"
)
StopString = Annotated[str, StringConstraints(min_length=1, max_length=MAX_STOP_CHARS)]
GenerateStop = StopString | Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS)]
CompletionStop = (
    StopString | Annotated[list[StopString], Field(max_length=MAX_COMPLETION_STOP_STRINGS)]
)
STOP_DESCRIPTION = "strings that end the text; never part of it"
# A JSON object's key naming a token id: digits, no sign or leading zero ("01" would name
# the token "1" does, and its two biases would add up).
TOKEN_ID_KEY = r"0|[1-9][0-9]{0,9}"
TokenIdKey = Annotated[str, StringConstraints(pattern=f"^({TOKEN_ID_KEY})$")]
LogitBias = Annotated[float, Field(ge=-100.0, le=100.0, allow_inf_nan=False)]


def lone_surrogate(text: str) -> int | None:
    """Where `text` has no UTF-8 form: the index of its first lone surrogate (JSON
    "\\ud800", which json.loads accepts and no encoder or tokenizer takes), else None."""
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            return e.start
    return None


def _valid_unicode(text: str, which: str = "") -> str:
    """`text`, refused where it has a lone surrogate. which: names the list entry `text`
    is ("" if none)."""
    if (index := lone_surrogate(text)) is not None:
        raise PydanticCustomError(
            "unicode",
            "must be valid Unicode: \\u{code} at character {index}{which} is half of a "
            "surrogate pair",
            {"code": f"{ord(text[index]):04x}", "index": index, "which": which},
        )
    return text


SERVED_MODEL_ID = "the served model's id (GET /v1/models); left out: that model"
CHECKPOINT_DEFAULT = "left out: the checkpoint's generation_config.json value, if it has one"


class GenerationFields(BaseModel):
    """What both generation routes take besides the prompt: how much to generate, and how
    to sample it (/v1/generate's fields; /v1/completions' map onto them)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    max_stop_strings: ClassVar[int] = MAX_STOP_STRINGS

    max_tokens: int | None = Field(
        None,
        ge=1,
        description="tokens to generate at most; none (or null): the checkpoint's "
        f"generation_config.json max_new_tokens, else {DEFAULT_MAX_TOKENS}, or what the "
        "context (the model's, or --max-context) leaves after the prompt, whichever is less",
    )
    # Left out, these five (and max_tokens) take the checkpoint's generation_config.json
    # values if it sets them (server/validation.py), else the defaults here.
    temperature: float = Field(
        1.0,
        ge=0.0,
        le=100.0,
        allow_inf_nan=False,
        description=f"0 (or below 1e-5) = greedy; {CHECKPOINT_DEFAULT}",
    )
    top_p: float = Field(
        1.0, gt=0.0, le=1.0, allow_inf_nan=False, description=f"1 = off; {CHECKPOINT_DEFAULT}"
    )
    top_k: int = Field(
        0, ge=0, description=f"0 = off; beyond the vocabulary = off; {CHECKPOINT_DEFAULT}"
    )
    min_p: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        allow_inf_nan=False,
        description="tokens less likely than min_p times the likeliest one are dropped (after "
        f"top_k and top_p, as HF's generate and vLLM have it); 0 = off; {CHECKPOINT_DEFAULT}",
    )
    # 0.01..100, symmetric around 1: a penalty divides or multiplies logits, and a tiny
    # one overflowed fp32 logits to inf (1e-300: NaN probabilities, junk text).
    repetition_penalty: float = Field(
        1.0, ge=0.01, le=100.0, allow_inf_nan=False, description=f"1 = off; {CHECKPOINT_DEFAULT}"
    )
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0, allow_inf_nan=False)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0, allow_inf_nan=False)
    stop: GenerateStop | None = Field(None, description=STOP_DESCRIPTION)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    ignore_eos: bool = Field(False, description="keep generating past end-of-text")
    logit_bias: dict[TokenIdKey, LogitBias] | None = Field(
        None,
        max_length=MAX_LOGIT_BIAS,
        description="token id (as a string: JSON keys are) -> a number from -100 to 100 "
        "added to that token's logit before sampling (before penalties, temperature and "
        "top-k/top-p): -100 all but bans a token, 100 all but forces it",
    )

    @field_validator("stop", mode="wrap")
    @classmethod
    def _one_stop_error(cls, value: object, handler: ValidatorFunctionWrapHandler) -> object:
        """One message for `stop`, not one per branch of its union (`stop.list[...]`);
        a lone surrogate its own (the length bounds refuse one as if too long)."""
        if isinstance(value, str):
            _valid_unicode(value)
        elif isinstance(value, list):
            for number, text in enumerate(value, start=1):
                if isinstance(text, str):
                    _valid_unicode(text, f" of stop string {number}")
        try:
            return handler(value)
        except ValidationError:
            raise PydanticCustomError(
                "stop",
                "must be a string or a list of at most {count} strings, each of 1 to {chars} "
                "characters",
                {"count": cls.max_stop_strings, "chars": MAX_STOP_CHARS},
            ) from None

    @field_validator("logit_bias", mode="before")
    @classmethod
    def _keys_are_token_ids(cls, value: object) -> object:
        """One message for a key that names no token id, not pydantic's pattern (nor the
        key itself: it may be any length)."""
        if isinstance(value, dict) and not all(re.fullmatch(TOKEN_ID_KEY, key) for key in value):
            raise PydanticCustomError(
                "token_id",
                "keys are token ids, written in digits ('42'): no sign, space or leading zero",
            )
        return value

    @property
    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class GenerateRequest(GenerationFields):
    prompt: str = Field(description="text to continue; empty = start of a document")
    stream: bool = False

    @field_validator("prompt")
    @classmethod
    def _prompt_is_unicode(cls, value: str) -> str:
        return _valid_unicode(value)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class GenerateResponse(BaseModel):
    id: str
    model: str
    text: str
    finish_reason: FinishReason
    stop_reason: str | None = Field(description=STOP_REASON)
    usage: Usage


class StreamChunk(BaseModel):
    """One SSE event; `finish_reason` is set on the last one only, which alone has
    `stop_reason` and `usage`."""

    id: str
    text: str  # the delta since the previous event
    token_ids: list[int]
    finish_reason: FinishReason | None = None
    stop_reason: str | None = Field(None, description=f"on the last event: {STOP_REASON}")
    usage: Usage | None = None


# --- POST /v1/completions: OpenAI's (legacy) completions API -----------------------------

OPENAI_DEFAULT_MAX_TOKENS = 16  # OpenAI's, where /v1/generate's is the checkpoint's or 128
MAX_COMPLETIONS_PER_PROMPT = 128  # OpenAI's bound on n
MAX_LOGPROBS = 5  # OpenAI's bound on logprobs
MAX_TOP_LOGPROBS = 20  # OpenAI's bound on the chat API's top_logprobs
# What OpenAI's API has and this server does not do: the one value each may take (what
# leaving it out means), and why, for the 422 that refuses any other.
_ONLY_VALUE = {
    "suffix": "null: there is no text after the completion",
    "add_special_tokens": "false: a prompt is served with no special tokens added",
}


def _only_value(
    value: object, handler: ValidatorFunctionWrapHandler, info: ValidationInfo
) -> object:
    """A field of _ONLY_VALUE: its one value, or the 422 saying what the server does."""
    try:
        return handler(value)
    except ValidationError:
        only = _ONLY_VALUE[info.field_name or ""]
        raise PydanticCustomError("unsupported", "only {only}", {"only": only}) from None


_Item = TypeVar("_Item")
# fail_fast: a list's first wrong item is its error. Each of a megabyte of them was one,
# ~2 s of the event loop (every stream stalled) to build, list and answer.
NonEmpty = Annotated[list[_Item], Field(min_length=1, fail_fast=True)]
TokenIds = NonEmpty[Annotated[int, Field(ge=0)]]


def _null_is_left_out(data: object) -> object:
    """A field sent as null reads as left out, as OpenAI reads it."""
    if isinstance(data, dict):
        return {name: value for name, value in data.items() if value is not None}
    return data


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    _null_is_left_out = model_validator(mode="before")(_null_is_left_out)

    include_usage: bool = Field(
        False,
        description="a last chunk, before [DONE], with `usage` for the whole request and no "
        "choices; every other chunk has `usage: null`",
    )


class OpenAIRequest(GenerationFields):
    """What OpenAI's completions and chat completions requests share, besides
    /v1/generate's fields (which they take too, as vLLM does). `null` reads as left out,
    as OpenAI reads it."""

    max_stop_strings: ClassVar[int] = MAX_COMPLETION_STOP_STRINGS

    model: str | None = Field(None, description=SERVED_MODEL_ID)
    stop: CompletionStop | None = Field(None, description=STOP_DESCRIPTION)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, description="accepted and ignored (OpenAI's end-user id)")
    n: int = Field(
        1,
        ge=1,
        le=MAX_COMPLETIONS_PER_PROMPT,
        description="completions per prompt; with a seed, the j-th (from 0) samples with seed + "
        "j, so the first is the one n = 1 gives",
    )

    _null_is_left_out = model_validator(mode="before")(_null_is_left_out)

    @model_validator(mode="after")
    def _stream_options_only_when_streaming(self) -> OpenAIRequest:
        # Refused rather than ignored, as vLLM does: the usage asked for would never come.
        if self.stream_options is not None and not self.stream:
            raise PydanticCustomError("unsupported", "stream_options only with stream: true")
        return self

    def choice_fields(self) -> list[GenerationFields]:
        """The fields of a prompt's n choices, in the order of their indices: the fields
        this request set (those left out then take the checkpoint's defaults, as on
        /v1/generate), the seed counting up."""
        fields = {
            name: getattr(self, name)
            for name in GenerationFields.model_fields
            if name in self.model_fields_set or name == "max_tokens"
        }
        # Already validated: constructed, not validated again.
        return [
            GenerationFields.model_construct(**{**fields, **self._seed(j)}) for j in range(self.n)
        ]

    def _seed(self, j: int) -> dict[str, int]:
        """The seed of a prompt's j-th choice, if the request has one: seed + j, within
        the seed's bounds."""
        return {} if self.seed is None else {"seed": (self.seed + j) % 2**63}


class CompletionRequest(OpenAIRequest):
    """OpenAI's completions request, so that its SDKs and the tools built on them can use
    the server. What it cannot do (_ONLY_VALUE) is refused, not ignored."""

    prompt: str | NonEmpty[str] | TokenIds | NonEmpty[TokenIds] = Field(
        description="text to continue, or a list of texts: n choices each, in order; or "
        "token ids of the served tokenizer (a list of them, or a list of such lists)"
    )
    max_tokens: int = Field(  # OpenAI's default, not the checkpoint's
        OPENAI_DEFAULT_MAX_TOKENS,
        ge=0,
        description="tokens to generate at most per choice; prompt + max_tokens must fit the "
        "context; 0 only with echo (the prompt is scored, nothing generated)",
    )
    best_of: int | None = Field(
        None, ge=1, description="only n, or left out: completions are not ranked"
    )
    echo: bool = Field(
        False,
        description="each choice's text begins with its prompt (token ids as their text); "
        "with logprobs, its logprobs begin with the prompt's tokens', the first's null",
    )
    logprobs: int | None = Field(
        None,
        ge=0,
        le=MAX_LOGPROBS,
        description="with each generated token (and with echo, each prompt token), its "
        "log-probability under the model (before logit_bias, temperature, penalties or "
        "truncation, as vLLM reports them) and those of this many likeliest tokens",
    )
    suffix: None = None

    @field_validator("prompt", mode="wrap")
    @classmethod
    def _one_prompt_error(cls, value: object, handler: ValidatorFunctionWrapHandler) -> object:
        """One message for `prompt`, not one per branch of its union."""
        if isinstance(value, str):
            return handler(_valid_unicode(value))
        if isinstance(value, list) and all(isinstance(text, str) for text in value):
            for number, text in enumerate(value, start=1):
                _valid_unicode(text, f" of prompt {number}")
        try:
            return handler(value)
        except ValidationError:
            raise PydanticCustomError(
                "prompt",
                "must be a string, a non-empty list of strings, a non-empty list of token ids "
                "(integers >= 0), or a non-empty list of such lists",
            ) from None

    @model_validator(mode="after")
    def _nothing_generated_only_with_echo(self) -> CompletionRequest:
        if self.max_tokens == 0 and not self.echo:
            raise PydanticCustomError(
                "unsupported",
                "max_tokens 0 only with echo: true (the prompt scored, nothing generated)",
            )
        return self

    @field_validator("best_of")
    @classmethod
    def _best_of_is_n(cls, value: int | None, info: ValidationInfo) -> int | None:
        """OpenAI draws best_of and answers the n most likely; drawing n is all this
        server does, which best_of = n asks for too."""
        n = info.data.get("n", 1)
        if value is not None and value != n:
            raise PydanticCustomError(
                "unsupported", "only n ({n}) or null: completions are not ranked", {"n": n}
            )
        return value

    _suffix_only_null = field_validator("suffix", mode="wrap")(_only_value)

    @property
    def prompts(self) -> list[str | list[int]]:
        """Each prompt: a text, or token ids."""
        prompt = self.prompt
        if isinstance(prompt, str) or isinstance(prompt[0], int):
            return [prompt]  # one text, or one list of ids
        return list(prompt)

    def choices(self) -> list[tuple[str | list[int], list[GenerationFields]]]:
        """Each prompt and the fields of its n choices, in the order of the choices'
        indices."""
        each = self.choice_fields()
        return [(prompt, each) for prompt in self.prompts]


class CompletionLogprobs(BaseModel):
    """Per generated token (also those of a stop string, which the text leaves out), and
    with echo first per prompt token, in OpenAI's form; a token that is a piece of a
    character is `bytes:` and its bytes, a special token its content (`<|endoftext|>`)."""

    tokens: list[str]
    token_logprobs: list[float | None] = Field(
        description="null for the first token of an echoed prompt: nothing comes before it"
    )
    top_logprobs: list[dict[str, float] | None] = Field(
        description="the likeliest, as many as asked, and the drawn token's (so up to "
        "logprobs + 1, as OpenAI's); null where token_logprobs is"
    )
    text_offset: list[int] = Field(
        description="where in the choice's text the token's text begins (a prompt "
        "token's counts the prompt as tokenized)"
    )


class CompletionChoice(BaseModel):
    index: int = Field(
        description="which choice: prompt i's j-th (from 0) of n is i x n + j, as OpenAI orders"
    )
    text: str = Field(
        description="the completion (with echo, after its prompt); in a stream, the delta "
        "since the last chunk"
    )
    logprobs: CompletionLogprobs | None = Field(
        None, description="with the request's `logprobs`: this text's tokens'"
    )
    finish_reason: FinishReason | None = Field(
        description="in a stream, null until the choice's last chunk"
    )
    stop_reason: str | None = Field(description=STOP_REASON)


class Completion(BaseModel):
    """The answer, and (`choices` holding deltas) each chunk of a stream; a stream's
    choices come one per chunk, interleaved."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(description="Unix time, seconds")
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = Field(
        None,
        description="every choice's tokens together; in a stream, only on the last chunk "
        "(with stream_options.include_usage)",
    )


# --- POST /v1/chat/completions: OpenAI's chat completions API ---------------------------

ChatRole = Literal[CHAT_ROLES]


class ChatContentPart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    type: Literal["text"]
    text: str  # its Unicode checked by ChatMessage's content


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    _null_is_left_out = model_validator(mode="before")(_null_is_left_out)

    role: ChatRole
    content: str | NonEmpty[ChatContentPart] = Field(
        description="text, or a list of text parts (joined with newlines, as vLLM joins them)"
    )
    name: str | None = Field(None, description="passed to the chat template as `name`")

    @field_validator("content", mode="wrap")
    @classmethod
    def _one_content_error(cls, value: object, handler: ValidatorFunctionWrapHandler) -> object:
        """One message for `content`, not one per branch of its union; a lone surrogate
        its own."""
        if isinstance(value, str):
            return handler(_valid_unicode(value))
        if isinstance(value, list):
            for number, part in enumerate(value, start=1):
                if isinstance(part, dict) and isinstance(text := part.get("text"), str):
                    _valid_unicode(text, f" of part {number}")
        try:
            return handler(value)
        except ValidationError:
            raise PydanticCustomError(
                "content",
                'must be a string or a non-empty list of text parts ({"type": "text", "text": '
                "...}); images, audio and files are not taken",
            ) from None

    @field_validator("name")
    @classmethod
    def _name_is_unicode(cls, value: str | None) -> str | None:
        return None if value is None else _valid_unicode(value)

    def for_template(self) -> dict[str, str]:
        """The message as a chat template reads it: role, content as one text, name."""
        content = self.content
        if not isinstance(content, str):
            content = "\n".join(part.text for part in content)
        named = {} if self.name is None else {"name": self.name}
        return {"role": self.role, "content": content, **named}


class ChatCompletionRequest(OpenAIRequest):
    """OpenAI's chat completions request: the messages become the prompt through the
    served checkpoint's chat template (model/chat_template.py), then it is served as a completion
    of it. Tools, images and response formats are not taken (unknown fields: 422)."""

    messages: NonEmpty[ChatMessage]
    max_completion_tokens: int | None = Field(
        None, ge=1, description="OpenAI's newer name for max_tokens; the same if both are sent"
    )
    logprobs: bool = Field(
        False,
        description="with each generated token, its log-probability under the model (before "
        "logit_bias, temperature, penalties or truncation, as vLLM reports them)",
    )
    top_logprobs: int | None = Field(
        None,
        ge=0,
        le=MAX_TOP_LOGPROBS,
        description="with logprobs: the log-probabilities of this many likeliest tokens too",
    )
    add_generation_prompt: bool = Field(
        True,
        description="vLLM's: the template opens the assistant's turn after the messages "
        "(false: the prompt ends where the template's text of the messages ends)",
    )

    @model_validator(mode="after")
    def _one_max_tokens(self) -> ChatCompletionRequest:
        given = self.max_completion_tokens
        if given is not None:
            if self.max_tokens is not None and self.max_tokens != given:
                raise PydanticCustomError(
                    "unsupported",
                    "max_tokens and max_completion_tokens differ: send one of them",
                )
            self.max_tokens = given
            self.model_fields_set.add("max_tokens")
        return self

    @model_validator(mode="after")
    def _top_logprobs_only_with_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise PydanticCustomError("unsupported", "top_logprobs only with logprobs: true")
        return self

    @property
    def reported_logprobs(self) -> int | None:
        """GenerationRequest.logprobs: how many likeliest tokens to report, or None."""
        return (self.top_logprobs or 0) if self.logprobs else None


class ChatTopLogprob(BaseModel):
    token: str = Field(
        description="the token's text, or `bytes:` and its bytes escaped; a special token's "
        "content (`<|im_end|>`)"
    )
    logprob: float
    bytes: list[int] = Field(
        description="the token's UTF-8 bytes: none for a special token (it adds no text)"
    )


class ChatTokenLogprob(ChatTopLogprob):
    top_logprobs: list[ChatTopLogprob] = Field(
        description="the top_logprobs likeliest tokens at this position, likeliest first"
    )


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob]


class ChatCompletionMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = Field(description="which choice: the j-th (from 0) of n")
    message: ChatCompletionMessage
    logprobs: ChatLogprobs | None = Field(None, description="with the request's `logprobs`")
    finish_reason: FinishReason
    stop_reason: str | None = Field(description=STOP_REASON)


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(description="Unix time, seconds")
    model: str
    choices: list[ChatChoice]
    usage: Usage = Field(description="every choice's tokens together; the prompt counted once")


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = Field(
        None, description="on each choice's first chunk, which has no content yet"
    )
    content: str | None = Field(None, description="the text since the choice's last chunk")


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None = Field(description="null until the choice's last chunk")
    stop_reason: str | None = Field(None, description=STOP_REASON)


class ChatCompletionChunk(BaseModel):
    """One SSE event of a chat completion's stream: first a chunk per choice with its role,
    then the choices' text as it comes, interleaved, one choice per chunk."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(description="Unix time, seconds")
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = Field(
        None,
        description="with stream_options.include_usage: null on every chunk but a last one "
        "with no choices",
    )


# --- POST /tokenize, POST /detokenize: vLLM's routes, to count and read tokens -----------


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = Field(None, description=SERVED_MODEL_ID)
    prompt: str | None = Field(
        None,
        description="text, read as a prompt of /v1/generate or /v1/completions is read; or "
        "messages instead",
    )
    messages: NonEmpty[ChatMessage] | None = Field(
        None, description="a chat, read as /v1/chat/completions reads it (vLLM's); or prompt"
    )
    add_generation_prompt: bool = Field(True, description="with messages: as on a chat")
    return_token_strs: bool = Field(False, description="also answer each token's string")
    add_special_tokens: Literal[False] = Field(
        False, description=f"vLLM's; only {_ONLY_VALUE['add_special_tokens']}"
    )

    _add_special_tokens_only_false = field_validator("add_special_tokens", mode="wrap")(_only_value)

    @field_validator("prompt")
    @classmethod
    def _prompt_is_unicode(cls, value: str | None) -> str | None:
        return None if value is None else _valid_unicode(value)

    @model_validator(mode="after")
    def _prompt_or_messages(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise PydanticCustomError("prompt", "send a prompt or messages: one of the two")
        return self


class TokenizeResponse(BaseModel):
    count: int = Field(description="the prompt's tokens: its usage.prompt_tokens when served")
    max_model_len: int = Field(description="the served context: prompt + max_tokens fit in it")
    tokens: list[int]
    token_strs: list[str] | None = Field(
        description="with return_token_strs: each token as the tokenizer spells it (a byte-"
        "level BPE writes a space as Ġ), as transformers' convert_ids_to_tokens"
    )


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = Field(None, description=SERVED_MODEL_ID)
    tokens: list[Annotated[int, Field(ge=0)]] = Field(
        description="token ids of the tokenizer", fail_fast=True
    )


class DetokenizeResponse(BaseModel):
    prompt: str = Field(
        description="the tokens' text (special tokens have none; bytes that are no UTF-8 "
        "read as U+FFFD)"
    )


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(description="Unix time, seconds: when the server loaded the model")
    owned_by: str = "pocketgpt"
    max_context: int
    checkpoint: str = Field(
        description="the folder served: a run's step folder (e.g. step-0000400), as `latest` "
        "named it when the server started, or the model folder given"
    )


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    type: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorDetail


class ApiError(HTTPException):
    """An error answered with the envelope `{"error": {"type", "message"}}`.

    An HTTPException, so that FastAPI passes one raised while it reads a request's body
    (validation.parse_json_body) on as it is, not as its own "error parsing the body".
    """

    def __init__(
        self, status_code: int, type: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(status_code, message)
        self.type = type
        self.message = message
        self.headers = headers or {}

    def body(self) -> ErrorResponse:
        return ErrorResponse(error=ErrorDetail(type=self.type, message=self.message))
