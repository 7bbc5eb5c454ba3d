"""Find and clean training text: the user's files and folders, or the embedded default corpus.

User text: `.txt` and `.md` files are one document each; `.jsonl` files hold one
document per line in a `text` field, or one conversation per line in a `messages`
list of `{"role", "content"}` objects (OpenAI's fine-tuning format): a corpus is text
or conversations, not both. Folders are searched recursively in sorted
order, past hidden files and folders and past training runs and model folders.
Text is decoded as UTF-8, or as the UTF-16 / UTF-32 its byte-order mark declares;
invalid bytes, and in `.jsonl` strings escapes of lone UTF-16 surrogates, become
U+FFFD, with one warning naming the file and the problem. A file holding NUL bytes
without such a mark is binary (or UTF-16 without one), not text: it is skipped with
a warning rather than trained on as noise. Windows line ends (CRLF) become "\n", so
that a model trained on them ends its lines as every other text does (and a stop
string "\n\n" finds its paragraphs).

The default corpus is English that ships inside the Python standard library, so
the zero-argument run needs no download:
  - `pydoc_data.topics`: the language reference topics behind `help()` (79 topics,
    ~465 KB on CPython 3.11);
  - the docstrings of stdlib modules and classes longer than 200 characters,
    read with `ast` from the source files (nothing is imported), outside tests,
    idlelib, lib2to3 and turtledemo (~400 KB, ~500 docstrings on 3.11).
Doctest lines (`>>>` / `...`) are dropped, exact duplicates removed, and the order
is fixed (topics by name, then files by path), so the corpus is deterministic for
a given Python version: 843,898 UTF-8 bytes in 584 documents on CPython 3.11.7.
Building it parses ~580 files (5-10 s on 2 cores).
"""

from __future__ import annotations

import ast
import codecs
import errno
import hashlib
import json
import os
import re
import sys
import sysconfig
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

from model.chat_template import CHAT_ROLES
from model.checkpoint import CONFIG, LATEST, RUN_LOG, is_run_log

TEXT_SUFFIXES = (".txt", ".md")
JSONL_SUFFIX = ".jsonl"
MIN_DOCSTRING_CHARS = 200  # shorter docstrings are mostly signatures and one-liners
SKIPPED_STDLIB_DIRS = {"idlelib", "lib2to3", "turtledemo", "site-packages", "__pycache__"}
# A JSON escape such as "\ud83d" without its pair (a cut emoji in scraped text) decodes
# to a lone surrogate: a str that no UTF-8 encoder or tokenizer accepts.
LONE_SURROGATE = re.compile("[\ud800-\udfff]")


# Encodings a byte-order mark declares; UTF-32's first: its little-endian mark begins
# with UTF-16's. (UTF-8's mark is dropped by utf-8-sig.)
BYTE_ORDER_MARKS = (
    (codecs.BOM_UTF32_LE, "utf-32", "UTF-32"),
    (codecs.BOM_UTF32_BE, "utf-32", "UTF-32"),
    (codecs.BOM_UTF16_LE, "utf-16", "UTF-16"),
    (codecs.BOM_UTF16_BE, "utf-16", "UTF-16"),
)


class CorpusError(Exception):
    """Unusable input text; the message names the path and the problem."""


@dataclass(frozen=True)
class Conversation:
    """A chat to learn from (a `.jsonl` record's `messages`): the model learns to write
    its assistant messages, given the messages before each."""

    messages: tuple[tuple[str, str], ...]  # (role, content), in order
    # The assistant messages (their indices) not to learn: OpenAI's `"weight": 0`.
    not_learned: tuple[int, ...] = ()
    source: str = field(default="", compare=False)  # "file:line", for errors

    def as_messages(self) -> list[dict[str, str]]:
        """The messages as a chat template takes them."""
        return [{"role": role, "content": content} for role, content in self.messages]

    @property
    def text(self) -> str:
        """Its contents, one after another: what a tokenizer is trained on."""
        return "\n".join(content for _, content in self.messages)


Document = str | Conversation


def document_text(doc: Document) -> str:
    """A text document itself, or a conversation's contents (`Conversation.text`)."""
    return doc.text if isinstance(doc, Conversation) else doc


def read_text(path: Path) -> str | None:
    """A file's text (UTF-8 unless a byte-order mark says UTF-16 or UTF-32), with "\n"
    line ends; invalid bytes are replaced, with one warning naming the file.

    A binary file reads as None (it adds no document), with a warning naming it.
    """
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise CorpusError(f"{path}: cannot read ({e.strerror or e})") from None
    # utf-8-sig: a UTF-8 byte-order mark (Windows editors write one) is no text to train
    # on, and json.loads refuses a .jsonl line that starts with it.
    encoding, name = next(
        ((codec, name) for mark, codec, name in BYTE_ORDER_MARKS if raw.startswith(mark)),
        ("utf-8-sig", "UTF-8"),
    )
    if name == "UTF-8" and b"\0" in raw:
        print(
            f"warning: {path}: binary (NUL bytes; UTF-16 text needs a byte-order mark or "
            "conversion to UTF-8), skipped",
            file=sys.stderr,
        )
        return None
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError:
        _warn_replaced(path, f"invalid {name}, bad bytes")
        text = raw.decode(encoding, errors="replace")
    return text.replace("\r\n", "\n")


def _warn_replaced(path: Path, what: str) -> None:
    print(f"warning: {path}: {what} replaced with U+FFFD", file=sys.stderr)


def _documents_in(path: Path) -> list[Document] | None:
    """The documents of one file (None: binary, skipped with a warning)."""
    if path.suffix.lower() == JSONL_SUFFIX:
        return _jsonl_documents(path)
    text = read_text(path)
    return None if text is None else [text]


def _jsonl_documents(path: Path) -> list[Document] | None:
    text = read_text(path)
    if text is None:
        return None
    documents: list[Document] = []
    surrogates = False

    def cleaned(text: str) -> str:
        nonlocal surrogates
        text, replaced = LONE_SURROGATE.subn("\ufffd", text)
        surrogates = surrogates or replaced > 0
        return text.replace("\r\n", "\n")

    # JSON Lines ends records at "\n" only: str.splitlines() would also cut at U+2028,
    # U+2029 and U+0085, which JSON allows unescaped inside strings (ensure_ascii=False).
    # (read_text has made a CRLF file's line ends "\n".)
    for number, line in enumerate(text.split("\n"), start=1):
        # Files saved with a byte-order mark and joined (`cat a.jsonl b.jsonl`) hold one at
        # the start of a line: no text, as at the start of the file.
        line = line.removeprefix("\ufeff")
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise CorpusError(f"{path}:{number}: not valid JSON ({e.msg})") from None
        except ValueError as e:  # a number of more than 4,300 digits
            raise CorpusError(f"{path}:{number}: not readable JSON ({e})") from None
        except RecursionError:  # brackets nested thousands deep
            raise CorpusError(f"{path}:{number}: not readable JSON (nested too deep)") from None
        where = f"{path}:{number}"
        if isinstance(record, dict) and "messages" in record:
            document: Document = _conversation(record, where, cleaned)
        else:
            text = record.get("text") if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise CorpusError(
                    f"{where}: expected an object with a string 'text' field or a 'messages' list"
                )
            document = cleaned(text)
        if documents and type(document) is not type(documents[0]):
            kind = (
                "a conversation among text records"
                if isinstance(document, Conversation)
                else "a text among conversations"
            )
            raise CorpusError(f"{where}: {kind}: a corpus is text or conversations, not both")
        documents.append(document)
    if surrogates:
        _warn_replaced(path, "invalid UTF-8, lone surrogate escapes")
    return documents


def _conversation(record: dict, where: str, cleaned: Callable[[str], str]) -> Conversation:
    """A record's `messages` list as a Conversation; a CorpusError naming `where`
    (file:line) and the problem if it is not one to learn from. Its other fields are not
    read (an id, a source), but those that would change what it means: tools, a text. A
    field that is null is read as left out, as the server's chat route reads it (OpenAI's
    SDK writes `"refusal": null`, `"tool_calls": null` into each message it saves)."""
    given = {key for key, value in record.items() if value is not None}
    if refused := sorted(given & {"text", "tools", "functions", "parallel_tool_calls"}):
        raise CorpusError(
            f"{where}: {refused[0]!r} beside 'messages' is not read (a record is a text or a "
            "conversation, without tools)"
        )
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise CorpusError(f"{where}: 'messages' must be a non-empty list of messages")
    turns, not_learned = [], []
    for index, message in enumerate(messages):
        said = f"{where}: message {index + 1}"
        if not isinstance(message, dict):
            raise CorpusError(f"{said} is not an object")
        given = {key for key, value in message.items() if value is not None}
        if other := sorted(given - {"role", "content", "weight"}):
            raise CorpusError(
                f"{said}: only 'role', 'content' and 'weight' are read, not {other[0]!r}"
            )
        role = message.get("role")
        if role not in CHAT_ROLES:
            roles = ", ".join(CHAT_ROLES)
            raise CorpusError(f"{said}: 'role' is {role!r}, not one of {roles}")
        turns.append((role, cleaned(_content(message.get("content"), said))))
        if (weight := message.get("weight")) is not None:
            if role != "assistant" or weight not in (0, 1) or isinstance(weight, bool):
                raise CorpusError(f"{said}: 'weight' is 0 or 1, on an assistant message")
            if weight == 0:
                not_learned.append(index)
    # An empty answer (or one of spaces) is read, not learned: it would teach the model to
    # say nothing.
    empty = [
        i for i, (role, content) in enumerate(turns) if role == "assistant" and not content.strip()
    ]
    not_learned = sorted({*not_learned, *empty})
    if all(role != "assistant" or i in not_learned for i, (role, _) in enumerate(turns)):
        raise CorpusError(f"{where}: no assistant message with content to learn")
    return Conversation(tuple(turns), tuple(not_learned), where)


def _content(content: object, said: str) -> str:
    """A message's content: a string, or OpenAI's text parts joined with newlines (as the
    server's chat route joins them)."""
    if isinstance(content, str):
        return content
    if (
        isinstance(content, list)
        and content
        and all(
            isinstance(part, dict)
            and part.get("type") == "text"
            and isinstance(part.get("text"), str)
            for part in content
        )
    ):
        return "\n".join(part["text"] for part in content)
    raise CorpusError(f"{said}: 'content' must be a string or a non-empty list of text parts")


def _is_model_folder(folder: Path) -> bool:
    """A training run (its `latest` pointer, or before its first checkpoint its log) or a
    model (config.json beside safetensors): its log.jsonl or model card is not text to
    train on. A folder this user may not enter (a bind mount the image's user 10001
    cannot read) is named as the one that cannot be read, not the `latest` inside it."""
    try:
        if (folder / LATEST).is_file() or is_run_log(folder / RUN_LOG):
            return True
        return (folder / CONFIG).is_file() and any(folder.glob("*.safetensors"))
    except OSError as e:
        raise CorpusError(f"{folder}: cannot read ({e.strerror or e})") from None


def _has_text_suffix(name: str) -> bool:
    return Path(name).suffix.lower() in (*TEXT_SUFFIXES, JSONL_SUFFIX)


def broken_link(path: Path) -> str | None:
    """What a link that leads nowhere leads to, said for an error line ("links to X,
    which does not exist"), or None where `path` is no such link. Raises OSError where
    the link cannot be read."""
    if not path.is_symlink() or path.exists():
        return None
    target = os.readlink(path)
    try:
        os.stat(path)
    except OSError as e:
        if e.errno == errno.ELOOP:  # to itself, or round through other links
            return f"links to {target}, a loop of links that never reaches a file or folder"
    return f"links to {target}, which does not exist"


def _files_under(path: Path) -> list[Path]:
    """`path` itself, or the text files below it, in sorted order. Hidden files and
    folders (.git, .venv, the trainer's .cache) and run or model folders are not read:
    a corpus folder may hold the runs trained on it. Linked folders are followed, each
    real folder once."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        if path.exists():  # a FIFO, a device: reading one may never end
            raise CorpusError(f"{path}: not a regular file or folder")
        raise CorpusError(f"{path}: {broken_link(path) or 'no such file or folder'}")
    if _is_model_folder(path):
        raise CorpusError(f"{path}: a training run or model folder, not text")
    files, seen, other_suffixes = [], set(), []

    def unreadable(error: OSError) -> NoReturn:  # os.walk skips a folder it cannot list
        raise CorpusError(f"{error.filename}: cannot read ({error.strerror})")

    for root, dirs, names in os.walk(path, followlinks=True, onerror=unreadable):
        real = os.path.realpath(root)
        if real in seen:  # a link back up the tree, or a second link to the same folder
            dirs[:] = []
            continue
        seen.add(real)
        kept = []
        for name in sorted(dirs):
            if name.startswith("."):
                continue
            if _is_model_folder(Path(root, name)):
                print(
                    f"warning: {Path(root, name)}: a run or model folder, skipped", file=sys.stderr
                )
                continue
            kept.append(name)
        dirs[:] = kept
        visible = [name for name in names if not name.startswith(".")]
        for name in filter(_has_text_suffix, visible):
            file = Path(root, name)
            try:  # os.walk lists a link whose target is gone as a file
                broken = broken_link(file)
            except OSError as e:  # a link into a folder this user may not enter
                raise CorpusError(f"{file}: cannot read ({e.strerror or e})") from None
            if broken is not None:
                print(f"warning: {file}: {broken}; skipped", file=sys.stderr)
                continue
            if not file.is_file():  # a FIFO named .txt: reading it would wait for a writer
                print(f"warning: {file}: not a regular file; skipped", file=sys.stderr)
                continue
            files.append(file)
        other_suffixes += [Path(name).suffix for name in visible if not _has_text_suffix(name)]
    if files and other_suffixes:
        kinds = ", ".join(sorted({suffix or "no suffix" for suffix in other_suffixes}))
        count = f"{len(other_suffixes)} other file" + ("s" if len(other_suffixes) > 1 else "")
        print(
            f"warning: {path}: {count} not read (only .txt, .md and .jsonl are: {kinds})",
            file=sys.stderr,
        )
    return sorted(files)


def load_documents(paths: Iterable[str | Path]) -> list[Document]:
    """Every document under `paths` in a deterministic order; empty documents dropped.
    A CorpusError if they are text and conversations both."""
    documents: list[Document] = []
    read, texts, blank, repeated = {}, {}, [], []
    first_of_kind: dict[type, Path] = {}  # the first file of text, of conversations
    for given in paths:
        path = Path(given)
        files = _files_under(path)
        if not files:
            raise CorpusError(f"{path}: no .txt, .md or .jsonl files in this folder")
        for file in files:
            # A file named twice (`--data notes notes/a.txt`) would be trained on twice,
            # and its validation pieces found in the training text.
            real = os.path.realpath(file)
            if real in read:
                first = read[real]
                how = "named twice" if first == file else f"the same file as {first}"
                print(f"warning: {file}: already read ({how}), read once", file=sys.stderr)
                continue
            read[real] = file
            found = _documents_in(file)
            if found is None:
                continue
            # isspace, not strip: a copy of the text (300 MB in a one-document file).
            found = [d for d in found if isinstance(d, Conversation) or not _blank(d)]
            if not found:  # a failed export, a placeholder: worth a look, not an error
                blank.append(file)
                continue
            # The same text at another path (a hard link, a bind mount, a copy such as
            # "notes (1).txt") would be trained on twice as well.
            digest = text_digest(found)
            if digest in texts:
                repeated.append(f"{file} (as {texts[digest]})")
                continue
            texts[digest] = file
            for kind in {type(d) for d in found}:
                first_of_kind.setdefault(kind, file)
            if len(first_of_kind) > 1:
                raise CorpusError(
                    f"{first_of_kind[Conversation]} holds conversations ('messages' records) "
                    f"and {first_of_kind[str]} text: a corpus is text or conversations, not both"
                )
            documents.extend(found)
    if not documents:
        raise CorpusError(f"{', '.join(map(str, paths))}: the corpus is empty (no text found)")
    # One line each, however many files: a folder of exports can hold hundreds.
    if blank:
        _warn_skipped(blank, "without text (empty or blank)")
    if repeated:
        _warn_skipped(repeated, "with the same text as a file read before")
    return documents


def _blank(text: str) -> bool:
    """Whether `text` is empty or only spaces (`not text.strip()`, without its copy)."""
    return not text or text.isspace()


def _warn_skipped(files: list, why: str) -> None:
    count = f"{len(files)} file" + ("s" if len(files) > 1 else "")
    shown = ", ".join(map(str, files[:3])) + (f" and {len(files) - 3} more" * (len(files) > 3))
    print(f"warning: {count} {why}, skipped: {shown}", file=sys.stderr)


def text_digest(docs: Sequence[Document]) -> str:
    """The sha256 of documents, each length-prefixed (the same text cut into other
    documents hashes otherwise): a file's, it finds the same text at another path; a
    split's, recorded per split (prepare.py), it tells a resumed run that its text changed
    though its size did not."""
    h = hashlib.sha256(f"{len(docs)}\0".encode())
    for doc in docs:
        if isinstance(doc, Conversation):  # never the bytes of a text: a NUL starts it
            record = [doc.messages, doc.not_learned]
            data = b"\0" + json.dumps(record, ensure_ascii=False).encode("utf-8")
        else:
            data = doc.encode("utf-8")
        # Two updates, not one of the sum: a copy of the whole text (one-document file).
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def _drop_doctests(text: str) -> str:
    lines = [ln for ln in text.splitlines() if not ln.lstrip().startswith((">>>", "..."))]
    return "\n".join(lines).strip()


def _stdlib_docstrings() -> Iterable[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).parts[:-1]
        if any(p in SKIPPED_STDLIB_DIRS or p.startswith("test") for p in parts):
            continue
        if path.name.startswith("test"):
            continue
        try:
            tree = ast.parse(path.read_bytes())
        except (SyntaxError, ValueError, OSError):
            continue  # a stdlib file this Python cannot parse is not worth failing for
        for node in (tree, *(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef))):
            docstring = ast.get_docstring(node, clean=True)
            if docstring:
                yield docstring


def default_documents() -> list[str]:
    """The embedded default corpus (see the module docstring)."""
    from pydoc_data.topics import topics

    candidates = [topics[name] for name in sorted(topics)]
    candidates += list(_stdlib_docstrings())
    seen: set[str] = set()
    documents = []
    for text in candidates:
        text = _drop_doctests(text)
        if len(text) >= MIN_DOCSTRING_CHARS and text not in seen:
            seen.add(text)
            documents.append(text)
    return documents
