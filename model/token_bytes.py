"""The bytes each token id stands for, read from a byte-level BPE tokenizer (the kind
the trainer writes): what the server's detokenizer streams and what bits per byte counts.
"""

from __future__ import annotations

from functools import cache

from tokenizers import Tokenizer, decoders


@cache
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: printable stand-in character -> byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    chars = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return {c: b for b, c in chars.items()}


def token_bytes(tokenizer: Tokenizer) -> list[bytes]:
    """Raw bytes of every token id; special tokens decode to nothing (as in `decode`).

    Needs a byte-level BPE (what the trainer writes): its token strings are bytes
    in GPT-2's printable alphabet, so the mapping is exact. ValueError for another kind.
    """
    decoder = tokenizer.decoder
    if not isinstance(decoder, decoders.ByteLevel):
        kind = "none" if decoder is None else type(decoder).__name__
        raise ValueError(
            f"unsupported tokenizer decoder ({kind}); pocketgpt reads byte-level BPE "
            "tokenizers (GPT-2's kind, the trainer's format)"
        )
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    if vocab and vocab[last := max(vocab, key=vocab.__getitem__)] >= size:
        # Every reader takes the ids to be 0..size - 1 (the model's rows, the uint16
        # token files): a prompt spelling this token indexed past them.
        raise ValueError(
            f"token {vocab[last]} ({last!r}) is past the ids of its {size:,} tokens "
            f"(0..{size - 1}): a vocabulary with gaps in its ids"
        )
    table = _byte_decoder()
    added = tokenizer.get_added_tokens_decoder()
    out = []
    for token_id in range(size):
        token = added.get(token_id)
        if token is not None:
            out.append(b"" if token.special else token.content.encode("utf-8"))
        else:
            piece = tokenizer.id_to_token(token_id) or ""
            try:
                out.append(bytes(table[c] for c in piece))
            except KeyError:  # a hand-edited vocabulary: a character no byte stands for
                raise ValueError(
                    f"token {token_id} ({piece!r}) is not in the byte-level BPE alphabet"
                ) from None
    return out


# Bytes valid UTF-8 may hold (not 0xC0, 0xC1 or 0xF5-0xFF): a text's are among them.
TEXT_BYTES = [b for b in range(256) if b not in (0xC0, 0xC1) and b < 0xF5]
# Spaces, punctuation, accents, CJK, emoji, a tab and a line end; starting with a space,
# where a pre-tokenizer that spaces a text's start (add_prefix_space) adds none.
PROBE = " Text, 42 é e\u0301 中文 🙂\tend.\n"


def check_reads_bytes(tokenizer: Tokenizer) -> None:
    """ValueError unless `tokenizer` (a byte-level BPE: `token_bytes`) encodes text to
    tokens standing for exactly the text's bytes, as its normalizer leaves it: what bits
    per byte counts. A vocabulary without a byte's token drops what it cannot spell (BPE
    with no unknown token), and a pre-tokenizer other than a byte-level one hands BPE
    characters rather than bytes."""
    table = {b: c for c, b in _byte_decoder().items()}
    vocab = tokenizer.get_vocab(with_added_tokens=False)
    missing = [b for b in TEXT_BYTES if table[b] not in vocab]
    if missing:
        raise ValueError(
            f"its vocabulary lacks {len(missing)} of the byte tokens a byte-level BPE "
            f"needs (e.g. byte {missing[0]:#04x}, {table[missing[0]]!r}): text holding "
            "them would be dropped"
        )
    normalizer = tokenizer.normalizer
    text = normalizer.normalize_str(PROBE) if normalizer is not None else PROBE
    pieces = token_bytes(tokenizer)
    ids = tokenizer.encode(PROBE, add_special_tokens=False).ids
    read = b"".join(pieces[i] for i in ids)
    if read != text.encode("utf-8"):
        raise ValueError(
            f"encodes {text!r} as {read.decode('utf-8', 'replace')!r}: not a byte-level "
            "BPE's reading (its pre-tokenizer must be byte-level), so its tokens are not "
            "the text's bytes"
        )
