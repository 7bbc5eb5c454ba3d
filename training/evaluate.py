"""Bits per byte of text under a checkpoint: `python -m training.evaluate`.

Usage: `python -m training.evaluate --checkpoint DIR --data FILE...`.

bpb = total nats over every predicted token / (UTF-8 bytes of the text x ln 2), so
models with different tokenizers compare on the same scale. The text is tokenized
like a validation split (prepare.py): each document preceded by `<|endoftext|>`,
cut into non-overlapping windows of the model's context (`--block-size` for shorter
ones). The trainer reports its val bpb with the same function over windows of its
--block-size, so the two agree on the same text and window length (a fine-tune
trained on windows shorter than its model's context: give that --block-size here).
Conversations (`.jsonl` `messages` records) are scored on what the assistant wrote,
written through the checkpoint's chat template as its fine-tune read them.
The last line printed is `bpb=<value>`.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import signal
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from model.cli import (
    ArgumentParser,
    Terminated,
    default_signal_actions,
    exit_on_signals_while_importing,
    interrupted_status,
    signals_unwind,
    unusable_path,
)

INTERRUPTED = "interrupted: no bits per byte"
if __name__ == "__main__":  # before the imports below: torch takes 1-2 s
    exit_on_signals_while_importing(INTERRUPTED)

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from model.chat_template import load_chat_template
from model.checkpoint import (
    TOKENIZER,
    CheckpointError,
    load_model,
    load_tokenizer,
    read_config,
    resolve_checkpoint,
)
from model.device import cuda_runs_bf16, resolve_device
from training.corpus import Conversation, CorpusError, document_text, load_documents
from training.data import IGNORED, conversation_windows, eval_windows, scored_answers
from training.prepare import (
    check_tokenizer,
    conversation_stream,
    token_byte_lengths,
    token_stream,
)
from training.progress import progress_bar

EVAL_BATCH = 16  # windows per forward; fixed so the trainer and this CLI batch identically
# Fewer where their fp32 logits would pass this (with cross-entropy's float copy and
# log-softmax, ~3x it at the peak): a HF model of 49,152 tokens and 2,048 positions has
# 400 MB of logits per window. pocketgpt's presets batch 16 (`base`: 16 MB a window).
EVAL_LOGITS_BYTES = 512 * 2**20


@dataclass(frozen=True)
class EvalResult:
    loss: float  # nats per predicted token
    bpb: float
    tokens: int  # predicted tokens
    bytes: int  # UTF-8 bytes those tokens stand for


class EvaluationStopped(Exception):
    """`evaluate_stream`'s `stop` said yes before the last batch."""


@torch.no_grad()
def evaluate_stream(
    model: nn.Module,
    tokens: np.ndarray,
    byte_lengths: np.ndarray,
    *,
    block_size: int,
    device: torch.device,
    autocast_dtype: torch.dtype | None = None,
    progress: str | None = None,
    stop: Callable[[], bool] | None = None,
    logits_bytes: int = EVAL_LOGITS_BYTES,
    loss_mask: np.ndarray | None = None,
) -> EvalResult:
    """Loss and bpb of `model` predicting every token of `tokens` after the first (those
    `loss_mask` marks LEARNED, for conversations: what the assistant wrote), in batches
    of EVAL_BATCH windows, or as many as keep their logits within `logits_bytes`.

    progress: a label for a progress bar over the tokens (`progress_bar`).
    stop: asked before each batch; when it says yes, EvaluationStopped is raised (the
    trainer's SIGTERM must not wait for a whole validation split before its save).
    """
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)

    def windows() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        # Drawn as they are scored, not held: as int64 arrays the windows and their
        # targets took ~32 bytes a token, 16x the uint16 stream they are drawn from.
        if loss_mask is None:
            return eval_windows(tokens, block_size)
        return conversation_windows(tokens, loss_mask, block_size)

    window_bytes = block_size * model.config.vocab_size * 4
    batch = max(1, min(EVAL_BATCH, logits_bytes // window_bytes))
    autocast = (
        torch.autocast(device.type, dtype=autocast_dtype)
        if autocast_dtype is not None
        else contextlib.nullcontext()
    )
    n_tokens = n_bytes = 0
    try:
        with progress_bar(progress, sum(len(x) for x, _ in windows()), "tok") as bar:
            for rows in _batches(windows(), batch, shorter_alone=loss_mask is None):
                if stop is not None and stop():
                    raise EvaluationStopped
                x = torch.from_numpy(_padded([w[0] for w in rows], 0)).to(device)  # [B, T]
                y = torch.from_numpy(_padded([w[1] for w in rows], IGNORED)).to(device)
                positions = torch.arange(x.shape[1], device=device).expand_as(x)
                with autocast:
                    logits = model(x, positions)  # [B, T, V]
                flat = logits.flatten(0, 1).float()
                nats = F.cross_entropy(flat, y.flatten(), ignore_index=IGNORED, reduction="sum")
                total += nats.double()
                for _, targets in rows:
                    scored = targets[targets != IGNORED]
                    n_tokens += len(scored)
                    n_bytes += int(byte_lengths[scored].sum())
                bar.update(sum(len(w[0]) for w in rows))
    finally:
        model.train(was_training)
    nats = total.item()
    return EvalResult(
        loss=nats / n_tokens, bpb=nats / (n_bytes * math.log(2)), tokens=n_tokens, bytes=n_bytes
    )


def _batches(
    windows: Iterable[tuple[np.ndarray, np.ndarray]], size: int, *, shorter_alone: bool
) -> Iterator[list[tuple[np.ndarray, np.ndarray]]]:
    """`windows` in batches of up to `size`; `shorter_alone`: a window shorter than its
    batch's first (a stream's last) goes in a batch of its own. (A conversation's window
    is as long as the conversation: its batch is padded, its padding IGNORED.)"""
    rows: list[tuple[np.ndarray, np.ndarray]] = []
    for window in windows:
        shorter = shorter_alone and rows and len(window[0]) < len(rows[0][0])
        if rows and (len(rows) == size or shorter):
            yield rows
            rows = []
        rows.append(window)
    if rows:
        yield rows


def _padded(rows: list[np.ndarray], fill: int) -> np.ndarray:
    """`rows` [T_i] as one [B, max T_i] array, each filled out at its end with `fill`."""
    out = np.full((len(rows), max(len(row) for row in rows)), fill, dtype=np.int64)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(
        prog="python -m training.evaluate",
        description="Print the bits per byte of text under a checkpoint (last line: bpb=...).",
    )
    parser.add_argument("--checkpoint", required=True, help="checkpoint folder or run folder")
    # `--data a --data b` scores both, as the trainer reads both: not b alone.
    parser.add_argument(
        "--data",
        nargs="+",
        action="extend",
        required=True,
        help=".txt/.md/.jsonl files, folders",
    )
    parser.add_argument(
        "--block-size", type=int, help="tokens per window (default: the model's context)"
    )
    parser.add_argument(
        "--device",
        default="auto",
        choices=("auto", "cpu", "cuda"),
        help="where the model runs; auto = CUDA when available (default: auto)",
    )
    args = parser.parse_args(argv)
    if not all(path.strip() for path in args.data):
        # The working folder, as `--data "$UNSET"` leaves it: everything under it scored.
        parser.error(f"--data: a path is empty (got {args.data})")
    try:
        with signals_unwind():  # from here: CUDA's start-up can take seconds
            try:
                device = resolve_device(args.device)
            except ValueError as e:
                parser.error(str(e))
            return evaluate_command(args, device)
    except (KeyboardInterrupt, Terminated) as e:
        print(INTERRUPTED, file=sys.stderr)
        return interrupted_status(e)
    except BrokenPipeError:
        # Its reader went away (`| head -1`): Python ignores SIGPIPE, so the write raised,
        # a traceback. End as a tool SIGPIPE stops, silently: what stdout still buffers
        # goes nowhere (its flush at exit would raise again).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE


def evaluate_command(args: argparse.Namespace, device: torch.device) -> int:
    """Evaluate the checkpoint on the text `args` name and print the result; the exit
    status (2: bad input, said in one line)."""
    try:
        folder = resolve_checkpoint(Path(args.checkpoint))
        # Before the weights: a tokenizer it cannot score with is refused at once (a HF
        # model's weights can take minutes and more memory than the machine has).
        tokenizer = check_tokenizer(load_tokenizer(folder), str(folder / TOKENIZER))
        documents = load_documents(args.data)
        chat = None
        if isinstance(documents[0], Conversation):
            chat = load_chat_template(folder, tokenizer)
            if chat is None:
                raise CorpusError(f"{folder}: no chat template to write the conversations with")
        # And --block-size, from config.json: a flag out of range is named at once, not
        # after the weights' load (minutes for a HF model).
        context = read_config(folder).max_seq_len
        block_size = context if args.block_size is None else args.block_size
        if not 1 <= block_size <= context:
            print(f"error: --block-size must be in 1..{context}", file=sys.stderr)
            return 2
        model = load_model(folder, device=device)
    except (CheckpointError, CorpusError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if (refusal := unusable_path(e)) is None:
            raise
        print(refusal, file=sys.stderr)
        return 2
    texts = [document_text(doc) for doc in documents]
    kind = "conversation" if chat is not None else "document"
    count = f"{len(documents):,} {kind}{'s' if len(documents) != 1 else ''}"
    print(f"evaluating {folder} on {count} ({sum(map(len, texts)):,} characters)")
    sys.stdout.flush()  # before the work, which a pipe's reader may be waiting on
    loss_mask = None
    if chat is None:
        tokens = token_stream(tokenizer, documents, "tokenizing")
    else:
        try:
            tokens, loss_mask = conversation_stream(chat, tokenizer, documents, "tokenizing")
        except CorpusError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        if not scored_answers(tokens, loss_mask, block_size):
            window = (
                f"--block-size {block_size}"
                if args.block_size is not None
                else f"the model's context ({block_size} tokens)"
            )
            print(
                f"error: {window}: no answer lies within {block_size} tokens of its "
                "conversation's start: nothing to score",
                file=sys.stderr,
            )
            return 2
    result = evaluate_stream(
        model,
        tokens,
        token_byte_lengths(tokenizer),
        block_size=block_size,
        device=device,
        # bf16 on a GPU that runs it natively, as the trainer's default dtype there (and its
        # evaluation in it): before Ampere bf16 is emulated, slower than float32.
        autocast_dtype=torch.bfloat16 if device.type == "cuda" and cuda_runs_bf16() else None,
        progress="evaluating",
        loss_mask=loss_mask,
    )
    print(f"checkpoint={folder} tokens={result.tokens} bytes={result.bytes}")
    print(f"loss={result.loss:.6f} nats/token")
    print(f"bpb={result.bpb:.6f}")
    return 0


if __name__ == "__main__":
    default_signal_actions()  # the imports are done: main() takes the signals over
    sys.exit(main())
