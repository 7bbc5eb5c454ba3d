"""Model hyper-parameters and named presets.

A `ModelConfig` fully describes the network's shapes. Presets follow gpt-fast's
`ModelArgs.from_name`: `ModelConfig.from_preset("small")`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 4096
    dim: int = 384
    n_layers: int = 6
    n_heads: int = 6
    n_kv_heads: int | None = None  # None = n_heads (no grouped-query attention)
    ffn_dim: int = 1024  # hidden width of the SwiGLU MLP
    max_seq_len: int = 512  # longest context the RoPE table and KV cache are sized for
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    dropout: float = 0.0  # residual + attention dropout, training only
    tie_embeddings: bool = True  # LM head shares the token-embedding matrix

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        problems = []
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "ffn_dim", "max_seq_len"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1 (got {getattr(self, name)})")
        if self.n_heads >= 1:  # else refused above, with no head width to check
            if self.dim % self.n_heads:
                problems.append(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
            elif self.head_dim % 2:
                problems.append(f"head_dim {self.head_dim} must be even for RoPE")
        if self.n_kv_heads < 1 or self.n_heads % self.n_kv_heads:
            problems.append(
                f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}"
            )
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout must be in [0, 1) (got {self.dropout})")
        # 0 or less (or NaN) makes every logit NaN (norm_eps) or the rotation undefined.
        for name in ("rope_theta", "norm_eps"):
            if not 0.0 < getattr(self, name) < math.inf:
                problems.append(f"{name} must be a positive number (got {getattr(self, name)})")
        if problems:
            raise ValueError("invalid ModelConfig: " + "; ".join(problems))

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @classmethod
    def from_preset(cls, name: str, **overrides: object) -> ModelConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        preset = PRESETS[name]
        if (
            "n_heads" in overrides
            and "n_kv_heads" not in overrides
            and preset.n_kv_heads == preset.n_heads
        ):
            # A preset without grouped-query attention (small, base) stays without it:
            # its n_kv_heads, resolved to its own n_heads, refused `--n-heads 4` on small
            # ("not a multiple of n_kv_heads 6") and made `--n-heads 12` GQA unasked.
            overrides = {**overrides, "n_kv_heads": None}
        return dataclasses.replace(preset, **overrides)

    def replace(self, **changes: object) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def num_parameters(self) -> int:
        """Trainable parameters; the tied LM head is counted once."""
        kv_dim = self.n_kv_heads * self.head_dim
        attention = self.dim * self.dim * 2 + self.dim * kv_dim * 2  # q, o + k, v
        mlp = 3 * self.dim * self.ffn_dim  # gate, up, down
        per_layer = attention + mlp + 2 * self.dim  # + two RMSNorm weights
        embeddings = self.vocab_size * self.dim * (1 if self.tie_embeddings else 2)
        return embeddings + self.n_layers * per_layer + self.dim  # + final norm


# The least context a served model needs: a prompt's token (the end-of-text an empty one
# starts after) and one generated. The trainer refuses a shorter --block-size, the
# server a shorter context.
MIN_SERVED_CONTEXT = 2

PRESETS: dict[str, ModelConfig] = {
    # ~1.3M at vocab 4096; GQA on so the tests cover it.
    "tiny": ModelConfig(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=384, max_seq_len=256),
    # ~3.4M at vocab 512: what a CPU with bf16 hardware (AMX) trains best in a minute.
    # Untied: its input embedding then learns at a higher rate than the LM head.
    "mini": ModelConfig(
        dim=256,
        n_layers=4,
        n_heads=4,
        n_kv_heads=2,
        ffn_dim=768,
        max_seq_len=512,
        tie_embeddings=False,
    ),
    # ~12.2M: the default, trains on 2 CPU cores in minutes.
    "small": ModelConfig(dim=384, n_layers=6, n_heads=6, ffn_dim=1024, max_seq_len=512),
    # ~116M at vocab 4096 (GPT-2 small scale: 768 wide, 12 layers, 12 heads); for a GPU.
    "base": ModelConfig(dim=768, n_layers=12, n_heads=12, ffn_dim=3072, max_seq_len=1024),
}
