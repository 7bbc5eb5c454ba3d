"""Incremental detokenization: token ids in, UTF-8-safe text deltas out.

Each token maps to its raw bytes once, up front (model.token_bytes), so a step costs a
table lookup plus an incremental UTF-8 decoder call, never a re-decode of the text
so far. The decoder keeps an incomplete multi-byte character until its last byte
arrives, so a character split across tokens is never emitted as U+FFFD; bytes that
can never form a character become U+FFFD exactly as a one-shot decode would, so
the concatenated deltas always equal the text decoded in one go, but for its end: a
text cut inside a character (by max_tokens or end-of-text) ends before that
character, where a one-shot decode would end in U+FFFD.

Stop strings are held back: text that could be the start of a stop string is not
emitted until it cannot be; a stop string found (even across token boundaries)
ends the text just before it, and is never emitted itself (`stop_string` names it).
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence


class IncrementalDetokenizer:
    def __init__(self, table: Sequence[bytes], stop: Sequence[str] = ()) -> None:
        self._table = table
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stop = tuple(stop)
        self._pending = ""  # decoded but not yet emitted (a possible stop-string start)
        self.stop_string: str | None = None  # the stop string found: the text is complete
        self.decoded_length = 0  # characters decoded so far, held back or not
        self.token_offset = 0  # where the text of the token last added begins

    def add(self, token_id: int) -> str:
        """The text that token `token_id` makes safe to emit (often "", never U+FFFD
        for a split character)."""
        text, before = _decode_next(self._utf8, self._table[token_id])
        self.token_offset = self.decoded_length + before
        self.decoded_length += len(text)
        return self._release(text)

    def finish(self) -> str:
        """Everything still held back (the text ended without a stop string) but the
        bytes of a character the text ends inside: they are no text. After a stop
        string, nothing: bytes the decoder still holds came after it."""
        if self.stop_string is not None:
            return ""
        held, _ = self._utf8.getstate()
        # Bytes that could begin no character become U+FFFD, as in a one-shot decode.
        tail = "" if _could_begin_a_character(held) else self._utf8.decode(b"", final=True)
        self._utf8.reset()
        self.decoded_length += len(tail)
        # A stop string the tail completes leaves nothing pending: only the text before it.
        text, self._pending = self._release(tail) + self._pending, ""
        return text

    def _release(self, text: str) -> str:
        if not self._stop:
            return text
        pending = self._pending + text
        found = [(i, stop) for stop in self._stop if (i := pending.find(stop)) >= 0]
        if found:
            # Completed by this token: the one beginning earliest; of two beginning at
            # the same place, the first listed (min keeps the first).
            cut, self.stop_string = min(found, key=lambda position_stop: position_stop[0])
            self._pending = ""
            return pending[:cut]
        hold = max(_overlap(pending, s) for s in self._stop)
        self._pending = pending[len(pending) - hold :]
        return pending[: len(pending) - hold]


def text_offsets(table: Sequence[bytes], token_ids: Sequence[int]) -> list[int]:
    """Where each token's text begins in the text of `token_ids`, in characters: how many
    the tokens before it make (a character split across tokens counts once complete, as
    the completing token's; a byte that can form none, as its own token's U+FFFD)."""
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
    offsets, length = [], 0
    for token_id in token_ids:
        text, before = _decode_next(utf8, table[token_id])
        offsets.append(length + before)
        length += len(text)
    return offsets


def _decode_next(utf8: codecs.IncrementalDecoder, data: bytes) -> tuple[str, int]:
    """(the text `utf8` decodes of `data` next, how many of its first characters are the
    U+FFFD of bytes it held from before `data`, which `data` shows can form no character).
    A character `data` completes is `data`'s: its text begins with it."""
    held, _ = utf8.getstate()
    text = utf8.decode(data)
    if held and text.startswith(replaced := held.decode("utf-8", errors="replace")):
        return text, len(replaced)
    return text, 0


def _could_begin_a_character(held: bytes) -> bool:
    """Whether more bytes could make `held` (what the UTF-8 decoder keeps back) one
    character. CPython's incremental decoder keeps back every such start, and also ED
    A0-BF: the start of a surrogate, which none can make valid."""
    return not (len(held) >= 2 and held[0] == 0xED and held[1] >= 0xA0)


def _overlap(text: str, stop: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `stop`."""
    for n in range(min(len(text), len(stop) - 1), 0, -1):
        if text.endswith(stop[:n]):
            return n
    return 0
