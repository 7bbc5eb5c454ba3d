"""Real pieces for the server tests: checkpoints on disk, a uvicorn server on a free
loopback port, and an SSE reader. Imported by tests/test_server_*.py.

Two checkpoints:
- `random_checkpoint`: a randomly initialised tiny model (real attention, real KV
  cache), for batching, scheduling and HTTP behaviour.
- `cycle_checkpoint`: a hand-set model that, greedily, repeats a fixed cycle of
  token "pieces" (Chinese, emoji, ASCII), so tests know the exact text to expect.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import itertools
import json
import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import torch
import uvicorn
from fastapi import FastAPI
from tokenizers import Tokenizer

from model.checkpoint import save_checkpoint, text_literally
from model.config import ModelConfig
from model.transformer import Transformer
from server.app import create_app
from server.http11 import uvicorn_config
from server.settings import Settings
from training.tokenizer import train_tokenizer

RANDOM_INIT_STD = 0.1
VOCAB_SIZE = 300  # small enough that non-ASCII characters stay split into byte tokens
# Candidate pieces of the cycle model's text; pieces reusing a token are skipped. NEL and
# LINE SEPARATOR are no line breaks to SSE, but are to readers built on str.splitlines
# (httpx's iter_lines), and JSON may leave them unescaped.
CYCLE_CANDIDATES = ("Hi", " there", "中", "文", "🙂", " and", "世", "界", "!", " ok", "字")
CYCLE_CANDIDATES += ("\x85", "\u2028")
# ChatML, as Qwen's and SmolLM's instruct models write it, after the checkpoint's bos_token.
CHATML = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def english_tokenizer() -> Tokenizer:
    """A byte-level BPE trained on English only (standard-library docstrings); a copy of
    its own for each call, so that a test adding tokens to one changes no other test's."""
    return text_literally(Tokenizer.from_str(_english_tokenizer_json()))


@functools.cache
def _english_tokenizer_json() -> str:
    modules = (argparse, collections, contextlib, functools, itertools, json, re, threading)
    return train_tokenizer([m.__doc__ or "" for m in modules], VOCAB_SIZE).to_str()


def random_checkpoint(
    root: Path, tokenizer: Tokenizer, padded_rows: int = 0, n_layers: int | None = None
) -> Path:
    """A random `tiny` model for `tokenizer`, with `padded_rows` embedding rows past its
    ids (as a checkpoint padded to a round vocabulary has); `n_layers` instead of tiny's."""
    torch.manual_seed(0)
    config = ModelConfig.from_preset(
        "tiny", vocab_size=tokenizer.get_vocab_size() + padded_rows, max_seq_len=1024
    )
    if n_layers is not None:
        config = config.replace(n_layers=n_layers)
    model = Transformer(config)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                # Wider than the training init: outputs then depend strongly on the context
                # (a mixed-up KV cache shows), and top-1 logits lead by far more than the
                # float noise between batch shapes.
                param.normal_(0.0, RANDOM_INIT_STD)
    return save_checkpoint(root, "random", model, tokenizer)


def cycle_pieces(tokenizer: Tokenizer) -> list[tuple[str, list[int]]]:
    """The cycle: (text, token ids) pieces whose ids are all distinct."""
    used: set[int] = set()
    pieces = []
    for text in CYCLE_CANDIDATES:
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        if len(set(ids)) == len(ids) and not used & set(ids):
            used |= set(ids)
            pieces.append((text, ids))
    return pieces


def cycle_checkpoint(root: Path, tokenizer: Tokenizer, cycle: list[int] | None = None) -> Path:
    """One-hot embeddings, layers that add nothing, and an LM head mapping each cycle
    token (default: cycle_pieces') to its successor: greedy decoding walks the cycle
    forever."""
    vocab = tokenizer.get_vocab_size()
    config = ModelConfig(
        vocab_size=vocab,
        dim=320,
        n_layers=1,
        n_heads=4,
        ffn_dim=64,
        max_seq_len=256,
        tie_embeddings=False,
    )
    assert vocab <= config.dim
    model = Transformer(config)
    if cycle is None:
        cycle = [i for _, ids in cycle_pieces(tokenizer) for i in ids]
    with torch.no_grad():
        model.embed_tokens.weight.zero_()
        model.embed_tokens.weight[:, :vocab] = torch.eye(vocab)
        for layer in model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.lm_head.weight.zero_()
        for current, following in zip(cycle, cycle[1:] + cycle[:1], strict=True):
            model.lm_head.weight[following, current] = 1.0
    return save_checkpoint(root, "cycle", model, tokenizer)


def with_template(folder: Path, template: str) -> Path:
    """The checkpoint `folder`, given the chat template `template` (as transformers 5
    saves one)."""
    (folder / "chat_template.jinja").write_text(template, encoding="utf-8")
    return folder


@contextlib.contextmanager
def running_server(
    settings: Settings,
    ready_within: float = 60.0,
    expect_ready: bool = True,
    app: FastAPI | None = None,
    send_buffer: int | None = None,
) -> Iterator[str]:
    """Serve `app` (default: `create_app(settings)`) with uvicorn in a thread, configured
    as `python -m server` configures it (on a socket of its own); yield its base URL once
    /health says ready (or, with `expect_ready=False`, once it answers at all).
    `send_buffer`: the kernel's send buffer of each connection, in bytes (default: the
    kernel's own, growing to megabytes), so that a client that stops reading stops the
    server's writes after a few kilobytes."""
    sock = socket.socket()
    if send_buffer is not None:  # accepted connections inherit it
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer)
    sock.bind(("127.0.0.1", 0))
    base_url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    app = create_app(settings) if app is None else app
    server = uvicorn.Server(uvicorn_config(app, settings, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        if expect_ready:
            wait_until(lambda: _health(base_url) == 200, ready_within, "server ready")
        else:
            wait_until(lambda: _health(base_url) is not None, ready_within, "server up")
        yield base_url
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
        assert not thread.is_alive(), "the server did not stop within 30 s"


def _health(base_url: str) -> int | None:
    try:
        return httpx.get(f"{base_url}/health", timeout=2).status_code
    except httpx.TransportError:
        return None


def wait_until(condition, timeout: float, what: str, interval: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def sse_events(response: httpx.Response) -> Iterator[dict | str]:
    """The `data:` payloads of an SSE response: parsed JSON, or the string "[DONE]"."""
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line.removeprefix("data: ")
            yield data if data == "[DONE]" else json.loads(data)
        else:
            assert line == "" or line.startswith(":"), f"unexpected SSE line {line!r}"


def metric_samples(
    base_url: str, headers: dict[str, str] | None = None
) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """/metrics parsed by prometheus_client: {(sample name, sorted labels): value}.
    `headers`: what the request needs (an API key)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{base_url}/metrics", headers=headers, timeout=5).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def abandon_request(base_url: str, body: dict) -> None:
    """POST `body` to /v1/generate on a connection of its own, and close it once the
    server has the request running (a JSON request: it answers nothing before the end):
    a client that gave up waiting, without a client timer racing the generation."""
    host, port = base_url.removeprefix("http://").split(":")
    payload = json.dumps(body).encode()
    head = (
        "POST /v1/generate HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n"
    )
    running = ("pocketgpt_requests_running", ())
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(head.encode() + payload)
        wait_until(lambda: metric_samples(base_url)[running] >= 1, 30, "the request running")
