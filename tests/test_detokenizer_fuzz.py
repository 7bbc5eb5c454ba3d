"""Property-based fuzzing of the incremental detokenizer and stop-string holdback.

For random token sequences (from a real byte-level tokenizer trained on English, so
multi-byte characters are split across tokens) and random stop strings: the
concatenated deltas equal a one-shot decode (less a character the text ends inside)
cut at the first stop string, a stop string is never emitted, and no U+FFFD appears
that the one-shot decode lacks.
"""

from __future__ import annotations

from functools import cache

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from server_harness import english_tokenizer
from test_detokenizer import stream
from tokenizers import Tokenizer

from model.token_bytes import token_bytes

# Stop strings drawn from text that tokens really produce, multi-byte included.
STOP_ALPHABET = "ab e.\n世界🙂é"


@cache
def tokenizer() -> Tokenizer:
    return english_tokenizer()


@cache
def table() -> list[bytes]:
    return token_bytes(tokenizer())


def stop_strings(max_size: int) -> st.SearchStrategy[list[str]]:
    one = st.lists(st.sampled_from(STOP_ALPHABET), min_size=1, max_size=max_size).map("".join)
    return st.lists(one, max_size=4)


def token_ids() -> st.SearchStrategy[list[int]]:
    return st.lists(st.integers(0, len(table()) - 1), max_size=60)


def without_a_cut_character(data: bytes) -> bytes:
    """`data` less its last 1-3 bytes where they begin a character the data ends inside."""
    for k in (1, 2, 3):
        try:
            data[-k:].decode("utf-8")
        except UnicodeDecodeError as e:
            if e.start == 0 and e.reason == "unexpected end of data":
                return data[:-k]
    return data


def one_shot(ids: list[int], stops: tuple[str, ...]) -> str:
    data = without_a_cut_character(b"".join(table()[i] for i in ids))
    text = data.decode("utf-8", errors="replace")
    cuts = [i for i in (text.find(s) for s in stops) if i >= 0]
    return text[: min(cuts)] if cuts else text


# Derandomized, without an example database: the same 400 cases every run, so that a
# run's result does not depend on the machine's history.
FUZZ = settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=True,
    database=None,
)


@FUZZ
@given(ids=token_ids())
def test_deltas_concatenate_to_the_one_shot_decode(ids: list[int]) -> None:
    deltas = stream(table(), ids, ())
    assert "".join(deltas) == one_shot(ids, ())
    # U+FFFD only where the bytes themselves are invalid, never from a split character.
    assert sum(d.count("\ufffd") for d in deltas) == one_shot(ids, ()).count("\ufffd")


@FUZZ
@given(
    ids=token_ids(),
    stops=stop_strings(4).filter(bool),
)
def test_stop_strings_are_never_emitted_and_cut_the_text(ids: list[int], stops: list[str]) -> None:
    stop = tuple(stops)
    deltas = stream(table(), ids, stop)
    text = "".join(deltas)
    assert text == one_shot(ids, stop)
    assert not any(s in text for s in stop)


@FUZZ
@given(
    text=st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=40),
    stops=stop_strings(3),
)
def test_any_unicode_text_round_trips_through_the_stream(text: str, stops: list[str]) -> None:
    ids = tokenizer().encode(text, add_special_tokens=False).ids
    assert "".join(stream(table(), ids, tuple(stops))) == one_shot(ids, tuple(stops))
    if not stops:
        assert "".join(stream(table(), ids, ())) == text
