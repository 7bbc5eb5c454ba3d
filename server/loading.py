"""A checkpoint made ready to serve: the files the server reads from it besides the
weights, checked (so that `python -m server` and the benchmarks refuse a bad one in one
line before the model loads), then the model loaded and the engine built and warmed up
(the app's lifespan, on a worker thread).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer

from model.chat_template import ChatTemplate, load_chat_template
from model.checkpoint import (
    CONFIG,
    LATEST,
    TOKENIZER,
    end_of_text_id,
    load_model,
    load_tokenizer,
    load_weights,
    read_config,
    resolve_checkpoint,
)
from model.device import cuda_runs_bf16, resolve_device
from model.token_bytes import token_bytes
from server.engine import Engine
from server.metrics import Metrics
from server.routes import Serving
from server.settings import Settings
from server.validation import Validator, end_of_text_ids, sampling_defaults


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name != "auto":
        return getattr(torch, name)
    if device.type == "cuda":
        # Not bf16 where it is only emulated (before Ampere): fp16 runs natively there.
        return torch.bfloat16 if cuda_runs_bf16() else torch.float16
    return torch.float32


def model_name(settings: Settings) -> str:
    """--model-name, else the name of the model folder, or of the run folder whose step
    folder or best/ is served (a client sees "notes", not "best" or "step-0000400")."""
    if settings.model_name:
        return settings.model_name
    folder = Path(settings.checkpoint).resolve()
    in_run = (folder / CONFIG).is_file() and (folder.parent / LATEST).is_file()
    return folder.parent.name if in_run else folder.name


@dataclass(frozen=True)
class ServingFiles:
    """What the server reads from a checkpoint besides its weights, checked."""

    folder: Path  # the checkpoint folder (a run folder's `latest`)
    tokenizer: Tokenizer
    token_table: list[bytes]  # id -> its bytes
    token_names: list[str]  # id -> its name in logprobs (logprob_names)
    eos_id: int  # <|endoftext|>
    end_ids: frozenset[int]  # every id that ends a text
    defaults: dict[str, float | int]  # sampling defaults (generation_config.json)
    chat: ChatTemplate | None  # the chat template, if the checkpoint has one


def read_serving_files(checkpoint: Path) -> ServingFiles:
    """The checkpoint's tokenizer and generation settings; a CheckpointError or
    ValueError naming the file if the server cannot use them. Pure Python: safe on the
    thread that runs the event loop (no torch op starts an OpenMP team there)."""
    folder = resolve_checkpoint(checkpoint)
    tokenizer = load_tokenizer(folder)
    try:
        token_table = token_bytes(tokenizer)
        eos_id = end_of_text_id(tokenizer)
    except ValueError as e:
        raise ValueError(f"{folder / TOKENIZER}: {e}") from None
    end_ids = end_of_text_ids(folder, eos_id, len(token_table))
    defaults = sampling_defaults(folder)
    chat = load_chat_template(folder, tokenizer)
    names = logprob_names(tokenizer, token_table)
    return ServingFiles(folder, tokenizer, token_table, names, eos_id, end_ids, defaults, chat)


def logprob_names(tokenizer: Tokenizer, token_table: list[bytes]) -> list[str]:
    """Each token id as OpenAI's logprobs name it: a special token by its content
    (`<|endoftext|>`: its bytes are none, as the text has none of it), another by its text,
    or (a piece of a character, as a byte-level BPE has) `bytes:` and its bytes escaped.
    Special tokens get names of their own, so that none hides another in a top_logprobs
    object (their names as text would all be "").
    """
    special = {i: t.content for i, t in tokenizer.get_added_tokens_decoder().items() if t.special}
    return [special.get(i) or _token_text(token) for i, token in enumerate(token_table)]


def _token_text(token: bytes) -> str:
    try:
        return token.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in token)


def check_serving_files(checkpoint: Path) -> Path:
    """The checkpoint folder, once every file the server loads is checked (tokenizer,
    generation settings, config, the weights' names, shapes and bytes); a CheckpointError
    or ValueError naming the file otherwise. No arithmetic: safe on the thread that will
    run the event loop, where a parallel torch op would start a second OpenMP team,
    doubling the engine's decode step on 2 cores (model/cpu.py; BENCHMARKS.md, eighth
    CPU pass)."""
    folder = read_serving_files(checkpoint).folder
    load_weights(folder, read_config(folder))
    return folder


def load_serving(settings: Settings, metrics: Metrics) -> Serving:
    """Load the checkpoint, build the engine and warm it up (blocking; a worker thread)."""
    device = resolve_device(settings.device)
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    files = read_serving_files(settings.checkpoint)
    model = load_model(
        files.folder,
        device=device,
        dtype=resolve_dtype(settings.dtype, device),
        max_seq_len=settings.max_context,
    )
    engine = Engine(
        model,
        files.token_table,
        end_ids=files.end_ids,
        n_slots=settings.max_batch,
        max_queue=settings.max_queue,
        prefill_chunk=settings.prefill_chunk,
        metrics=metrics,
        compile_decode=settings.compile_decode,
        cuda_graphs=settings.cuda_graphs,
    )
    with torch.inference_mode():
        engine.runner.warm_up()
    max_context = model.config.max_seq_len
    return Serving(
        engine,
        Validator(
            files.tokenizer,
            files.token_table,
            max_context,
            files.eos_id,
            files.defaults,
            context_limited=settings.max_context is not None,
        ),
        model_name(settings),
        max_context,
        settings.stream_interval,
        files.folder,
        files.chat,
        files.token_names,
    )
