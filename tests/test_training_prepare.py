"""The token cache: a damaged cache folder is rebuilt, and a cache root that cannot be a
folder is an error naming --cache-dir."""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import random
import shutil
import sys
import threading
import time
import tracemalloc
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, processors
from tqdm import tqdm

from tests.test_training_pretrain import CORPUS, TINY, VAL, pretrain_in_files_up_to
from training import prepare as prepare_module
from training import pretrain
from training.args import TrainArgs
from training.corpus import CorpusError, text_digest
from training.prepare import (
    PreparedData,
    _flocked,
    cache_key,
    identify,
    open_prepared,
    prepare,
    token_stream,
)
from training.progress import bar_output, progress_bar
from training.split import split_documents
from training.tokenizer import train_tokenizer


def prepare_corpus(cache: Path) -> PreparedData:
    train_docs, val_docs = split_documents([CORPUS.read_text(encoding="utf-8")], 0.1)
    return prepare(train_docs, val_docs, cache, vocab_size=384)


def test_a_cache_prepared_elsewhere_opens_from_the_texts_identity_without_the_text(
    tmp_path: Path,
) -> None:
    # torchrun's other ranks wait for rank 0's cache holding this, not the corpus.
    cache = tmp_path / "cache"
    train_docs, val_docs = split_documents([CORPUS.read_text(encoding="utf-8")], 0.1)
    identity = identify(train_docs, val_docs)
    with pytest.raises(CorpusError, match=r"cache/[0-9a-f]{16}: the token cache prepared "):
        open_prepared(identity, cache, vocab_size=384)
    data = prepare(train_docs, val_docs, cache, vocab_size=384)
    for tokenizer in (None, data.tokenizer):  # trained on the text; given (a resumed run's)
        opened = open_prepared(identity, cache, vocab_size=384, tokenizer=tokenizer)
        assert opened.folder == data.folder and opened.meta == data.meta
        assert np.array_equal(opened.train, data.train) and np.array_equal(opened.val, data.val)
    # Another text, another vocabulary: not this cache. Opening writes nothing.
    for other, vocab_size in ((identify(train_docs[1:], val_docs), 384), (identity, 512)):
        with pytest.raises(CorpusError, match="the token cache prepared for the text is missing"):
            open_prepared(other, cache, vocab_size=vocab_size)
    assert [p.name for p in cache.iterdir()] == [data.folder.name]
    with pytest.raises(CorpusError, match="the training split is empty"):
        identify([], val_docs)


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:2000])


def empty_split(folder: Path, split: str) -> None:
    """`split`.bin emptied and meta.json saying so: every split holds its separator."""
    (folder / f"{split}.bin").write_bytes(b"")
    meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    meta["splits"][split]["tokens"] = 0
    (folder / "meta.json").write_text(json.dumps(meta), encoding="utf-8")


def drop_checksums(folder: Path) -> None:
    meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    for split in meta["splits"].values():
        del split["tokens_sha256"]
    (folder / "meta.json").write_text(json.dumps(meta), encoding="utf-8")


def edit_meta(folder: Path, split: str, name: str, value: object | None) -> None:
    """meta.json's `name` of `split` set to `value` (None: removed), as by hand."""
    meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    if value is None:
        del meta["splits"][split][name]
    else:
        meta["splits"][split][name] = value
    (folder / "meta.json").write_text(json.dumps(meta), encoding="utf-8")


DAMAGE: dict[str, Callable[[Path], None]] = {
    "train.bin truncated": lambda folder: truncate(folder / "train.bin"),
    "train.bin empty": lambda folder: (folder / "train.bin").write_bytes(b""),
    "train.bin missing": lambda folder: (folder / "train.bin").unlink(),
    "val.bin missing": lambda folder: (folder / "val.bin").unlink(),
    "val.bin empty, as meta.json says": lambda folder: empty_split(folder, "val"),
    "meta.json not JSON": lambda folder: (folder / "meta.json").write_text("{"),
    "meta.json missing": lambda folder: (folder / "meta.json").unlink(),
    "tokenizer.json garbage": lambda folder: (folder / "tokenizer.json").write_text("[]"),
    "val.bin overwritten, same size": lambda folder: (folder / "val.bin").write_bytes(
        b"\xff" * (folder / "val.bin").stat().st_size
    ),
    # What a crash of a file system that journals no data leaves: valid ids, all wrong.
    "train.bin zeroed, same size": lambda folder: (folder / "train.bin").write_bytes(
        bytes((folder / "train.bin").stat().st_size)
    ),
    "meta.json without token checksums (an older cache)": lambda folder: drop_checksums(folder),
    # Its tokens were made by the one written beside them; the run saves the one it reads.
    "tokenizer.json swapped for another of the same size": lambda folder: train_tokenizer(
        [CORPUS.read_text(encoding="utf-8").upper()], 384
    ).save(str(folder / "tokenizer.json")),
    # The text's counts, which a run records in its checkpoints and compares on a resume.
    "meta.json: 7 documents": lambda folder: edit_meta(folder, "train", "documents", 7),
    "meta.json without the val bytes": lambda folder: edit_meta(folder, "val", "bytes", None),
    "meta.json: another hash": lambda folder: edit_meta(folder, "val", "sha256", "0" * 64),
}


@pytest.mark.parametrize("case", DAMAGE)
def test_a_damaged_cache_is_rebuilt_with_one_warning_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str
) -> None:
    first = prepare_corpus(tmp_path)
    folder = first.folder
    files = {name: (folder / name).read_bytes() for name in ("train.bin", "val.bin", "meta.json")}
    capsys.readouterr()
    DAMAGE[case](folder)
    again = prepare_corpus(tmp_path)
    err = capsys.readouterr().err
    assert err.count("warning: ") == 1
    assert err.startswith(f"warning: {folder}: damaged token cache ("), err
    assert err.count(str(folder)) == 1, err  # its files by their names
    assert again.folder == folder
    assert {name: (folder / name).read_bytes() for name in files} == files
    assert len(again.train) == json.loads(files["meta.json"])["splits"]["train"]["tokens"]
    # Once rebuilt it is whole: the next run uses it without a word.
    prepare_corpus(tmp_path)
    assert capsys.readouterr().err == ""


class OtherTrainerOnStderr(io.StringIO):
    """stderr of a trainer that shares its cache with another started at the same time
    (a sweep): the other removes the damaged folder the moment this one warns of it."""

    def __init__(self, folder: Path) -> None:
        super().__init__()
        self.folder = folder

    def write(self, text: str) -> int:
        if "damaged token cache" in text:
            shutil.rmtree(self.folder)
        return super().write(text)


def test_a_damaged_cache_another_trainer_removes_first_is_rebuilt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = prepare_corpus(tmp_path).folder
    tokens = (folder / "train.bin").read_bytes()
    truncate(folder / "train.bin")
    stderr = OtherTrainerOnStderr(folder)
    monkeypatch.setattr(sys, "stderr", stderr)
    again = prepare_corpus(tmp_path)
    assert stderr.getvalue().startswith(f"warning: {folder}: damaged token cache (")
    assert again.folder == folder and (folder / "train.bin").read_bytes() == tokens
    assert sorted(p.name for p in tmp_path.iterdir()) == [folder.name]


def test_an_intact_cache_is_reused_without_retraining(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    prepare_corpus(tmp_path)
    assert "training a 384-entry tokenizer" in capsys.readouterr().out
    prepare_corpus(tmp_path)
    captured = capsys.readouterr()
    assert (captured.out, captured.err) == ("", "")


def left_behind(root: Path, key: str, what: str, age_s: float) -> Path:
    """A folder as a trainer writing the cache `key` names it (prepare._own_sibling), with
    a half-written file, last changed `age_s` seconds ago."""
    folder = root / f"{key}.{what}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    folder.mkdir(parents=True)
    (folder / "train.bin").write_bytes(b"half written")
    then = time.time() - age_s
    os.utime(folder, (then, then))
    return folder


def test_a_cache_another_process_of_the_same_pid_is_writing_is_left_to_it(tmp_path: Path) -> None:
    # Trainers in two containers that share a cache volume often have the same pid (one
    # started by `docker compose run` each): the folder one is writing is not the other's.
    # Its writer holds an flock on it, however long the write takes.
    key = prepare_corpus(tmp_path / "elsewhere").folder.name
    writing = left_behind(tmp_path / "cache", key, "tmp", age_s=3600)
    held = os.open(writing, os.O_RDONLY)
    try:
        fcntl.flock(held, fcntl.LOCK_EX)
        data = prepare_corpus(tmp_path / "cache")
    finally:
        os.close(held)
    assert data.folder == tmp_path / "cache" / key
    assert (writing / "train.bin").read_bytes() == b"half written"
    assert sorted(p.name for p in data.folder.iterdir()) == [
        "meta.json",
        "tokenizer.json",
        "train.bin",
        "val.bin",
    ]


def test_a_writer_waits_for_the_lock_another_trainers_abandonment_check_holds(
    tmp_path: Path,
) -> None:
    # Another trainer's clean-up holds a "tmp" folder's flock a moment to see whether its
    # writer is alive. A writer locking it then went on unlocked: a third trainer's
    # clean-up could take it for a dead one and remove the folder it was writing.
    folder = tmp_path / "being-written"
    folder.mkdir()
    entered, done = threading.Event(), threading.Event()

    def write() -> None:
        with _flocked(folder):
            entered.set()
            done.wait()

    probe = os.open(folder, os.O_RDONLY)
    fcntl.flock(probe, fcntl.LOCK_EX)
    writer = threading.Thread(target=write)
    writer.start()
    try:
        assert not entered.wait(0.5)  # waiting for the probe's lock, not writing unlocked
        os.close(probe)  # the probe's lock released
        assert entered.wait(60)
        check = os.open(folder, os.O_RDONLY)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(check, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(check)
    finally:
        with contextlib.suppress(OSError):
            os.close(probe)
        done.set()
        writer.join()


def test_what_a_killed_trainer_left_in_the_cache_is_removed_by_the_next(tmp_path: Path) -> None:
    # kill -9 while the cache was written, or while a damaged one was being removed: the
    # folder stayed for good (the size of the shards, each time).
    key = prepare_corpus(tmp_path / "elsewhere").folder.name
    root = tmp_path / "cache"
    half_written = left_behind(root, key, "tmp", age_s=3600)
    damaged = left_behind(root, key, "damaged", age_s=0)
    # Made a moment ago: its writer may not hold its flock yet.
    just_made = left_behind(root, key, "tmp", age_s=0)
    data = prepare_corpus(root)
    assert sorted(p.name for p in root.iterdir()) == sorted([key, just_made.name])
    assert not half_written.exists() and not damaged.exists()
    assert data.folder == root / key


def test_a_text_too_small_for_the_vocabulary_asked_says_what_it_got(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    train_docs, val_docs = split_documents([CORPUS.read_text(encoding="utf-8")], 0.1)
    data = prepare(train_docs, val_docs, tmp_path, vocab_size=20_000)
    learned = data.tokenizer.get_vocab_size()
    assert learned < 20_000
    assert capsys.readouterr().out.splitlines()[:2] == [
        f"training a 20000-entry tokenizer on {sum(map(len, train_docs)):,} characters",
        f"the text gave {learned} entries (a merge needs a pair seen at least twice): "
        f"the model's vocabulary is {learned}",
    ]


def test_the_tokenizer_trained_for_a_cache_reuses_that_cache_and_no_other(tmp_path: Path) -> None:
    # A resumed run brings its checkpoint's tokenizer, the one trained for this text.
    first = prepare_corpus(tmp_path)
    train_docs, val_docs = split_documents([CORPUS.read_text(encoding="utf-8")], 0.1)
    again = prepare(train_docs, val_docs, tmp_path, vocab_size=384, tokenizer=first.tokenizer)
    assert again.folder == first.folder
    assert [p.name for p in tmp_path.iterdir()] == [first.folder.name]
    other = train_tokenizer(train_docs, 300)
    elsewhere = prepare(train_docs, val_docs, tmp_path, vocab_size=384, tokenizer=other)
    assert elsewhere.folder != first.folder
    assert elsewhere.tokenizer.get_vocab_size() == other.get_vocab_size()


@pytest.mark.parametrize("case", ["is a file", "is inside a file", "cannot be created"])
def test_a_cache_dir_that_cannot_be_a_folder_exits_2_naming_the_flag(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str
) -> None:
    if case == "cannot be created":
        cache = Path("/proc/pocketgpt-test-cache")  # procfs refuses new folders, even to root
    else:
        file = tmp_path / "notes.txt"
        file.write_text("a file, not a folder\n")
        cache = file if case == "is a file" else file / "cache"
    out_dir = tmp_path / "out"
    flags = [*TINY, "--max-steps", "1", "--data", str(CORPUS), "--out-dir", str(out_dir)]
    assert pretrain.main([*flags, "--cache-dir", str(cache)]) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1, captured.err
    assert captured.err.startswith(f"error: --cache-dir {cache}: "), captured.err
    assert not out_dir.exists()
    if case != "cannot be created":  # found before the tokenizer is trained
        assert "training a" not in captured.out


# The tiny corpus's cache: tokenizer.json ~13 KB, train.bin ~23 KB. tokenizers reports
# its own write's failure as a bare Exception, numpy's tofile in bytes, not the reason.
@pytest.mark.parametrize("size", [8 * 1024, 16 * 1024], ids=["tokenizer.json", "train.bin"])
def test_a_cache_that_cannot_be_written_exits_2_with_the_reason_leaving_nothing(
    tmp_path: Path, size: int
) -> None:
    cache, out_dir = tmp_path / "cache", tmp_path / "out"
    flags = [*TINY, "--max-steps", "1", "--data", str(CORPUS), "--cache-dir", str(cache)]
    done = pretrain_in_files_up_to(size, *flags, "--out-dir", str(out_dir))
    assert done.returncode == 2, done.stderr
    assert done.stderr.endswith(f"error: --cache-dir {cache}: cannot write (File too large)\n")
    assert "Traceback" not in done.stderr
    assert not cache.exists()  # no half-written cache folder, nor the root made for it


def test_a_post_processor_that_adds_a_bos_adds_nothing_to_token_streams(
    tokenizer: Tokenizer,
) -> None:
    # HF Llama tokenizers often add BOS to every encoding; documents get one separator
    # each, from the token stream, as the server's prompts get none.
    eos = tokenizer.token_to_id("<|endoftext|>")
    with_bos = Tokenizer.from_str(tokenizer.to_str())
    with_bos.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", eos)]
    )
    docs = ["First document.", "Second one, " * 3]
    plain = token_stream(tokenizer, docs)
    assert token_stream(with_bos, docs).tolist() == plain.tolist()
    assert plain.tolist().count(eos) == 2


def test_other_validation_text_beside_the_same_training_text_gets_its_own_cache(
    tmp_path: Path,
) -> None:
    # --val-data changed on a resume: the training split (and so the tokenizer) is the
    # same, the validation tokens must not be the old text's.
    train_docs, val_docs = split_documents([CORPUS.read_text(encoding="utf-8")], 0.1)
    first = prepare(train_docs, val_docs, tmp_path, vocab_size=384)
    other_val = [VAL.read_text(encoding="utf-8")]
    other = prepare(train_docs, other_val, tmp_path, vocab_size=384)
    assert other.folder != first.folder
    assert other.val.tolist() == token_stream(other.tokenizer, other_val).tolist()


@pytest.mark.parametrize("case", ["train.bin grown", "val.bin one id past the vocabulary"])
def test_a_cache_damaged_past_what_meta_json_says_is_rebuilt(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str
) -> None:
    first = prepare_corpus(tmp_path)
    folder, vocab_size = first.folder, first.tokenizer.get_vocab_size()
    files = {name: (folder / name).read_bytes() for name in ("train.bin", "val.bin")}
    del first  # (its memmaps)
    if case == "train.bin grown":
        (folder / "train.bin").write_bytes(files["train.bin"] + b"\x01\x00")
    else:
        size = len(files["val.bin"]) // 2
        np.full(size, vocab_size, dtype=np.uint16).tofile(folder / "val.bin")
    capsys.readouterr()
    again = prepare_corpus(tmp_path)
    assert capsys.readouterr().err.startswith(f"warning: {folder}: damaged token cache (")
    assert {name: (folder / name).read_bytes() for name in files} == files
    assert int(again.val.max()) < vocab_size


def test_a_tokenizer_json_swapped_for_another_vocabulary_is_rebuilt(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first = prepare_corpus(tmp_path)
    folder, kept = first.folder, (first.folder / "tokenizer.json").read_bytes()
    other = train_tokenizer([CORPUS.read_text(encoding="utf-8")], 300)
    other.save(str(folder / "tokenizer.json"))
    capsys.readouterr()
    again = prepare_corpus(tmp_path)
    assert capsys.readouterr().err.startswith(f"warning: {folder}: damaged token cache (")
    assert (folder / "tokenizer.json").read_bytes() == kept
    assert again.tokenizer.get_vocab_size() == first.tokenizer.get_vocab_size()


def test_a_cached_corpus_too_small_for_the_batch_asked_now_is_refused(tmp_path: Path) -> None:
    # Cached by a run with small batches; a later run with larger ones finds the cache.
    data = prepare_corpus(tmp_path)
    train_docs, val_docs = split_documents([CORPUS.read_text(encoding="utf-8")], 0.1)
    with pytest.raises(CorpusError, match="the corpus is too small"):
        prepare(
            train_docs, val_docs, tmp_path, vocab_size=384, min_train_tokens=data.train.size + 1
        )


def test_a_bar_in_a_log_writes_whole_lines_and_leaves_tqdms_monitor_nothing_to_add(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    log = io.StringIO()  # stderr as in `docker compose logs`: no terminal
    monkeypatch.setattr(sys, "stderr", log)
    bar = tqdm(total=10, desc="steps", **bar_output())
    bar.update(3)
    bar.refresh()
    bar.close()
    lines = log.getvalue().split("\n")
    assert lines[-1] == "" and all(lines[:-1]) and "\r" not in log.getvalue()
    assert lines[-2].startswith("steps:  30%|")
    # tqdm's monitor thread refreshes a bar whose miniters grew past 1 without moving
    # its last print time: the next step then printed another line, seconds later.
    assert bar.miniters == 1 and not bar.dynamic_miniters


def test_a_cache_an_older_trainer_wrote_gives_no_tokenizer_without_todays_settings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Before 2026-12-06 the trainer's tokenizer had no CRLF normalizer; its cache of the
    # same text and vocabulary size, named as below, held the same merges without it.
    # Reused, a new run wrote that tokenizer into its checkpoints: CRLF prompts read as
    # unseen "\r" tokens.
    first = prepare_corpus(tmp_path)
    train_docs, val_docs = split_documents([CORPUS.read_text(encoding="utf-8")], 0.1)
    digests = {"train": text_digest(train_docs), "val": text_digest(val_docs)}
    older = tmp_path / cache_key(digests, "bpe-384")
    if older != first.folder:
        shutil.copytree(first.folder, older)
        shutil.rmtree(first.folder)
    without = Tokenizer.from_str(first.tokenizer.to_str())
    without.normalizer = None
    without.save(str(older / "tokenizer.json"))
    capsys.readouterr()
    again = prepare_corpus(tmp_path)
    assert again.tokenizer.to_str() == first.tokenizer.to_str()
    assert again.tokenizer.encode("a\r\nb").ids == again.tokenizer.encode("a\nb").ids


def test_the_same_text_cut_into_other_documents_is_a_cache_of_its_own(tmp_path: Path) -> None:
    # Each document ends at a separator: "ab" and "c" are not the tokens of "a" and "bc",
    # and a cache named for the one must not be taken for the other.
    first = prepare_corpus(tmp_path)
    train_docs, val_docs = split_documents([CORPUS.read_text(encoding="utf-8")], 0.1)
    joined, cut = "".join(train_docs[:2]), len(train_docs[0])
    moved = [joined[: cut + 1], joined[cut + 1 :], *train_docs[2:]]
    again = prepare(moved, val_docs, tmp_path, vocab_size=384, tokenizer=first.tokenizer)
    assert again.folder != first.folder
    assert not np.array_equal(again.train, first.train)


def test_preparing_text_holds_it_once_and_never_all_of_its_ids(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A trainer preparing a 150 MB file peaked at ~5x its size: the text read and the
    # split's copy of it both held while tokenizing, and every id twice (a list of
    # batches, then joined). Batches of 16K characters: small beside this 1 MB text, as
    # the trainer's 2M are beside a large corpus.
    monkeypatch.setattr(prepare_module, "BATCH_CHARS", 1 << 14)
    words = [word for word in CORPUS.read_text(encoding="utf-8").split() if word.isascii()]
    rng = random.Random(0)
    lines = (" ".join(rng.choices(words, k=12)) for _ in range(16_000))
    documents = ["\n".join(lines)]
    chars = len(documents[0])
    assert chars == len(documents[0].encode("utf-8")) > 1_000_000  # one byte a character
    args = TrainArgs(cache_dir=str(tmp_path), vocab_size=300, batch_size=4, block_size=32)
    tracemalloc.start()
    try:
        data = pretrain.load_data(args, documents, None, None, None, world_size=1)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    ids = (data.train.size + data.val.size) * data.train.itemsize
    assert ids > chars  # their bytes, held twice more, would show past the bound below
    assert documents == []  # taken over: the text is held once, split
    # Allocated while preparing (the text was read before): the split's copy of the
    # text, and a batch's ids at a time (1.4x the text's bytes here; 3.7x joined).
    assert peak < 2.5 * chars, (peak, chars, ids)


def test_a_bar_whose_work_ends_within_a_second_writes_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Tokenizing a small file: a bar drawn and closed at once was noise in every run's log.
    log = io.StringIO()
    monkeypatch.setattr(sys, "stderr", log)
    with progress_bar("tokenizing", 10, "tok") as bar:
        bar.update(10)
    assert log.getvalue() == ""


def test_a_bar_without_a_label_writes_nothing_even_when_redrawn(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # evaluate_stream's bar in the trainer's validation (no label): the trainer's own
    # line says what it evaluated.
    log = io.StringIO()
    monkeypatch.setattr(sys, "stderr", log)
    for label in (None, "evaluating"):
        bar = progress_bar(label, 10, "tok")
        bar.update(3)
        bar.refresh()
        bar.close()
        if label is None:
            assert log.getvalue() == ""
    assert log.getvalue().startswith("evaluating:  30%|")  # a labelled one, redrawn, does


def test_a_bar_in_a_log_writes_its_start_and_end_not_a_line_per_quick_step(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A line per step of a fast loop (a tokenizer's batches) would fill the log: in a log
    # the bar writes at most one line every 30 s, and its last on closing.
    log = io.StringIO()
    monkeypatch.setattr(sys, "stderr", log)
    bar = tqdm(total=50, desc="tokenizing", **bar_output())
    for _ in range(50):
        bar.update(1)
    bar.close()
    lines = log.getvalue().splitlines()
    assert len(lines) == 2, lines
    assert lines[0].startswith("tokenizing:   0%|") and lines[1].startswith("tokenizing: 100%|")
