"""A run folder: its step-XXXXXXX checkpoints, best/ and the `latest` pointer, which
checkpoint in it a run continues, whether it holds a run, and the lock that keeps one
trainer on it. Rank 0 alone writes there (DDP)."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from model.atomic_files import clear_interrupted_saves
from model.checkpoint import (
    CONFIG,
    LATEST,
    CheckpointError,
    read_json_object,
    resolve_checkpoint,
)
from training.args import (
    TrainArgs,
    UsageError,
)
from training.corpus import broken_link
from training.distributed import launched_world_size

# In the run folder: held (flock) by the trainer training it; holds its pid.
RUN_LOCK = ".trainer.lock"
# In each trainer checkpoint: the run's settings and where it stood (beside the weights).
TRAINER_META = "trainer_meta.json"
BEST = "best"
STEP_DIR = re.compile(r"step-\d{7}")


def step_folders(run_folder: Path) -> list[Path]:
    """The run's step-XXXXXXX checkpoints, oldest first (a save renames only a complete
    folder into a step's name; its temporary copies are named otherwise)."""
    return sorted(p for p in run_folder.iterdir() if p.is_dir() and STEP_DIR.fullmatch(p.name))


def latest_names(folder: Path) -> bool:
    """Whether the `latest` file beside checkpoint `folder` names it (False where it
    cannot be read: none, as in a run folder that lost it)."""
    with contextlib.suppress(OSError):
        return (folder.parent / LATEST).read_text(encoding="utf-8").strip() == folder.name
    return False


def step_number(folder: Path) -> int:
    return int(folder.name.removeprefix("step-"))


def trainer_meta(folder: Path) -> dict:
    """A trainer checkpoint's trainer_meta.json."""
    return read_json_object(folder / TRAINER_META, required=True)


def recorded_best_loss(run_folder: Path) -> float | None:
    """The validation loss best/ in `run_folder` was saved with, if it can be read."""
    try:
        loss = trainer_meta(run_folder / BEST).get("val_loss")
    except CheckpointError:  # none yet, or damaged: best/ is then replaced
        return None
    return loss if isinstance(loss, float) else None


def run_checkpoint(path: Path) -> Path:
    """The checkpoint `path` names: itself, the one its `latest` file names, or, in a
    run folder left without `latest` (a kill between the first checkpoint and its
    pointer, or a user who deleted it), its newest step folder. Saves rename only a
    complete folder into a step's name, so the newest is whole."""
    try:
        return resolve_checkpoint(path)
    except CheckpointError:
        if not path.is_dir() or (path / LATEST).exists():
            raise
        steps = step_folders(path)
        if not steps:
            raise
        return steps[-1]


def lost_latest_note(run_folder: Path) -> str | None:
    """Where the `latest` file in `run_folder` names a folder that is gone (deleted by
    hand): what to resume instead (its newest step folder left), or that none is left;
    None otherwise."""
    try:
        name = (run_folder / LATEST).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    if not name or "/" in name or (run_folder / name / CONFIG).exists():
        return None
    steps = step_folders(run_folder)
    if not steps:
        return f"its {LATEST} names {name}, which is gone, and no step folder is left to resume"
    return (
        f"its {LATEST} names {name}, which is gone; to go on from the newest step folder "
        f"left, pass --resume {steps[-1]}"
    )


def has_checkpoint(out_dir: Path) -> bool:
    try:
        run_checkpoint(out_dir)
    except CheckpointError:
        return False
    return True


def holds_best_alone(folder: Path) -> bool:
    """Whether `folder` holds best/ and no step folder: a model kept, its run's
    checkpoints gone (deleted), so nothing to resume."""
    return (folder / BEST).is_dir() and not step_folders(folder)


def holds_run(out_dir: Path) -> bool:
    """Whether `out_dir` holds a run's files: a `latest` pointer (even one naming a lost
    checkpoint), `best/` or step folders. A new run never writes over them."""
    if not out_dir.is_dir():
        return False
    return (out_dir / LATEST).exists() or any(
        p.name == BEST or STEP_DIR.fullmatch(p.name) for p in out_dir.iterdir()
    )


def check_writable(folder: Path, flag: str) -> None:
    """Fail now, not after minutes of tokenizing, where `folder` cannot be written."""
    try:
        # A name with bytes that are not UTF-8 (the shell's $'\xe9') reaches Python as
        # lone surrogates: TensorBoard and JSON could not write it after the tokenizing.
        str(folder).encode("utf-8")
    except UnicodeEncodeError:
        shown = os.fsencode(folder).decode("utf-8", "backslashreplace")
        raise UsageError(f"{flag} {shown}: the name is not valid UTF-8") from None
    existing = folder
    while not existing.exists():
        if broken := broken_link(existing):  # a drive not mounted, a folder since moved
            raise UsageError(f"{flag} {folder}: {existing} {broken}")
        existing = existing.parent  # ends at "." or "/", which exist
    if not existing.is_dir():
        raise UsageError(f"{flag} {folder}: {existing} is not a folder")
    # Tried, not asked: os.access says yes to root anywhere (a read-only bind mount aside),
    # /proc included, and a folder made and removed at once leaves nothing behind.
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".pocketgpt-", dir=existing))
    except OSError as e:
        raise UsageError(
            f"{flag} {folder}: cannot create a folder in {existing} ({e.strerror or e})"
        ) from None


@contextlib.contextmanager
def run_folder_lock(folder: Path) -> Iterator[None]:
    """Hold the run folder for this trainer (rank 0; other ranks write nothing there):
    a second trainer on it (a double launch, a restarted container, an overlapping cron
    job) would interleave its saves and log with this one's. An flock on RUN_LOCK: the
    system drops it when the process ends, however it ends, so no stale lock stops a
    later resume; a trainer that ends normally removes the file too."""
    if not launched_as_rank0():
        yield
        return
    path = folder / RUN_LOCK
    created = [parent for parent in (folder, *folder.parents) if not parent.exists()]
    try:
        fd = _locked(path)
    except OSError as e:
        if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
            print(
                f"warning: {folder}: this file system cannot lock files ({e.strerror}); "
                "nothing stops a second trainer on this run",
                file=sys.stderr,
            )
        # Else the folder cannot be made or written: the checks that follow say so,
        # naming the flag; nothing is locked meanwhile.
        fd = None
    try:
        if fd is not None:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        if fd is not None:
            path.unlink(missing_ok=True)  # while still held: no one else has it open locked
            os.close(fd)
        # A command that wrote nothing (refused, say) leaves no folder behind.
        for made in created:  # deepest first; rmdir removes only an empty one
            with contextlib.suppress(OSError):
                made.rmdir()


def _locked(path: Path) -> int:
    """An open descriptor of `path` (made, with its folders, if missing) holding its
    flock; a UsageError if another process holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode("ascii", "replace").strip() or "?"
            os.close(fd)
            raise UsageError(
                f"{path.parent}: another trainer (pid {holder}) is training this run; wait "
                "for it to end, or choose another --out-dir"
            ) from None
        except OSError:
            os.close(fd)
            raise
        # Locked the file at `path`, unless its holder removed it meanwhile (then this
        # lock is on a file nobody else will open): try again.
        with contextlib.suppress(FileNotFoundError):
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        os.close(fd)


def launched_as_rank0() -> bool:
    """Whether torchrun started this process as rank 0 (or no torchrun did). A RANK left
    in the environment without a WORLD_SIZE above 1 is no torchrun run."""
    if launched_world_size() == 1:
        return True
    return os.environ.get("RANK", "0") == "0"


def run_folder(settings: dict) -> Path:
    """The run folder the command given `settings` trains: --resume's, else --out-dir."""
    folder = Path(settings.get("resume") or settings.get("out_dir", TrainArgs.out_dir))
    if (folder / CONFIG).is_file():  # --resume named a checkpoint, not its run folder
        folder = folder.parent
    return folder


def clear_run_folder(settings: dict) -> None:
    """Before anything reads the run folder: clear what saves killed midway left there
    (a half-written copy; a checkpoint moved aside, put back). By rank 0 alone."""
    if not launched_as_rank0():
        return
    folder = run_folder(settings)
    if folder.is_dir():
        saved = {BEST, LATEST}
        for line in clear_interrupted_saves(
            folder, lambda name: name in saved or STEP_DIR.fullmatch(name) is not None
        ):
            print(line, flush=True)
