"""TrainArgs: every trainer setting, documented once, here.

Each field is a flag (`max_steps` -> `--max-steps`) and an environment variable
(`POCKETGPT_MAX_STEPS`); `--config FILE` reads a JSON or TOML object of the same
names. Precedence, lowest first: defaults (or, with `--resume`, the resumed run's
settings), config file, environment, command line. Booleans take
`--flag/--no-flag` on the command line and 1/0/true/false/yes/no elsewhere;
`none` clears an optional value.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import tomllib
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from model.cli import ArgumentParser, env_var, flag
from model.config import PRESETS, ModelConfig
from model.cpu import bf16_units
from model.device import resolve_device
from model.inductor import has_compiler, missing_compiler_message
from training.prepare import MAX_VOCAB
from training.tokenizer import MIN_VOCAB

# torch takes 64-bit unsigned seeds, and the batch sampler seeds rank r with
# seed * 1000 + r (training/data.py): that must fit as well.
MAX_SEED = 2**64 // 1000 - 1


class UsageError(Exception):
    """A bad flag, file or value; the message names it. The CLI exits 2 with it."""


def doc(help: str) -> dict[str, str]:
    """Field metadata: the one description of a setting, shown by --help."""
    return {"help": help}


@dataclass(frozen=True)
class TrainArgs:
    # data
    data: list[str] = field(
        default_factory=list,
        metadata=doc("text files/folders (.txt, .md, .jsonl); none = embedded corpus"),
    )
    val_data: list[str] = field(
        default_factory=list,
        metadata=doc(
            "held-out text files/folders (a document also in --data is refused); none ="
            " --val-fraction of --data, in evenly spaced pieces"
        ),
    )
    val_fraction: float = field(
        default=0.05, metadata=doc("share of the text held out for validation without --val-data")
    )
    tokenizer: str | None = field(
        default=None, metadata=doc("reuse this tokenizer.json or checkpoint folder's tokenizer")
    )
    init_from: str | None = field(
        default=None,
        metadata=doc(
            "fine-tune: start from this checkpoint's (or run folder's) weights, tokenizer and"
            " model shape; the optimizer, schedule and step count start afresh"
        ),
    )
    vocab_size: int | None = field(
        default=None,
        metadata=doc("BPE vocabulary size when training a tokenizer (none: the preset's)"),
    )
    cache_dir: str | None = field(
        default=None, metadata=doc("token cache folder (default: <out-dir>/../.cache)")
    )
    # model
    preset: str = field(
        default="auto",
        metadata=doc(
            f"auto or one of: {', '.join(PRESETS)} (auto: small; for a CPU run with --max-time "
            "under 600 s, mini on a CPU with AMX and tiny on others)"
        ),
    )
    dim: int | None = field(default=None, metadata=doc("model width (overrides the preset)"))
    n_layers: int | None = field(
        default=None, metadata=doc("transformer blocks (overrides the preset)")
    )
    n_heads: int | None = field(
        default=None, metadata=doc("attention heads (overrides the preset)")
    )
    n_kv_heads: int | None = field(
        default=None,
        metadata=doc(
            "key/value heads for grouped-query attention (overrides the preset: tiny and mini "
            "share 2; small and base have one per attention head)"
        ),
    )
    ffn_dim: int | None = field(
        default=None, metadata=doc("SwiGLU hidden width (overrides the preset)")
    )
    tie_embeddings: bool | None = field(
        default=None,
        metadata=doc("share the input embedding with the LM head (none: the preset's)"),
    )
    dropout: float = field(default=0.0, metadata=doc("dropout on attention and residual branches"))
    block_size: int | None = field(
        default=None,
        metadata=doc("tokens per sequence = the model's context length (none: the preset's)"),
    )
    # optimisation
    batch_size: int | None = field(
        default=None, metadata=doc("sequences per micro-batch, per rank (none: the preset's)")
    )
    grad_accum: int = field(default=1, metadata=doc("micro-batches accumulated per optimizer step"))
    optimizer: str = field(
        default="muon",
        metadata=doc(
            "muon (Muon for the blocks' matrices, fused AdamW for embeddings and norms) or"
            " adamw (fused AdamW for everything)"
        ),
    )
    lr: float | None = field(
        default=None, metadata=doc("peak learning rate (AdamW and Muon) (none: the preset's)")
    )
    embedding_lr_scale: float = field(
        default=4.0,
        metadata=doc("an untied input embedding's learning rate, as a multiple of --lr"),
    )
    min_lr_ratio: float = field(
        default=0.1, metadata=doc("final learning rate as a fraction of --lr")
    )
    warmup_steps: int | None = field(
        default=None,
        metadata=doc("linear warmup steps (none: 30, or a tenth of --max-steps if that is fewer)"),
    )
    lr_schedule: str = field(
        default="wsd",
        metadata=doc(
            "after warmup: wsd (hold --lr, then decay linearly to --min-lr-ratio over the last"
            " --cooldown-fraction of the run) or cosine (from --lr down to --min-lr-ratio)"
        ),
    )
    cooldown_fraction: float = field(
        default=0.5, metadata=doc("wsd: the share of the run after warmup spent decaying")
    )
    decay_steps: int | None = field(
        default=None,
        metadata=doc("length of the schedule in steps (default: --max-steps)"),
    )
    weight_decay: float = field(
        default=0.1, metadata=doc("decoupled weight decay on matrices (not norms)")
    )
    grad_clip: float = field(
        default=1.0, metadata=doc("clip the global gradient norm to this (0 = off)")
    )
    max_steps: int | None = field(
        default=None,
        metadata=doc(
            "optimizer steps (none: 400 on CPU, 5000 on CUDA, at most 5 passes over the"
            " training text; unlimited with --max-time)"
        ),
    )
    max_time: float | None = field(
        default=None, metadata=doc("stop after this many seconds of training (none = no limit)")
    )
    seed: int = field(default=1337, metadata=doc("seed for weights, data order and dropout"))
    # evaluation, checkpoints, logging
    eval_interval: int = field(
        default=250, metadata=doc("steps between evaluations (and sample previews)")
    )
    eval_tokens: int = field(
        default=32768, metadata=doc("validation tokens per evaluation (0 = the whole split)")
    )
    sample_tokens: int = field(
        default=64,
        metadata=doc(
            "tokens in the preview printed at each evaluation (0 = off; a preview stops at "
            "the context: --block-size - 1)"
        ),
    )
    log_interval: int = field(
        default=10, metadata=doc("steps between train-loss lines in the JSONL log")
    )
    save_interval: int = field(default=500, metadata=doc("steps between step-XXXXXXX checkpoints"))
    keep_last: int = field(
        default=2, metadata=doc("step checkpoints kept (best/ is kept separately)")
    )
    patience: int = field(
        default=0,
        metadata=doc("stop after this many evaluations without a better val loss (0 = off)"),
    )
    out_dir: str = field(
        default="checkpoints/default",
        metadata=doc(
            "run folder: checkpoints, latest, log.jsonl; a model's folder (best/, a step folder,"
            " an HF save) is refused, as it would go on loading as that model"
        ),
    )
    resume: str | None = field(
        default=None, metadata=doc("continue exactly from this checkpoint or run folder")
    )
    if_missing: bool = field(
        default=False,
        metadata=doc(
            "exit 0 at once if --out-dir already holds a finished run (or a model); resume an"
            " unfinished one (interrupted or killed); given an --init-from the run did not"
            " start from, either is an error; a run stopped by a signal exits 128 + its number"
            " (after saving), as it is not finished"
        ),
    )
    # hardware
    device: str = field(default="auto", metadata=doc("auto (CUDA when available), cpu or cuda"))
    dtype: str = field(
        default="auto",
        metadata=doc(
            "float32, bfloat16 (autocast), or auto: bfloat16 on a CUDA GPU with native bf16"
            " (Ampere+), on a CPU with AVX512-BF16, and on an AMX CPU for models 256+ wide;"
            " float32 otherwise"
        ),
    )
    compile: bool | None = field(
        default=None,
        metadata=doc(
            "torch.compile the model (none: on for --max-time >= 120 on CPU / 60 on CUDA, or"
            " 1000+ CPU / 200+ CUDA steps without --max-time, when a C/C++ compiler is"
            " installed)"
        ),
    )

    def validate(self, sources: Mapping[str, str] | None = None) -> TrainArgs:
        """Raise UsageError naming the first setting whose value cannot work, as the user
        gave it: `sources` maps a field to its flag, env var or config file entry (a
        field it lacks is named by its flag)."""

        def require(name: str, ok: bool, problem: str, value: object) -> None:
            if not ok:
                raise UsageError(f"{_source(name, sources)}: {problem} (got {value!r})")

        # inf and nan pass some range checks below (inf > 0) and then train to a NaN model.
        for name in FIELDS:
            value = getattr(self, name)
            if _base_type(name)[0] is float and value is not None:
                require(name, math.isfinite(value), "must be a finite number", value)
        positive = ("grad_accum", "eval_interval", "log_interval", "save_interval", "keep_last")
        for name in positive:
            require(name, getattr(self, name) >= 1, "must be >= 1", getattr(self, name))
        for name in (
            "batch_size",
            "block_size",
            "dim",
            "n_layers",
            "n_heads",
            "n_kv_heads",
            "ffn_dim",
            "decay_steps",
            "max_steps",
        ):
            value = getattr(self, name)
            require(name, value is None or value >= 1, "must be >= 1", value)
        require(
            "vocab_size",
            self.vocab_size is None or MIN_VOCAB <= self.vocab_size <= MAX_VOCAB,
            f"must be in {MIN_VOCAB}..{MAX_VOCAB} (every byte plus <|endoftext|>, up to what "
            "the token cache's uint16 ids hold)",
            self.vocab_size,
        )
        require("seed", 0 <= self.seed <= MAX_SEED, f"must be in 0..{MAX_SEED}", self.seed)
        # An empty path is the working folder: a run written among the user's files, or
        # everything under it read as text.
        require("out_dir", bool(self.out_dir.strip()), "must name a folder", self.out_dir)
        for name in ("data", "val_data"):
            paths = getattr(self, name)
            require(name, all(p.strip() for p in paths), "a path is empty", paths)
        non_negative = ("warmup_steps", "weight_decay", "grad_clip", "eval_tokens")
        for name in (*non_negative, "sample_tokens", "patience"):
            value = getattr(self, name)
            require(name, value is None or value >= 0, "must be >= 0", value)
        require("lr", self.lr is None or self.lr > 0, "must be > 0", self.lr)
        require(
            "embedding_lr_scale",
            self.embedding_lr_scale > 0,
            "must be > 0",
            self.embedding_lr_scale,
        )
        require("min_lr_ratio", 0 <= self.min_lr_ratio <= 1, "must be in [0, 1]", self.min_lr_ratio)
        require(
            "cooldown_fraction",
            0 < self.cooldown_fraction <= 1,
            "must be in (0, 1]",
            self.cooldown_fraction,
        )
        require("val_fraction", 0 < self.val_fraction < 1, "must be in (0, 1)", self.val_fraction)
        require("dropout", 0 <= self.dropout < 1, "must be in [0, 1)", self.dropout)
        require(
            "max_time", self.max_time is None or self.max_time > 0, "must be > 0", self.max_time
        )
        choices = {"preset": ("auto", *PRESETS), "device": ("auto", "cpu", "cuda")}
        choices["dtype"] = ("auto", "float32", "bfloat16")
        choices["optimizer"] = ("adamw", "muon")
        choices["lr_schedule"] = ("wsd", "cosine")
        for name, allowed in choices.items():
            value = getattr(self, name)
            require(name, value in allowed, f"choose one of {', '.join(allowed)}", value)
        try:
            resolve_device(self.device, _source("device", sources))
        except ValueError as e:
            raise UsageError(str(e)) from None
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SHORT_CPU_BUDGET_S = 600.0


def budget_preset(args: TrainArgs, device: torch.device) -> str:
    """`--preset auto`: `small`, except for a CPU run boxed under 10 minutes: `mini` on a
    CPU with AMX, `tiny` elsewhere.

    In a minute on 2 CPU cores `small` sees too little text to learn much. Without AMX
    `tiny` (~0.85M parameters at vocab 512) processes ~6x more tokens and ends far
    lower; with AMX's bf16 products `mini` (~3.5M) runs at ~15k tokens/s and ends
    lower still, but on Zen 4's AVX512-BF16 (~6k tokens/s) it ends higher than `tiny`
    (tinyshakespeare at --max-time 70: 2.47 vs 2.21 bpb; BENCHMARKS.md). Zen 5 runs
    `mini` at ~15k and ends ~0.01 lower than `tiny`: too small a gain to be worth
    telling Zen 5 from Zen 4 (a timing probe or a CPU-model table), so it gets `tiny`.
    """
    if device.type == "cpu" and args.max_time is not None and args.max_time < SHORT_CPU_BUDGET_S:
        return "mini" if bf16_units() == "amx" else "tiny"
    return "small"


def resolved_preset(args: TrainArgs, device: torch.device) -> str:
    return args.preset if args.preset != "auto" else budget_preset(args, device)


# Settings left at `none` take the trained preset's value. Measured on 2 CPU cores
# (tinyshakespeare, first 90% trains, last 10% scores, --max-time 70):
#   tiny: a 512-entry vocabulary beats 2048 (2.74 vs 2.89 bpb): with ~0.5M tokens seen
#     in a minute, most of a 2048-token embedding is barely trained and the LM head
#     costs ~20% of the step; 8 sequences per step (twice the updates of 16) and a
#     higher lr (4e-3) suit the few hundred steps such a run makes.
#   mini (AMX CPUs): the same 512 entries and context (1024 entries: 2.35 vs 2.27 bpb);
#     16 sequences per step at 3e-3 (8 per step: 2.31).
#   small/base: 2048 entries pack ~1.5x more text per token, which pays once the
#     body dominates the cost; a 256-token context (what the served model can read)
#     at 8 sequences keeps a step at 2048 tokens, as 16 x 128 did.
AUTO: dict[str, dict[str, int | float]] = {
    "tiny": {"vocab_size": 512, "block_size": 128, "lr": 4e-3, "batch_size": 8},
    "mini": {"vocab_size": 512, "block_size": 128, "lr": 3e-3, "batch_size": 16},
    "small": {"vocab_size": 2048, "block_size": 256, "lr": 2e-3, "batch_size": 8},
    "base": {"vocab_size": 2048, "block_size": 256, "lr": 2e-3, "batch_size": 8},
}

# Without --max-steps or --max-time a run makes the device's step count, but never more
# than DEFAULT_MAX_EPOCHS passes over the training tokens. CPU: 400 steps are ~3 minutes
# of `small` on 2 AMX cores, 3.3 passes over the embedded corpus. CUDA: 5000 steps would
# be ~40 passes over it, and past a few passes `small` memorises the text (train loss
# ~0.2 nats) while validation loss climbs. End-of-run val bits/byte of `small` with Muon,
# a full schedule each (H200, BENCHMARKS.md): the embedded corpus 1.49 at 4.1 passes, 1.32
# at 6.2, 1.25 at 8.3, 1.40 at 16.6; tinyshakespeare 1.90 at 3.2, 1.91 at 4.9, 2.03 at 6.5,
# 2.65 at 13; its first 250 kB 2.18 at 3.5, 2.14 at 5.2, 2.17 at 6.9, 2.57 at 13.9.
DEFAULT_STEPS = {"cpu": 400, "cuda": 5000}
DEFAULT_MAX_EPOCHS = 5
UNLIMITED_STEPS = 10**12
DEFAULT_WARMUP_STEPS = 30


# When `--compile none` compiles, by device: a run must be long enough that the first
# build (cached on disk afterwards, but a newcomer's first run pays it) is repaid.
# CPU, 2 cores: the build takes ~15-20 s for `tiny` and ~50 s for `small`; compiled, a
# step is then ~1.3x faster for `tiny` and ~1.1x for `small` (fewer, fused kernels;
# matrix products are the rest). At --max-time 70 a cold build loses (`tiny`: 708
# steps vs 740 eager; 910 with a warm cache), and the 400-step `small` default breaks
# even, hence 2 minutes / 1000 steps. CUDA: ~35 s for `base` on an H100, then with bf16
# 8x an eager fp32 loop.
COMPILE_MIN_STEPS = {"cpu": 1000, "cuda": 200}
COMPILE_MIN_SECONDS = {"cpu": 120.0, "cuda": 60.0}


def compile_pays_off(args: TrainArgs, device: torch.device) -> bool:
    """`--compile none`: compile when the run is long enough to repay the build and the
    compiler inductor needs is installed (model/inductor.py)."""
    if args.max_time is not None:
        long_run = args.max_time >= COMPILE_MIN_SECONDS[device.type]
    else:
        long_run = args.max_steps is not None and args.max_steps >= COMPILE_MIN_STEPS[device.type]
    return long_run and has_compiler(device)


# Below this width an AMX CPU's bf16 products are too small to repay autocast's casts:
# `tiny` (128 wide) trains at 23k tokens/s in bf16 vs 27k in fp32, `mini` (256) at 15k
# vs 10k on the same 2 cores. AVX512-BF16 (2 EPYC vCPUs) gains at every width measured:
# `tiny` 16k vs 15k, `mini` 8.2k vs 5.1k, `small` 2.6k vs 1.6k.
BF16_AMX_MIN_DIM = 256


def auto_dtype(args: TrainArgs, device: torch.device) -> str:
    if device.type == "cuda":
        # Before Ampere bf16 is emulated: slower than float32 (and fp16 would need loss
        # scaling).
        return "bfloat16" if torch.cuda.is_bf16_supported(including_emulation=False) else "float32"
    width = args.dim or PRESETS[resolved_preset(args, device)].dim
    units = bf16_units()
    fast = units == "avx512" or (units == "amx" and width >= BF16_AMX_MIN_DIM)
    return "bfloat16" if fast else "float32"


def with_hardware_defaults(args: TrainArgs, device: torch.device) -> TrainArgs:
    """Fill in every `none` or `auto` that depends on the preset or the hardware: the
    preset's vocabulary size, block size, lr and batch size (AUTO) and `--dtype`; and
    check that an explicit `--compile` can build."""
    preset = resolved_preset(args, device)
    filled = {name: value for name, value in AUTO[preset].items() if getattr(args, name) is None}
    if args.dtype == "auto":
        filled["dtype"] = auto_dtype(args, device)
    if args.compile and not has_compiler(device):
        raise UsageError(f"--compile: {missing_compiler_message(device)}")
    return dataclasses.replace(args, **filled)


def default_steps(args: TrainArgs, device: torch.device, train_tokens: int, world_size: int) -> int:
    """The device's step count, capped at DEFAULT_MAX_EPOCHS passes over `train_tokens`."""
    tokens_per_step = args.batch_size * args.block_size * args.grad_accum * world_size
    steps_for_passes = -(-DEFAULT_MAX_EPOCHS * train_tokens // tokens_per_step)  # ceil
    return max(1, min(DEFAULT_STEPS[device.type], steps_for_passes))


def with_step_budget(
    args: TrainArgs, device: torch.device, train_tokens: int, world_size: int = 1
) -> TrainArgs:
    """Fill in `--max-steps` (no step limit under --max-time, else `default_steps`),
    `--compile` (`compile_pays_off`) and `--warmup-steps` once the size of the training
    text is known."""
    if args.max_steps is None:
        steps = (
            UNLIMITED_STEPS
            if args.max_time is not None
            else default_steps(args, device, train_tokens, world_size)
        )
        args = dataclasses.replace(args, max_steps=steps)
    if args.compile is None:
        args = dataclasses.replace(args, compile=compile_pays_off(args, device))
    if args.warmup_steps is None:
        # A short run (e.g. --max-steps 30 to try things out) must get past its warmup.
        warmup = min(DEFAULT_WARMUP_STEPS, args.max_steps // 10)
        args = dataclasses.replace(args, warmup_steps=warmup)
    return args


def settings_warnings(args: TrainArgs) -> list[str]:
    """Warnings about resolved settings that cannot do what they say: warmup filling the
    whole schedule (--decay-steps, else --max-steps: the learning rate never reaches its
    peak, let alone decays), a preview longer than the model's context."""
    warnings = []
    schedule = args.decay_steps or args.max_steps
    if schedule < UNLIMITED_STEPS and args.warmup_steps >= schedule:
        length = "--decay-steps" if args.decay_steps else "--max-steps"
        warnings.append(
            f"warning: --warmup-steps {args.warmup_steps} covers the whole {schedule}-step "
            f"schedule ({length}): the learning rate rises all run and never decays"
        )
    # The preview starts at <|endoftext|>, so the context holds one token fewer of it.
    if args.sample_tokens >= args.block_size:
        warnings.append(
            f"warning: --sample-tokens {args.sample_tokens} is more than the model's context "
            f"(--block-size {args.block_size}) holds: previews stop at {args.block_size - 1} "
            "tokens"
        )
    return warnings


def budget_summary(args: TrainArgs) -> str:
    """What ends the run, for the start-up line: `5,000 steps`, `70 s`, or both."""
    steps = f"{args.max_steps:,} step{'s' if args.max_steps != 1 else ''}"
    limits = [steps] if args.max_steps < UNLIMITED_STEPS else []
    if args.max_time is not None:
        limits.append(f"{args.max_time:g} s")
    return " or ".join(limits)


SHAPE_FIELDS = ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "tie_embeddings")


def with_checkpoint_shape(
    args: TrainArgs,
    config: ModelConfig,
    sources: Mapping[str, str],
    own_tokenizer: bool,
) -> TrainArgs:
    """`--init-from`: the model is the checkpoint's, so a flag choosing another shape,
    vocabulary or tokenizer is an error (one giving the checkpoint's own value is not, as
    with --resume; `own_tokenizer`: --tokenizer names one defined as the checkpoint's
    is). The shape fields take the checkpoint's values (what `auto_dtype`
    reads, and what trainer_meta.json records), the preset the one given if it builds
    that shape with the shape flags given, else the one of that shape (`auto` if none),
    and the block size defaults to the context it was trained to."""
    shape = {name: getattr(config, name) for name in SHAPE_FIELDS}
    # The preset of that shape, if one has it, so its lr and batch size (AUTO) apply rather
    # than those of the preset a time box would pick for a new model.
    preset = next(
        (name for name, p in PRESETS.items() if all(getattr(p, n) == v for n, v in shape.items())),
        "auto",
    )
    given_shape = {n: getattr(args, n) for n in SHAPE_FIELDS}
    if args.preset in PRESETS and _builds_shape(args.preset, given_shape, shape):
        # The pretraining command repeated: `--preset tiny --n-kv-heads 4` names the
        # shape of a model trained so, and its preset's lr and batch size apply.
        preset = args.preset
    checkpoints = {"preset": preset, **shape, "vocab_size": config.vocab_size}
    given = [n for n, value in checkpoints.items() if getattr(args, n) not in (None, "auto", value)]
    given += ["tokenizer"] if args.tokenizer is not None and not own_tokenizer else []
    if given:
        names = ", ".join(_source(name, sources) for name in given)
        raise UsageError(f"--init-from fixes the model and its tokenizer: drop {names}")
    block_size = args.block_size or config.max_seq_len
    if block_size > config.max_seq_len:
        raise UsageError(
            f"{_source('block_size', sources)} {block_size}: the --init-from model reads "
            f"at most {config.max_seq_len} tokens"
        )
    return dataclasses.replace(
        args, preset=preset, block_size=block_size, vocab_size=config.vocab_size, **shape
    )


def _builds_shape(
    preset: str, given_shape: Mapping[str, object], shape: Mapping[str, object]
) -> bool:
    """Whether `preset` with the shape flags given (`given_shape`: field -> value, None
    where not given) builds the model `shape`."""
    overrides = {n: v for n, v in given_shape.items() if v is not None}
    try:
        built = ModelConfig.from_preset(preset, **overrides)
    except ValueError:  # a shape that cannot be: not the checkpoint's
        return False
    return all(getattr(built, n) == v for n, v in shape.items())


def check_resume_settings(
    given: Given, saved: Mapping[str, object], config: ModelConfig, run_folder: Path
) -> None:
    """`--resume`: the model and tokenizer are the checkpoint's, so a flag choosing
    another shape, vocabulary or tokenizer is an error (one repeating the run's own value
    is not: the command that started the run, with --resume added, continues it), the
    block size may not pass the context the model was built for, and the run goes on in
    its own folder."""
    settings = given.values
    out_dir = settings.get("out_dir")
    if isinstance(out_dir, str) and os.path.realpath(out_dir) != os.path.realpath(run_folder):
        raise UsageError(
            f"{_source('out_dir', given.sources)} {out_dir}: --resume goes on in the folder of "
            f"the run it continues ({run_folder}); to branch a run, copy its folder and "
            "resume the copy"
        )

    def changed(name: str) -> bool:
        if name not in settings:
            return False
        # Absolute both: runs saved before paths were made absolute hold them as given.
        if as_saved(name, settings[name]) == as_saved(name, saved.get(name)):
            return False
        if name == "preset" and saved.get(name) == "auto" and settings[name] in PRESETS:
            # The preset `auto` chose, named (with the run's shape flags): no change.
            shape = {n: getattr(config, n) for n in SHAPE_FIELDS}
            given_shape = {n: settings.get(n, saved.get(n)) for n in SHAPE_FIELDS}
            return not _builds_shape(settings[name], given_shape, shape)
        # A shape the preset chose is saved as None: the model's own value is no change.
        return name not in SHAPE_FIELDS or settings[name] != getattr(config, name)

    def refuse(names: tuple[str, ...], what: str) -> None:
        if given_now := [name for name in names if changed(name)]:
            flags = ", ".join(_source(name, given.sources) for name in given_now)
            raise UsageError(f"--resume continues the run's {what}: drop {flags}")

    refuse(("preset", *SHAPE_FIELDS, "vocab_size", "tokenizer"), "model and tokenizer")
    # Restored from the checkpoint, not made anew: a value given now would change nothing.
    kept = ", ".join(f"{name} {saved.get(name)}" for name in ("optimizer", "seed"))
    refuse(("optimizer", "seed"), f"optimizer state and random state ({kept})")
    block_size = settings.get("block_size")
    if isinstance(block_size, int) and block_size > config.max_seq_len:
        raise UsageError(
            f"{_source('block_size', given.sources)} {block_size}: the resumed model reads "
            f"at most {config.max_seq_len} tokens"
        )


PATH_FIELDS = ("data", "val_data", "tokenizer", "cache_dir", "init_from")


def as_saved(name: str, value: object) -> object:
    """Setting `name`'s `value` as trainer_meta.json records it: paths made absolute."""
    if name not in PATH_FIELDS or value is None:
        return value
    if isinstance(value, list):
        return [os.path.abspath(v) for v in value]
    return os.path.abspath(value)


def with_absolute_paths(args: TrainArgs) -> TrainArgs:
    """The input paths made absolute, as trainer_meta.json records them: a run resumed
    from another directory reads the same files (or fails naming them)."""
    return dataclasses.replace(args, **{n: as_saved(n, getattr(args, n)) for n in PATH_FIELDS})


def model_config(args: TrainArgs, vocab_size: int, device: torch.device) -> ModelConfig:
    """The network `args` describe for a tokenizer of `vocab_size` ids.

    The context length is the block size: the model is only trained that far.
    """
    preset = resolved_preset(args, device)
    overrides = {n: getattr(args, n) for n in SHAPE_FIELDS if getattr(args, n) is not None}
    try:
        return ModelConfig.from_preset(
            preset,
            vocab_size=vocab_size,
            max_seq_len=args.block_size,
            dropout=args.dropout,
            **overrides,
        )
    except ValueError as e:
        # What comes from the preset and what was given: a value the user never set
        # (the preset's n_kv_heads) is then no mystery.
        given = " ".join(f"{flag(name)} {value}" for name, value in overrides.items())
        shape = f"the model shape (--preset {preset}{' with ' if given else ''}{given})"
        raise UsageError(f"{shape}: {str(e).removeprefix('invalid ModelConfig: ')}") from None


# ---------------------------------------------------------------- parsing

FIELDS = {f.name: f for f in dataclasses.fields(TrainArgs)}
TYPES = typing.get_type_hints(TrainArgs)


def _source(name: str, sources: Mapping[str, str] | None) -> str:
    """How the user gave setting `name` (its flag, env var or config entry; the flag if
    `sources` does not say): what an error about its value names."""
    return (sources or {}).get(name, flag(name))


def _base_type(name: str) -> tuple[type, bool]:
    """(scalar type, optional) of a field; list fields report list."""
    hint = TYPES[name]
    if isinstance(hint, types.UnionType):
        return next(a for a in typing.get_args(hint) if a is not type(None)), True
    return typing.get_origin(hint) or hint, False


def _convert(name: str, value: object, source: str) -> object:
    """A config/env/CLI value -> the field's type; UsageError names `source` on failure."""
    kind, optional = _base_type(name)
    try:
        # Empty, as `POCKETGPT_INIT_FROM=` leaves it: unset, as `POCKETGPT_RESUME=` was.
        if optional and (
            value is None or (isinstance(value, str) and value.strip().lower() in ("", "none"))
        ):
            return None
        if kind is list:
            if isinstance(value, str):
                return value.split(os.pathsep) if value else []
            if isinstance(value, list) and all(isinstance(v, str) for v in value):
                return list(value)
            raise ValueError("expected a list of strings")
        if kind is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError("expected true/false")
        if kind is int and isinstance(value, (bool, float)):
            raise ValueError("expected an integer")
        if kind is float and isinstance(value, bool):
            raise ValueError("expected a number")
        return kind(value)
    except (TypeError, ValueError) as e:
        raise UsageError(f"{source}: invalid value {value!r} ({e})") from None


class _Parser(ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m training.pretrain",
        description="Train a small GPT on text and write checkpoints. "
        "Every flag also reads the environment variable POCKETGPT_<FLAG>.",
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="TOML (.toml) or JSON file of these settings, keys as the flags' names (max-steps "
        "or max_steps); relative paths in it are taken from the working directory, as on the "
        "command line; flags and env vars win over it (env POCKETGPT_CONFIG)",
    )
    defaults = TrainArgs()
    for name, f in FIELDS.items():
        kind, _ = _base_type(name)
        help_text = f.metadata["help"]
        default = getattr(defaults, name)
        # Unset (None, []) needs no note, and some helps say their default themselves.
        if default not in (None, []) and "default:" not in help_text:
            help_text += f" (default: {default!r})"
        if kind is bool:
            # Alone it is true, and it takes true / false too, as a server switch does
            # (_convert reads the word).
            parser.add_argument(
                flag(name), nargs="?", const=True, metavar="true|false", help=help_text
            )
            parser.add_argument(
                flag("no_" + name),
                dest=name,
                action="store_const",
                const=False,
                help=f"the same as {flag(name)} false",
            )
        elif kind is list:
            # `--data a --data b` reads both: the second does not replace the first.
            parser.add_argument(
                flag(name), nargs="+", action="extend", metavar="PATH", help=help_text
            )
        else:
            parser.add_argument(flag(name), metavar=kind.__name__.upper(), help=help_text)
    return parser


def _read_config_file(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8-sig")  # Notepad writes a BOM
    except OSError as e:
        raise UsageError(f"--config {path}: cannot read ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise UsageError(f"--config {path}: not UTF-8 text (byte {e.start})") from None
    # A .toml file is TOML; any other name is read as JSON.
    is_toml = path.suffix.lower() == ".toml"
    try:
        data = tomllib.loads(text) if is_toml else json.loads(text, object_pairs_hook=_unique)
    except _RepeatedKey as e:
        raise UsageError(f"--config {path}: {e.args[0]!r} is given twice") from None
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
        kind = "TOML" if is_toml else "JSON"
        raise UsageError(f"--config {path}: not valid {kind} ({e})") from None
    if not isinstance(data, dict):
        raise UsageError(f"--config {path}: expected an object of settings")
    out, keys = {}, {}
    for key, value in data.items():
        name = key.replace("-", "_")
        if name not in FIELDS:
            raise UsageError(f"--config {path}: unknown setting {key!r}")
        if name in keys:
            raise UsageError(f"--config {path}: {keys[name]!r} and {key!r} are one setting")
        keys[name] = key
        out[name] = _convert(name, value, f"--config {path}: {key}")
    return out


class _RepeatedKey(ValueError):
    pass


def _unique(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """A JSON object whose keys are distinct (json keeps the last of a repeated key)."""
    seen = dict(pairs)
    if len(seen) < len(pairs):
        raise _RepeatedKey(next(key for key in seen if sum(k == key for k, _ in pairs) > 1))
    return seen


@dataclass(frozen=True)
class Given:
    """The settings a user gave, and where each came from (what an error names)."""

    values: dict[str, object]
    sources: dict[str, str]  # field -> "--flag", "POCKETGPT_FLAG" or "--config FILE: key"

    def source(self, name: str) -> str:
        """How setting `name` was given: what an error about it names (its flag if it
        was not given)."""
        return _source(name, self.sources)


def explicit_settings(argv: Sequence[str] | None, environ: Mapping[str, str]) -> Given:
    """Settings given by config file, environment and command line, in rising precedence."""
    given = vars(build_parser().parse_args(argv))
    values, sources = {}, {}
    config = given.pop("config", None) or environ.get(env_var("config"))
    if config:
        values.update(_read_config_file(Path(config)))
        sources.update({name: f"--config {config}: {name}" for name in values})
    for name in FIELDS:
        env = env_var(name)
        # A flag wins over its variable, whose value is then not read (a bad one in the
        # environment need not stop a command line that overrides it).
        if env in environ and name not in given:
            values[name], sources[name] = _convert(name, environ[env], env), env
    for name, value in given.items():
        typed = flag("no_" + name if value is False else name)  # as typed: --no-compile
        values[name], sources[name] = _convert(name, value, typed), typed
    return Given(values, sources)


def make_args(base: Mapping[str, object], given: Given) -> TrainArgs:
    """TrainArgs from `base` (defaults or a resumed run's args) overridden by `given`."""
    known = {k: v for k, v in base.items() if k in FIELDS}
    return TrainArgs(**{**known, **given.values}).validate(given.sources)
