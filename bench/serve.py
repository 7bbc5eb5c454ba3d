"""Serving benchmark: N concurrent SSE clients against a real `python -m server`.

    python -m bench.serve --checkpoint checkpoints/default --clients 1,8,32,128

For each concurrency N: N clients stream one request each at the same moment
(prompts from a fixed mix, 128 new tokens, temperature 0.8, top_p 0.95, end-of-text
ignored so every request makes the same work). Prints aggregate tokens/s, time to
first token and inter-token latency (p50/p99; the wait between a stream's consecutive
tokens as its client receives them), errors, the HTTP + SSE overhead
against the raw engine (bench/decode.py's in-process run) on the same prompts and
concurrency, the ratio against HF transformers `generate` running the same prompts
as one static batch of N (in --hf-dtype), and the CPU the clients themselves used (on
a small machine they compete with the server for the same cores). Loopback only;
each concurrency's HTTP clients are bounded by --timeout (the raw engine and HF's
batch, in process, run the same fixed requests: bounded by them), and the server is
stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import aiohttp
import httpx
import torch

from bench.cli import (
    add_checkpoint,
    add_device,
    add_dtypes,
    at_most,
    bench_parser,
    check_compiler,
    check_context,
    check_device,
    each_at_most,
    ended_with_this_process,
    exit_on_signals,
    positive_float,
    positive_int,
)
from bench.decode import NEW_TOKENS, SAMPLING, hf_dtype, hf_reference, ours
from bench.machine import describe
from bench.timing import frozen_heap, run_async
from model.checkpoint import load_tokenizer
from model.cli import env_var
from server.settings import MAX_BATCH_LIMIT, MAX_STREAM_INTERVAL

PROMPTS = (
    "Once upon a time",
    "The quick brown fox",
    "In the beginning was",
    "To be, or not to be:",
    "Here is a short story about a robot who",
    "def fibonacci(n):",
    "Dear friend, I write to you because",
    "The weather today is",
)
MAX_BATCH = 32
# The server's --max-queue, and so the most clients of one concurrency (and of a bench.load
# round): all of them may wait for a slot at once. Past it and the slots the server turned
# clients away (429), errors counted only once the whole round had run; and a typo's huge
# count never reached the server: the benchmark built its prompts until memory ran out.
MAX_CLIENTS = 4096
T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    """The nearest-rank percentile: the smallest value with at least q of them at or below."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def request_body(i: int) -> dict[str, object]:
    """Client i's request: what the raw engine runs (bench.decode's SAMPLING), every field
    a checkpoint's generation_config.json could default given, so that the server adds
    no sampling work (a repetition penalty, top_k) that the raw engine does not do."""
    return {
        "prompt": PROMPTS[i % len(PROMPTS)],
        "max_tokens": NEW_TOKENS,
        "temperature": SAMPLING.temperature,
        "top_p": SAMPLING.top_p,
        "top_k": SAMPLING.top_k,
        "min_p": SAMPLING.min_p,
        "repetition_penalty": SAMPLING.repetition_penalty,
        "seed": i,
        "ignore_eos": True,
        "stream": True,
    }


async def one_stream(
    session: aiohttp.ClientSession, base_url: str, i: int
) -> tuple[int, float, list[float], bool]:
    """(tokens, ttft seconds, inter-token gaps, ok) of one streamed request.

    A gap is the wait between two consecutive tokens' arrival, token by token: an event
    of n tokens (--stream-interval n) gives its first the wait since the event before and
    the other n - 1 a wait of 0, as the client sees them. (The event's wait divided by n,
    once per event, was a mean over n tokens: its p99 hid the bursts a client waits on.)
    """
    body = request_body(i)
    start = time.perf_counter()
    tokens, ttft, gaps, last = 0, float("nan"), [], None
    try:
        async with session.post(f"{base_url}/v1/generate", json=body) as response:
            if response.status != 200:
                return 0, ttft, gaps, False
            async for line in response.content:  # one SSE line at a time
                if not line.startswith(b"data: {"):
                    continue  # blank separators and the closing [DONE]
                n = len(json.loads(line.removeprefix(b"data: ")).get("token_ids", []))
                if not n:
                    continue
                now = time.perf_counter()
                if last is None:
                    ttft = now - start
                else:
                    gaps.append(now - last)
                gaps += [0.0] * (n - 1)  # the event's other tokens came with its first
                tokens, last = tokens + n, now
    except aiohttp.ClientError:  # the connection failed or broke off: an error, counted
        return tokens, ttft, gaps, False
    return tokens, ttft, gaps, tokens == NEW_TOKENS


async def drive(base_url: str, clients: int, timeout: float) -> dict[str, float]:
    # aiohttp, not httpx: its HTTP parser is C, so the load generator, which shares the
    # server's cores, costs ~0.08 of a core at 32 streams instead of httpx's ~0.21.
    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=timeout)
    ) as session:
        with frozen_heap():
            start, cpu_start = time.perf_counter(), time.process_time()
            jobs = asyncio.gather(*(one_stream(session, base_url, i) for i in range(clients)))
            results = await within_timeout(jobs, timeout, f"{clients} streaming clients")
            elapsed = time.perf_counter() - start
            client_cpu = time.process_time() - cpu_start
    ttfts = [r[1] for r in results if r[3]]
    gaps = [g for r in results for g in r[2]]
    return {
        "tokens_per_s": sum(r[0] for r in results) / elapsed,
        "ttft_p50": percentile(ttfts, 0.5),
        "ttft_p99": percentile(ttfts, 0.99),
        "itl_p50": percentile(gaps, 0.5),
        "itl_p99": percentile(gaps, 0.99),
        "errors": sum(not r[3] for r in results),
        # The clients share the machine with the server: their CPU is not the server's.
        "client_cores": client_cpu / elapsed,
    }


async def within_timeout(jobs: Awaitable[T], timeout: float, what: str) -> T:
    """`jobs`' result, or a one-line exit once --timeout passes (the server is stopped)."""
    try:
        return await asyncio.wait_for(jobs, timeout)
    except TimeoutError:
        raise SystemExit(f"error: {what} did not finish within --timeout {timeout:g} s") from None
    except asyncio.CancelledError:  # a signal (run_async)
        if isinstance(jobs, asyncio.Future) and jobs.done() and not jobs.cancelled():
            jobs.exception()  # a cancelled gather holds a CancelledError, else logged unseen
        raise


def start_server(
    checkpoint: Path, port: int, device: str, dtype: str, flags: Sequence[str] = ()
) -> subprocess.Popen:
    """`python -m server` on loopback `port`, with any further server `flags`.

    Its host and key are the benchmark's, not the environment's: a POCKETGPT_HOST of
    0.0.0.0 (the Docker image's) served the benchmark's model to the network, and a
    POCKETGPT_API_KEY turned every client away (401), which send none."""
    command = [sys.executable, "-m", "server", "--checkpoint", str(checkpoint)]
    command += ["--host", "127.0.0.1", "--port", str(port), "--device", device, "--dtype", dtype]
    command += ["--max-queue", str(MAX_CLIENTS), "--log-level", "warning", *flags]
    # Any case: the server reads its settings so (pydantic).
    env = {k: v for k, v in os.environ.items() if k.upper() != env_var("api_key")}
    return subprocess.Popen(
        command,
        env=env | {"PYTHONUNBUFFERED": "1"},
        preexec_fn=ended_with_this_process(),
    )


def wait_ready(base_url: str, process: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(
                f"error: the server exited with {process.returncode} before it was ready (its "
                "own error line is above)"
            )
        try:
            if httpx.get(f"{base_url}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)  # polling interval while the model loads
    raise SystemExit(f"error: the server was not ready within {timeout:.0f} s")


@contextmanager
def running_server(
    checkpoint: Path, device: str, dtype: str, flags: Sequence[str] = ()
) -> Iterator[str]:
    """A real `python -m server` on a free loopback port, ready; yields its base URL.

    The server is sent SIGTERM (killed after 60 s) when the block ends, however it ends.
    """
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    server = start_server(checkpoint, port, device, dtype, flags)
    try:
        wait_ready(base_url, server, timeout=300)
        yield base_url
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def main() -> None:
    exit_on_signals()
    parser = bench_parser("python -m bench.serve", __doc__)
    add_checkpoint(parser)
    parser.add_argument(
        "--clients",
        type=each_at_most(MAX_CLIENTS, "the server's --max-queue"),
        default="1,8,32,128",
        help="comma-separated: concurrent streaming clients, each count measured in turn",
    )
    add_device(parser)
    add_dtypes(parser)
    parser.add_argument(
        "--timeout",
        type=positive_float,
        default=600.0,
        help="seconds the HTTP clients of one concurrency may take",
    )
    parser.add_argument(
        "--rounds",
        type=positive_int,
        default=1,
        help="measure HTTP, the raw engine and HF this many times per concurrency and print "
        "the median overhead and ratio (run-to-run drift on a shared machine is larger than "
        "the overhead)",
    )
    parser.add_argument(
        "--compile-decode",
        action="store_true",
        help="serve (and run the raw engine) with `--compile-decode true`",
    )
    parser.add_argument(
        "--max-batch",
        type=at_most(MAX_BATCH_LIMIT),
        default=MAX_BATCH,
        help="the server's (and the raw engine's) --max-batch: streams generating at once",
    )
    parser.add_argument(
        "--stream-interval",
        type=at_most(MAX_STREAM_INTERVAL),
        default=1,
        help="the server's --stream-interval: tokens per SSE event",
    )
    args = parser.parse_args()
    check_device(parser, args.device)
    if args.compile_decode:
        check_compiler(parser, args.device, "--compile-decode")
    folder = args.checkpoint
    tokenizer = load_tokenizer(folder)
    longest = max(len(tokenizer.encode(prompt, add_special_tokens=False).ids) for prompt in PROMPTS)
    check_context(parser, folder, longest, NEW_TOKENS)
    flags = ["--compile-decode", str(args.compile_decode).lower()]
    flags += ["--max-batch", str(args.max_batch), "--stream-interval", str(args.stream_interval)]
    errors = 0
    with running_server(folder, args.device, args.dtype, flags) as base_url:
        for clients in args.clients:
            run_async(drive(base_url, min(clients, 4), args.timeout))  # warm-up
            ids = [
                tokenizer.encode(PROMPTS[i % len(PROMPTS)], add_special_tokens=False).ids
                for i in range(clients)
            ]
            rounds = [measure_round(base_url, folder, ids, args) for _ in range(args.rounds)]
            overheads, vs_hf, round_errors = zip(*rounds, strict=True)
            errors += sum(round_errors)
            if args.rounds > 1:
                print(
                    f"serve {clients:>4} clients: median overhead "
                    f"{100 * statistics.median(overheads):.0f}% over {args.rounds} rounds "
                    f"(min {100 * min(overheads):.0f}%, max {100 * max(overheads):.0f}%); "
                    f"median vs HF static batch {statistics.median(vs_hf):.2f}x "
                    f"(min {min(vs_hf):.2f}x, max {max(vs_hf):.2f}x)",
                    flush=True,
                )
    if errors:  # numbers measured around failed requests compare nothing
        raise SystemExit(f"error: {errors} requests failed (see the rounds above)")


def measure_round(
    base_url: str, folder: Path, ids: list[list[int]], args: argparse.Namespace
) -> tuple[float, float, int]:
    """HTTP clients, the raw engine, then HF's static batch, on the same prompts (`ids`,
    the server's tokens of each client's); prints one line, returns the HTTP + SSE
    overhead (1 - HTTP tokens/s / raw tokens/s), HTTP tokens/s / HF tokens/s, and the
    failed requests."""
    clients = len(ids)
    http = run_async(drive(base_url, clients, args.timeout))
    raw = ours(
        folder,
        ids,  # as the server gets them: a padded prompt would be more work than HTTP's
        args.device,
        args.dtype,
        max_batch=args.max_batch,
        compile_decode=args.compile_decode,
    )
    reference_dtype = hf_dtype(args.hf_dtype, raw["dtype"])
    # HF's static batch needs one length: each prompt padded with its last token.
    width = max(len(x) for x in ids)
    prompts = torch.tensor([x + x[-1:] * (width - len(x)) for x in ids])
    hf = hf_reference(folder, prompts, raw["device"], reference_dtype)
    overhead = 1 - http["tokens_per_s"] / raw["tokens_per_s"]
    vs_hf = http["tokens_per_s"] / hf
    compiled = ", decode compiled" if args.compile_decode else ""
    print(
        f"serve {clients:>4} clients ({describe(raw['device'])}, "
        f"{str(raw['dtype']).removeprefix('torch.')}{compiled}, max-batch {args.max_batch}, "
        f"stream-interval {args.stream_interval}): "
        f"{http['tokens_per_s']:,.0f} tok/s over HTTP+SSE vs raw engine "
        f"{raw['tokens_per_s']:,.0f} tok/s (overhead {100 * overhead:.0f}%); HF generate "
        f"static batch ({str(reference_dtype).removeprefix('torch.')}) {hf:,.0f} tok/s = "
        f"{vs_hf:.2f}x; "
        f"TTFT p50 {1000 * http['ttft_p50']:.0f} ms p99 {1000 * http['ttft_p99']:.0f} ms; "
        f"ITL p50 {1000 * http['itl_p50']:.1f} ms p99 {1000 * http['itl_p99']:.1f} ms; "
        f"errors {http['errors']}; the clients used {http['client_cores']:.2f} cores",
        flush=True,
    )
    return overhead, vs_hf, http["errors"]


if __name__ == "__main__":
    main()
