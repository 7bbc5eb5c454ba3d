"""What every bench command does at its edge: argument types and checks that refuse a bad
value in one line (argparse prints `error: ...` and exits 2), and SIGTERM and Ctrl-C
handled alike, so that a stopped benchmark stops the server or trainer it started."""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import get_args

from bench.reference import STOP_REFERENCE
from model.checkpoint import CheckpointError, read_config
from model.cli import ArgumentParser
from model.device import resolve_device
from model.inductor import has_compiler, missing_compiler_message
from server.loading import check_serving_files
from server.settings import MAX_BATCH_LIMIT, Settings

DTYPES = get_args(Settings.model_fields["dtype"].annotation)  # the server's --dtype choices


class _DefaultsShown(argparse.HelpFormatter):
    """--help ends each option's line with its default (a required option or a switch
    has none to show)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        none = action.default is None or action.default is False  # required, or a switch
        if not none and action.default is not argparse.SUPPRESS and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


def bench_parser(prog: str, doc: str, epilog: str | None = None) -> ArgumentParser:
    """A bench command's parser: described by its module's first docstring line."""
    return ArgumentParser(
        prog=prog, description=doc.splitlines()[0], epilog=epilog, formatter_class=_DefaultsShown
    )


def add_checkpoint(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkpoint",
        type=checkpoint_folder,
        required=True,
        help="a checkpoint folder, or a run folder (the checkpoint its `latest` names)",
    )


def add_device(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device",
        default="auto",
        choices=("auto", "cpu", "cuda"),
        help="where the models run; auto = CUDA when available",
    )


def add_dtypes(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=DTYPES,
        help="our weights' and KV cache's dtype: the server's --dtype",
    )
    parser.add_argument(
        "--hf-dtype",
        default="same",
        choices=("same", "float32", "bfloat16"),
        help="HF generate's dtype; same = ours",
    )


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def at_most(limit: int, why: str = "") -> Callable[[str], int]:
    """A positive integer up to `limit`: a value handed on to the server's flag of that
    bound, refused here in one line rather than by the server once it starts (its error
    and then the benchmark's, exit status 1). `why`, if given, ends the refusal."""

    def bounded(text: str) -> int:
        value = positive_int(text)
        if value > limit:
            because = f" ({why})" if why else ""
            raise argparse.ArgumentTypeError(f"at most {limit}, got {value}{because}")
        return value

    return bounded


def each_at_most(limit: int, why: str = "") -> Callable[[str], list[int]]:
    """A comma-separated list of positive integers, each up to `limit` (`at_most`)."""
    bounded = at_most(limit, why)

    def parse(text: str) -> list[int]:
        return [bounded(part) for part in text.split(",")]

    return parse


# Comma-separated batch sizes, each one a server's --max-batch may be.
batch_sizes = each_at_most(MAX_BATCH_LIMIT, "the server's --max-batch")


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value}")
    return value


def checkpoint_folder(text: str) -> Path:
    """A checkpoint folder, or a run folder's newest (what `latest` names), whose files
    the server would take: checked as `python -m server` checks them before loading, so
    that a missing tokenizer or truncated weights are one error line, not a traceback
    from the benchmark's first load."""
    try:
        return check_serving_files(Path(text))
    except (CheckpointError, ValueError) as e:
        raise argparse.ArgumentTypeError(str(e)) from None


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
    try:
        resolve_device(device)
    except ValueError as e:
        parser.error(str(e))


def check_compiler(parser: argparse.ArgumentParser, device: str, option: str) -> None:
    """Refuse `option` (a torch.compile of ours) where no compiler would build its
    kernels, as `python -m server --compile-decode true` refuses it: else torch's
    traceback at the first compiled step, or the server's error and then the
    benchmark's. After check_device."""
    resolved = resolve_device(device)
    if not has_compiler(resolved):
        parser.error(f"{option}: {missing_compiler_message(resolved)}")


_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def ended_with_this_process() -> Callable[[], None] | None:
    """A `preexec_fn` for a benchmark's child (its server, its trainer): SIGTERM to the
    child when this process dies, however it dies. A SIGKILL (a supervisor's, after its
    grace period) runs no `finally`, and the child ran on, a server still serving. None
    where there is no prctl (not Linux)."""
    name = ctypes.util.find_library("c") if sys.platform.startswith("linux") else None
    if name is None:
        return None
    prctl = ctypes.CDLL(name, use_errno=True).prctl  # looked up before the fork
    parent = os.getpid()

    def set_death_signal() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # it died before prctl: no signal would ever come
            os.kill(os.getpid(), signal.SIGTERM)

    return set_death_signal


def exit_on_signals() -> None:
    """SIGTERM (kill, docker stop, a cancelled CI job) and Ctrl-C unwind the stack: the
    `finally` blocks stop the server, the trainer and their temporary folders, and the
    process exits 128 + the signal's number, without a KeyboardInterrupt traceback."""

    def stop(signum: int, frame: object) -> None:
        STOP_REFERENCE.set()  # else the unwinding waits for a running HF generate to end
        sys.exit(128 + signum)

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, stop)
