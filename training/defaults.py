"""What the settings left at `auto` or `none` become: chosen by the device, the CPU's
bf16 units, the time box and the size of the training text, with the measurements
behind each choice. TrainArgs (training/args.py) documents the settings themselves."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch

from model.config import PRESETS, ModelConfig
from model.cpu import bf16_units
from model.device import cuda_runs_bf16
from model.inductor import has_compiler, missing_compiler_message
from training.args import SHAPE_FIELDS, TrainArgs, UsageError, setting_source

SHORT_CPU_BUDGET_S = 600.0


def budget_preset(args: TrainArgs, device: torch.device) -> str:
    """`--preset auto`: `small`, except for a CPU run boxed under 10 minutes: `mini` on a
    CPU with AMX, `tiny` elsewhere.

    In a minute on 2 CPU cores `small` sees too little text to learn much. Without AMX
    `tiny` (~0.85M parameters at vocab 512) processes ~6x more tokens and ends far
    lower; with AMX's bf16 products `mini` (~3.4M) runs at ~15k tokens/s and ends
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
#     costs ~20% of the step; a higher lr (4e-3). 16 sequences per step (2 Zen 4 cores,
#     bf16, Muon: 2.167 / 2.171 in ~650 steps vs 8's 2.187 / 2.175 in ~1,050; 32: 2.176):
#     Muon's Newton-Schulz costs ~9 ms a step whatever the batch, a ninth of a
#     16-sequence step and a fifth of an 8-sequence one, and bf16 products run faster
#     on more rows (tokens/s 1.33x the plain fp32 loop instead of 1.19x).
#   mini (AMX CPUs): the same 512 entries and context (1024 entries: 2.35 vs 2.27 bpb);
#     16 sequences per step at 3e-3 (8 per step: 2.31).
#   small/base: 2048 entries pack ~1.5x more text per token, which pays once the
#     body dominates the cost; a 256-token context (what the served model can read)
#     at 8 sequences keeps a step at 2048 tokens, as 16 x 128 did.
AUTO: dict[str, dict[str, int | float]] = {
    "tiny": {"vocab_size": 512, "block_size": 128, "lr": 4e-3, "batch_size": 16},
    "mini": {"vocab_size": 512, "block_size": 128, "lr": 3e-3, "batch_size": 16},
    "small": {"vocab_size": 2048, "block_size": 256, "lr": 2e-3, "batch_size": 8},
    "base": {"vocab_size": 2048, "block_size": 256, "lr": 2e-3, "batch_size": 8},
}

# Without --max-steps a run makes the device's step count (time-boxed: as many as the
# clock allows), but never more than DEFAULT_MAX_EPOCHS passes over the training tokens.
# CPU, by the precision its products run in, so that the zero-argument run stays within
# ~15 minutes on 2 cores: in bf16 (AMX, AVX512-BF16) 600 steps are ~5 minutes of `small`
# on 2 AMX cores (2 Zen 4 cores, the slowest bf16 CPU measured, took 8 for 400); the
# embedded corpus's 5 passes are 589 steps, which end at 1.61 val bits/byte where 400 (3.4
# passes, 3.5 minutes) ended at 1.71. In fp32 a step costs more: ~1.5x on AMX cores (5 min
# 15 s for 400 steps), more where there is no AVX-512 either (2 AVX2 cores multiply at
# ~100 GFLOP/s: ~1.5 s a `small` step, estimated): 400. CUDA: 5000 steps would be ~40
# passes over the embedded corpus, and past a few passes `small` memorises the text (train
# loss ~0.2 nats) while validation loss climbs. End-of-run val bits/byte of `small` with
# Muon, a full schedule each (H200, BENCHMARKS.md): the embedded corpus 1.49 at 4.1
# passes, 1.32 at 6.2, 1.25 at 8.3, 1.40 at 16.6; tinyshakespeare 1.90 at 3.2, 1.91 at
# 4.9, 2.03 at 6.5, 2.65 at 13; its first 250 kB 2.18 at 3.5, 2.14 at 5.2, 2.17 at 6.9,
# 2.57 at 13.9. A time box is no guard: `mini` on tinyshakespeare's first 100 kB,
# time-boxed at 70 s on 2 AMX cores, made 20.6 passes and ended at 5.05 val nats/token
# (4.24 at 11 passes); a full schedule over 3 / 5 / 7 / 10 passes ends at 3.57 / 3.43 /
# 3.35 / 3.72.
DEFAULT_CPU_STEPS = {"bfloat16": 600, "float32": 400}
DEFAULT_CUDA_STEPS = 5000
DEFAULT_MAX_EPOCHS = 5
DEFAULT_WARMUP_STEPS = 30


# When `--compile none` compiles, by device: a run must be long enough that the first
# build (cached on disk afterwards, but a newcomer's first run pays it) is repaid.
# CPU, 2 cores: the build takes ~15-20 s for `tiny` and ~50 s for `small`; compiled, a
# step is then ~1.3x faster for `tiny` and ~1.1x for `small` (fewer, fused kernels;
# matrix products are the rest). At --max-time 70 a cold build loses (`tiny`: 708
# steps vs 740 eager; 910 with a warm cache), and the 600-step `small` default would save
# ~30 s of its ~5 minutes, hence 2 minutes / 1000 steps. CUDA: ~35 s for `base` on an
# H100, then with bf16 8x an eager fp32 loop.
COMPILE_MIN_STEPS = {"cpu": 1000, "cuda": 200}
COMPILE_MIN_SECONDS = {"cpu": 120.0, "cuda": 60.0}


def compile_pays_off(args: TrainArgs, device: torch.device) -> bool:
    """`--compile none`: compile when the run is long enough to repay the build, in steps
    and by its time box if it has one (a time-boxed run on a small text ends at its
    passes long before its clock), and the compiler inductor needs is installed
    (model/inductor.py)."""
    many_steps = args.max_steps is not None and args.max_steps >= COMPILE_MIN_STEPS[device.type]
    long_box = args.max_time is None or args.max_time >= COMPILE_MIN_SECONDS[device.type]
    return many_steps and long_box and has_compiler(device)


# Below this width an AMX CPU's bf16 products are too small to repay autocast's casts:
# `tiny` (128 wide) trains at 23k tokens/s in bf16 vs 27k in fp32, `mini` (256) at 15k
# vs 10k on the same 2 cores. AVX512-BF16 (2 EPYC vCPUs) gains at every width measured:
# `tiny` 16k vs 15k, `mini` 8.2k vs 5.1k, `small` 2.6k vs 1.6k.
BF16_AMX_MIN_DIM = 256


def auto_dtype(args: TrainArgs, device: torch.device) -> str:
    if device.type == "cuda":
        # Before Ampere bf16 is emulated: slower than float32 (and fp16 would need loss
        # scaling).
        return "bfloat16" if cuda_runs_bf16() else "float32"
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


def tokens_per_step(args: TrainArgs, world_size: int) -> int:
    return args.batch_size * args.block_size * args.grad_accum * world_size


def default_steps(args: TrainArgs, device: torch.device, train_tokens: int, world_size: int) -> int:
    """`--max-steps none`: DEFAULT_MAX_EPOCHS passes over `train_tokens`, and without
    --max-time no more than the device's step count (with it, the clock usually ends the
    run first)."""
    passes = -(-DEFAULT_MAX_EPOCHS * train_tokens // tokens_per_step(args, world_size))  # ceil
    steps = passes if args.max_time is not None else min(device_steps(args, device), passes)
    return max(1, steps)


def device_steps(args: TrainArgs, device: torch.device) -> int:
    """The step count of a run given neither --max-steps nor --max-time, before the cap on
    passes: on a CPU by `args.dtype` (resolved: never "auto")."""
    return DEFAULT_CUDA_STEPS if device.type == "cuda" else DEFAULT_CPU_STEPS[args.dtype]


def with_step_budget(
    args: TrainArgs, device: torch.device, train_tokens: int, world_size: int = 1
) -> TrainArgs:
    """Fill in `--max-steps` (`default_steps`), `--compile` (`compile_pays_off`) and
    `--warmup-steps` once the size of the training text is known."""
    if args.max_steps is None:
        steps = default_steps(args, device, train_tokens, world_size)
        args = dataclasses.replace(args, max_steps=steps)
    if args.compile is None:
        args = dataclasses.replace(args, compile=compile_pays_off(args, device))
    if args.warmup_steps is None:
        # A short schedule (e.g. --max-steps 30 to try things out) must get past its
        # warmup; its length is --decay-steps where given (a run cut short of it warms up
        # as the whole run does, one decayed early within its warmup).
        schedule = args.decay_steps or args.max_steps
        warmup = min(DEFAULT_WARMUP_STEPS, schedule // 10)
        args = dataclasses.replace(args, warmup_steps=warmup)
    return args


def settings_warnings(args: TrainArgs) -> list[str]:
    """Warnings about resolved settings that cannot do what they say: warmup filling the
    whole schedule (--decay-steps, else --max-steps: the learning rate never reaches its
    peak, let alone decays), a preview longer than the model's context."""
    warnings = []
    schedule = args.decay_steps or args.max_steps
    if args.warmup_steps >= schedule:
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


def time_box_warning(args: TrainArgs, step: int, stopped_by: str) -> str | None:
    """A warning where --max-time ended the run at `step`, still inside its warmup: the
    schedule is in steps, and no step count told the start-up check how many it makes."""
    if stopped_by != "max_time" or step >= args.warmup_steps:
        return None
    return (
        f"warning: --max-time {args.max_time:g} s ended the run at step {step}, inside "
        f"--warmup-steps {args.warmup_steps}: the learning rate never reached --lr nor "
        "decayed; allow more time or fewer warmup steps"
    )


def budget_summary(args: TrainArgs, train_tokens: int, world_size: int = 1) -> str:
    """What ends the run, for the start-up line: `589 steps (5 passes)`, or with
    --max-time `1,025 steps (5 passes) or 70 s`."""
    ratio = args.max_steps * tokens_per_step(args, world_size) / max(1, train_tokens)
    passes = f"{ratio:,.0f}" if ratio >= 10 else f"{ratio:.2g}"  # 43,995 / 5.1 / 0.23
    steps = f"{args.max_steps:,} step{'s' if args.max_steps != 1 else ''}"
    summary = f"{steps} ({passes} pass{'es' if passes != '1' else ''})"
    return summary if args.max_time is None else f"{summary} or {args.max_time:g} s"


def model_config(
    args: TrainArgs,
    vocab_size: int,
    device: torch.device,
    sources: Mapping[str, str] | None = None,
) -> ModelConfig:
    """The network `args` describe for a tokenizer of `vocab_size` ids; `sources` (a
    field -> its flag, env var or config entry) names the settings in an error.

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
        # Each as the user gave it (POCKETGPT_N_HEADS, a --config entry): a flag they never
        # typed sent them looking through their command line.
        given = " ".join(_as_given(name, value, sources) for name, value in overrides.items())
        preset_source = setting_source("preset", sources)
        with_given = f" with {given}" if given else ""
        shape = f"the model shape ({preset_source} {preset}{with_given})"
        raise UsageError(f"{shape}: {str(e).removeprefix('invalid ModelConfig: ')}") from None


def _as_given(name: str, value: object, sources: Mapping[str, str] | None) -> str:
    """Setting `name` set to `value`, as the user gave it: `POCKETGPT_DIM 100`, and
    `--no-tie-embeddings` alone (`--no-tie-embeddings False` would read as true)."""
    source = setting_source(name, sources)
    return source if source.startswith("--no-") else f"{source} {value}"
