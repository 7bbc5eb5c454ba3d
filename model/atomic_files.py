"""Files replaced atomically, and what a save killed midway leaves behind.

A file or folder is written as `<name>.tmp-<pid>` next to its target, fsynced, renamed
onto `<name>` (an existing folder first moved aside as `<name>.old-<pid>`), and the
parent fsynced: a reader sees the old or the new one whole, never a mix.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

from tokenizers import Tokenizer


def fsync_path(path: Path) -> None:
    """Flush `path` (a file or a folder: its entries) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: Path, obj: object) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def write_tokenizer(tokenizer: Tokenizer, path: Path) -> None:
    """`tokenizer.save(path)`, a failure raised as the OSError it is: tokenizers reports
    one (a full disk: "File too large (os error 27)") as a bare Exception."""
    try:
        tokenizer.save(str(path))
    except Exception as e:
        code = re.search(r"\(os error (\d+)\)", str(e))
        if code is None:
            raise
        errno = int(code.group(1))
        raise OSError(errno, os.strerror(errno), str(path)) from e


def write_text_atomic(path: Path, text: str) -> None:
    """Replace `path` with `text` so readers see either the old or the new content."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


def replace_dir(tmp: Path, final: Path) -> None:
    """Rename `tmp` onto `final`; an existing `final` is moved aside first, then removed."""
    old = final.with_name(f"{final.name}.old-{os.getpid()}")
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_path(final.parent)
    shutil.rmtree(old, ignore_errors=True)


# `<name>.tmp-<pid>`: being written; `<name>.old-<pid>`: the one it replaces, moved aside.
_TEMPORARY = re.compile(r"(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)")


def is_temporary(name: str) -> bool:
    return _TEMPORARY.fullmatch(name) is not None


def clear_interrupted_saves(root: Path, saved: Callable[[str], bool]) -> list[str]:
    """Clear what saves of the names `saved` accepts, killed midway, left in `root`;
    returns a line for each.

    A `<name>.tmp-<pid>` copy is half written: removed. A `<name>.old-<pid>` is the
    previous `<name>`, moved aside for its replacement: put back if a kill between the
    two renames left no `<name>`, else removed. What a writer still running in another
    process has there is left alone.
    """
    done = []
    for path in sorted(Path(root).iterdir()):
        match = _TEMPORARY.fullmatch(path.name)
        if match is None or not saved(match["name"]) or _running_elsewhere(int(match["pid"])):
            continue
        final = path.with_name(match["name"])
        if match["kind"] == "old" and not final.exists():
            os.replace(path, final)
            done.append(f"put {path} back as {final.name}: a save killed midway had moved it")
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
        done.append(f"removed {path}: a save killed midway left it")
    return done


def _running_elsewhere(pid: int) -> bool:
    """Whether `pid` is a live process other than this one (pids are reused: in a
    restarted container the new trainer often has the killed one's)."""
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, someone else's
    return True
