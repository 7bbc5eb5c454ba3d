"""The network: cached decode agrees with the full forward, presets are what they claim."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from model.config import PRESETS, ModelConfig
from model.kv_cache import KVCache, as_slots, cache_dtype
from model.transformer import Block, RMSNorm, Transformer, _Step, apply_rope, rope_tables

VOCAB = 300


@pytest.fixture(scope="module")
def model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig.from_preset("tiny", vocab_size=VOCAB)).eval()


def random_ids(shape: tuple[int, int], seed: int) -> torch.Tensor:
    """Token ids of `shape`, the same whichever tests ran before."""
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def full_positions(batch: int, length: int) -> torch.Tensor:
    return torch.arange(length)[None].expand(batch, length)


def decode_through_cache(
    model: Transformer, ids: torch.Tensor, prompt_lens: list[int], slots: list[int]
) -> torch.Tensor:
    """Prefill each row's prompt (one padded batch), then decode every row token by token.

    Slots and key lengths are given the way the server's runner gives them (a slice for
    a contiguous run, the length from host-side positions). Returns the logits at
    every position, [B, T, V], gathered from the cached calls.
    """
    batch, length = ids.shape
    weights = next(model.parameters())
    dtype = cache_dtype(weights.device, weights.dtype)
    cache = KVCache.for_model(model.config, n_slots=max(slots) + 1, dtype=dtype)
    out = torch.zeros(batch, length, model.config.vocab_size)
    longest = max(prompt_lens)
    # Rows shorter than the longest prompt are padded with their own next tokens; the
    # cache entries that padding writes are overwritten before anything reads them.
    logits = model(
        ids[:, :longest], full_positions(batch, longest), cache, as_slots(slots), length=longest
    )
    for row, n in enumerate(prompt_lens):
        out[row, :n] = logits[row, :n]
    done = list(prompt_lens)
    while min(done) < length:
        active = [row for row in range(batch) if done[row] < length]
        step_ids = torch.tensor([[ids[row, done[row]]] for row in active])  # [B', 1]
        step_pos = torch.tensor([[done[row]] for row in active])  # [B', 1]
        active_slots = as_slots([slots[row] for row in active])
        keys = max(done[row] for row in active) + 1
        logits = model(step_ids, step_pos, cache, active_slots, length=keys)
        for i, row in enumerate(active):
            out[row, done[row]] = logits[i, 0]
            done[row] += 1
    return out


@torch.inference_mode()
def test_cached_decode_equals_full_forward_single_row(model: Transformer) -> None:
    ids = random_ids((1, 40), seed=1)
    full = model(ids, full_positions(1, 40))
    cached = decode_through_cache(model, ids, prompt_lens=[9], slots=[0])
    assert (cached - full).abs().max().item() <= 1e-4


@torch.inference_mode()
def test_cached_decode_equals_full_forward_in_a_contiguous_run_of_slots(
    model: Transformer,
) -> None:
    ids = random_ids((3, 24), seed=2)
    full = model(ids, full_positions(3, 24))
    # Slots 2..4 are read as a view of the cache (a slice) until a row finishes.
    cached = decode_through_cache(model, ids, prompt_lens=[5, 2, 11], slots=[2, 3, 4])
    assert (cached - full).abs().max().item() <= 1e-4


def test_as_slots_is_a_slice_only_for_an_ascending_contiguous_run() -> None:
    assert as_slots([3, 4, 5]) == slice(3, 6)
    assert as_slots([0]) == slice(0, 1)
    assert torch.equal(as_slots([4, 3]), torch.tensor([4, 3]))
    assert torch.equal(as_slots([0, 2]), torch.tensor([0, 2]))


@torch.inference_mode()
def test_cached_decode_equals_full_forward_rows_of_different_lengths(model: Transformer) -> None:
    ids = random_ids((4, 48), seed=3)
    full = model(ids, full_positions(4, 48))
    # Non-contiguous, unordered slots exercise the gathered (copying) cache path.
    cached = decode_through_cache(model, ids, prompt_lens=[3, 17, 1, 30], slots=[5, 0, 3, 1])
    assert (cached - full).abs().max().item() <= 1e-4


@torch.inference_mode()
def test_a_bf16_model_on_cpu_decodes_through_its_fp32_cache_as_its_full_forward(
    model: Transformer,
) -> None:
    # The cache a CPU keeps is fp32 whatever the weights (cache_dtype): bf16 keys and
    # values are written into it, and attention reads it in fp32 (prefill with its mask,
    # decode, gathered slots).
    half = copy.deepcopy(model).to(torch.bfloat16)
    assert cache_dtype(torch.device("cpu"), torch.bfloat16) == torch.float32
    ids = random_ids((4, 48), seed=3)
    full = half(ids, full_positions(4, 48)).float()
    cached = decode_through_cache(half, ids, prompt_lens=[3, 17, 1, 30], slots=[5, 0, 3, 1])
    # Within two bf16 roundings of logits of ~2-4 (the products round per batch shape).
    assert (cached - full).abs().max().item() <= 2**-5


@torch.inference_mode()
def test_logits_at_returns_only_the_requested_positions(model: Transformer) -> None:
    ids = random_ids((2, 12), seed=4)
    full = model(ids, full_positions(2, 12))
    rows, ts = torch.tensor([0, 1, 1]), torch.tensor([4, 2, 11])  # row 1 twice: any positions
    picked = model(ids, full_positions(2, 12), logits_at=(rows, ts))
    assert picked.shape == (3, 1, VOCAB)
    torch.testing.assert_close(picked[:, 0], full[rows, ts], atol=1e-5, rtol=0)


@torch.inference_mode()
def test_a_slot_reused_by_a_new_sequence_forgets_the_old_one(model: Transformer) -> None:
    cache = KVCache.for_model(model.config, n_slots=1)
    slot = torch.tensor([0])
    long_ids = random_ids((1, 30), seed=5)
    model(long_ids, full_positions(1, 30), cache, slot)
    short_ids = random_ids((1, 6), seed=6)
    reused = model(short_ids, full_positions(1, 6), cache, slot)
    fresh = model(short_ids, full_positions(1, 6))
    assert (reused - fresh).abs().max().item() <= 1e-5


@torch.inference_mode()
def test_a_sequence_copied_to_another_slot_decodes_on_from_there(model: Transformer) -> None:
    # How the scheduler compacts slots: prefill in slot 2, copy to slot 0, decode there.
    cache = KVCache.for_model(model.config, n_slots=3)
    ids = random_ids((1, 13), seed=7)
    model(ids[:, :12], full_positions(1, 12), cache, slice(2, 3), length=12)
    cache.copy_slot(2, 0, 12)
    step = model(ids[:, 12:], torch.tensor([[12]]), cache, slice(0, 1), length=13)
    full = model(ids, full_positions(1, 13))
    torch.testing.assert_close(step[:, 0], full[:, 12], atol=1e-5, rtol=0)


def test_gradients_reach_every_parameter() -> None:
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("tiny", vocab_size=VOCAB))
    ids = random_ids((2, 16), seed=8)
    logits = model(ids, full_positions(2, 16))
    loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1)
    )
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    assert model.lm_head.weight is model.embed_tokens.weight


@pytest.mark.parametrize(
    ("name", "low", "high"),
    [("tiny", 0.8e6, 1.5e6), ("mini", 4.5e6, 6e6), ("small", 11e6, 13e6), ("base", 100e6, 130e6)],
)
def test_presets_have_their_documented_size(name: str, low: float, high: float) -> None:
    config = PRESETS[name]
    assert low <= config.num_parameters() <= high
    with torch.device("meta"):
        counted = sum(p.numel() for p in Transformer(config).parameters())
    assert counted == config.num_parameters()


def test_small_preset_matches_the_design() -> None:
    small = ModelConfig.from_preset("small")
    assert (small.dim, small.n_layers, small.n_heads, small.ffn_dim, small.vocab_size) == (
        384,
        6,
        6,
        1024,
        4096,
    )


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"dim": 100, "n_heads": 3}, "not divisible"),
        ({"n_heads": 4, "n_kv_heads": 3}, "multiple of n_kv_heads"),
        ({"n_kv_heads": 0}, "multiple of n_kv_heads"),  # not a ZeroDivisionError
        ({"dim": 132}, "head_dim 33 must be even for RoPE"),
        ({"dropout": 1.0}, "dropout"),
        ({"n_layers": 0}, "n_layers"),
        ({"n_heads": 0}, r"n_heads must be >= 1 \(got 0\)"),  # not a ZeroDivisionError
        ({"vocab_size": 0}, r"vocab_size must be >= 1 \(got 0\)"),
        ({"max_seq_len": 0}, r"max_seq_len must be >= 1 \(got 0\)"),
        ({"dropout": -0.1}, r"dropout must be in \[0, 1\) \(got -0.1\)"),
        ({"rope_theta": math.inf}, r"rope_theta must be a positive number \(got inf\)"),
        ({"norm_eps": math.nan}, r"norm_eps must be a positive number \(got nan\)"),
        # A zero width divides by any head count and its head width 0 is even: only the
        # width check itself refuses it.
        ({"dim": 0}, r": dim must be >= 1 \(got 0\)"),
        ({"ffn_dim": 0}, r"ffn_dim must be >= 1 \(got 0\)"),
        # One head: the head width is the whole width, and must still be even.
        ({"dim": 129, "n_heads": 1, "n_kv_heads": 1}, "head_dim 129 must be even for RoPE"),
    ],
)
def test_invalid_configs_are_rejected_with_the_reason(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_preset("tiny", **overrides)


@pytest.mark.parametrize("heads", [4, 12])
def test_a_preset_without_grouped_query_attention_keeps_none_at_other_head_counts(
    heads: int,
) -> None:
    # small's n_kv_heads followed its own 6 heads: 4 heads were refused as not a multiple
    # of 6 kv heads, and 12 silently shared 6.
    for name in ("small", "base"):
        config = ModelConfig.from_preset(name, n_heads=heads)
        assert config.n_kv_heads == heads, name
    # Presets with grouped-query attention keep theirs, and an explicit count wins.
    assert ModelConfig.from_preset("tiny", n_heads=8).n_kv_heads == 2
    assert ModelConfig.from_preset("small", n_heads=4, n_kv_heads=2).n_kv_heads == 2


def test_a_config_names_each_of_its_problems_and_no_head_width_it_cannot_have() -> None:
    # dim 100 over 3 heads has no head width: its floor (33, odd) is not a second problem.
    with pytest.raises(ValueError) as refused:
        ModelConfig.from_preset("tiny", dim=100, n_heads=3, n_kv_heads=1, dropout=1.0)
    assert str(refused.value) == (
        "invalid ModelConfig: dim 100 is not divisible by n_heads 3; "
        "dropout must be in [0, 1) (got 1.0)"
    )


def test_unknown_preset_names_the_choices() -> None:
    with pytest.raises(ValueError, match="tiny, mini, small, base"):
        ModelConfig.from_preset("huge")


def test_bf16_autocast_training_forward_and_backward_follow_float32(model: Transformer) -> None:
    """Under CPU autocast the attention runs in fp32 (faster there); the rest in bf16."""
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    positions = full_positions(2, 24)
    model.train()
    try:
        reference = model(ids, positions)
        reference.square().mean().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(ids, positions)
        assert logits.dtype == torch.bfloat16
        logits.float().square().mean().backward()
    finally:
        model.eval()
    torch.testing.assert_close(logits.float(), reference, atol=0.05, rtol=0.05)
    for name, param in model.named_parameters():
        cosine = torch.nn.functional.cosine_similarity(
            param.grad.flatten(), grads[name].flatten(), 0
        )
        assert cosine > 0.99, name
    model.zero_grad(set_to_none=True)


def test_under_cpu_autocast_attention_attends_in_float32(model: Transformer) -> None:
    # Autocast would run attention in bf16 on a CPU (2-4x slower there): the first
    # layer's attention output must be fp32 attention over its bf16 q, k, v, rounded once.
    ids = random_ids((2, 24), seed=1)
    attention = model.layers[0].self_attn
    seen: dict[str, torch.Tensor] = {}
    hooks = [
        getattr(attention, name).register_forward_hook(
            lambda _, __, out, name=name: seen.__setitem__(name, out)
        )
        for name in ("q_proj", "k_proj", "v_proj")
    ]
    hooks.append(
        attention.o_proj.register_forward_pre_hook(lambda _, args: seen.__setitem__("y", args[0]))
    )
    try:
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            model(ids, full_positions(2, 24))
    finally:
        for hook in hooks:
            hook.remove()
    E = model.config.head_dim
    # The embedding stays fp32 under autocast, and so do the tables cast to its dtype.
    cos, sin = (t[:24].view(1, 24, 1, E) for t in rope_tables(model.config))
    q, k, v = (seen[name].view(2, 24, -1, E) for name in ("q_proj", "k_proj", "v_proj"))
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    q, k, v = (t.transpose(1, 2).float() for t in (q, k, v))
    expected = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, is_causal=True, enable_gqa=True
    )
    assert seen["y"].dtype == torch.bfloat16
    assert torch.equal(seen["y"], expected.bfloat16().transpose(1, 2).reshape(2, 24, -1))


def test_a_bf16_model_on_cpu_drops_attention_weights_in_training() -> None:
    # A reduced-precision CPU model attends through its own fp32 call (transformer.py):
    # its attention dropout must hold there too. Attention alone has no other randomness.
    torch.manual_seed(0)
    config = ModelConfig.from_preset("tiny", vocab_size=VOCAB, dropout=0.5)
    attention = Block(config).self_attn.to(torch.bfloat16)
    cos, sin = rope_tables(config)
    rope = (cos[:8].view(1, 8, 1, -1).bfloat16(), sin[:8].view(1, 8, 1, -1).bfloat16())
    step = _Step(None, None, full_positions(1, 8), None, packed=False)
    x = torch.randn(1, 8, config.dim, generator=torch.Generator().manual_seed(0)).bfloat16()
    with torch.no_grad():
        assert torch.equal(attention.eval()(x, rope, step), attention(x, rope, step))
        attention.train()
        assert not torch.equal(attention(x, rope, step), attention(x, rope, step))


def test_bytes_per_token_is_what_the_cache_allocates_per_slot_and_position() -> None:
    # With grouped-query attention the cache holds n_kv_heads heads, not n_heads: the
    # server sizes its slot count from this number.
    config = ModelConfig.from_preset("tiny", vocab_size=VOCAB, n_kv_heads=1, max_seq_len=16)
    cache = KVCache.for_model(config, n_slots=3, dtype=torch.bfloat16)
    allocated = sum(t.numel() * t.element_size() for t in (*cache.k, *cache.v))
    per_token = KVCache.bytes_per_token(config, torch.bfloat16)
    assert allocated == per_token * 3 * config.max_seq_len


@torch.inference_mode()
def test_a_sequence_can_fill_the_whole_context_through_the_cache() -> None:
    torch.manual_seed(0)
    config = ModelConfig.from_preset("tiny", vocab_size=VOCAB, max_seq_len=16)
    model = Transformer(config).eval()
    ids = random_ids((1, config.max_seq_len), seed=8)
    cached = decode_through_cache(model, ids, prompt_lens=[4], slots=[0])
    torch.testing.assert_close(cached, model(ids, full_positions(1, 16)), atol=1e-5, rtol=0)


@torch.inference_mode()
def test_dropout_is_off_in_eval_mode() -> None:
    # Evaluation, previews and the server run the model in eval mode: a dropout-trained
    # model must score and generate deterministically there, as if it had none.
    torch.manual_seed(0)
    config = ModelConfig.from_preset("tiny", vocab_size=VOCAB, dropout=0.5)
    model = Transformer(config).eval()
    plain = Transformer(config.replace(dropout=0.0)).eval()
    plain.load_state_dict(model.state_dict())
    ids = random_ids((2, 24), seed=3)
    positions = full_positions(2, 24)
    torch.testing.assert_close(model(ids, positions), plain(ids, positions), atol=0, rtol=0)


def test_residual_projections_start_scaled_down_by_depth() -> None:
    # GPT-2's init: each layer's o_proj and down_proj add to the residual stream, so their
    # std is 0.02 / sqrt(2 * n_layers), the other matrices 0.02, the norms 1.
    torch.manual_seed(0)
    config = ModelConfig.from_preset("tiny", vocab_size=VOCAB, n_layers=8)
    model = Transformer(config)
    residual = 0.02 / (2 * config.n_layers) ** 0.5
    for name, param in model.named_parameters():
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            assert param.std().item() == pytest.approx(residual, rel=0.05), name
        elif param.dim() == 2:
            assert param.std().item() == pytest.approx(0.02, rel=0.05), name
        else:
            assert torch.equal(param, torch.ones_like(param)), name


@torch.inference_mode()
def test_a_cached_call_without_slots_uses_slot_b_for_row_b(model: Transformer) -> None:
    # What the trainer's preview does: one row, its cache's slot 0, no slots given.
    ids = random_ids((2, 12), seed=4)
    cache = KVCache.for_model(model.config, n_slots=3)
    logits = model(ids, full_positions(2, 12), cache=cache)
    assert (logits - model(ids, full_positions(2, 12))).abs().max().item() <= 1e-4
    by_slot = KVCache.for_model(model.config, n_slots=3)
    model(ids, full_positions(2, 12), cache=by_slot, slots=torch.tensor([0, 1]))
    for ours, theirs in zip((*cache.k, *cache.v), (*by_slot.k, *by_slot.v), strict=True):
        assert torch.equal(ours, theirs)
    assert not cache.k[0][2].any()  # the third slot untouched


@torch.inference_mode()
def test_a_cache_given_a_shorter_length_holds_that_many_positions(model: Transformer) -> None:
    # The trainer's preview sizes its cache to the tokens it generates, not the context.
    cache = KVCache.for_model(model.config, n_slots=1, max_len=10)
    assert cache.max_len == 10
    assert all(t.shape == (1, model.config.n_kv_heads, 10, 32) for t in (*cache.k, *cache.v))
    ids = random_ids((1, 10), seed=9)
    logits = model(ids, full_positions(1, 10), cache, slice(0, 1), length=10)
    torch.testing.assert_close(logits, model(ids, full_positions(1, 10)), atol=1e-5, rtol=0)


def test_a_cache_off_the_cpu_keeps_the_weights_dtype() -> None:
    # Only a CPU's attention is faster in fp32: a GPU's bf16 cache stays half the size.
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        assert cache_dtype(torch.device("cuda"), dtype) == dtype
        assert cache_dtype(torch.device("cpu"), dtype) == torch.float32


def test_a_bf16_rms_norm_is_the_float32_norm_rounded_once() -> None:
    # As in HF Llama: normalised in fp32, so a bf16 model's norms round once, at the end.
    x = (torch.randn(4, 16, 128, generator=torch.Generator().manual_seed(0)) * 3).bfloat16()
    norm = RMSNorm(128, eps=1e-5).to(torch.bfloat16)  # weights of 1: the product is exact
    x32 = x.float()
    expected = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-5)
    assert torch.equal(norm(x), expected.bfloat16())


def test_a_bf16_rms_norm_with_trained_weights_rounds_as_hf_llamas_does() -> None:
    # HF scales the bf16-rounded norm by the weights in bf16 (two roundings); scaling in
    # fp32 and rounding once would be as close, but not the logits a bf16 HF model gives.
    generator = torch.Generator().manual_seed(0)
    x = (torch.randn(4, 16, 128, generator=generator) * 3).bfloat16()
    weight = 1 + 0.3 * torch.randn(128, generator=generator)
    ours, theirs = RMSNorm(128, eps=1e-5), LlamaRMSNorm(128, eps=1e-5)
    with torch.no_grad():
        ours.weight.copy_(weight)
        theirs.weight.copy_(weight)
    ours, theirs = ours.to(torch.bfloat16), theirs.to(torch.bfloat16)
    assert torch.equal(ours(x), theirs(x))


def test_rope_keeps_the_projections_dtype_when_its_tables_are_float32() -> None:
    # Under CPU autocast the embedding (so the tables, cast to its dtype) stays fp32 while
    # q and k come out of their projections in bf16: rotated, they must stay bf16, or the
    # attention would take fp32 inputs and skip its reduced-precision path.
    config = ModelConfig.from_preset("tiny", vocab_size=VOCAB)
    cos, sin = rope_tables(config)
    cos, sin = cos[:8].view(1, 8, 1, -1), sin[:8].view(1, 8, 1, -1)
    x = torch.randn(2, 8, 4, config.head_dim, generator=torch.Generator().manual_seed(0))
    rotated = apply_rope(x.bfloat16(), cos, sin)
    assert rotated.dtype == torch.bfloat16
    assert torch.equal(rotated, apply_rope(x.bfloat16().float(), cos, sin).bfloat16())


def test_training_dropout_drops_attention_weights_and_units_of_both_branches() -> None:
    # config.dropout is both: residual dropout zeroes single units of each branch's
    # output, attention dropout whole attention weights (at one position: each head's).
    torch.manual_seed(0)
    config = ModelConfig.from_preset("tiny", vocab_size=VOCAB, dropout=0.5)
    cos, sin = rope_tables(config)
    rope = (cos[:1].view(1, 1, 1, -1), sin[:1].view(1, 1, 1, -1))
    step = _Step(None, None, torch.zeros(1, 1, dtype=torch.long), None, packed=False)
    x = torch.randn(1, 1, config.dim)
    for silenced in ("mlp.down_proj", "self_attn.o_proj"):  # the other branch alone adds
        block = Block(config)
        with torch.no_grad():
            block.get_submodule(silenced).weight.zero_()
        whole = (block.eval()(x, rope, step) - x)[0, 0]
        block.train()
        units_dropped = rescaled = False
        for _ in range(20):
            branch = (block(x, rope, step) - x)[0, 0]
            dropped = branch == 0
            units_dropped |= bool(dropped.any() and not dropped.all())
            # Residual dropout alone leaves each kept unit at twice its eval value.
            rescaled |= not torch.allclose(branch[~dropped], 2 * whole[~dropped], atol=1e-6)
        assert units_dropped, silenced
        assert rescaled == (silenced == "mlp.down_proj"), silenced  # attention's heads
