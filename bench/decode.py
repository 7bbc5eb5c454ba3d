"""Decode benchmark: our engine (no HTTP) vs HF transformers `generate`, same checkpoint.

    python -m bench.decode --checkpoint checkpoints/default [--batch-sizes 1,8,32]

Same prompts (32 random token ids per row, fixed seed), 128 new tokens per row
(end-of-text ignored on both sides), sampling at temperature 0.8, top_p 0.95.
For each batch size prints tokens/s of both and the ratio, our ms per decode step,
and the share of step time spent outside the model forward (Python, scheduling,
sampling, detokenizing). Runs our engine on the server's own device/dtype choice
unless --device/--dtype say otherwise; HF runs on the same device, and in the same
dtype unless --hf-dtype names another (e.g. our bfloat16 against HF's float32).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from bench.cli import (
    add_checkpoint,
    add_device,
    add_dtypes,
    batch_sizes,
    bench_parser,
    check_compiler,
    check_context,
    check_device,
    exit_on_signals,
    positive_int,
)
from bench.machine import describe
from bench.reference import hf_generate
from bench.timing import frozen_heap, run_async, synchronize
from model.cpu import call_in_own_thread
from model.sampling import SamplingParams
from server.engine import Engine, RequestStream
from server.loading import load_serving
from server.metrics import Metrics
from server.settings import Settings
from server.validation import GenerationRequest

PROMPT_TOKENS = 32
NEW_TOKENS = 128
SAMPLING = SamplingParams(temperature=0.8, top_p=0.95)


class Stopwatch:
    """Wraps a function; sums the seconds spent inside it. On CUDA, the device time between
    events recorded around each call, read once the run is over: a synchronisation after
    each call would hold the step's sampling launches until its forward had finished, a
    stall the server does not have (its one sync per step is the sampled tokens' read)."""

    def __init__(self, fn: Callable, device: torch.device) -> None:
        self.fn, self.device, self.calls = fn, device, 0
        self.wall_seconds = 0.0
        self.events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    def __call__(self, *args: object) -> object:
        self.calls += 1
        if self.device.type != "cuda":
            start = time.perf_counter()
            out = self.fn(*args)
            self.wall_seconds += time.perf_counter() - start
            return out
        began, ended = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        began.record()  # on the engine thread's current stream, as the call's kernels
        out = self.fn(*args)
        ended.record()
        self.events.append((began, ended))
        return out

    @property
    def seconds(self) -> float:
        synchronize(self.device)
        return self.wall_seconds + sum(b.elapsed_time(e) for b, e in self.events) / 1000


async def run_engine(engine: Engine, prompts: Sequence[Sequence[int]]) -> float:
    """Submit every prompt (token ids) at once, wait for all; returns elapsed seconds."""
    engine.start(asyncio.get_running_loop())
    requests = [
        GenerationRequest(
            request_id=uuid.uuid4().hex,
            prompt_ids=[int(token) for token in row],
            max_tokens=NEW_TOKENS,
            sampling=SAMPLING,
            seed=i,
            stop=(),
            ignore_eos=True,
        )
        for i, row in enumerate(prompts)
    ]

    async def drain(stream: RequestStream) -> int:
        return sum([len(output.token_ids) async for output in stream])

    start = time.perf_counter()
    try:
        counts = await asyncio.gather(*(drain(engine.submit(r)) for r in requests))
    finally:
        # Also on a signal: the process must not exit with the engine thread inside
        # torch (the teardown under it aborts: "terminate called", exit 134).
        engine.stop()
    elapsed = time.perf_counter() - start
    assert counts == [NEW_TOKENS] * len(requests), counts
    return elapsed


def ours(
    checkpoint: Path,
    prompts: Sequence[Sequence[int]],
    device: str,
    dtype: str,
    max_batch: int | None = None,
    compile_decode: bool = False,
    cuda_graphs: bool = True,
) -> dict[str, object]:
    """Run every prompt (a [B, T] tensor, or lists of token ids of any lengths) through a
    fresh engine with `max_batch` slots (default: one per prompt)."""
    if compile_decode:
        # As in a fresh server process: torch.compile caches per code object, and past 8
        # engines in one process (rounds of this benchmark) it would silently run eager.
        torch._dynamo.reset()
    settings = Settings(
        checkpoint=checkpoint,
        device=device,
        dtype=dtype,
        max_batch=max_batch or len(prompts),
        max_queue=len(prompts),
        compile_decode=compile_decode,
        cuda_graphs=cuda_graphs,
    )
    # Loaded as the server loads, on a thread that ends, so that the engine thread runs
    # the only OpenMP team (model/cpu.py). Warm-up on a throwaway engine (a stopped
    # engine does not restart): every kernel once.
    warm_up = call_in_own_thread(load_serving, settings, Metrics()).engine
    run_async(run_engine(warm_up, prompts[:1]))
    engine = call_in_own_thread(load_serving, settings, Metrics()).engine
    runner = engine.runner
    decode = runner.decode = Stopwatch(runner.decode, runner.device)
    prefill = runner.prefill = Stopwatch(runner.prefill, runner.device)
    with frozen_heap():
        elapsed = run_async(run_engine(engine, prompts))
    step_s = (elapsed - prefill.seconds) / decode.calls
    return {
        "tokens_per_s": len(prompts) * NEW_TOKENS / elapsed,
        "ms_per_step": 1000 * step_s,
        "outside_forward": 1 - decode.seconds / decode.calls / step_s,
        "device": runner.device,
        "dtype": runner.dtype,
    }


def hf_dtype(choice: str, ours: torch.dtype) -> torch.dtype:
    """`--hf-dtype`: "same" runs HF in our dtype, else the named one."""
    return ours if choice == "same" else getattr(torch, choice)


def hf_reference(
    folder: Path, prompts: torch.Tensor, device: torch.device, dtype: torch.dtype, repeats: int = 1
) -> float:
    """Tokens/s of HF `generate` on `prompts` as one static batch, with this benchmark's
    sampling and length, on a thread of its own (one OpenMP team at a time: model/cpu.py)."""
    return call_in_own_thread(
        hf_generate,
        folder,
        prompts,
        NEW_TOKENS,
        temperature=SAMPLING.temperature,
        top_p=SAMPLING.top_p,
        device=device,
        dtype=dtype,
        repeats=repeats,
    )


def main() -> None:
    exit_on_signals()
    parser = bench_parser("python -m bench.decode", __doc__)
    add_checkpoint(parser)
    parser.add_argument(
        "--batch-sizes",
        type=batch_sizes,
        default="1,8,32",
        help="comma-separated: streams decoding at once, each measured in turn",
    )
    add_device(parser)
    add_dtypes(parser)
    parser.add_argument(
        "--hf-repeats",
        type=positive_int,
        default=1,
        help="HF generate runs timed together per measurement: a steadier reference",
    )
    parser.add_argument(
        "--rounds",
        type=positive_int,
        default=1,
        help="measure ours then HF this many times per batch size and print the median "
        "ratio (a shared machine drifts between runs; alternating pairs sees the same drift)",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="compile our decode step as `python -m server --compile-decode true` does "
        "(CPU: batch 1's step and the larger batches'; CUDA: the step each CUDA graph "
        "captures)",
    )
    parser.add_argument(
        "--no-cuda-graphs",
        action="store_true",
        help="run our CUDA decode eagerly, as `python -m server --cuda-graphs false`",
    )
    args = parser.parse_args()
    check_device(parser, args.device)
    if args.compile:
        check_compiler(parser, args.device, "--compile")
    folder = args.checkpoint
    check_context(parser, folder, PROMPT_TOKENS, NEW_TOKENS)
    for batch in args.batch_sizes:
        generator = torch.Generator().manual_seed(batch)
        prompts = torch.randint(0, 256, (batch, PROMPT_TOKENS), generator=generator)
        ratios = [measure_pair(folder, prompts, args) for _ in range(args.rounds)]
        if args.rounds > 1:
            print(
                f"decode batch {batch:>3}: median ratio {statistics.median(ratios):.2f}x over "
                f"{args.rounds} rounds (min {min(ratios):.2f}x, max {max(ratios):.2f}x)",
                flush=True,
            )


def measure_pair(folder: Path, prompts: torch.Tensor, args: argparse.Namespace) -> float:
    """Our engine, then HF, on the same prompts; prints one line, returns ours / HF."""
    batch = len(prompts)
    mine = ours(
        folder,
        prompts,
        args.device,
        args.dtype,
        compile_decode=args.compile,
        cuda_graphs=not args.no_cuda_graphs,
    )
    reference_dtype = hf_dtype(args.hf_dtype, mine["dtype"])
    hf = hf_reference(folder, prompts, mine["device"], reference_dtype, args.hf_repeats)
    modes = ["compiled"] if args.compile else []
    if mine["device"].type == "cuda":
        modes.append("eager launches" if args.no_cuda_graphs else "CUDA graphs")
    compiled = f" ({', '.join(modes)})" if modes else ""
    print(
        f"decode batch {batch:>3} ({describe(mine['device'])}, "
        f"{str(mine['dtype']).removeprefix('torch.')}): pocketgpt{compiled}"
        f" {mine['tokens_per_s']:,.0f} tok/s vs "
        f"HF generate ({str(reference_dtype).removeprefix('torch.')}) {hf:,.0f} tok/s = "
        f"{mine['tokens_per_s'] / hf:.2f}x; "
        f"{mine['ms_per_step']:.2f} ms/step, {100 * mine['outside_forward']:.0f}% outside "
        "the forward",
        flush=True,
    )
    return mine["tokens_per_s"] / hf


if __name__ == "__main__":
    main()
