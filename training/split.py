"""The held-out text validation scores: a corpus split into training and validation
text (evenly spaced pieces of whole lines) when no --val-data is given, and which
held-out documents are training text too (a --val-data file cut from a --data one), so
that a validation loss is never measured on text the model trained on.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from training.corpus import Conversation, Document

# Validation text is held out as evenly spaced pieces: at least VAL_PIECES of them
# where the corpus allows, each 256 to 8192 characters. Spread out, they sample the
# whole corpus and training still covers its whole span; a tail split would hold
# out exactly the text nearest to what follows (on tinyshakespeare, the opening of
# the play the last 10% continues: 2.49 vs 2.24 bits/byte there after 70 s).
VAL_PIECES = 16
VAL_PIECE_CHARS = (256, 8192)
NON_SPACE = re.compile(r"\S")


# A held-out document this long found inside a training one was cut from it; a shorter
# one (a line, a heading) may just be common text.
MIN_CUT_CHARS = 200
# Each look is a scan of the training text (~25 ms per 100 MB in one document, ~4 s in
# a million): the longest few held-out documents are looked for, enough to find a
# held-out file cut from a training file.
MAX_CUT_LOOKUPS = 16


def is_long(doc: Document) -> bool:
    """Whether `doc`, held out and trained on, was cut from training text (a text of at
    least MIN_CUT_CHARS) or is the same record (a conversation), not common text."""
    return isinstance(doc, Conversation) or len(doc) >= MIN_CUT_CHARS


def documents_trained_on(val_docs: Sequence[Document], train_docs: Sequence[Document]) -> list[int]:
    """Which of `val_docs` (their indices) are training text too: equal to a training
    document, or (a text: the longest MAX_CUT_LOOKUPS of at least MIN_CUT_CHARS) part
    of a longer one."""
    train_set = set(train_docs)
    trained = [doc in train_set for doc in val_docs]
    cuts = [
        i
        for i, doc in enumerate(val_docs)
        if not trained[i] and isinstance(doc, str) and len(doc) >= MIN_CUT_CHARS
    ]
    cuts = sorted(cuts, key=lambda i: len(val_docs[i]), reverse=True)[:MAX_CUT_LOOKUPS]
    if cuts:
        shortest = len(val_docs[cuts[-1]])
        longer = [doc for doc in train_docs if isinstance(doc, str) and len(doc) > shortest]
        for i in cuts:
            trained[i] = any(val_docs[i] in doc for doc in longer)
    return [i for i, is_trained in enumerate(trained) if is_trained]


def split_conversations(
    conversations: Sequence[Conversation], val_fraction: float
) -> tuple[list[Conversation], list[Conversation]]:
    """(train, val): `val_fraction` of the distinct conversations (at least one, and one
    left to train on), whole and evenly spread, held out, each once, and none of their
    repeats trained on; both in their order."""
    distinct = list(dict.fromkeys(conversations))
    n = len(distinct)
    n_val = min(n - 1, max(1, round(n * val_fraction)))
    held_out = {distinct[int((k + 0.5) * n / n_val)] for k in range(n_val)} if n_val else set()
    train = [c for c in conversations if c not in held_out]
    return train, [c for c in distinct if c in held_out]


def split_documents(documents: Sequence[str], val_fraction: float) -> tuple[list[str], list[str]]:
    """(train, val) documents; val is `val_fraction` of the characters, in pieces.

    The text is walked in windows of `piece / val_fraction` characters; the middle
    `piece` characters of each window are validation, so the corpus's first and last
    lines train. Cuts move forward to the next line start, or, in a document's last
    line of at most `piece` characters, to the nearer of its start and the document's
    end (a one-line jsonl record is not cut between the splits), so no line is cut but
    one longer than that (minified text), cut at the exact character.
    A piece that reaches the end of its document goes on at the start of the next
    ones: short documents (a jsonl of 160-character records) held out a tenth of the
    fraction asked when each piece ended with its document.
    A corpus too small for VAL_PIECE_CHARS[0] per piece gives one piece.
    Train and validation text stay in order, each a document of its own where a cut
    or a document's end divides it.
    """
    total = sum(len(d) for d in documents)
    val_chars = total * val_fraction
    piece = min(max(val_chars / VAL_PIECES, VAL_PIECE_CHARS[0]), VAL_PIECE_CHARS[1], val_chars)
    stride = piece / val_fraction
    train: list[str] = []
    val: list[str] = []
    offset, window = 0, 0  # characters before the current document; the next window
    carried = 0  # characters of the last piece still to take from the next documents
    for doc in documents:
        pos = 0  # how far into `doc` the text is assigned
        if carried:
            pos = _line_start(doc, carried, piece)
            val.append(doc[:pos])
            carried = max(0, carried - len(doc))
        while pos < len(doc):
            start = round((window + 0.5) * stride - piece / 2) - offset
            if start >= len(doc):
                break
            due = max(start, pos)
            start = max(pos, _line_start(doc, due, piece))
            end = max(start, _line_start(doc, start + round(piece), piece))
            train.append(doc[pos:start])
            val.append(doc[start:end])
            # A start moved to the document's end (past the rest of its last line) takes
            # the piece from the next documents, as far as it was due to reach.
            carried = max(0, (due if start == len(doc) else start) + round(piece) - len(doc))
            pos, window = end, window + 1
        train.append(doc[pos:])
        offset += len(doc)
    return [t for t in train if t.strip()], [v for v in val if v.strip()]


def _line_start(doc: str, index: int, reach: float) -> int:
    """The first line start at or after `index`; in the last line (no line break follows
    with text after it), if at most `reach` characters long, the nearer of its start and
    the end of `doc` (a one-line record is not cut between the splits, nor held out more
    often than its share), in a longer one `index` itself; capped at the end of `doc`."""
    if index >= len(doc) or index == 0 or doc[index - 1] == "\n":
        return min(index, len(doc))
    newline = doc.find("\n", index)
    # (Searching, not slicing: a copy of the rest per piece made this quadratic.)
    if newline >= 0 and NON_SPACE.search(doc, newline + 1):
        return newline + 1
    line = doc.rfind("\n", 0, index) + 1
    if len(doc) - line > reach:
        return index
    return line if index - line < len(doc) - index else len(doc)
