"""`<|endoftext|>` spelled in text is text: only the trainer and the server put the
separator's id into a token stream."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from model.checkpoint import END_OF_TEXT, load_tokenizer, read_tokenizer_file
from training.prepare import prepare
from training.tokenizer import MIN_VOCAB, train_tokenizer

QUOTING = f"The separator is written {END_OF_TEXT} in this sentence."


def test_the_marker_in_text_encodes_as_text_trained_or_loaded(
    tokenizer: Tokenizer, tiny_checkpoint: Path
) -> None:
    for tok in (tokenizer, load_tokenizer(tiny_checkpoint)):
        ids = tok.encode(QUOTING).ids
        assert tok.token_to_id(END_OF_TEXT) not in ids
        assert tok.decode(ids) == QUOTING


def test_a_tokenizer_saved_truncating_and_padding_encodes_every_text_whole(
    tokenizer: Tokenizer, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    # transformers saves the truncation and padding of its last padded call into
    # tokenizer.json: every training document and prompt was cut to 8 tokens.
    text = QUOTING * 4
    whole = tokenizer.encode(text).ids
    folder = tmp_path / "checkpoint"
    shutil.copytree(tiny_checkpoint, folder)
    saved = Tokenizer.from_file(str(folder / "tokenizer.json"))
    saved.enable_truncation(max_length=8)
    saved.enable_padding(length=64)
    saved.save(str(folder / "tokenizer.json"))
    for loaded in (load_tokenizer(folder), read_tokenizer_file(folder / "tokenizer.json")):
        assert loaded.encode(text).ids == whole
        assert [e.ids for e in loaded.encode_batch([text, "short"])] == [
            whole,
            tokenizer.encode("short").ids,
        ]


def test_prepared_tokens_hold_one_separator_per_document(
    tokenizer: Tokenizer, tmp_path: Path
) -> None:
    documents = [QUOTING, "A second document, plain."] * 10
    data = prepare(documents, [QUOTING], tmp_path, vocab_size=512, tokenizer=tokenizer)
    separator = tokenizer.token_to_id(END_OF_TEXT)
    assert int(np.count_nonzero(np.asarray(data.train) == separator)) == len(documents)
    assert int(np.count_nonzero(np.asarray(data.val) == separator)) == 1


def test_the_smallest_vocabulary_is_every_byte_and_the_separator() -> None:
    smallest = train_tokenizer([QUOTING], MIN_VOCAB)
    assert smallest.get_vocab_size() == 257 == MIN_VOCAB
    with pytest.raises(ValueError, match=r"vocab_size must be >= 257 \(got 256\)"):
        train_tokenizer([QUOTING], MIN_VOCAB - 1)
