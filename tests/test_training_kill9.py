"""kill -9 of the trainer while it writes checkpoints: `latest` always names a complete,
loadable checkpoint, and --resume continues from it."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from model.atomic_files import is_temporary
from model.checkpoint import LATEST, load_model, resolve_checkpoint
from tests.test_training_pretrain import REPO, python_env, tiny_run
from training import pretrain


def run_until_killed(run: Path, tmp_path: Path, checkpoints_before_kill: int) -> int:
    """Train with a checkpoint and a log line every step; SIGKILL once `latest` has
    moved N times. Returns the killed process's pid."""
    args = tiny_run(tmp_path, "--max-steps", "100000", "--no-compile", "--save-interval", "1")
    args += ["--keep-last", "2", "--log-interval", "1"]
    # The with-block closes the stderr pipe (read only if the trainer fails early).
    with subprocess.Popen(
        [sys.executable, "-m", "training.pretrain", *args, "--out-dir", str(run)],
        cwd=REPO,
        env=python_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    ) as process:
        try:
            seen: set[str] = set()
            deadline = time.monotonic() + 90
            # Saving dominates each step here, so the kill lands inside a write most times.
            while len(seen) < checkpoints_before_kill:
                assert process.poll() is None, process.communicate()[1]
                assert time.monotonic() < deadline, "the trainer wrote too few checkpoints"
                pointer = run / LATEST
                if pointer.exists():
                    seen.add(pointer.read_text())
                time.sleep(0.002)  # poll interval
            process.send_signal(signal.SIGKILL)
            process.wait(timeout=30)
        finally:
            process.kill()
            process.wait()
    assert process.returncode == -signal.SIGKILL
    return process.pid


def read_log_lines(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("checkpoints_before_kill", [2, 3, 5])
def test_latest_survives_kill_9_and_resume_continues(
    tmp_path: Path, checkpoints_before_kill: int
) -> None:
    run = tmp_path / "run"
    killed = run_until_killed(run, tmp_path, checkpoints_before_kill)

    folder = resolve_checkpoint(run)
    model = load_model(folder)  # complete: config, weights (size-checked), tokenizer
    assert all(torch.isfinite(p).all() for p in model.parameters())
    state = torch.load(folder / "training_state.pt", map_location="cpu", weights_only=True)
    step = state["step"]
    assert folder.name == f"step-{step:07d}"

    # What a kill inside a save leaves, whatever this kill hit: a half-written copy, a
    # pointer file not yet renamed, the log line of a step the checkpoint lacks, and a
    # line cut short.
    shutil.copytree(folder, run / f"step-{step + 1:07d}.tmp-{killed}", dirs_exist_ok=True)
    (run / f"{LATEST}.tmp-{killed}").write_text("step-")
    lost = {"kind": "train", "step": step + 1, "loss": 1.0, "lr": 0.1, "tokens_per_s": 1.0}
    with open(run / "log.jsonl", "a") as log:
        log.write(json.dumps(lost) + '\n{"kind": "tr')

    assert pretrain.main(["--resume", str(run), "--max-steps", str(step + 2)]) == 0
    assert resolve_checkpoint(run).name == f"step-{step + 2:07d}"
    assert not [p.name for p in run.iterdir() if is_temporary(p.name)]
    # The log holds each step once: the records of the steps the kill lost are dropped
    # (those steps were trained again), as is a line it cut short.
    steps = [record["step"] for record in read_log_lines(run) if record["kind"] == "train"]
    assert steps == list(range(1, step + 3))
