"""Byte-level BPE tokenizer (the `tokenizers` library), GPT-2 style.

Byte-level means every string round-trips: any UTF-8 text, Chinese or emoji
included, encodes to ids and decodes back to exactly the same text, but for Windows
line ends: the tokenizer reads CRLF as "\n", as the trainer reads its text files
(corpus.py), so a prompt sent with CRLF is the text the model learned. The only
special token is `<|endoftext|>`, which separates documents during training; a
chat template's markers are added to it for a fine-tune on conversations.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from tokenizers import (
    AddedToken,
    Tokenizer,
    decoders,
    models,
    pre_tokenizers,
    processors,
    trainers,
)

from model.checkpoint import END_OF_TEXT, crlf_as_newline, text_literally

MIN_VOCAB = 256 + 1  # every byte plus <|endoftext|>
# Names what train_tokenizer makes in the token cache's key (training/prepare.py): a new
# name with every change to the tokenizer it trains, so that a cache an older trainer
# wrote, with its tokenizer, is not taken for this one's (2: CRLF read as "\n").
TRAINED_KIND = "bpe2"


def untrained_tokenizer() -> Tokenizer:
    """The byte-level BPE train_tokenizer trains, before it has learned a merge: how it
    reads and splits text (its normalizer and pre-tokenizer) and writes it back."""
    tokenizer = Tokenizer(models.BPE())
    # In tokenizer.json, so the server and transformers read a CRLF prompt as the trainer
    # reads a CRLF file: a model trained here never saw "\r".
    tokenizer.normalizer = crlf_as_newline()
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    return tokenizer


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE with `vocab_size` entries (including `<|endoftext|>`)."""
    if vocab_size < MIN_VOCAB:
        raise ValueError(f"vocab_size must be >= {MIN_VOCAB} (got {vocab_size})")
    tokenizer = untrained_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return text_literally(tokenizer)


def with_special_tokens(tokenizer: Tokenizer, tokens: Sequence[str]) -> Tokenizer:
    """A copy of `tokenizer` with those of `tokens` it lacks added as special tokens (new
    ids after its own), each read as text where a text spells it (text_literally)."""
    copy = text_literally(Tokenizer.from_str(tokenizer.to_str()))
    missing = [token for token in tokens if copy.token_to_id(token) is None]
    copy.add_special_tokens(
        [AddedToken(token, special=True, normalized=False) for token in missing]
    )
    return copy
