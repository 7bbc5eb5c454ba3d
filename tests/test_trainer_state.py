"""training/trainer_state.py: the RNG states a resumed run draws on, through the file."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from training.trainer_state import rng_state, save_state, set_rng_state


def _draws() -> tuple[float, ...]:
    """A draw from each generator the trainer saves, Gaussians from their caches too."""
    return (
        random.random(),
        random.gauss(0.0, 1.0),
        float(np.random.rand()),
        float(np.random.standard_normal()),
        float(torch.rand(())),
    )


def test_an_rng_state_saved_and_read_back_restores_every_generator(tmp_path: Path) -> None:
    # Each generator mid-way through a pair of Gaussians: Python and NumPy keep the
    # second of a pair for the next draw, and a restore without it draws another.
    random.gauss(0.0, 1.0)
    np.random.standard_normal()
    path = tmp_path / "training_state.pt"
    save_state(rng_state(cuda=False), path)
    expected = _draws()
    random.seed(7)
    np.random.seed(7)
    torch.manual_seed(7)
    set_rng_state(torch.load(path, weights_only=True), cuda=False)
    assert _draws() == expected
