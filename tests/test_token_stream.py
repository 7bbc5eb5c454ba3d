"""The trainer's token stream: a corpus is encoded in bounded batches, a long document
in pieces, and the ids are exactly those of encoding each document whole."""

from __future__ import annotations

import base64
import json
import random
from pathlib import Path

import numpy as np
from tokenizers import AddedToken, Tokenizer, pre_tokenizers

from model.checkpoint import END_OF_TEXT
from training.prepare import (
    BATCH_CHARS,
    PIECE_CHARS,
    PIECE_CUT,
    _pieces,
    prepare,
    token_stream,
)
from training.tokenizer import train_tokenizer, untrained_tokenizer


def _text(rng: random.Random, chars: int) -> str:
    """Words, punctuation and every kind of whitespace run, line breaks among them."""
    parts = ["word", "Word", "'s", "42", ".", ",", "é", "中文", "😀", " ", "  ", "\t", "\n"]
    parts += ["\n\n", " \n", "\n ", "\r\n", "  \n\t", END_OF_TEXT]
    text: list[str] = []
    length = 0
    while length < chars:
        text.append(rng.choice(parts))
        length += len(text[-1])
    return "".join(text)


def test_cutting_text_where_pieces_are_cut_keeps_every_id() -> None:
    rng = random.Random(1)
    # Trained on such text, the tokenizer merges runs of spaces and line breaks: a cut
    # inside a run, or beside one, would change the ids.
    tokenizer = train_tokenizer([_text(rng, 100_000)], 600)
    text = _text(rng, 6_000)
    cuts = [match.start() for match in PIECE_CUT.finditer(text)]
    assert len(cuts) > 20
    whole = tokenizer.encode(text).ids
    for cut in cuts:
        assert tokenizer.encode(text[:cut]).ids + tokenizer.encode(text[cut:]).ids == whole, cut


def test_long_documents_encode_in_pieces_to_the_ids_of_one_call(tokenizer: Tokenizer) -> None:
    rng = random.Random(0)
    # Two documents longer than a piece, and together longer than a batch, around a short one.
    documents = [
        _text(rng, 3 * PIECE_CHARS),
        "A short one.",
        _text(rng, BATCH_CHARS - 2 * PIECE_CHARS),
    ]
    assert sum(map(len, documents)) > BATCH_CHARS
    separator = tokenizer.token_to_id(END_OF_TEXT)
    encodings = tokenizer.encode_batch(documents)
    expected = [id_ for encoding in encodings for id_ in (separator, *encoding.ids)]
    stream = token_stream(tokenizer, documents)
    assert stream.dtype == np.uint16
    np.testing.assert_array_equal(stream, np.array(expected, dtype=np.uint16))


def test_a_long_line_without_spaces_encodes_in_bounded_pieces_to_the_ids_of_one_call() -> None:
    # A Markdown export with an inlined image, minified JSON: megabytes in one line, with
    # no line break or space to cut at. Encoded whole, 10 MB peaked at 2.7 GB.
    rng = random.Random(2)
    image = base64.b64encode(rng.randbytes(3 * PIECE_CHARS)).decode()
    records = [
        {"id": i, "name": f"it'em_{i}", "tags": ["a-b", "é"], "v": rng.random()}
        for i in range(12_000)
    ]
    # Text that spells a token added in transformers, found before pre-tokenizing.
    padded = "".join(
        rng.choice(["<pad>", "ab", "12", "<", "pad>", "+"]) for _ in range(PIECE_CHARS)
    )
    documents = [
        f"# Notes\n\n![chart](data:image/png;base64,{image})\n",
        json.dumps(records, separators=(",", ":"), ensure_ascii=False),
        padded,
    ]
    tokenizer = train_tokenizer([doc[:100_000] for doc in documents], 800)
    tokenizer.add_tokens([AddedToken("<pad>", special=False)])
    for doc in documents:
        pieces = list(_pieces(doc, tokenizer))
        assert "".join(pieces) == doc and len(pieces) > 1
        assert max(map(len, pieces)) <= 2 * PIECE_CHARS
    separator = tokenizer.token_to_id(END_OF_TEXT)
    encodings = tokenizer.encode_batch(documents)
    expected = [id_ for encoding in encodings for id_ in (separator, *encoding.ids)]
    np.testing.assert_array_equal(token_stream(tokenizer, documents), expected)


def test_an_empty_corpus_is_an_empty_stream(tokenizer: Tokenizer) -> None:
    assert token_stream(tokenizer, []).size == 0


def test_a_tokenizer_that_spaces_a_texts_start_gets_no_space_inside_a_long_document(
    tokenizer: Tokenizer,
) -> None:
    # A GPT-2 tokenizer saved by transformers with add_prefix_space: each encoded text
    # starts with a space. A piece cut after a line break or between "abc" and "123" is
    # such a text: the stream held a space the document does not have at every cut.
    spacing = Tokenizer.from_str(tokenizer.to_str())
    spacing.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    rng = random.Random(3)
    lines = "".join(rng.choice(["line\n", "more words\n", "x\n"]) for _ in range(PIECE_CHARS))
    digits = "".join(rng.choice(["abc", "123", "+"]) for _ in range(PIECE_CHARS))
    documents = [lines, digits]
    separator = spacing.token_to_id(END_OF_TEXT)
    encodings = spacing.encode_batch(documents)
    expected = [id_ for encoding in encodings for id_ in (separator, *encoding.ids)]
    np.testing.assert_array_equal(token_stream(spacing, documents), expected)


def test_the_tokenizer_trained_on_documents_in_pieces_is_the_one_trained_on_them_whole(
    tmp_path: Path,
) -> None:
    # The trainer feeds the tokenizer's training the pieces it encodes (a one-file corpus
    # was one text: counted on one thread, its progress bar at its end at once). Cut
    # between pre-tokens, the pieces hold the same words: the same merges, the same ids.
    rng = random.Random(4)
    minified = json.dumps([{"id": i, "v": rng.random()} for i in range(3_000)])
    documents = [_text(rng, 5 * PIECE_CHARS), minified, "A short one."]
    assert all(len(list(_pieces(doc, untrained_tokenizer()))) > 1 for doc in documents[:2])
    val = ["Held out text, some words of it."]
    data = prepare(documents, val, tmp_path, vocab_size=700)
    whole = train_tokenizer(documents, 700)
    assert whole.get_vocab_size() == 700
    assert data.tokenizer.to_str() == whole.to_str()
