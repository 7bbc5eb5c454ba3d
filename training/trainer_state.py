"""The trainer state saved beside each checkpoint (`training_state.pt`): every RNG a
training step draws from, as plain tensors, numbers and containers, so that
`torch.load(weights_only=True)` reads it and a crafted file cannot run code."""

from __future__ import annotations

import io
import random
from pathlib import Path

import numpy as np
import torch

from model.checkpoint import CheckpointError

TRAINING_STATE = "training_state.pt"
# Every key Trainer._training_state writes but log_window, evaluation_due,
# last_train_loss and tokens_per_s (states saved before they were kept lack them): a state
# without one is not ours (read_training_state).
STATE_KEYS = (
    "step",
    "tokens_seen",
    "elapsed",
    "best_val_loss",
    "evals_since_best",
    "first_batch_fingerprints",
    "optimizer",
    "rng",
    "data",
)


def rank_seed(seed: int, rank: int, step: int = 0) -> int:
    """The seed of rank `rank`'s torch generators (what dropout draws from) under DDP,
    for a run of `seed` from `step`: independent of every other rank's and of the data
    order's (seed * 1000 + rank)."""
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1, np.uint64)[0])


def torch_rng_state(cuda: bool) -> dict:
    """This process's torch generator states: the CPU's and, with `cuda`, the current
    CUDA device's. What dropout draws from, so each rank has its own (rank_seed)."""
    return {
        "torch": torch.get_rng_state(),
        "cuda": [torch.cuda.get_rng_state()] if cuda else [],
    }


def rng_state(cuda: bool) -> dict:
    """Every RNG a training step may draw from; `cuda`: also the current CUDA device's.

    That device's only: each rank's device generator is its own, kept per rank
    (`torch_rng_state`), so a state per visible device is not needed, and did not
    restore where fewer are visible.
    """
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    return {
        **torch_rng_state(cuda),
        "numpy": {
            "kind": np_kind,
            "keys": torch.from_numpy(np_keys.astype(np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "gauss": float(np_gauss),
        },
        "python": {"version": py_version, "state": torch.tensor(py_state), "gauss": py_gauss},
    }


def set_rng_state(state: dict, cuda: bool) -> None:
    torch.set_rng_state(state["torch"])
    if cuda and state["cuda"]:
        # The first: the trainer's device, or in states saved per visible device (runs
        # before this format), device 0, which a one-GPU run or rank 0 trained on.
        torch.cuda.set_rng_state(state["cuda"][0])
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"])
    )
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"].tolist()), p["gauss"]))


def save_state(state: dict, path: Path) -> None:
    # Serialised first, then written: a full disk is the write's OSError saying so
    # (ENOSPC), where torch.save writing the file itself says only "[enforce fail at
    # inline_container.cc] unexpected pos". (Costs the state's size in memory, briefly.)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    path.write_bytes(buffer.getbuffer())


def read_training_state(path: Path) -> dict:
    """The trainer state in `path`, read with the weights-only unpickler: plain tensors,
    numbers and containers load; anything that would construct or call an object is
    refused (a crafted file cannot run code) and reported as a CheckpointError."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except Exception as e:  # torch.load raises many types; every one means "unusable file"
        message = str(e).strip()
        if "Weights only load failed" in message:
            what = "not a pocketgpt trainer state"
            reason = "it holds objects other than tensors and plain data"
        else:  # a truncated or overwritten file: a copy cut short, a failing disk
            what = "damaged, or not a pocketgpt trainer state"
            reason = message.splitlines()[0] if message else type(e).__name__
        raise CheckpointError(f"{path}: {what}; refused to load it ({reason})") from None
    missing = [k for k in STATE_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(f"{path}: not a pocketgpt trainer state (missing {missing})")
    return state
