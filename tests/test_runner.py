"""The server's ModelRunner: its compiled decode step and its bucketed decode (what
CUDA graphs capture; the graphs themselves where CUDA is available) agree with the eager one."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable

import pytest
import torch
from torch._dynamo.utils import counters

from model.config import ModelConfig
from model.transformer import Transformer
from server.cuda_graphs import StaticDecode
from server.runner import ModelRunner, PrefillInput

VOCAB = 300
CLOSE = {"rtol": 1e-4, "atol": 1e-4}  # a compiled fp32 forward vs the eager one
PAD = 0  # the token id a padded prefill row is filled with (runner._prefill)
# (device, compiled): CUDA too where there is one (a lent GPU machine); CI runs the CPU case.
BUCKETED_CASES = [
    ("cpu", False),
    *([("cuda", False), ("cuda", True)] if torch.cuda.is_available() else []),
]


@pytest.fixture(autouse=True)
def fresh_dynamo() -> None:
    """Each test's compiled graphs are its own: dynamo's cache of an earlier test's
    runner (the same method, compiled) hid a rebuild that the test alone showed."""
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def model() -> Transformer:
    # Two layers, not tiny's four: compiled, its graphs build in ~60% of the time, and
    # still read and write more than one layer's cache.
    torch.manual_seed(0)
    config = ModelConfig.from_preset("tiny", vocab_size=VOCAB).replace(n_layers=2)
    return Transformer(config).eval()


def test_a_one_slot_runner_builds_one_graph_at_warm_up(model: Transformer) -> None:
    # With one slot the warm-up's batch decode is itself batch 1's graph.
    runner = ModelRunner(model, n_slots=1, compile_decode=True)
    graphs_before = counters["stats"]["unique_graphs"]
    with torch.inference_mode():
        runner.warm_up()
        graphs = counters["stats"]["unique_graphs"]
        for position in (5, 6, 7):
            runner.decode([3], [position], [0])
    assert graphs == graphs_before + 1
    assert counters["stats"]["unique_graphs"] == graphs


def test_compiled_decode_follows_the_eager_forward_without_rebuilding(
    model: Transformer,
) -> None:
    eager = ModelRunner(model, n_slots=4)
    compiled = ModelRunner(model, n_slots=4, compile_decode=True)
    generator = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, VOCAB, (4, 20), generator=generator).tolist()
    lengths = [19, 6, 11, 15]  # each slot's prompt, all but the last token of the lone one
    with torch.inference_mode():
        eager.warm_up()
        graphs_before = counters["stats"]["unique_graphs"]
        # Builds here, not at the first request: batch 1's graph and the larger batches'.
        compiled.warm_up()
        graphs = counters["stats"]["unique_graphs"]
        assert graphs == graphs_before + 2
        for runner in (eager, compiled):
            runner.prefill([PrefillInput(0, prompts[0][:-1], 0)])
        token = prompts[0][-1]
        for position in range(19, 60):  # a lone stream in slot 0, key lengths 20..60
            expected = eager.decode([token], [position], [0])
            got = compiled.decode([token], [position], [0])
            torch.testing.assert_close(got, expected, **CLOSE)
            token = int(expected.argmax())
        for runner in (eager, compiled):
            runner.prefill([PrefillInput(s, prompts[s][: lengths[s]], 0) for s in (1, 2, 3)])
        positions = [60, *lengths[1:]]
        tokens = [token, *(prompts[s][lengths[s]] for s in (1, 2, 3))]
        # Rows in slots 0..B-1 at every batch size up to the slot count (the graph the
        # warm-up built at 4 rows serves 2 and 3), and rows elsewhere (the eager path in
        # the compiled runner too): a run starting above slot 0 (slot 0 still prefilling)
        # is a slice of the cache, but not the one the graph reads.
        for slots in ([0, 1], [0, 1, 2], [0, 1, 2, 3], [0, 2], [1, 3], [1, 2], [1]):
            args = ([tokens[s] for s in slots], [positions[s] for s in slots], slots)
            torch.testing.assert_close(compiled.decode(*args), eager.decode(*args), **CLOSE)
            for s in slots:
                positions[s] += 1
    # Two graphs served every batch size and key length: nothing was rebuilt after the
    # warm-up.
    assert counters["stats"]["unique_graphs"] == graphs


def test_compiled_decode_reaches_the_context_end_without_rebuilding(model: Transformer) -> None:
    # A short context, so that streams reach its end in a few dozen steps.
    short = Transformer(model.config.replace(max_seq_len=24)).eval()
    eager = ModelRunner(short, n_slots=2)
    compiled = ModelRunner(short, n_slots=2, compile_decode=True)
    with torch.inference_mode():
        eager.warm_up()
        compiled.warm_up()
        graphs = counters["stats"]["unique_graphs"]
        for runner in (eager, compiled):
            runner.prefill([PrefillInput(s, [5, 6, 7], 0) for s in (0, 1)])
        # A lone stream, then two, each writing up to the context's last position.
        for slots in ([0], [0, 1]):
            for position in range(3, 24):
                args = ([9] * len(slots), [position] * len(slots), slots)
                torch.testing.assert_close(compiled.decode(*args), eager.decode(*args), **CLOSE)
    # A step at the context's end was built again (seconds, every stream waiting).
    assert counters["stats"]["unique_graphs"] == graphs


def test_a_chunk_at_the_context_end_prefilled_beside_a_longer_one_keeps_its_logits(
    model: Transformer,
) -> None:
    # A prompt's last token is at most at context - 2 (one token must be left to generate).
    # Padded to its neighbour's 8 tokens, such a chunk runs 6 positions past the context:
    # the padding's positions must stay inside the cache and the RoPE tables.
    runner = ModelRunner(model, n_slots=2)
    context = runner.max_len
    generator = torch.Generator().manual_seed(1)
    text = torch.randint(0, VOCAB, (context - 1,), generator=generator).tolist()
    other = torch.randint(0, VOCAB, (8,), generator=generator).tolist()
    with torch.inference_mode():
        runner.prefill([PrefillInput(0, text[:-1], 0)])
        together = [PrefillInput(0, text[-1:], context - 2), PrefillInput(1, other, 0)]
        logits = runner.prefill(together)  # [2, V]
        for row, ids in enumerate((text, other)):
            tokens = torch.tensor([ids])
            alone = model(tokens, torch.arange(len(ids))[None])[0, -1]  # [V]
            torch.testing.assert_close(logits[row], alone, rtol=1e-4, atol=1e-4)


def test_chunks_prefilled_in_several_forwards_keep_each_its_own_logits(
    model: Transformer,
) -> None:
    # A long chunk beside two short ones: the shortest, padded to the long one's width,
    # would compute more than twice the tokens, so it runs in a forward of its own. The
    # logits still come back in the order the chunks were given, not as grouped.
    runner = ModelRunner(model, n_slots=3)
    generator = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, VOCAB, (n,), generator=generator).tolist() for n in (1, 40, 6)]
    with torch.inference_mode():
        logits = runner.prefill([PrefillInput(s, ids, 0) for s, ids in enumerate(prompts)])
        for row, ids in enumerate(prompts):
            alone = model(torch.tensor([ids]), torch.arange(len(ids))[None])[0, -1]  # [V]
            torch.testing.assert_close(logits[row], alone, **CLOSE)


def test_a_chunk_scoring_every_position_keeps_its_rows_in_a_forward_of_its_own(
    model: Transformer,
) -> None:
    # A prompt scored at each of its positions (echo with logprobs), grouped apart from a
    # longer chunk: its rows, one a position, come back in place among the others'.
    runner = ModelRunner(model, n_slots=3)
    generator = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, VOCAB, (n,), generator=generator).tolist() for n in (40, 6, 2)]
    chunks = [PrefillInput(s, ids, 0, every_position=s == 1) for s, ids in enumerate(prompts)]
    with torch.inference_mode():
        logits = runner.prefill(chunks)
        alone = [model(torch.tensor([ids]), torch.arange(len(ids))[None])[0] for ids in prompts]
    expected = torch.cat([alone[0][-1:], alone[1], alone[2][-1:]])  # [1 + 6 + 1, V]
    torch.testing.assert_close(logits, expected, **CLOSE)


def test_each_prefill_forward_computes_at_most_twice_its_chunks_tokens(
    model: Transformer,
) -> None:
    # Padding a short chunk to a long one's width costs the running streams' step; up to
    # twice the tokens is taken for one forward fewer, not more.
    computed: list[tuple[int, int]] = []  # (positions computed, tokens) per forward

    def count(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        computed.append((args[0].numel(), int((args[0] != PAD).sum())))

    runner = ModelRunner(model, n_slots=8)
    handle = model.register_forward_pre_hook(count, with_kwargs=True)
    try:
        with torch.inference_mode():
            for lengths in [(4, 1, 1), (12, 1, 1, 1, 1), (30, 10, 9, 2, 1), (8, 7, 5, 5, 4, 1)]:
                computed.clear()
                chunks = [PrefillInput(s, [PAD + 1] * n, 0) for s, n in enumerate(lengths)]
                runner.prefill(chunks)
                assert sum(tokens for _, tokens in computed) == sum(lengths)
                assert all(positions <= 2 * tokens for positions, tokens in computed), computed
                if lengths == (4, 1, 1):  # 12 positions for 6 tokens: exactly twice
                    assert computed == [(12, 6)]
    finally:
        handle.remove()


def test_an_eager_decode_at_the_caches_last_position_keeps_its_logits(model: Transformer) -> None:
    # The step a stream at the end of the context takes: its keys are the whole cache.
    runner = ModelRunner(model, n_slots=2)
    context = runner.max_len
    generator = torch.Generator().manual_seed(4)
    text = torch.randint(0, VOCAB, (context,), generator=generator).tolist()
    with torch.inference_mode():
        runner.prefill([PrefillInput(1, text[:-1], 0)])
        logits = runner.decode(text[-1:], [context - 1], [1])  # [1, V]
        alone = model(torch.tensor([text]), torch.arange(context)[None])[0, -1]  # [V]
    torch.testing.assert_close(logits[0], alone, **CLOSE)


def test_a_bfloat16_model_on_a_cpu_keeps_its_kv_cache_in_float32(model: Transformer) -> None:
    # Where PyTorch's attention runs fastest (model/kv_cache.py: cache_dtype); a bf16 cache
    # would be cast up, all of it, in every layer of every step.
    runner = ModelRunner(copy.deepcopy(model).to(torch.bfloat16), n_slots=2)
    assert runner.dtype == torch.bfloat16
    assert {t.dtype for t in (*runner.cache.k, *runner.cache.v)} == {torch.float32}
    with torch.inference_mode():
        runner.prefill([PrefillInput(0, [5, 6, 7], 0)])
        logits = runner.decode([8], [3], [0])
    assert logits.shape == (1, VOCAB) and bool(logits.isfinite().all())


def static_decode(runner: ModelRunner) -> Callable[..., torch.Tensor]:
    """The decode under test: on CUDA the runner's graph replays; on CPU (no graphs) the
    same fixed-bucket forward over static buffers that the graphs capture, run eagerly."""
    if runner.device.type == "cuda":
        return runner.decode
    static = StaticDecode(runner.model, runner.cache)

    def decode(token_ids: list[int], positions: list[int], slots: list[int]) -> torch.Tensor:
        b, length = static.load(token_ids, positions, slots)
        return static.rows(static.forward(b, length), slots)

    return decode


@pytest.mark.parametrize(("device", "compiled"), BUCKETED_CASES)
def test_bucketed_decode_with_padding_rows_agrees_with_the_eager_decode(
    model: Transformer, device: str, compiled: bool
) -> None:
    model = copy.deepcopy(model).to(device)
    eager = ModelRunner(model, n_slots=4)
    bucketed = ModelRunner(model, n_slots=4, cuda_graphs=True, compile_decode=compiled)
    decode = static_decode(bucketed)
    prompts = torch.randint(0, VOCAB, (4, 30), generator=torch.Generator().manual_seed(1)).tolist()
    lengths = [20, 7, 12, 30]
    with torch.inference_mode():
        eager.warm_up()
        bucketed.warm_up()
        if device == "cuda":
            assert len(bucketed._graphs) == 3 * 2  # rows 1, 2, 4 x keys 128, 256
        # Slots 0-2 hold whole prompts; slot 3 only the first 5 tokens of its prompt,
        # so a 3-row step pads into it while its prompt is still being prefilled.
        chunks = [PrefillInput(s, prompts[s][: lengths[s]], 0) for s in range(3)]
        chunks.append(PrefillInput(3, prompts[3][:5], 0))
        for runner in (eager, bucketed):
            runner.prefill(chunks)
        tokens, positions = [prompts[s][lengths[s] - 1] for s in range(4)], list(lengths)

        def step(slots: list[int]) -> None:
            rows_tokens = [tokens[s] for s in slots]
            rows_positions = [positions[s] for s in slots]
            expected = eager.decode(rows_tokens, rows_positions, slots)
            got = decode(rows_tokens, rows_positions, slots)
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
            for row, s in enumerate(slots):
                tokens[s], positions[s] = int(expected[row].argmax()), positions[s] + 1

        for _ in range(3):
            step([0, 1, 2])  # 3 rows in the 4-row bucket: slot 3 is padding
        for runner in (eager, bucketed):
            runner.prefill([PrefillInput(3, prompts[3][5:], 5)])
        tokens[3] = prompts[3][-1]
        step([0, 2])  # slot 1 decodes nothing this step: a padding row between the rows
        step([3, 1])  # out of slot order, slots 0 and 2 padding
        for _ in range(110):  # slot 0 passes 128 keys: the next key-length bucket
            step([0, 1, 2, 3])
        step([0])  # a lone stream: the 1-row bucket
    assert positions[0] > 128


def test_inductors_own_typed_storage_warning_stays_off_the_servers_stderr(
    model: Transformer,
) -> None:
    # Inductor's autotuner, building the compiled step the first time (caches cold),
    # warned "TypedStorage is deprecated" from torch/_inductor/select_algorithm.py onto
    # the log of `python -m server --compile-decode true`. A cold build takes ~40 s: the
    # warning is raised here as torch raises it, attributed to that module.
    message = "TypedStorage is deprecated. It will be removed in the future ..."

    def warned_from(module: str) -> list[str]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")  # as on a first warning: none shown before
            ModelRunner(model, n_slots=1, compile_decode=True)
            warnings.warn_explicit(message, UserWarning, f"{module}.py", 1, module=module)
        return [str(w.message) for w in caught if "TypedStorage" in str(w.message)]

    assert warned_from("torch._inductor.select_algorithm") == []
    assert len(warned_from("my_code")) == 1  # the same warning from elsewhere still shows
