"""The training loop: optimizer steps, the LR schedule, evaluation, checkpoints, logging, DDP.

One optimizer step = `grad_accum` micro-batches of [batch_size, block_size] tokens
per rank. The learning rate follows linear warmup, then (`wsd`, the default) holds `lr`
and decays linearly to `lr * min_lr_ratio` over the last `cooldown_fraction` of the
run, or (`cosine`) follows a cosine down to it. Progress is the larger of
steps/decay_steps and, with `--max-time`, elapsed/max_time, so a time-boxed run still
anneals before the clock runs out. Runs limited by steps resume bit-exactly; a
time-boxed run cannot (how many steps fit depends on the clock), but resumes with its
elapsed time restored.

Checkpoints are the model/checkpoint.py format plus `training_state.pt` (plain
tensors, numbers, strings, lists and dicts only, so `torch.load(weights_only=True)`
reads it) and `trainer_meta.json`. Under DDP every rank trains on its own shard of
the tokens; the logged train loss is the ranks' mean; rank 0 alone evaluates, logs
and writes.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import shutil
import signal
import sys
import time
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from model.atomic_files import write_json, write_text_atomic
from model.checkpoint import (
    END_OF_TEXT,
    LATEST,
    RUN_LOG,
    CheckpointError,
    CheckpointWriteError,
    TokenizerExtras,
    check_finite,
    first_non_finite,
    load_tokenizer,
    load_weights,
    read_config,
    save_checkpoint,
)
from model.config import ModelConfig
from model.kv_cache import KVCache
from model.sampling import BatchParams, SamplingParams, sample
from model.transformer import Transformer
from training.args import TrainArgs
from training.data import IGNORED, BatchSampler
from training.defaults import tokens_per_step
from training.distributed import DistInfo, RankStopped, leave_together, share_rank0_error
from training.evaluate import EvalResult, EvaluationStopped, evaluate_stream
from training.optim import make_optimizer
from training.prepare import CONVERSATION_START, LEARNED, PreparedData, token_byte_lengths
from training.progress import bar_output
from training.run_folder import (
    BEST,
    TRAINER_META,
    latest_names,
    recorded_best_loss,
    step_folders,
    step_number,
    trainer_meta,
)
from training.trainer_state import (
    TRAINING_STATE,
    rank_seed,
    read_training_state,
    rng_state,
    save_state,
    set_rng_state,
    torch_rng_state,
)

if typing.TYPE_CHECKING:  # tensorboard: an optional import, made by _tensorboard_writer
    from torch.utils.tensorboard import SummaryWriter

PREVIEW_SAMPLING = SamplingParams(temperature=0.8, top_p=0.95)
PREVIEW_PROMPT_CHARS = 60  # of a chat sample's prompt, its end shown before the reply


@dataclass(frozen=True)
class TrainResult:
    step: int
    val: EvalResult | None
    stopped_by: str  # "max_steps", "max_time", "signal", "early_stopping"
    # The signal's number where stopped_by is "signal" (SIGTERM on a rank that was not
    # sent one itself: the ranks agree to stop together).
    signal: int | None = None


class TrainingDiverged(Exception):
    """A loss came out NaN or infinite: the weights are lost from there on."""


def lr_at(args: TrainArgs, step: int, elapsed: float) -> float:
    """The learning rate of the step from `step` to `step + 1`. Counted to the step's end,
    so that warmup's last step is at the peak and the schedule's last (decay_steps - 1)
    at the floor."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    decay_steps = args.decay_steps or args.max_steps
    progress = (step + 1 - args.warmup_steps) / max(1, decay_steps - args.warmup_steps)
    if args.max_time:
        progress = max(progress, elapsed / args.max_time)
    progress = min(1.0, progress)
    min_lr = args.lr * args.min_lr_ratio
    if args.lr_schedule == "cosine":
        return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (args.lr - min_lr)
    # wsd: the peak until the last cooldown_fraction of the run, then a line down to min_lr.
    remaining = (1.0 - progress) / args.cooldown_fraction
    if remaining >= 1.0:
        return args.lr
    return min_lr + remaining * (args.lr - min_lr)


def next_token_loss(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    positions: torch.Tensor,
    packed: bool = False,
) -> torch.Tensor:
    """Mean cross-entropy of predicting y [B, T] from x [B, T], in fp32, over the targets
    not IGNORED (0 if all are: a window of a conversation's prompt alone). `packed`:
    rows hold several sequences, each's positions from 0 (`Transformer.forward`)."""
    logits = model(x, positions, packed=packed)  # [B, T, V]
    nats = F.cross_entropy(
        logits.flatten(0, 1).float(), y.flatten(), ignore_index=IGNORED, reduction="sum"
    )
    return nats / (y != IGNORED).sum().clamp(min=1)


@contextlib.contextmanager
def deterministic_kernels(enabled: bool) -> Iterator[None]:
    """Within, with `enabled`, torch's deterministic algorithms (as they were after).

    Why: inductor's CPU kernel for the embedding's gradient adds each token's rows into
    its row from every thread at once (atomic adds), in whatever order the threads race
    to, so a compiled run's weights differed from run to run in their last bits, and a
    resumed run was not the uninterrupted one. In deterministic mode inductor calls
    torch's own kernel there, which sums in a fixed order. Set while the compiled step
    is built and run: inductor decides as it builds, and dynamo rebuilds a graph built
    in the other mode.
    """
    if not enabled:
        yield
        return
    before = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    filled = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    # Not also every new tensor filled with NaN (the mode's default, a debugging aid that
    # costs a write of each allocation): no kernel of ours reads memory it did not write.
    torch.utils.deterministic.fill_uninitialized_memory = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before, warn_only=warn_only)
        torch.utils.deterministic.fill_uninitialized_memory = filled


def with_rows(weight: torch.Tensor, rows: int, added: range) -> torch.Tensor:
    """`weight` [V, D] as [max(V, rows), D], the rows of the tokens `added` to its
    tokenizer (a chat template's markers; ids from the old tokenizer's size on, past V or
    in a vocabulary padded beyond its tokenizer) each the mean of the old tokens' rows
    plus noise of a hundredth of their spread, so that no two new tokens start alike."""
    if not added:
        return weight
    old = weight[: added.start]
    mean, spread = old.mean(0), old.std(0)
    grown = torch.cat([weight, weight.new_zeros(max(0, rows - len(weight)), weight.shape[1])])
    noise = torch.randn(len(added), weight.shape[1], dtype=weight.dtype) * spread / 100
    grown[added.start : added.stop] = mean + noise
    return grown


class Trainer:
    def __init__(
        self,
        args: TrainArgs,
        data: PreparedData,
        config: ModelConfig,
        device: torch.device,
        dist_info: DistInfo,
        *,
        resume_from: Path | None = None,
        init_from: Path | None = None,
        tokenizer_extras: TokenizerExtras | None = None,
        generation_defaults: Mapping[str, object] | None = None,
        chosen_at_start: Sequence[str] = (),
    ) -> None:
        self.args, self.data, self.device, self.dist = args, data, device, dist_info
        self.chosen_at_start = list(chosen_at_start)  # args.CHOSEN_AT_START left to the run
        self.out_dir = Path(args.out_dir)
        # args.dtype is resolved by now (defaults.with_hardware_defaults): never "auto".
        self.autocast_dtype = torch.bfloat16 if args.dtype == "bfloat16" else None
        if device.type == "cuda":
            torch.set_float32_matmul_precision("high")
        torch.manual_seed(args.seed)
        self.model = Transformer(config).to(device)
        if dist_info.rank:
            # Every rank seeded alike for the weights; left so, dropout would drop the same
            # units on every rank (each rank's row b, the same mask), and the averaged
            # gradient would carry one rank's dropout noise. Rank 0 goes on with the seed's
            # stream (a one-process run is unchanged); the others get their own.
            torch.manual_seed(rank_seed(args.seed, dist_info.rank))
        self.optimizer = make_optimizer(self.model, args, device)
        self.batches = BatchSampler(
            data.train,
            block_size=args.block_size,
            batch_size=args.batch_size,
            seed=args.seed,
            rank=dist_info.rank,
            world_size=dist_info.world_size,
            device=device,
            loss_mask=data.train_loss_mask,
        )
        self.byte_lengths = token_byte_lengths(data.tokenizer)
        self.step = 0
        self.tokens_seen = 0
        self.elapsed_before = 0.0  # training seconds of earlier runs this one resumes
        self.best_val: float | None = None  # this run's lowest, for --patience
        self.evals_since_best = 0
        # The validation loss best/ holds; only a lower one replaces it. The same as
        # best_val but in a run resumed from an older step, whose later steps may have
        # gone lower: best/ stays the run folder's lowest, while patience counts from
        # the resumed step's own history.
        self.best_kept: float | None = None
        self.last_val: EvalResult | None = None
        # The last evaluation's scores (val_loss, val_bpb) as trainer_meta.json reports
        # them; a resumed run's from its checkpoint's meta until it evaluates, so that its
        # checkpoints report what an uninterrupted run's do, not nulls.
        self.last_scores: dict[str, float | None] = {"val_loss": None, "val_bpb": None}
        self.first_batch_fingerprints: list[int] = []
        self.evaluated_at = -1
        # The last evaluation was stopped by a signal (all ranks agree): the checkpoint
        # saved next is unfinished, and the run resumed from it evaluates its step first.
        self.evaluation_due = False
        self.last_train_loss: float | None = None
        # Sum of the step losses since the last log line: NaN or inf iff one of them was
        # (cross-entropy is never -inf), so checking it checks every step without a sync.
        # Kept in checkpoints with its step count, so that a resumed run's first log line
        # is the mean of the same steps as an uninterrupted run's.
        self.window_loss = torch.zeros((), device=device)
        self.window_steps = 0
        # This process's share of the window, for its tokens/s: a resumed run's first
        # window started before it did.
        self.window_tokens = 0
        self.window_started = time.perf_counter()
        self.checked_step = 0  # every loss up to this step was finite
        self.tokens_per_s: float | None = None  # none until a log window has passed
        self.bar_postfix: dict[str, str] = {}
        self.lr = 0.0
        self.stop_signal: int | None = None
        self.stopped_by: str | None = None  # set when the loop ends; None in periodic saves
        self.started = time.perf_counter()
        self.tensorboard = None
        # The step this run last saved (or was resumed from); None: the run folder holds
        # no checkpoint of it yet.
        self.saved_at: int | None = None
        self.resumed_from = resume_from
        if resume_from is not None:
            self._load(resume_from)
            self.saved_at = self.step
        elif init_from is not None:  # fine-tuning: the weights alone
            added = range(
                load_tokenizer(init_from).get_vocab_size(), data.tokenizer.get_vocab_size()
            )
            self._load_weights(init_from, added)
        # What HF users added to the tokenizer files of the checkpoint the run started
        # from (a pad token, a chat template): every checkpoint of the run keeps it.
        self.tokenizer_extras = tokenizer_extras
        self.generation_defaults = generation_defaults
        # What a training step calls: the model, wrapped in DDP under torchrun.
        self.step_model: torch.nn.Module = self.model
        if dist_info.enabled:
            self.step_model = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[dist_info.local_rank] if device.type == "cuda" else None
            )
        # Conversations are packed in a window, each attended to alone (data.py).
        packed = data.train_loss_mask is not None
        self.loss: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] = (
            functools.partial(next_token_loss, self.step_model, packed=packed)
        )
        if args.compile:
            if dist_info.is_main:
                print(
                    "torch.compile: the first step builds the kernels"
                    " (~15-50 s on 2 CPU cores; cached on disk for later runs)"
                )
            # The loss is compiled with the model, so the log-softmax and the loss become
            # inductor kernels too instead of separate eager ops (~7% of a CPU `tiny` step).
            self.loss = torch.compile(self.loss)

    # ------------------------------------------------------------ state

    def _load_weights(self, folder: Path, added_tokens: range = range(0)) -> None:
        """The weights of `folder`, with fresh rows for `added_tokens` (a fine-tune's
        tokenizer's additions to the one of `folder`)."""
        weights = load_weights(folder, read_config(folder))
        check_finite(folder, weights)
        for name in ("embed_tokens.weight", "lm_head.weight"):
            if name in weights:
                rows = self.model.config.vocab_size
                weights[name] = with_rows(weights[name], rows, added_tokens)
        # strict=False: the tied LM head is not stored separately.
        self.model.load_state_dict(weights, strict=False)

    def _load(self, folder: Path) -> None:
        state = read_training_state(folder / TRAINING_STATE)
        self._load_weights(folder)
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except ValueError as e:  # torch's own mismatch errors are ValueErrors too
            raise CheckpointError(
                f"{folder}: its optimizer state does not fit this run's {self.args.optimizer} ({e})"
            ) from None
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]
        self.elapsed_before = state["elapsed"]
        self.best_val, self.evals_since_best = state["best_val_loss"], state["evals_since_best"]
        self.evaluation_due = state.get("evaluation_due", False)  # not kept before 2026-12
        # What the step's records report, as an uninterrupted run's would: the evaluation
        # a signal stopped is made before this process trains a step of its own.
        self.lr = _last_step_lr(state["optimizer"])
        for group in self.optimizer.param_groups:  # and so says a save before a step here
            group["lr"] = self.lr * group.get("lr_scale", 1.0)
        self.last_train_loss = state.get("last_train_loss")  # not kept before 2026-12-07
        # The last train record's rate, which an evaluation before this process's first
        # record reports, as an uninterrupted run's does (else null: no record yet).
        self.tokens_per_s = state.get("tokens_per_s")  # not kept before 2026-12-07
        self.best_kept = recorded_best_loss(self.out_dir)
        saved = trainer_meta(folder)
        self.last_scores = {key: saved.get(key) for key in self.last_scores}
        self.first_batch_fingerprints = list(state["first_batch_fingerprints"])
        if "log_window" in state:  # saved the mean over ranks: each rank goes on from it
            self.window_loss.fill_(state["log_window"]["loss"])
            self.window_steps = state["log_window"]["steps"]
        generators = state["data"]["generators"]
        if len(generators) == self.dist.world_size:
            self.batches.generator.set_state(generators[self.dist.rank])
        else:
            print(
                f"warning: resuming {len(generators)} ranks' data order on "
                f"{self.dist.world_size}; batches will differ from an uninterrupted run",
                file=sys.stderr,
            )
        cuda = self.device.type == "cuda"
        set_rng_state(state["rng"], cuda=cuda)
        ranks = state["rng"].get("ranks", [])
        if len(ranks) == self.dist.world_size:  # each rank's own torch generators
            own = ranks[self.dist.rank]
            torch.set_rng_state(own["torch"])
            if cuda and own["cuda"]:
                torch.cuda.set_rng_state(own["cuda"][0])
        elif self.dist.rank:
            # Saved by another number of ranks, or before each rank's were kept: rank 0's
            # state was set above; this rank must still not draw the same dropout masks.
            torch.manual_seed(rank_seed(self.args.seed, self.dist.rank, self.step))

    def _training_state(
        self, generators: list[torch.Tensor], rng_ranks: list[dict], window_loss: float
    ) -> dict:
        return {
            "log_window": {"loss": window_loss, "steps": self.window_steps},
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "elapsed": self.elapsed(),
            "best_val_loss": self.best_val,
            "evals_since_best": self.evals_since_best,
            "evaluation_due": self.evaluation_due,
            "last_train_loss": self.last_train_loss,
            "tokens_per_s": self.tokens_per_s,
            "first_batch_fingerprints": self.first_batch_fingerprints,
            "optimizer": self.optimizer.state_dict(),
            "rng": {**rng_state(cuda=self.device.type == "cuda"), "ranks": rng_ranks},
            "data": {"generators": generators},
        }

    def _meta(self) -> dict:
        return {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "wall_time": round(self.elapsed(), 3),
            **self.last_scores,
            "best_val_loss": self.best_val,
            "world_size": self.dist.world_size,
            "first_batch_fingerprints": self.first_batch_fingerprints,
            "stopped_by": self.stopped_by,
            "chosen_at_start": self.chosen_at_start,
            "data": {"cache": str(self.data.folder), **self.data.meta["splits"]},
            "args": self.args.to_dict(),
        }

    def _gathered(self, mine: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's `mine`, a CPU tensor of one shape on all (collective under DDP)."""
        if not self.dist.enabled:
            return [mine]
        states = [torch.empty_like(mine) for _ in range(self.dist.world_size)]
        dist.all_gather(states, mine)
        return states

    def _gather_generators(self) -> list[torch.Tensor]:
        """Every rank's data generator state (collective: all ranks must call it)."""
        return self._gathered(self.batches.generator.get_state())

    def _gather_torch_rng(self) -> list[dict]:
        """Every rank's `torch_rng_state` (collective: all ranks must call it)."""
        mine = torch_rng_state(cuda=self.device.type == "cuda")
        # One flat tensor per rank: the CPU generator's state, then the CUDA device's.
        states = self._gathered(torch.cat([mine["torch"], *mine["cuda"]]))
        size = len(mine["torch"])
        return [
            {"torch": s[:size].clone(), "cuda": [s[size:].clone()] if mine["cuda"] else []}
            for s in states
        ]

    def save(self) -> Path | None:
        """Write step-XXXXXXX from rank 0 and prune old ones. Collective under DDP."""
        # The weights too: the update of the step being saved has had no loss of its own.
        self._check_finite(self.window_loss.item(), weights=True)
        generators = self._gather_generators()
        rng_ranks = self._gather_torch_rng()
        window_loss = self._mean_over_ranks(self.window_loss)
        with self._rank0_writing():
            folder = (
                self._write_checkpoint(generators, rng_ranks, window_loss)
                if self.dist.is_main
                else None
            )
        self.saved_at = self.step
        return folder

    def _write_checkpoint(
        self, generators: list[torch.Tensor], rng_ranks: list[dict], window_loss: float
    ) -> Path:
        state, meta = self._training_state(generators, rng_ranks, window_loss), self._meta()
        extra = {
            TRAINING_STATE: lambda path: save_state(state, path),
            TRAINER_META: lambda path: write_json(path, meta),
        }
        folder = save_checkpoint(
            self.out_dir,
            f"step-{self.step:07d}",
            self.model,
            self.data.tokenizer,
            tokenizer_extras=self.tokenizer_extras,
            generation_defaults=self.generation_defaults,
            extra_files=extra,
        )
        self._prune()
        return folder

    @contextlib.contextmanager
    def _rank0_writing(self) -> Iterator[None]:
        """Around what rank 0 alone does (evaluate, log, write): an error there (a full
        disk, or a bug) stops every rank, the others with one line (collective under
        DDP)."""
        error = None
        try:
            yield
        except Exception as e:
            error = e
        share_rank0_error(error, self.dist, RankStopped("rank 0 stopped the run (see its error)"))

    def _prune(self) -> None:
        # Step folders past this step are from steps a resume went back from: left as they
        # are until this run's saves of the same steps replace them. This step's folder,
        # which `latest` now names, is the newest of the rest: keep_last >= 1 keeps it.
        steps = [p for p in step_folders(self.out_dir) if step_number(p) <= self.step]
        for old in steps[: -self.args.keep_last]:
            shutil.rmtree(old, ignore_errors=True)

    # ------------------------------------------------------------ evaluation

    def evaluate(self) -> EvalResult:
        val, loss_mask = self.data.val, self.data.val_loss_mask
        if self.args.eval_tokens:
            val = val[: self.args.eval_tokens + 1]
            loss_mask = None if loss_mask is None else loss_mask[: self.args.eval_tokens + 1]
        result = evaluate_stream(
            self.model,
            val,
            self.byte_lengths,
            block_size=self.args.block_size,
            device=self.device,
            # In fp32 on CPU, as `training.evaluate` scores there, so the two agree.
            autocast_dtype=self.autocast_dtype if self.device.type == "cuda" else None,
            stop=lambda: self.stop_signal is not None,
            loss_mask=loss_mask,
        )
        self.last_val = result
        self.last_scores = {"val_loss": result.loss, "val_bpb": result.bpb}
        if self.best_val is None or result.loss < self.best_val:
            self.best_val, self.evals_since_best = result.loss, 0
        else:
            self.evals_since_best += 1
        return result

    @torch.no_grad()
    def preview(self) -> str:
        """A short sample from <|endoftext|>, or in a run on conversations the reply to the
        first held-out one's first question whose prompt leaves room for it (the prompt as
        the server's chat route makes it, the reply ending at an end id), decoded with the
        KV cache; as printed: quoted, a reply after the end of its prompt."""
        prompt, ends = self._preview_prompt
        n = min(self.args.sample_tokens, self.args.block_size - len(prompt))
        model = self.model
        was_training = model.training
        model.eval()
        # Sized for the preview, not the context (8,192 positions of a fine-tuned HF
        # model's would take gigabytes at every evaluation).
        cache = KVCache.for_model(
            model.config, 1, device=self.device, max_len=len(prompt) + max(n, 1)
        )
        generator = torch.Generator(self.device).manual_seed(self.args.seed)
        params = BatchParams.from_rows([PREVIEW_SAMPLING], self.device)
        ids, fed = list(prompt), 0
        while len(ids) - len(prompt) < n and ids[-1] not in ends:
            logits = model(
                torch.tensor([ids[fed:]], device=self.device),
                torch.arange(fed, len(ids), device=self.device)[None],
                cache=cache,
            )  # [1, T, V]
            fed = len(ids)
            ids.append(int(sample(logits[:, -1], params, [generator])))
        model.train(was_training)
        # The separator shown as written: where the model ends a document is visible.
        sampled = self.data.tokenizer.decode(ids[len(prompt) :], skip_special_tokens=False)
        if not ends:  # a text's sample
            return repr(sampled)
        asked = self.data.tokenizer.decode(prompt, skip_special_tokens=False)
        if len(asked) > PREVIEW_PROMPT_CHARS:
            asked = "..." + asked[-PREVIEW_PROMPT_CHARS:]
        return f"{asked!r} -> {sampled!r}"

    @functools.cached_property  # read from the whole held-out mask: once, not at each evaluation
    def _preview_prompt(self) -> tuple[list[int], frozenset[int]]:
        """(what the preview continues, the ids that end it): <|endoftext|> and none, or
        the first held-out conversation whose prompt for its first answer leaves room in
        --block-size, up to that answer, and the end ids its checkpoints declare
        (<|endoftext|> where no conversation's prompt would leave room)."""
        separator = self.data.tokenizer.token_to_id(END_OF_TEXT)
        if self.data.val_loss_mask is None:
            return [separator], frozenset()
        mask = np.asarray(self.data.val_loss_mask)
        starts = np.flatnonzero(mask == CONVERSATION_START)
        learned = np.flatnonzero(mask == LEARNED)  # each conversation has one
        if not len(learned):
            return [separator], frozenset()
        # Each conversation's first answer, and how many tokens are asked before it.
        answers = learned[np.minimum(np.searchsorted(learned, starts), len(learned) - 1)]
        asked = answers - starts - 1
        own = answers < np.append(starts[1:], len(mask))  # not a later conversation's
        fits = np.flatnonzero(own & (asked > 0) & (asked < self.args.block_size))
        if not len(fits):
            return [separator], frozenset()
        first, answer = int(starts[fits[0]]) + 1, int(answers[fits[0]])
        prompt = np.asarray(self.data.val[first:answer], dtype=np.int64).tolist()
        declared = (self.generation_defaults or {}).get("eos_token_id")
        declared = declared if isinstance(declared, list) else [declared]
        return prompt, frozenset({separator, *(i for i in declared if isinstance(i, int))})

    # ------------------------------------------------------------ the loop

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.started

    def _point_latest_at_resumed(self) -> None:
        """`latest` names the checkpoint the run goes on from (one older than the newest,
        going back), before _start_log drops the log's later records: a kill before this
        run's first save then resumes where the log says the run is, not from the newer
        step the log no longer describes."""
        if self.resumed_from is None or latest_names(self.resumed_from):
            return
        write_text_atomic(self.out_dir / LATEST, self.resumed_from.name + "\n")

    def _start_log(self) -> None:
        """A fresh run starts a fresh log. A resumed one keeps the records that led to
        its checkpoint and appends: those past its step came from steps a kill lost
        (trained again now), and a line the kill cut short is no record."""
        path = self.out_dir / RUN_LOG
        kept = []
        if self.step and path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if isinstance(record, dict) and record.get("step", 0) <= self.step:
                    kept.append(line + "\n")
        write_text_atomic(path, "".join(kept))

    def _log(self, record: dict) -> None:
        if not self.dist.is_main:
            return
        path = self.out_dir / RUN_LOG
        try:
            with open(path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:  # a full disk: no checkpoint could be kept either
            message = f"{path}: could not be written ({e.strerror or e})"
            raise CheckpointWriteError(message, self.out_dir) from e
        if self.tensorboard is not None:
            for key, value in record.items():
                if key not in ("kind", "step") and isinstance(value, (int, float)):
                    self.tensorboard.add_scalar(f"{record['kind']}/{key}", value, record["step"])

    def _should_stop(self) -> tuple[str | None, float]:
        """(reason or None, elapsed seconds), agreed by all ranks in one collective."""
        elapsed = self.elapsed()
        out_of_time = self.args.max_time is not None and elapsed >= self.args.max_time
        flags = [self.stop_signal is not None, out_of_time]
        if self.dist.enabled:
            agreed = torch.tensor([float(flags[0]), float(flags[1]), elapsed])
            dist.all_reduce(agreed, op=dist.ReduceOp.MAX)  # rank-0-independent agreement
            flags, elapsed = [bool(agreed[0]), bool(agreed[1])], float(agreed[2])
        if flags[0]:
            return "signal", elapsed
        if flags[1]:
            return "max_time", elapsed
        return None, elapsed

    def _handle_signal(self, signum: int, frame: object) -> None:
        self.stop_signal = signum

    def train(self) -> TrainResult:
        args, main = self.args, self.dist.is_main
        self.started = time.perf_counter()
        self.checked_step = self.step
        with self._rank0_writing():
            if main:
                self.out_dir.mkdir(parents=True, exist_ok=True)
                self._point_latest_at_resumed()
                self._start_log()
                self.tensorboard = _tensorboard_writer(self.out_dir, self.step)
        previous = {
            s: signal.signal(s, self._handle_signal) for s in (signal.SIGINT, signal.SIGTERM)
        }
        total = args.max_steps if args.max_time is None else None  # a clock, not steps, ends it
        # A resumed run's bar shows its last train record until the first new one.
        self.bar_postfix = self._train_record_fields()
        postfix = self.bar_postfix or None
        bar = tqdm(
            total=total, initial=self.step, disable=not main, postfix=postfix, **bar_output()
        )
        try:
            # A compiled CPU run resumes bit-exact, as an eager one does (README).
            with deterministic_kernels(bool(args.compile) and self.device.type == "cpu"):
                self.stopped_by = stopped_by = self._loop(bar)
            if self.window_tokens:
                # The steps since the last train record get theirs too. The window stays
                # (and is saved): a resumed run's next record averages the whole
                # interval, as an uninterrupted run's does.
                self._log_window(bar)
            self._show_progress(bar)  # the bar's last line: the time left now, not at a log
            if stopped_by != "signal" and self.evaluated_at != self.step:
                checkpoint = self._eval_and_report(bar, final=True)
            else:
                self._unfinished_if_evaluation_stopped()
                checkpoint = self.save()
            stopped_by = self.stopped_by
        finally:
            bar.close()
            for s, handler in previous.items():
                signal.signal(s, handler)
            if self.tensorboard is not None:
                self.tensorboard.close()
        if main:
            where = f" -> {checkpoint}" if checkpoint else ""
            print(f"stopped at step {self.step} ({stopped_by}){where}", flush=True)
        signum = (self.stop_signal or signal.SIGTERM) if stopped_by == "signal" else None
        return TrainResult(self.step, self.last_val, stopped_by, signum)

    def _eval_and_report(self, bar: tqdm, *, final: bool = False) -> Path | None:
        """Rank 0 evaluates, logs, keeps best/ and prints a sample (collective under DDP);
        `final`: the run's last evaluation, saving its last checkpoint (returned).

        A run's first best/ comes after its first checkpoint: a kill between the two
        would leave a folder with a model and nothing to resume (every later command on
        it refused), so an evaluation before any save saves the step first.
        """
        improved: bool | None = False  # rank 0's to say
        train_loss = self._window_mean_loss()
        self.evaluation_due = False
        with self._rank0_writing():
            if self.dist.is_main:
                improved = self._evaluate_on_rank0(bar, train_loss)
        self.evaluated_at = self.step  # on every rank: train() decides by it who evaluates
        self.evaluation_due = self._on_any_rank(self.evaluation_due)
        if final:
            self._unfinished_if_evaluation_stopped()
        checkpoint = self.save() if final or self.saved_at is None else None
        with self._rank0_writing():
            if improved:
                self._keep_best()
            sampling = self.args.sample_tokens and self.stop_signal is None
            if improved is not None and self.dist.is_main and sampling:
                bar.write(f"sample: {self.preview()}")
        return checkpoint

    def _evaluate_on_rank0(self, bar: tqdm, train_loss: float | None) -> bool | None:
        """Evaluate and log (with `train_loss`, the training steps' since the last
        train record); whether the loss is best/'s to keep (lower than its own), or
        None if it is not finite (the weights are lost: _check_finite stops the run,
        nothing is kept or sampled). A signal stops the evaluation where it is (nothing
        logged): the save it asks for comes next."""
        try:
            result = self.evaluate()
        except EvaluationStopped:
            bar.write(f"step {self.step}: evaluation stopped by a signal")
            self.evaluation_due = True
            return False
        if not math.isfinite(result.loss):
            return None
        self._log(
            {
                "kind": "eval",
                "step": self.step,
                "tokens": self.tokens_seen,
                "train_loss": train_loss,
                "val_loss": result.loss,
                "val_bpb": result.bpb,
                "lr": self.lr,
                "tokens_per_s": self.tokens_per_s,
                "wall_time": round(self.elapsed(), 3),
            }
        )
        bar.write(f"step {self.step}: val loss {result.loss:.4f} nats/token, {result.bpb:.4f} bpb")
        return self.best_kept is None or result.loss < self.best_kept

    def _unfinished_if_evaluation_stopped(self) -> None:
        """A run whose last evaluation a signal stopped is stopped by that signal, not
        finished: `--resume` (or `--if-missing`) goes on to make that evaluation."""
        if self.evaluation_due:
            self.stopped_by = "signal"

    def _on_any_rank(self, flag: bool) -> bool:
        """Whether `flag` is true on any rank (collective under DDP)."""
        if not self.dist.enabled:
            return flag
        agreed = torch.tensor([float(flag)])
        dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
        return bool(agreed)

    def _keep_best(self) -> None:
        """Write best/ from rank 0: the weights just evaluated, for serving (it carries no
        resumable state: that needs every rank)."""
        assert self.last_val is not None
        self.best_kept = self.last_val.loss
        meta = self._meta()
        save_checkpoint(
            self.out_dir,
            BEST,
            self.model,
            self.data.tokenizer,
            tokenizer_extras=self.tokenizer_extras,
            generation_defaults=self.generation_defaults,
            extra_files={TRAINER_META: lambda path: write_json(path, meta)},
            update_latest=False,
        )

    def _loop(self, bar: tqdm) -> str:
        args = self.args
        step_tokens = tokens_per_step(args, self.dist.world_size)
        # Resumed from a step whose evaluation a signal stopped: made now, as an
        # uninterrupted run made it (a last step's off the interval is train()'s to make).
        resumed_evaluation = self.evaluation_due and self.step % args.eval_interval == 0
        if resumed_evaluation and (reason := self._evaluate_at_interval(bar)):
            return reason
        self.window_started, self.window_tokens = time.perf_counter(), 0
        while self.step < args.max_steps:
            reason, elapsed = self._should_stop()
            if reason:
                return reason
            self.lr = lr_at(args, self.step, elapsed)
            for group in self.optimizer.param_groups:
                group["lr"] = self.lr * group.get("lr_scale", 1.0)  # optim.py's groups
            batches = [self.batches.next_batch() for _ in range(args.grad_accum)]
            shares = self._token_shares([y for _, y, _ in batches])
            for micro, (x, y, positions) in enumerate(batches):
                if not self.first_batch_fingerprints and self.step == 0 and micro == 0:
                    self._record_fingerprints(x)
                sync = micro == args.grad_accum - 1 or not self.dist.enabled
                with (
                    contextlib.nullcontext() if sync else self.step_model.no_sync(),
                    self._autocast(),
                ):
                    loss = self.loss(x, y, positions)
                part = loss / args.grad_accum if shares is None else loss * shares[micro]
                part.backward()
                self.window_loss += part.detach()
            if args.grad_clip:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), args.grad_clip)
            self.optimizer.step()
            self.optimizer.zero_grad()
            self.step += 1
            self.tokens_seen += step_tokens
            self.window_steps += 1
            self.window_tokens += step_tokens
            bar.update(1)
            if self.step % args.log_interval == 0:
                self._log_window(bar)
                self.window_loss.zero_()
                self.window_steps = 0
                self.window_started, self.window_tokens = time.perf_counter(), 0
            paused_at = time.perf_counter()
            reason = None
            if self.step % args.eval_interval == 0:
                reason = self._evaluate_at_interval(bar)
            saved = self.saved_at == self.step  # by the evaluation, this step
            periodic = self.step % args.save_interval == 0 and self.step < args.max_steps
            if periodic and not saved and reason is None:
                # train() saves a stopped run, saying why: a signal or the clock due now
                # skips this save (the same write twice would spend a `docker stop`'s
                # grace).
                reason, _ = self._should_stop()
                if reason is None:
                    self.save()
            # tokens/s is the training steps' rate: evaluating and saving are not counted
            # (nor, stopping early, in the record train() logs for the last steps).
            self.window_started += time.perf_counter() - paused_at
            if reason:
                return reason
        return "max_steps"

    def _evaluate_at_interval(self, bar: tqdm) -> str | None:
        """The evaluation every --eval-interval steps: "early_stopping" if it ends the run."""
        self._eval_and_report(bar)
        self._check_finite(self.window_loss.item())
        return "early_stopping" if self._early_stop() else None

    def _token_shares(self, targets: list[torch.Tensor]) -> list[torch.Tensor] | None:
        """What each micro-batch's mean loss weighs in the step: None for text (each the
        same tokens: 1 / grad_accum); for conversations its learned targets' share of the
        step's, over every rank (times the ranks DDP averages over), so that the step's
        loss is the mean over all its learned tokens, however they fall in micro-batches."""
        if self.data.train_loss_mask is None:
            return None
        counts = [(y != IGNORED).sum() for y in targets]
        total = torch.stack(counts).sum()
        if self.dist.enabled:
            dist.all_reduce(total)
        scale = self.dist.world_size / total.clamp(min=1)
        return [count * scale for count in counts]

    def _log_window(self, bar: tqdm) -> None:
        """Log the mean loss and tokens/s of the steps since the last train record and
        show them on the bar (collective under DDP)."""
        self.last_train_loss = self._window_mean_loss()
        self._check_finite(self.last_train_loss)
        self.tokens_per_s = self.window_tokens / (time.perf_counter() - self.window_started)
        self._show_progress(bar, **self._train_record_fields())
        with self._rank0_writing():
            self._log(
                {
                    "kind": "train",
                    "step": self.step,
                    "loss": self.last_train_loss,
                    "lr": self.lr,
                    "tokens_per_s": self.tokens_per_s,
                }
            )

    def _window_mean_loss(self) -> float | None:
        """The mean training loss of the steps since the last train record, or that
        record's when there are none (collective under DDP: every rank has the same
        window_steps)."""
        if not self.window_steps:
            return self.last_train_loss
        return self._mean_over_ranks(self.window_loss) / self.window_steps

    def _train_record_fields(self) -> dict[str, str]:
        """The bar's fields of the last train record: none before a run's first."""
        if self.last_train_loss is None or self.tokens_per_s is None:
            return {}
        return {"loss": f"{self.last_train_loss:.4f}", "tok_s": f"{self.tokens_per_s:.0f}"}

    def _show_progress(self, bar: tqdm, **fields: str) -> None:
        """Set the bar's postfix fields (shown at its next refresh), with the time left of
        a --max-time run (the bar has no step total to give an ETA): the clock's, or
        sooner where the steps left, at this process's mean step time, end it first."""
        if bar.disable:  # another rank's: tqdm keeps no `initial` nor times on a disabled bar
            return
        self.bar_postfix |= fields
        if self.args.max_time is not None:
            left = self.args.max_time - self.elapsed()
            if done := bar.n - bar.initial:  # (tqdm's own rate waits for a refresh)
                per_step = bar.format_dict["elapsed"] / done
                left = min(left, (self.args.max_steps - self.step) * per_step)
            self.bar_postfix["left"] = f"{max(0.0, left):.0f}s"
        bar.set_postfix(self.bar_postfix, refresh=False)

    def _check_finite(self, window_loss: float, weights: bool = False) -> None:
        """Raise TrainingDiverged if a training loss since the last check or the last
        validation loss (or, with `weights`, a weight) was NaN or infinite, on any rank
        (every rank stops together), before a checkpoint could keep the weights."""
        val = self.last_val.loss if self.last_val is not None else 0.0
        diverged = not (math.isfinite(window_loss) and math.isfinite(val))
        if weights and not diverged:
            diverged = first_non_finite(dict(self.model.named_parameters())) is not None
        if self._on_any_rank(diverged):
            leave_together(self.dist)
            raise TrainingDiverged(
                f"the loss became NaN or infinite between steps {self.checked_step} "
                f"and {self.step}: the run diverged (a lower --lr may help); no checkpoint "
                "was written from then on"
            )
        self.checked_step = self.step

    def _mean_over_ranks(self, value: torch.Tensor) -> float:
        """`value` averaged over every rank (collective under DDP): each rank's loss is
        its own shard's; the run's is their mean. The loop's one host sync."""
        if self.dist.enabled:
            value = value.clone()
            dist.all_reduce(value)  # a sum: gloo has no average
            value /= self.dist.world_size
        return value.item()

    def _early_stop(self) -> bool:
        stop = bool(self.args.patience) and self.evals_since_best >= self.args.patience
        if self.dist.enabled:
            flag = torch.tensor([float(stop)])
            dist.broadcast(flag, src=0)  # only rank 0 evaluates
            stop = bool(flag)
        return stop

    def _record_fingerprints(self, x: torch.Tensor) -> None:
        """Each rank's first-batch token sum, kept in trainer_meta.json to show ranks differ."""
        everyone = self._gathered(x.sum().reshape(1).cpu())
        self.first_batch_fingerprints = [int(t) for t in everyone]

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)


def _last_step_lr(optimizer_state: dict) -> float:
    """The learning rate of the last step a saved optimizer state took (the loop sets it
    on every group, times the group's `lr_scale` where it has one); 0.0 if none says."""
    # Runs saved before Muon existed hold one AdamW state dict, not a list (optim.py).
    for saved in optimizer_state.get("optimizers", [optimizer_state]):
        for group in saved.get("param_groups", []):
            if "lr_scale" not in group and isinstance(group.get("lr"), float):
                return group["lr"]
    return 0.0


def _tensorboard_writer(out_dir: Path, step: int) -> SummaryWriter | None:
    """A writer into the run's tensorboard/; resumed at `step`, it hides the scalars of
    later steps a kill lost (as log.jsonl drops them). A fresh run (step 0) starts it
    afresh, as it does log.jsonl: the event files there are a run's that was killed
    before its first checkpoint (--if-missing starts it over), whose scalars would be
    drawn beside this run's. Removed, not purged: TensorBoard orders event files by
    their names, which hold the second they were made, so a purge in a file of the same
    second may be read before the scalars it is to hide. Only the writer's own files
    (subfolders, e.g. a user's other experiments, are not this run's)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    folder = out_dir / "tensorboard"
    if not step:
        for events in folder.glob("events.out.tfevents.*"):
            with contextlib.suppress(OSError):
                events.unlink()
    return SummaryWriter(str(folder), purge_step=step + 1 if step else None)
