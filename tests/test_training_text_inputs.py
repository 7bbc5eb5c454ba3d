"""Awkward text input: invalid UTF-8, binary files, empty files and folders."""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import pytest

from model.checkpoint import resolve_checkpoint
from tests.test_training_pretrain import CORPUS, TINY, meta
from training import evaluate, pretrain
from training.corpus import MIN_DOCSTRING_CHARS, CorpusError, default_documents, load_documents


def train(tmp_path: Path, *data: Path) -> int:
    args = [*TINY, "--max-steps", "1", "--cache-dir", str(tmp_path / "cache")]
    return pretrain.main([*args, "--out-dir", str(tmp_path / "out"), "--data", *map(str, data)])


def folder_with_text(folder: Path) -> Path:
    """`folder`, made, holding good.txt: text to train on beside what a test adds."""
    folder.mkdir()
    (folder / "good.txt").write_bytes(CORPUS.read_bytes())
    return folder


def binary_file(path: Path) -> Path:
    path.write_bytes(bytes(random.Random(0).randrange(256) for _ in range(4096)) + b"\0")
    return path


def test_invalid_utf8_is_replaced_with_one_warning_naming_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = tmp_path / "broken.txt"
    broken.write_bytes(CORPUS.read_bytes() + b"\xff\xfe \xc3\x28 tail")
    assert train(tmp_path, broken) == 0
    err = capsys.readouterr().err
    assert err.count(f"warning: {broken}: invalid UTF-8") == 1
    resolve_checkpoint(tmp_path / "out")


def test_a_binary_file_is_skipped_with_a_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = folder_with_text(tmp_path / "mixed")
    binary = binary_file(folder / "image.txt")
    assert train(tmp_path, folder) == 0
    err = capsys.readouterr().err
    assert err.count(f"warning: {binary}: binary") == 1
    assert "invalid UTF-8" not in err  # skipped, not decoded into noise
    assert "without text" not in err  # said once, as binary


def test_files_without_text_are_skipped_with_one_warning_naming_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = folder_with_text(tmp_path / "notes")
    empty, spaces, blank_lines = folder / "a.txt", folder / "b.md", folder / "c.jsonl"
    empty.write_bytes(b"")  # an export that failed
    spaces.write_text(" \n\t\n", encoding="utf-8")
    blank_lines.write_text('\n{"text": "  "}\n\n', encoding="utf-8")
    assert load_documents([folder]) == [CORPUS.read_text(encoding="utf-8")]
    assert capsys.readouterr().err == (
        f"warning: 3 files without text (empty or blank), skipped: {empty}, {spaces}, "
        f"{blank_lines}\n"
    )


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-be", "utf-32"])
def test_text_whose_byte_order_mark_says_utf16_or_utf32_is_read_as_such(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], encoding: str
) -> None:
    text = "我们在这里学习中文。Mixed with English."  # UTF-16 without a single NUL byte
    path = tmp_path / "notepad.txt"
    # Python's utf-16 and utf-32 write a little-endian mark; utf-16-be needs one given.
    mark = "\ufeff" if encoding == "utf-16-be" else ""
    path.write_bytes((mark + text).encode(encoding))
    assert load_documents([path]) == [text]
    assert capsys.readouterr().err == ""
    # Without its mark, UTF-16 that holds ASCII is still told from UTF-8 by its NULs.
    path.write_bytes("Plain English.".encode("utf-16-le"))
    with pytest.raises(CorpusError, match="the corpus is empty"):
        load_documents([path])
    assert f"warning: {path}: binary (NUL bytes; " in capsys.readouterr().err


def test_windows_line_ends_become_newlines_in_text_and_jsonl(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_bytes(b"First line.\r\nSecond.\r\n\r\nA carriage\rreturn.")
    record = {"text": "One.\r\nTwo."}
    (tmp_path / "b.jsonl").write_bytes(json.dumps(record).encode() + b"\r\n")
    assert load_documents([tmp_path]) == [
        "First line.\nSecond.\n\nA carriage\rreturn.",  # a lone CR is text
        "One.\nTwo.",
    ]


@pytest.mark.parametrize("case", ["only binary", "0-byte file", "empty folder"])
def test_input_without_text_exits_2_naming_it_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str
) -> None:
    if case == "only binary":
        path = binary_file(tmp_path / "data.txt")
    elif case == "0-byte file":
        path = tmp_path / "empty.md"
        path.write_bytes(b"")
    else:
        path = tmp_path / "folder"
        path.mkdir()
    assert train(tmp_path, path) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith(f"error: {path}"), err
    assert not (tmp_path / "out").exists()


def test_jsonl_texts_keep_unicode_line_separators_written_unescaped(tmp_path: Path) -> None:
    # json.dumps(..., ensure_ascii=False) writes U+2028, U+2029 and U+0085 as they are;
    # only "\n" ends a record, on LF and CRLF files alike.
    texts = ["one\u2028two", "para\u2029graph", "next\x85line", "form\x0cfeed\x1cend"]
    for newline in ("\n", "\r\n"):
        path = tmp_path / "records.jsonl"
        lines = [json.dumps({"text": t}, ensure_ascii=False) for t in texts]
        path.write_bytes(newline.join(lines).encode("utf-8") + newline.encode())
        assert load_documents([path]) == texts


def test_jsonl_lone_surrogate_escapes_are_replaced_with_one_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # "\ud83d" is the first half of an emoji cut in two: valid JSON, but no UTF-8 text.
    lines = CORPUS.read_text(encoding="utf-8").splitlines()
    records = tmp_path / "scraped.jsonl"
    records.write_text("".join(json.dumps({"text": f"{ln} \ud83d"}) + "\n" for ln in lines))
    assert "\\ud83d" in records.read_text(encoding="ascii")
    assert train(tmp_path, records) == 0
    err = capsys.readouterr().err
    assert err.count(f"warning: {records}: invalid UTF-8, lone surrogate") == 1
    assert load_documents([records])[0] == f"{lines[0]} \ufffd"
    capsys.readouterr()
    checkpoint = ["--checkpoint", str(tmp_path / "out"), "--data", str(records)]
    assert evaluate.main(checkpoint) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("bpb=")


def test_an_unreadable_file_exits_2_naming_it_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], tiny_checkpoint: Path
) -> None:
    folder = folder_with_text(tmp_path / "texts")
    unreadable = folder / "z.txt"
    # Linux's /proc/self/mem: a file whose read() fails (EIO) even for root, who reads
    # any file whatever its mode bits.
    unreadable.symlink_to("/proc/self/mem")
    assert train(tmp_path, folder) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {unreadable}: cannot read ("), err
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()
    assert evaluate.main(["--checkpoint", str(tiny_checkpoint), "--data", str(folder)]) == 2
    assert capsys.readouterr().err.startswith(f"error: {unreadable}: cannot read (")


def test_a_corpus_folder_may_hold_its_runs_and_hidden_folders_which_are_not_read(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    project = tmp_path / "project"
    (project / ".venv" / "licenses").mkdir(parents=True)
    (project / "notes.txt").write_bytes(CORPUS.read_bytes())
    (project / ".venv" / "licenses" / "LICENSE.txt").write_text("Permission is hereby granted")
    (project / ".draft.md").write_text("not yet")
    common = [*TINY, "--max-steps", "2", "--data", str(project)]
    first, second = project / "runs" / "first", project / "runs" / "second"
    assert pretrain.main([*common, "--out-dir", str(first)]) == 0
    # A model folder beside the text: its model card is not text to train on either.
    model = project / "exported"
    shutil.copytree(resolve_checkpoint(first), model)
    (model / "README.md").write_text("---\nlicense: mit\n---\n# A model card")
    # A run killed before its first checkpoint: a log, no `latest` yet.
    killed = project / "runs" / "killed"
    killed.mkdir()
    (killed / "log.jsonl").write_text('{"kind": "train", "step": 10, "loss": 5.1}\n')
    capsys.readouterr()

    # The first run's log.jsonl is not a corpus file: the same text, the same cache.
    assert pretrain.main([*common, "--out-dir", str(second)]) == 0
    err = capsys.readouterr().err
    for skipped in (first, model, killed):
        assert f"warning: {skipped}: a run or model folder, skipped" in err
    assert meta(second)["data"]["cache"] == meta(first)["data"]["cache"]
    assert meta(second)["data"]["train"]["bytes"] + meta(second)["data"]["val"]["bytes"] == len(
        CORPUS.read_bytes()
    )
    # And the first run resumes with the command that started it.
    assert pretrain.main([*common, "--out-dir", str(first), "--resume", str(first)]) == 0
    assert meta(first)["step"] == 2
    assert pretrain.main(["--resume", str(first), "--max-steps", "3"]) == 0
    assert meta(first)["step"] == 3
    # Other --data that reads the same text (here by another path, as a moved mount) is
    # the same text: nothing to warn of.
    capsys.readouterr()
    assert pretrain.main(["--resume", str(first), "--max-steps", "4", "--data", str(CORPUS)]) == 0
    assert "warning" not in capsys.readouterr().err
    # A run folder named as the text itself is refused, naming it.
    capsys.readouterr()
    assert pretrain.main([*TINY, "--data", str(first), "--out-dir", str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err == f"error: {first}: a training run or model folder, not text\n"


def test_linked_folders_and_upper_case_suffixes_are_read_each_file_once(tmp_path: Path) -> None:
    corpus, elsewhere = tmp_path / "corpus", tmp_path / "elsewhere"
    corpus.mkdir()
    elsewhere.mkdir()
    (corpus / "NOTES.TXT").write_text("Notes in capitals.")
    (elsewhere / "more.md").write_text("More notes, kept in another folder.")
    (corpus / "linked").symlink_to(elsewhere)
    (corpus / "again").symlink_to(elsewhere)  # the same folder twice
    (elsewhere / "loop").symlink_to(corpus)  # and a link back up
    documents = load_documents([corpus])
    assert sorted(documents) == ["More notes, kept in another folder.", "Notes in capitals."]


def test_a_dangling_link_in_a_folder_is_skipped_and_a_linked_file_read_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("The one real file.")
    (corpus / "b.txt").symlink_to(corpus / "a.txt")
    (corpus / "gone.txt").symlink_to(tmp_path / "moved.txt")
    (corpus / "self.txt").symlink_to("self.txt")  # a loop
    assert load_documents([corpus]) == ["The one real file."]
    assert sorted(capsys.readouterr().err.splitlines()) == [  # in the folder's listing order
        f"warning: {corpus / 'b.txt'}: already read (the same file as {corpus / 'a.txt'}), "
        "read once",
        f"warning: {corpus / 'gone.txt'}: links to {tmp_path / 'moved.txt'}, which does not "
        "exist; skipped",
        f"warning: {corpus / 'self.txt'}: links to self.txt, a loop of links that never "
        "reaches a file or folder; skipped",
    ]
    with pytest.raises(CorpusError, match=r"self.txt: links to self.txt, a loop of links"):
        load_documents([corpus / "self.txt"])
    with pytest.raises(CorpusError, match=r"gone.txt: links to .*moved.txt, which does not"):
        load_documents([corpus / "gone.txt"])


def test_a_file_named_twice_is_read_once_and_a_byte_order_mark_is_no_text(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    bom = "\ufeff".encode()
    (corpus / "a.txt").write_bytes(bom + b"First, from Notepad.")
    (corpus / "b.jsonl").write_bytes(bom + json.dumps({"text": "Second."}).encode() + b"\n")
    (corpus / "table.csv").write_text("a,b\n")
    (corpus / "Makefile").write_text("all:\n")
    documents = load_documents([corpus, corpus / "a.txt"])
    assert documents == ["First, from Notepad.", "Second."]
    err = capsys.readouterr().err
    assert err.count(f"warning: {corpus / 'a.txt'}: already read (named twice), read once") == 1
    assert (
        f"warning: {corpus}: 2 other files not read (only .txt, .md and .jsonl are: .csv, "
        "no suffix)" in err
    )


def test_the_same_text_at_another_path_is_read_once_with_a_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A hard link (or a bind mount) is another path to the same file, a download saved
    # twice another file of the same text: either would put the text in both splits.
    folder = folder_with_text(tmp_path / "notes")
    good = folder / "good.txt"
    (folder / "saved twice.txt").write_bytes(good.read_bytes())
    (folder / "linked").mkdir()
    os.link(good, folder / "linked" / "hard.txt")
    (folder / "other.md").write_text("Other text.", encoding="utf-8")
    assert train(tmp_path, folder) == 0
    err = capsys.readouterr().err
    # One line for them all (a folder of exports can hold hundreds), in the order read.
    hard, copy = folder / "linked" / "hard.txt", folder / "saved twice.txt"
    assert (
        "warning: 2 files with the same text as a file read before, skipped: "
        f"{hard} (as {good}), {copy} (as {good})\n"
    ) in err, err
    data = meta(tmp_path / "out")["data"]
    assert data["train"]["bytes"] + data["val"]["bytes"] == len(good.read_bytes()) + 11


def test_jsonl_files_joined_with_their_byte_order_marks_are_read_record_by_record(
    tmp_path: Path,
) -> None:
    # `cat a.jsonl b.jsonl` of files Notepad saved: the second mark starts a line.
    bom = "\ufeff".encode()
    part = bom + json.dumps({"text": "First."}).encode() + b"\r\n"
    joined = tmp_path / "joined.jsonl"
    joined.write_bytes(part + part.replace(b"First", b"Second"))
    assert load_documents([joined]) == ["First.", "Second."]


def test_an_upper_case_jsonl_suffix_is_read_record_by_record(tmp_path: Path) -> None:
    # Windows exports say EXPORT.JSONL: records, not one document of raw JSON.
    path = tmp_path / "EXPORT.JSONL"
    path.write_text(json.dumps({"text": "First record."}) + "\n" + json.dumps({"text": "Second."}))
    assert load_documents([path]) == ["First record.", "Second."]


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ('{"id": ' + "7" * 5000 + ', "text": "x"}', "Exceeds the limit (4300 digits)"),
        ("[" * 100_000 + "]" * 100_000, "nested too deep"),
    ],
    ids=["5000-digit number", "nested 100000 deep"],
)
def test_a_jsonl_line_python_cannot_read_exits_2_naming_the_file_and_line(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    tiny_checkpoint: Path,
    line: str,
    problem: str,
) -> None:
    # Valid JSON that json.loads refuses with a ValueError or RecursionError of its own,
    # not the JSONDecodeError of malformed lines: a traceback and exit 1.
    path = tmp_path / "records.jsonl"
    path.write_text(json.dumps({"text": CORPUS.read_text(encoding="utf-8")}) + "\n" + line + "\n")
    assert train(tmp_path, path) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}:2: not readable JSON (") and problem in err, err
    assert err.count("\n") == 1 and not (tmp_path / "out").exists()
    assert evaluate.main(["--checkpoint", str(tiny_checkpoint), "--data", str(path)]) == 2
    assert capsys.readouterr().err == err


def test_jsonl_lines_holding_only_spaces_are_skipped_like_empty_ones(tmp_path: Path) -> None:
    path = tmp_path / "records.jsonl"
    path.write_text('{"text": "One."}\n  \n\t\n{"text": "Two."}\n \n', encoding="utf-8")
    assert load_documents([path]) == ["One.", "Two."]


def test_a_folder_with_a_config_json_but_no_weights_is_read_as_text(tmp_path: Path) -> None:
    # Only config.json beside *.safetensors is a model; a project's config.json is not.
    project = tmp_path / "project"
    (project / "docs").mkdir(parents=True)
    (project / "config.json").write_text("{}")
    (project / "docs" / "config.json").write_text("{}")
    (project / "notes.txt").write_text("Project notes.")
    (project / "docs" / "guide.md").write_text("A guide.")
    assert load_documents([project]) == ["A guide.", "Project notes."]


def test_a_log_jsonl_of_documents_is_text_though_its_records_have_a_kind(tmp_path: Path) -> None:
    # A trainer's log has `kind` and no `text`; a corpus named log.jsonl may have both.
    corpus = tmp_path / "corpus"
    (corpus / "diary").mkdir(parents=True)
    record = {"kind": "entry", "text": "Dear diary."}
    (corpus / "diary" / "log.jsonl").write_text(json.dumps(record) + "\n")
    (corpus / "log.jsonl").write_text(json.dumps({**record, "text": "Top entry."}) + "\n")
    assert load_documents([corpus]) == ["Dear diary.", "Top entry."]


def test_a_log_jsonl_of_conversations_is_read_though_its_records_have_a_kind(
    tmp_path: Path,
) -> None:
    # A chat export named log.jsonl, its records of a `kind`: conversations, not a run's log.
    corpus = tmp_path / "chats"
    corpus.mkdir()
    messages = [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello."}]
    record = {"kind": "chat", "messages": messages}
    (corpus / "log.jsonl").write_text(json.dumps(record) + "\n")
    documents = load_documents([corpus])
    assert [doc.as_messages() for doc in documents] == [messages]


def test_a_fifo_is_no_text_named_or_found_in_a_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Reading a FIFO waits for a writer: the trainer hung without a word.
    folder = folder_with_text(tmp_path / "texts")
    os.mkfifo(folder / "pipe.txt")
    assert load_documents([folder]) == load_documents([folder / "good.txt"])
    assert (
        f"warning: {folder / 'pipe.txt'}: not a regular file; skipped\n" in capsys.readouterr().err
    )
    with pytest.raises(CorpusError, match=r"pipe\.txt: not a regular file or folder$"):
        load_documents([folder / "pipe.txt"])
    # Nor one named as a trainer's log, which a folder is searched for (a run folder).
    (folder / "sub").mkdir()
    os.mkfifo(folder / "sub" / "log.jsonl")
    assert load_documents([folder]) == load_documents([folder / "good.txt"])


def test_the_default_corpus_holds_each_text_once_without_doctests_or_short_ones() -> None:
    # A docstring that the stdlib repeats (in CPython 3.11's, two) is one document: kept
    # twice, it could be trained on and then scored on.
    documents = default_documents()
    assert len(documents) == len(set(documents))
    assert all(len(text) >= MIN_DOCSTRING_CHARS for text in documents)
    assert not any(
        line.lstrip().startswith(">>>") for text in documents for line in text.splitlines()
    )
