"""Edge validation: a protocol request becomes a typed, tokenized `GenerationRequest`.

The only place that decides 400 and 422: pydantic's field errors and text that is
not valid Unicode (422), a body that is not JSON (400), and the bound that needs the
tokenizer and the model's context (400, with the numbers). Everything after this
point trusts its input.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

from fastapi.exceptions import RequestValidationError
from tokenizers import Tokenizer

from model.sampling import SamplingParams
from server.protocol import ApiError, GenerateRequest


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    prompt_ids: list[int]
    max_tokens: int
    sampling: SamplingParams
    seed: int | None
    stop: tuple[str, ...]
    ignore_eos: bool
    arrival: float = field(default_factory=time.perf_counter)


class Validator:
    def __init__(self, tokenizer: Tokenizer, max_context: int, bos_id: int) -> None:
        self.tokenizer = tokenizer
        self.max_context = max_context
        self.bos_id = bos_id

    def validate(self, body: GenerateRequest) -> GenerationRequest:
        for text in (body.prompt, *body.stop_strings):
            if not text.isascii():
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError:  # a lone surrogate, e.g. JSON "\\ud800"
                    raise ApiError(
                        422, "invalid_request", "prompt and stop strings must be valid Unicode"
                    ) from None
        # An empty prompt starts a new document, as in training: after end-of-text.
        prompt_ids = self.tokenizer.encode(body.prompt, add_special_tokens=False).ids or [
            self.bos_id
        ]
        total = len(prompt_ids) + body.max_tokens
        if total > self.max_context:
            raise ApiError(
                400,
                "context_length_exceeded",
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({body.max_tokens}) = {total} "
                f"exceeds the model's context of {self.max_context} tokens",
            )
        return GenerationRequest(
            request_id=f"gen-{uuid.uuid4().hex}",
            prompt_ids=prompt_ids,
            max_tokens=body.max_tokens,
            sampling=SamplingParams(
                temperature=body.temperature,
                top_k=body.top_k,
                top_p=body.top_p,
                repetition_penalty=body.repetition_penalty,
                presence_penalty=body.presence_penalty,
                frequency_penalty=body.frequency_penalty,
            ),
            seed=body.seed,
            stop=body.stop_strings,
            ignore_eos=body.ignore_eos,
        )


def invalid_request(exc: RequestValidationError) -> ApiError:
    """FastAPI's validation errors as one envelope: 415 if the body was not read as JSON
    (its Content-Type says otherwise), 400 if it is not JSON, else 422."""
    errors: Sequence[dict] = exc.errors()
    # FastAPI parses JSON only under a JSON Content-Type (or none); any other type
    # hands the raw bytes to validation, e.g. `curl -d` without `-H`.
    if any(e.get("loc") == ("body",) and isinstance(e.get("input"), bytes) for e in errors):
        return ApiError(
            415,
            "unsupported_media_type",
            "the request body was not read as JSON: send it with Content-Type: application/json",
        )
    if any(e.get("type") == "json_invalid" for e in errors):
        return ApiError(400, "invalid_json", "the request body is not valid JSON")
    messages = []
    for e in errors:
        where = ".".join(str(part) for part in e.get("loc", ()) if part != "body") or "body"
        messages.append(f"{where}: {e.get('msg', 'invalid')}")
    return ApiError(422, "invalid_request", "; ".join(messages))
