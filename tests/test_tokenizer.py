"""`<|endoftext|>` spelled in text is text: only the trainer and the server put the
separator's id into a token stream."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, normalizers, pre_tokenizers

from model.checkpoint import END_OF_TEXT, load_tokenizer, read_tokenizer_file
from training.corpus import CorpusError
from training.prepare import check_tokenizer, prepare
from training.tokenizer import MIN_VOCAB, train_tokenizer, with_special_tokens

QUOTING = f"The separator is written {END_OF_TEXT} in this sentence."


def test_the_marker_in_text_encodes_as_text_trained_or_loaded(
    tokenizer: Tokenizer, tiny_checkpoint: Path
) -> None:
    for tok in (tokenizer, load_tokenizer(tiny_checkpoint)):
        ids = tok.encode(QUOTING).ids
        assert tok.token_to_id(END_OF_TEXT) not in ids
        assert tok.decode(ids) == QUOTING


def test_a_tokenizer_saved_truncating_and_padding_encodes_every_text_whole(
    tokenizer: Tokenizer, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    # transformers saves the truncation and padding of its last padded call into
    # tokenizer.json: every training document and prompt was cut to 8 tokens.
    text = QUOTING * 4
    whole = tokenizer.encode(text).ids
    folder = tmp_path / "checkpoint"
    shutil.copytree(tiny_checkpoint, folder)
    saved = Tokenizer.from_file(str(folder / "tokenizer.json"))
    saved.enable_truncation(max_length=8)
    saved.enable_padding(length=64)
    saved.save(str(folder / "tokenizer.json"))
    for loaded in (load_tokenizer(folder), read_tokenizer_file(folder / "tokenizer.json")):
        assert loaded.encode(text).ids == whole
        assert [e.ids for e in loaded.encode_batch([text, "short"])] == [
            whole,
            tokenizer.encode("short").ids,
        ]


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


def _gpt2_style(vocab: dict[str, int], merges: list[list[str]]) -> dict:
    """A tokenizer.json as transformers writes GPT-2's, with this vocabulary."""
    byte_level = {"add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {
                "id": vocab[END_OF_TEXT],
                "content": END_OF_TEXT,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": True,
            }
        ],
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", **byte_level},
        "post_processor": {"type": "ByteLevel", **byte_level},
        "decoder": {"type": "ByteLevel", **byte_level},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": "",
            "end_of_word_suffix": "",
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": merges,
        },
    }


def test_a_byte_level_tokenizer_that_drops_or_changes_text_is_refused(
    tokenizer: Tokenizer, tmp_path: Path
) -> None:
    # GPT-2's layout, but without most bytes' tokens: BPE with no unknown token drops
    # what it cannot spell ("zz", "é" vanished), so bits per byte counted fewer bytes
    # than the text has and the model never saw them.
    partial = tmp_path / "partial.json"
    vocab = {END_OF_TEXT: 0, "a": 1, "b": 2, "Ġ": 3, "Ġa": 4}
    partial.write_text(json.dumps(_gpt2_style(vocab, [["Ġ", "a"]])), encoding="utf-8")
    with pytest.raises(CorpusError, match=r"partial\.json: .*lacks 240 of the byte tokens"):
        check_tokenizer(read_tokenizer_file(partial), str(partial))
    # Every byte, GPT-2's alphabet in GPT-2's order: accepted.
    whole = tmp_path / "whole.json"
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet(), key=lambda c: (ord(c) > 255, ord(c)))
    vocab = {END_OF_TEXT: 256} | {c: i for i, c in enumerate(alphabet)}
    whole.write_text(json.dumps(_gpt2_style(vocab, [])), encoding="utf-8")
    accepted = check_tokenizer(read_tokenizer_file(whole), str(whole))
    text = "zz é 中文 🙂\tend\n"
    assert accepted.decode(accepted.encode(text).ids) == text
    # A SentencePiece-style pre-tokenizer before a byte-level decoder: spaces become "▁",
    # which no byte stands for, and "é" one byte of a character.
    metaspace = Tokenizer.from_str(tokenizer.to_str())
    metaspace.pre_tokenizer = pre_tokenizers.Metaspace()
    metaspace.save(str(tmp_path / "metaspace.json"))
    with pytest.raises(CorpusError, match=r"metaspace\.json: encodes .* as "):
        check_tokenizer(read_tokenizer_file(tmp_path / "metaspace.json"), "metaspace.json")


def test_a_tokenizer_lacking_byte_tokens_is_refused_naming_the_first_it_lacks(
    tmp_path: Path,
) -> None:
    # The example byte is the lowest missing one (0x00, GPT-2's "Ā"), so that the
    # message points at where to start looking.
    vocab = {END_OF_TEXT: 0, "a": 1, "b": 2, "Ġ": 3}
    partial = Tokenizer.from_str(json.dumps(_gpt2_style(vocab, [])))
    with pytest.raises(CorpusError, match=r"\(e\.g\. byte 0x00, 'Ā'\)"):
        check_tokenizer(partial, "partial.json")


def test_a_byte_level_tokenizer_whose_normalizer_changes_text_reads_its_normalized_bytes(
    tokenizer: Tokenizer,
) -> None:
    # An NFC normalizer (as some HF tokenizers have) turns "e\u0301" into "é": its tokens
    # are the bytes of the text as normalized, which is what bits per byte then counts.
    nfc = Tokenizer.from_str(tokenizer.to_str())
    nfc.normalizer = normalizers.Sequence([tokenizer.normalizer, normalizers.NFC()])
    assert check_tokenizer(nfc, "nfc.json") is nfc


def test_a_tokenizer_given_chat_markers_still_encodes_the_separator_in_text_as_text(
    tokenizer: Tokenizer,
) -> None:
    # with_special_tokens copies the tokenizer through its JSON, which does not hold the
    # runtime setting that reads a special token's spelling as text.
    chat = with_special_tokens(tokenizer, ("<|im_start|>", "<|im_end|>"))
    text = f"{QUOTING} And <|im_end|> typed by a user."
    ids = chat.encode(text).ids
    assert chat.get_vocab_size() == tokenizer.get_vocab_size() + 2
    assert chat.token_to_id(END_OF_TEXT) not in ids
    assert chat.token_to_id("<|im_end|>") not in ids
    assert chat.decode(ids) == text


def test_a_trained_tokenizers_offsets_cover_each_tokens_text_spaces_included(
    tokenizer: Tokenizer,
) -> None:
    # transformers' return_offsets_mapping reads them: a token " world" spans its space,
    # so the spans of a text's tokens put together are the text (here no character split
    # into byte tokens, which each span the whole character).
    text = "The cat sees  the moon. 你好"
    encoding = tokenizer.encode(text)
    assert "".join(text[start:end] for start, end in encoding.offsets) == text


def test_a_pair_of_bytes_is_merged_only_once_seen_twice() -> None:
    # A merge learned from a single occurrence spends the vocabulary on what the corpus
    # says once (a name, an id), not on what it repeats.
    assert train_tokenizer(["qz"], 300).get_vocab_size() == MIN_VOCAB
    twice = train_tokenizer(["qz qz"], 300)
    assert twice.get_vocab_size() == MIN_VOCAB + 1 and twice.encode("qz").tokens == ["qz"]
