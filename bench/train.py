"""Training benchmark: our trainer vs a plain PyTorch loop, and bpb in a time budget.

    python -m bench.train --data ../shared/data/tinyshakespeare.txt [--max-time 70]

1. Throughput: the real `python -m training.pretrain` for `--steps` steps with the
   settings the quality run resolves to (the same `--max-time`, so the same preset,
   vocabulary, batch and compile choice); its steady-state tokens/s comes from the
   JSONL log, the first half of the steps (and torch.compile's build) being warm-up.
   Then, in this process, a nanoGPT-style loop (bench/reference.py) on the identical
   model shape, batch and sequence length.
   `--rounds N` repeats both N times and prints the median ratio.
2. Quality: `training.pretrain --max-time` with default settings on the first 90% of
   the file's bytes, then `training.evaluate` on the last 10% (bits per byte).
Every extra argument after `--` goes to both pretrain runs (e.g. `-- --compile`), but
none naming their files: --data, --val-data and --out-dir are the benchmark's. The
environment's POCKETGPT_* settings do not reach them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.cli import (
    add_device,
    bench_parser,
    check_device,
    ended_with_this_process,
    exit_on_signals,
    positive_float,
    positive_int,
)
from bench.machine import describe
from bench.reference import plain_train_steps
from model.checkpoint import RUN_LOG, load_tokenizer, read_config, resolve_checkpoint
from model.cli import is_setting_variable
from model.device import resolve_device
from model.transformer import Transformer
from training.corpus import read_text
from training.resume import saved_args
from training.run_folder import trainer_meta

PARTS = ("first 90% (the training text)", "last 10% (the held-out text)")
# Pretrain's flags that the benchmark sets for each run itself, refused after `--`: the
# runs read back from their folders, and --data and --val-data add to its split (a run
# given the whole file trained on the held-out text). --out-dir moved the run elsewhere,
# and --help ended it with no run: both a traceback once pretrain had returned.
NOT_HANDED_ON = {
    "--out-dir": "the runs go to a temporary folder of the benchmark's",
    "--data": "the benchmark's own --data is split and handed on",
    "--val-data": "the held-out last 10% of --data is the benchmark's",
    "--help": "see python -m training.pretrain --help",
    "-h": "see python -m training.pretrain --help",
}


def pretrain(args: list[str]) -> None:
    """`python -m training.pretrain` with `args` alone: not the environment's POCKETGPT_*
    settings (a POCKETGPT_INIT_FROM or POCKETGPT_PRESET left set for other work changed
    what the runs measure, unsaid, or failed them)."""
    command = [sys.executable, "-m", "training.pretrain", *args]
    env = {name: value for name, value in os.environ.items() if not is_setting_variable(name)}
    subprocess.run(command, check=True, env=env, preexec_fn=ended_with_this_process())


def split_text(data: bytes) -> tuple[bytes, bytes]:
    """First 90% of the bytes trains, the last 10% is held out (the tinyshakespeare rule)."""
    cut = int(len(data) * 0.9)
    while cut < len(data) and (data[cut] & 0xC0) == 0x80:
        cut += 1  # do not split a UTF-8 character
    return data[:cut], data[cut:]


def split_bytes(path: Path, folder: Path) -> tuple[Path, Path]:
    train, held_out = folder / "train.txt", folder / "held_out.txt"
    for file, part in zip((train, held_out), split_text(path.read_bytes()), strict=True):
        file.write_bytes(part)
    return train, held_out


def check_text(parser: argparse.ArgumentParser, path: Path) -> None:
    """Refuse, naming --data, a file whose parts pretrain would refuse as it reads them:
    its refusal would name the split's files, paths the user never gave."""
    data = path.read_bytes()
    try:  # the split's held-out bytes are scored as text: replaced bytes would skew them
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        parser.error(f"--data {path}: not UTF-8 (at byte offset {e.start:,}: {e.reason})")
    if (nul := data.find(b"\0")) >= 0:  # pretrain skips such a file as binary
        parser.error(f"--data {path}: binary, not text (a NUL byte at offset {nul:,})")
    for part, what in zip(split_text(data), PARTS, strict=True):
        # As pretrain reads each part: a byte-order mark dropped, a blank file no text.
        if not part.decode("utf-8-sig").strip():
            parser.error(f"--data {path}: too small: its {what} is blank; add text")


def our_tokens_per_s(
    train: Path, held_out: Path, out: Path, steps: int, max_time: float, extra: list[str]
) -> float:
    pretrain(
        [
            *("--data", str(train), "--val-data", str(held_out), "--out-dir", str(out)),
            *("--max-steps", str(steps), "--max-time", str(max_time)),
            *("--eval-interval", str(10 * steps), "--sample-tokens", "0", "--eval-tokens", "1024"),
            *extra,
            # After the arguments after `--`: the rate is read from the second window.
            *("--log-interval", str(steps // 2)),
        ]
    )
    meta = trainer_meta(resolve_checkpoint(out))
    if meta["step"] < steps:
        why = (
            f"its --max-time {max_time:g} ran out first; lower --steps or raise --max-time"
            if meta["stopped_by"] == "max_time"
            else f"it stopped by {meta['stopped_by']} (see the arguments after --)"
        )
        raise SystemExit(
            f"error: the throughput run stopped at step {meta['step']} of --steps {steps}: {why}"
        )
    records = [json.loads(line) for line in (out / RUN_LOG).read_text().splitlines()]
    # The second log window's: the first holds the warm-up (and any compile); an odd
    # --steps ends with a one-step record of its own.
    second = 2 * (steps // 2)
    return next(r for r in records if r["kind"] == "train" and r["step"] == second)["tokens_per_s"]


def plain_tokens_per_s(
    run: Path, train: Path, steps: int, device: torch.device, autocast: torch.dtype | None
) -> float:
    folder = resolve_checkpoint(run)
    args = saved_args(folder)
    # The trainer's step: grad_accum micro-batches of [batch, block] (--grad-accum, or
    # POCKETGPT_GRAD_ACCUM), one optimizer step.
    batch, block, accum = args["batch_size"], args["block_size"], args.get("grad_accum", 1)
    text = read_text(train) or ""  # as the trainer reads it (None: a binary file)
    ids = np.array(
        load_tokenizer(folder).encode(text, add_special_tokens=False).ids, dtype=np.int64
    )
    rng = np.random.default_rng(0)
    batches = []
    for _ in range(steps // 2 * accum):
        starts = rng.integers(0, len(ids) - block - 1, batch)
        rows = torch.from_numpy(np.stack([ids[s : s + block + 1] for s in starts]))
        batches.append((rows[:, :-1], rows[:, 1:]))
    torch.manual_seed(0)
    model = Transformer(read_config(folder))
    return plain_train_steps(
        model, batches, device=device, autocast_dtype=autocast, grad_accum=accum
    )


def held_out_bpb(
    train: Path, held_out: Path, out: Path, max_time: float, extra: list[str], device: str
) -> float:
    pretrain(["--data", str(train), "--out-dir", str(out), "--max-time", str(max_time), *extra])
    # On the device the run trained on: left to `auto`, a --device cpu run on a CUDA
    # machine was scored on the GPU, under bf16 autocast (training.evaluate).
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "training.evaluate",
            "--checkpoint",
            str(out),
            "--data",
            str(held_out),
            "--device",
            device,
        ],
        check=True,
        stdout=subprocess.PIPE,  # stderr passes on: a failure's own error line is shown
        text=True,
    )
    return float(result.stdout.strip().splitlines()[-1].removeprefix("bpb="))


def main() -> None:
    exit_on_signals()
    parser = bench_parser(
        "python -m bench.train",
        __doc__,
        epilog="Arguments after `--` go to both training.pretrain runs, e.g. `-- --compile`.",
    )
    parser.add_argument("--data", type=Path, required=True, help="a UTF-8 text file")
    parser.add_argument(
        "--steps", type=positive_int, default=200, help="steps of the throughput runs (>= 2)"
    )
    parser.add_argument(
        "--max-time",
        type=positive_float,
        default=70.0,
        help="seconds of the quality run; the throughput run gets the same limit (so the "
        "same preset and compile choice) and must reach --steps within it",
    )
    add_device(parser)
    parser.add_argument(
        "--rounds",
        type=positive_int,
        default=1,
        help="measure our trainer and the plain loop this many times, alternating, and print "
        "the median ratio (run-to-run drift on a shared machine is as large as the margins)",
    )
    parser.add_argument(
        "--skip-quality",
        action="store_true",
        help="measure throughput only, not bits per byte after --max-time",
    )
    # Only what follows `--` is pretrain's: a misspelt flag before it is an error here,
    # not a setting handed on unseen.
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)
    args, extra = parser.parse_args(argv[:cut]), argv[cut + 1 :]
    for arg in extra:
        name = arg.split("=", 1)[0]  # `--out-dir=runs/a` too
        if name in NOT_HANDED_ON:
            parser.error(f"{name} after `--`: {NOT_HANDED_ON[name]}")
    if not args.data.is_file():
        if args.data.is_dir():
            what = "a folder, not a file"
        elif args.data.exists():  # a device, a named pipe, a socket
            what = "not a regular file"
        else:
            what = "no such file"
        parser.error(f"--data {args.data}: {what}")
    if args.data.suffix.lower() == ".jsonl":
        # Its bytes are split and trained on as text: the JSON syntax with the records.
        parser.error(f"--data {args.data}: .jsonl: the benchmark takes one plain text file")
    check_text(parser, args.data)
    if args.steps < 2:
        parser.error("--steps: at least 2 (the first half of the steps is warm-up)")
    check_device(parser, args.device)
    try:
        run(args, extra)
    except subprocess.CalledProcessError as e:
        if e.returncode == 2:  # bad input: the module's own one error line said which
            raise SystemExit(2) from None
        module = e.cmd[2] if len(e.cmd) > 2 else e.cmd
        raise SystemExit(f"error: {module} failed (exit {e.returncode}); see above") from None


def run(args: argparse.Namespace, extra: list[str]) -> None:
    extra = [*extra, "--device", args.device]
    device = resolve_device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        train, held_out = split_bytes(args.data, folder)
        speed_runs = [folder / f"speed-{i}" for i in range(args.rounds)]
        ratios = [throughput_round(args, extra, train, held_out, run, device) for run in speed_runs]
        if args.rounds > 1:
            print(
                f"train throughput: median {statistics.median(ratios):.2f}x the plain loop "
                f"(float32) over {args.rounds} rounds (min {min(ratios):.2f}x, max "
                f"{max(ratios):.2f}x)"
            )
        if not args.skip_quality:
            start = time.perf_counter()
            bpb = held_out_bpb(
                train, held_out, folder / "quality", args.max_time, extra, args.device
            )
            wall = time.perf_counter() - start
            print(
                f"train quality: {bpb:.3f} bits/byte on the held-out last 10% of {args.data.name}"
                f" after --max-time {args.max_time:g} (whole run {wall:.0f}s)"
            )


def throughput_round(
    args: argparse.Namespace,
    extra: list[str],
    train: Path,
    held_out: Path,
    run: Path,
    device: torch.device,
) -> float:
    """Our trainer, then the plain loop, on the same shape; prints one line, returns
    our tokens/s over the plain fp32 loop's."""
    ours = our_tokens_per_s(train, held_out, run, args.steps, args.max_time, extra)
    speed_args = saved_args(resolve_checkpoint(run))
    plain = plain_tokens_per_s(run, train, args.steps, device, None)
    compiled = "compiled" if speed_args["compile"] else "eager"
    mode = f"{compiled}, {speed_args['dtype']}, {speed_args['optimizer']}"
    line = (
        f"train throughput ({describe(device)}): pocketgpt ({mode}) {ours:,.0f} tok/s vs"
        f" plain loop (float32) {plain:,.0f} tok/s = {ours / plain:.2f}x"
    )
    if speed_args["dtype"] == "bfloat16":
        # The same loop under bf16 autocast: how much of the gap is the dtype alone.
        plain_bf16 = plain_tokens_per_s(run, train, args.steps, device, torch.bfloat16)
        line += f"; plain loop (bfloat16) {plain_bf16:,.0f} tok/s = {ours / plain_bf16:.2f}x"
    print(line, flush=True)
    return ours / plain


if __name__ == "__main__":
    main()
