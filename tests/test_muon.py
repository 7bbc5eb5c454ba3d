"""Muon: the Newton-Schulz orthogonalisation, the update rule, and how the trainer
splits parameters between Muon and AdamW."""

from __future__ import annotations

import io
import math

import pytest
import torch

from model.config import ModelConfig
from model.transformer import Transformer
from training.args import TrainArgs
from training.muon import Muon, orthogonalize
from training.optim import make_optimizer


@pytest.mark.parametrize("shape", [(3, 64, 64), (2, 32, 96), (2, 96, 32)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_orthogonalize_maps_every_singular_value_near_one(shape, dtype) -> None:
    # Singular values spread over 20x (a random square matrix has some near 0: those
    # stay short of 1, whatever the iteration).
    n, rows, cols = shape
    generator = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(n, rows, min(rows, cols), generator=generator))
    v, _ = torch.linalg.qr(torch.randn(n, cols, min(rows, cols), generator=generator))
    spectrum = torch.linspace(0.05, 1.0, min(rows, cols))
    g = u @ torch.diag_embed(spectrum.expand(n, -1)) @ v.mT
    g[0] *= 1e3  # scale-free: a huge gradient gives the same kind of update
    out = orthogonalize(g, dtype)
    assert out.shape == g.shape and out.dtype == dtype
    singular = torch.linalg.svdvals(out.float())
    # AOL's start and Turbo-Muon's coefficients land them within 5% of 1 (five of
    # Keller Jordan's iterations from the Frobenius norm: [0.68, 1.2]).
    assert singular.min() > 0.95 and singular.max() < 1.05
    # It is U S' V^T with the input's own U and V: projected onto U V^T it keeps ~all.
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    polar = u @ vh
    alignment = (out.float() * polar).sum((-2, -1)) / polar.pow(2).sum((-2, -1))
    assert (alignment > 0.7).all()


def test_first_step_moves_each_matrix_by_its_orthogonalised_gradient() -> None:
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(16, 48))
    before = weight.detach().clone()
    weight.grad = torch.randn(16, 48)
    # lr x decay large enough to tell decay before the update from decay after it.
    lr, decay, momentum = 0.1, 1.0, 0.95
    Muon([weight], lr=lr, weight_decay=decay, momentum=momentum).step()
    # Step 1: buffer = (1 - m) g; Nesterov update = g.lerp(buffer, m).
    nesterov = weight.grad.lerp((1 - momentum) * weight.grad, momentum)
    update = orthogonalize(nesterov[None], torch.float32)[0]
    expected = before * (1 - lr * decay) - lr * 0.2 * math.sqrt(48) * update
    torch.testing.assert_close(weight.detach(), expected)


def test_later_steps_follow_nesterov_momentum_over_the_gradients_so_far() -> None:
    # Step 1 alone cannot tell momentum from none (the update is scale-free); step 2
    # must orthogonalise g2 + m * (buffer - g2), the buffer an EMA of g1 and g2.
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(16, 48))
    before = weight.detach().clone()
    g1, g2 = torch.randn(16, 48), torch.randn(16, 48)
    lr, momentum = 0.01, 0.9
    opt = Muon([weight], lr=lr, momentum=momentum)
    for g in (g1, g2):
        weight.grad = g.clone()
        opt.step()
    buffer = momentum * ((1 - momentum) * g1) + (1 - momentum) * g2
    updates = [g1, g2.lerp(buffer, momentum)]
    expected = before
    for update in updates:
        expected = (
            expected - lr * 0.2 * math.sqrt(48) * orthogonalize(update[None], torch.float32)[0]
        )
    torch.testing.assert_close(weight.detach(), expected)


def test_a_zero_gradient_moves_a_matrix_by_its_weight_decay_alone() -> None:
    # A matrix no loss reached this step (and one with no gradient at all) among others
    # of its shape: no NaN from normalising nothing, and the others still step.
    torch.manual_seed(0)
    zero, moving, untouched = (torch.nn.Parameter(torch.randn(8, 24)) for _ in range(3))
    before = [p.detach().clone() for p in (zero, moving, untouched)]
    zero.grad, moving.grad = torch.zeros(8, 24), torch.randn(8, 24)
    Muon([zero, moving, untouched], lr=0.01, weight_decay=0.1).step()
    torch.testing.assert_close(zero.detach(), before[0] * (1 - 0.01 * 0.1))
    assert torch.isfinite(moving).all() and not torch.equal(moving.detach(), before[1])
    assert torch.equal(untouched.detach(), before[2])


def test_state_round_trips_through_the_weights_only_unpickler() -> None:
    torch.manual_seed(0)
    weights = [torch.nn.Parameter(torch.randn(8, 8)) for _ in range(2)]
    opt = Muon(weights, lr=0.02)
    for _ in range(2):
        for w in weights:
            w.grad = torch.randn_like(w)
        opt.step()
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    copies = [torch.nn.Parameter(w.detach().clone()) for w in weights]
    restored = Muon(copies, lr=0.02)
    restored.load_state_dict(state)
    grads = [torch.randn_like(w) for w in weights]
    for params, optimizer in ((weights, opt), (copies, restored)):
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(weights, copies, strict=True))


def test_muon_refuses_vectors() -> None:
    with pytest.raises(ValueError, match="2-D weights only"):
        Muon([torch.nn.Parameter(torch.ones(4))], lr=0.01)


def test_muon_takes_the_blocks_matrices_and_adamw_the_rest() -> None:
    model = Transformer(ModelConfig.from_preset("tiny", vocab_size=64))
    args = TrainArgs(optimizer="muon", lr=1e-3)
    muon, adamw = make_optimizer(model, args, torch.device("cpu")).optimizers
    assert isinstance(muon, Muon) and isinstance(adamw, torch.optim.AdamW)
    names = {id(p): name for name, p in model.named_parameters()}
    in_muon = {names[id(p)] for g in muon.param_groups for p in g["params"]}
    in_adamw = {names[id(p)] for g in adamw.param_groups for p in g["params"]}
    assert in_muon.isdisjoint(in_adamw) and in_muon | in_adamw == set(names.values())
    assert "embed_tokens.weight" in in_adamw  # also the tied LM head
    assert all(name.startswith("layers.") and "layernorm" not in name for name in in_muon)
    assert len(in_muon) == 7 * model.config.n_layers  # q, k, v, o, gate, up, down


def adamw_groups(model: Transformer) -> list[dict]:
    """The AdamW parameter groups of `model`'s optimizer at --embedding-lr-scale 4."""
    args = TrainArgs(optimizer="muon", lr=1e-3, embedding_lr_scale=4.0)
    _, adamw = make_optimizer(model, args, torch.device("cpu")).optimizers
    return adamw.param_groups


def test_an_untied_embedding_gets_its_own_learning_rate_scale() -> None:
    config = ModelConfig.from_preset("tiny", vocab_size=64, tie_embeddings=False)
    model = Transformer(config)
    groups = adamw_groups(model)
    scaled = [g for g in groups if g.get("lr_scale", 1.0) != 1.0]
    assert len(scaled) == 1 and scaled[0]["lr_scale"] == 4.0
    assert scaled[0]["params"] == [model.embed_tokens.weight]
    plain = [p for g in groups if "lr_scale" not in g for p in g["params"]]
    assert any(p is model.lm_head.weight for p in plain)


def test_a_saved_state_of_another_number_of_optimizers_is_refused_saying_so() -> None:
    model = Transformer(ModelConfig.from_preset("tiny", vocab_size=64))
    cpu = torch.device("cpu")
    saved = make_optimizer(model, TrainArgs(optimizer="muon", lr=1e-3), cpu).state_dict()
    adamw = make_optimizer(model, TrainArgs(optimizer="adamw", lr=1e-3), cpu)
    with pytest.raises(ValueError, match=r"^the saved state has 2 optimizers, this run 1$"):
        adamw.load_state_dict(saved)


def test_a_tied_embedding_keeps_the_learning_rate_of_the_lm_head_it_is() -> None:
    tied = Transformer(ModelConfig.from_preset("tiny", vocab_size=64, tie_embeddings=True))
    scaled = [g for g in adamw_groups(tied) if g.get("lr_scale", 1.0) != 1.0]
    assert [p for g in scaled for p in g["params"]] == []


def test_a_learning_rate_past_float32_moves_the_weights_off_the_scale_not_an_error() -> None:
    # The trainer reports what follows (an infinite loss) as a diverged run, exit 1; the
    # step's scale overflowing float32 was a traceback instead.
    weight = torch.nn.Parameter(torch.randn(8, 16))
    weight.grad = torch.randn(8, 16)
    Muon([weight], lr=1e39).step()
    assert weight.abs().max() > 1e37


def test_matrices_decay_in_either_optimizer_and_norm_weights_do_not() -> None:
    model = Transformer(ModelConfig.from_preset("tiny", vocab_size=64, tie_embeddings=False))
    for optimizer in ("muon", "adamw"):
        args = TrainArgs(optimizer=optimizer, lr=1e-3, weight_decay=0.3)
        opt = make_optimizer(model, args, torch.device("cpu"))
        decay = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
        for name, p in model.named_parameters():
            assert decay[id(p)] == (0.3 if p.dim() >= 2 else 0.0), (optimizer, name)


def test_zero_grad_leaves_no_gradient_for_muon_to_step_on() -> None:
    # A parameter no loss reaches in a step has no gradient then, not a zero one: Muon
    # steps only those with a gradient (a zero one would still move them by momentum).
    model = Transformer(ModelConfig.from_preset("tiny", vocab_size=64))
    opt = make_optimizer(model, TrainArgs(optimizer="muon", lr=1e-3), torch.device("cpu"))
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_a_tiny_gradient_is_orthogonalised_like_any_other() -> None:
    # Scale-free downwards too: entries of 1e-5 (late in a run) are not taken for a zero
    # matrix by the guard against dividing by nothing.
    g = torch.randn(2, 32, 96, generator=torch.Generator().manual_seed(0)) * 1e-5
    singular = torch.linalg.svdvals(orthogonalize(g, torch.float32))
    assert singular.min() > 0.9 and singular.max() < 1.1


def test_a_tall_matrix_is_orthogonalised_as_the_transpose_of_its_wide_one() -> None:
    # An update does not depend on which way a weight is stored (down_proj is tall where
    # up_proj is wide): the iteration, its AOL start included, runs on the wide side.
    g = torch.randn(2, 96, 32, generator=torch.Generator().manual_seed(0))
    tall = orthogonalize(g, torch.float32)
    wide = orthogonalize(g.mT.contiguous(), torch.float32)
    torch.testing.assert_close(tall, wide.mT)
