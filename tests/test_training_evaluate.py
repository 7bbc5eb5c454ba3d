"""`python -m training.evaluate` on bad input: one `error:` line and exit 2, no bpb."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import signal
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from model.checkpoint import read_config, save_checkpoint
from model.config import PRESETS, ModelConfig
from model.transformer import Transformer
from tests.test_training_pretrain import CORPUS, VAL, signal_after_first_line, spawn_module
from training import evaluate, pretrain
from training.prepare import token_byte_lengths


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


def test_a_bad_command_line_is_one_error_line_and_exit_2(
    tiny_checkpoint: Path,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("Whatever the working folder holds.\n")
    for argv, message in (
        (["--data", str(VAL)], "error: the following arguments are required: --checkpoint\n"),
        (
            ["--checkpoint", str(tiny_checkpoint), "--data", str(VAL), "--block-size", "abc"],
            "error: argument --block-size: invalid int value: 'abc'\n",
        ),
        (
            ["--checkpoint", str(tiny_checkpoint), "--data", str(VAL), "--block", "8"],
            "error: unrecognized arguments: --block 8\n",
        ),
        (
            # `--data "$HELD_OUT"` with the variable unset: not the working folder's files.
            ["--checkpoint", str(tiny_checkpoint), "--data", str(VAL), ""],
            f"error: --data: a path is empty (got ['{VAL}', ''])\n",
        ),
    ):
        with pytest.raises(SystemExit) as exit:
            evaluate.main(argv)
        assert exit.value.code == 2
        assert capsys.readouterr().err == message


def test_data_given_twice_scores_both(
    tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # As the trainer reads `--data a --data b`: the second flag scored alone, silently,
    # gave the bits per byte of other text than the command names.
    other = tmp_path / "other.txt"
    other.write_text("Another held-out paragraph.\n")
    scored = []
    for data in (["--data", str(VAL), "--data", str(other)], ["--data", str(VAL), str(other)]):
        assert evaluate.main(["--checkpoint", str(tiny_checkpoint), *data]) == 0
        scored.append(capsys.readouterr().out.splitlines())
    assert scored[0] == scored[1]
    assert scored[0][0].startswith(f"evaluating {tiny_checkpoint} on 2 documents (")


@pytest.mark.parametrize("mistake", ["missing text", "block size past the context"])
def test_bad_arguments_are_named_before_the_weights_are_loaded(
    tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], mistake: str
) -> None:
    # A typo in --data or --block-size is named at once, not after a large model's load
    # (here: the load would fail, and its refusal would hide the typo).
    folder = tmp_path / "checkpoint"
    shutil.copytree(tiny_checkpoint, folder)
    (folder / "model.safetensors").write_bytes(b"")
    context = read_config(folder).max_seq_len
    if mistake == "missing text":
        missing = tmp_path / "held-out.txt"
        argv, message = ["--data", str(missing)], f"error: {missing}: no such file or folder\n"
    else:
        argv = ["--data", str(VAL), "--block-size", str(context + 1)]
        message = f"error: --block-size must be in 1..{context}\n"
    assert evaluate.main(["--checkpoint", str(folder), *argv]) == 2
    assert capsys.readouterr().err == message


def assert_refused_by_evaluate_and_init_from(
    folder: Path, problem: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`training.evaluate` on `folder`, and a fine-tune from it, each print one line
    starting with `problem`, exit 2 and write no run."""
    assert evaluate.main(["--checkpoint", str(folder), "--data", str(VAL)]) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and captured.err.startswith(problem), captured.err
    assert "bpb=" not in captured.out
    out_dir, cache = tmp_path / "out", tmp_path / "cache"
    # No shape or vocabulary flags: --init-from takes the checkpoint's.
    flags = ["--max-steps", "1", "--batch-size", "4", "--data", str(CORPUS)]
    flags += ["--init-from", str(folder), "--out-dir", str(out_dir), "--cache-dir", str(cache)]
    assert pretrain.main(flags) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(problem), err
    assert not out_dir.exists()


def refused_by_the_server(folder: Path) -> list[str]:
    """`python -m server` on `folder`, which must exit 2 before serving: its stderr lines."""
    served = subprocess.run(
        [sys.executable, "-m", "server", "--checkpoint", str(folder)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert served.returncode == 2, served.stderr
    return served.stderr.splitlines()


def test_a_checkpoint_whose_tokenizer_outgrows_its_model_exits_2_in_evaluate_and_init_from(
    tmp_path: Path, tokenizer: Tokenizer, capsys: pytest.CaptureFixture[str]
) -> None:
    model = Transformer(ModelConfig.from_preset("tiny", vocab_size=300))
    folder = save_checkpoint(tmp_path / "ckpt", "step-0000001", model, tokenizer)
    problem = f"error: {folder / 'tokenizer.json'}: {tokenizer.get_vocab_size()} token ids"
    assert_refused_by_evaluate_and_init_from(folder, problem, tmp_path, capsys)
    assert not (tmp_path / "cache").exists()  # refused before the text is tokenized


def test_a_checkpoint_holding_nan_weights_exits_2_in_evaluate_and_init_from(
    tmp_path: Path, tokenizer: Tokenizer, capsys: pytest.CaptureFixture[str]
) -> None:
    model = Transformer(ModelConfig.from_preset("tiny", vocab_size=tokenizer.get_vocab_size()))
    with torch.no_grad():
        model.layers[1].self_attn.o_proj.weight[3, 5] = float("inf")
    folder = save_checkpoint(tmp_path / "ckpt", "step-0000001", model, tokenizer)
    problem = f"error: {folder}: weight layers.1.self_attn.o_proj.weight holds NaN or infinite"
    assert_refused_by_evaluate_and_init_from(folder, problem, tmp_path, capsys)


def test_a_tokenizer_without_end_of_text_is_refused_by_evaluate_init_from_and_server(
    tmp_path: Path, tokenizer: Tokenizer, capsys: pytest.CaptureFixture[str]
) -> None:
    # An HF-style byte-level BPE whose specials are <s> and </s>.
    other = Tokenizer(models.BPE())
    other.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    other.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<s>", "</s>"], initial_alphabet=alphabet
    )
    other.train_from_iterator([CORPUS.read_text(encoding="utf-8")], trainer)
    model = Transformer(ModelConfig.from_preset("tiny", vocab_size=tokenizer.get_vocab_size()))
    folder = save_checkpoint(tmp_path / "ckpt", "step-0000001", model, tokenizer)
    other.save(str(folder / "tokenizer.json"))
    problem = f"error: {folder / 'tokenizer.json'}: has no <|endoftext|> token"
    assert_refused_by_evaluate_and_init_from(folder, problem, tmp_path, capsys)
    assert refused_by_the_server(folder) == [
        f"error: {folder / 'tokenizer.json'}: has no <|endoftext|> token, which separates "
        "documents and ends generated text"
    ]


def test_a_tokenizer_that_is_not_byte_level_is_refused_by_evaluate_and_init_from(
    tmp_path: Path, tokenizer: Tokenizer, capsys: pytest.CaptureFixture[str]
) -> None:
    # A SentencePiece-style decoder: its tokens are not bytes, so neither bits per byte
    # nor the server's text could be read from them.
    model = Transformer(ModelConfig.from_preset("tiny", vocab_size=tokenizer.get_vocab_size()))
    folder = save_checkpoint(tmp_path / "ckpt", "step-0000001", model, tokenizer)
    metaspace = Tokenizer.from_str(tokenizer.to_str())
    metaspace.decoder = decoders.Metaspace()
    metaspace.save(str(folder / "tokenizer.json"))
    problem = f"error: {folder / 'tokenizer.json'}: unsupported tokenizer decoder (Metaspace)"
    assert_refused_by_evaluate_and_init_from(folder, problem, tmp_path, capsys)
    # Refused before the weights are read (a HF model's can take more memory than there is).
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    assert evaluate.main(["--checkpoint", str(folder), "--data", str(VAL)]) == 2
    assert capsys.readouterr().err.startswith(problem)


def test_a_token_outside_the_byte_alphabet_is_refused_by_evaluate_init_from_and_server(
    tmp_path: Path, tokenizer: Tokenizer, capsys: pytest.CaptureFixture[str]
) -> None:
    # A hand-edited vocabulary: a raw space stands for no byte in GPT-2's alphabet.
    size = tokenizer.get_vocab_size()
    spec = json.loads(tokenizer.to_str())
    spec["model"]["vocab"]["a b"] = size
    model = Transformer(ModelConfig.from_preset("tiny", vocab_size=size + 1))
    edited = Tokenizer.from_str(json.dumps(spec))
    folder = save_checkpoint(tmp_path / "ckpt", "step-0000001", model, edited)
    problem = (
        f"error: {folder / 'tokenizer.json'}: token {size} ('a b') is not in the byte-level "
        "BPE alphabet"
    )
    assert_refused_by_evaluate_and_init_from(folder, problem, tmp_path, capsys)
    assert refused_by_the_server(folder) == [problem]


def test_bytes_per_token_count_an_added_tokens_utf8_bytes(tokenizer: Tokenizer) -> None:
    # What transformers' add_tokens makes: a token stored as its text, not as bytes.
    extended = Tokenizer.from_str(tokenizer.to_str())
    extended.add_tokens(["naïve café"])
    text = "a naïve café here, and <|endoftext|> after"
    ids = extended.encode(text, add_special_tokens=False).ids
    assert extended.token_to_id("naïve café") in ids
    assert token_byte_lengths(extended)[ids].sum() == len(
        text.replace("<|endoftext|>", "").encode()
    )


def test_a_vocabulary_past_uint16_is_refused_by_evaluate_and_init_from(
    tmp_path: Path, tokenizer: Tokenizer, capsys: pytest.CaptureFixture[str]
) -> None:
    big = Tokenizer.from_str(tokenizer.to_str())
    big.add_tokens([f"word{i}" for i in range(66_000 - big.get_vocab_size())])
    size = big.get_vocab_size()
    model = Transformer(ModelConfig.from_preset("tiny", vocab_size=size))
    folder = save_checkpoint(tmp_path / "ckpt", "step-0000001", model, big)
    problem = (
        f"error: {folder / 'tokenizer.json'}: {size:,} token ids do not fit the token cache's "
        "uint16 ids (at most 65,536)"
    )
    assert_refused_by_evaluate_and_init_from(folder, problem, tmp_path, capsys)


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_signal_while_evaluating_exits_128_plus_it_without_a_traceback(
    tmp_path: Path, tiny_checkpoint: Path, stop: signal.Signals
) -> None:
    text = tmp_path / "text.txt"
    # ~8 MB: tokenizing and scoring it take a minute after the line saying what it scores.
    text.write_text("".join(f"Line {i} of a text that is long.\n" for i in range(220_000)))
    argv = ["--checkpoint", str(tiny_checkpoint), "--data", str(text), "--device", "cpu"]
    process = spawn_module("training.evaluate", argv)
    first, out, err = signal_after_first_line(process, stop)
    assert first == f"evaluating {tiny_checkpoint} on 1 document (7,808,890 characters)\n"
    assert process.returncode == 128 + stop, err
    assert err.splitlines()[-1] == "interrupted: no bits per byte"
    assert "Traceback" not in err and "bpb=" not in out


def test_a_reader_that_closes_stdout_ends_evaluate_without_a_traceback(
    tiny_checkpoint: Path,
) -> None:
    # `python -m training.evaluate ... | head -1`: the reader is gone before the first
    # line is written.
    argv = ["--checkpoint", str(tiny_checkpoint), "--data", str(VAL), "--device", "cpu"]
    process = spawn_module("training.evaluate", argv)
    try:
        assert process.stdout is not None and process.stderr is not None
        process.stdout.close()
        err = process.stderr.read()
        assert process.wait(timeout=60) == 128 + signal.SIGPIPE, err
    finally:
        process.kill()
        process.wait()
    assert "Traceback" not in err and "BrokenPipeError" not in err, err


def nats_window_by_window(model: Transformer, tokens: np.ndarray, block: int) -> float:
    """The reference: each window alone, in eval mode, predicting its targets (the inputs
    shifted by one); the total nats."""
    nats = 0.0
    with torch.no_grad():
        for start in range(0, len(tokens) - 1, block):
            window = torch.from_numpy(tokens[start : start + block + 1].astype("int64"))
            x, y = window[:-1][None], window[1:]
            logits = model.eval()(x, torch.arange(x.shape[1])[None])[0]
            nats += torch.nn.functional.cross_entropy(logits, y, reduction="sum").item()
    return nats


@pytest.mark.parametrize("n_windows", [1, 2, 3, 17])  # 17: a second batch of one window
@pytest.mark.parametrize("short_last", [False, True])
def test_evaluate_stream_scores_every_target_once_in_nats_and_bits_per_byte(
    n_windows: int, short_last: bool
) -> None:
    torch.manual_seed(0)
    vocab, block = 40, 4
    model = Transformer(ModelConfig.from_preset("tiny", vocab_size=vocab, max_seq_len=block))
    generator = torch.Generator().manual_seed(n_windows)
    length = n_windows * block + 1 - (2 if short_last else 0)
    tokens = torch.randint(0, vocab, (length,), generator=generator).numpy().astype("uint16")
    byte_lengths = torch.randint(1, 5, (vocab,), generator=generator).numpy()
    nats = nats_window_by_window(model, tokens, block)
    model.train()
    result = evaluate.evaluate_stream(
        model, tokens, byte_lengths, block_size=block, device=torch.device("cpu")
    )
    n_bytes = int(byte_lengths[tokens[1:].astype("int64")].sum())
    assert (result.tokens, result.bytes) == (length - 1, n_bytes)
    assert result.loss == pytest.approx(nats / (length - 1), rel=1e-5)
    assert result.bpb == pytest.approx(nats / (n_bytes * math.log(2)), rel=1e-5)
    assert model.training  # left as it was given


def test_evaluate_stream_scores_with_dropout_off_and_gives_the_model_back_training() -> None:
    # A model given in training mode, as the trainer's is: dropout (half the units) would
    # make every evaluation a different random number.
    torch.manual_seed(0)
    vocab, block = 40, 4
    config = ModelConfig.from_preset("tiny", vocab_size=vocab, max_seq_len=block, dropout=0.5)
    model = Transformer(config)
    tokens = torch.randint(0, vocab, (3 * block + 1,)).numpy().astype("uint16")
    byte_lengths = np.ones(vocab, dtype=np.int64)
    expected = nats_window_by_window(model, tokens, block) / (len(tokens) - 1)
    model.train()
    scores = [
        evaluate.evaluate_stream(
            model, tokens, byte_lengths, block_size=block, device=torch.device("cpu")
        ).loss
        for _ in range(2)
    ]
    assert scores[0] == scores[1]
    assert scores[0] == pytest.approx(expected, rel=1e-5)
    assert model.training  # in training mode again, as it was given


def test_evaluate_stream_batches_fewer_windows_where_their_logits_would_pass_its_bound() -> None:
    # A large vocabulary by a long context: 16 windows' logits took gigabytes.
    vocab, block = 40, 4
    model = Transformer(ModelConfig.from_preset("tiny", vocab_size=vocab, max_seq_len=block))
    tokens = torch.randint(0, vocab, (20 * block + 1,)).numpy().astype("uint16")
    byte_lengths = np.ones(vocab, dtype=np.int64)
    batches: list[int] = []

    def count(module: torch.nn.Module, inputs: tuple) -> None:
        batches.append(inputs[0].shape[0])

    def scored(**bound: int) -> evaluate.EvalResult:
        batches.clear()
        return evaluate.evaluate_stream(
            model, tokens, byte_lengths, block_size=block, device=torch.device("cpu"), **bound
        )

    hook = model.register_forward_pre_hook(count)
    try:
        whole = scored()
        assert batches == [16, 4]
        three_windows = 3 * block * vocab * 4
        bounded = scored(logits_bytes=three_windows + 1)
        assert batches == [3] * 6 + [2]
        assert scored(logits_bytes=1) and batches == [1] * 20  # never fewer than one
    finally:
        hook.remove()
    assert bounded.loss == pytest.approx(whole.loss, rel=1e-5)
    # pocketgpt's own presets batch 16 windows of their whole context.
    for preset in PRESETS:
        config = ModelConfig.from_preset(preset)
        assert config.max_seq_len * config.vocab_size * 4 * 16 <= evaluate.EVAL_LOGITS_BYTES


def test_a_block_size_of_one_token_is_accepted_and_scores_every_token(
    tiny_checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # 1 is the smallest window: each token predicted from the one before it alone.
    argv = ["--checkpoint", str(tiny_checkpoint), "--data", str(VAL), "--block-size", "1"]
    assert evaluate.main([*argv, "--device", "cpu"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-1].startswith("bpb=")
    assert f"bytes={len(VAL.read_bytes())}" in out[-3]


def test_a_data_path_of_only_spaces_is_refused_as_empty(
    tiny_checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # `--data " $HELD_OUT"` with the variable unset: a blank path names the working folder.
    with pytest.raises(SystemExit) as exit:
        evaluate.main(["--checkpoint", str(tiny_checkpoint), "--data", str(VAL), "  "])
    assert exit.value.code == 2
    assert capsys.readouterr().err == f"error: --data: a path is empty (got ['{VAL}', '  '])\n"


def test_evaluate_stream_gives_a_model_in_eval_mode_back_in_eval_mode() -> None:
    # A caller's model in eval mode (the server's, a notebook's) must not come back with
    # its dropout on.
    vocab, block = 40, 4
    model = Transformer(ModelConfig.from_preset("tiny", vocab_size=vocab, max_seq_len=block))
    model.eval()
    tokens = torch.randint(0, vocab, (2 * block + 1,)).numpy().astype("uint16")
    evaluate.evaluate_stream(
        model, tokens, np.ones(vocab, dtype=np.int64), block_size=block, device=torch.device("cpu")
    )
    assert not model.training


def test_evaluate_stream_scores_a_shorter_last_window_alone_not_padded_into_a_batch() -> None:
    # Full windows batch with each other; the shorter last one is its own forward, so no
    # batch is padded (every position of every forward is a scored one).
    vocab, block = 40, 4
    model = Transformer(ModelConfig.from_preset("tiny", vocab_size=vocab, max_seq_len=block))
    tokens = torch.randint(0, vocab, (3 * block + 1 - 2,)).numpy().astype("uint16")
    shapes: list[tuple[int, ...]] = []
    hook = model.register_forward_pre_hook(lambda _, inputs: shapes.append(inputs[0].shape))
    try:
        result = evaluate.evaluate_stream(
            model,
            tokens,
            np.ones(vocab, dtype=np.int64),
            block_size=block,
            device=torch.device("cpu"),
        )
    finally:
        hook.remove()
    assert shapes == [(2, block), (1, block - 2)]
    assert result.tokens == len(tokens) - 1


def test_evaluate_stream_holds_a_batch_of_windows_at_a_time_not_the_whole_stream() -> None:
    # A held-out text of many tokens: its windows (and their targets) as int64 arrays,
    # held whole, took ~32 bytes a token beside the stream's 2.
    vocab, block = 40, 256
    # One narrow layer: tracemalloc counts every object a forward makes, and takes its time.
    config = ModelConfig(vocab_size=vocab, dim=16, n_layers=1, n_heads=2, ffn_dim=32)
    model = Transformer(dataclasses.replace(config, max_seq_len=block))
    tokens = torch.randint(0, vocab, (2**17,)).numpy().astype("uint16")
    byte_lengths = np.ones(vocab, dtype=np.int64)
    tracemalloc.start()
    try:
        result = evaluate.evaluate_stream(
            model, tokens, byte_lengths, block_size=block, device=torch.device("cpu")
        )
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert (result.tokens, result.bytes) == (len(tokens) - 1, len(tokens) - 1)
    # Less than the stream's own uint16s (~150 KB: a batch's windows and what a forward
    # makes), where the windows held whole took 16 times as much.
    assert peak < tokens.nbytes, peak


def test_evaluate_stream_asks_stop_before_each_batch_and_stops_with_the_model_given_back() -> None:
    # The trainer's SIGTERM during a validation: stopped before the next batch, its model
    # training again for the save.
    vocab, block = 40, 4
    model = Transformer(ModelConfig.from_preset("tiny", vocab_size=vocab, max_seq_len=block))
    model.train()
    tokens = torch.randint(0, vocab, (20 * block + 1,)).numpy().astype("uint16")
    forwards: list[int] = []
    hook = model.register_forward_pre_hook(lambda _, inputs: forwards.append(inputs[0].shape[0]))
    asked: list[int] = []

    def stop() -> bool:
        asked.append(len(forwards))
        return len(asked) == 2

    try:
        with pytest.raises(evaluate.EvaluationStopped):
            evaluate.evaluate_stream(
                model,
                tokens,
                np.ones(vocab, dtype=np.int64),
                block_size=block,
                device=torch.device("cpu"),
                stop=stop,
            )
    finally:
        hook.remove()
    assert asked == [0, 1] and forwards == [16]
    assert model.training


@pytest.mark.parametrize("flag", ["--checkpoint", "--data"])
def test_a_path_too_long_for_the_file_system_exits_2_naming_it(
    tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], flag: str
) -> None:
    # A name past the file system's 255 bytes: one line, not a traceback.
    long = tmp_path / ("a" * 300)
    paths = {"--checkpoint": str(tiny_checkpoint), "--data": str(VAL)} | {flag: str(long)}
    assert evaluate.main([arg for item in paths.items() for arg in item]) == 2
    captured = capsys.readouterr()
    assert captured.err == f"error: {long}: File name too long\n"
    assert "bpb=" not in captured.out
