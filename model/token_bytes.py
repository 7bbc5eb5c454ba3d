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
    table = _byte_decoder()
    added = tokenizer.get_added_tokens_decoder()
    out = []
    for token_id in range(tokenizer.get_vocab_size(with_added_tokens=True)):
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
