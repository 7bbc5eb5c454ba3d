"""The optimizer a training run steps: Muon + AdamW (the default), or AdamW alone.

Muon is the default on every device. CPU, 70 s on tinyshakespeare, held-out bits/byte:
AMX `mini` 2.24 vs AdamW 2.27, AVX512-BF16 `tiny` 2.21 vs 2.31, fp32 `tiny` 2.28 vs
2.34. H200, `small`, end-of-run val bits/byte, Muon at ~5 passes (the zero-argument
cap) vs AdamW at 12-17 passes (its best): embedded corpus 1.32-1.49 (6.2 and 4.1 passes)
vs 1.42, tinyshakespeare 1.91 vs 1.89, its first 250 kB 2.14 vs 2.23 (BENCHMARKS.md).

Either way the trainer sees one object with `param_groups` (it sets every group's
lr each step, times the group's `lr_scale` when it has one), `step()`, `zero_grad()`
and a `state_dict()` of plain tensors and numbers, which
`torch.load(weights_only=True)` reads back.
"""

from __future__ import annotations

import torch

from model.cpu import has_fast_bf16
from model.transformer import Transformer
from training.args import TrainArgs
from training.muon import Muon

ADAMW_BETAS = (0.9, 0.95)


class Optimizers:
    """Several optimizers over disjoint parameters, stepped as one."""

    def __init__(self, *optimizers: torch.optim.Optimizer) -> None:
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict]:
        return [group for opt in self.optimizers for group in opt.param_groups]

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()

    def zero_grad(self) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)

    def state_dict(self) -> dict:
        return {"optimizers": [opt.state_dict() for opt in self.optimizers]}

    def load_state_dict(self, state: dict) -> None:
        # Runs saved before Muon existed hold one AdamW state dict, not a list.
        states = state.get("optimizers", [state])
        if len(states) != len(self.optimizers):
            raise ValueError(
                f"the saved state has {len(states)} optimizers, this run {len(self.optimizers)}"
            )
        for opt, saved in zip(self.optimizers, states, strict=True):
            # torch restores each group's settings as saved, but this run's flags set
            # them (`--resume --weight-decay 0.05`, as `--lr` is taken): only the
            # per-parameter state (moments, momentum buffers, step counts) is the run's.
            settings = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
            opt.load_state_dict(saved)
            for group, own in zip(opt.param_groups, settings, strict=True):
                group.update(own)


def make_optimizer(model: Transformer, args: TrainArgs, device: torch.device) -> Optimizers:
    """AdamW (fused) for everything, or Muon for the blocks' matrices and AdamW for the
    embedding, LM head and norm weights. Matrices decay, norms do not; Muon's update is
    scaled to AdamW's RMS, so both take `args.lr` and `args.weight_decay`."""
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    norms = [p for _, p in named if p.dim() < 2]
    if args.optimizer == "muon":
        hidden = [p for name, p in named if p.dim() == 2 and name.startswith("layers.")]
        in_muon = {id(p) for p in hidden}
        matrices = [p for _, p in named if p.dim() >= 2 and id(p) not in in_muon]
    else:
        hidden, matrices = [], [p for _, p in named if p.dim() >= 2]
    # An untied input embedding learns faster than the rest (its rows are updated
    # sparsely, one per token seen); a tied one is also the LM head and keeps `lr`.
    untied = not model.config.tie_embeddings
    embedding = [p for name, p in named if untied and name == "embed_tokens.weight"]
    matrices = [p for p in matrices if all(p is not e for e in embedding)]
    adamw = torch.optim.AdamW(
        [
            {
                "params": embedding,
                "weight_decay": args.weight_decay,
                "lr_scale": args.embedding_lr_scale,
            },
            {"params": matrices, "weight_decay": args.weight_decay},
            {"params": norms, "weight_decay": 0.0},
        ],
        lr=args.lr,
        betas=ADAMW_BETAS,
        eps=1e-8,
        fused=True,
    )
    if not hidden:
        return Optimizers(adamw)
    muon = Muon(
        hidden,
        lr=args.lr,
        weight_decay=args.weight_decay,
        ns_dtype=torch.bfloat16 if device.type == "cuda" or has_fast_bf16() else torch.float32,
    )
    return Optimizers(muon, adamw)
