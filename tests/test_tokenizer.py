"""`<|endoftext|>` spelled in text is text: only the trainer and the server put the
separator's id into a token stream."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from model.checkpoint import END_OF_TEXT, load_tokenizer
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
