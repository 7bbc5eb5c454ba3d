"""model/sampling.py: greedy, truncation sets, seeds, penalties."""

from __future__ import annotations

import math

import pytest
import torch
import transformers

from model import sampling
from model.sampling import (
    BatchParams,
    SamplingParams,
    TokenHistory,
    apply_penalties,
    sample,
    truncate,
)

VOCAB = 50


def logits_rows(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, VOCAB, generator=torch.Generator().manual_seed(seed)) * 3


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_temperature_zero_is_argmax() -> None:
    logits = logits_rows(8)
    params = BatchParams.from_rows([SamplingParams(temperature=0.0)] * 8)
    assert torch.equal(sample(logits, params, [None] * 8), logits.argmax(-1))


@pytest.mark.parametrize("temperature", [1e-6, 1e-40, 1e-300])
def test_a_temperature_too_small_for_fp32_draws_the_argmax(temperature: float) -> None:
    # Dividing fp32 logits by it overflows to inf, whose softmax is NaN: junk draws.
    logits = logits_rows(8)
    params = BatchParams.from_rows([SamplingParams(temperature=temperature)] * 8)
    ids = sample(logits, params, [seeded(i) for i in range(8)])
    assert torch.equal(ids, logits.argmax(-1))


def test_a_top_k_past_int64_is_off() -> None:
    logits = logits_rows(4)
    huge = BatchParams.from_rows([SamplingParams(top_k=2**70)] * 4)
    off = BatchParams.from_rows([SamplingParams(top_k=0)] * 4)
    for draw in range(10):
        generators = [seeded(draw * 4 + i) for i in range(4)]
        same = [seeded(draw * 4 + i) for i in range(4)]
        assert torch.equal(sample(logits, huge, generators), sample(logits, off, same))


def test_greedy_rows_stay_greedy_inside_a_sampled_batch() -> None:
    logits = logits_rows(4)
    rows = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.5)] * 2
    params = BatchParams.from_rows(rows)
    sampled = set()
    for draw in range(20):
        ids = sample(logits, params, [seeded(draw * 4 + i) for i in range(4)])
        assert ids[0] == logits[0].argmax() and ids[2] == logits[2].argmax()
        sampled.add(int(ids[1]))
    assert len(sampled) > 1  # and the sampled rows stay sampled


def test_top_k_never_returns_a_token_outside_the_k_best() -> None:
    logits = logits_rows(1, seed=3)
    kept = set(logits[0].topk(5).indices.tolist())
    params = BatchParams.from_rows([SamplingParams(temperature=2.0, top_k=5)])
    generator = seeded(0)
    drawn = {int(sample(logits, params, [generator])) for _ in range(500)}
    assert drawn <= kept
    assert len(drawn) >= 4  # it really samples, not argmax


def test_top_p_never_returns_a_token_outside_the_nucleus() -> None:
    logits = logits_rows(1, seed=4)
    probs = logits[0].softmax(-1)
    order = probs.argsort(descending=True)
    # The nucleus: the smallest prefix of tokens (by probability) whose mass reaches p.
    cumulative = probs[order].cumsum(0)
    size = int((cumulative < 0.6).sum()) + 1
    nucleus = set(order[:size].tolist())
    params = BatchParams.from_rows([SamplingParams(temperature=1.0, top_p=0.6)])
    generator = seeded(1)
    drawn = {int(sample(logits, params, [generator])) for _ in range(500)}
    assert size > 2
    # Every nucleus token has >= 10% renormalised mass here, so 500 draws see them all.
    assert drawn == nucleus


def test_top_k_and_top_p_combine_per_row() -> None:
    logits = logits_rows(2, seed=5)
    rows = [SamplingParams(top_k=1), SamplingParams(top_p=1e-6)]
    params = BatchParams.from_rows(rows)
    for seed in range(20):
        ids = sample(logits, params, [seeded(seed), seeded(seed + 100)])
        assert torch.equal(ids, logits.argmax(-1))  # both filters keep only the best token


def test_same_seed_gives_the_same_draws_alone_or_batched() -> None:
    logits = logits_rows(3, seed=6)
    params_one = BatchParams.from_rows([SamplingParams(temperature=1.0, top_p=0.9)])
    params_three = BatchParams.from_rows([SamplingParams(temperature=1.0, top_p=0.9)] * 3)
    alone_gen, batched_gen = seeded(42), seeded(42)
    alone = [int(sample(logits[1:2], params_one, [alone_gen])) for _ in range(30)]
    batched = [
        int(sample(logits, params_three, [seeded(7), batched_gen, None])[1]) for _ in range(30)
    ]
    assert alone == batched
    assert len(set(alone)) > 1


def test_different_seeds_give_different_draws() -> None:
    logits = torch.zeros(1, VOCAB)  # uniform: 30 equal draws by chance is impossible in practice
    params = BatchParams.from_rows([SamplingParams()])
    a, b = seeded(1), seeded(2)
    assert [int(sample(logits, params, [a])) for _ in range(30)] != [
        int(sample(logits, params, [b])) for _ in range(30)
    ]


def history(in_prompt: list[int], generated: list[float]) -> TokenHistory:
    return TokenHistory(torch.tensor([in_prompt]).bool(), torch.tensor([generated]))


def test_repetition_penalty_shrinks_positive_and_grows_negative_logits_of_prompt_or_output():
    logits = torch.tensor([[2.0, -2.0, 2.0, -2.0, 2.0]])
    seen = history(in_prompt=[1, 0, 0, 0, 1], generated=[0, 1, 0, 0, 2])
    out = apply_penalties(
        logits, seen, torch.tensor([2.0]), torch.tensor([0.0]), torch.tensor([0.0])
    )
    assert out.tolist() == [[1.0, -4.0, 2.0, -2.0, 1.0]]


def test_presence_and_frequency_penalties_count_generated_tokens_only() -> None:
    # OpenAI's rule: token 0, in the prompt alone, is not penalised; 3 is, for its output.
    logits = torch.zeros(1, 4)
    seen = history(in_prompt=[1, 0, 0, 1], generated=[0, 1, 3, 1])
    out = apply_penalties(
        logits, seen, torch.tensor([1.0]), torch.tensor([0.5]), torch.tensor([0.25])
    )
    assert out.tolist() == [[0.0, -0.75, -1.25, -0.75]]


def test_penalty_changes_the_greedy_choice() -> None:
    logits = torch.tensor([[3.0, 2.0, 0.0]])
    seen = history(in_prompt=[0, 0, 0], generated=[2, 0, 0])
    params = BatchParams.from_rows([SamplingParams(temperature=0.0, repetition_penalty=2.0)])
    assert int(sample(logits, params, [None], seen)) == 1


def test_draws_follow_the_distribution_and_skip_zero_probability_tokens() -> None:
    probs = torch.zeros(VOCAB)
    probs[:4] = torch.tensor([0.5, 0.3, 0.0, 0.2])
    logits = probs.log()[None]  # -inf where the probability is 0
    rows = 20_000
    cases = [
        ({}, [0.5, 0.3, 0.0, 0.2]),
        ({"top_p": 0.75}, [0.625, 0.375, 0.0, 0.0]),  # nucleus {0, 1}, renormalised
        ({"top_k": 1}, [1.0, 0.0, 0.0, 0.0]),
    ]
    for settings, expected in cases:
        params = BatchParams.from_rows([SamplingParams(**settings)] * rows)
        # Unseeded rows (one batched draw, from torch's global generator, seeded here so
        # that the draw does not depend on which tests ran before) and one seeded row
        # drawn repeatedly.
        torch.manual_seed(0)
        batched = sample(logits.expand(rows, -1), params, [None] * rows)
        one_row = BatchParams.from_rows([SamplingParams(**settings)])
        generator = seeded(9)
        seeded_draws = torch.cat([sample(logits, one_row, [generator]) for _ in range(2_000)])
        for ids, tolerance in ((batched, 0.015), (seeded_draws, 0.05)):
            counts = torch.bincount(ids, minlength=VOCAB)
            assert counts[4:].sum() == 0 and counts[2] == 0, settings
            frequencies = (counts[:4] / len(ids)).tolist()
            assert frequencies == pytest.approx(expected, abs=tolerance), settings


def test_truncate_keeps_the_top_k_the_nucleus_or_every_token_per_row() -> None:
    probs = logits_rows(5, seed=8).softmax(-1)
    settings = [(3, 1.0), (0, 0.5), (0, 1.0), (5, 0.9), (4, 0.5)]  # (top_k, top_p); 0 / 1 = off
    params = BatchParams.from_rows([SamplingParams(top_k=k, top_p=p) for k, p in settings])
    kept = truncate(probs, params.max_kept, params.nucleus, params.min_share) > 0
    for row, (top_k, top_p) in enumerate(settings):
        # The reference, token by token, as HF's warpers in order: the top_k best, then
        # of those, renormalised, the best while the mass before them is under top_p.
        ranked = probs[row].sort(descending=True)
        top = ranked.values[: top_k or VOCAB]
        size, mass = 0, 0.0
        for p in (top / top.sum()).tolist():
            if mass >= top_p and top_p < 1.0:
                break
            size, mass = size + 1, mass + p
        assert set(kept[row].nonzero()[:, 0].tolist()) == set(ranked.indices[:size].tolist())
    assert kept.sum(-1).tolist()[0] == 3 and kept[2].all()


@pytest.mark.parametrize("min_p", [0.0, 0.05, 0.3, 1.0])
def test_top_k_top_p_and_min_p_keep_what_hf_warpers_keep(min_p: float) -> None:
    logits = logits_rows(6, seed=3)
    for top_k, top_p in [(2, 0.5), (10, 0.6), (4, 0.5), (30, 0.9), (1, 0.3), (VOCAB, 0.7)]:
        rows = [SamplingParams(top_k=top_k, top_p=top_p, min_p=min_p)] * 6
        params = BatchParams.from_rows(rows)
        kept = truncate(logits.softmax(-1), params.max_kept, params.nucleus, params.min_share) > 0
        scores = transformers.TopKLogitsWarper(top_k)(None, logits.clone())
        scores = transformers.TopPLogitsWarper(top_p)(None, scores)
        if min_p:  # HF's warper refuses 0: it is off there as here
            scores = transformers.MinPLogitsWarper(min_p)(None, scores)
        assert torch.equal(kept, scores > -math.inf), (top_k, top_p)


def test_min_p_alone_keeps_the_tokens_at_least_min_p_times_the_likeliest_one() -> None:
    probs = logits_rows(4, seed=5).softmax(-1)
    shares = [0.0, 0.1, 0.5, 1.0]
    params = BatchParams.from_rows([SamplingParams(min_p=share) for share in shares])
    assert params.any_truncation
    kept = truncate(probs, params.max_kept, params.nucleus, params.min_share) > 0
    for row, share in enumerate(shares):
        assert torch.equal(kept[row], probs[row] >= share * probs[row].max())
    assert kept[0].all() and kept[3].sum() == 1  # off; only the likeliest


def test_bfloat16_logits_with_grad_draw_what_their_float32_copy_draws() -> None:
    # As the trainer's preview may call it: reduced precision, outside inference mode.
    half = logits_rows(4, seed=8).bfloat16().requires_grad_()
    rows = [SamplingParams(top_k=3), SamplingParams(top_p=0.5), SamplingParams()]
    params = BatchParams.from_rows([*rows, SamplingParams(top_k=5, top_p=0.9)])
    for seed in range(10):
        generators = [seeded(seed * 4 + i) for i in range(4)]
        twins = [seeded(seed * 4 + i) for i in range(4)]
        got = sample(half, params, generators)
        assert torch.equal(got, sample(half.detach().float(), params, twins))


def test_seeded_draws_leave_the_global_generator_alone() -> None:
    # The trainer previews with a seeded generator; its data order and dropout use the
    # global one, which a preview must not advance.
    logits = logits_rows(2, seed=10)
    params = BatchParams.from_rows([SamplingParams(top_p=0.9)] * 2)
    before = torch.get_rng_state()
    sample(logits, params, [seeded(1), seeded(2)])
    assert torch.equal(torch.get_rng_state(), before)
    sample(logits, params, [seeded(1), None])  # an unseeded row does use it
    assert not torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_temperature_divides_the_logits_once(temperature: float) -> None:
    logits = logits_rows(64) * 3
    params = BatchParams.from_rows([SamplingParams(temperature=temperature)] * 64)
    ids = sample(logits, params, [torch.Generator().manual_seed(i) for i in range(64)])
    generators = [torch.Generator().manual_seed(i) for i in range(64)]
    assert torch.equal(ids, sampling.draw((logits / temperature).softmax(-1), generators))


def test_a_row_with_top_p_off_keeps_even_its_least_likely_tokens() -> None:
    # Tokens after one of ~1 in fp32 have a mass before them of 1.0 after rounding:
    # a top_p of exactly 1 would cut them; off, it cuts nothing. (The other row makes
    # the batch truncate; a top_k row with top_p 1 is the same case.)
    logits = torch.tensor([[20.0] + [0.0] * 7] * 2)
    params = BatchParams.from_rows([SamplingParams(), SamplingParams(top_p=0.5)])
    kept = truncate(logits.softmax(-1), params.max_kept, params.nucleus, params.min_share) > 0
    assert kept[0].all() and kept[1].sum() == 1
    params = BatchParams.from_rows([SamplingParams(top_k=8, top_p=1.0)])
    assert (
        truncate(logits[:1].softmax(-1), params.max_kept, params.nucleus, params.min_share) > 0
    ).all()


def test_a_top_p_too_small_for_float32_keeps_the_most_likely_token() -> None:
    # The API accepts any top_p > 0; 1e-300 is 0 in float32, and no nucleus is empty.
    logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, 1.0]])
    params = BatchParams.from_rows([SamplingParams(top_p=1e-300)] * 2)
    generators = [torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)]
    assert sample(logits, params, generators).tolist() == [1, 0]


def test_top_p_stops_at_the_token_whose_predecessors_hold_exactly_top_p() -> None:
    # HF/vLLM rule: a token is kept while the tokens ranked above it hold *less* than
    # top_p. Here the first token alone holds exactly 0.5, so top_p 0.5 keeps only it.
    probs = torch.tensor([[0.5, 0.25, 0.25]])
    off = torch.tensor([[0.0]])
    kept = truncate(probs, torch.tensor([[sampling.NO_TOP_K]]), torch.tensor([[0.5]]), off)
    assert kept.tolist() == [[0.5, 0.0, 0.0]]


def generator_drawing_zero() -> torch.Generator:
    """A real CPU generator whose Mersenne Twister words are all zero: its uniform
    numbers are exactly 0.0, the one value a draw's search must treat carefully."""
    generator = seeded(1)
    state = generator.get_state().clone()
    state[24 : 24 + 624 * 8] = 0  # the 624 state words, after seed, left, seeded, next
    generator.set_state(state)
    assert torch.rand(1, generator=generator).item() == 0.0
    return generator


def test_a_uniform_of_exactly_zero_never_draws_a_leading_zero_probability_token() -> None:
    probs = torch.tensor([[0.0, 0.0, 0.7, 0.3]])
    assert sampling.draw(probs, [generator_drawing_zero()]).tolist() == [2]


def test_a_row_of_nan_logits_still_draws_a_token_inside_the_vocabulary() -> None:
    # A broken row (NaN logits, or nothing left to draw) must not yield the id V, which
    # would index past the embedding table and fail the whole batch.
    logits = torch.full((1, VOCAB), math.nan)
    params = BatchParams.from_rows([SamplingParams(temperature=0.8)])
    token = int(sample(logits, params, [seeded(0)])[0])
    assert 0 <= token < VOCAB
    assert 0 <= int(sampling.draw(torch.zeros(1, VOCAB), [generator_drawing_zero()])[0]) < VOCAB


def test_logit_biases_move_their_rows_tokens_and_no_others() -> None:
    logits = logits_rows(4)
    before = logits.clone()
    likeliest = logits.argmax(-1).tolist()
    rows = [
        SamplingParams(temperature=0.0, logit_bias=((7, 100.0),)),  # forces token 7
        SamplingParams(temperature=0.0, logit_bias=((likeliest[1], -100.0),)),  # bans it
        SamplingParams(temperature=0.0),  # none: its own argmax
        SamplingParams(temperature=1.0, logit_bias=((3, 100.0), (9, -100.0))),
    ]
    params = BatchParams.from_rows(rows)
    for draw in range(20):
        ids = sample(logits, params, [None, None, None, seeded(draw)]).tolist()
        assert ids[0] == 7 and ids[1] != likeliest[1] and ids[2] == likeliest[2] and ids[3] == 3
    # Banned, the row's second likeliest: the bias is added to the logit, nothing else.
    assert ids[1] == logits[1].topk(2).indices[1].item()
    assert torch.equal(logits, before)  # the caller's logits: its logprobs read them


@pytest.mark.parametrize(
    ("settings", "logits", "expected"),
    [
        ({"presence_penalty": 1.5}, [3.0, 2.0, 0.0], 1),
        ({"frequency_penalty": 0.6}, [3.0, 2.0, 0.0], 1),
        ({"repetition_penalty": 2.0}, [3.0, 2.0, 0.0], 1),
        # Below 1 (or negative presence) a penalty favours the tokens already seen.
        ({"repetition_penalty": 0.5}, [2.0, 3.0, 0.0], 0),
        ({"presence_penalty": -1.5}, [2.0, 3.0, 0.0], 0),
    ],
    ids=["presence", "frequency", "repetition", "repetition below 1", "negative presence"],
)
def test_each_penalty_alone_changes_the_greedy_choice(
    settings: dict, logits: list[float], expected: int
) -> None:
    # A batch whose only penalty is one of these still applies it: token 0, generated
    # twice, is no longer (or now) the argmax.
    seen = history(in_prompt=[0, 0, 0], generated=[2, 0, 0])
    params = BatchParams.from_rows([SamplingParams(temperature=0.0, **settings)])
    assert int(sample(torch.tensor([logits]), params, [None], seen)) == expected


def test_penalties_without_the_token_history_are_refused() -> None:
    params = BatchParams.from_rows([SamplingParams(presence_penalty=0.5)])
    with pytest.raises(ValueError, match="token history"):
        sample(logits_rows(1), params, [None])


def test_a_logit_bias_is_added_to_the_logit_not_put_in_its_place() -> None:
    # OpenAI's rule: +0.75 lifts token 1 (0.5) past token 0 (1.0); -0.25 leaves token 0
    # (now 0.75) ahead of token 1. Put in place, the two biases would do the opposite.
    logits = torch.tensor([[1.0, 0.5, 0.0]] * 2)
    rows = [
        SamplingParams(temperature=0.0, logit_bias=((1, 0.75),)),
        SamplingParams(temperature=0.0, logit_bias=((0, -0.25),)),
    ]
    assert sample(logits, BatchParams.from_rows(rows), [None, None]).tolist() == [1, 0]


def test_bfloat16_logits_take_logit_biases_as_their_float32_copy_does() -> None:
    # A bf16 model's logits (a GPU server's) with a request's float32 biases.
    half = logits_rows(2, seed=11).bfloat16()
    rows = [
        SamplingParams(top_p=0.9, logit_bias=((4, 5.0),)),
        SamplingParams(logit_bias=((2, -3.0),)),
    ]
    params = BatchParams.from_rows(rows)
    for seed in range(10):
        generators = [seeded(seed * 2 + i) for i in range(2)]
        twins = [seeded(seed * 2 + i) for i in range(2)]
        assert torch.equal(sample(half, params, generators), sample(half.float(), params, twins))


def test_each_row_of_a_batch_takes_its_own_penalties() -> None:
    # The batched server applies every row's penalties in one call: each row's values
    # must meet that row's logits, not a column's. (Two rows over two tokens, so a
    # transposed broadcast would still run and give the wrong numbers.)
    logits = torch.tensor([[2.0, -2.0], [2.0, -2.0]])
    seen = TokenHistory(
        in_prompt=torch.tensor([[False, True], [True, False]]),
        generated=torch.tensor([[1.0, 0.0], [0.0, 2.0]]),
    )
    out = apply_penalties(
        logits, seen, torch.tensor([2.0, 4.0]), torch.tensor([0.5, 0.0]), torch.tensor([0.0, 0.25])
    )
    assert out.tolist() == [[0.5, -4.0], [0.5, -8.5]]


def test_a_small_temperature_above_the_greedy_threshold_still_samples() -> None:
    # Only temperatures too small for fp32 (below 1e-5) are made greedy: 1e-4, asked for
    # on purpose, still draws, here between two tied tokens, not always the first.
    logits = torch.zeros(1, 2)
    params = BatchParams.from_rows([SamplingParams(temperature=1e-4)])
    generator = seeded(0)
    assert {int(sample(logits, params, [generator])) for _ in range(30)} == {0, 1}
