"""Incremental detokenization with the real byte-level tokenizer."""

from __future__ import annotations

import pytest
from server_harness import english_tokenizer
from tokenizers import Tokenizer, decoders, models

from model.checkpoint import END_OF_TEXT
from model.token_bytes import token_bytes
from server.detokenizer import IncrementalDetokenizer, text_offsets

MIXED_TEXT = "Hello 世界! Emoji 🙂🚀 and more: naïve café, 中文字符."


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return english_tokenizer()


@pytest.fixture(scope="module")
def table(tokenizer: Tokenizer) -> list[bytes]:
    return token_bytes(tokenizer)


def stream(table: list[bytes], ids: list[int], stop: tuple[str, ...] = ()) -> list[str]:
    detokenizer = IncrementalDetokenizer(table, stop)
    deltas = []
    for token_id in ids:
        deltas.append(detokenizer.add(token_id))
        if detokenizer.stop_string is not None:
            return deltas
    return [*deltas, detokenizer.finish()]


def test_token_bytes_agree_with_the_tokenizer(tokenizer, table):
    ids = tokenizer.encode(MIXED_TEXT, add_special_tokens=False).ids
    assert b"".join(table[i] for i in ids).decode("utf-8") == MIXED_TEXT
    assert table[tokenizer.token_to_id(END_OF_TEXT)] == b""  # special: skipped, as decode does


def test_split_characters_are_held_until_complete(tokenizer, table):
    ids = tokenizer.encode(MIXED_TEXT, add_special_tokens=False).ids
    assert len(ids) > len(MIXED_TEXT.encode("utf-8")) / 2  # non-ASCII is split into bytes
    deltas = stream(table, ids)
    assert "".join(deltas) == MIXED_TEXT == tokenizer.decode(ids)
    assert not any("\ufffd" in d for d in deltas)
    assert "" in deltas  # some tokens carried only part of a character


def test_invalid_bytes_become_replacement_characters_like_a_one_shot_decode(tokenizer, table):
    lone = [tokenizer.token_to_id(c) for c in ("\u00a2", "\u00a3")]  # bytes 0xa2 0xa3 alone
    ids = [*tokenizer.encode("ok ", add_special_tokens=False).ids, *lone]
    assert "".join(stream(table, ids)) == tokenizer.decode(ids) == "ok \ufffd\ufffd"


@pytest.mark.parametrize("cut", [1, 2, 3])
def test_a_text_cut_inside_a_character_ends_before_it(tokenizer, table, cut):
    # max_tokens (or end-of-text) can end the text between the bytes of one character.
    rocket = [tokenizer.token_to_id(c) for c in "ðŁļĢ"]  # 🚀's 4 bytes, one token each
    ids = [*tokenizer.encode("go ", add_special_tokens=False).ids, *rocket[:cut]]
    assert tokenizer.decode(ids) == "go \ufffd"  # what a one-shot decode makes of it
    assert stream(table, ids) == ["g", "o", " ", *[""] * cut, ""]


def test_a_text_ending_in_the_start_of_a_surrogate_ends_in_replacements(tokenizer, table):
    # ED BA begins no character (it would encode a surrogate), though Python's decoder
    # keeps it back as if it might: it is invalid bytes, not a cut character.
    ids = [tokenizer.token_to_id(c) for c in ("í", "º")]  # bytes 0xed and 0xba alone
    assert [table[i] for i in ids] == [b"\xed", b"\xba"]
    assert "".join(stream(table, ids)) == tokenizer.decode(ids) == "\ufffd\ufffd"


@pytest.mark.parametrize("stop", ["世界", "o 世", "🚀 and", "more:"])
def test_stop_string_is_never_emitted_even_across_tokens(tokenizer, table, stop):
    ids = tokenizer.encode(MIXED_TEXT, add_special_tokens=False).ids
    deltas = stream(table, ids, (stop, "never there"))
    text = "".join(deltas)
    assert text == MIXED_TEXT[: MIXED_TEXT.index(stop)]
    assert stop not in text


def test_the_stop_string_earliest_in_the_text_ends_it_and_is_named(tokenizer, table):
    # "café" is listed first and "🚀" held back across its four byte tokens: the stop
    # that comes first in the text wins, whatever the list's order.
    detokenizer = IncrementalDetokenizer(table, ("café", "🚀", "never there"))
    text = ""
    for token_id in tokenizer.encode(MIXED_TEXT, add_special_tokens=False).ids:
        text += detokenizer.add(token_id)
        if detokenizer.stop_string is not None:
            break
    assert (text, detokenizer.stop_string) == ("Hello 世界! Emoji 🙂", "🚀")
    assert detokenizer.finish() == ""


def test_possible_stop_prefix_is_held_back_then_released(table, tokenizer):
    detokenizer = IncrementalDetokenizer(table, ("abcd",))
    emitted = "".join(detokenizer.add(tokenizer.token_to_id(c)) for c in "xab")
    assert emitted == "x"  # "ab" might begin "abcd"
    emitted += detokenizer.add(tokenizer.token_to_id("z"))
    assert emitted == "xabz" and detokenizer.stop_string is None
    assert detokenizer.add(tokenizer.token_to_id("a")) == ""
    assert detokenizer.finish() == "a"  # the text ended: nothing left to hold back for


def test_two_stop_strings_completed_by_one_token_end_at_the_earlier(table, tokenizer):
    detokenizer = IncrementalDetokenizer(table, ("cd", "bcd"))
    text = "".join(detokenizer.add(tokenizer.token_to_id(c)) for c in "abcd")
    assert (text, detokenizer.stop_string) == ("a", "bcd")


@pytest.mark.parametrize("second", [b"\xa0", b"\xbf"])
def test_a_text_ending_in_any_start_of_a_surrogate_ends_in_replacements(second: bytes) -> None:
    # ED A0 to ED BF begin surrogates: invalid, not a cut character, at either end of
    # the range.
    tokenizer = english_tokenizer()
    table = token_bytes(tokenizer)
    ids = [table.index(b"\xed"), table.index(second)]
    assert "".join(stream(table, ids)) == tokenizer.decode(ids) == "\ufffd\ufffd"


def test_a_stop_string_whose_start_repeats_is_held_back_whole() -> None:
    # "aa" could begin "aab" as a whole, not only its last "a".
    tokenizer = english_tokenizer()
    table = token_bytes(tokenizer)
    detokenizer = IncrementalDetokenizer(table, ("aab",))
    text = "".join(detokenizer.add(tokenizer.token_to_id(c)) for c in "xaab")
    assert (text, detokenizer.stop_string) == ("x", "aab")


def test_text_released_at_the_end_keeps_its_order_around_a_held_stop_prefix() -> None:
    # The flush turns ED A0 into replacements: "a" (held: it could begin "aQ") comes
    # first, the last U+FFFD (held: it could begin "\ufffdZ") last, as in a one-shot
    # decode.
    tokenizer = english_tokenizer()
    table = token_bytes(tokenizer)
    ids = [tokenizer.token_to_id("a"), table.index(b"\xed"), table.index(b"\xa0")]
    detokenizer = IncrementalDetokenizer(table, ("aQ", "\ufffdZ"))
    text = "".join(detokenizer.add(i) for i in ids) + detokenizer.finish()
    assert text == tokenizer.decode(ids) == "a\ufffd\ufffd"
    assert detokenizer.stop_string is None


@pytest.mark.parametrize(("stop", "named"), [(("in", "i"), "in"), (("i", "in"), "i")])
def test_of_two_stop_strings_found_at_one_place_the_first_listed_is_named(
    table, tokenizer, stop, named
):
    # "in" is one token: both stop strings are found at once, beginning at one place.
    ids = tokenizer.encode("xin", add_special_tokens=False).ids
    assert [table[i] for i in ids] == [b"x", b"in"]
    detokenizer = IncrementalDetokenizer(table, stop)
    text = "".join(detokenizer.add(i) for i in ids)
    assert (text, detokenizer.stop_string) == ("x", named)


def test_finish_after_a_stop_string_adds_nothing_of_the_bytes_after_it() -> None:
    # A token completing the stop string and ending in the start of a surrogate: at the
    # end of the text those bytes would be U+FFFDs, but they come after the stop string.
    table = [b"x", b"ab\xed\xa0"]
    detokenizer = IncrementalDetokenizer(table, ("ab",))
    assert detokenizer.add(0) + detokenizer.add(1) == "x"
    assert detokenizer.stop_string == "ab"
    assert detokenizer.finish() == "" and detokenizer.stop_string == "ab"


def test_a_stop_string_the_end_of_the_text_completes_ends_it() -> None:
    # ED A0 is held back until the text ends, then becomes two U+FFFDs: the first is the
    # stop string.
    tokenizer = english_tokenizer()
    table = token_bytes(tokenizer)
    ids = [tokenizer.token_to_id("a"), table.index(b"\xed"), table.index(b"\xa0")]
    detokenizer = IncrementalDetokenizer(table, ("\ufffd",))
    assert "".join(detokenizer.add(i) for i in ids) == "a"
    assert detokenizer.stop_string is None
    assert detokenizer.finish() == "" and detokenizer.stop_string == "\ufffd"


def test_added_tokens_stream_their_text_and_special_ones_nothing() -> None:
    # A checkpoint's tokenizer may hold tokens added past its trained vocabulary (HF's
    # add_tokens, a chat model's <|im_end|>): a plain one is its text, a special one
    # nothing, as a one-shot decode has them.
    tokenizer = english_tokenizer()
    tokenizer.add_tokens(["<tool>"])
    tokenizer.add_special_tokens(["<|im_end|>"])
    table = token_bytes(tokenizer)
    assert len(table) == tokenizer.get_vocab_size(with_added_tokens=True)
    ids = [*tokenizer.encode("call <tool> now").ids, tokenizer.token_to_id("<|im_end|>")]
    assert tokenizer.token_to_id("<tool>") in ids
    assert b"".join(table[i] for i in ids).decode() == tokenizer.decode(ids) == "call <tool> now"


def test_a_tokenizer_whose_tokens_are_not_bytes_is_refused_saying_why() -> None:
    metaspace = english_tokenizer()  # SentencePiece-style: its pieces are no byte strings
    metaspace.decoder = decoders.Metaspace()
    with pytest.raises(ValueError, match=r"unsupported tokenizer decoder \(Metaspace\)"):
        token_bytes(metaspace)
    # No decoder at all is named as such, not as "NoneType".
    metaspace.decoder = None
    with pytest.raises(ValueError, match=r"unsupported tokenizer decoder \(none\)"):
        token_bytes(metaspace)
    # A hand-edited vocabulary: a character GPT-2's byte alphabet has no byte for.
    edited = Tokenizer(models.BPE(vocab={"a": 0, "中": 1}, merges=[]))
    edited.decoder = decoders.ByteLevel()
    with pytest.raises(ValueError, match=r"token 1 \('中'\) is not in the byte-level BPE"):
        token_bytes(edited)
    # Ids with a gap between them: 2 tokens, the second at id 2, past the ids 0..1 every
    # reader sizes its tables by (the model's rows: a prompt spelling it indexed past them).
    gapped = Tokenizer(models.BPE(vocab={"a": 0, "c": 2}, merges=[]))
    gapped.decoder = decoders.ByteLevel()
    with pytest.raises(
        ValueError, match=r"token 2 \('c'\) is past the ids of its 2 tokens \(0..1\)"
    ):
        token_bytes(gapped)


@pytest.mark.parametrize(
    ("tokens", "offsets"),
    [
        # A lone lead byte: its U+FFFD, out once "attr" shows it starts no character, is
        # its own token's text, before "attr".
        ([b"\xdd", b"attr"], [0, 1]),
        ([b"\xff", b"b"], [0, 1]),  # replaced at once: nothing held
        ([b"\xc3", b"\xa9x"], [0, 0]),  # "é" split: the token completing it begins with it
        # E4 B8 make one U+FFFD, out at "x": the B8 token begins in it, "x" after it.
        ([b"a", b"\xe4", b"\xb8", b"x"], [0, 1, 1, 2]),
        ([b"\xed\xa0", b"\x80z"], [0, 2]),  # a surrogate's start: a U+FFFD a byte
    ],
)
def test_a_tokens_text_offset_is_after_the_replacements_of_the_bytes_before_it(
    tokens: list[bytes], offsets: list[int]
) -> None:
    ids = list(range(len(tokens)))  # token i spells tokens[i]
    assert text_offsets(tokens, ids) == offsets
    detokenizer = IncrementalDetokenizer(tokens)
    added = []
    for token_id in ids:
        detokenizer.add(token_id)
        added.append(detokenizer.token_offset)
    assert added == offsets


def test_the_text_a_finish_flushes_counts_before_the_end_of_text_token() -> None:
    # A surrogate's start can begin no character: the end of the text makes it two U+FFFD,
    # so the end-of-text token drawn next begins after them (the engine's text_offset).
    detokenizer = IncrementalDetokenizer([b"\xed\xa0"])
    assert detokenizer.add(0) == ""
    assert detokenizer.finish() == "\ufffd\ufffd"
    assert detokenizer.decoded_length == 2
