"""A crafted training_state.pt cannot run code: --resume refuses it with one clear line."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from model.checkpoint import resolve_checkpoint
from tests.test_training_pretrain import tiny_run
from training import pretrain
from training.trainer_state import STATE_KEYS, rank_seed


class RunsCode:
    """Unpickling this calls os.system: what a malicious checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture()
def trained_run(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    assert pretrain.main(tiny_run(tmp_path, "--max-steps", "2", "--out-dir", str(run))) == 0
    return run


def test_a_pickle_that_runs_code_is_refused_and_runs_nothing(
    trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    marker = tmp_path / "code-ran"
    state = resolve_checkpoint(trained_run) / "training_state.pt"
    torch.save({"optimizer": RunsCode(marker)}, state)  # a .pt file like the real one
    capsys.readouterr()
    before = sorted(p.name for p in trained_run.iterdir())

    assert pretrain.main(["--resume", str(trained_run), "--max-steps", "4"]) == 2

    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    # Said plainly: torch's own words advise loading it with weights_only=False.
    reason = "refused to load it (it holds objects other than tensors and plain data)"
    assert f"training_state.pt: not a pocketgpt trainer state; {reason}" in err
    assert not marker.exists()
    assert sorted(p.name for p in trained_run.iterdir()) == before


def test_a_corrupted_training_state_is_a_clear_error(
    trained_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = resolve_checkpoint(trained_run) / "training_state.pt"
    state.write_bytes(state.read_bytes()[:100])
    capsys.readouterr()

    assert pretrain.main(["--resume", str(trained_run), "--max-steps", "4"]) == 2

    err = capsys.readouterr().err
    # A real one, cut short: not said to be something else.
    said = "training_state.pt: damaged, or not a pocketgpt trainer state; refused to load it ("
    assert said in err


def test_a_training_state_missing_an_entry_is_a_clear_error(
    trained_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = resolve_checkpoint(trained_run) / "training_state.pt"
    state = torch.load(path, weights_only=True)
    # Every entry is required but those that states saved before lack.
    optional = {"log_window", "evaluation_due", "last_train_loss", "tokens_per_s"}
    assert set(state) == {*STATE_KEYS, *optional}
    for key in STATE_KEYS:
        torch.save({k: v for k, v in state.items() if k != key}, path)
        capsys.readouterr()
        assert pretrain.main(["--resume", str(trained_run), "--max-steps", "4"]) == 2, key
        err = capsys.readouterr().err
        assert err == f"error: {path}: not a pocketgpt trainer state (missing [{key!r}])\n"
    torch.save({k: v for k, v in state.items() if k not in optional}, path)
    assert pretrain.main(["--resume", str(trained_run), "--max-steps", "4"]) == 0


def test_each_rank_and_each_resumed_step_draws_dropout_from_its_own_seed() -> None:
    # A run resumed at step 100 must not replay the dropout masks it drew from step 0.
    seeds = {rank_seed(1337, rank, step) for rank in (0, 1) for step in (0, 100)}
    assert len(seeds) == 4
