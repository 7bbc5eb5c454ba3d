"""What every bench command does at its edge: argument types and checks that refuse a bad
value in one line (argparse prints `error: ...` and exits 2), and SIGTERM and Ctrl-C
handled alike, so that a stopped benchmark stops the server or trainer it started."""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

import torch

from model.checkpoint import CheckpointError, read_config, resolve_checkpoint


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def positive_ints(text: str) -> list[int]:
    """A comma-separated list of positive integers, e.g. `1,8,32`."""
    return [positive_int(part) for part in text.split(",")]


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value}")
    return value


def checkpoint_folder(text: str) -> Path:
    """A checkpoint folder, or a run folder's newest (what `latest` names)."""
    try:
        folder = resolve_checkpoint(Path(text))
        read_config(folder)
    except CheckpointError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return folder


def check_context(
    parser: argparse.ArgumentParser, folder: Path, prompt_tokens: int, new_tokens: int
) -> None:
    """Refuse, naming the numbers, a checkpoint too short for the benchmark's requests."""
    context = read_config(folder).max_seq_len
    if prompt_tokens + new_tokens > context:
        parser.error(
            f"--checkpoint {folder}: its context of {context} tokens is shorter than this "
            f"benchmark's {prompt_tokens}-token prompts + {new_tokens} new tokens; train one "
            f"with --block-size {prompt_tokens + new_tokens} or more"
        )


def check_device(parser: argparse.ArgumentParser, device: str) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available on this machine")


def exit_on_signals() -> None:
    """SIGTERM (kill, docker stop, a cancelled CI job) and Ctrl-C unwind the stack: the
    `finally` blocks stop the server, the trainer and their temporary folders, and the
    process exits 128 + the signal's number, without a KeyboardInterrupt traceback."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda signum, frame: sys.exit(128 + signum))
