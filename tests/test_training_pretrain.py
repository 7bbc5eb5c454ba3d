"""The trainer end to end: real runs of `training.pretrain` on tiny text, CPU, tiny preset."""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file
from server_harness import running_server, wait_until
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.optim.optimizer import register_optimizer_step_pre_hook

from model.checkpoint import load_model, load_tokenizer, resolve_checkpoint
from model.cli import Terminated, default_signal_actions, signals_unwind
from server.loading import model_name
from server.settings import Settings
from training import evaluate, pretrain
from training.args import Given, TrainArgs
from training.data import BatchSampler
from training.defaults import DEFAULT_CPU_STEPS, auto_dtype
from training.evaluate import evaluate_stream
from training.prepare import token_byte_lengths
from training.resume import changed_text_note
from training.run_folder import RUN_LOCK, step_folders
from training.trainer import next_token_loss
from training.trainer_state import TRAINING_STATE, read_training_state, save_state

REPO = Path(__file__).resolve().parents[1]
DATA = Path(__file__).parent / "data"
CORPUS = DATA / "tiny_corpus.txt"
VAL = DATA / "tiny_val.txt"
# Seconds-scale settings: tiny model, short blocks, small vocabulary.
TINY = ["--preset", "tiny", "--vocab-size", "384", "--block-size", "32", "--batch-size", "4"]
TINY += ["--sample-tokens", "8", "--warmup-steps", "2"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def tiny_run(tmp_path: Path, *extra: str) -> list[str]:
    return [*TINY, "--data", str(CORPUS), "--cache-dir", str(tmp_path / "cache"), *extra]


def read_log(run: Path, kind: str) -> dict[int, dict]:
    lines = (run / "log.jsonl").read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines]
    return {r["step"]: r for r in records if r["kind"] == kind}


def meta(run: Path) -> dict:
    return json.loads((resolve_checkpoint(run) / "trainer_meta.json").read_text(encoding="utf-8"))


def python_env() -> dict[str, str]:
    # Subprocesses must import this checkout however pytest was started.
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path}


def test_zero_argument_entry_point_with_tiny_override_writes_checkpoint_transformers_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Settings through the environment: the same path the Docker trainer uses.
    env = python_env() | {"POCKETGPT_PRESET": "tiny", "POCKETGPT_MAX_STEPS": "6"}
    flags = ["--vocab-size", "384", "--block-size", "32", "--batch-size", "4"]
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "training.pretrain",
            *flags,
            "--eval-interval",
            "3",
            "--save-interval",
            "2",
        ],
        cwd=tmp_path,
        env=env,
        # One stream, as `> train.log 2>&1` or `docker compose logs` has it; bytes, as
        # text mode would turn "\r" into "\n".
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        timeout=120,
    )
    output = done.stdout.decode()
    assert done.returncode == 0, output
    run = tmp_path / "checkpoints" / "default"
    folder = resolve_checkpoint(run)
    assert folder.name == "step-0000006"
    # Keep the last two step checkpoints (the default) plus best/ (beside tensorboard/).
    kept = sorted(p.name for p in run.iterdir() if p.is_dir() and p.name != "tensorboard")
    assert kept == ["best", "step-0000004", "step-0000006"]
    assert meta(run)["args"]["preset"] == "tiny"
    # stderr is no terminal here: the bar is whole lines, not one line redrawn with
    # carriage returns, and the evaluation's lines (stdout) start lines of their own.
    assert "\r" not in output
    assert re.search(r"^100%\|#+\| 6/6 \[.*\]\n", output, re.MULTILINE), output
    assert re.search(r"^step 3: val loss .*\nsample: ", output, re.MULTILINE), output

    hf = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    ours = load_model(folder)
    ids = torch.tensor([[1, 5, 9, 200, 7]])
    with torch.no_grad():
        expected = ours(ids, torch.arange(5)[None])
        assert torch.allclose(hf(ids).logits, expected, atol=1e-4)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    assert tokenizer.decode(tokenizer.encode("Return the value.")) == "Return the value."

    # The Docker trainer's `--if-missing`: a finished run is left alone, exit 0.
    monkeypatch.chdir(tmp_path)
    assert pretrain.main(["--if-missing"]) == 0
    assert resolve_checkpoint(run).name == "step-0000006"

    # The server serves the run as trained, and says which step.
    with running_server(Settings(checkpoint=run)) as url:
        (card,) = httpx.get(f"{url}/v1/models").json()["data"]
        assert (card["id"], card["checkpoint"]) == ("default", "step-0000006")
        body = {"prompt": "Return", "max_tokens": 4, "temperature": 0, "ignore_eos": True}
        reply = httpx.post(f"{url}/v1/generate", json=body, timeout=60).json()
        assert reply["usage"]["completion_tokens"] == 4
    # Its step folders and best/ are the run's model too, to API clients.
    for served in (folder, run / "best"):
        assert model_name(Settings(checkpoint=served)) == "default"


def whole_and_first_half(tmp_path: Path, flags: list[str], steps: int) -> tuple[Path, Path]:
    """Run folders of a `steps`-step run with `flags` and of its first half alone (the
    same schedule), to resume and compare."""
    whole, half = tmp_path / "whole", tmp_path / "half"
    assert (
        pretrain.main(
            tiny_run(tmp_path, *flags, "--max-steps", str(steps), "--out-dir", str(whole))
        )
        == 0
    )
    first_half = ["--max-steps", str(steps // 2), "--decay-steps", str(steps)]
    assert pretrain.main(tiny_run(tmp_path, *flags, *first_half, "--out-dir", str(half))) == 0
    return whole, half


@pytest.mark.parametrize(("optimizer", "dtype"), [("adamw", "float32"), ("muon", "bfloat16")])
def test_resume_is_bit_exact(tmp_path: Path, optimizer: str, dtype: str) -> None:
    common = ["--dropout", "0.1", "--log-interval", "1", "--eval-interval", "4"]
    common += ["--save-interval", "100", "--optimizer", optimizer, "--dtype", dtype]
    straight, split = whole_and_first_half(tmp_path, common, steps=8)
    assert meta(split)["step"] == 4
    assert pretrain.main(["--resume", str(split), "--max-steps", "8"]) == 0

    train_a, train_b = read_log(straight, "train"), read_log(split, "train")
    assert sorted(train_a) == sorted(train_b) == list(range(1, 9))
    assert [train_a[s]["loss"] for s in train_a] == [train_b[s]["loss"] for s in train_a]
    eval_a, eval_b = read_log(straight, "eval"), read_log(split, "eval")
    assert [eval_a[s]["val_loss"] for s in (4, 8)] == [eval_b[s]["val_loss"] for s in (4, 8)]
    weights_a = load_file(resolve_checkpoint(straight) / "model.safetensors")
    weights_b = load_file(resolve_checkpoint(split) / "model.safetensors")
    assert weights_a.keys() == weights_b.keys()
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)


def test_a_run_saved_before_muon_existed_resumes_bit_exact_on_adamw(tmp_path: Path) -> None:
    # Such a run's args name no --optimizer (it trained with AdamW, Muon being the default
    # now) and its state holds one AdamW state dict, not a list of them.
    common = ["--optimizer", "adamw", "--dtype", "float32", "--log-interval", "1"]
    straight, split = whole_and_first_half(tmp_path, common, steps=6)
    folder = resolve_checkpoint(split)
    saved = json.loads((folder / "trainer_meta.json").read_text(encoding="utf-8"))
    del saved["args"]["optimizer"]
    (folder / "trainer_meta.json").write_text(json.dumps(saved), encoding="utf-8")
    state = read_training_state(folder / TRAINING_STATE)
    [state["optimizer"]] = state["optimizer"]["optimizers"]
    save_state(state, folder / TRAINING_STATE)
    assert pretrain.main(["--resume", str(split), "--max-steps", "6"]) == 0
    losses = [read_log(run, "train") for run in (straight, split)]
    assert [r["loss"] for r in losses[0].values()] == [r["loss"] for r in losses[1].values()]


def test_a_resumed_run_decides_again_on_this_machine_what_the_machine_chose(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # --compile and --dtype left to the machine were saved resolved, and a resume took
    # them as given: a run compiled where a compiler was refused to resume without one.
    chosen, given = tmp_path / "chosen", tmp_path / "given"
    flags = tiny_run(tmp_path, "--max-steps", "2")
    assert pretrain.main([*flags, "--out-dir", str(chosen)]) == 0
    explicit = ["--dtype", "float32", "--no-compile", "--out-dir", str(given)]
    assert pretrain.main([*flags, *explicit]) == 0
    assert meta(chosen)["chosen_at_start"] == ["compile", "dtype"]
    assert meta(given)["chosen_at_start"] == []
    here = auto_dtype(TrainArgs(preset="tiny"), torch.device("cpu"))
    elsewhere = "float32" if here == "bfloat16" else "bfloat16"
    # As a 1000-step run on a machine with a compiler and other bf16 units saves them.
    meta_file = resolve_checkpoint(chosen) / "trainer_meta.json"
    saved = json.loads(meta_file.read_text(encoding="utf-8"))
    saved["args"] |= {"compile": True, "dtype": elsewhere}
    # Under the name a trainer before 2026-12-07 saved the list by.
    saved["machine_chosen"] = saved.pop("chosen_at_start")
    meta_file.write_text(json.dumps(saved), encoding="utf-8")
    monkeypatch.setenv("PATH", str(tmp_path / "no-compilers"))
    assert pretrain.main(["--resume", str(chosen), "--max-steps", "3"]) == 0
    assert meta(chosen)["step"] == 3
    assert meta(chosen)["chosen_at_start"] == ["compile", "dtype"]
    assert (meta(chosen)["args"]["compile"], meta(chosen)["args"]["dtype"]) == (False, here)
    # What was given stays, whatever this machine would choose.
    assert pretrain.main(["--resume", str(given), "--max-steps", "3"]) == 0
    assert (meta(given)["args"]["compile"], meta(given)["args"]["dtype"]) == (False, "float32")


def test_a_resume_trains_with_the_weight_decay_and_embedding_lr_scale_given_now(
    tmp_path: Path,
) -> None:
    # The saved optimizer state holds the run's first settings in its param groups; the
    # flags given now, which trainer_meta.json records, are the ones that must train.
    run = tmp_path / "run"
    assert pretrain.main(tiny_run(tmp_path, "--max-steps", "2", "--out-dir", str(run))) == 0
    flags = ["--max-steps", "3", "--weight-decay", "0.5", "--embedding-lr-scale", "2"]
    assert pretrain.main(["--resume", str(run), *flags]) == 0
    assert (meta(run)["args"]["weight_decay"], meta(run)["args"]["embedding_lr_scale"]) == (0.5, 2)
    state = torch.load(resolve_checkpoint(run) / "training_state.pt", weights_only=True)
    groups = [g for opt in state["optimizer"]["optimizers"] for g in opt["param_groups"]]
    assert {g["weight_decay"] for g in groups} == {0.5, 0.0}  # norms never decay
    assert [g["lr_scale"] for g in groups if "lr_scale" in g] == [2.0]


def test_an_untied_embedding_trains_at_embedding_lr_scale_times_the_learning_rate(
    tmp_path: Path,
) -> None:
    # The state keeps the learning rates the loop set for the last step (the peak, warmup
    # being 2 steps): the untied input embedding's group alone carries lr_scale.
    run = tmp_path / "run"
    flags = ["--optimizer", "adamw", "--dtype", "float32", "--no-compile", "--max-steps", "2"]
    flags += ["--no-tie-embeddings", "--embedding-lr-scale", "4", "--out-dir", str(run)]
    assert pretrain.main(tiny_run(tmp_path, *flags)) == 0
    state = read_training_state(resolve_checkpoint(run) / TRAINING_STATE)
    (adamw,) = state["optimizer"]["optimizers"]
    embedding = [g for g in adamw["param_groups"] if "lr_scale" in g]
    others = [g for g in adamw["param_groups"] if "lr_scale" not in g]
    assert len(embedding) == 1 and embedding[0]["lr_scale"] == 4.0 and len(others) == 2
    assert {g["lr"] for g in others} == {meta(run)["args"]["lr"]}
    assert embedding[0]["lr"] == 4 * others[0]["lr"]


def straight_and_resumed(tmp_path: Path, flags: list[str], stopped_at: int) -> tuple[Path, Path]:
    """The run folders of two runs of `flags` to step 8: one straight, the other stopped
    at `stopped_at`, then resumed."""
    straight, run = tmp_path / "straight", tmp_path / "run"
    argv = tiny_run(tmp_path, *flags, "--max-steps", "8")
    assert pretrain.main([*argv, "--out-dir", str(straight)]) == 0
    argv = tiny_run(tmp_path, *flags, "--max-steps", str(stopped_at))
    assert pretrain.main([*argv, "--out-dir", str(run)]) == 0
    assert pretrain.main(["--resume", str(run), "--max-steps", "8"]) == 0
    return straight, run


def test_the_first_logged_loss_after_a_resume_mid_window_is_that_of_an_uninterrupted_run(
    tmp_path: Path,
) -> None:
    common = ["--optimizer", "adamw", "--dtype", "float32", "--decay-steps", "8"]
    common += ["--log-interval", "4"]
    # Stopped at step 6 (as Ctrl-C would), between its log lines at 4 and 8: steps 5-6
    # get a line of their own, and the line at 8 is still the mean of steps 5-8.
    straight, run = straight_and_resumed(tmp_path, common, stopped_at=6)
    expected, logged = read_log(straight, "train"), read_log(run, "train")
    assert sorted(logged) == [4, 6, 8]
    assert [logged[s]["loss"] for s in (4, 8)] == [expected[s]["loss"] for s in (4, 8)]


def test_an_evaluation_before_a_resumed_runs_first_train_record_reports_the_last_ones_rate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Resumed at step 4 (its train record's), the evaluation at 6 logged tokens_per_s
    # null, where the uninterrupted run logs step 4's rate: the process had logged no
    # train record of its own.
    common = ["--log-interval", "4", "--eval-interval", "2", "--decay-steps", "8"]
    straight, run = straight_and_resumed(tmp_path, common, stopped_at=4)
    for folder in (straight, run):
        train, evals = read_log(folder, "train"), read_log(folder, "eval")
        assert sorted(train) == [4, 8] and sorted(evals) == [2, 4, 6, 8]
        assert evals[6]["tokens_per_s"] == train[4]["tokens_per_s"] > 0, folder.name
    # Its bar, too, showed step 4's record from its first line (was no loss until step 8),
    # then its own once logged: its last line shows step 8's.
    records, err = read_log(run, "train"), capsys.readouterr().err
    for step, line in ((4, err.split(" 4/8 [")[1]), (8, err.split(" 8/8 [")[-1])):
        record = records[step]
        shown = f"loss={record['loss']:.4f}, tok_s={record['tokens_per_s']:.0f}]"
        assert shown in line.splitlines()[0], (step, line)


def test_a_resumed_runs_checkpoints_before_its_first_evaluation_keep_the_last_scores(
    tmp_path: Path,
) -> None:
    # Resumed at step 4 (evaluated there), its step-6 checkpoint's trainer_meta.json said
    # val_loss and val_bpb null, where the uninterrupted run's says step 4's scores.
    common = ["--eval-interval", "4", "--save-interval", "2", "--keep-last", "5"]
    common += ["--decay-steps", "8"]
    straight, run = straight_and_resumed(tmp_path, common, stopped_at=4)
    expected, resumed = meta(straight / "step-0000006"), meta(run / "step-0000006")
    evaluated = read_log(run, "eval")[4]
    for key in ("val_loss", "val_bpb"):
        assert resumed[key] == expected[key] == evaluated[key], key


def test_a_runs_last_steps_are_logged_and_an_evaluation_reports_the_steps_before_it(
    tmp_path: Path,
) -> None:
    # The same six steps logged one by one and every four: evaluations at 3 and 6 fall
    # inside the second run's log windows, and its last two steps end none.
    common = ["--optimizer", "adamw", "--dtype", "float32", "--max-steps", "6"]
    common += ["--eval-interval", "3"]
    each, windows = tmp_path / "each", tmp_path / "windows"
    argv = tiny_run(tmp_path, *common, "--log-interval", "1", "--out-dir", str(each))
    assert pretrain.main(argv) == 0
    argv = tiny_run(tmp_path, *common, "--log-interval", "4", "--out-dir", str(windows))
    assert pretrain.main(argv) == 0
    losses = {step: record["loss"] for step, record in read_log(each, "train").items()}
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]

    def mean(steps: range) -> float:
        return sum(losses[s] for s in steps) / len(steps)

    train, evals = read_log(windows, "train"), read_log(windows, "eval")
    assert sorted(train) == [4, 6]
    assert math.isclose(train[4]["loss"], mean(range(1, 5)), rel_tol=1e-5)
    assert math.isclose(train[6]["loss"], mean(range(5, 7)), rel_tol=1e-5)
    assert math.isclose(evals[3]["train_loss"], mean(range(1, 4)), rel_tol=1e-5)
    assert math.isclose(evals[6]["train_loss"], mean(range(5, 7)), rel_tol=1e-5)
    # An evaluation right after a train record (no steps since: here, logging every step)
    # reports that record's loss, not null.
    after_records = read_log(each, "eval")
    assert [after_records[s]["train_loss"] for s in (3, 6)] == [losses[3], losses[6]]


def test_warmup_defaults_to_a_tenth_of_a_short_run_and_one_filling_the_run_is_warned_of(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = tiny_run(tmp_path, "--max-steps", "20", "--log-interval", "1", "--lr", "0.004")
    argv.remove("--warmup-steps")
    argv.remove("2")
    assert pretrain.main([*argv, "--out-dir", str(tmp_path / "short")]) == 0
    assert meta(tmp_path / "short")["args"]["warmup_steps"] == 2
    lrs = {step: record["lr"] for step, record in read_log(tmp_path / "short", "train").items()}
    assert lrs[1] < lrs[2] == lrs[3] == 0.004  # at the peak from the third step
    assert "warning: --warmup-steps" not in capsys.readouterr().err

    explicit = [*argv, "--warmup-steps", "20", "--out-dir", str(tmp_path / "explicit")]
    assert pretrain.main(explicit) == 0
    assert (
        "warning: --warmup-steps 20 covers the whole 20-step schedule (--max-steps): the "
        "learning rate rises all run and never decays\n"
    ) in capsys.readouterr().err


def test_a_preview_longer_than_the_context_is_warned_of(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    flags = ["--max-steps", "2", "--eval-interval", "2", "--block-size", "16"]
    for tokens, out in (("15", "fits"), ("16", "long")):
        argv = tiny_run(tmp_path, *flags, "--sample-tokens", tokens)
        assert pretrain.main([*argv, "--out-dir", str(tmp_path / out)]) == 0
        warned = "warning: --sample-tokens" in capsys.readouterr().err
        assert warned == (tokens == "16")
    argv = tiny_run(tmp_path, *flags, "--sample-tokens", "40", "--out-dir", str(tmp_path / "x"))
    assert pretrain.main(argv) == 0
    assert (
        "warning: --sample-tokens 40 is more than the model's context (--block-size 16) "
        "holds: previews stop at 15 tokens\n"
    ) in capsys.readouterr().err


def test_sample_tokens_0_prints_no_preview_at_evaluations(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # --sample-tokens 0 is "off" (args.py): no `sample: ''` line after each evaluation.
    argv = tiny_run(tmp_path, "--max-steps", "1", "--sample-tokens", "0")
    assert pretrain.main([*argv, "--out-dir", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "step 1: val loss " in out and "sample:" not in out


def test_tokens_per_s_leaves_out_evaluation_time(tmp_path: Path) -> None:
    # Evaluating ~30k held-out tokens takes far longer than two 128-token steps.
    val = tmp_path / "val.txt"
    val.write_text(VAL.read_text(encoding="utf-8") * 30, encoding="utf-8")
    flags = ["--max-steps", "6", "--log-interval", "2", "--eval-interval", "2"]
    flags += ["--val-data", str(val), "--eval-tokens", "0", "--grad-accum", "1"]
    run = tmp_path / "run"
    assert pretrain.main(tiny_run(tmp_path, *flags, "--out-dir", str(run))) == 0
    train, evals = read_log(run, "train"), read_log(run, "eval")
    # The wall time between the eval records of steps 2 and 4 holds steps 3-4 and the
    # evaluation at step 4: at the steps' own rate, it would have trained several times
    # the window's 2 x 128 tokens.
    wall = evals[4]["wall_time"] - evals[2]["wall_time"]
    assert train[4]["tokens_per_s"] * wall > 3 * 2 * 4 * 32
    assert train[4]["tokens_per_s"] == evals[4]["tokens_per_s"]
    # Stopped early at step 6 (weights too slow to move for the loss to improve), the
    # record of steps 5-6 leaves out the evaluation at 6 too.
    flags = ["--max-steps", "12", "--log-interval", "4", "--eval-interval", "3"]
    flags += ["--val-data", str(val), "--eval-tokens", "0", "--grad-accum", "1"]
    flags += ["--patience", "1", "--optimizer", "adamw", "--lr", "1e-30", "--dtype", "float32"]
    stopped = tmp_path / "stopped"
    assert pretrain.main(tiny_run(tmp_path, *flags, "--out-dir", str(stopped))) == 0
    assert meta(stopped)["stopped_by"] == "early_stopping"
    train, evals = read_log(stopped, "train"), read_log(stopped, "eval")
    assert sorted(train) == [4, 6]
    # As above, between the evaluations of steps 3 and 6 (steps 4-6 and the evaluation
    # at 6): a rate measured against the same seconds, not against another window's, which
    # a loaded machine may run at a third of the speed.
    wall = evals[6]["wall_time"] - evals[3]["wall_time"]
    assert train[6]["tokens_per_s"] * wall > 3 * 2 * 4 * 32


def test_a_resumed_run_goes_on_where_it_is_resumed_from_reading_the_same_text(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Started with relative paths in one directory, copied, then resumed from another.
    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(CORPUS, work / "corpus.txt")
    shutil.copy(VAL, work / "val.txt")
    monkeypatch.chdir(work)
    flags = [*TINY, "--data", "corpus.txt", "--val-data", "val.txt"]
    flags += ["--max-steps", "4", "--save-interval", "100"]
    assert pretrain.main([*flags, "--out-dir", "runs/a"]) == 0
    original = work / "runs" / "a"
    shutil.copytree(original, tmp_path / "b")
    listing = sorted(p.name for p in original.iterdir())

    monkeypatch.chdir(tmp_path)  # no corpus.txt here, nor runs/a
    assert pretrain.main(["--resume", str(tmp_path / "b"), "--max-steps", "6"]) == 0
    assert resolve_checkpoint(tmp_path / "b").name == "step-0000006"
    assert meta(tmp_path / "b")["args"]["data"] == [str(work / "corpus.txt")]
    assert resolve_checkpoint(original).name == "step-0000004"  # the original is untouched
    assert sorted(p.name for p in original.iterdir()) == listing
    assert not (tmp_path / "runs").exists()

    # The saved path gone (a Docker `run -v` mount, a drive unmounted): the error says
    # where that path came from.
    (work / "corpus.txt").unlink()
    capsys.readouterr()
    assert pretrain.main(["--resume", str(tmp_path / "b"), "--max-steps", "8"]) == 2
    assert capsys.readouterr().err == (
        f"error: {work / 'corpus.txt'}: no such file or folder (the --data the resumed run "
        "was started with: make it readable there again, or give --data or POCKETGPT_DATA)\n"
    )
    shutil.copy(CORPUS, work / "corpus.txt")
    (work / "val.txt").unlink()
    assert pretrain.main(["--resume", str(tmp_path / "b"), "--max-steps", "8"]) == 2
    assert capsys.readouterr().err == (
        f"error: --val-data: {work / 'val.txt'}: no such file or folder (the --val-data the "
        "resumed run was started with: make it readable there again, or give --val-data or "
        "POCKETGPT_VAL_DATA)\n"
    )


def test_a_resume_given_text_that_is_missing_names_it_as_given_now(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The hint about the path the run was started with is for a path not named now: one
    # the user just typed is no saved path to make readable "there again".
    run, missing = tmp_path / "run", tmp_path / "missing.txt"
    assert pretrain.main(tiny_run(tmp_path, "--max-steps", "1", "--out-dir", str(run))) == 0
    capsys.readouterr()
    for flag in ("--data", "--val-data"):
        again = ["--resume", str(run), "--max-steps", "2", flag, str(missing)]
        assert pretrain.main(again) == 2
        named = "" if flag == "--data" else f"{flag}: "
        assert capsys.readouterr().err == f"error: {named}{missing}: no such file or folder\n"
    assert meta(run)["step"] == 1


def test_a_run_resumed_with_its_cache_meta_json_miscounting_the_text_rebuilds_the_cache(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # meta.json edited by hand: the resume warned that the unchanged text had changed and
    # wrote the wrong counts into its checkpoint (a count removed: a KeyError traceback).
    run, cache = tmp_path / "run", tmp_path / "cache"
    flags = [*TINY, "--data", str(CORPUS), "--cache-dir", str(cache), "--save-interval", "100"]
    assert pretrain.main([*flags, "--max-steps", "2", "--out-dir", str(run)]) == 0
    counted = {split: meta(run)["data"][split] for split in ("train", "val")}
    for step, (name, value) in enumerate([("documents", 99), ("bytes", None)], start=3):
        (folder,) = cache.iterdir()  # (rebuilt, keyed by the resumed run's tokenizer)
        written = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
        if value is None:
            del written["splits"]["train"][name]
        else:
            written["splits"]["train"][name] = value
        (folder / "meta.json").write_text(json.dumps(written), encoding="utf-8")
        capsys.readouterr()
        assert pretrain.main(["--resume", str(run), "--max-steps", str(step)]) == 0
        err = capsys.readouterr().err
        assert f"warning: {folder}: damaged token cache (" in err, err
        assert "the text has changed" not in err, err
        assert {split: meta(run)["data"][split] for split in counted} == counted


def test_a_run_resumed_on_text_changed_under_the_same_path_is_warned_of(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    corpus, run, cache = tmp_path / "corpus.txt", tmp_path / "run", tmp_path / "cache"
    shutil.copy(CORPUS, corpus)
    flags = [*TINY, "--data", str(corpus), "--cache-dir", str(cache), "--save-interval", "100"]
    assert pretrain.main([*flags, "--max-steps", "2", "--out-dir", str(run)]) == 0
    shutil.rmtree(cache)  # tokenized again on resuming: the same text, the same sizes
    capsys.readouterr()
    assert pretrain.main(["--resume", str(run), "--max-steps", "3"]) == 0
    assert "warning" not in capsys.readouterr().err

    # Two words of one length swapped: the same bytes, documents and tokens.
    text = corpus.read_text(encoding="utf-8")
    swapped = text.replace(" names ", " ITEMS ", 1).replace(" items ", " names ", 1)
    corpus.write_text(swapped.replace(" ITEMS ", " items ", 1), encoding="utf-8")
    assert pretrain.main(["--resume", str(run), "--max-steps", "4"]) == 0
    assert (
        "warning: the text has changed since step-0000003 was saved (training text: the same "
        "size, not the same text): its batches differ\n"
    ) in capsys.readouterr().err

    with corpus.open("a", encoding="utf-8") as f:
        f.write("A line added since the run started.\n" * 40)
    assert pretrain.main(["--resume", str(run), "--max-steps", "5"]) == 0
    err = capsys.readouterr().err
    assert re.search(
        r"warning: the text has changed since step-0000004 was saved \(training text: "
        r"[\d,]+ bytes then, [\d,]+ now\): its batches differ\n",
        err,
    ), err
    # Other text named: that warning alone.
    other = ["--data", str(DATA), "--max-steps", "6"]
    assert pretrain.main(["--resume", str(run), *other]) == 0
    err = capsys.readouterr().err
    assert "--data differs from what the run was started with" in err
    assert "the text has changed" not in err

    # The held-out text alone edited: its batches are the same, its validation is not.
    val, scored = tmp_path / "val.txt", tmp_path / "scored"
    shutil.copy(VAL, val)
    flags += ["--val-data", str(val), "--out-dir", str(scored)]
    assert pretrain.main([*flags, "--max-steps", "2"]) == 0
    val.write_text(VAL.read_text(encoding="utf-8") * 2, encoding="utf-8")
    assert pretrain.main(["--resume", str(scored), "--max-steps", "3"]) == 0
    assert re.search(
        r"\(validation text: [\d,]+ bytes then, [\d,]+ now\): its validation differs \(best/",
        capsys.readouterr().err,
    )


def test_splits_without_the_text_hash_are_compared_by_size_alone(tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert pretrain.main(tiny_run(tmp_path, "--max-steps", "2", "--out-dir", str(run))) == 0
    checkpoint, recorded = resolve_checkpoint(run), meta(run)["data"]
    unhashed = {
        split: {k: v for k, v in recorded[split].items() if k != "sha256"}
        for split in ("train", "val")
    }
    # A token cache whose meta.json lacks the hash (hand-made, foreign): no KeyError.
    assert changed_text_note(checkpoint, unhashed, Given({}, {})) is None
    other = {split: dict(recorded[split], sha256="0" * 64) for split in ("train", "val")}
    note = changed_text_note(checkpoint, other, Given({}, {}))
    assert note is not None and "training text: the same size, not the same text" in note


def test_resume_refuses_what_would_change_the_model_but_takes_its_own_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    assert pretrain.main(tiny_run(tmp_path, "--max-steps", "2", "--out-dir", str(run))) == 0
    capsys.readouterr()  # the run's own progress bar
    started = meta(run)["args"]
    other = "adamw" if started["optimizer"] == "muon" else "muon"
    restored = f"(optimizer {started['optimizer']}, seed {started['seed']}): drop"
    changes = {
        "--dim": (["--dim", "64"], "drop --dim"),
        "--seed": (["--seed", "99"], f"run's optimizer state and random state {restored} --seed"),
        "--optimizer": (["--optimizer", other], f"{restored} --optimizer"),
        "--vocab-size": (["--vocab-size", "512"], "drop --vocab-size"),
        "--block-size": (["--block-size", "64"], "reads at most 32 tokens"),
        "--out-dir": (
            ["--out-dir", str(tmp_path / "elsewhere")],
            f"--resume goes on in the folder of the run it continues ({run})",
        ),
    }
    for case, (flags, message) in changes.items():
        assert pretrain.main(["--resume", str(run), "--max-steps", "4", *flags]) == 2, case
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err, (case, err)
    assert meta(run)["step"] == 2
    assert not (tmp_path / "elsewhere").exists()
    # The command that started the run, with --resume added, continues it; so does the
    # width the preset gave it, named.
    again = tiny_run(tmp_path, "--max-steps", "3", "--out-dir", str(run), "--resume", str(run))
    dim = json.loads((resolve_checkpoint(run) / "config.json").read_text())["hidden_size"]
    assert pretrain.main([*again, "--dim", str(dim)]) == 0
    assert meta(run)["step"] == 3
    # Once more, the run has nothing left to do: said, and nothing is rewritten.
    saved = {p: p.read_bytes() for p in resolve_checkpoint(run).iterdir() if p.is_file()}
    capsys.readouterr()
    assert pretrain.main(again) == 0
    assert (
        f"{run}: the run is at step 3, at or past --max-steps 3; nothing to do (raise it to "
        "train on)\n" in capsys.readouterr().out
    )
    assert {p: p.read_bytes() for p in saved} == saved
    # Other held-out text, or windows, go on, said: best/ then compares losses measured
    # otherwise.
    back = ["--resume", str(run), "--max-steps", "4", "--val-fraction", "0.3", "--block-size", "16"]
    assert pretrain.main(back) == 0
    err = capsys.readouterr().err
    assert (
        "warning: --block-size differs from what the run was started with: its batches and "
        "its validation will differ (best/ then compares losses measured otherwise)\n" in err
    )
    # The text a --val-fraction chooses is judged once read: the split moved, both differ.
    assert re.search(
        r"warning: --val-fraction differs from what the run was started with \(training "
        r"text: [\d,]+ bytes then, [\d,]+ now; validation text: [\d,]+ bytes then, [\d,]+ "
        r"now\): its batches differ and its validation differs \(best/ then compares losses "
        r"measured otherwise\)\n",
        err,
    ), err
    # One step, short of a log interval: logged as the run's last, with its evaluation.
    last, train = read_log(run, "eval")[4], read_log(run, "train")[4]
    assert (last["train_loss"], last["tokens_per_s"]) == (train["loss"], train["tokens_per_s"])
    # Fewer validation windows scored: the same batches, not the same validation.
    assert pretrain.main([*back, "--max-steps", "5", "--eval-tokens", "64"]) == 0
    assert (
        "warning: --eval-tokens differs from what the run was started with: its validation "
        "will differ (best/ then compares losses measured otherwise)" in capsys.readouterr().err
    )


def test_a_run_resumed_with_max_steps_none_at_its_default_steps_has_nothing_to_do(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # `--max-steps none` (the default for the text) is a step count known only once the
    # text is read: a run already there trains nothing, records nothing more and says so.
    text = tmp_path / "short.txt"
    text.write_text(CORPUS.read_text(encoding="utf-8")[:1500], encoding="utf-8")
    run = tmp_path / "run"
    flags = [*TINY, "--data", str(text), "--cache-dir", str(tmp_path / "cache")]
    assert pretrain.main([*flags, "--max-steps", "none", "--out-dir", str(run)]) == 0
    steps = meta(run)["step"]
    assert 1 < steps < 100
    log = (run / "log.jsonl").read_bytes()
    capsys.readouterr()
    assert pretrain.main(["--resume", str(run), "--max-steps", "none"]) == 0
    assert capsys.readouterr().out == (
        f"{run}: the run is at step {steps}, at or past --max-steps {steps}; nothing to do "
        "(raise it to train on)\n"
    )
    assert (run / "log.jsonl").read_bytes() == log


def test_resuming_from_an_older_step_keeps_best_and_the_steps_after_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    flags = ["--save-interval", "2", "--eval-interval", "2", "--keep-last", "3"]
    assert pretrain.main(tiny_run(tmp_path, *flags, "--max-steps", "8", "--out-dir", str(run))) == 0
    assert [p.name for p in step_folders(run)] == ["step-0000004", "step-0000006", "step-0000008"]
    best = json.loads((run / "best" / "trainer_meta.json").read_text())
    assert best["step"] == 8  # the loss still falls this early
    capsys.readouterr()

    # Back to step 4 (to try another lr, say), for two steps, keeping the last 2.
    back = ["--resume", str(run / "step-0000004"), "--max-steps", "6", "--keep-last", "2"]
    assert pretrain.main(back) == 0
    assert capsys.readouterr().err.startswith(
        "warning: step-0000004 is older than the run's newest checkpoint, step-0000008: the "
        "step folders after it stay until this run's saves of the same steps replace them, "
        "and best/ stays unless this run scores lower\n"
    )
    # The branch point is one of this run's last 2; step 8 is left; best/ is still
    # step 8's, the lowest loss this run folder has seen.
    assert [p.name for p in step_folders(run)] == ["step-0000004", "step-0000006", "step-0000008"]
    assert resolve_checkpoint(run).name == "step-0000006"
    assert json.loads((run / "best" / "trainer_meta.json").read_text()) == best
    # Resumed from `latest`, the run is where it is: no warning.
    capsys.readouterr()
    assert pretrain.main(["--resume", str(run), "--max-steps", "7", "--keep-last", "3"]) == 0
    assert "warning" not in capsys.readouterr().err
    # Patience counts from the step resumed, not from best/'s later loss: back to step 4
    # again, the same steps are retrained and improve on step 4's history.
    again = ["--resume", str(run / "step-0000004"), "--max-steps", "8", "--patience", "1"]
    assert pretrain.main(again) == 0
    assert (meta(run)["step"], meta(run)["stopped_by"]) == (8, "max_steps")
    # Back to a step whose own budget is spent (step 7 was saved by a 7-step run): said
    # so, of that checkpoint.
    capsys.readouterr()
    assert pretrain.main(["--resume", str(run / "step-0000007")]) == 0
    assert capsys.readouterr().out == (
        f"{run / 'step-0000007'}: the checkpoint is at step 7, at or past --max-steps 7, as "
        "saved; nothing to do (raise it to train on)\n"
    )


def test_a_diverging_run_exits_1_without_saving_and_keeps_its_checkpoints(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    assert pretrain.main(tiny_run(tmp_path, "--max-steps", "4", "--out-dir", str(run))) == 0
    saved = resolve_checkpoint(run)
    files = {p.name: p.read_bytes() for p in saved.iterdir() if p.is_file()}
    best = {p.name: p.read_bytes() for p in (run / "best").iterdir()}
    capsys.readouterr()
    # A learning rate no model survives: within a few steps the weights overflow and the
    # loss is NaN. Caught at a log line, at an evaluation, or at the run's last save.
    caught_within = {"--log-interval 2": 2, "--log-interval 1000 --eval-interval 1": 1}
    caught_within["--log-interval 1000 --eval-interval 1000"] = 26  # at step 30's save
    for flags, steps in caught_within.items():
        argv = ["--resume", str(run), "--max-steps", "30", "--lr", "1e30", *flags.split()]
        assert pretrain.main(argv) == 1, flags
        out, err = capsys.readouterr()
        (line,) = err.strip().splitlines()[-1:]
        assert line.startswith("error: the loss became NaN or infinite between steps ")
        # A sample follows each evaluation reported, none drawn from the lost weights.
        lines = out.splitlines()
        for before, sample in itertools.pairwise(lines):
            assert not sample.startswith("sample:") or " val loss " in before, out
        words = line.split()
        first, last = int(words[words.index("and") - 1]), int(words[words.index("and") + 1][:-1])
        assert first >= 4 and last - first == steps, (flags, line)
        assert resolve_checkpoint(run) == saved
        assert sorted(p.name for p in run.glob("step-*")) == [saved.name]
        assert {p.name: p.read_bytes() for p in saved.iterdir() if p.is_file()} == files
        assert {p.name: p.read_bytes() for p in (run / "best").iterdir()} == best
        # Strict JSON (no NaN) in the log, for jq and the like.
        for record in (run / "log.jsonl").read_text(encoding="utf-8").splitlines():
            json.loads(record, parse_constant=lambda name: pytest.fail(f"{name} in the log"))


def test_a_step_whose_update_broke_the_weights_is_not_saved(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Saved every step, no loss checked in between: the update of a saved step turns
    # the weights NaN before any loss has been computed on them.
    run = tmp_path / "run"
    flags = ["--lr", "1e30", "--save-interval", "1", "--keep-last", "100"]
    flags += ["--log-interval", "1000", "--eval-interval", "1000", "--out-dir", str(run)]
    assert pretrain.main(tiny_run(tmp_path, "--max-steps", "10", *flags)) == 1
    assert "error: the loss became NaN or infinite" in capsys.readouterr().err
    saved = sorted(run.glob("step-*"))
    assert saved, "the first steps' weights were still finite, and saved"
    for folder in saved:
        weights = load_file(folder / "model.safetensors")
        assert all(torch.isfinite(t).all() for t in weights.values()), folder.name
    assert resolve_checkpoint(run) == saved[-1]


@pytest.mark.parametrize(
    "content", ["{", "[]", '{"step": 2}'], ids=["not JSON", "a list", "no args"]
)
def test_resume_from_a_damaged_trainer_meta_exits_2_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str
) -> None:
    run = tmp_path / "run"
    assert pretrain.main(tiny_run(tmp_path, "--max-steps", "2", "--out-dir", str(run))) == 0
    (resolve_checkpoint(run) / "trainer_meta.json").write_text(content, encoding="utf-8")
    capsys.readouterr()
    assert pretrain.main(["--resume", str(run), "--max-steps", "4"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "trainer_meta.json" in err and err.count("\n") == 1


def test_a_new_run_never_writes_over_a_run_whose_checkpoint_is_lost(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    assert pretrain.main(tiny_run(tmp_path, "--max-steps", "2", "--out-dir", str(run))) == 0
    shutil.rmtree(resolve_checkpoint(run))  # `latest` now names a missing folder
    shutil.rmtree(run / "best")
    before = {p.name: p.stat().st_mtime_ns for p in run.iterdir()}
    capsys.readouterr()
    assert pretrain.main(tiny_run(tmp_path, "--max-steps", "2", "--out-dir", str(run))) == 2
    assert "already holds checkpoints" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in run.iterdir()} == before


def test_a_run_whose_newest_step_folder_was_deleted_says_which_to_resume(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # `latest` named the deleted folder: --resume failed on it, and the command run
    # again (or under --if-missing) said to pass --resume, which failed: nothing said how
    # to go on.
    run = tmp_path / "run"
    flags = ["--save-interval", "2", "--keep-last", "3", "--out-dir", str(run)]
    assert pretrain.main(tiny_run(tmp_path, "--max-steps", "6", *flags)) == 0
    shutil.rmtree(run / "step-0000006")
    left = f"pass --resume {run / 'step-0000004'}"
    for again in ([], ["--if-missing"]):
        command = tiny_run(tmp_path, "--max-steps", "6", *again, *flags)
        capsys.readouterr()
        assert pretrain.main(command) == 2
        err = capsys.readouterr().err
        assert "latest names step-0000006, which is gone" in err and left in err, err
    capsys.readouterr()
    assert pretrain.main(["--resume", str(run)]) == 2
    assert left in capsys.readouterr().err
    # The advice works.
    assert pretrain.main(["--resume", str(run / "step-0000004"), "--max-steps", "6"]) == 0
    assert meta(run)["step"] == 6 and (run / "latest").read_text() == "step-0000006\n"
    assert pretrain.main(tiny_run(tmp_path, "--max-steps", "6", "--if-missing", *flags)) == 0
    assert "already holds a finished run" in capsys.readouterr().out


def test_a_run_saved_before_lr_schedule_existed_resumes_on_its_cosine(tmp_path: Path) -> None:
    run = tmp_path / "run"
    flags = ["--max-steps", "4", "--decay-steps", "8", "--save-interval", "100"]
    assert pretrain.main(tiny_run(tmp_path, *flags, "--out-dir", str(run))) == 0
    assert meta(run)["args"]["lr_schedule"] == "wsd"
    saved = resolve_checkpoint(run) / "trainer_meta.json"
    old = json.loads(saved.read_text(encoding="utf-8"))
    del old["args"]["lr_schedule"]  # as trainer_meta.json was written before the flag
    saved.write_text(json.dumps(old), encoding="utf-8")

    assert pretrain.main(["--resume", str(run), "--max-steps", "8", "--log-interval", "1"]) == 0
    args = meta(run)["args"]
    assert args["lr_schedule"] == "cosine"
    # The 5th step (index 4) ends halfway from the 2 warmup steps to step 8: cosine is
    # halfway down its range there, where wsd would still hold the peak.
    peak, floor = args["lr"], args["lr"] * args["min_lr_ratio"]
    assert math.isclose(read_log(run, "train")[5]["lr"], (peak + floor) / 2, rel_tol=1e-6)


def test_without_a_step_count_a_run_makes_five_passes_over_the_text(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    # 4 x 32 tokens x 8 micro-batches: ~1k tokens a step, so 5 passes over the tiny corpus
    # end well before the CPU's default steps.
    flags = ["--grad-accum", "8", "--eval-interval", "1000", "--out-dir", str(run)]
    assert pretrain.main(tiny_run(tmp_path, *flags)) == 0
    (cache_meta,) = (tmp_path / "cache").glob("*/meta.json")
    train_tokens = json.loads(cache_meta.read_text())["splits"]["train"]["tokens"]
    tokens_per_step = 4 * 32 * 8
    last = read_log(run, "eval")[meta(run)["step"]]
    args = meta(run)["args"]
    assert meta(run)["step"] == args["max_steps"] < DEFAULT_CPU_STEPS[args["dtype"]]
    # The run read DEFAULT_MAX_EPOCHS (5) passes' worth of tokens: not a step more.
    assert 5 * train_tokens <= last["tokens"] < 5 * train_tokens + tokens_per_step
    # Resumed with the step count left to that default again, known only once the text
    # is read: the run has reached it, so it is not evaluated and logged a second time.
    log, steps = (run / "log.jsonl").read_bytes(), meta(run)["step"]
    capsys.readouterr()
    assert pretrain.main(["--resume", str(run), "--max-steps", "none"]) == 0
    assert (
        f"{run}: the run is at step {steps}, at or past --max-steps {steps}; nothing to do"
        in capsys.readouterr().out
    )
    assert (run / "log.jsonl").read_bytes() == log


def test_a_fine_tune_keeps_the_pad_token_and_chat_template_given_its_tokenizer_in_hf(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from transformers import AutoTokenizer

    base, edited, tuned = tmp_path / "base", tmp_path / "edited", tmp_path / "tuned"
    short = ["--max-steps", "2", "--eval-interval", "100", "--sample-tokens", "0"]
    assert pretrain.main(tiny_run(tmp_path, *short, "--out-dir", str(base))) == 0
    # What a user does in transformers before fine-tuning here.
    shutil.copytree(resolve_checkpoint(base), edited)
    hf = AutoTokenizer.from_pretrained(edited)
    hf.pad_token = "<|endoftext|>"
    chat = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
    # A default template and a named one (transformers 5: additional_chat_templates/).
    hf.chat_template = {"default": chat, "terse": "{{ messages[0].content }}"}
    hf.chat_control_tokens = ["<|endoftext|>"]  # what the server reads as control tokens
    hf.save_pretrained(edited)

    run = [*short, "--data", str(CORPUS), "--cache-dir", str(tmp_path / "cache")]
    assert pretrain.main([*run, "--init-from", str(edited), "--out-dir", str(tuned)]) == 0
    resumed = [*run, "--max-steps", "3", "--resume", str(tuned)]
    assert pretrain.main(resumed) == 0  # a resumed fine-tune keeps them too
    fresh = tmp_path / "fresh"  # and a new model trained with that tokenizer
    shape = ["--preset", "tiny", "--block-size", "32", "--batch-size", "4"]
    argv = [*run, *shape, "--tokenizer", str(edited), "--out-dir", str(fresh)]
    assert pretrain.main(argv) == 0
    # ... given as the run folder it is in (its `latest` names it).
    edited_run, fresh_too = tmp_path / "edited-run", tmp_path / "fresh-too"
    shutil.copytree(edited, edited_run / "step-0000002")
    (edited_run / "latest").write_text("step-0000002\n")
    argv = [*run, *shape, "--tokenizer", str(edited_run), "--out-dir", str(fresh_too)]
    assert pretrain.main(argv) == 0
    made = (resolve_checkpoint(tuned), tuned / "best", *map(resolve_checkpoint, (fresh, fresh_too)))
    for folder in made:
        reloaded = AutoTokenizer.from_pretrained(folder)
        assert (reloaded.pad_token, reloaded.eos_token) == ("<|endoftext|>", "<|endoftext|>")
        hi = [{"role": "user", "content": "hi"}]
        assert reloaded.apply_chat_template(hi, tokenize=False) == "user: hi\n", folder
        terse = reloaded.apply_chat_template(hi, chat_template="terse", tokenize=False)
        assert terse == "hi", folder
        assert reloaded.chat_control_tokens == ["<|endoftext|>"], folder
    assert meta(tuned)["step"] == 3
    # ... and the fine-tune chats: its prompt is the one transformers makes of the messages,
    # the control token a client types read as text.
    chat = [{"role": "user", "content": "hi <|endoftext|>"}]
    expected = AutoTokenizer.from_pretrained(resolve_checkpoint(tuned)).apply_chat_template(
        chat, add_generation_prompt=True, sanitize_control_tokens=True, return_dict=False
    )
    with running_server(Settings(checkpoint=tuned)) as url:
        counted = httpx.post(f"{url}/tokenize", json={"messages": chat}).json()
        reply = httpx.post(f"{url}/v1/chat/completions", json={"messages": chat, "max_tokens": 2})
    assert counted["tokens"] == expected
    assert reply.status_code == 200 and reply.json()["usage"]["prompt_tokens"] == len(expected)

    (edited / "tokenizer_config.json").write_text("{not json", encoding="utf-8")
    capsys.readouterr()
    argv = [*run, "--init-from", str(edited), "--out-dir", str(tmp_path / "never")]
    assert pretrain.main(argv) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: {edited / 'tokenizer_config.json'}: not valid JSON")
    assert not (tmp_path / "never").exists()


def test_runs_named_by_relative_paths_resume_with_their_own_commands(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    shutil.copy(CORPUS, "text.txt")
    short = ["--preset", "tiny", "--block-size", "32", "--batch-size", "4", "--data", "text.txt"]
    short += ["--sample-tokens", "0", "--eval-interval", "100", "--cache-dir", "cache"]
    assert (
        pretrain.main([*short, "--vocab-size", "384", "--max-steps", "1", "--out-dir", "base"]) == 0
    )
    # A new model on base's tokenizer, and a fine-tune of base also given its tokenizer
    # (the same: taken, as its own shape is): each goes on when its command is run again
    # with --resume.
    for command in (
        [*short, "--tokenizer", "base", "--out-dir", "fresh"],
        [*short, "--init-from", "base", "--tokenizer", "base/best", "--out-dir", "tuned"],
    ):
        assert pretrain.main([*command, "--max-steps", "1"]) == 0
        capsys.readouterr()
        assert pretrain.main([*command, "--max-steps", "2", "--resume", command[-1]]) == 0
        assert "warning" not in capsys.readouterr().err
        assert meta(tmp_path / command[-1])["step"] == 2
    # Runs saved before paths were recorded absolute hold them as given: the same.
    saved = resolve_checkpoint(tmp_path / "fresh") / "trainer_meta.json"
    old = json.loads(saved.read_text())
    old["args"] |= {"tokenizer": "base", "data": ["text.txt"]}
    saved.write_text(json.dumps(old))
    again = [*short, "--tokenizer", "base", "--out-dir", "fresh", "--resume", "fresh"]
    assert pretrain.main([*again, "--max-steps", "3"]) == 0
    assert "warning" not in capsys.readouterr().err
    # Another tokenizer beside --init-from is no repetition: refused.
    other = [*short, "--vocab-size", "320", "--max-steps", "1", "--out-dir", "other"]
    assert pretrain.main(other) == 0
    capsys.readouterr()
    refused = [*short, "--init-from", "base", "--tokenizer", "other", "--out-dir", "never"]
    assert pretrain.main(refused) == 2
    assert capsys.readouterr().err.endswith("model and its tokenizer: drop --tokenizer\n")
    assert not (tmp_path / "never").exists()


def test_a_missing_start_or_tokenizer_is_named_as_the_user_gave_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "typo" / "tokenizer.json"
    out = ["--out-dir", str(tmp_path / "run")]
    no_file, no_folder = (
        f"{missing}: no such file or folder",
        f"{missing}: no such checkpoint folder",
    )
    cases = {
        "--tokenizer": f"error: --tokenizer {no_file}\n",
        "POCKETGPT_TOKENIZER": f"error: POCKETGPT_TOKENIZER {no_file}\n",
        "POCKETGPT_INIT_FROM": f"error: POCKETGPT_INIT_FROM: {no_folder}\n",
        "POCKETGPT_RESUME": f"error: POCKETGPT_RESUME: {no_folder}\n",
    }
    # A model folder without its tokenizer.json; a device, no file or folder.
    untokenized = tmp_path / "model"
    untokenized.mkdir()
    (untokenized / "config.json").write_text("{}")
    cases[f"POCKETGPT_TOKENIZER={untokenized}"] = (
        f"error: POCKETGPT_TOKENIZER: {untokenized / 'tokenizer.json'}: missing\n"
    )
    cases["--tokenizer=/dev/null"] = (
        "error: --tokenizer /dev/null: not a tokenizer.json file or a checkpoint folder\n"
    )
    for given, message in cases.items():
        name, _, value = given.partition("=")
        with monkeypatch.context() as env:
            if name.startswith("--"):
                argv = [*tiny_run(tmp_path), name, value or str(missing), *out]
            else:
                env.setenv(name, value or str(missing))
                argv = [*tiny_run(tmp_path, *out)]
            argv.remove("--vocab-size"), argv.remove("384")  # a tokenizer brings its own
            assert pretrain.main(argv) == 2, given
        assert capsys.readouterr().err == message
    assert not (tmp_path / "run").exists()
    # An empty POCKETGPT_RESUME (compose passes the host's through) resumes nothing.
    monkeypatch.setenv("POCKETGPT_RESUME", "")
    assert pretrain.main(tiny_run(tmp_path, "--max-steps", "1", *out)) == 0


def test_a_corpus_too_small_for_one_process_says_to_lower_the_batch_or_block(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    short = tmp_path / "short.txt"
    short.write_text("Too short to fill a batch.\n")
    argv = [*TINY, "--data", str(short), "--batch-size", "1", "--out-dir", str(tmp_path / "run")]
    assert pretrain.main([*argv, "--cache-dir", str(tmp_path / "cache")]) == 2
    assert "(add text, or lower --batch-size / --block-size)\n" in capsys.readouterr().err


@pytest.mark.parametrize("generation_config", ["none", "without eos ids"])
def test_a_fine_tune_keeps_the_end_ids_a_folder_declares_in_config_json_alone(
    tmp_path: Path, tiny_checkpoint: Path, generation_config: str
) -> None:
    # An HF folder whose generation_config.json declares no eos ids, or that has none:
    # transformers' generate and the server stop at config.json's (a chat model's
    # <|im_end|>); its fine-tune stopped only at <|endoftext|>.
    start = tmp_path / "start"
    shutil.copytree(tiny_checkpoint, start)
    if generation_config == "none":
        (start / "generation_config.json").unlink()
    else:
        (start / "generation_config.json").write_text(json.dumps({"do_sample": False}))
    config = json.loads((start / "config.json").read_text())
    separator = config["eos_token_id"]
    config["eos_token_id"] = [separator, 99]
    (start / "config.json").write_text(json.dumps(config))
    run = tmp_path / "run"
    flags = ["--init-from", str(start), "--data", str(CORPUS), "--max-steps", "1"]
    flags += ["--batch-size", "4", "--sample-tokens", "0", "--cache-dir", str(tmp_path / "c")]
    assert pretrain.main([*flags, "--out-dir", str(run)]) == 0
    saved = json.loads((resolve_checkpoint(run) / "generation_config.json").read_text())
    assert saved["eos_token_id"] == [separator, 99]
    assert saved.get("do_sample") is (False if generation_config != "none" else None)


def test_init_from_fine_tunes_a_checkpoint_with_its_tokenizer_and_shape(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base, tuned, scratch = tmp_path / "base", tmp_path / "tuned", tmp_path / "scratch"
    logged = ["--log-interval", "1", "--eval-interval", "100"]
    trained = tiny_run(tmp_path, *logged, "--max-steps", "30", "--out-dir", str(base))
    assert pretrain.main(trained) == 0
    # The checkpoint's generation settings, as an HF user may have set them (greedy).
    generation = resolve_checkpoint(base) / "generation_config.json"
    settings = json.loads(generation.read_text()) | {"do_sample": False, "max_new_tokens": 12}
    settings |= {"repetition_penalty": 1.3, "eos_token_id": 99}  # not its separator's id
    generation.write_text(json.dumps(settings))
    # No shape, vocabulary or block size given: all of them are the checkpoint's.
    run = ["--data", str(CORPUS), "--cache-dir", str(tmp_path / "cache"), "--batch-size", "4"]
    run += [*logged, "--warmup-steps", "2", "--max-steps", "4", "--sample-tokens", "0"]
    assert pretrain.main([*run, "--init-from", str(base), "--out-dir", str(tuned)]) == 0
    assert f"fine-tuning from {resolve_checkpoint(base)}: " in capsys.readouterr().out
    fresh = ["--preset", "tiny", "--block-size", "32", "--tokenizer", str(base)]
    assert pretrain.main([*run, *fresh, "--out-dir", str(scratch)]) == 0

    base_ckpt, tuned_ckpt = resolve_checkpoint(base), resolve_checkpoint(tuned)
    assert (tuned_ckpt / "config.json").read_text() == (base_ckpt / "config.json").read_text()
    assert (tuned_ckpt / "tokenizer.json").read_bytes() == (
        base_ckpt / "tokenizer.json"
    ).read_bytes()
    assert meta(tuned)["step"] == 4 and meta(tuned)["args"]["init_from"] == str(base)
    # The shape's preset, whose lr and batch size apply: `tiny`'s, not a time box's pick.
    assert (meta(tuned)["args"]["preset"], meta(tuned)["args"]["lr"]) == ("tiny", 4e-3)
    # Same tokens, batches and seed as the fresh run: only the starting weights differ.
    first_tuned = read_log(tuned, "train")[1]["loss"]
    first_fresh = read_log(scratch, "train")[1]["loss"]
    assert first_tuned < first_fresh - 0.5
    assert first_tuned < read_log(base, "train")[1]["loss"] - 0.5
    # Its generation settings are kept (the token ids are the separator's, as always).
    kept = settings | {"eos_token_id": [settings["bos_token_id"], 99]}
    assert json.loads((tuned_ckpt / "generation_config.json").read_text()) == kept
    # Resuming a fine-tuning run continues its own checkpoint.
    assert pretrain.main(["--resume", str(tuned), "--max-steps", "6"]) == 0
    assert meta(tuned)["step"] == 6
    # So does the command that started it with --resume added; another --init-from is
    # refused.
    tune = [*run, "--init-from", str(base), "--out-dir", str(tuned)]
    assert pretrain.main([*tune, "--resume", str(tuned), "--max-steps", "8"]) == 0
    assert meta(tuned)["step"] == 8 and meta(tuned)["args"]["init_from"] == str(base)
    assert json.loads((resolve_checkpoint(tuned) / "generation_config.json").read_text()) == kept
    capsys.readouterr()
    other = [*run, "--init-from", str(scratch), "--resume", str(tuned), "--max-steps", "9"]
    assert pretrain.main(other) == 2
    assert capsys.readouterr().err == (
        f"error: --init-from {scratch}: the resumed run was fine-tuned from {base}; it goes on "
        "from its own checkpoint: drop --init-from\n"
    )
    # The pretraining command's own shape flags, repeated, change nothing: taken.
    dim = json.loads((base_ckpt / "config.json").read_text())["hidden_size"]
    same = ["--preset", "tiny", "--dim", str(dim), "--vocab-size", "384"]
    assert (
        pretrain.main([*run, "--init-from", str(base), *same, "--out-dir", str(tmp_path / "same")])
        == 0
    )

    capsys.readouterr()
    conflicts = {
        "--dim 64": "--init-from fixes the model and its tokenizer: drop --dim",
        "--preset mini --tokenizer x.json": "drop --preset, --tokenizer",
        "--no-tie-embeddings": "drop --no-tie-embeddings\n",  # the tiny preset ties them
        "--block-size 64": "--block-size 64: the --init-from model reads at most 32 tokens",
        f"--resume {scratch}": "--init-from starts a new run from a checkpoint and --resume",
    }
    for flags, message in conflicts.items():
        argv = [*run, "--init-from", str(base), "--out-dir", str(tmp_path / "x"), *flags.split()]
        assert pretrain.main(argv) == 2, flags
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err, (flags, err)
        assert not (tmp_path / "x").exists()

    # Set by environment (the Docker trainer's way), the setting is named as it was set:
    # a new fine-tune, and a run resumed with a shape it was not trained with.
    with pytest.MonkeyPatch.context() as env:
        env.setenv("POCKETGPT_DIM", "64")
        argv = [*run, "--init-from", str(base), "--out-dir", str(tmp_path / "x")]
        assert pretrain.main(argv) == 2
        assert "model and its tokenizer: drop POCKETGPT_DIM\n" in capsys.readouterr().err
        assert pretrain.main(["--resume", str(tuned), "--n-layers", "3"]) == 2
        err = capsys.readouterr().err
        assert "run's model and tokenizer: drop POCKETGPT_DIM, --n-layers\n" in err
        env.delenv("POCKETGPT_DIM")
        env.setenv("POCKETGPT_BLOCK_SIZE", "64")
        assert pretrain.main(argv) == 2
        assert (
            "POCKETGPT_BLOCK_SIZE 64: the --init-from model reads at most 32"
            in capsys.readouterr().err
        )
        assert pretrain.main(["--resume", str(tuned)]) == 2
        assert (
            "POCKETGPT_BLOCK_SIZE 64: the resumed model reads at most 32" in capsys.readouterr().err
        )
    assert not (tmp_path / "x").exists()


def test_compiled_training_follows_the_eager_losses(tmp_path: Path) -> None:
    common = ["--max-steps", "3", "--log-interval", "1", "--eval-interval", "100"]
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    assert pretrain.main(tiny_run(tmp_path, *common, "--no-compile", "--out-dir", str(eager))) == 0
    assert pretrain.main(tiny_run(tmp_path, *common, "--compile", "--out-dir", str(compiled))) == 0
    assert (meta(eager)["args"]["compile"], meta(compiled)["args"]["compile"]) == (False, True)
    losses_eager = [r["loss"] for r in read_log(eager, "train").values()]
    losses_compiled = [r["loss"] for r in read_log(compiled, "train").values()]
    # Same maths through inductor's fused kernels: equal up to float reassociation.
    assert len(losses_eager) == 3
    assert losses_compiled == pytest.approx(losses_eager, rel=1e-4)


def test_a_compiled_run_resumes_bit_exact(tmp_path: Path) -> None:
    # Text of few distinct tokens: the embedding's gradient sums many rows into each
    # token's row, where inductor's CPU kernel added them from both threads at once.
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the cat sat on the mat. " * 1500, encoding="utf-8")
    common = ["--data", str(corpus), "--compile", "--log-interval", "1"]
    common += ["--eval-interval", "100", "--save-interval", "100"]
    straight, split = whole_and_first_half(tmp_path, common, steps=4)
    assert pretrain.main(["--resume", str(split), "--max-steps", "4"]) == 0
    losses = [[r["loss"] for r in read_log(run, "train").values()] for run in (straight, split)]
    assert losses[0] == losses[1]
    weights_a = load_file(resolve_checkpoint(straight) / "model.safetensors")
    weights_b = load_file(resolve_checkpoint(split) / "model.safetensors")
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)


def spawn_pretrain(args: list[str]) -> subprocess.Popen[str]:
    """`python -m training.pretrain ARGS` from this checkout, its output captured as text."""
    return spawn_module("training.pretrain", args)


def signal_after_first_line(
    process: subprocess.Popen[str], stop: signal.Signals
) -> tuple[str, str, str]:
    """Send `stop` once `process` (spawn_module's) has printed its first line, and wait
    for it to end: that line, the rest of its stdout, its stderr."""
    try:
        assert process.stdout is not None
        first = process.stdout.readline()
        process.send_signal(stop)
        out, err = process.communicate(timeout=60)
    finally:
        process.kill()
        process.communicate()  # reaped, its pipes closed
    return first, out, err


def spawn_module(module: str, args: list[str]) -> subprocess.Popen[str]:
    """`python -m MODULE ARGS` from this checkout, its output captured as text."""
    return subprocess.Popen(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        env=python_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # A shell's background job ignores SIGINT, and a child inherits that: restore it.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


# 100000 steps would compile by default; the signal, not compilation, is under test.
LONG_RUN = ["--max-steps", "100000", "--no-compile", "--log-interval", "1"]


def sigterm_after_three_steps(
    run: Path, argv: list[str], meanwhile: Callable[[], None] = lambda: None
) -> subprocess.Popen:
    """`training.pretrain` with `argv` (a run into `run`), sent SIGTERM once it has logged
    three more steps and `meanwhile` has run; ended (communicate())."""
    log = run / "log.jsonl"
    before = len(log.read_text().splitlines()) if log.exists() else 0
    process = spawn_pretrain(argv)
    try:
        deadline = time.monotonic() + 90
        # Wait for the trainer's own evidence of progress: three logged steps.
        while not (log.exists() and len(log.read_text().splitlines()) >= before + 3):
            assert process.poll() is None, process.communicate()[1]
            assert time.monotonic() < deadline, "the trainer logged no steps"
            time.sleep(0.05)
        meanwhile()
        process.send_signal(signal.SIGTERM)
        process.out, process.err = process.communicate(timeout=60)
    finally:
        process.kill()
        process.communicate()  # reaped, its pipes closed
    return process


def test_sigterm_saves_exits_zero_and_the_run_goes_on_by_if_missing_or_resume(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    process = sigterm_after_three_steps(
        run, [*tiny_run(tmp_path, *LONG_RUN), "--out-dir", str(run)]
    )
    out, err = process.out, process.err
    assert process.returncode == 0, err
    assert "(signal)" in out
    stopped = meta(run)["step"]
    assert stopped >= 3
    assert resolve_checkpoint(run).name == f"step-{stopped:07d}"

    # The Docker trainer's --if-missing carries an interrupted run on, not leaves it be.
    if_missing = ["--if-missing", "--out-dir", str(run)]
    assert pretrain.main([*if_missing, "--max-steps", str(stopped + 1)]) == 0
    assert "holds an unfinished run; resuming it" in capsys.readouterr().out
    assert meta(run)["step"] == stopped + 1
    assert pretrain.main(["--resume", str(run), "--max-steps", str(stopped + 2)]) == 0
    assert meta(run)["step"] == stopped + 2
    assert max(read_log(run, "train")) == stopped + 2
    assert pretrain.main(if_missing) == 0  # finished now: left alone
    assert "already holds a finished run" in capsys.readouterr().out
    assert meta(run)["step"] == stopped + 2


def sigterm_on_first_scored_batch(scored: list[int]) -> Callable[[torch.nn.Module, tuple], None]:
    """A forward pre-hook: SIGTERM to this process as the first evaluation batch is scored
    (each one's size appended to `scored`)."""

    def hook(module: torch.nn.Module, inputs: tuple) -> None:
        if type(module).__name__ == "Transformer" and not module.training:  # evaluating
            scored.append(inputs[0].shape[0])
            if len(scored) == 1:
                signal.raise_signal(signal.SIGTERM)

    return hook


def test_sigterm_while_evaluating_stops_the_evaluation_which_the_resumed_run_makes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A whole validation split can take a minute to score: a signal must not wait for it
    # (`docker stop` kills the trainer 10 s after its SIGTERM, before any save).
    run, straight = tmp_path / "run", tmp_path / "straight"
    scored: list[int] = []
    flags = ["--val-data", str(VAL), "--eval-tokens", "0", "--eval-interval", "3"]
    flags += ["--save-interval", "3", "--max-steps", "5", "--no-compile", "--log-interval", "1"]
    hook = torch.nn.modules.module.register_module_forward_pre_hook(
        sigterm_on_first_scored_batch(scored)
    )
    try:
        assert pretrain.main(tiny_run(tmp_path, *flags, "--out-dir", str(run))) == 0
    finally:
        hook.remove()
    out = capsys.readouterr().out
    assert "step 3: evaluation stopped by a signal" in out
    assert "stopped at step 3 (signal)" in out and "sample:" not in out
    assert out.endswith(f"resume it: python -m training.pretrain --resume {run}\n")
    assert scored == [16]  # one batch of the split's windows, not the rest
    assert meta(run)["step"] == 3 and meta(run)["stopped_by"] == "signal"
    assert read_log(run, "eval") == {} and not (run / "best").exists()

    # Resumed, the run makes the step's evaluation first, as an uninterrupted run made it.
    assert pretrain.main(["--resume", str(run)]) == 0
    assert pretrain.main(tiny_run(tmp_path, *flags, "--out-dir", str(straight))) == 0
    evals, straight_evals = read_log(run, "eval"), read_log(straight, "eval")
    assert sorted(evals) == sorted(straight_evals) == [3, 5]
    assert [evals[s]["val_loss"] for s in (3, 5)] == [straight_evals[s]["val_loss"] for s in (3, 5)]
    weights = load_file(resolve_checkpoint(run) / "model.safetensors")
    straight_weights = load_file(resolve_checkpoint(straight) / "model.safetensors")
    assert all(torch.equal(weights[k], straight_weights[k]) for k in straight_weights)


def test_the_resume_and_serve_lines_quote_a_run_folder_whose_name_has_a_space(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The last line is a command to paste into a shell: `--resume /data/my run` unquoted
    # resumed "/data/my" and passed "run" as a stray argument.
    run = tmp_path / "my run"
    flags = ["--max-steps", "3", "--no-compile", "--out-dir", str(run)]

    def sigterm_on_first_training_step(module: torch.nn.Module, inputs: tuple) -> None:
        if type(module).__name__ == "Transformer" and module.training:
            signal.raise_signal(signal.SIGTERM)

    hook = torch.nn.modules.module.register_module_forward_pre_hook(sigterm_on_first_training_step)
    try:
        assert pretrain.main(tiny_run(tmp_path, *flags)) == 0
    finally:
        hook.remove()
    last = capsys.readouterr().out.splitlines()[-1]
    assert last == f"resume it: python -m training.pretrain --resume '{run}'"
    assert shlex.split(last.removeprefix("resume it: "))[-1] == str(run)
    assert pretrain.main(["--resume", str(run)]) == 0
    last = capsys.readouterr().out.splitlines()[-1]
    assert last == f"serve it: python -m server --checkpoint '{run}'"


# AdamW's first param group is the input embedding's, which carries lr_scale (empty
# while tied): the lr logged is the loop's, not that group's multiple of it.
@pytest.mark.parametrize("optimizer", ["muon", "adamw"])
def test_the_evaluation_a_resumed_run_makes_first_logs_what_an_uninterrupted_run_logs(
    tmp_path: Path, optimizer: str
) -> None:
    # The evaluation a signal stopped, made by the resumed run before it trains a step,
    # logged lr 0.0 and train_loss null: the process had trained no step of its own.
    run, straight = tmp_path / "run", tmp_path / "straight"
    flags = ["--val-data", str(VAL), "--eval-tokens", "0", "--eval-interval", "3"]
    flags += ["--optimizer", optimizer]
    flags += ["--save-interval", "3", "--max-steps", "5", "--no-compile", "--log-interval", "1"]
    flags += ["--lr-schedule", "cosine"]  # step 3 trains below the peak --lr
    # Stopped in its evaluation, then again in the resumed run's, before any step of its.
    for argv in (tiny_run(tmp_path, *flags, "--out-dir", str(run)), ["--resume", str(run)]):
        hook = torch.nn.modules.module.register_module_forward_pre_hook(
            sigterm_on_first_scored_batch([])
        )
        try:
            assert pretrain.main(argv) == 0
        finally:
            hook.remove()
        assert meta(run)["step"] == 3 and read_log(run, "eval") == {}
    assert pretrain.main(["--resume", str(run)]) == 0
    assert pretrain.main(tiny_run(tmp_path, *flags, "--out-dir", str(straight))) == 0
    evals, straight_evals = read_log(run, "eval"), read_log(straight, "eval")
    for key in ("lr", "train_loss", "val_loss"):
        assert evals[3][key] == straight_evals[3][key], key
    assert evals[3]["lr"] > 0


# The last step's evaluation: the loop's, at the interval, or train()'s final one, off it.
@pytest.mark.parametrize("interval", ["3", "100"], ids=["at the interval", "off the interval"])
def test_a_run_whose_last_evaluation_a_signal_stopped_is_unfinished(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], interval: str
) -> None:
    # It was saved as finished: `--if-missing` exited 0 (the Docker server started on a
    # model never evaluated), and a rerun said there was nothing to do.
    run = tmp_path / "run"
    flags = ["--val-data", str(VAL), "--eval-tokens", "0", "--eval-interval", interval]
    flags += ["--max-steps", "3", "--no-compile", "--if-missing", "--out-dir", str(run)]
    scored: list[int] = []
    hook = torch.nn.modules.module.register_module_forward_pre_hook(
        sigterm_on_first_scored_batch(scored)
    )
    try:
        assert pretrain.main(tiny_run(tmp_path, *flags)) == 128 + signal.SIGTERM
    finally:
        hook.remove()
    assert "stopped at step 3 (signal)" in capsys.readouterr().out
    assert meta(run)["stopped_by"] == "signal" and read_log(run, "eval") == {}
    assert pretrain.main(["--if-missing", "--out-dir", str(run)]) == 0
    assert "holds an unfinished run; resuming it" in capsys.readouterr().out
    assert sorted(read_log(run, "eval")) == [3] and (run / "best").is_dir()
    assert meta(run)["step"] == 3 and meta(run)["stopped_by"] == "max_steps"
    assert pretrain.main(["--if-missing", "--out-dir", str(run)]) == 0
    assert "already holds a finished run" in capsys.readouterr().out


def test_a_last_evaluation_off_the_interval_a_signal_stopped_is_not_made_by_a_longer_resume(
    tmp_path: Path,
) -> None:
    # Step 3's evaluation was the run's last (off --eval-interval), not the interval's: a
    # resume to 4 steps evaluates where an uninterrupted 4-step run does, at 4 alone.
    run = tmp_path / "run"
    flags = ["--val-data", str(VAL), "--eval-tokens", "0", "--eval-interval", "100"]
    flags += ["--max-steps", "3", "--no-compile", "--out-dir", str(run)]
    hook = torch.nn.modules.module.register_module_forward_pre_hook(
        sigterm_on_first_scored_batch([])
    )
    try:
        assert pretrain.main(tiny_run(tmp_path, *flags)) == 0
    finally:
        hook.remove()
    assert meta(run)["stopped_by"] == "signal" and read_log(run, "eval") == {}
    assert pretrain.main(["--resume", str(run), "--max-steps", "4"]) == 0
    assert eval_records(run) == [4]


def test_a_run_taken_back_and_killed_before_its_first_save_resumes_where_it_went_back(
    tmp_path: Path,
) -> None:
    # Going back drops the log's records past the step resumed. `latest` named step 8
    # until the first save, so a kill before it resumed step 8 under a log of another
    # history (or, here, said there was nothing to do).
    run = tmp_path / "run"
    flags = ["--save-interval", "4", "--log-interval", "1", "--out-dir", str(run)]
    assert pretrain.main(tiny_run(tmp_path, *flags, "--max-steps", "8")) == 0
    back = ["--resume", str(run / "step-0000004"), *LONG_RUN, "--save-interval", "1000"]
    process = spawn_pretrain(back)
    try:

        def trained_past_step_6() -> bool:
            assert process.poll() is None, process.communicate()[1]
            lines = (run / "log.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
            records = [json.loads(line) for line in lines if line.endswith("\n")]
            # (The first run's log ends with its step 8 evaluation.)
            return records[-1]["kind"] == "train" and records[-1]["step"] >= 6

        wait_until(trained_past_step_6, 90, "the run taken back to train past step 6")
        process.kill()  # SIGKILL: nothing is saved on the way out
    finally:
        process.kill()
        process.communicate()
    assert resolve_checkpoint(run).name == "step-0000004"
    assert pretrain.main(["--resume", str(run), "--max-steps", "6", "--log-interval", "1"]) == 0
    records = map(json.loads, (run / "log.jsonl").read_text(encoding="utf-8").splitlines())
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert meta(run)["step"] == 6


def test_a_kill_once_best_is_written_leaves_a_run_if_missing_resumes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The first evaluation writes best/, long before the first periodic save: a kill in
    # between left a model and nothing to resume, and every later command was refused.
    run = tmp_path / "run"
    flags = ["--eval-interval", "3", "--save-interval", "1000", "--out-dir", str(run)]
    process = spawn_pretrain([*tiny_run(tmp_path, *LONG_RUN), *flags])
    try:

        def best_written() -> bool:
            assert process.poll() is None, process.communicate()[1]
            return (run / "best").is_dir()

        wait_until(best_written, 90, "best/ written")
        process.kill()  # SIGKILL: nothing is saved on the way out
    finally:
        process.kill()
        process.communicate()
    assert pretrain.main(tiny_run(tmp_path, "--if-missing", "--max-steps", "5", *flags)) == 0
    assert "holds an unfinished run; resuming it (--if-missing)" in capsys.readouterr().out
    assert meta(run)["step"] == 5 and read_log(run, "eval")[3]


def tensorboard_steps(run: Path) -> list[int]:
    """The steps of the train losses TensorBoard shows for `run`, in the order read."""
    if not (run / "tensorboard").is_dir():
        return []
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    if "train/loss" not in events.Tags()["scalars"]:
        return []
    return [event.step for event in events.Scalars("train/loss")]


def test_a_run_killed_before_any_save_starts_over_and_one_left_with_best_alone_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    flags = ["--eval-interval", "1000", "--out-dir", str(run)]
    process = spawn_pretrain([*tiny_run(tmp_path, *LONG_RUN), *flags])
    try:

        def logged() -> bool:
            assert process.poll() is None, process.communicate()[1]
            # In TensorBoard's files too (its writer flushes every 10 scalars).
            return (run / "log.jsonl").is_file() and len(tensorboard_steps(run)) > 3

        wait_until(logged, 90, "steps logged")
        process.kill()  # SIGKILL before any checkpoint: the log alone is left
    finally:
        process.kill()
        process.communicate()
    other = run / "tensorboard" / "other-experiment" / "events.out.tfevents.1.host"
    other.parent.mkdir()
    other.write_bytes(b"not this run's")
    assert pretrain.main(tiny_run(tmp_path, "--if-missing", "--max-steps", "2", *flags)) == 0
    said = "holds a run stopped before its first checkpoint; starting it over (--if-missing)"
    assert said in capsys.readouterr().out
    assert meta(run)["step"] == 2
    # The run started over logs afresh in TensorBoard too, as in log.jsonl: the killed
    # run's steps are not drawn beside its own.
    assert tensorboard_steps(run) == sorted(read_log(run, "train")) == [2]
    assert other.read_bytes() == b"not this run's"  # what is not the writer's own is kept

    # Its step folders deleted, best/ kept (to serve): neither a new run nor --resume.
    shutil.rmtree(run / "step-0000002")
    (run / "latest").unlink()
    assert pretrain.main(tiny_run(tmp_path, *flags)) == 2
    assert "holds best/ but no checkpoint to resume (its step folders are gone)" in (
        capsys.readouterr().err
    )
    assert pretrain.main(["--resume", str(run)]) == 2
    assert capsys.readouterr().err == (
        f"error: --resume {run}: no checkpoint to resume, only best/ (a model: serve it, or "
        "fine-tune it with --init-from)\n"
    )

    # Step folders left, the one `latest` names lost: not "best/ alone".
    other = tmp_path / "other"
    flags = ["--save-interval", "1", "--keep-last", "3", "--out-dir", str(other)]
    assert pretrain.main(tiny_run(tmp_path, "--max-steps", "3", *flags)) == 0
    shutil.rmtree(other / "step-0000003")
    capsys.readouterr()
    assert pretrain.main(["--resume", str(other)]) == 2
    assert "latest names step-0000003, which is gone" in capsys.readouterr().err
    assert pretrain.main(tiny_run(tmp_path, *flags)) == 2
    assert "already holds checkpoints, but its latest names step-0000003, which is gone" in (
        capsys.readouterr().err
    )


def test_a_max_time_run_stops_by_the_clock_and_its_bar_ends_with_no_time_left(
    tmp_path: Path,
) -> None:
    run = tmp_path / "run"
    # No log line in the run: the bar's time left comes from its end alone.
    argv = [*tiny_run(tmp_path, *LONG_RUN), "--log-interval", "1000000", "--max-time", "2"]
    # A warmup the clock ends first (short of the 100,000 steps: no warning at start).
    argv += ["--warmup-steps", "50000"]
    _, err = run_to_its_end([*argv, "--out-dir", str(run)])
    assert meta(run)["stopped_by"] == "max_time" and meta(run)["wall_time"] >= 2
    # The bar's last line is the state at the end, not at the last log line before it.
    last = [line for line in err.splitlines() if "left=" in line][-1]
    assert "left=0s" in last, err
    assert err.endswith(
        f"warning: --max-time 2 s ended the run at step {meta(run)['step']}, inside "
        "--warmup-steps 50000: the learning rate never reached --lr nor decayed; allow "
        "more time or fewer warmup steps\n"
    )


def run_to_its_end(argv: list[str]) -> tuple[str, str]:
    """`python -m training.pretrain argv` in a process of its own, as a user runs it,
    ended successfully within 10 minutes (killed if not: a hang guard, never the limit of
    a run that progresses, even at seconds a step); its stdout and stderr."""
    process = spawn_pretrain(argv)
    try:
        out, err = process.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        raise
    assert process.returncode == 0, err
    return out, err


def resume_without_time_box(run: Path) -> None:
    run_to_its_end(["--resume", str(run), "--max-time", "none"])


# ~1k tokens a step (4 x 32 tokens x 8 micro-batches): five passes over the tiny corpus
# are ~60 steps.
FIVE_PASSES_IN_60_STEPS = ["--grad-accum", "8", "--eval-interval", "1000"]


def ended_by_the_clock(tmp_path: Path) -> Path:
    """A time-boxed run given no step count, its clock ended before its 5 passes."""
    run = tmp_path / "run"
    argv = tiny_run(tmp_path, *FIVE_PASSES_IN_60_STEPS, "--out-dir", str(run))
    assert pretrain.main([*argv, "--max-time", "0.001"]) == 0
    assert meta(run)["stopped_by"] == "max_time"
    return run


def test_a_time_boxed_run_ends_after_five_passes_and_its_bar_counts_down_to_them(
    tmp_path: Path,
) -> None:
    run = tmp_path / "run"
    # Five passes end the run long before 1000 s.
    flags = [*FIVE_PASSES_IN_60_STEPS, "--out-dir", str(run), "--max-time", "1000"]
    out, err = run_to_its_end(tiny_run(tmp_path, *flags))
    steps = meta(run)["args"]["max_steps"]
    assert meta(run)["stopped_by"] == "max_steps" and meta(run)["step"] == steps
    # 5 passes, counted up to a whole step.
    assert meta(run)["tokens_seen"] - 1024 < 5 * meta(run)["data"]["train"]["tokens"]
    assert meta(run)["tokens_seen"] >= 5 * meta(run)["data"]["train"]["tokens"]
    assert f"; {steps} steps (5.1 passes) or 1000 s\n" in out
    # The time left is that of the steps left, not the clock's ~1000 s.
    last = [line for line in err.splitlines() if "left=" in line][-1]
    assert "left=0s" in last, err


def test_a_time_boxed_run_keeps_its_five_passes_when_resumed_without_its_time_box(
    tmp_path: Path,
) -> None:
    run = ended_by_the_clock(tmp_path)
    passes = meta(run)["args"]["max_steps"]
    assert meta(run)["step"] < passes < DEFAULT_CPU_STEPS[meta(run)["args"]["dtype"]]
    resume_without_time_box(run)
    assert meta(run)["stopped_by"] == "max_steps"
    assert meta(run)["step"] == meta(run)["args"]["max_steps"] == passes


def test_a_run_resumed_with_fewer_steps_warms_up_as_a_run_of_that_many_steps(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The warmup a run's schedule chose (30 steps of 400) was kept when it was resumed
    # with --max-steps 12: it covered the whole run (with a warning about a flag never
    # given), and the learning rate never decayed.
    at = TINY.index("--warmup-steps")
    no_warmup = [*TINY[:at], *TINY[at + 2 :], "--no-compile", "--log-interval", "1"]
    common = [*no_warmup, "--data", str(CORPUS), "--cache-dir", str(tmp_path / "cache")]
    run, straight = tmp_path / "run", tmp_path / "straight"
    argv = [*common, "--max-steps", "400", "--max-time", "0.001", "--out-dir", str(run)]
    assert pretrain.main(argv) == 0
    assert meta(run)["args"]["warmup_steps"] == 30 and meta(run)["step"] < 12
    capsys.readouterr()
    assert pretrain.main(["--resume", str(run), "--max-steps", "12", "--max-time", "none"]) == 0
    assert "warning" not in capsys.readouterr().err
    assert pretrain.main([*common, "--max-steps", "12", "--out-dir", str(straight)]) == 0
    assert meta(run)["args"]["warmup_steps"] == meta(straight)["args"]["warmup_steps"] == 1
    assert read_log(run, "train")[12]["lr"] == read_log(straight, "train")[12]["lr"]
    # One given is kept.
    argv = [*common, "--max-steps", "400", "--max-time", "0.001", "--warmup-steps", "30"]
    assert pretrain.main([*argv, "--out-dir", str(tmp_path / "given")]) == 0
    resume = ["--resume", str(tmp_path / "given"), "--max-steps", "12", "--max-time", "none"]
    assert pretrain.main(resume) == 0
    assert meta(tmp_path / "given")["args"]["warmup_steps"] == 30
    assert "--warmup-steps 30 covers the whole 12-step schedule" in capsys.readouterr().err


def test_a_time_boxed_run_saved_without_a_step_count_resumes_to_the_default_one(
    tmp_path: Path,
) -> None:
    run = ended_by_the_clock(tmp_path)
    passes = meta(run)["args"]["max_steps"]
    # Before 2026-12-06 such a run saved "unlimited" steps: without its time box it must
    # take the default step count, as a new run gets, not train without end.
    saved = resolve_checkpoint(run) / "trainer_meta.json"
    old = meta(run)
    old["args"]["max_steps"] = 10**12
    saved.write_text(json.dumps(old), encoding="utf-8")
    resume_without_time_box(run)
    assert meta(run)["stopped_by"] == "max_steps"
    assert meta(run)["step"] == meta(run)["args"]["max_steps"] == passes


def test_a_second_trainer_on_a_run_in_training_is_refused_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    argv = [*tiny_run(tmp_path, *LONG_RUN), "--save-interval", "2", "--out-dir", str(run)]
    capsys.readouterr()
    answers = []

    def second_trainers() -> None:  # a double launch, a restarted container
        # (Bounded in time, so that were either let in, it would end and fail the test.)
        for second in (["--resume", str(run)], [*argv, "--if-missing"]):
            second += ["--max-time", "20"]
            answers.append((pretrain.main(second), capsys.readouterr().err))

    first = sigterm_after_three_steps(run, argv, meanwhile=second_trainers)
    assert first.returncode == 0, first.err
    pid = first.pid
    for code, err in answers:
        assert code == 2
        assert err.endswith(
            f"error: {run}: another trainer (pid {pid}) is training this run; wait for it "
            "to end, or choose another --out-dir\n"
        )
    # The log is the first trainer's alone: every step once, in order.
    lines = (run / "log.jsonl").read_text(encoding="utf-8").splitlines()
    steps = [json.loads(line)["step"] for line in lines if '"train"' in line]
    assert steps == sorted(set(steps)) and len(steps) >= 3
    # Ended, it holds the run no more, and leaves no lock file.
    assert not (run / RUN_LOCK).exists()
    assert pretrain.main(["--resume", str(run), "--max-steps", str(meta(run)["step"] + 1)]) == 0


def test_a_fine_tune_is_refused_where_it_would_not_be_served_or_would_not_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base, tuned = tmp_path / "base", tmp_path / "tuned"
    assert pretrain.main(tiny_run(tmp_path, "--max-steps", "2", "--out-dir", str(base))) == 0
    data = ["--data", str(CORPUS), "--cache-dir", str(tmp_path / "cache"), "--max-steps", "1"]
    tune = [*data, "--init-from", str(base)]
    assert pretrain.main([*tune, "--out-dir", str(tuned)]) == 0
    before = sorted(p.relative_to(base) for p in base.rglob("*"))

    capsys.readouterr()
    # A model's folder as --out-dir: it would load as its old weights, not the run inside.
    # So for a run trained anew.
    for argv, model in ((tune, "best"), (tune, "step-0000002"), (data, "best")):
        assert pretrain.main([*argv, "--out-dir", str(base / model)]) == 2
        assert capsys.readouterr().err == (
            f"error: --out-dir {base / model} is a model's folder (it holds config.json), "
            "which loads as that model, not as a run written into it; choose another --out-dir\n"
        )
    # The run folder fine-tuned from: no --resume to suggest (it would refuse --init-from).
    assert pretrain.main([*data, "--init-from", str(base), "--out-dir", str(base)]) == 2
    assert capsys.readouterr().err == (
        f"error: --out-dir {base} already holds checkpoints; a fine-tune (--init-from) starts "
        "a run of its own: choose another --out-dir\n"
    )
    # --if-missing finding a run not fine-tuned from --init-from's checkpoint says so, rather
    # than "nothing to do" (Docker's trainer with POCKETGPT_INIT_FROM set would serve the
    # base model); finding the fine-tune it names, it has nothing to do.
    if_missing = [*data, "--if-missing", "--init-from"]
    assert pretrain.main([*if_missing, str(tuned), "--out-dir", str(base)]) == 2
    assert capsys.readouterr().err == (
        f"error: --init-from {tuned}: --out-dir {base} holds a run trained anew, which "
        "--if-missing resumes or keeps; move that run away, or choose another --out-dir for "
        "this fine-tune\n"
    )
    # Docker's trainer: --if-missing and --out-dir fixed, POCKETGPT_INIT_FROM set.
    with pytest.MonkeyPatch.context() as env:
        env.setenv("POCKETGPT_INIT_FROM", str(tuned))
        assert pretrain.main([*data, "--if-missing", "--out-dir", str(base)]) == 2
        assert capsys.readouterr().err.startswith(
            f"error: POCKETGPT_INIT_FROM {tuned}: --out-dir {base} holds a run trained anew"
        )
    assert pretrain.main([*if_missing, str(base / "best"), "--out-dir", str(tuned)]) == 2
    assert f"--out-dir {tuned} holds a run fine-tuned from {base}, which" in capsys.readouterr().err
    assert pretrain.main([*if_missing, str(base), "--out-dir", str(tuned)]) == 0
    assert "already holds a finished run; nothing to do (--if-missing)" in capsys.readouterr().out
    # A model's folder under --if-missing is kept as it is (the README's quick start on an
    # HF save put there), unless a fine-tune was asked for.
    assert pretrain.main([*data, "--if-missing", "--out-dir", str(base / "best")]) == 0
    assert capsys.readouterr().out == (
        f"{base / 'best'} is a model's folder; nothing to do (--if-missing)\n"
    )
    assert pretrain.main([*if_missing, str(tuned), "--out-dir", str(base / "best")]) == 2
    assert "is a model's folder (it holds config.json)" in capsys.readouterr().err
    assert sorted(p.relative_to(base) for p in base.rglob("*")) == before
    # Also a step folder saved midway (an unfinished run's): it said "resuming it", then
    # failed, exit 2.
    midway = tmp_path / "midway"
    saves = ["--max-steps", "4", "--save-interval", "2", "--out-dir", str(midway)]
    assert pretrain.main(tiny_run(tmp_path, *saves)) == 0
    capsys.readouterr()
    step2 = midway / "step-0000002"
    assert pretrain.main([*data, "--if-missing", "--out-dir", str(step2)]) == 0
    assert capsys.readouterr().out == f"{step2} is a model's folder; nothing to do (--if-missing)\n"

    # A run folder that lost its `latest` names the checkpoints in it, not a killed save.
    (base / "latest").unlink()
    (base / "step-0000003.tmp-4242").mkdir()
    shutil.copy(base / "best" / "config.json", base / "step-0000003.tmp-4242")
    assert pretrain.main([*data, "--init-from", str(base), "--out-dir", str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err == (
        f"error: --init-from: {base}: not a checkpoint (config.json missing and no latest "
        "file); the checkpoints inside it: best, step-0000002: name one\n"
    )


def test_an_interrupted_fine_tune_goes_on_when_its_command_is_run_again_under_if_missing(
    tmp_path: Path,
) -> None:
    base, tuned = tmp_path / "base", tmp_path / "tuned"
    assert pretrain.main(tiny_run(tmp_path, "--max-steps", "2", "--out-dir", str(base))) == 0
    data = ["--data", str(CORPUS), "--cache-dir", str(tmp_path / "cache"), *LONG_RUN]
    tune = [*data, "--init-from", str(base), "--out-dir", str(tuned), "--if-missing"]
    stopped = sigterm_after_three_steps(tuned, tune)
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.err
    step = meta(tuned)["step"]
    assert pretrain.main([*tune, "--max-steps", str(step + 1)]) == 0  # once refused
    assert meta(tuned)["step"] == step + 1 and meta(tuned)["args"]["init_from"] == str(base)


def test_a_fine_tune_resumes_from_its_own_checkpoint_once_its_base_is_gone(
    tmp_path: Path, tiny_checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A resumed fine-tune goes on from its own step, never reading --init-from's folder
    # again: a base model downloaded to a scratch disk and since deleted stops nothing.
    base, tuned = tmp_path / "base", tmp_path / "tuned"
    shutil.copytree(tiny_checkpoint, base)
    data = ["--data", str(CORPUS), "--cache-dir", str(tmp_path / "cache"), "--no-compile"]
    tune = [*data, "--block-size", "32", "--batch-size", "4", "--sample-tokens", "0"]
    tune += ["--init-from", str(base), "--out-dir", str(tuned)]
    assert pretrain.main([*tune, "--max-steps", "1"]) == 0
    shutil.rmtree(base)
    capsys.readouterr()
    assert pretrain.main(["--resume", str(tuned), "--max-steps", "2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"resuming {tuned / 'step-0000001'} at step 1\n"), out
    assert "fine-tuning from" not in out
    assert meta(tuned)["step"] == 2 and meta(tuned)["args"]["init_from"] == str(base)


def test_if_missing_beside_resume_goes_on_with_the_resume_past_a_finished_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Docker's trainer has --if-missing and --out-dir fixed: a --resume added to train a
    # finished run further is the command's word, not a run --if-missing leaves alone.
    run = tmp_path / "run"
    assert pretrain.main(tiny_run(tmp_path, "--max-steps", "1", "--out-dir", str(run))) == 0
    capsys.readouterr()
    again = ["--resume", str(run), "--out-dir", str(run), "--if-missing", "--max-steps", "2"]
    assert pretrain.main(again) == 0
    out = capsys.readouterr().out
    assert "nothing to do" not in out and f"resuming {run / 'step-0000001'} at step 1\n" in out
    assert meta(run)["step"] == 2


def test_under_if_missing_a_run_stopped_by_sigterm_saves_and_exits_143(tmp_path: Path) -> None:
    # Docker's trainer: an exit 0 here would start the server on a half-trained model.
    run = tmp_path / "run"
    argv = [*tiny_run(tmp_path, *LONG_RUN), "--out-dir", str(run), "--if-missing"]
    process = sigterm_after_three_steps(run, argv)
    assert process.returncode == 128 + signal.SIGTERM, process.err
    assert process.err.endswith(
        "the run is unfinished (--if-missing): exit 143; run the same command again to resume it\n"
    )
    stopped = meta(run)["step"]
    assert stopped >= 3 and meta(run)["stopped_by"] == "signal"
    assert resolve_checkpoint(run).name == f"step-{stopped:07d}"
    # How that command ran, not a setting of the run: resumed without it, a stop is 0.
    resumed = sigterm_after_three_steps(run, ["--resume", str(run)])
    assert resumed.returncode == 0, resumed.err
    assert "--if-missing" not in resumed.err
    assert meta(run)["step"] >= stopped + 3


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_signal_while_preparing_data_exits_128_plus_it_leaving_nothing(
    tmp_path: Path, stop: signal.Signals
) -> None:
    # SIGTERM (docker compose stop) killed the process there: no word, and the run
    # folder left behind with its lock file.
    corpus, run, cache = tmp_path / "corpus.txt", tmp_path / "run", tmp_path / "cache"
    # ~8 MB: tokenizing it takes seconds after the tokenizer line is printed.
    corpus.write_text("".join(f"Line {i} of a corpus that is long.\n" for i in range(220_000)))
    args = [*TINY, "--data", str(corpus), "--out-dir", str(run), "--cache-dir", str(cache)]
    process = spawn_pretrain(args)
    first, _, err = signal_after_first_line(process, stop)
    assert first.startswith("training a 384-entry tokenizer"), first
    assert process.returncode == 128 + stop, err
    assert err.splitlines()[-1] == "interrupted before training started: no checkpoint written"
    assert "Traceback" not in err
    assert not run.exists()
    assert not cache.exists() or not any(cache.iterdir())


def test_a_one_character_corpus_says_character_and_is_too_small(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "one.txt").write_text("a")
    argv = [*TINY, "--data", str(tmp_path / "one.txt"), "--out-dir", str(tmp_path / "run")]
    assert pretrain.main([*argv, "--cache-dir", str(tmp_path / "cache")]) == 2
    out, err = capsys.readouterr()
    assert "tokenizer on 1 character\n" in out
    assert err.startswith("error: the corpus is too small: 2 training tokens"), err


def test_before_training_sigterm_unwinds_and_after_it_signals_take_their_default_action() -> None:
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with signals_unwind():
        with pytest.raises(Terminated):
            os.kill(os.getpid(), signal.SIGTERM)  # handled before kill() returns to Python
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
        # Once the trainer is built: a signal after its checkpoints ends the process,
        # not "interrupted before training started".
        default_signal_actions()
        assert signal.getsignal(signal.SIGINT) is signal.SIG_DFL
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    assert {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)} == before


def test_a_signal_the_process_ignores_stays_ignored() -> None:
    # A background job in a non-interactive shell starts with SIGINT ignored.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with signals_unwind():
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            default_signal_actions()
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    finally:
        signal.signal(signal.SIGINT, previous)


def test_main_leaves_the_signal_handlers_as_it_found_them(tmp_path: Path) -> None:
    # It sets its own for the run (and the defaults once trained); a caller's stay its own.
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    run = tmp_path / "run"
    assert pretrain.main(tiny_run(tmp_path, "--max-steps", "1", "--out-dir", str(run))) == 0
    assert {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)} == before


def files_up_to(size: int) -> Callable[[], None]:
    """For a child process: files past `size` bytes fail with EFBIG, as on a full disk."""

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))

    return limit


def pretrain_in_files_up_to(size: int, *args: str) -> subprocess.CompletedProcess:
    """`python -m training.pretrain` with `args`, where a file past `size` bytes fails."""
    return subprocess.run(
        [sys.executable, "-m", "training.pretrain", *args],
        env=python_env(),
        preexec_fn=files_up_to(size),
        capture_output=True,
        text=True,
        timeout=120,
    )


# 256 KiB: the weights cannot be written (log.jsonl can); 5 MiB: the `tiny` weights
# (3.4 MB) can, AdamW's state beside them (twice that) cannot.
@pytest.mark.parametrize("size", [256 * 1024, 5 * 1024 * 1024], ids=["weights", "state"])
def test_a_checkpoint_that_cannot_be_written_exits_1_with_one_line_leaving_nothing(
    tmp_path: Path, size: int
) -> None:
    run = tmp_path / "run"
    flags = tiny_run(tmp_path, "--max-steps", "3", "--optimizer", "adamw", "--out-dir", str(run))
    done = pretrain_in_files_up_to(size, *flags)
    assert done.returncode == 1, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {run}") and "could not be written" in last, done.stderr
    assert "File too large" in last, last  # the system's reason, as a full disk's would be
    assert last.endswith("; no checkpoint of this run was saved before it"), last
    assert "Traceback" not in done.stderr
    # No step folder, whole or half; and no best/, which comes after the run's first
    # checkpoint (though under the larger limit its weights alone would fit).
    assert sorted(p.name for p in run.iterdir()) == ["log.jsonl", "tensorboard"]


def test_a_checkpoint_that_cannot_be_written_after_one_that_was_leaves_that_one_latest(
    tmp_path: Path,
) -> None:
    run = tmp_path / "run"
    flags = tiny_run(tmp_path, "--max-steps", "1", "--out-dir", str(run))
    assert pretrain.main(flags) == 0
    # The tiny weights are 3.4 MB.
    resumed = pretrain_in_files_up_to(256 * 1024, "--resume", str(run), "--max-steps", "3")
    assert resumed.returncode == 1, resumed.stderr
    last = resumed.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {run / 'step-0000003'}: could not be written"), last
    assert last.endswith("; the checkpoint `latest` names is intact"), last
    assert (run / "latest").read_text().strip() == "step-0000001"
    assert not list(run.glob("step-0000003*"))


def torchrun_ranks(
    tmp_path: Path,
    args: list[str],
    entry: tuple[str, ...] = ("-m", "training.pretrain"),
    **popen: object,
) -> tuple[subprocess.CompletedProcess, dict[int, str]]:
    """`training.pretrain` (or the script `entry` names) under torchrun on 2 CPU ranks:
    the run and each rank's stderr."""
    logs = tmp_path / "torchrun-logs"
    torchrun = [*TORCHRUN, "--standalone", "--nproc_per_node", "2"]
    torchrun += ["--log-dir", str(logs), "--redirects", "3"]  # each rank's output in a file
    command = [*torchrun, *entry, *args]
    with subprocess.Popen(
        command,
        cwd=REPO,
        env=python_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    ) as process:
        try:
            out, err = process.communicate(timeout=150)
        except subprocess.TimeoutExpired:
            # A hung run: SIGTERM makes torchrun stop its ranks (each in a session of its
            # own, out of reach of a kill of torchrun's group), then itself.
            process.terminate()
            process.communicate(timeout=60)
            raise
    done = subprocess.CompletedProcess(command, process.returncode, out, err)
    stderr = {int(p.parent.name): p.read_text() for p in logs.glob("*/attempt_0/*/stderr.log")}
    assert sorted(stderr) == [0, 1], done.stderr[-3000:]
    return done, stderr


def assert_last_lines(stderr: dict[int, str], *starts: str) -> None:
    """Each rank's stderr ends with one line starting as given, with no traceback."""
    for rank, start in enumerate(starts):
        assert "Traceback" not in stderr[rank], stderr[rank][-3000:]
        assert stderr[rank].strip().splitlines()[-1].startswith(start), stderr[rank][-3000:]


@pytest.mark.parametrize(
    ("body", "code", "said"),
    [
        ("print('trained', end=''); return 3", 3, "trained"),  # stdout a pipe: flushed
        ("raise SystemExit(2)", 2, ""),  # argparse's bad flag
        ("raise ValueError('a bug')", 1, "ValueError: a bug"),  # traced, as Python would
    ],
)
def test_a_torchrun_rank_exits_with_its_code_and_all_it_printed(
    body: str, code: int, said: str
) -> None:
    script = f"from training.pretrain import exit_process\ndef run():\n    {body}\n"
    script += "exit_process(run)\n"
    done = subprocess.run(
        [sys.executable, "-c", script],
        # As torchrun sets it (no teardown); stdout block-buffered, as into a log file.
        env={k: v for k, v in python_env().items() if k != "PYTHONUNBUFFERED"}
        | {"WORLD_SIZE": "2"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == code, done.stderr
    assert said in done.stdout + done.stderr


def test_under_torchrun_each_rank_joins_the_group_as_its_rank_and_local_rank(
    tmp_path: Path,
) -> None:
    # The local rank picks a rank's GPU (cuda:<local rank>): read from torchrun's
    # LOCAL_RANK, which on one node is each rank's own, not 0 for all.
    script = tmp_path / "join.py"
    script.write_text(
        "import sys, torch\n"
        "from training.distributed import init_distributed, leave_together\n"
        "info = init_distributed(torch.device('cpu'))\n"
        "print(info, info.is_main, info.enabled, file=sys.stderr)\n"
        "leave_together(info)\n"
    )
    done, stderr = torchrun_ranks(tmp_path, [], entry=(str(script),))
    assert done.returncode == 0, done.stderr[-3000:]
    for rank in (0, 1):
        joined = f"DistInfo(rank={rank}, world_size=2, local_rank={rank}) {rank == 0} True"
        assert stderr[rank].strip().splitlines()[-1] == joined, stderr[rank][-3000:]


def test_under_torchrun_a_checkpoint_rank_0_cannot_write_stops_every_rank_with_one_line(
    tmp_path: Path,
) -> None:
    run = tmp_path / "run"
    args = tiny_run(tmp_path, "--max-steps", "3", "--out-dir", str(run))
    # The file-size limit is inherited by both ranks; rank 0 alone writes.
    done, stderr = torchrun_ranks(tmp_path, args, preexec_fn=files_up_to(256 * 1024))
    assert done.returncode != 0
    assert_last_lines(stderr, f"error: {run}", "error: rank 0 stopped the run (see its error)")
    assert "no checkpoint of this run was saved before it" in stderr[0]
    assert sorted(p.name for p in run.iterdir()) == ["log.jsonl", "tensorboard"]


def test_under_torchrun_text_rank_0_cannot_prepare_stops_every_rank_with_one_line(
    tmp_path: Path,
) -> None:
    short = tmp_path / "short.txt"
    short.write_text("Too short to fill a batch.\n")
    args = [*TINY, "--data", str(short), str(short), "--cache-dir", str(tmp_path / "cache")]
    args += ["--batch-size", "1"]  # one row: the ranks' blocks, not the batch, need the text
    done, stderr = torchrun_ranks(tmp_path, [*args, "--out-dir", str(tmp_path / "run")])
    assert done.returncode != 0
    assert_last_lines(stderr, "error: ", "error: rank 0 could not prepare the data")
    assert "too small" in stderr[0]
    assert "use fewer processes or a lower --block-size: each of the 2 ranks" in stderr[0]
    # What every rank reads alike is warned of once, by rank 0.
    assert "already read" in stderr[0] and "warning" not in stderr[1], stderr[1]
    assert not (tmp_path / "run").exists()


def test_torchrun_two_ranks_on_gloo_train_on_different_data_and_log_their_mean_loss(
    tmp_path: Path,
) -> None:
    run = tmp_path / "ddp"
    flags = ["--max-steps", "2", "--save-interval", "1", "--log-interval", "1"]
    flags += ["--eval-interval", "2"]  # an evaluation at the last step, before the final save
    args = tiny_run(tmp_path, *flags, "--dtype", "float32", "--out-dir", str(run))
    done, _ = torchrun_ranks(tmp_path, args)
    assert done.returncode == 0, done.stderr[-3000:]
    steps = sorted(p.name for p in run.iterdir() if p.name.startswith("step-"))
    assert steps == ["step-0000001", "step-0000002"]
    load_model(run)
    info = meta(run)
    assert info["world_size"] == 2
    assert info["tokens_seen"] == 2 * 2 * 4 * 32  # steps x ranks x batch x block
    fingerprints = info["first_batch_fingerprints"]
    assert len(fingerprints) == 2 and fingerprints[0] != fingerprints[1]
    # Step 2's loss is each rank's second batch under the step-1 weights: the log holds
    # the mean of the two ranks' losses, not rank 0's alone.
    model = load_model(run / "step-0000001")
    train_bin = Path(info["data"]["cache"]) / "train.bin"
    tokens = np.memmap(train_bin, dtype=np.uint16, mode="r")
    losses = []
    for rank in range(2):
        sampler = BatchSampler(
            tokens, block_size=32, batch_size=4, seed=info["args"]["seed"], rank=rank, world_size=2
        )
        sampler.next_batch()
        with torch.no_grad():
            losses.append(next_token_loss(model, *sampler.next_batch()).item())
    assert abs(losses[0] - losses[1]) > 1e-3  # the ranks' losses tell apart
    logged = read_log(run, "train")[2]["loss"]
    assert math.isclose(logged, sum(losses) / 2, rel_tol=1e-5), (logged, losses)


def test_a_time_boxed_two_rank_run_trains_to_its_clock_on_every_rank(tmp_path: Path) -> None:
    # Rank 1's bar is disabled, and tqdm keeps no `initial` on a disabled bar: the time
    # left of a --max-time run, reckoned at each log line, must not be read from it.
    run = tmp_path / "ddp"
    flags = ["--max-steps", "100000", "--log-interval", "1", "--max-time", "3"]
    args = tiny_run(tmp_path, *flags, "--dtype", "float32", "--out-dir", str(run))
    done, stderr = torchrun_ranks(tmp_path, args)
    assert done.returncode == 0, stderr[1][-3000:]
    assert "Traceback" not in stderr[1], stderr[1][-3000:]
    assert meta(run)["stopped_by"] == "max_time" and meta(run)["world_size"] == 2


def test_a_two_rank_run_resumed_alone_warns_on_stderr_and_a_stray_rank_is_no_rank(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "ddp"
    done, _ = torchrun_ranks(
        tmp_path, tiny_run(tmp_path, "--max-steps", "1", "--out-dir", str(run))
    )
    assert done.returncode == 0, done.stderr[-3000:]
    # RANK left in the environment (a cluster's, a shell's) without torchrun's WORLD_SIZE:
    # a plain run, which prints and locks its folder as one.
    monkeypatch.setenv("RANK", "1")
    assert pretrain.main(["--resume", str(run), "--max-steps", "2"]) == 0
    captured = capsys.readouterr()
    assert f"stopped at step 2 (max_steps) -> {run / 'step-0000002'}" in captured.out
    assert captured.out.endswith(f"serve it: python -m server --checkpoint {run}\n")
    assert "warning: resuming 2 ranks' data order on 1; batches will differ" in captured.err


def test_a_run_whose_last_step_scores_worse_than_best_points_to_best(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    assert pretrain.main(tiny_run(tmp_path, "--max-steps", "20", "--out-dir", str(run))) == 0
    assert capsys.readouterr().out.endswith(f"serve it: python -m server --checkpoint {run}\n")
    # One step at a learning rate that wrecks the weights: the last step is no longer the
    # model to serve (as after overfitting a small text).
    assert pretrain.main(["--resume", str(run), "--max-steps", "21", "--lr", "1"]) == 0
    best, last = meta(run / "best")["val_loss"], meta(run)["val_loss"]
    assert meta(run / "best")["step"] == 20 and best < last
    assert capsys.readouterr().out.endswith(
        f"serve best/ (val loss {best:.4f} nats/token, the last step's {last:.4f}): "
        f"python -m server --checkpoint {run / 'best'}\n"
    )


def ended_pid() -> int:
    """The pid of a process that has ended, as a killed save's leftover names its writer."""
    command = [sys.executable, "-c", "import os; print(os.getpid())"]
    return int(subprocess.run(command, capture_output=True).stdout)


def test_resume_puts_back_a_checkpoint_a_kill_left_moved_aside_and_spares_live_writers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    assert pretrain.main(tiny_run(tmp_path, "--max-steps", "2", "--out-dir", str(run))) == 0
    # Killed between the two renames of a save replacing step 2 (a signal right after a
    # periodic save saves the same step again): `latest` names a folder moved aside.
    moved = run / f"step-0000002.old-{ended_pid()}"
    (run / "step-0000002").rename(moved)
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) as alive:
        try:
            writing = run / f"step-0000003.tmp-{alive.pid}"  # another live process's save
            writing.mkdir()
            capsys.readouterr()
            assert pretrain.main(["--resume", str(run), "--max-steps", "3"]) == 0
            assert f"put {moved} back as step-0000002" in capsys.readouterr().out
            assert writing.is_dir()
        finally:
            alive.kill()
    assert meta(run)["step"] == 3


def test_a_run_left_without_its_latest_file_resumes_from_its_newest_step(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    flags = tiny_run(tmp_path, "--max-steps", "4", "--save-interval", "2", "--out-dir", str(run))
    assert pretrain.main(flags) == 0
    # As a kill between a run's first checkpoint and its pointer leaves it.
    (run / "latest").unlink()
    capsys.readouterr()
    assert pretrain.main(["--resume", str(run), "--max-steps", "6"]) == 0
    captured = capsys.readouterr()
    assert "has no latest file; resuming from step-0000004" in captured.err
    assert f"resuming {run / 'step-0000004'} at step 4\n" in captured.out
    assert resolve_checkpoint(run).name == "step-0000006"
    (run / "latest").unlink()
    if_missing = tiny_run(tmp_path, "--max-steps", "6", "--out-dir", str(run), "--if-missing")
    assert pretrain.main(if_missing) == 0
    assert "already holds a finished run" in capsys.readouterr().out


def test_short_held_out_documents_also_trained_on_are_left_out_with_a_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A greeting in both jsonl files is common text, not a held-out file trained on: the
    # run goes on, scored on the rest of --val-data.
    def jsonl(path: Path, *texts: str) -> Path:
        path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        return path

    greeting = "Thank you!"
    data = jsonl(tmp_path / "train.jsonl", CORPUS.read_text(), greeting)
    val = jsonl(tmp_path / "val.jsonl", VAL.read_text(), greeting)
    run = tmp_path / "run"
    flags = [*TINY, "--data", str(data), "--val-data", str(val), "--cache-dir", str(tmp_path)]
    flags += ["--eval-tokens", "0", "--max-steps", "2", "--out-dir", str(run)]
    assert pretrain.main(flags) == 0
    assert (
        "warning: --val-data: 1 of its 2 documents are in --data too (the first: 'Thank you!'); "
        "short, so left out of the held-out text\n"
    ) in capsys.readouterr().err
    rest = jsonl(tmp_path / "rest.jsonl", VAL.read_text())
    assert evaluate.main(["--checkpoint", str(run), "--data", str(rest)]) == 0
    bpb = float(capsys.readouterr().out.strip().splitlines()[-1].removeprefix("bpb="))
    assert math.isclose(bpb, meta(run)["val_bpb"], abs_tol=1e-6)
    # Held-out text that is all trained on is refused, short or not: nothing held out
    # would be left to score.
    greeting_only = jsonl(tmp_path / "greeting.jsonl", greeting)
    flags = [*TINY, "--data", str(data), "--val-data", str(greeting_only)]
    flags += ["--cache-dir", str(tmp_path / "cache"), "--out-dir", str(tmp_path / "never")]
    assert pretrain.main([*flags, "--max-steps", "2"]) == 2
    assert capsys.readouterr().err == (
        "error: --val-data: its document is in --data too (the first: 'Thank you!'); "
        "held-out text must not be trained on\n"
    )
    assert not (tmp_path / "never").exists()


def test_evaluate_gives_the_trainers_val_bpb_on_the_same_text(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    flags = ["--val-data", str(VAL), "--eval-tokens", "0", "--max-steps", "5"]
    assert pretrain.main(tiny_run(tmp_path, *flags, "--out-dir", str(run))) == 0
    trainer_bpb = meta(run)["val_bpb"]
    assert (run / "best" / "model.safetensors").is_file()
    capsys.readouterr()
    assert evaluate.main(["--checkpoint", str(run), "--data", str(VAL)]) == 0
    counts, loss_line, last_line = capsys.readouterr().out.strip().splitlines()[-3:]
    assert last_line.startswith("bpb=")
    assert math.isclose(float(last_line.removeprefix("bpb=")), trainer_bpb, abs_tol=1e-6)
    # bpb is total nats over every UTF-8 byte of the text, in bits.
    fields = dict(item.split("=", 1) for item in counts.split())
    tokens, text_bytes = int(fields["tokens"]), int(fields["bytes"])
    assert text_bytes == len(VAL.read_bytes())
    nats_per_token = float(loss_line.removeprefix("loss=").removesuffix(" nats/token"))
    bits = nats_per_token * tokens / math.log(2)
    assert math.isclose(trainer_bpb, bits / text_bytes, rel_tol=1e-5)


def eval_records(run: Path) -> list[int]:
    """The steps of the run's eval records, in order, repeats kept."""
    lines = (run / "log.jsonl").read_text(encoding="utf-8").splitlines()
    return [r["step"] for r in map(json.loads, lines) if r["kind"] == "eval"]


def test_a_run_whose_last_step_was_evaluated_does_not_evaluate_it_again(tmp_path: Path) -> None:
    run = tmp_path / "run"
    flags = ["--max-steps", "4", "--eval-interval", "2", "--out-dir", str(run)]
    assert pretrain.main(tiny_run(tmp_path, *flags)) == 0
    assert eval_records(run) == [2, 4]
    flags = ["--max-steps", "5", "--eval-interval", "2", "--out-dir", str(tmp_path / "odd")]
    assert pretrain.main(tiny_run(tmp_path, *flags)) == 0
    assert eval_records(tmp_path / "odd") == [2, 4, 5]  # the run's end is evaluated


def test_eval_tokens_scores_that_many_held_out_tokens(tmp_path: Path) -> None:
    # --eval-tokens N: N predictions, from the first N + 1 tokens of the validation split.
    run = tmp_path / "run"
    flags = ["--max-steps", "2", "--eval-tokens", "100", "--out-dir", str(run)]
    assert pretrain.main(tiny_run(tmp_path, *flags)) == 0
    info, checkpoint = meta(run), resolve_checkpoint(run)
    val = np.fromfile(Path(info["data"]["cache"]) / "val.bin", dtype=np.uint16)
    result = evaluate_stream(
        load_model(checkpoint),
        val[:101],
        token_byte_lengths(load_tokenizer(checkpoint)),
        block_size=info["args"]["block_size"],
        device=torch.device("cpu"),
    )
    assert result.tokens == 100
    assert math.isclose(result.loss, info["val_loss"], rel_tol=1e-5)


def test_tensorboard_holds_every_number_of_the_jsonl_log(tmp_path: Path) -> None:
    run = tmp_path / "run"
    flags = ["--max-steps", "4", "--log-interval", "1", "--eval-interval", "2"]
    assert pretrain.main(tiny_run(tmp_path, *flags, "--out-dir", str(run))) == 0
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    for kind, expected in (("train", {"loss"}), ("eval", {"val_loss", "val_bpb"})):
        records = read_log(run, kind)
        keys = {key for record in records.values() for key in record} - {"kind", "step"}
        assert expected <= keys
        for key in keys:
            scalars = {e.step: e.value for e in events.Scalars(f"{kind}/{key}")}
            for step, record in records.items():
                assert math.isclose(scalars[step], record[key], rel_tol=1e-6), (kind, key, step)


def test_a_resumed_runs_tensorboard_keeps_the_steps_up_to_its_checkpoint_and_hides_the_rest(
    tmp_path: Path,
) -> None:
    # Taken back to step 2 of 4: TensorBoard shows each step once, as log.jsonl does: the
    # steps to the checkpoint (its own included) kept, the later ones trained again.
    run = tmp_path / "run"
    flags = ["--log-interval", "1", "--save-interval", "2", "--keep-last", "5"]
    assert pretrain.main(tiny_run(tmp_path, *flags, "--max-steps", "4", "--out-dir", str(run))) == 0
    assert pretrain.main(["--resume", str(run / "step-0000002"), "--max-steps", "4"]) == 0
    assert tensorboard_steps(run) == sorted(read_log(run, "train")) == [1, 2, 3, 4]


def test_a_resumed_run_saves_at_its_save_interval_and_end_not_at_its_first_evaluation(
    tmp_path: Path,
) -> None:
    # A run's first evaluation saves its step where the run folder holds no checkpoint
    # yet (best/ must not come first); a resumed run's folder holds the one it goes on from.
    run = tmp_path / "run"
    flags = ["--eval-interval", "3", "--save-interval", "100", "--keep-last", "5"]
    assert pretrain.main(tiny_run(tmp_path, *flags, "--max-steps", "2", "--out-dir", str(run))) == 0
    assert pretrain.main(["--resume", str(run), "--max-steps", "4"]) == 0
    assert sorted(read_log(run, "eval")) == [2, 3, 4]
    assert [p.name for p in step_folders(run)] == ["step-0000002", "step-0000004"]


def _bad_inputs(tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "short.txt").write_text("Too short to fill a batch.\n")
    (tmp_path / "not_a_checkpoint").mkdir()
    (tmp_path / "a_file").write_text("not a folder\n")
    (tmp_path / "unmounted").symlink_to(tmp_path / "drive")
    (tmp_path / "looped").symlink_to("looped")
    texts = tmp_path / "texts"
    texts.mkdir()
    shutil.copy(CORPUS, texts)
    held_out = tmp_path / "held_out"
    held_out.mkdir()
    shutil.copy(CORPUS, held_out)
    (held_out / "new.txt").write_text("A paragraph the model was never trained on.\n")
    # The last lines of the training file, cut off into a file of their own.
    (tmp_path / "tail.txt").write_text(CORPUS.read_text()[-1000:])
    return {
        # Its checkpoints would be read as text by the next command, which refuses them.
        "out-dir the text folder": (
            ["--data", str(texts), "--out-dir", f"{texts}/"],
            f"--out-dir {texts}/ is the --data folder itself: its checkpoints would be read",
        ),
        # The held-out text's folder too: the next command would read the run as text.
        "out-dir the held-out text folder": (
            ["--data", str(CORPUS), "--val-data", str(held_out), "--out-dir", str(held_out)],
            f"--out-dir {held_out} is the --val-data folder itself: its checkpoints would be",
        ),
        # A text file is no folder: "is the --data folder itself" named it as one.
        "out-dir the text file": (
            ["--data", str(CORPUS), "--out-dir", str(CORPUS)],
            f"--out-dir {CORPUS}: {CORPUS} is not a folder",
        ),
        "missing path": (["--data", str(tmp_path / "nope.txt")], "nope.txt: no such file"),
        "empty corpus": (["--data", str(tmp_path / "empty.txt")], "the corpus is empty"),
        "smaller than one batch": (["--data", str(tmp_path / "short.txt")], "too small"),
        "unknown preset": (["--preset", "huge"], "--preset: choose one of"),
        "resume a non-checkpoint": (
            ["--resume", str(tmp_path / "not_a_checkpoint")],
            "--resume: ",
        ),
        "fine-tune a non-checkpoint": (
            ["--init-from", str(tmp_path / "not_a_checkpoint")],
            "--init-from: ",
        ),
        "negative lr": (["--lr", "-1"], "--lr: must be > 0"),
        "unknown schedule": (["--lr-schedule", "linear"], "--lr-schedule: choose one of"),
        "no cooldown": (["--cooldown-fraction", "0"], "--cooldown-fraction: must be in (0, 1]"),
        "non-integer steps": (["--max-steps", "many"], "--max-steps: invalid value 'many'"),
        "unknown flag": (["--bogus"], "unrecognized arguments: --bogus"),
        "flag cut short": (["--max-step", "3"], "unrecognized arguments: --max-step 3"),
        # An empty path is the working folder: a run among the user's files, or every
        # file under it read as text.
        "empty out-dir": (["--out-dir", ""], "--out-dir: must name a folder (got '')"),
        "empty data path": (["--data", str(CORPUS), ""], "--data: a path is empty"),
        # Both found before the text is tokenized (the test sees no cache folder).
        "out-dir a file": (["--out-dir", str(tmp_path / "a_file" / "run")], "is not a folder"),
        "out-dir on a drive not mounted": (
            ["--out-dir", str(tmp_path / "unmounted" / "run")],
            f"{tmp_path / 'unmounted'} links to {tmp_path / 'drive'}, which does not exist",
        ),
        "data through a looping link": (
            ["--data", str(tmp_path / "looped")],
            f"{tmp_path / 'looped'}: links to looped, a loop of links that never reaches",
        ),
        "out-dir through a looping link": (
            ["--out-dir", str(tmp_path / "looped" / "run")],
            f"{tmp_path / 'looped'} links to looped, a loop of links that never reaches",
        ),
        "out-dir where no folder can be made": (
            ["--out-dir", "/proc/pocketgpt-run"],
            "cannot create a folder in /proc (",
        ),
        "impossible shape": (
            ["--n-heads", "3"],
            "the model shape (--preset tiny with --n-heads 3): dim 128 is not divisible by "
            "n_heads 3; n_heads 3 is not a multiple of n_kv_heads 2",
        ),
        "held-out text also trained on": (
            ["--data", str(DATA), "--val-data", str(VAL)],
            "--val-data: its document is in --data too",
        ),
        "held-out text partly trained on": (
            ["--data", str(CORPUS), "--val-data", str(held_out)],
            # Its first 60 characters, as Python writes the string.
            f"--val-data: 1 of its 2 documents are in --data too (the first: "
            f"{CORPUS.read_text()[:60] + '...'!r}); held-out text must not be trained on\n",
        ),
        "held-out text cut from a training file": (
            ["--data", str(CORPUS), "--val-data", str(tmp_path / "tail.txt")],
            "--val-data: its document is in --data too",
        ),
        "held-out text all trained on": (
            ["--data", str(held_out), "--val-data", str(held_out)],
            "--val-data: all 2 of its documents are in --data too",
        ),
        "tokenizer and vocabulary": (["--tokenizer", str(tmp_path / "t.json")], "drop one"),
        "held-out text and fraction": (
            ["--val-data", str(VAL), "--val-fraction", "0.2"],
            "--val-fraction: --val-data is the held-out text; drop one",
        ),
        # Python's exists() and is_file() raise on a name past the file system's 255 bytes.
        "data path too long": (["--data", str(tmp_path / ("a" * 300))], "a" * 300),
        "out-dir too long": (["--out-dir", str(tmp_path / ("o" * 300))], "o" * 300),
        "held-out text without text": (
            ["--data", str(CORPUS), "--val-data", str(tmp_path / "empty.txt")],
            f"--val-data: {tmp_path / 'empty.txt'}: the corpus is empty",
        ),
        # The shell's $'r\xe9sum\xe9': TensorBoard's writer failed on it after tokenizing.
        "out-dir name not UTF-8": (
            ["--out-dir", os.fsdecode(os.fsencode(tmp_path / "out") + b"-r\xe9sum\xe9")],
            f"--out-dir {tmp_path / 'out'}-r\\xe9sum\\xe9: the name is not valid UTF-8",
        ),
    }


def test_each_bad_input_prints_one_line_and_exits_2_writing_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_dir, cache = tmp_path / "out", tmp_path / "cache"
    for case, (flags, message) in _bad_inputs(tmp_path).items():
        settings = [*TINY, "--out-dir", str(out_dir), "--cache-dir", str(cache), *flags]
        assert pretrain.main(settings) == 2, case
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: "), (case, err)
        assert message in err, (case, err)
        assert not out_dir.exists() and not cache.exists(), case


@pytest.mark.parametrize("given", ["environment", "config file"])
def test_a_shape_that_cannot_be_names_the_settings_as_the_user_gave_them(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    given: str,
) -> None:
    # Every other bad value is named as given (POCKETGPT_N_KV_HEADS: must be >= 1); the
    # shape's rules named `--n-heads 3`, a flag not on the command line to look for.
    out_dir, cache = tmp_path / "out", tmp_path / "cache"
    settings = [*TINY, "--out-dir", str(out_dir), "--cache-dir", str(cache)]
    if given == "environment":
        monkeypatch.setenv("POCKETGPT_N_HEADS", "3")
        named = "POCKETGPT_N_HEADS 3"
    else:
        config = tmp_path / "shape.json"
        config.write_text(json.dumps({"n-heads": 3}), encoding="utf-8")
        settings += ["--config", str(config)]
        named = f"--config {config}: n-heads 3"
    assert pretrain.main(settings) == 2
    assert capsys.readouterr().err == (
        f"error: the model shape (--preset tiny with {named}): dim 128 is not divisible by "
        "n_heads 3; n_heads 3 is not a multiple of n_kv_heads 2\n"
    )
    assert not out_dir.exists() and not cache.exists()


@pytest.mark.parametrize("flag", ["--init-from", "--tokenizer", "--resume", "--cache-dir"])
def test_an_empty_path_on_the_command_line_exits_2_instead_of_training_anew(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flag: str
) -> None:
    # `--init-from "$BASE"` with BASE unset trained a new model from scratch, not the
    # fine-tune asked for (an empty POCKETGPT_INIT_FROM stays unset: Docker passes one).
    out_dir = tmp_path / "out"
    flags = tiny_run(tmp_path, "--max-steps", "1", "--out-dir", str(out_dir), flag, "")
    assert pretrain.main(flags) == 2
    assert capsys.readouterr().err == f"error: {flag}: a path is empty (got '')\n"
    assert not out_dir.exists() and not (tmp_path / "cache").exists()


@pytest.mark.parametrize("weights", ["missing", "pickled"])
def test_a_fine_tune_from_weights_it_cannot_read_is_refused_before_the_text_is_read(
    tmp_path: Path, tiny_checkpoint: Path, capsys: pytest.CaptureFixture[str], weights: str
) -> None:
    # They were loaded only once the text was read, tokenized and cached (minutes).
    start = tmp_path / "start"
    shutil.copytree(tiny_checkpoint, start)
    (start / "model.safetensors").unlink()
    if weights == "pickled":  # never unpickled: named for what it is
        (start / "pytorch_model.bin").write_bytes(b"a pickle")
    run, cache = tmp_path / "run", tmp_path / "cache"
    flags = ["--init-from", str(start), "--data", str(CORPUS), "--max-steps", "1"]
    assert pretrain.main([*flags, "--out-dir", str(run), "--cache-dir", str(cache)]) == 2
    said = {
        "missing": f"error: {start / 'model.safetensors'}: missing",
        "pickled": f"error: {start}: PyTorch .bin weights are not read (a pickle can run code)",
    }[weights]
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(said), err
    assert not run.exists() and not cache.exists()


def test_a_fine_tune_from_a_context_whose_rope_tables_outgrow_memory_is_refused_naming_it(
    tmp_path: Path, tiny_checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A hand-edited max_position_embeddings (2**40): evaluate (load_model) refuses it
    # naming the field, but a fine-tune built its 4 TiB of RoPE tables after tokenizing
    # the text and exited 1 with "out of memory ... lower --batch-size or --block-size".
    start = tmp_path / "start"
    shutil.copytree(tiny_checkpoint, start)
    config = json.loads((start / "config.json").read_text(encoding="utf-8"))
    config["max_position_embeddings"] = 2**40
    (start / "config.json").write_text(json.dumps(config), encoding="utf-8")
    run, cache = tmp_path / "run", tmp_path / "cache"
    flags = ["--init-from", str(start), "--data", str(CORPUS), "--block-size", "32"]
    flags += ["--max-steps", "1", "--out-dir", str(run), "--cache-dir", str(cache)]
    assert pretrain.main(flags) == 2
    err = capsys.readouterr().err
    said = f"error: {start / 'config.json'}: max_position_embeddings 1,099,511,627,776 needs "
    assert err.count("\n") == 1 and err.startswith(said), err
    assert not run.exists() and not cache.exists()


def test_a_model_too_large_for_memory_exits_2_with_one_line_before_reading_the_text(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Linux lets such a model be allocated and kills the process (exit 137, no word) once
    # its pages are touched. 2**20 wide x 4 layers: 13T parameters, 144 TiB of state.
    run, cache = tmp_path / "run", tmp_path / "cache"
    wide = ["--dim", str(2**20), "--max-steps", "4", "--out-dir", str(run)]
    assert pretrain.main(tiny_run(tmp_path, *wide)) == 2
    err = capsys.readouterr().err
    assert re.fullmatch(
        r"error: the model \(13.2T parameters: dim 1048576, 4 layers\) needs at least "
        r"144.06 TiB of memory for its weights, gradients and muon state, and at most "
        r"[\d,.]+ [KMGT]iB is available: train a smaller model \(--preset, --dim, --n-layers\)\n",
        err,
    ), err
    assert not run.exists() and not cache.exists()


def test_a_failed_allocation_is_read_for_its_size() -> None:
    # What main() says when the activations outgrow memory: "an allocation of ... failed".
    with pytest.raises(RuntimeError) as failed:
        torch.empty(2**62, dtype=torch.uint8)  # more than any address space holds
    assert pretrain.torch_out_of_memory(failed.value) == "4,096.00 PiB"
    assert pretrain.torch_out_of_memory(RuntimeError("shape mismatch")) is None


def test_bad_input_from_the_command_line_exits_2_without_traceback(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "training.pretrain", "--data", str(tmp_path / "missing")],
        cwd=tmp_path,
        env=python_env() | {"POCKETGPT_BATCH_SIZE": "0"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    # The environment is read too: its bad value is the first problem found, named by
    # the variable the user set.
    assert done.stderr == "error: POCKETGPT_BATCH_SIZE: must be >= 1 (got 0)\n"
    assert not (tmp_path / "checkpoints").exists()


def test_cuda_without_cuda_exits_2_naming_the_setting_as_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # any machine is CPU-only
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["--checkpoint", str(tmp_path), "--data", str(VAL), "--device", "cuda"])
    assert exit_info.value.code == 2
    assert (
        capsys.readouterr()
        .err.splitlines()[-1]
        .endswith("error: --device cuda: CUDA is not available on this machine")
    )
    # The trainer too, naming the setting as it was given (Docker sets the variable).
    monkeypatch.setenv("POCKETGPT_DEVICE", "cuda")
    assert pretrain.main(tiny_run(tmp_path, "--out-dir", str(tmp_path / "run"))) == 2
    assert capsys.readouterr().err == (
        "error: POCKETGPT_DEVICE cuda: CUDA is not available on this machine\n"
    )
    assert not (tmp_path / "run").exists()


def test_accumulated_micro_batches_give_the_loss_and_gradient_of_their_whole_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 2 micro-batches of 2 rows draw the rows one batch of 4 does: the logged loss is
    # their mean (an untrained model's ~ln V, not twice it), and the gradient clipped is
    # the whole batch's (so --grad-clip means the same at any --grad-accum).
    norms = []
    clip = torch.nn.utils.clip_grad_norm_

    def recording(*args: object, **kwargs: object) -> torch.Tensor:
        norms.append(float(clip(*args, **kwargs)))
        return torch.tensor(norms[-1])

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", recording)
    fp32 = ["--optimizer", "adamw", "--dtype", "float32", "--no-compile", "--log-interval", "1"]
    for accum, batch in (("1", "4"), ("2", "2")):
        run = tmp_path / f"accum{accum}"
        argv = tiny_run(tmp_path, *fp32, "--max-steps", "1", "--grad-accum", accum)
        assert pretrain.main([*argv, "--batch-size", batch, "--out-dir", str(run)]) == 0
        vocab = json.loads((resolve_checkpoint(run) / "config.json").read_text())["vocab_size"]
        assert abs(read_log(run, "train")[1]["loss"] - math.log(vocab)) < 0.5
    assert norms[0] == pytest.approx(norms[1], rel=1e-4)


def test_grad_clip_bounds_the_total_gradient_norm_at_every_optimizer_step(tmp_path: Path) -> None:
    # Observed as the optimizer is about to step: the gradient it is given, all its
    # parameters' together, is clipped to --grad-clip (an untrained model's is far above).
    norms: list[float] = []

    def before_step(optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))

    handle = register_optimizer_step_pre_hook(before_step)
    try:
        flags = ["--optimizer", "adamw", "--dtype", "float32", "--no-compile"]
        flags += ["--grad-clip", "0.01", "--max-steps", "3", "--out-dir", str(tmp_path / "run")]
        assert pretrain.main(tiny_run(tmp_path, *flags)) == 0
    finally:
        handle.remove()
    assert len(norms) == 3
    assert all(norm <= 0.01 * (1 + 1e-5) for norm in norms), norms


def test_a_resumed_run_keeps_counting_its_training_time(tmp_path: Path) -> None:
    # What --max-time and the schedule's cooldown read: a resume must not restart the clock.
    run = tmp_path / "run"
    assert pretrain.main(tiny_run(tmp_path, "--max-steps", "2", "--out-dir", str(run))) == 0
    state_path = resolve_checkpoint(run) / "training_state.pt"
    state = torch.load(state_path, weights_only=True)
    # Saved as the checkpoint's wall time, which the steps and evaluation took.
    assert state["elapsed"] == pytest.approx(meta(run)["wall_time"], abs=0.1)
    assert state["elapsed"] > 0  # two steps can take under 0.1 s
    state["elapsed"] = 1000.0
    torch.save(state, state_path)
    assert pretrain.main(["--resume", str(run), "--max-steps", "3"]) == 0
    assert meta(run)["step"] == 3 and meta(run)["wall_time"] >= 1000.0


def test_best_holds_the_lowest_validation_loss_when_later_ones_are_higher(tmp_path: Path) -> None:
    # A learning rate far too high makes the held-out loss climb after the first step:
    # best/ must stay at the lowest (what it is for: a run that overfits past it).
    run = tmp_path / "run"
    unstable = ["--optimizer", "adamw", "--dtype", "float32", "--lr", "0.1", "--warmup-steps", "1"]
    argv = tiny_run(tmp_path, *unstable, "--val-data", str(VAL), "--max-steps", "5")
    assert pretrain.main([*argv, "--eval-interval", "1", "--out-dir", str(run)]) == 0
    evals = {step: record["val_loss"] for step, record in read_log(run, "eval").items()}
    lowest = min(evals, key=evals.__getitem__)
    assert lowest != max(evals), evals  # the last evaluation is not the best
    best = json.loads((run / "best" / "trainer_meta.json").read_text())
    assert (best["step"], best["val_loss"]) == (lowest, evals[lowest])


def test_best_is_replaced_by_a_lower_validation_loss_only_not_an_equal_one(tmp_path: Path) -> None:
    # A learning rate too small to move the weights scores step 2 as step 1: best/ keeps
    # the earlier step (the one the score was first reached at), as trainer.py says only
    # a lower loss replaces it.
    run = tmp_path / "run"
    flags = ["--optimizer", "adamw", "--dtype", "float32", "--warmup-steps", "0", "--lr", "1e-30"]
    argv = tiny_run(tmp_path, *flags, "--eval-interval", "1", "--max-steps", "2")
    assert pretrain.main([*argv, "--out-dir", str(run)]) == 0
    evals = read_log(run, "eval")
    assert evals[1]["val_loss"] == evals[2]["val_loss"]
    assert json.loads((run / "best" / "trainer_meta.json").read_text())["step"] == 1


# Runs training.pretrain with each rank's first dropout mask written to mask-<rank>.pt
# beside this script (a module hook observes; the trainer runs as it is).
DROPOUT_OBSERVER = """
import os, runpy, sys, torch
def observe(module, inputs, output):
    if isinstance(module, torch.nn.Dropout) and module.training and not os.path.exists(path):
        torch.save((output == 0) & (inputs[0] != 0), path)
path = os.path.join(os.path.dirname(__file__), f"mask-{os.environ['RANK']}.pt")
torch.nn.modules.module.register_module_forward_hook(observe)
sys.argv = ["training.pretrain", *sys.argv[1:]]
runpy.run_module("training.pretrain", run_name="__main__")
"""


def test_under_torchrun_each_rank_draws_its_own_dropout_masks(tmp_path: Path) -> None:
    # Every rank is seeded alike for the weights; dropping the same units on every rank
    # would average one dropout noise over the ranks instead of independent ones.
    script = tmp_path / "observe.py"
    script.write_text(DROPOUT_OBSERVER, encoding="utf-8")
    args = tiny_run(tmp_path, "--max-steps", "1", "--dropout", "0.3", "--dtype", "float32")
    alone = tmp_path / "alone"
    assert pretrain.main([*args, "--out-dir", str(alone)]) == 0
    for run in (
        [*args, "--out-dir", str(tmp_path / "run")],  # a new run
        ["--resume", str(alone), "--max-steps", "2"],  # one process's state: no rank's own
    ):
        done, _ = torchrun_ranks(tmp_path, run, (str(script),))
        assert done.returncode == 0, done.stderr[-3000:]
        masks = [torch.load(p, weights_only=True) for p in sorted(tmp_path.glob("mask-*.pt"))]
        assert len(masks) == 2 and all(0.2 < mask.float().mean() < 0.4 for mask in masks)
        assert not torch.equal(masks[0], masks[1])
        for path in tmp_path.glob("mask-*.pt"):
            path.unlink()


def test_a_two_rank_run_resumed_on_two_ranks_goes_on_with_each_ranks_own_batches(
    tmp_path: Path,
) -> None:
    common = ["--log-interval", "1", "--save-interval", "100", "--dtype", "float32"]
    # Dropout on: each rank's own dropout generator is restored too.
    common += ["--decay-steps", "4", "--dropout", "0.3"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    for logs, args in (
        ("a", tiny_run(tmp_path, *common, "--max-steps", "4", "--out-dir", str(straight))),
        ("b", tiny_run(tmp_path, *common, "--max-steps", "2", "--out-dir", str(split))),
        ("c", ["--resume", str(split), "--max-steps", "4"]),
    ):
        (tmp_path / logs).mkdir()
        done, _ = torchrun_ranks(tmp_path / logs, args)
        assert done.returncode == 0, done.stderr[-3000:]
    expected, resumed = read_log(straight, "train"), read_log(split, "train")
    assert sorted(resumed) == [1, 2, 3, 4]
    losses = [resumed[step]["loss"] for step in (3, 4)]
    assert losses == pytest.approx([expected[step]["loss"] for step in (3, 4)], rel=1e-6)


def test_resuming_a_run_that_spent_its_max_time_does_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    argv = [*tiny_run(tmp_path, *LONG_RUN), "--log-interval", "1000", "--max-time", "1"]
    assert pretrain.main([*argv, "--out-dir", str(run)]) == 0
    saved = meta(run)
    assert saved["stopped_by"] == "max_time"
    capsys.readouterr()
    assert pretrain.main(["--resume", str(run)]) == 0
    assert capsys.readouterr().out == (
        f"{run}: the run has trained {saved['wall_time']:.0f} s, at or past --max-time 1; "
        "nothing to do (raise it to train on)\n"
    )
    assert meta(run) == saved


def test_resuming_best_which_holds_no_training_state_is_refused_before_tokenizing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    assert pretrain.main(tiny_run(tmp_path, "--max-steps", "2", "--out-dir", str(run))) == 0
    best = run / "best"
    assert (best / "trainer_meta.json").is_file()  # a model with its meta, no optimizer state
    shutil.rmtree(tmp_path / "cache")
    capsys.readouterr()
    assert pretrain.main(["--resume", str(best), "--max-steps", "4"]) == 2
    captured = capsys.readouterr()
    assert captured.err == (
        f"error: --resume {best}: {best} has no training_state.pt; not a trainer checkpoint "
        "(a model folder such as best/ can be fine-tuned with --init-from)\n"
    )
    assert "training a" not in captured.out and not (tmp_path / "cache").exists()


def test_a_resume_with_another_block_size_still_warns_of_changed_text(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    corpus, run = tmp_path / "corpus.txt", tmp_path / "run"
    shutil.copy(CORPUS, corpus)
    flags = [*TINY, "--data", str(corpus), "--cache-dir", str(tmp_path / "cache")]
    assert pretrain.main([*flags, "--max-steps", "2", "--out-dir", str(run)]) == 0
    with corpus.open("a", encoding="utf-8") as f:
        f.write("A line added since the run started.\n" * 40)
    capsys.readouterr()
    assert pretrain.main(["--resume", str(run), "--max-steps", "3", "--block-size", "16"]) == 0
    err = capsys.readouterr().err
    assert "warning: --block-size differs from what the run was started with" in err
    assert "warning: the text has changed since step-0000002 was saved (training text: " in err


def test_a_resume_naming_a_step_folder_clears_its_run_folder_first(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The run folder is the step folder's parent: what a killed save left there is
    # cleared (and the lock taken) there, as for --resume <run folder>.
    run = tmp_path / "run"
    assert pretrain.main(tiny_run(tmp_path, "--max-steps", "2", "--out-dir", str(run))) == 0
    leftover = run / f"best.tmp-{ended_pid()}"
    leftover.mkdir()
    capsys.readouterr()
    assert pretrain.main(["--resume", str(run / "step-0000002"), "--max-steps", "3"]) == 0
    assert f"removed {leftover}: a save killed midway left it" in capsys.readouterr().out
    assert not leftover.exists() and not (run / "step-0000002" / ".trainer.lock").exists()


def test_resume_puts_back_a_best_folder_a_kill_left_moved_aside(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Killed between the two renames of a save replacing best/: best/ is gone, its
    # previous copy is best.old-<pid>. The model kept must not be lost.
    run = tmp_path / "run"
    assert pretrain.main(tiny_run(tmp_path, "--max-steps", "2", "--out-dir", str(run))) == 0
    kept = (run / "best" / "model.safetensors").read_bytes()
    moved = run / f"best.old-{ended_pid()}"
    (run / "best").rename(moved)
    capsys.readouterr()
    # Resumed with its budget spent: nothing to train, but the folder is put right.
    assert pretrain.main(["--resume", str(run)]) == 0
    assert f"put {moved} back as best" in capsys.readouterr().out
    assert (run / "best" / "model.safetensors").read_bytes() == kept and not moved.exists()


def test_patience_counts_the_evaluations_since_the_last_improvement(tmp_path: Path) -> None:
    # A learning rate too small to move the weights scores the same loss again (no
    # improvement); the tiny model's first steps at a working one score lower.
    run = tmp_path / "run"
    still = ["--lr", "1e-30"]
    flags = ["--optimizer", "adamw", "--dtype", "float32", "--warmup-steps", "0"]
    flags += ["--eval-interval", "1", "--patience", "2"]
    argv = tiny_run(tmp_path, *flags, *still, "--max-steps", "2", "--out-dir", str(run))
    assert pretrain.main(argv) == 0  # step 2: one evaluation without improvement
    assert pretrain.main(["--resume", str(run), "--max-steps", "3", "--lr", "3e-3"]) == 0
    evals = read_log(run, "eval")
    assert evals[1]["val_loss"] == evals[2]["val_loss"] > evals[3]["val_loss"]
    # Step 3 improved: one more evaluation without improvement (step 4) is not two.
    assert pretrain.main(["--resume", str(run), "--max-steps", "4", *still]) == 0
    assert read_log(run, "eval")[4]["val_loss"] == evals[3]["val_loss"]
    assert (meta(run)["step"], meta(run)["stopped_by"]) == (4, "max_steps")
    # The second (step 5) is, and stops the run.
    assert pretrain.main(["--resume", str(run), "--max-steps", "6", *still]) == 0
    assert (meta(run)["step"], meta(run)["stopped_by"]) == (5, "early_stopping")


def test_a_resumed_runs_checkpoints_keep_the_first_batch_fingerprints_of_its_step_0(
    tmp_path: Path,
) -> None:
    # Recorded at step 0 only: a resumed run, which never draws step 0's batch, carries
    # the fingerprints its checkpoint saved, as an uninterrupted run's checkpoints do.
    run = tmp_path / "run"
    assert pretrain.main(tiny_run(tmp_path, "--max-steps", "2", "--out-dir", str(run))) == 0
    fingerprints = meta(run)["first_batch_fingerprints"]
    assert len(fingerprints) == 1 and fingerprints[0] > 0
    assert pretrain.main(["--resume", str(run), "--max-steps", "3"]) == 0
    assert (meta(run)["step"], meta(run)["first_batch_fingerprints"]) == (3, fingerprints)
