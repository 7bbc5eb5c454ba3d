"""`python -m training.pretrain`: train a GPT on text and write checkpoints (thin CLI).

With no arguments it trains the `small` model on the embedded default corpus
(training/corpus.py) into `checkpoints/default/`. `--help` lists every flag; each
also reads `POCKETGPT_<FLAG>`. A bad path, flag or corpus prints one `error:` line
naming it and exits 2, before anything is written.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import os
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
import torch.distributed as dist
from tokenizers import Tokenizer

from model.checkpoint import (
    CONFIG,
    LATEST,
    TOKENIZER,
    CheckpointError,
    CheckpointWriteError,
    clear_interrupted_saves,
    load_tokenizer,
    read_config,
    read_generation_config,
    read_tokenizer_extras,
    resolve_checkpoint,
)
from model.cli import env_var, flag
from model.cpu import tune_malloc
from model.device import resolve_device
from training.args import (
    Given,
    TrainArgs,
    UsageError,
    as_saved,
    budget_summary,
    check_resume_settings,
    explicit_settings,
    make_args,
    model_config,
    warmup_warning,
    with_absolute_paths,
    with_checkpoint_shape,
    with_hardware_defaults,
    with_step_budget,
)
from training.corpus import CorpusError, default_documents, load_documents
from training.prepare import PreparedData, check_tokenizer, prepare, split_documents
from training.tokenizer import load_tokenizer_file
from training.trainer import (
    BEST,
    STEP_DIR,
    TRAINER_META,
    TRAINING_STATE,
    DistInfo,
    RankStopped,
    Trainer,
    TrainingDiverged,
    init_distributed,
    leave_together,
    share_rank0_error,
    step_folders,
    trainer_meta,
)

# In the run folder: held (flock) by the trainer training it; holds its pid.
RUN_LOCK = ".trainer.lock"


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


def has_checkpoint(out_dir: Path) -> bool:
    try:
        run_checkpoint(out_dir)
    except CheckpointError:
        return False
    return True


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
        if existing.is_symlink():  # a link to a drive not mounted, a folder since moved
            target = os.readlink(existing)
            raise UsageError(f"{flag} {folder}: {existing} links to {target}, which does not exist")
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


def saved_args(folder: Path) -> dict:
    """The TrainArgs (as a dict) a trainer checkpoint was written with."""
    args = trainer_meta(folder).get("args")
    if not isinstance(args, dict):
        raise CheckpointError(f"{folder / TRAINER_META}: holds no trainer args")
    return args


# The settings choosing the text a run trains and is scored on, and the windows it is
# scored in: `--resume` may change them, with a warning.
SCORING_CHOICES = (
    ("--data", "data"),
    ("--val-data", "val_data"),
    ("--val-fraction", "val_fraction"),
    ("--block-size", "block_size"),
)


def differs_from_saved(name: str, given: Given, saved: dict) -> bool:
    if name not in given.values:
        return False  # (a resumed run's missing --data is named when it is read)
    return as_saved(name, given.values[name]) != saved.get(name)


def resumed_args(folder: Path, given: Given) -> TrainArgs:
    """The args a run resumed from `folder` continues with: its own, overridden by the
    settings given now (those that may change: check_resume_settings)."""
    saved = saved_args(folder)
    check_resume_settings(given, saved, read_config(folder), folder.parent)
    differ = [flag for flag, name in SCORING_CHOICES if differs_from_saved(name, given, saved)]
    if differ:
        print(
            f"warning: {' and '.join(differ)} differ{'s' if len(differ) == 1 else ''} from "
            "what the run was started with: its batches and its validation will differ "
            "(best/ then compares losses measured otherwise)",
            file=sys.stderr,
        )
    # Runs saved before --lr-schedule existed followed a cosine: they resume on it. The
    # run goes on in the folder it is resumed from, not where it was first written (a
    # copy of a run folder must not write into its original).
    # --if-missing is how this command was run, not a setting of the run it continues.
    base = {"lr_schedule": "cosine", **saved, "out_dir": str(folder.parent), "if_missing": False}
    try:
        return make_args(base, given)
    except (TypeError, ValueError) as e:  # a saved value of the wrong type
        raise CheckpointError(f"{folder / TRAINER_META}: invalid trainer args ({e})") from None


def check_resumed_init_from(given: str, started_from: object) -> None:
    """`--init-from` beside `--resume` (or `--if-missing` finding the run unfinished):
    the run's own starting point, as the command that started it names it, is taken (a
    resumed fine-tune continues its own checkpoint); another is an error."""
    if not isinstance(started_from, str):
        raise UsageError(
            "--init-from starts a new run from a checkpoint and --resume continues one: pass one"
        )
    if Path(given).resolve() != Path(started_from).resolve():
        raise UsageError(
            f"--init-from {given}: the resumed run was fine-tuned from {started_from}; it "
            "goes on from its own checkpoint: drop --init-from"
        )


def later_steps_note(resumed: Path) -> str | None:
    """What a resume from a step folder older than the run's newest, and not the one
    `latest` names (going back), does with the steps after it; None for any other."""
    newest = step_folders(resumed.parent)[-1:]
    if not newest or newest[0].name <= resumed.name or not STEP_DIR.fullmatch(resumed.name):
        return None
    with contextlib.suppress(OSError):  # the one `latest` names is where the run is
        if (resumed.parent / LATEST).read_text(encoding="utf-8").strip() == resumed.name:
            return None
    return (
        f"warning: {resumed.name} is older than the run's newest checkpoint, "
        f"{newest[0].name}: the step folders after it stay until this run's saves of the "
        "same steps replace them, and best/ stays unless this run scores lower"
    )


def budget_spent(folder: Path, args: TrainArgs) -> str | None:
    """What already ends the run resumed from `folder` under `args` (its step count or
    training time reached), or None if it has steps to go."""
    meta = trainer_meta(folder)
    step, seconds = meta.get("step"), meta.get("wall_time")
    # A damaged value is left for reading the training state to report.
    if isinstance(step, int) and args.max_steps is not None and step >= args.max_steps:
        return f"is at step {step}, at or past --max-steps {args.max_steps}"
    if isinstance(seconds, float) and args.max_time is not None and seconds >= args.max_time:
        return f"has trained {seconds:.0f} s, at or past --max-time {args.max_time:g}"
    return None


def init_folder(path: str) -> Path:
    """The checkpoint `--init-from` names (a checkpoint or a run folder)."""
    try:
        return resolve_checkpoint(Path(path))
    except CheckpointError as e:
        raise UsageError(f"--init-from: {e}") from None


def resume_folder(path: str) -> Path:
    """The trainer checkpoint `--resume` names (a checkpoint or a run folder)."""
    try:
        folder = run_checkpoint(Path(path))
    except CheckpointError as e:
        raise UsageError(f"--resume: {e}") from None
    if folder.parent == Path(path) and not (folder.parent / LATEST).exists():
        print(f"warning: {path} has no {LATEST} file; resuming from {folder.name}", file=sys.stderr)
    for name in (TRAINING_STATE, TRAINER_META):
        if not (folder / name).is_file():
            raise UsageError(
                f"--resume {path}: {folder} has no {name}; not a trainer checkpoint (a model "
                "folder such as best/ can be fine-tuned with --init-from)"
            )
    return folder


def resolve_tokenizer(args: TrainArgs, start: Path | None) -> Tokenizer | None:
    """The tokenizer of the checkpoint the run starts from, --tokenizer's, or None (train one)."""
    if start is not None:
        return check_tokenizer(load_tokenizer(start), str(start / TOKENIZER))
    if args.tokenizer is None:
        return None
    path = Path(args.tokenizer)
    if path.is_file():
        try:
            tokenizer = load_tokenizer_file(path)
        except Exception as e:  # the tokenizers library raises a bare Exception
            raise UsageError(f"--tokenizer {path}: unreadable ({e})") from None
        return check_tokenizer(tokenizer, f"--tokenizer {path}")
    try:
        tokenizer = load_tokenizer(path)
    except CheckpointError as e:
        raise UsageError(f"--tokenizer: {e}") from None
    return check_tokenizer(tokenizer, f"--tokenizer {resolve_checkpoint(path) / TOKENIZER}")


def names_own_tokenizer(args: TrainArgs, checkpoint: Path) -> bool:
    """Whether --tokenizer names a tokenizer defined as `checkpoint`'s is (the same
    tokenizer.json, read as the tokenizers library reads it)."""
    if args.tokenizer is None:
        return False
    try:
        given = resolve_tokenizer(args, None)
    except UsageError:
        return False  # unreadable: refused as another tokenizer would be
    return given is not None and given.to_str() == load_tokenizer(checkpoint).to_str()


def tokenizer_folder(args: TrainArgs, start: Path | None) -> Path | None:
    """The folder the run's tokenizer comes from (see resolve_tokenizer), if any."""
    if start is not None:
        return start
    if args.tokenizer is not None and Path(args.tokenizer).is_dir():
        return Path(args.tokenizer)
    return None


def cache_root(args: TrainArgs) -> Path:
    """Where the token cache lives: --cache-dir, else `.cache` beside the run folder."""
    return Path(args.cache_dir) if args.cache_dir else Path(args.out_dir).parent / ".cache"


def read_documents(
    args: TrainArgs, field: str, resumed: Path | None, given: Given
) -> list[str] | None:
    """The documents of args.data or args.val_data (`field`); None if it names nothing."""
    paths = getattr(args, field)
    if not paths:
        return None
    try:
        return load_documents(paths)
    except CorpusError as e:
        named = "" if field == "data" else f"{flag(field)}: "
        if resumed is None or field in given.values:
            raise CorpusError(f"{named}{e}") from None
        # Not named now: the path saved when the run began (a Docker `run -v` mount, a
        # drive since unmounted), where the user may not think to look.
        raise CorpusError(
            f"{named}{e} (the {flag(field)} the resumed run was started with: make it "
            f"readable there again, or give {flag(field)} or {env_var(field)})"
        ) from None


def load_data(
    args: TrainArgs,
    documents: list[str] | None,
    val_docs: list[str] | None,
    tokenizer: Tokenizer | None,
    world_size: int,
) -> PreparedData:
    """Tokenize `documents` (None: the embedded default corpus) into the token cache,
    `val_docs` (None: a split of `documents`) held out."""
    if documents is None:
        documents = default_documents()
    if val_docs is not None:
        train_docs = documents
        # `--data notes --val-data notes/held-out.txt`: scored on text it trained on.
        trained_on = len(set(val_docs) & set(train_docs))
        if trained_on:
            raise CorpusError(
                f"--val-data: {trained_on} of its {len(val_docs)} documents are in --data "
                "too; held-out text must not be trained on"
            )
    else:
        train_docs, val_docs = split_documents(documents, args.val_fraction)
    cache = cache_root(args)
    # One batch, and one block per rank, of distinct tokens.
    min_tokens = max(args.batch_size * args.block_size, world_size * (args.block_size + 1)) + 1
    return prepare(
        train_docs,
        val_docs,
        cache,
        vocab_size=args.vocab_size,
        tokenizer=tokenizer,
        min_train_tokens=min_tokens,
    )


PREPARATION_TIMEOUT = datetime.timedelta(days=7)  # a wait on rank 0's tokenizing, however long


def prepare_on_rank0(
    args: TrainArgs,
    documents: list[str] | None,
    val_docs: list[str] | None,
    tokenizer: Tokenizer | None,
    dist_info: DistInfo,
) -> PreparedData:
    """Rank 0 writes the token cache, then the other ranks read it (or all fail alike).

    The others wait on a group of their own, without the default group's 30-minute
    timeout: training a tokenizer on and tokenizing a corpus of many GB takes longer.
    """
    error: Exception | None = None
    world_size = dist_info.world_size
    waiting = (
        dist.new_group(backend="gloo", timeout=PREPARATION_TIMEOUT) if world_size > 1 else None
    )
    if dist_info.is_main:
        try:
            data = load_data(args, documents, val_docs, tokenizer, world_size)
        except CorpusError as e:
            error = e
    elsewhere = CorpusError("rank 0 could not prepare the data (see its error)")
    try:
        share_rank0_error(error, dist_info, elsewhere, group=waiting)
    finally:
        if waiting is not None:
            dist.destroy_process_group(waiting)
    return (
        data if dist_info.is_main else load_data(args, documents, val_docs, tokenizer, world_size)
    )


def finished(folder: Path) -> bool:
    """Whether the trainer checkpoint in `folder` ended its run (by steps, time or early
    stopping), not a signal or a periodic save that a kill left the newest. Runs saved
    before trainer_meta.json recorded it count as finished."""
    try:
        meta = trainer_meta(run_checkpoint(folder))
    except CheckpointError:
        return True  # not a trainer checkpoint (nothing to resume): leave it alone
    return meta.get("stopped_by", "max_steps") not in (None, "signal")


def launched_as_rank0() -> bool:
    """Whether torchrun started this process as rank 0 (or no torchrun did): known from
    the environment, before the process group exists."""
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


def run(argv: Sequence[str] | None) -> int:
    given = explicit_settings(argv, os.environ)
    # One trainer per run folder, from before anything reads it: what the checks below
    # find there (a finished run, checkpoints, a half-written save) stays so meanwhile.
    with run_folder_lock(run_folder(given.values)):
        return run_locked(given)


def run_locked(given: Given) -> int:
    settings = given.values
    clear_run_folder(settings)
    if settings.get("if_missing") and not settings.get("resume"):
        out_dir = Path(settings.get("out_dir", TrainArgs.out_dir))
        if has_checkpoint(out_dir):
            if finished(out_dir):
                print(f"{out_dir} already holds a finished run; nothing to do (--if-missing)")
                return 0
            # Interrupted (Ctrl-C, `docker compose down`) or killed: carry on with it.
            print(f"{out_dir} holds an unfinished run; resuming it (--if-missing)", flush=True)
            given = Given({**settings, "resume": str(out_dir)}, given.sources)
            settings = given.values
    resumed = resume_folder(settings["resume"]) if settings.get("resume") else None
    if resumed is not None and settings.get("init_from"):
        check_resumed_init_from(settings["init_from"], saved_args(resumed).get("init_from"))
    if resumed is None:
        args = make_args(TrainArgs().to_dict(), given)
        if args.tokenizer is not None and args.vocab_size is not None:
            raise UsageError("--vocab-size: --tokenizer brings its own vocabulary; drop one")
    else:
        args = resumed_args(resumed, given)
        done = budget_spent(resumed, args)
        if done and later_steps_note(resumed) is not None:  # going back: its own budget
            print(
                f"{resumed}: the checkpoint {done}, as saved; nothing to do (raise it to train on)"
            )
            return 0
        if done:
            print(f"{resumed.parent}: the run {done}; nothing to do (raise it to train on)")
            return 0
    args = with_absolute_paths(args)
    # A resumed fine-tuning run continues from its own checkpoint, not from --init-from's.
    initial = init_folder(args.init_from) if args.init_from and resumed is None else None
    start = resumed or initial
    start_config = read_config(start) if start is not None else None
    # What HF users added to the files of the run's tokenizer (a pad token, a chat
    # template) goes into every checkpoint with it.
    source = tokenizer_folder(args, start)
    tokenizer_extras = read_tokenizer_extras(source) if source is not None else None
    # And the generation settings of the checkpoint the run starts from (HF's greedy
    # do_sample false, a repetition penalty): the fine-tune is served as it was.
    generation_defaults = read_generation_config(start) if start is not None else None
    if initial is not None:
        own_tokenizer = names_own_tokenizer(args, initial)
        args = with_checkpoint_shape(args, start_config, given.sources, own_tokenizer)
    out_dir = Path(args.out_dir)
    if resumed is None and holds_run(out_dir):
        raise UsageError(
            f"--out-dir {out_dir} already holds checkpoints; pass --resume {out_dir} to "
            "continue, or choose another --out-dir"
        )
    check_writable(out_dir, "--out-dir")
    check_writable(cache_root(args), "--cache-dir")
    device = resolve_device(args.device)
    if device.type == "cpu":
        tune_malloc()  # before the first large tensor: every step's activations reuse memory
    args = with_hardware_defaults(args, device)
    tokenizer = resolve_tokenizer(args, start)
    if start_config is None:
        # Checked now, not after tokenizing: no shape rule involves the vocabulary size,
        # known for certain only once the tokenizer is trained.
        model_config(args, tokenizer.get_vocab_size() if tokenizer else args.vocab_size, device)
    # Read (and so validate) the user's text on every rank, once, before any process waits.
    documents = read_documents(args, "data", resumed, given)
    val_docs = read_documents(args, "val_data", resumed, given)
    dist_info = init_distributed(device)
    try:
        if device.type == "cuda":
            device = torch.device("cuda", dist_info.local_rank)
            torch.cuda.set_device(device)
        data = prepare_on_rank0(args, documents, val_docs, tokenizer, dist_info)
        args = with_step_budget(args, device, len(data.train), dist_info.world_size)
        if dist_info.is_main and (warning := warmup_warning(args)):
            print(warning, file=sys.stderr)
        config = (
            # Dropout is a training setting, not part of the HF config: take it from the args.
            start_config.replace(dropout=args.dropout)
            if start_config is not None
            else model_config(args, data.tokenizer.get_vocab_size(), device)
        )
        if dist_info.is_main:
            if resumed is not None:
                print(f"resuming {resumed} at step {trainer_meta(resumed)['step']}", flush=True)
                if (note := later_steps_note(resumed)) is not None:
                    print(note, file=sys.stderr)
            elif initial is not None:
                print(f"fine-tuning from {initial}: its weights, tokenizer and shape", flush=True)
            print(
                f"model: {config.num_parameters() / 1e6:.2f}M parameters "
                f"(dim {config.dim}, {config.n_layers} layers, vocab {config.vocab_size}); "
                f"data: {data.meta['splits']['train']['tokens']:,} train tokens, "
                f"{data.meta['splits']['val']['tokens']:,} val tokens; device {device}, "
                f"{args.dtype}, {args.optimizer}; {budget_summary(args)}",
                flush=True,
            )
        result = Trainer(
            args,
            data,
            config,
            device,
            dist_info,
            resume_from=resumed,
            init_from=initial,
            tokenizer_extras=tokenizer_extras,
            generation_defaults=generation_defaults,
        ).train()
        leave_together(dist_info)
    finally:
        if dist_info.enabled:
            dist.destroy_process_group()
    if args.if_missing and result.signal is not None:
        # Saved, but not the finished run --if-missing is to leave behind: a service that
        # waits for this one to succeed (Docker's server) must not start on it.
        print(
            f"the run is unfinished (--if-missing): exit {128 + result.signal}; "
            "run the same command again to resume it",
            file=sys.stderr,
        )
        return 128 + result.signal
    return 0


@contextlib.contextmanager
def said_by_rank0_only() -> Iterator[None]:
    """Under torchrun every rank reads the same text and folders, and would print the
    same notes and warnings: ranks other than 0 run silent (their errors are printed,
    after)."""
    if launched_as_rank0():
        yield
        return
    with (
        open(os.devnull, "w") as devnull,
        contextlib.redirect_stdout(devnull),
        contextlib.redirect_stderr(devnull),
    ):
        yield


def main(argv: Sequence[str] | None = None) -> int:
    try:
        with said_by_rank0_only():
            return run(argv)
    except (UsageError, CorpusError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except CheckpointWriteError as e:  # not bad input: the machine could not store it
        print(f"error: {e}; the checkpoint `latest` names is intact", file=sys.stderr)
        return 1
    except (TrainingDiverged, RankStopped) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        # Once training runs, Ctrl-C saves a checkpoint and returns normally (trainer.py);
        # before that (reading, tokenizing, building the model) there is nothing to save.
        print("interrupted before training started: no checkpoint written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
