"""The validation split without --val-data: evenly spaced pieces, whole lines, in order."""

from __future__ import annotations

import itertools
import re

import pytest

from training.corpus import CorpusError
from training.pretrain import held_out_only
from training.split import (
    MIN_CUT_CHARS,
    VAL_PIECE_CHARS,
    VAL_PIECES,
    documents_trained_on,
    split_documents,
)


def numbered_lines(n: int) -> str:
    return "".join(f"line {i:05d} of the corpus\n" for i in range(n))


def line_numbers(pieces: list[str]) -> list[int]:
    return [int(line.split()[1]) for piece in pieces for line in piece.splitlines()]


def test_val_is_the_fraction_in_evenly_spaced_whole_lines_and_train_keeps_both_ends() -> None:
    text = numbered_lines(40_000)  # ~1 MB, like tinyshakespeare
    train, val = split_documents([text], 0.05)
    assert len(val) == VAL_PIECES
    assert sum(map(len, val)) == pytest.approx(0.05 * len(text), rel=0.02)
    assert all(piece.endswith("\n") and piece.startswith("line ") for piece in val)
    # Nothing lost, nothing duplicated, order kept: the pieces interleave back into the text.
    rebuilt = "".join(part for pair in zip(train, val, strict=False) for part in pair)
    assert rebuilt + train[-1] == text
    # Spread over the whole corpus; the first and the last lines are trained on.
    starts = [line_numbers([piece])[0] for piece in val]
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert max(gaps) - min(gaps) <= 2
    assert line_numbers(train)[0] == 0 and line_numbers(train)[-1] == 39_999


def test_pieces_never_span_documents_and_respect_the_size_bounds() -> None:
    documents = [numbered_lines(n) for n in (3_000, 50, 9_000, 1)]
    train, val = split_documents(documents, 0.1)
    assert all(VAL_PIECE_CHARS[0] <= len(p) <= VAL_PIECE_CHARS[1] + 40 for p in val)
    by_doc = [set(line_numbers([d])) for d in documents]
    for piece in (*train, *val):
        numbers = set(line_numbers([piece]))
        assert any(numbers <= lines for lines in by_doc)  # within one document
    assert sorted(line_numbers(train + val)) == sorted(line_numbers(documents))


def test_a_small_corpus_gives_one_piece_from_its_middle() -> None:
    text = numbered_lines(40)  # ~1 KB: too little for pieces of VAL_PIECE_CHARS[0]
    train, val = split_documents([text], 0.1)
    assert len(val) == 1 and len(train) == 2
    assert 0 < line_numbers(val)[0] < 39


def test_lines_longer_than_the_gap_between_pieces_are_each_in_one_split_once() -> None:
    # Paragraphs as lines, longer than the gap between pieces: a cut moved forward to
    # the next line start can pass where the next piece would start, which then starts
    # where the last one ended, not inside it.
    text = "".join(f"line {i:05d} {'x' * 3000}\n" for i in range(10))
    train, val = split_documents([text], 0.1)
    starts = [int(n) for n in re.findall(r"line (\d{5})", "".join(train + val))]
    assert sorted(starts) == list(range(10))  # each line once: none lost, none twice
    assert sum(map(len, train + val)) == len(text)


def test_a_cut_that_falls_on_a_line_start_stays_there() -> None:
    # 40 lines of 25 characters: the middle tenth is lines 18 to 21 exactly, both of
    # its cuts on line starts, which no cut moves past.
    text = numbered_lines(40)
    train, val = split_documents([text], 0.1)
    assert line_numbers(val) == [18, 19, 20, 21]
    assert line_numbers(train) == [*range(18), *range(22, 40)]


def test_short_documents_hold_out_the_fraction_asked_in_evenly_spaced_runs() -> None:
    # A jsonl of short records: each piece ended with its document, and 5% asked held
    # out 0.3%. A piece now goes on into the next documents.
    documents = ["".join(f"doc {d:04d} line {i}\n" for i in range(5)) for d in range(3000)]
    total = sum(map(len, documents))
    for fraction in (0.05, 0.2, 0.5):
        train, val = split_documents(documents, fraction)
        assert sum(map(len, val)) == pytest.approx(fraction * total, rel=0.02), fraction
        assert sum(map(len, train)) + sum(map(len, val)) == total  # nothing lost
    train, val = split_documents(documents, 0.05)
    held_out = sorted({int(line.split()[1]) for piece in val for line in piece.splitlines()})
    runs = 1 + sum(b != a + 1 for a, b in itertools.pairwise(held_out))
    assert runs == VAL_PIECES  # contiguous runs of documents, one per piece
    assert held_out[0] > 0 and held_out[-1] < 2999  # the corpus's ends are trained on


def test_held_out_text_cut_from_a_training_document_counts_as_trained_on() -> None:
    book = "".join(f"Line {i} of a book that is long enough.\n" for i in range(200))
    tail = book[-MIN_CUT_CHARS:]
    assert documents_trained_on([tail], [book]) == [0]
    # Shorter: a line or heading may just be common text.
    assert documents_trained_on([tail[1:]], [book]) == []
    # The same document counts whatever its length; other text does not.
    assert documents_trained_on(["Short.", tail, tail + "!"], ["Short.", book]) == [0, 1]
    # Found among many training documents, short ones included.
    assert documents_trained_on([tail], ["x", "y" * 5000, book, "z"]) == [0]


def test_the_longest_held_out_documents_are_the_ones_looked_for_in_training_text() -> None:
    # --val-data of many files, one of them cut from a training book: the lookups go to
    # the longest held-out documents, which a file cut from a book is.
    book = "".join(f"Line {i} of a book that is long enough.\n" for i in range(400))
    cut = book[-3000:]
    others = [f"Held-out note {i}: " + "unrelated words " * 20 for i in range(40)]
    assert all(MIN_CUT_CHARS <= len(o) < len(cut) for o in others)
    assert documents_trained_on([*others, cut], [book]) == [len(others)]
    # A shorter held-out document found in a training one shorter than the longest.
    chapter = book[:1000]
    assert documents_trained_on([cut + "x" * 2000, chapter[-300:]], [chapter]) == [1]
    # Found in a training document one character longer than itself.
    assert documents_trained_on([book[1:]], [book]) == [0]


def test_a_held_out_text_of_min_cut_chars_cut_from_training_text_is_refused_not_left_out() -> None:
    # The length from which a held-out text found in a training one counts as cut from it
    # is the length from which the run refuses it: not a warning that drops it as common
    # text, the run then scored on the rest.
    book = "".join(f"Line {i} of a book that is long enough.\n" for i in range(200))
    tail, other = book[-MIN_CUT_CHARS:], "Other held-out text, never trained on.\n" * 10
    with pytest.raises(CorpusError, match="held-out text must not be trained on"):
        held_out_only([other, tail], [book])
    # One character shorter: common text, left out of the held-out text.
    assert held_out_only(
        [other, book[-MIN_CUT_CHARS + 1 :]], [book, book[-MIN_CUT_CHARS + 1 :]]
    ) == [other]


def test_one_long_line_ending_in_a_newline_still_holds_out_the_fraction() -> None:
    # A document of one line (minified text, a paragraph per file): with no line start
    # to move to, cuts fall inside the line rather than past its end.
    text = " ".join(f"word{i}" for i in range(20_000)) + "\n"
    train, val = split_documents([text], 0.1)
    assert sum(map(len, val)) == pytest.approx(0.1 * len(text), rel=0.02)
    assert sum(map(len, train + val)) == len(text)  # nothing lost


def test_no_document_of_either_split_is_whitespace_alone() -> None:
    documents = ["\n\n", numbered_lines(400), "   \n", numbered_lines(400), "\t"]
    train, val = split_documents(documents, 0.1)
    assert train and val
    assert all(doc.strip() for doc in train + val)


def test_a_piece_due_at_a_documents_first_character_starts_there() -> None:
    # 16,384 characters at 0.5: pieces of 512 every 1,024, the first due at 256, where
    # the second document begins: a line start, whatever character ends the document
    # (doc[index - 1] at index 0 is its last), so the piece starts with its first line.
    first = "a" * 255 + "\n"
    lines = "".join(f"line {i:05d} of the second document\n" for i in range(1000))
    second = lines[: 16_384 - len(first) - 1] + "x"  # no line break at its end
    train, val = split_documents([first, second], 0.5)
    assert train[0] == first
    assert second.startswith(val[0]) and len(val[0]) >= 512


def test_short_one_line_documents_are_held_out_whole_not_cut_between_the_splits() -> None:
    # A jsonl of one-line records (no line break to move a cut to): the record where a
    # piece starts or ends was cut mid-sentence, its start trained on and its end held out.
    documents = [f"Record {d:04d} says something short but whole." for d in range(3000)]
    train, val = split_documents(documents, 0.05)
    whole = set(documents)
    assert [doc for doc in train + val if doc not in whole] == []
    total = sum(map(len, documents))
    assert sum(map(len, val)) == pytest.approx(0.05 * total, rel=0.05)
    assert sum(map(len, train)) + sum(map(len, val)) == total  # nothing lost


@pytest.mark.parametrize("n", range(40, 60))
def test_a_small_corpus_of_one_line_records_holds_out_the_records_nearest_its_piece(n: int) -> None:
    # One piece of ~100 characters over records of 24 (no line break to move a cut to):
    # each end of the piece goes to the record boundary nearer to it, so the records
    # held out are within half a record of the piece at each end, not a record short.
    documents = [f"Record {d:04d} is one line." for d in range(n)]
    train, val = split_documents(documents, 0.1)
    total = sum(map(len, documents))
    assert abs(sum(map(len, val)) - 0.1 * total) <= len(documents[0])
    assert sum(map(len, train)) + sum(map(len, val)) == total  # nothing lost


def test_a_long_held_out_document_equal_to_a_training_one_counts_as_trained_on() -> None:
    # Equal, not cut from a longer one: no training document is longer, and the search
    # for cuts must not undo what the equality found.
    book = "".join(f"Line {i} of a book that is long enough.\n" for i in range(200))
    assert len(book) >= MIN_CUT_CHARS
    assert documents_trained_on([book], [book]) == [0]
    assert documents_trained_on(["Other text.", book], ["x", book]) == [1]


def test_a_large_validation_share_is_held_out_in_more_pieces_not_longer_ones() -> None:
    # 250 kB held out of 500 kB: pieces of at most VAL_PIECE_CHARS[1] (to the line's
    # end), so more of them than VAL_PIECES, still the fraction asked in all.
    text = numbered_lines(20_000)
    _, val = split_documents([text], 0.5)
    line = len(numbered_lines(1))
    assert max(map(len, val)) <= VAL_PIECE_CHARS[1] + line
    assert len(val) >= 0.5 * len(text) / (VAL_PIECE_CHARS[1] + line)
    assert len(val) > VAL_PIECES
    assert sum(map(len, val)) == pytest.approx(0.5 * len(text), rel=0.02)


def test_one_line_records_up_to_a_piece_long_are_held_out_whole_by_the_piece_over_them() -> None:
    # Five records of 12 characters, 0.3 held out: one piece of 18, characters 21 to 39.
    # It starts 9 into record 1 (nearer its end: not held out) and is taken on into the
    # records after as far as it was due, ending 3 into record 3 (nearer its start: not
    # held out): record 2 alone, the one it covers.
    records = [f"Record {d:04d} " for d in range(5)]
    train, val = split_documents(records, 0.3)
    assert val == [records[2]]
    assert train == [*records[:2], *records[3:]]
    # A record exactly a piece long (12 of 120 at 0.1) is still a record, held out whole.
    records = [f"Record {d:04d} " for d in range(10)]
    train, val = split_documents(records, 0.1)
    assert val == [records[5]]
    assert train == [*records[:5], *records[6:]]


def test_a_piece_carried_into_the_next_documents_ends_where_it_was_due() -> None:
    # One piece of 31 characters, due at character 10 of document 1: moved to its last
    # line's start, it reaches past the document's end, is carried 20 characters into
    # document 2 and ends in that one's last line, nearer its start: that line and all of
    # document 3 are trained on.
    documents = [f"Doc {d} line one\n" + "r" * 11 for d in range(4)]
    train, val = split_documents(documents, 0.3)
    assert val == ["r" * 11, "Doc 2 line one\n"]
    assert train == [documents[0], "Doc 1 line one\n", "r" * 11, documents[3]]
