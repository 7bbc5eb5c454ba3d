"""Muon: momentum orthogonalised by Newton-Schulz, for the 2-D weights of the blocks.

Keller Jordan's optimizer (github.com/KellerJordan/Muon): keep SGD momentum, then
replace each matrix's update by the nearest semi-orthogonal matrix, approximated by
quintic Newton-Schulz iterations: four, started from an AOL rescaling ("Turbo-Muon",
Boissin et al. 2025, arXiv 2512.04632) where Keller Jordan's five start from the
Frobenius norm. With the update scaled by 0.2 * sqrt(max(m, n))
("Muon is Scalable for LLM Training", Moonshot AI, 2025) its RMS matches AdamW's, so
one learning rate and weight decay serve both optimizers: embeddings, the tied LM
head and norm weights stay with AdamW (Muon is for hidden matrices only).

Why our own rather than `torch.optim.Muon`: that one orthogonalises one matrix at a
time; here matrices of one shape (every layer's q_proj, ...) go through the
iteration as one batched product, which on 2 CPU cores makes the step ~4x cheaper.
State is one momentum tensor per parameter, so `state_dict()` is plain tensors.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable

import torch

FLOAT32_MAX = torch.finfo(torch.float32).max

# Each iteration's quintic a*x + b*x^3 + c*x^5 (applied to the singular values), from
# Turbo-Muon: tuned for a start whose singular values AOL has put in (0, 1].
NS_COEFFICIENTS = (
    (3.9505, -6.3029, 2.6377),
    (3.7418, -5.5913, 2.3037),
    (2.8769, -3.1427, 1.2046),
    (2.8366, -3.0525, 1.2012),
)


def orthogonalize(g: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """~U V^T of each matrix's SVD U S V^T: g [N, m, n] -> [N, m, n] in `dtype`.

    The iterations map the singular values of a gradient-like matrix into roughly
    [0.95, 1.05] (five of Keller Jordan's: [0.7, 1.2]); a spectrum that falls over
    decades keeps its smallest values short of 1, as with five. 4 iterations instead
    of 5 is ~10-20% less time on 2 CPU cores (BENCHMARKS.md).
    """
    x = g.to(dtype)
    tall = g.shape[-2] > g.shape[-1]
    if tall:
        x = x.mT.contiguous()  # iterate on the wide side: [N, min, max]
    for i, (a, b, c) in enumerate(NS_COEFFICIENTS):
        gram = x @ x.mT  # [N, min, min]
        if i == 0:
            # AOL: scale row i by 1/sqrt(sum_j |gram_ij|). That bounds the spectral
            # norm by 1 (as Frobenius normalising does) while leaving the small singular
            # values larger; the rescaled gram is the first iteration's own.
            scale = torch.rsqrt(gram.abs().sum(dim=-1).clamp_min(1e-7))  # [N, min]
            x = x * scale[..., :, None]
            gram = gram * scale[..., :, None] * scale[..., None, :]
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)  # b*A + c*A@A
        x = torch.baddbmm(x, poly, x, beta=a)  # a*X + (b*A + c*A@A) @ X
    return x.mT if tall else x


# 0.9, not Keller Jordan's 0.95: `mini` on tinyshakespeare, 450 steps, 2.154 vs 2.161
# bits/byte held out (0.85: 2.163, 0.8: 2.172).
MOMENTUM = 0.9


class Muon(torch.optim.Optimizer):
    """Nesterov momentum, orthogonalised per matrix, with decoupled weight decay.

    ns_dtype: the precision of the Newton-Schulz products; bfloat16 where the device
    multiplies it natively (CUDA, CPUs with AMX or AVX512-BF16), else float32.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        *,
        lr: float,
        momentum: float = MOMENTUM,
        weight_decay: float = 0.0,
        ns_dtype: torch.dtype = torch.float32,
    ) -> None:
        defaults = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay}
        super().__init__(params, defaults)
        self.ns_dtype = ns_dtype
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() != 2:
                    raise ValueError(f"Muon takes 2-D weights only (got a {tuple(p.shape)} one)")

    @torch.no_grad()
    def step(self, closure: None = None) -> None:
        for group in self.param_groups:
            lr, momentum, decay = group["lr"], group["momentum"], group["weight_decay"]
            by_shape: dict[torch.Size, list[torch.Tensor]] = defaultdict(list)
            for p in group["params"]:
                if p.grad is not None:
                    by_shape[p.shape].append(p)
            for shape, params in by_shape.items():
                # Each Nesterov update is written straight into its row of the stack
                # that is orthogonalised as one batch (no per-matrix temporaries).
                updates = params[0].new_empty((len(params), *shape))
                for p, update in zip(params, updates, strict=True):
                    state = self.state[p]
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = torch.zeros_like(p)
                    buf = state["momentum_buffer"]
                    buf.lerp_(p.grad, 1 - momentum)
                    torch.lerp(p.grad, buf, momentum, out=update)  # Nesterov
                ortho = orthogonalize(updates, self.ns_dtype)
                step_size = lr * 0.2 * math.sqrt(max(shape))  # AdamW-like update RMS
                # add_ takes its alpha as a float32: past the largest, a traceback instead
                # of the infinite weights the trainer reports as a diverged run.
                step_size = min(step_size, FLOAT32_MAX)
                torch._foreach_mul_(params, 1 - lr * decay)
                # add_ reads the ns_dtype update as is (no float32 copy of it).
                torch._foreach_add_(params, ortho.unbind(), alpha=-step_size)
