"""Llama-style decoder-only Transformer.

token embedding -> N x [RMSNorm -> causal self-attention (RoPE, optional GQA) -> residual,
RMSNorm -> SwiGLU MLP -> residual] -> RMSNorm -> LM head (tied to the embedding unless
the config unties them).
No biases. Module names mirror Hugging Face's LlamaForCausalLM so the checkpoint is
HF-native: our `layers.0.self_attn.q_proj.weight` is HF's `model.layers.0...`.

The model returns logits only; sampling lives in model/sampling.py and generation
loops in the trainer (previews) and the server's engine.

Shape letters: B batch rows, T tokens per row in this call, L keys attended
(cache length), D model dim, H query heads, K key/value heads, E head dim, V vocab.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from model.config import ModelConfig
from model.kv_cache import KVCache


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 (as HF Llama does) so bf16 inference matches closely.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_tables(config: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin: [max_seq_len, E] in HF's "rotate_half" layout (frequencies repeated twice)."""
    half = config.head_dim // 2
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, half, dtype=torch.float32) / half))
    angles = torch.outer(torch.arange(config.max_seq_len, dtype=torch.float32), inv_freq)
    angles = torch.cat((angles, angles), dim=-1)  # [max_seq_len, E]
    return angles.cos(), angles.sin()


def rope_bytes_per_position(config: ModelConfig) -> int:
    """What rope_tables' cos and sin take for each position (float32 values)."""
    return 2 * config.head_dim * torch.float32.itemsize


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, T, heads, E]; cos/sin: [B, T, 1, E]."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = (
            config.n_heads,
            config.n_kv_heads,
            config.head_dim,
        )
        self.q_proj = nn.Linear(config.dim, config.n_heads * config.head_dim, bias=False)
        self.k_proj = nn.Linear(config.dim, config.n_kv_heads * config.head_dim, bias=False)
        self.v_proj = nn.Linear(config.dim, config.n_kv_heads * config.head_dim, bias=False)
        self.o_proj = nn.Linear(config.n_heads * config.head_dim, config.dim, bias=False)
        self.dropout = config.dropout

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], step: _Step
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)  # [B, T, H, E]
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim)  # [B, T, K, E]
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim)  # [B, T, K, E]
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        q = q.transpose(1, 2)  # [B, H, T, E]
        if step.cache is None:
            k, v = k.transpose(1, 2), v.transpose(1, 2)  # [B, K, T, E]
            mask, causal = step.mask, step.mask is None  # packed: mask [B, 1, T, T]
        else:
            k, v = step.cache.update(step.layer, step.slots(), step.positions, k, v, step.length)
            mask, causal = step.mask, False  # k, v: [B, K, L, E]; mask: [B, 1, T, L]
        dropout = self.dropout if self.training else 0.0
        gqa = self.n_kv_heads != self.n_heads
        if q.device.type == "cpu" and q.dtype != torch.float32:
            # PyTorch's CPU flash attention is 2-4x slower in bf16 than in fp32: training
            # (forward + backward; B16 H4 T128 E32 on 2 Zen 4 cores: 12.4 vs 5.7 ms) and
            # decoding (B32 H6 L120 E64: 1.31 vs 0.67 ms with the casts; B1 L1000: 0.43 vs
            # 0.10), so a reduced-precision CPU model attends in fp32 (with autocast off:
            # it would cast the inputs straight back).
            with torch.autocast("cpu", enabled=False):
                y = F.scaled_dot_product_attention(
                    q.float(),
                    k.float(),
                    v.float(),
                    attn_mask=mask,
                    is_causal=causal,
                    dropout_p=dropout,
                    enable_gqa=gqa,
                ).to(q.dtype)
        else:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=causal, dropout_p=dropout, enable_gqa=gqa
            )  # [B, H, T, E]
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # [B, T, D]
        return self.o_proj(y)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.dim, config.ffn_dim, bias=False)
        self.up_proj = nn.Linear(config.dim, config.ffn_dim, bias=False)
        self.down_proj = nn.Linear(config.ffn_dim, config.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.dim, config.norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.dim, config.norm_eps)
        self.mlp = MLP(config)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], step: _Step
    ) -> torch.Tensor:
        x = x + self.resid_dropout(self.self_attn(self.input_layernorm(x), rope, step))
        return x + self.resid_dropout(self.mlp(self.post_attention_layernorm(x)))


class _Step:
    """What every layer needs to use the cache in one forward; computed once per call."""

    def __init__(
        self,
        cache: KVCache | None,
        slots: torch.Tensor | slice | None,
        positions: torch.Tensor,
        length: int | None,
        packed: bool,
    ) -> None:
        self.cache = cache
        self.positions = positions  # [B, T]
        self.layer = 0
        self.mask: torch.Tensor | None = None
        if cache is None:
            if packed:
                # Each run of positions from 0 is a sequence of its own: a query sees the
                # keys before it in its own run, as if that sequence were the row alone.
                sequence = torch.cumsum(positions == 0, dim=1)  # [B, T]
                T = positions.shape[1]
                causal = torch.ones(T, T, dtype=torch.bool, device=positions.device).tril()
                same = sequence[:, :, None] == sequence[:, None, :]  # [B, T, T]
                self.mask = (same & causal).unsqueeze(1)  # [B, 1, T, T]
            return
        # A slice is kept as its two ints and rebuilt per use: torch.compile would fix a
        # slice stored on an object, or compared with None, to its traced bounds (one
        # build per batch size). Hence also isinstance first.
        self._slot_tensor: torch.Tensor | None = None
        if isinstance(slots, slice):
            self._slot_run = (slots.start, slots.stop)
        elif slots is None:
            self._slot_run = (0, positions.shape[0])
        else:
            self._slot_tensor, self._slot_run = slots, None
        # L: keys needed by the furthest query. Callers that know it pass it, which
        # spares a device sync (and a data-dependent shape under torch.compile).
        self.length = int(positions.max()) + 1 if length is None else length
        keys = torch.arange(self.length, device=positions.device)  # [L]
        # A query at position p sees keys 0..p of its own row (causal, per-row length).
        self.mask = (keys[None, None, :] <= positions[:, :, None]).unsqueeze(1)  # [B, 1, T, L]

    def slots(self) -> torch.Tensor | slice:
        """The rows' slots as the cache takes them: a [B] tensor or a contiguous run."""
        return self._slot_tensor if self._slot_run is None else slice(*self._slot_run)


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        # Created uninitialised (from_pretrained skips Embedding's own init): reset_parameters
        # initialises every weight, and on the meta device (a checkpoint's shapes, before
        # its weights are assigned) normal_ would import torch._dynamo: ~1 s of start-up.
        embedding = torch.empty(config.vocab_size, config.dim)
        self.embed_tokens = nn.Embedding.from_pretrained(embedding, freeze=False)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        if self.embed_tokens.weight.is_meta:
            # Shapes only (model/checkpoint.py builds them and assigns the weights):
            # arithmetic on meta tensors would import torch._dynamo (~1 s), and load_model
            # computes the tables where the weights land.
            cos = sin = torch.empty(config.max_seq_len, config.head_dim)
        else:
            cos, sin = rope_tables(config)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2 init: N(0, 0.02); residual output projections scaled by 1/sqrt(2 * n_layers)."""
        if self.embed_tokens.weight.is_meta:
            return  # shapes only: load_model assigns the checkpoint's weights
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layers)
        for name, param in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(param, mean=0.0, std=residual_std)
            elif param.dim() == 2:
                nn.init.normal_(param, mean=0.0, std=0.02)
            else:
                nn.init.ones_(param)  # RMSNorm weights

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache | None = None,
        slots: torch.Tensor | slice | None = None,
        logits_at: tuple[torch.Tensor, torch.Tensor] | None = None,
        length: int | None = None,
        packed: bool = False,
    ) -> torch.Tensor:
        """input_ids, positions: [B, T] -> logits [B, T, V].

        Without a cache each row is one causal sequence whose positions run 0..T-1
        (training, evaluation); `packed`, each row holds several, each's positions from 0,
        and a token attends only to those before it in its own (fine-tuning on
        conversations: each as the server's prompt alone). With a cache, row b writes its
        keys/values into slot `slots[b]` (a [B] tensor, or a slice for a contiguous run;
        default: slot b) at `positions[b]` and attends over that slot's positions 0..p;
        rows may be at different lengths (padding a short row with further positions is
        harmless: see kv_cache.py's invariant). `length`, when given, is how many of each
        slot's positions are read: at least max(positions) + 1 (a CUDA graph's bucket reads
        more, keys the mask hides).
        `logits_at` (rows [N], ts [N]) picks N positions (e.g. each prompt's last token)
        and returns their logits [N, 1, V], skipping the LM head for the others.
        """
        step = _Step(cache, slots, positions, length, packed)
        x = self.embed_tokens(input_ids)  # [B, T, D]
        rope = (
            self.rope_cos[positions].unsqueeze(2).to(x.dtype),  # [B, T, 1, E]
            self.rope_sin[positions].unsqueeze(2).to(x.dtype),
        )
        for i, layer in enumerate(self.layers):
            step.layer = i
            x = layer(x, rope, step)
        if logits_at is not None:
            x = x[logits_at].unsqueeze(1)  # [N, 1, D]
        return self.lm_head(self.norm(x))  # [B, T, V], or [N, 1, V] with logits_at
