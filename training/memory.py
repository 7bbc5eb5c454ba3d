"""Whether a CPU run fits in memory, asked before it starts.

A model too large for the machine ended with exit 137 and no word, after minutes of
tokenizing (model/memory.py). What a run holds for its whole life is known from its
shape: the weights, their gradients and the optimizer's state. Both sides of the
comparison lean towards running: the activations come on top of what is counted, and
what is available is the most the system may give. It refuses only what cannot run.
"""

from __future__ import annotations

from model.config import ModelConfig
from model.memory import available_memory, format_size

# float32 weights and gradients; AdamW keeps two moments a parameter, Muon one momentum
# (its AdamW groups, the embeddings and norms, two: the lower bound takes one).
_BYTES_PER_PARAMETER = {"adamw": 4 + 4 + 8, "muon": 4 + 4 + 4}


def shortfall(
    config: ModelConfig, optimizer: str, processes: int = 1, continued: bool = False
) -> str | None:
    """Why `processes` CPU runs of `config` cannot fit in this machine's memory, or None
    where they may (or the machine does not say); `continued`: the shape is a
    checkpoint's (--resume, --init-from), not the command line's."""
    available = available_memory()
    parameters = config.num_parameters()
    each = parameters * _BYTES_PER_PARAMETER[optimizer]
    needed = each * processes
    if available is None or needed <= available:
        return None
    ranks = (
        f" in each of {processes} processes ({format_size(needed)} in all)" if processes > 1 else ""
    )
    units = ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K"))
    scale, unit = next(((s, u) for s, u in units if parameters >= s), (1, ""))
    count = f"{parameters / scale:,.1f}{unit}"
    remedy = (
        "run it on a machine with more memory"
        if continued
        else "train a smaller model (--preset, --dim, --n-layers)"
    )
    return (
        f"the model ({count} parameters: dim {config.dim}, {config.n_layers} layers) needs "
        f"at least {format_size(each)} of memory for its weights, gradients and "
        f"{optimizer} state{ranks}, and at most {format_size(available)} is available: "
        f"{remedy}"
    )
