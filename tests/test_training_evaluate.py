"""`python -m training.evaluate` on bad input: one `error:` line and exit 2, no bpb."""

from __future__ import annotations

from pathlib import Path

import pytest

from model.checkpoint import read_config
from tests.test_training_pretrain import VAL
from training import evaluate


@pytest.mark.parametrize("block_size", ["0", "-5"])
def test_a_block_size_below_one_exits_2_naming_the_flag(
    tiny_checkpoint: Path, capsys: pytest.CaptureFixture[str], block_size: str
) -> None:
    context = read_config(tiny_checkpoint).max_seq_len
    flags = ["--checkpoint", str(tiny_checkpoint), "--data", str(VAL)]
    assert evaluate.main([*flags, "--block-size", block_size]) == 2
    captured = capsys.readouterr()
    assert captured.err == f"error: --block-size must be in 1..{context}\n"
    assert "bpb=" not in captured.out
