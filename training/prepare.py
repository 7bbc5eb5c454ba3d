"""Text -> uint16 token files + meta.json, cached in a folder named by a content hash.

    <cache_root>/<sha256[:16]>/
        tokenizer.json   trained on the train split (or the one given)
        train.bin        uint16 token ids: <|endoftext|> doc <|endoftext|> doc ...
        val.bin          the same layout for the validation split
        meta.json        token and UTF-8 byte counts, the text's and the token file's
                         sha256 per split, vocab size, tokenizer.json's sha256, format
        train.loss_mask.bin, val.loss_mask.bin
                         conversations only: uint8 per token, LEARNED where the model
                         learns the token (an assistant's), CONVERSATION_START at each
                         conversation's <|endoftext|>, else 0

Conversations are written through a chat template (model/chat_template.py), each as
the tokens the server's chat route reads, the template's markers special tokens.

Each split starts with `<|endoftext|>`, so every real token has a context and is
predicted once; the separator itself is 0 bytes of text. The key hashes the
documents of both splits, the vocabulary size (or the given tokenizer) and the
format version, so a changed corpus never reuses stale tokens. The folder is
written under a temporary name (flocked while written), fsynced and renamed into
place, so a crash leaves no half-written cache; the next run removes what a killed
one left. Files damaged after that (deleted, truncated, overwritten) no longer
match meta.json, nor an edited meta.json the text: the folder is then rebuilt, with a
warning.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import itertools
import json
import os
import re
import shutil
import sys
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer
from tqdm import tqdm

from model.atomic_files import fsync_path, write_json, write_tokenizer
from model.chat_template import ChatError, ChatTemplate
from model.checkpoint import END_OF_TEXT, CheckpointError, end_of_text_id, read_tokenizer_file
from model.token_bytes import check_reads_bytes, token_bytes
from training.chat import ChatFormat
from training.corpus import Conversation, CorpusError, Document, document_text, text_digest
from training.progress import progress_bar
from training.tokenizer import (
    TRAINED_KIND,
    train_tokenizer,
    untrained_tokenizer,
    with_special_tokens,
)

# 2: `<|endoftext|>` spelled inside a document is encoded as text (model/checkpoint.py).
FORMAT = 2
TOKEN_DTYPE = np.uint16
MASK_DTYPE = np.uint8
LEARNED, CONVERSATION_START = 1, 2  # loss-mask values (0: context the model reads)
TOKEN_BYTES = np.dtype(TOKEN_DTYPE).itemsize
MAX_VOCAB = int(np.iinfo(TOKEN_DTYPE).max) + 1
SPLITS = ("train", "val")
# What _own_sibling names: a cache folder being written, or a damaged one moved aside.
_SIBLING = re.compile(r"[0-9a-f]{16}\.(?P<what>tmp|damaged)-\d+-[0-9a-f]{8}")
# A folder being written is flocked within microseconds of its mkdir; one unlocked and
# this old was left by a writer that died.
ABANDONED_AFTER_S = 60.0


@dataclass(frozen=True)
class PreparedData:
    folder: Path
    tokenizer: Tokenizer
    train: np.ndarray  # memmap [N_train] uint16
    val: np.ndarray  # memmap [N_val] uint16
    meta: dict
    # Conversations: memmaps [N_train], [N_val] uint8 of LEARNED / CONVERSATION_START / 0
    train_loss_mask: np.ndarray | None = None
    val_loss_mask: np.ndarray | None = None


# Documents are encoded a batch of ~BATCH_CHARS characters at a time, and a long one
# in pieces of ~PIECE_CHARS, so that only the uint16 ids grow with the corpus: the
# tokenizers library holds ~100 bytes per token of an encoding (offsets, strings),
# and 40 MB of text encoded in one call peaked at 2 GB.
# Pieces of 16K, not 256K: the library encodes a long text ~2.5x slower per character
# (0.49 vs 1.30 Mchar/s at 155K vs 2K), and a batch of a few long ones keeps 2 cores
# half idle: a 285 MB .txt (split into ~155K-character documents) tokenized at 3.0
# Mchar/s in 256K pieces, 6.2 in 16K ones, to the same ids.
PIECE_CHARS = 1 << 14
BATCH_CHARS = 1 << 21
# Pieces are cut after a line break, or before a space, that stands between two
# non-space characters. The byte-level pre-tokenizer ends a pre-token there (that
# "\n" is one of its own; " word" starts one) and BPE never merges across pre-tokens,
# so the pieces encode to exactly the ids of the whole document. (Python's \s is a
# superset of the tokenizer's, so its \S are non-spaces to both.)
PIECE_CUT = re.compile(r"(?<=\S\n)(?=\S)|(?<=\S)(?= \S)")
# A tokenizer that spaces a text's start (a byte-level pre-tokenizer's add_prefix_space,
# as transformers may save GPT-2's) would put a space into every piece that starts
# otherwise: its pieces are cut before a space only (where it adds none).
SPACE_CUT = re.compile(r"(?<=\S)(?= \S)")
# A line with no such cut for PIECE_CHARS (a base64 image inlined in Markdown, minified
# JSON or JavaScript: tens of MB in one line) is cut where the tokenizer's own
# pre-tokenizer ends a pre-token between two printable ASCII characters of different
# kinds ("abc|123", "x|+/"): BPE merges nothing across it, and no normalizer joins
# ASCII characters. Encoded whole, a 10 MB line peaked at 2.7 GB (0.6 GB in pieces).
PRINTABLE_ASCII = frozenset(map(chr, range(0x21, 0x7F)))


def token_stream(
    tokenizer: Tokenizer, documents: Sequence[str], progress: str | None = None
) -> np.ndarray:
    """[<|endoftext|>, doc 0 ..., <|endoftext|>, doc 1 ...] as uint16.

    progress: a label for a progress bar over the characters encoded (`progress_bar`).
    """
    empty = np.empty(0, dtype=TOKEN_DTYPE)
    return np.concatenate([empty, *token_runs(tokenizer, documents, progress)])


def token_runs(
    tokenizer: Tokenizer, documents: Sequence[str], progress: str | None = None
) -> Iterator[np.ndarray]:
    """token_stream's ids a batch of ~BATCH_CHARS characters at a time, in order: written
    out as they come, a corpus's ids are never held whole (twice, when joined)."""
    separator = tokenizer.token_to_id(END_OF_TEXT)
    batch: list[tuple[bool, str]] = []  # (starts a document, text)
    size = 0
    with progress_bar(progress, sum(len(doc) for doc in documents), "char") as bar:
        for doc in documents:
            for index, piece in enumerate(_pieces(doc, tokenizer)):
                batch.append((index == 0, piece))
                size += len(piece)
                if size >= BATCH_CHARS:
                    yield _encode(tokenizer, batch, separator)
                    bar.update(size)
                    batch, size = [], 0
        if batch:
            yield _encode(tokenizer, batch, separator)
            bar.update(size)


def conversation_stream(
    template: ChatTemplate,
    tokenizer: Tokenizer,
    conversations: Sequence[Conversation],
    progress: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(tokens uint16, loss mask uint8): [<|endoftext|>, conversation 0 ..., <|endoftext|>,
    conversation 1 ...], each conversation as `template` makes it; a CorpusError naming
    the record the template refuses."""
    separator = tokenizer.token_to_id(END_OF_TEXT)
    tokens: list[np.ndarray] = [np.empty(0, dtype=TOKEN_DTYPE)]
    masks: list[np.ndarray] = [np.empty(0, dtype=MASK_DTYPE)]
    with progress_bar(progress, len(conversations), "conversation") as bar:
        for conversation in conversations:
            try:
                messages = conversation.as_messages()
                ids, learned = template.conversation(messages, conversation.not_learned)
            except ChatError as e:
                raise CorpusError(f"{conversation.source}: {e}") from None
            tokens.append(np.array([separator, *ids], dtype=TOKEN_DTYPE))
            masks.append(np.array([CONVERSATION_START, *learned], dtype=MASK_DTYPE))
            bar.update(1)
    return np.concatenate(tokens), np.concatenate(masks)


def _check_room_for(added_tokens: Sequence[str], vocab_size: int) -> None:
    """A CorpusError, before the tokenizer's training (minutes on a large text), where a
    `vocab_size`-entry tokenizer given `added_tokens` would not fit the token cache."""
    added = len(set(added_tokens) - {END_OF_TEXT})  # the trained one has <|endoftext|>
    if vocab_size + added > MAX_VOCAB:
        raise CorpusError(
            f"--vocab-size {vocab_size}: with the chat template's {added} tokens, "
            f"{vocab_size + added:,} token ids do not fit the token cache's uint16 ids "
            f"(at most {MAX_VOCAB:,}): give --vocab-size {MAX_VOCAB - added} or less"
        )


def check_tokenizer(tokenizer: Tokenizer, source: str) -> Tokenizer:
    """`tokenizer` if token streams can be made with it; a CorpusError naming `source`
    (where it came from) if not."""
    if (size := tokenizer.get_vocab_size()) > MAX_VOCAB:
        raise CorpusError(
            f"{source}: {size:,} token ids do not fit the token cache's uint16 ids "
            f"(at most {MAX_VOCAB:,})"
        )
    try:
        token_bytes(tokenizer)  # a byte-level BPE: what bits per byte counts, the server streams
        check_reads_bytes(tokenizer)
        end_of_text_id(tokenizer)
    except ValueError as e:
        raise CorpusError(f"{source}: {e}") from None
    return tokenizer


def _counted(texts: Iterable[str], bar: tqdm) -> Iterator[str]:
    """`texts`, each counted on `bar` once the reader asks for the next."""
    for text in texts:
        yield text
        bar.update(len(text))


def _adds_tokens(tokenizer: Tokenizer) -> bool:
    """Whether `tokenizer` adds tokens to an encoding (an HF Llama's BOS template)."""
    plain = tokenizer.encode("x", add_special_tokens=False).ids
    return tokenizer.encode("x").ids != plain


def _pieces(doc: str, tokenizer: Tokenizer) -> Iterator[str]:
    start = 0
    spaces_start = len(doc) > PIECE_CHARS and _spaces_start(tokenizer)
    pattern = SPACE_CUT if spaces_start else PIECE_CUT
    while len(doc) - start > PIECE_CHARS:
        at = start + PIECE_CHARS
        cut = pattern.search(doc, at, at + PIECE_CHARS)
        end = cut.start() if cut is not None else None
        if end is None and not spaces_start:
            end = _pre_token_cut(doc, at, tokenizer)
        if end is None and (cut := pattern.search(doc, at)) is not None:
            end = cut.start()
        if end is None:
            break  # no safe cut in the rest: encode it whole
        yield doc[start:end]
        start = end
    yield doc[start:]


def _spaces_start(tokenizer: Tokenizer) -> bool:
    """Whether `tokenizer`'s pre-tokenizer adds a space to a text that starts without one."""
    if tokenizer.pre_tokenizer is None:
        return False
    pieces = tokenizer.pre_tokenizer.pre_tokenize_str("x")
    return bool(pieces) and pieces[0][0] != "x"


def _pre_token_cut(doc: str, at: int, tokenizer: Tokenizer) -> int | None:
    """The first place within PIECE_CHARS after `at` where `tokenizer`'s pre-tokenizer
    ends a pre-token between two printable ASCII characters, if any."""
    if tokenizer.pre_tokenizer is None:
        return None
    # Added tokens the text may spell ("<pad>" added in transformers) are found before
    # pre-tokenizing: no cut inside one. (Special ones are read as text: text_literally.)
    added = [t.content for t in tokenizer.get_added_tokens_decoder().values() if not t.special]
    for size in (4096, PIECE_CHARS):  # such text has a cut every few characters
        window = doc[at : at + size]
        # The first pre-token starts where the window does, not where the document's
        # does; the next ones may too inside a run of one kind of character (Llama 3's
        # digits go in threes, counted from the run's start), never where the kind changes.
        for _, (offset, _) in tokenizer.pre_tokenizer.pre_tokenize_str(window)[1:]:
            kinds = {_ascii_kind(window[offset - 1]), _ascii_kind(window[offset])}
            cut = at + offset
            if len(kinds) == 2 and None not in kinds and not _inside(doc, cut, added):
                return cut
    return None


def _inside(doc: str, cut: int, spellings: list[str]) -> bool:
    """Whether one of `spellings` occurs in `doc` across `cut`."""
    return any(
        doc.startswith(spelling, start)
        for spelling in spellings
        for start in range(max(0, cut - len(spelling) + 1), cut)
    )


def _ascii_kind(char: str) -> str | None:
    """Letter, digit or punctuation, for a printable ASCII character (None otherwise)."""
    if char not in PRINTABLE_ASCII:
        return None
    return "letter" if char.isalpha() else "digit" if char.isdigit() else "punctuation"


def _encode(tokenizer: Tokenizer, batch: list[tuple[bool, str]], separator: int) -> np.ndarray:
    # The separator is the only id added (a post-processor's BOS, an HF Llama's habit,
    # would double it); the server encodes prompts alike.
    encodings = tokenizer.encode_batch([text for _, text in batch], add_special_tokens=False)
    ids = [
        [separator, *encoding.ids] if starts_document else encoding.ids
        for (starts_document, _), encoding in zip(batch, encodings, strict=True)
    ]
    return np.fromiter(itertools.chain.from_iterable(ids), dtype=TOKEN_DTYPE)


def token_byte_lengths(tokenizer: Tokenizer) -> np.ndarray:
    """[V] UTF-8 bytes each id stands for (0 for special tokens), as the server streams
    them: any run of ids covers exactly the sum of its entries' bytes."""
    return np.array([len(b) for b in token_bytes(tokenizer)], dtype=np.int64)


def _streams(
    tokenizer: Tokenizer, chat: ChatFormat | None, docs: Sequence[Document], split: str
) -> tuple[Iterable[np.ndarray], np.ndarray | None]:
    """(the split's token ids in runs, its loss mask or None), as _write_split takes them."""
    if chat is None:
        return token_runs(tokenizer, docs, f"tokenizing {split}"), None
    template = chat.compiled(tokenizer)
    tokens, loss_mask = conversation_stream(template, tokenizer, docs, f"tokenizing {split}")
    return [tokens], loss_mask


def cache_key(digests: dict[str, str], tokenizer_id: str) -> str:
    """The cache folder's name for splits of these `text_digest`s tokenized so."""
    h = hashlib.sha256(f"pocketgpt-tokens-v{FORMAT}\0{tokenizer_id}\0".encode())
    for split in SPLITS:
        h.update(f"{split}\0{digests[split]}\0".encode())
    return h.hexdigest()[:16]


class _DamagedCache(Exception):
    """A cache folder whose files do not match its meta.json; the message says how."""


def _text_record(docs: Sequence[Document], digest: str) -> dict:
    """What meta.json records of a split's text: its documents, UTF-8 bytes and
    `text_digest`."""
    texts = map(document_text, docs)
    return {
        "documents": len(docs),
        "bytes": sum(len(text.encode("utf-8")) for text in texts),
        "sha256": digest,
    }


def _open(folder: Path, conversations: bool, records: dict[str, dict]) -> PreparedData:
    """The cache in `folder`, its files checked against its meta.json and its meta.json
    against the splits' `_text_record`s, `records` (and, of `conversations`, holding their
    loss masks)."""
    try:
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
        counts = {split: int(meta["splits"][split]["tokens"]) for split in SPLITS}
        digests = {split: meta["splits"][split].get("tokens_sha256") for split in SPLITS}
        vocab_size = meta["vocab_size"]
    except (OSError, ValueError, LookupError, TypeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else e  # not the path again
        raise _DamagedCache(f"meta.json unreadable ({reason})") from None
    # The run records these in its checkpoints and compares them on a resume: counts
    # edited or lost in meta.json warned that the text had changed (or a KeyError).
    for split, record in records.items():
        recorded = meta["splits"][split]
        if wrong := [name for name, value in record.items() if recorded.get(name) != value]:
            raise _DamagedCache(f"meta.json does not describe the {split} text ({wrong[0]})")
    tokens = {}
    for split, count in counts.items():
        path = folder / f"{split}.bin"
        if not path.is_file():
            raise _DamagedCache(f"{path.name} is missing")
        size, expected = path.stat().st_size, count * TOKEN_BYTES
        # Every split written holds at least its leading <|endoftext|>.
        if count < 1 or size != expected:
            raise _DamagedCache(
                f"{path.name} holds {size:,} bytes; meta.json's {count:,} tokens take {expected:,}"
            )
        tokens[split] = np.memmap(path, dtype=TOKEN_DTYPE, mode="r")
    try:
        tokenizer = read_tokenizer_file(folder / "tokenizer.json")
    except CheckpointError as e:  # it names the file by its path; the warning, the folder
        raise _DamagedCache(str(e).removeprefix(f"{folder}{os.sep}")) from None
    if tokenizer.get_vocab_size() != vocab_size:
        raise _DamagedCache(
            f"tokenizer.json: {tokenizer.get_vocab_size()} entries, meta.json says {vocab_size!r}"
        )
    # Another tokenizer.json of the same size (or one edited by hand) reads as well, and
    # the run trained on tokens made by the one written beside them, saved with this one.
    if (tokenizer_digest := meta.get("tokenizer_sha256")) is None:
        raise _DamagedCache("meta.json has no checksum of tokenizer.json (an older cache)")
    if hashlib.sha256((folder / "tokenizer.json").read_bytes()).hexdigest() != tokenizer_digest:
        raise _DamagedCache("tokenizer.json does not match its checksum in meta.json")
    for split, ids in tokens.items():
        # Overwritten at the same size (or zeroed by a crash of a file system that
        # journals no data), a file passes the checks above: ~0.1 s per 100 MB read.
        if digests[split] is None:
            raise _DamagedCache(f"meta.json has no checksum of {split}.bin (an older cache)")
        if hashlib.sha256(ids).hexdigest() != digests[split]:
            raise _DamagedCache(f"{split}.bin does not match its checksum in meta.json")
    masks = {split: _open_loss_mask(folder, split, meta, counts[split]) for split in SPLITS}
    if any((mask is None) == conversations for mask in masks.values()):
        held = "no loss mask" if conversations else "a loss mask"
        raise _DamagedCache(f"meta.json names {held} for a split")
    return PreparedData(
        folder, tokenizer, tokens["train"], tokens["val"], meta, masks["train"], masks["val"]
    )


def _open_loss_mask(folder: Path, split: str, meta: dict, count: int) -> np.ndarray | None:
    """The split's loss mask (conversations), checked against meta.json; None for text."""
    try:
        digest = meta["splits"][split].get("loss_mask_sha256")
    except AttributeError as e:
        raise _DamagedCache(f"meta.json unreadable ({e})") from None
    if digest is None:
        return None
    path = folder / f"{split}.loss_mask.bin"
    if not path.is_file():
        raise _DamagedCache(f"{path.name} is missing")
    if (size := path.stat().st_size) != count:
        raise _DamagedCache(f"{path.name} holds {size:,} bytes; meta.json's {count:,} tokens")
    mask = np.memmap(path, dtype=MASK_DTYPE, mode="r")
    if hashlib.sha256(mask).hexdigest() != digest:
        raise _DamagedCache(f"{path.name} does not match its checksum in meta.json")
    return mask


def _cached(folder: Path, conversations: bool, records: dict[str, dict]) -> PreparedData | None:
    """The cache in `folder`, or None when there is none. A damaged one is removed,
    with a warning: it is only a cache, so rebuilding it is always correct."""
    if not folder.exists():
        return None
    try:
        return _open(folder, conversations, records)
    except _DamagedCache as e:
        print(f"warning: {folder}: damaged token cache ({e}); rebuilding it", file=sys.stderr)
        # Moved aside first, in one step: trainers started together (a sweep) find the same
        # damaged folder, and one removing files the other was removing got a traceback.
        aside = _own_sibling(folder, "damaged")
        try:
            os.replace(folder, aside)
        except FileNotFoundError:
            return None  # another trainer moved it first
        shutil.rmtree(aside, ignore_errors=True)
        return None


SMALL_CORPUS_REMEDY = "add text, or lower --batch-size / --block-size"


def _check_size(train_tokens: int, min_train_tokens: int, remedy: str) -> None:
    if train_tokens < min_train_tokens:
        raise CorpusError(
            f"the corpus is too small: {train_tokens:,} training tokens, but one batch needs "
            f"{min_train_tokens:,} ({remedy})"
        )


def _own_sibling(folder: Path, what: str) -> Path:
    """`<folder>.<what>-<pid>-<random>`: a name no other trainer shares. Trainers in two
    containers that share a cache volume often have the same pid, and one removed or
    renamed the folder the other was writing."""
    return folder.with_name(f"{folder.name}.{what}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


@contextlib.contextmanager
def _flocked(folder: Path) -> Iterator[None]:
    """An exclusive flock on `folder` held for the block: the system drops it when the
    process ends, however it ends (a file system that cannot lock: none held).

    Waited for: another trainer's _is_abandoned may hold it for a moment, and a writer
    that went on without it could be taken for a dead one and its folder removed."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _is_abandoned(folder: Path) -> bool:
    """Whether no process is writing `folder` (an _own_sibling "tmp" one): its flock
    free, and made long enough ago that its writer would hold it."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return False  # gone: renamed into place, or removed by another
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return time.time() - os.fstat(fd).st_mtime > ABANDONED_AFTER_S
    except OSError:  # held (BlockingIOError), or a file system that cannot lock
        return False
    finally:
        os.close(fd)


def _clear_abandoned(root: Path) -> None:
    """Remove what trainers killed midway (kill -9, a lost machine) left in the cache
    root: folders half written, and damaged ones moved aside for removal."""
    try:
        entries = list(root.iterdir())
    except OSError:
        return  # no cache root yet, or one _write will name in its refusal
    for entry in entries:
        sibling = _SIBLING.fullmatch(entry.name)
        if sibling and (sibling["what"] == "damaged" or _is_abandoned(entry)):
            shutil.rmtree(entry, ignore_errors=True)


@contextlib.contextmanager
def _writing(folder: Path) -> Iterator[Path]:
    """A folder to write the cache into (flocked while written), fsynced and renamed to
    `folder` when the block ends; removed if it fails, Ctrl-C included: no half-written
    folder stays behind, nor the cache root if made for it (a corpus found too small once
    tokenized writes nothing). Another process that wrote `folder` first wins the race."""
    tmp = _own_sibling(folder, "tmp")
    made = [parent for parent in tmp.parents if not parent.exists()]  # deepest first
    try:
        tmp.mkdir(parents=True)
        with _flocked(tmp):
            yield tmp
            fsync_path(tmp)
            os.replace(tmp, folder)
            fsync_path(folder.parent)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        with contextlib.suppress(OSError):  # one another trainer writes into now stays
            for parent in made:
                parent.rmdir()
        if not isinstance(e, OSError):
            raise
        # An OSError with the folder in place: another process won the race to write it;
        # else the folder cannot be made, or a full disk or a file-size limit stopped it.
        if not (folder / "meta.json").exists():
            reason = e.strerror or str(e)
            raise CorpusError(f"--cache-dir {folder.parent}: cannot write ({reason})") from None


def _write_tokenizer(tmp: Path, tokenizer: Tokenizer) -> dict:
    """Write tokenizer.json into `tmp`; meta.json's record of it (no splits yet)."""
    write_tokenizer(tokenizer, tmp / "tokenizer.json")
    fsync_path(tmp / "tokenizer.json")
    return {
        "format": FORMAT,
        "vocab_size": tokenizer.get_vocab_size(),
        "tokenizer_sha256": hashlib.sha256((tmp / "tokenizer.json").read_bytes()).hexdigest(),
        "splits": {},
    }


def _write_split(
    tmp: Path, split: str, runs: Iterable[np.ndarray], loss_mask: np.ndarray | None
) -> dict:
    """Write a split's tokens (and loss mask) into `tmp`, a run at a time as `runs` makes
    them; meta.json's record of their counts and hashes."""
    digest, count = hashlib.sha256(), 0
    # Not ndarray.tofile: its failure (a full disk) says bytes, not the reason.
    with open(tmp / f"{split}.bin", "wb") as f:
        for run in runs:
            data = np.ascontiguousarray(run, dtype=TOKEN_DTYPE).data
            f.write(data)
            digest.update(data)
            count += run.size
    fsync_path(tmp / f"{split}.bin")
    record = {"tokens": count, "tokens_sha256": digest.hexdigest()}
    if loss_mask is not None:
        mask = np.ascontiguousarray(loss_mask).data
        (tmp / f"{split}.loss_mask.bin").write_bytes(mask)
        fsync_path(tmp / f"{split}.loss_mask.bin")
        record |= {
            "learned_tokens": int(np.count_nonzero(loss_mask == LEARNED)),
            "loss_mask_sha256": hashlib.sha256(mask).hexdigest(),
        }
    return record


@dataclass(frozen=True)
class TextIdentity:
    """A text's splits as the token cache knows them: their `text_digest`s (in the cache
    folder's name) and `_text_record`s (what its meta.json records). Enough to open the
    cache another process prepared for the text, without holding the text."""

    digests: dict[str, str]
    records: dict[str, dict]


def identify(train_docs: Sequence[Document], val_docs: Sequence[Document]) -> TextIdentity:
    """The TextIdentity of these splits; a CorpusError for an empty training split."""
    if not train_docs:
        raise CorpusError("the training split is empty")
    digests = {"train": text_digest(train_docs), "val": text_digest(val_docs)}
    records = {
        "train": _text_record(train_docs, digests["train"]),
        "val": _text_record(val_docs, digests["val"]),
    }
    return TextIdentity(digests, records)


@dataclass(frozen=True)
class _Lookup:
    folder: Path  # the text's cache folder for this tokenizer (there or to be written)
    tokenizer: Tokenizer | None  # the one given, with the chat format's tokens added
    data: PreparedData | None  # the cache, where one serves


def _look_up(
    identity: TextIdentity,
    root: Path,
    vocab_size: int,
    tokenizer: Tokenizer | None,
    chat: ChatFormat | None,
) -> _Lookup:
    """Where the cache of the text `identity` names, tokenized by `tokenizer` (None: one
    trained on it) as `chat` writes it, is, and that cache if it is there."""
    digests, records = identity.digests, identity.records
    conversations = chat is not None
    chat_id = "" if chat is None else f"\0chat {chat.key}"
    if tokenizer is not None and chat is not None:
        # As it writes conversations: with the template's tokens (a resumed run's has them).
        tokenizer = with_special_tokens(tokenizer, chat.added_tokens)
    if tokenizer is not None:
        # A run resumed (or fine-tuned) on its own text brings the tokenizer trained for
        # that text's cache: the same tokens, so that cache serves instead of a new one.
        trained = _cached(
            root / cache_key(digests, f"{TRAINED_KIND}-{vocab_size}{chat_id}"),
            conversations,
            records,
        )
        if trained is not None and trained.tokenizer.to_str() == tokenizer.to_str():
            return _Lookup(trained.folder, tokenizer, trained)
    tokenizer_id = tokenizer.to_str() if tokenizer is not None else f"{TRAINED_KIND}-{vocab_size}"
    if tokenizer is not None and _adds_tokens(tokenizer):
        # Streams once held what its post-processor adds (a BOS per piece): not those.
        tokenizer_id += "\0without its additions"
    folder = root / cache_key(digests, tokenizer_id + chat_id)
    return _Lookup(folder, tokenizer, _cached(folder, conversations, records))


def open_prepared(
    identity: TextIdentity,
    cache_root: Path,
    *,
    vocab_size: int,
    tokenizer: Tokenizer | None = None,
    chat: ChatFormat | None = None,
) -> PreparedData:
    """The cache `prepare` wrote, with these settings, for the text `identity` names (in
    another process: torchrun's rank 0); a CorpusError if it is not there."""
    found = _look_up(identity, Path(cache_root), vocab_size, tokenizer, chat)
    if found.data is None:
        raise CorpusError(f"{found.folder}: the token cache prepared for the text is missing")
    return found.data


def prepare(
    train_docs: Sequence[Document],
    val_docs: Sequence[Document],
    cache_root: Path,
    *,
    vocab_size: int,
    tokenizer: Tokenizer | None = None,
    chat: ChatFormat | None = None,
    min_train_tokens: int = 2,
    too_small_remedy: str = SMALL_CORPUS_REMEDY,
) -> PreparedData:
    """Tokenize both splits once (training a tokenizer on `train_docs` unless given one).
    Conversations (`chat` says how to write them) get the chat format's added tokens and
    a loss mask.

    Raises CorpusError, before writing anything, when the training split has fewer
    than `min_train_tokens` tokens.
    """
    identity = identify(train_docs, val_docs)
    if tokenizer is None and chat is not None:
        _check_room_for(chat.added_tokens, vocab_size)
    root = Path(cache_root)
    _clear_abandoned(root)
    found = _look_up(identity, root, vocab_size, tokenizer, chat)
    folder, tokenizer, data = found.folder, found.tokenizer, found.data
    records, conversations = identity.records, chat is not None
    if data is None:
        if tokenizer is None:
            texts = [document_text(doc) for doc in train_docs]
            chars = sum(len(text) for text in texts)
            characters = f"{chars:,} character{'s' if chars != 1 else ''}"
            print(f"training a {vocab_size}-entry tokenizer on {characters}", flush=True)
            # Its bar counts the text the trainer has read, most of its time at a small
            # vocabulary: 300 MB took 30-50 s on 2 cores that printed nothing. Read in
            # the pieces it is encoded in, cut between pre-tokens: the library reads 256
            # texts at a time (a one-file corpus's bar went to its end at once) and counts
            # the words of each on one thread; the pieces hold the same words, so it
            # learns the same merges (2 cores, one 150 MB text: 79 s whole, 13 s in pieces).
            cutter = untrained_tokenizer()
            pieces = (piece for text in texts for piece in _pieces(text, cutter))
            with progress_bar("training the tokenizer", chars, "char") as bar:
                tokenizer = train_tokenizer(_counted(pieces, bar), vocab_size)
            if (learned := tokenizer.get_vocab_size()) < vocab_size:
                print(
                    f"the text gave {learned} entries (a merge needs a pair seen at least "
                    f"twice): the model's vocabulary is {learned}",
                    flush=True,
                )
            if chat is not None:  # as a given one was, above
                tokenizer = with_special_tokens(tokenizer, chat.added_tokens)
        check_tokenizer(tokenizer, "the tokenizer")
        with _writing(folder) as tmp:
            meta = _write_tokenizer(tmp, tokenizer)
            train = _write_split(tmp, "train", *_streams(tokenizer, chat, train_docs, "train"))
            _check_size(train["tokens"], min_train_tokens, too_small_remedy)
            if not val_docs:
                raise CorpusError(
                    "the validation split is empty (add text or raise --val-fraction)"
                )
            val = _write_split(tmp, "val", *_streams(tokenizer, chat, val_docs, "val"))
            meta["splits"] = {
                split: {"file": f"{split}.bin", **records[split], **written}
                for split, written in (("train", train), ("val", val))
            }
            write_json(tmp / "meta.json", meta)
            fsync_path(tmp / "meta.json")
        data = _open(folder, conversations, records)
    _check_size(data.train.size, min_train_tokens, too_small_remedy)
    return data
