"""TrainArgs: flags, POCKETGPT_* variables and --config files, in that precedence."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch

from model.cli import flag
from model.config import MIN_SERVED_CONTEXT, ModelConfig
from model.cpu import bf16_units
from tests.test_training_pretrain import CORPUS, TINY
from training import pretrain
from training.args import (
    MAX_SEED,
    Given,
    TrainArgs,
    UsageError,
    build_parser,
    explicit_settings,
    make_args,
    with_absolute_paths,
)
from training.defaults import (
    AUTO,
    budget_summary,
    compile_pays_off,
    default_steps,
    resolved_preset,
    settings_warnings,
    time_box_warning,
    with_hardware_defaults,
    with_step_budget,
)
from training.prepare import MAX_VOCAB
from training.resume import check_resume_settings, later_steps_note, with_checkpoint_shape

# The embedded corpus's training tokens at the `small` vocabulary (2048).
EMBEDDED_TRAIN_TOKENS = 240_986


def test_help_lists_every_setting_with_its_default() -> None:
    text = build_parser().format_help()
    assert "--eval-interval" in text and "(default: 250)" in text
    assert "--no-compile" in text
    for name in TrainArgs.__dataclass_fields__:
        assert "--" + name.replace("_", "-") in text


def test_flags_beat_environment_beat_config_file(tmp_path: Path) -> None:
    config = tmp_path / "run.toml"
    config.write_text('lr = 0.01\nmax-steps = 7\npreset = "tiny"\ndata = ["a.txt"]\n')
    environ = {"POCKETGPT_MAX_STEPS": "9", "POCKETGPT_COMPILE": "yes"}
    settings = explicit_settings(["--config", str(config), "--lr", "0.5"], environ)
    args = make_args(TrainArgs().to_dict(), settings)
    assert (args.lr, args.max_steps, args.preset, args.data) == (0.5, 9, "tiny", ["a.txt"])
    assert args.compile is True
    assert args.batch_size == TrainArgs().batch_size
    # The config file named by its variable, as Docker users give it.
    from_env = explicit_settings([], {"POCKETGPT_CONFIG": str(config)})
    assert from_env.values["max_steps"] == 7
    assert from_env.sources["max_steps"] == f"--config {config}: max-steps"  # as written


@pytest.mark.parametrize("name", ["run.toml", "run.json"])
def test_a_config_file_that_begins_with_a_byte_order_mark_is_read(
    tmp_path: Path, name: str
) -> None:
    # Windows Notepad's "UTF-8" writes one; the data files are read past it too.
    config = tmp_path / name
    text = (
        "lr = 0.01\nmax-steps = 7\n" if name.endswith(".toml") else '{"lr": 0.01, "max-steps": 7}'
    )
    config.write_text(text, encoding="utf-8-sig")
    args = make_args(TrainArgs().to_dict(), explicit_settings(["--config", str(config)], {}))
    assert (args.lr, args.max_steps) == (0.01, 7)


def test_a_config_read_from_a_pipe_is_read() -> None:
    # As bash's `--config <(...)` gives it: /dev/fd/N, a pipe with no size until read.
    read_end, write_end = os.pipe()
    os.write(write_end, b'{"max-steps": 7}')
    os.close(write_end)
    try:
        settings = explicit_settings(["--config", f"/dev/fd/{read_end}"], {})
    finally:
        os.close(read_end)
    assert make_args(TrainArgs().to_dict(), settings).max_steps == 7


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("run.toml", "lr = ", "not valid TOML"),
        ("RUN.TOML", "lr = ", "not valid TOML"),  # suffixes in any case, as for --data
        ("run.json", "{lr: 1}", "not valid JSON"),
        # Any name but .toml is read as JSON, and said to be where it is no .json.
        ("settings", "lr = 1", "not valid JSON, as a file not named .toml is read"),
        ("run.yaml", "lr: 1", "not valid JSON, as a file not named .toml is read"),
        # Past what Python's parsers take: deep nesting, an integer of 4,300+ digits.
        pytest.param("run.json", "[" * 100_000 + "]" * 100_000, "not valid JSON", id="deep json"),
        pytest.param(
            "run.toml", "x = " + "[" * 100_000 + "]" * 100_000, "not valid TOML", id="deep toml"
        ),
        pytest.param(
            "run.json", '{"seed": 1' + "0" * 5000 + "}", "not valid JSON", id="5001 digits"
        ),
    ],
)
def test_unparsable_config_file_names_its_format(
    tmp_path: Path, name: str, text: str, message: str
) -> None:
    config = tmp_path / name
    config.write_text(text)
    with pytest.raises(UsageError, match=f"--config {re.escape(str(config))}: {message} "):
        explicit_settings(["--config", str(config)], {})


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"max_steps": 1.5}', "max_steps: invalid value 1.5"),
        # An integer no float holds, for a float setting.
        pytest.param(
            '{"lr": 1' + "0" * 400 + "}", r"lr: invalid value 10+ \(int too large to", id="1e400"
        ),
        ('{"lr": true}', r"lr: invalid value True \(expected a number\)"),
        ('{"learning_rate": 1}', "unknown setting 'learning_rate'"),
        ("[1, 2]", "expected an object"),
        # One setting twice: which one wins is not for a reader to guess.
        ('{"max_steps": 5, "max-steps": 6}', "'max_steps' and 'max-steps' are one setting"),
        ('{"max_steps": 5, "max_steps": 6}', "'max_steps' is given twice$"),
        # Valid JSON, but no settings file is this long (nor is /dev/zero, never ending).
        pytest.param("{}" + " " * (1 << 20), "longer than 1 MiB$", id="over 1 MiB"),
    ],
)
def test_bad_config_file_names_the_file_and_setting(
    tmp_path: Path, text: str, message: str
) -> None:
    config = tmp_path / "run.json"
    config.write_text(text)
    with pytest.raises(UsageError, match=message) as error:
        explicit_settings(["--config", str(config)], {})
    assert str(config) in str(error.value)


def test_a_config_file_of_exactly_1_mib_is_read(tmp_path: Path) -> None:
    config = tmp_path / "run.json"
    settings = '{"seed": 7}'
    config.write_text(settings + " " * ((1 << 20) - len(settings)))
    assert explicit_settings(["--config", str(config)], {}).values == {"seed": 7}


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ('out-dir = ["runs/a"]', "['runs/a']"),  # was the folder "['runs/a']"
        ("tokenizer = true", "True"),  # was the path "True"
        ("cache-dir = 2026-01-01", "datetime.date(2026, 1, 1)"),
        ("resume = 5", "5"),
        ("init-from = {path = 'a'}", "{'path': 'a'}"),
    ],
)
def test_a_config_value_of_another_type_is_no_path_or_name(
    tmp_path: Path, text: str, value: str
) -> None:
    # Flags and variables are text; a config file's value is typed, and its str() is no
    # path the user wrote.
    config = tmp_path / "run.toml"
    config.write_text(text + "\n")
    with pytest.raises(UsageError) as error:
        explicit_settings(["--config", str(config)], {})
    key = text.split(" = ")[0]
    assert str(error.value) == (
        f"--config {config}: {key}: invalid value {value} (expected a string)"
    )
    # JSON's null for a setting that cannot be unset was the folder "None".
    config = tmp_path / "run.json"
    config.write_text('{"out_dir": null}')
    with pytest.raises(UsageError, match=r"out_dir: invalid value None \(expected a string\)"):
        explicit_settings(["--config", str(config)], {})


@pytest.mark.parametrize(
    ("device", "flags", "train_tokens", "expected"),
    [
        # The CPU default (589 steps, 5 passes; 400 in fp32): a cold build would not repay
        ("cpu", {}, EMBEDDED_TRAIN_TOKENS, False),
        ("cpu", {"max_steps": 1000}, EMBEDDED_TRAIN_TOKENS, True),
        ("cpu", {"max_time": 70.0}, 10 * EMBEDDED_TRAIN_TOKENS, False),
        ("cpu", {"max_time": 120.0}, 10 * EMBEDDED_TRAIN_TOKENS, True),
        # 5 passes are 589 steps of `mini`: the run ends before a build repays.
        ("cpu", {"max_time": 120.0, "preset": "mini"}, EMBEDDED_TRAIN_TOKENS, False),
        ("cpu", {"max_steps": 5000, "max_time": 30.0}, EMBEDDED_TRAIN_TOKENS, False),
        # 589 steps: CUDA's 5000 capped at 5 passes over the text
        ("cuda", {}, EMBEDDED_TRAIN_TOKENS, True),
        ("cuda", {"max_steps": 50}, EMBEDDED_TRAIN_TOKENS, False),
        ("cuda", {"max_time": 60.0}, EMBEDDED_TRAIN_TOKENS, True),
        ("cuda", {"max_time": 30.0}, EMBEDDED_TRAIN_TOKENS, False),
        ("cuda", {"max_time": 60.0}, 50_000, False),  # 5 passes: 123 steps
    ],
)
def test_compile_defaults_on_for_runs_that_repay_the_build(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    device: str,
    flags: dict,
    train_tokens: int,
    expected: bool,
) -> None:
    for name in ("g++", "gcc"):  # the CPU and the CUDA (Triton launcher) compilers
        compiler = tmp_path / name
        compiler.write_text("#!/bin/sh\n")
        compiler.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    args = with_hardware_defaults(TrainArgs(**flags), torch.device(device))
    args = with_step_budget(args, torch.device(device), train_tokens)
    assert args.compile is expected


def test_compile_stays_off_without_a_compiler(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: no g++, c++ or clang++
    long_run = TrainArgs(max_time=600.0, max_steps=5000)
    assert not compile_pays_off(long_run, torch.device("cpu"))
    # An explicit --compile fails before anything runs, naming the flag, not mid-run.
    with pytest.raises(UsageError, match=r"--compile: .*needs a compiler on PATH \(g\+\+"):
        with_hardware_defaults(TrainArgs(max_time=600.0, compile=True), torch.device("cpu"))


def test_warmup_left_out_is_30_steps_or_a_tenth_of_the_run_if_that_is_fewer() -> None:
    for max_steps, warmup in ((1000, 30), (100, 10), (5, 0)):
        args = TrainArgs(max_steps=max_steps, compile=False)
        budget = with_step_budget(args, torch.device("cpu"), EMBEDDED_TRAIN_TOKENS)
        assert budget.warmup_steps == warmup, max_steps


def test_warmup_left_out_is_a_tenth_of_the_schedule_decay_steps_sets() -> None:
    # A 20-step schedule in a 1000-step run (decayed, then held at the floor): the
    # default warmup must end inside it, not fill it and be warned of.
    given = explicit_settings(["--max-steps", "1000", "--decay-steps", "20"], {})
    cpu = torch.device("cpu")
    args = with_hardware_defaults(make_args(TrainArgs(compile=False).to_dict(), given), cpu)
    budget = with_step_budget(args, cpu, EMBEDDED_TRAIN_TOKENS)
    assert budget.warmup_steps == 2
    assert settings_warnings(budget) == []
    # A run cut short (60 steps of a 110-step schedule) warms up as the whole run does,
    # so that resumed to 110 steps it follows the uninterrupted run's curve.
    cut = with_step_budget(TrainArgs(max_steps=60, decay_steps=110, compile=False), cpu, 1)
    whole = with_step_budget(TrainArgs(max_steps=110, compile=False), cpu, 1)
    assert cut.warmup_steps == whole.warmup_steps == 11


def test_a_cpu_time_box_of_600_s_or_more_trains_the_small_preset() -> None:
    cpu = torch.device("cpu")
    short = "mini" if bf16_units() == "amx" else "tiny"
    assert resolved_preset(TrainArgs(max_time=599.0), cpu) == short
    assert resolved_preset(TrainArgs(max_time=600.0), cpu) == "small"


@pytest.mark.parametrize("max_time", [70.0, None])
def test_auto_settings_resolve_to_what_the_hardware_does_best(max_time: float | None) -> None:
    """Under a short time box an AMX CPU trains `mini` in bf16, an AVX512-BF16 CPU
    `tiny` in bf16, any other CPU `tiny` in fp32; without one, `small`, in bf16 on
    either kind of bf16 units; on CUDA `small`, in bf16 from Ampere on."""
    cpu = torch.device("cpu")
    args = with_hardware_defaults(TrainArgs(max_time=max_time), cpu)
    units = bf16_units()
    preset = resolved_preset(args, cpu)
    if max_time is None:
        assert preset == "small" and args.batch_size == AUTO["small"]["batch_size"]
    else:
        assert preset == ("mini" if units == "amx" else "tiny")
        assert args.batch_size == AUTO[preset]["batch_size"]
    assert args.dtype == ("float32" if units is None else "bfloat16")
    cuda = with_hardware_defaults(TrainArgs(max_time=max_time), torch.device("cuda"))
    assert resolved_preset(cuda, torch.device("cuda")) == "small"
    # bf16 where the GPU has it natively (Ampere, compute capability 8, and later).
    ampere = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0)
    assert cuda.dtype == ("bfloat16" if ampere else "float32")
    chosen = TrainArgs(max_time=max_time, dtype="float32", batch_size=3)
    kept = with_hardware_defaults(chosen, cpu)
    assert (kept.dtype, kept.batch_size) == ("float32", 3)


@pytest.mark.parametrize(
    ("device", "dtype", "train_tokens", "world_size", "expected", "time_boxed"),
    [
        # 5 passes of 2048 tokens a step, not 600
        ("cpu", "bfloat16", EMBEDDED_TRAIN_TOKENS, 1, 589, 589),
        ("cpu", "bfloat16", 2 * EMBEDDED_TRAIN_TOKENS, 1, 600, 1177),  # 2.5 passes: no cap
        # An fp32 step costs more than a bf16 one: fewer keep the run within its minutes.
        ("cpu", "float32", EMBEDDED_TRAIN_TOKENS, 1, 400, 589),
        ("cpu", "float32", 2 * EMBEDDED_TRAIN_TOKENS, 1, 400, 1177),
        ("cuda", "bfloat16", EMBEDDED_TRAIN_TOKENS, 1, 589, 589),  # 5 passes, not 5000 (41)
        # Two ranks read twice the tokens a step; on CUDA the dtype does not change the count.
        ("cuda", "float32", EMBEDDED_TRAIN_TOKENS, 2, 295, 295),
        ("cuda", "bfloat16", 2_000_000_000, 1, 5000, 4_882_813),
        ("cpu", "float32", 100, 1, 1, 1),
    ],
)
def test_default_steps_stop_after_five_passes_over_the_training_text(
    device: str, dtype: str, train_tokens: int, world_size: int, expected: int, time_boxed: int
) -> None:
    dev = torch.device(device)
    args = with_hardware_defaults(TrainArgs(dtype=dtype), dev)
    assert default_steps(args, dev, train_tokens, world_size) == expected
    assert with_step_budget(args, dev, train_tokens, world_size).max_steps == expected
    # An explicit step count is the user's: never capped.
    explicit = with_hardware_defaults(TrainArgs(max_steps=5000, dtype=dtype), dev)
    assert with_step_budget(explicit, dev, train_tokens, world_size).max_steps == 5000
    # A time box lifts the device's step count, not the cap on passes: on a small text
    # the clock would overfit the model (training/defaults.py).
    boxed = with_hardware_defaults(TrainArgs(max_time=70.0, preset="small", dtype=dtype), dev)
    assert with_step_budget(boxed, dev, train_tokens, world_size).max_steps == time_boxed


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--vocab-size", "256"], "--vocab-size: must be in 257..65536 (every byte plus"),
        (["--vocab-size", "70000"], "--vocab-size: must be in 257..65536 (every byte plus"),
        (["--seed", str(MAX_SEED + 1)], f"--seed: must be in 0..{MAX_SEED}"),
        (["--seed", "-1"], f"--seed: must be in 0..{MAX_SEED} (got -1)"),
        (["--lr", "inf"], "--lr: must be a finite number (got inf)"),
        (["--lr", "nan"], "--lr: must be a finite number (got nan)"),
        (["--weight-decay", "inf"], "--weight-decay: must be a finite number (got inf)"),
        (["--embedding-lr-scale", "inf"], "--embedding-lr-scale: must be a finite number"),
        (["--grad-clip", "inf"], "--grad-clip: must be a finite number (got inf)"),
        (["--max-time", "inf"], "--max-time: must be a finite number (got inf)"),
        (["--max-time", "-5"], "--max-time: must be > 0 (got -5.0)"),
        # What the server can serve: a prompt token and one generated.
        (["--block-size", "1"], "--block-size: must be >= 2 (a prompt token and one generated)"),
        # Each range's bound that is out of it (the bounds in it: the test after this one).
        (["--grad-accum", "0"], "--grad-accum: must be >= 1 (got 0)"),
        (["--keep-last", "0"], "--keep-last: must be >= 1 (got 0)"),
        (["--eval-interval", "0"], "--eval-interval: must be >= 1 (got 0)"),
        (["--save-interval", "0"], "--save-interval: must be >= 1 (got 0)"),
        (["--log-interval", "0"], "--log-interval: must be >= 1 (got 0)"),
        (["--warmup-steps", "-1"], "--warmup-steps: must be >= 0 (got -1)"),
        (["--sample-tokens", "-1"], "--sample-tokens: must be >= 0 (got -1)"),
        (["--patience", "-1"], "--patience: must be >= 0 (got -1)"),
        (["--lr", "0"], "--lr: must be > 0 (got 0.0)"),
        (["--embedding-lr-scale", "0"], "--embedding-lr-scale: must be > 0 (got 0.0)"),
        (["--min-lr-ratio", "1.5"], "--min-lr-ratio: must be in [0, 1] (got 1.5)"),
        (["--cooldown-fraction", "0"], "--cooldown-fraction: must be in (0, 1] (got 0.0)"),
        (["--val-fraction", "1"], "--val-fraction: must be in (0, 1) (got 1.0)"),
        # Let through, 0 split text by zero (a traceback) and held out a conversation anyway.
        (["--val-fraction", "0"], "--val-fraction: must be in (0, 1) (got 0.0)"),
        (["--dropout", "1"], "--dropout: must be in [0, 1) (got 1.0)"),
        (["--decay-steps", "0"], "--decay-steps: must be >= 1 (got 0)"),
        (["--max-time", "0"], "--max-time: must be > 0 (got 0.0)"),
        (["--optimizer", "sgd"], "--optimizer: choose one of adamw, muon (got 'sgd')"),
        # Each would train anyway: float16 in float32, an unknown schedule as wsd.
        (["--dtype", "float16"], "--dtype: choose one of auto, float32, bfloat16 (got"),
        (["--lr-schedule", "linear"], "--lr-schedule: choose one of wsd, cosine (got"),
        (
            ["--preset", "huge"],
            "--preset: choose one of auto, tiny, mini, small, base (got 'huge')",
        ),
        # An empty path is the working folder: a run written, or text read, among any files.
        (["--out-dir", " "], "--out-dir: must name a folder (got ' ')"),
        (["--data", "a.txt", ""], "--data: a path is empty (got ['a.txt', ''])"),
    ],
)
def test_values_no_run_can_use_are_rejected_naming_the_flag_and_value(
    flags: list[str], message: str
) -> None:
    with pytest.raises(UsageError) as error:
        make_args(TrainArgs().to_dict(), explicit_settings(flags, {}))
    assert str(error.value) == message or str(error.value).startswith(message + " ")


def test_each_ranges_bounds_that_are_in_it_are_taken() -> None:
    bounds = {
        "grad_accum": 1,
        "warmup_steps": 0,
        "grad_clip": 0.0,  # off
        "min_lr_ratio": 1.0,  # a constant learning rate
        "cooldown_fraction": 1.0,
        "dropout": 0.0,
        "sample_tokens": 0,  # no preview
        "patience": 0,  # no early stopping
        # The largest vocabulary the token cache's uint16 ids hold, and the shortest
        # context the server can serve: each the last value in its range.
        "vocab_size": MAX_VOCAB,
        "block_size": MIN_SERVED_CONTEXT,
    }
    flags = [part for name, value in bounds.items() for part in (flag(name), str(value))]
    args = make_args(TrainArgs().to_dict(), explicit_settings(flags, {}))
    assert {name: getattr(args, name) for name in bounds} == bounds


def test_the_largest_seed_accepted_seeds_every_generator_the_trainer_makes() -> None:
    args = make_args(TrainArgs().to_dict(), explicit_settings(["--seed", str(MAX_SEED)], {}))
    torch.manual_seed(args.seed)
    torch.Generator().manual_seed(args.seed * 1000 + 999)  # the batch sampler's, rank 999
    given = explicit_settings(["--vocab-size", "257"], {})
    assert make_args(TrainArgs().to_dict(), given).vocab_size == 257


def test_a_value_out_of_range_is_named_as_the_user_gave_it(tmp_path: Path) -> None:
    # A Docker user sets POCKETGPT_BATCH_SIZE; `--batch-size` is nowhere in their files.
    config = tmp_path / "run.toml"
    config.write_text("batch_size = 0\ndropout = 1.5\n")
    cases = [
        ([], {"POCKETGPT_BATCH_SIZE": "0"}, "POCKETGPT_BATCH_SIZE: must be >= 1 (got 0)"),
        (["--config", str(config)], {}, f"--config {config}: batch_size: must be >= 1 (got 0)"),
        (["--config", str(config), "--batch-size", "2"], {}, f"--config {config}: dropout: "),
        (["--batch-size", "-1"], {"POCKETGPT_BATCH_SIZE": "4"}, "--batch-size: must be >= 1"),
    ]
    for flags, environ, message in cases:
        with pytest.raises(UsageError) as error:
            make_args(TrainArgs().to_dict(), explicit_settings(flags, environ))
        assert str(error.value).startswith(message), (flags, environ)


def test_a_config_key_written_as_the_flag_is_named_so_in_an_error(tmp_path: Path) -> None:
    # `keep-last = 0` was reported as "keep_last: must be >= 1", a key the file lacks.
    config = tmp_path / "run.toml"
    config.write_text("max-steps = 2\nkeep-last = 0\n")
    with pytest.raises(UsageError) as error:
        make_args(TrainArgs().to_dict(), explicit_settings(["--config", str(config)], {}))
    assert str(error.value) == f"--config {config}: keep-last: must be >= 1 (got 0)"


def test_bad_vocab_size_and_seed_exit_2_before_anything_is_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_dir, cache = tmp_path / "out", tmp_path / "cache"
    common = [*TINY, "--data", str(CORPUS), "--out-dir", str(out_dir), "--cache-dir", str(cache)]
    for flags in (["--vocab-size", "10"], ["--seed", "99999999999999999999"]):
        assert pretrain.main([*common, *flags]) == 2, flags
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"error: {flags[0]}: "), err
        assert not out_dir.exists() and not cache.exists(), flags


def test_config_file_that_is_not_utf8_names_the_file(tmp_path: Path) -> None:
    config = tmp_path / "run.toml"
    config.write_bytes('preset = "tiny"\n# caf\xe9 in Latin-1\n'.encode("latin-1"))
    with pytest.raises(UsageError, match=f"^--config {re.escape(str(config))}: not UTF-8 text"):
        explicit_settings(["--config", str(config)], {})


def test_the_start_up_line_names_the_budget_in_steps_passes_and_seconds() -> None:
    step = {"batch_size": 8, "block_size": 256}  # 2048 tokens a step
    assert budget_summary(TrainArgs(max_steps=1, **step), 2048) == "1 step (1 pass)"
    zero_argument = TrainArgs(max_steps=589, **step)
    assert budget_summary(zero_argument, EMBEDDED_TRAIN_TOKENS) == "589 steps (5 passes)"
    assert budget_summary(TrainArgs(max_steps=400, **step), EMBEDDED_TRAIN_TOKENS) == (
        "400 steps (3.4 passes)"
    )
    boxed = TrainArgs(max_steps=5000, max_time=70.0, grad_accum=2, **step)
    # 5000 steps x 2 micro-batches x 2 ranks x 2048 tokens over 2,048,000 tokens.
    assert budget_summary(boxed, 2_048_000, 2) == "5,000 steps (20 passes) or 70 s"
    assert budget_summary(boxed, 2_048_000 * 7) == "5,000 steps (1.4 passes) or 70 s"
    assert budget_summary(TrainArgs(max_steps=10**6, **step), 46_502) == (
        "1,000,000 steps (44,041 passes)"
    )


def test_data_given_twice_reads_both_and_an_empty_optional_setting_is_unset() -> None:
    given = explicit_settings(["--data", "a.txt", "b.txt", "--data", "c.txt"], {})
    assert given.values["data"] == ["a.txt", "b.txt", "c.txt"]  # not the last list alone
    # In a variable, paths are separated as in PATH.
    listed = {"POCKETGPT_DATA": os.pathsep.join(["a.txt", "b.txt"])}
    assert explicit_settings([], listed).values["data"] == ["a.txt", "b.txt"]
    # `POCKETGPT_INIT_FROM=` was a fine-tune from the working folder ("not a checkpoint").
    env = {"POCKETGPT_INIT_FROM": "", "POCKETGPT_TOKENIZER": " ", "POCKETGPT_RESUME": ""}
    env["POCKETGPT_CACHE_DIR"] = "None"  # `none` clears an optional value
    # `POCKETGPT_DATA=` (Docker passes an empty one through) is no text: the embedded
    # corpus, not a path "" refused as empty.
    env["POCKETGPT_DATA"] = ""
    values = explicit_settings([], env).values
    assert values["data"] == []
    assert values["init_from"] is None and values["tokenizer"] is None
    assert values["cache_dir"] is None
    assert not values["resume"]


def test_a_flag_wins_over_a_bad_value_in_its_environment_variable() -> None:
    given = explicit_settings(["--max-steps", "3"], {"POCKETGPT_MAX_STEPS": "abc"})
    assert given.values["max_steps"] == 3 and given.sources["max_steps"] == "--max-steps"
    with pytest.raises(UsageError, match="POCKETGPT_MAX_STEPS: invalid value 'abc'"):
        explicit_settings([], {"POCKETGPT_MAX_STEPS": "abc"})


def test_a_switch_alone_is_true_takes_true_or_false_and_has_a_no_form() -> None:
    # As the server's switches do (`--cuda-graphs false`): `--compile false` was refused.
    for argv, expected in (
        (["--compile"], True),
        (["--compile", "false"], False),
        (["--compile=yes", "--max-steps", "3"], True),
        (["--compile", "on"], True),
        (["--compile", "OFF"], False),
        (["--no-compile"], False),
    ):
        assert explicit_settings(argv, {}).values["compile"] is expected, argv
    assert explicit_settings(["--no-compile"], {}).sources["compile"] == "--no-compile"
    with pytest.raises(UsageError, match=r"--compile: invalid value 'maybe' \(expected true/false"):
        explicit_settings(["--compile", "maybe"], {})
    with pytest.raises(UsageError, match="unrecognized arguments: true"):
        explicit_settings(["--no-compile", "true"], {})


def test_resume_takes_the_preset_auto_chose_and_refuses_another(tmp_path: Path) -> None:
    # `auto` boxed under 10 minutes trains mini on AMX (tiny elsewhere): the preset it
    # chose, named on --resume (with any shape flags the run was started with), repeats
    # the run's model, as it would for a run started with it.
    config = ModelConfig.from_preset("mini", n_kv_heads=2, vocab_size=384)
    saved = {"preset": "auto", "n_kv_heads": 2, "out_dir": str(tmp_path)}

    def check(values: dict) -> None:
        check_resume_settings(Given(values, {}), saved, config, tmp_path)

    check({"preset": "mini", "n_kv_heads": 2})
    check({"preset": "mini"})  # the run's --n-kv-heads 2 is saved
    check({"preset": "auto"})
    refused = r"--resume continues the run's model and tokenizer: drop --preset$"
    for other in ({"preset": "small"}, {"preset": "tiny"}):
        with pytest.raises(UsageError, match=refused):
            check(other)


def test_init_from_takes_the_preset_and_shape_flags_the_checkpoint_was_trained_with() -> None:
    # A model trained with `--preset tiny --n-kv-heads 4` has no preset's shape; the
    # pretraining command's flags, repeated with --init-from, name it: taken, with tiny's
    # lr, as with --resume (`--preset tiny` alone was refused: "drop --preset").
    config = ModelConfig.from_preset("tiny", n_kv_heads=4, vocab_size=384)
    repeated = TrainArgs(preset="tiny", n_kv_heads=4, init_from="base")
    args = with_checkpoint_shape(repeated, config, {}, own_tokenizer=False)
    assert (args.preset, args.n_kv_heads, args.dim) == ("tiny", 4, config.dim)
    assert with_hardware_defaults(args, torch.device("cpu")).lr == AUTO["tiny"]["lr"]
    # A preset that, with the flags given, builds another shape is still refused.
    for other in (TrainArgs(preset="tiny", init_from="base"), TrainArgs(preset="mini")):
        with pytest.raises(UsageError, match=r"drop --preset$"):
            with_checkpoint_shape(other, config, {}, own_tokenizer=False)


def test_a_block_size_up_to_the_models_context_is_taken_and_one_past_it_refused(
    tmp_path: Path,
) -> None:
    # RoPE tables and the cache hold max_seq_len positions: one more reads past them.
    config = ModelConfig.from_preset("tiny", vocab_size=384)
    context = config.max_seq_len
    saved = {"preset": "tiny", "out_dir": str(tmp_path)}
    check_resume_settings(Given({"block_size": context}, {}), saved, config, tmp_path)
    with pytest.raises(UsageError, match=f"--block-size {context + 1}: the resumed model reads"):
        check_resume_settings(
            Given({"block_size": context + 1}, {"block_size": "--block-size"}),
            saved,
            config,
            tmp_path,
        )
    fine_tune = TrainArgs(init_from="base", block_size=context)
    assert with_checkpoint_shape(fine_tune, config, {}, own_tokenizer=False).block_size == context
    with pytest.raises(UsageError, match=f"{context + 1}: the --init-from model reads at most"):
        with_checkpoint_shape(
            TrainArgs(init_from="base", block_size=context + 1), config, {}, own_tokenizer=False
        )


def test_only_a_resume_going_back_from_the_newest_step_warns_of_the_steps_after_it(
    tmp_path: Path,
) -> None:
    older, newest = tmp_path / "step-0000002", tmp_path / "step-0000004"
    for folder in (older, newest, tmp_path / "best"):
        folder.mkdir()
    # No `latest` (a run folder that lost it): the newest step is where the run is.
    assert later_steps_note(newest) is None
    assert later_steps_note(tmp_path / "best") is None
    note = later_steps_note(older)
    assert note is not None and "older than the run's newest checkpoint, step-0000004" in note
    # Once `latest` names the older step, the run went back there already: nothing to say.
    (tmp_path / "latest").write_text("step-0000002\n")
    assert later_steps_note(older) is None


def test_resume_takes_its_run_folder_however_out_dir_spells_it(tmp_path: Path) -> None:
    # The command that started the run, repeated with --resume, may name the folder
    # through a link, with a trailing slash or relative to elsewhere: the same folder.
    config = ModelConfig.from_preset("tiny", vocab_size=384)
    run = tmp_path / "run"
    run.mkdir()
    (tmp_path / "link").symlink_to(run)
    saved = {"preset": "tiny", "out_dir": str(run)}
    for spelling in (f"{run}/", str(tmp_path / "link"), f"{tmp_path}/other/../run"):
        check_resume_settings(Given({"out_dir": spelling}, {}), saved, config, run)
    with pytest.raises(UsageError, match="--resume goes on in the folder of the run"):
        check_resume_settings(Given({"out_dir": str(tmp_path)}, {}), saved, config, run)


def test_only_a_time_box_that_ends_inside_warmup_is_warned_of() -> None:
    args = TrainArgs(max_time=5.0, warmup_steps=30)
    assert time_box_warning(args, 29, "max_time") is not None
    assert time_box_warning(args, 30, "max_time") is None  # its last step reached --lr
    assert time_box_warning(args, 29, "signal") is None  # to be resumed
    assert time_box_warning(args, 29, "early_stopping") is None


def test_every_input_path_a_run_records_is_absolute_lists_included(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # What trainer_meta.json keeps, so that a run resumed from another directory reads the
    # same files: --data and --val-data (lists) as much as --tokenizer (one path).
    monkeypatch.chdir(tmp_path)
    given = TrainArgs(data=["a.txt", "texts"], val_data=["v.txt"], tokenizer="tok.json")
    recorded = with_absolute_paths(given)
    assert recorded.data == [str(tmp_path / "a.txt"), str(tmp_path / "texts")]
    assert recorded.val_data == [str(tmp_path / "v.txt")]
    assert recorded.tokenizer == str(tmp_path / "tok.json")
    assert recorded.init_from is None and recorded.cache_dir is None  # unset stays unset
