"""The server's ModelRunner: its compiled lone-stream decode step agrees with the eager one."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from model.config import ModelConfig
from model.transformer import Transformer
from server.runner import ModelRunner, PrefillInput

VOCAB = 300


@pytest.fixture(scope="module")
def model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig.from_preset("tiny", vocab_size=VOCAB)).eval()


def test_a_one_slot_runner_builds_one_graph_at_warm_up(model: Transformer) -> None:
    # With one slot the warm-up's batch decode is itself the lone-stream path.
    runner = ModelRunner(model, n_slots=1, compile_lone_decode=True)
    graphs_before = counters["stats"]["unique_graphs"]
    with torch.inference_mode():
        runner.warm_up()
        graphs = counters["stats"]["unique_graphs"]
        for position in (5, 6, 7):
            runner.decode([3], [position], [0])
    assert graphs == graphs_before + 1
    assert counters["stats"]["unique_graphs"] == graphs


def test_compiled_lone_decode_follows_the_eager_forward_without_rebuilding(
    model: Transformer,
) -> None:
    eager = ModelRunner(model, n_slots=2)
    compiled = ModelRunner(model, n_slots=2, compile_lone_decode=True)
    prompt = torch.randint(0, VOCAB, (20,), generator=torch.Generator().manual_seed(0)).tolist()
    with torch.inference_mode():
        eager.warm_up()
        graphs_before = counters["stats"]["unique_graphs"]
        compiled.warm_up()  # builds the lone-stream graph here, not at the first request
        graphs = counters["stats"]["unique_graphs"]
        assert graphs == graphs_before + 1
        token = prompt[-1]
        for runner in (eager, compiled):
            runner.prefill([PrefillInput(0, prompt[:-1], 0)])
        for position in range(len(prompt) - 1, len(prompt) + 40):  # key lengths 20..60
            expected = eager.decode([token], [position], [0])
            got = compiled.decode([token], [position], [0])
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
            token = int(expected.argmax())
        # Two rows take the eager path in the compiled runner too, and agree with it.
        for runner in (eager, compiled):
            runner.prefill([PrefillInput(1, prompt[:10], 0)])
        expected = eager.decode([token, 7], [position + 1, 10], [0, 1])
        got = compiled.decode([token, 7], [position + 1, 10], [0, 1])
        torch.testing.assert_close(got, expected)
    # One graph served every key length: nothing was rebuilt after the warm-up.
    assert counters["stats"]["unique_graphs"] == graphs
