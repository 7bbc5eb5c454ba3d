"""kill -9 of the trainer while it writes checkpoints: `latest` always names a complete,
loadable checkpoint, and --resume continues from it."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from model.checkpoint import LATEST, load_model, resolve_checkpoint
from tests.test_training_pretrain import REPO, python_env, tiny_run
from training import pretrain


def run_until_killed(run: Path, tmp_path: Path, checkpoints_before_kill: int) -> None:
    """Train with a checkpoint every step; SIGKILL once `latest` has moved N times."""
    args = tiny_run(tmp_path, "--max-steps", "100000", "--no-compile", "--save-interval", "1")
    args += ["--keep-last", "2"]
    process = subprocess.Popen(
        [sys.executable, "-m", "training.pretrain", *args, "--out-dir", str(run)],
        cwd=REPO,
        env=python_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
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


@pytest.mark.parametrize("checkpoints_before_kill", [2, 3, 5])
def test_latest_survives_kill_9_and_resume_continues(
    tmp_path: Path, checkpoints_before_kill: int
) -> None:
    run = tmp_path / "run"
    run_until_killed(run, tmp_path, checkpoints_before_kill)

    folder = resolve_checkpoint(run)
    model = load_model(folder)  # complete: config, weights (size-checked), tokenizer
    assert all(torch.isfinite(p).all() for p in model.parameters())
    state = torch.load(folder / "training_state.pt", map_location="cpu", weights_only=True)
    step = state["step"]
    assert folder.name == f"step-{step:07d}"

    assert pretrain.main(["--resume", str(run), "--max-steps", str(step + 2)]) == 0
    assert resolve_checkpoint(run).name == f"step-{step + 2:07d}"
