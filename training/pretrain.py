"""`python -m training.pretrain`: train a GPT on text and write checkpoints.

With no arguments it trains the `small` model on the embedded default corpus
(training/corpus.py) into `checkpoints/default/`. `--help` lists every flag; each
also reads `POCKETGPT_<FLAG>`. A bad path, flag or corpus prints one `error:` line
naming it and exits 2, before anything is written.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import re
import shlex
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import NoReturn

from model.cli import (
    Terminated,
    default_signal_actions,
    env_var,
    exit_now,
    exit_on_signals_while_importing,
    flag,
    interrupted_status,
    signals_unwind,
    unusable_path,
)

INTERRUPTED_BEFORE_TRAINING = "interrupted before training started: no checkpoint written"
if __name__ == "__main__":  # before the imports below: torch takes 1-2 s
    exit_on_signals_while_importing(INTERRUPTED_BEFORE_TRAINING)

import torch
import torch.distributed as dist
from tokenizers import Tokenizer

from model.checkpoint import (
    CONFIG,
    RUN_LOG,
    TOKENIZER,
    CheckpointError,
    CheckpointWriteError,
    carried_generation_config,
    check_finite,
    check_rope_tables,
    load_tokenizer,
    load_weights,
    read_config,
    read_tokenizer_extras,
    read_tokenizer_file,
    resolve_checkpoint,
)
from model.cpu import release_free_memory, tune_malloc
from model.device import resolve_device
from model.memory import format_size
from training.args import (
    Given,
    TrainArgs,
    UsageError,
    chosen_at_start,
    explicit_settings,
    make_args,
    with_absolute_paths,
)
from training.chat import ChatFormat, chat_format, with_chat_template, with_end_of_turn
from training.corpus import (
    Conversation,
    CorpusError,
    Document,
    default_documents,
    document_text,
    load_documents,
)
from training.data import scored_answers, unreachable_answers
from training.defaults import (
    budget_summary,
    model_config,
    settings_warnings,
    time_box_warning,
    with_hardware_defaults,
    with_step_budget,
)
from training.distributed import (
    DistInfo,
    RankStopped,
    init_distributed,
    launched_world_size,
    leave_together,
    share_rank0_error,
)
from training.memory import shortfall
from training.prepare import (
    SMALL_CORPUS_REMEDY,
    PreparedData,
    check_tokenizer,
    identify,
    open_prepared,
    prepare,
)
from training.resume import (
    changed_text_note,
    check_run_init_from,
    finished,
    init_folder,
    later_steps_note,
    nothing_to_do,
    resume_folder,
    resumed_args,
    saved_args,
    with_checkpoint_shape,
)
from training.run_folder import (
    BEST,
    check_writable,
    clear_run_folder,
    has_checkpoint,
    holds_best_alone,
    holds_run,
    launched_as_rank0,
    lost_latest_note,
    recorded_best_loss,
    run_checkpoint,
    run_folder,
    run_folder_lock,
    trainer_meta,
)
from training.split import (
    documents_trained_on,
    is_long,
    split_conversations,
    split_documents,
)
from training.trainer import Trainer, TrainingDiverged, TrainResult


def resolve_tokenizer(args: TrainArgs, start: Path | None, source: str) -> Tokenizer | None:
    """The tokenizer of the checkpoint the run starts from, --tokenizer's, or None (train
    one). `source`: how --tokenizer was given (its flag, env var or config entry)."""
    if start is not None:
        return check_tokenizer(load_tokenizer(start), str(start / TOKENIZER))
    if args.tokenizer is None:
        return None
    path = Path(args.tokenizer)
    if not path.exists():
        raise UsageError(f"{source} {path}: no such file or folder")
    if path.is_file():
        try:
            tokenizer = read_tokenizer_file(path)
        except CheckpointError as e:
            raise UsageError(f"{source} {e}") from None
        return check_tokenizer(tokenizer, f"{source} {path}")
    folder = tokenizer_folder(args, None, source)
    if folder is None:  # neither a file nor a folder: a pipe, a device
        raise UsageError(f"{source} {path}: not a tokenizer.json file or a checkpoint folder")
    try:
        tokenizer = load_tokenizer(folder)
    except CheckpointError as e:
        raise UsageError(f"{source}: {e}") from None
    return check_tokenizer(tokenizer, f"{source} {folder / TOKENIZER}")


def names_own_tokenizer(args: TrainArgs, checkpoint: Path) -> bool:
    """Whether --tokenizer names a tokenizer defined as `checkpoint`'s is (the same
    tokenizer.json, read as the tokenizers library reads it)."""
    if args.tokenizer is None:
        return False
    try:
        given = resolve_tokenizer(args, None, "--tokenizer")
    except (UsageError, CorpusError, CheckpointError):
        return False  # unreadable or unusable: refused as another tokenizer would be
    return given is not None and given.to_str() == load_tokenizer(checkpoint).to_str()


def tokenizer_folder(args: TrainArgs, start: Path | None, source: str) -> Path | None:
    """The folder the run's tokenizer comes from (see resolve_tokenizer), if any."""
    if start is not None:
        return start
    if args.tokenizer is not None and Path(args.tokenizer).is_dir():
        try:
            return resolve_checkpoint(Path(args.tokenizer))  # a run folder: its `latest`
        except CheckpointError as e:
            raise UsageError(f"{source}: {e}") from None
    return None


def cache_root(args: TrainArgs) -> Path:
    """Where the token cache lives: --cache-dir, else `.cache` beside the run folder."""
    return Path(args.cache_dir) if args.cache_dir else Path(args.out_dir).parent / ".cache"


def read_documents(
    args: TrainArgs, field: str, resumed: Path | None, given: Given
) -> list[Document] | None:
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


def held_out_only(val_docs: list[Document], train_docs: list[Document]) -> list[Document]:
    """`val_docs` but those also trained on shorter than MIN_CUT_CHARS (a greeting, a
    heading: common text), said in a warning. CorpusError if a longer one is (`--data
    notes --val-data notes/held-out.txt`, a held-out file cut from a training file), or
    all are: scored on text it trained on."""
    trained_on = documents_trained_on(val_docs, train_docs)
    if not trained_on:
        return val_docs
    kind = "conversation" if isinstance(val_docs[0], Conversation) else "document"
    if len(val_docs) == 1:
        which = f"its {kind} is"
    elif len(trained_on) == len(val_docs):
        which = f"all {len(trained_on)} of its {kind}s are"
    else:
        which = f"{len(trained_on)} of its {len(val_docs)} {kind}s are"
    long = [i for i in trained_on if is_long(val_docs[i])]
    first = document_text(val_docs[(long or trained_on)[0]])
    excerpt = repr(first if len(first) <= 60 else first[:60] + "...")
    said = f"--val-data: {which} in --data too (the first: {excerpt})"
    if long or len(trained_on) == len(val_docs):
        raise CorpusError(f"{said}; held-out text must not be trained on")
    print(f"warning: {said}; short, so left out of the held-out text", file=sys.stderr)
    trained = set(trained_on)
    return [doc for i, doc in enumerate(val_docs) if i not in trained]


def split_text(
    args: TrainArgs,
    documents: list[Document] | None,
    val_docs: list[Document] | None,
    chat: ChatFormat | None,
) -> tuple[list[Document], list[Document]]:
    """(trained on, held out): `documents` (None: the embedded default corpus) and
    `val_docs`, or (None) a split of `documents`. Text split here is taken over:
    `documents` is emptied."""
    if documents is None:
        documents = default_documents()
    if val_docs is not None:
        # `--data notes --val-data notes/held-out.txt`, or a held-out file cut from a
        # training file left whole: scored on text it trained on.
        return documents, held_out_only(val_docs, documents)
    if chat is not None:
        if len(set(documents)) < 2:
            raise CorpusError(
                "--data: 1 conversation (repeats aside); training and validation need one "
                "each (add conversations, or give --val-data)"
            )
        return split_conversations(documents, args.val_fraction)
    split = split_documents(documents, args.val_fraction)
    # The split holds the text now (copies of what it cut): the caller's list is emptied,
    # so that the text is not held twice while it is tokenized.
    documents.clear()
    return split


def load_data(
    args: TrainArgs,
    documents: list[Document] | None,
    val_docs: list[Document] | None,
    tokenizer: Tokenizer | None,
    chat: ChatFormat | None,
    world_size: int,
) -> PreparedData:
    """Tokenize the text `split_text` splits (conversations: written as `chat` says) into
    the token cache."""
    train_docs, val_docs = split_text(args, documents, val_docs, chat)
    # One batch, and one block per rank, of distinct tokens.
    per_batch, per_ranks = args.batch_size * args.block_size, world_size * (args.block_size + 1)
    remedy = SMALL_CORPUS_REMEDY
    if world_size > 1 and per_ranks > per_batch:  # fewer rows would not help
        remedy = "add text, or use fewer processes or a lower --block-size: each of the "
        remedy += f"{world_size} ranks reads a block of its own"
    return prepare(
        train_docs,
        val_docs,
        cache_root(args),
        vocab_size=args.vocab_size,
        tokenizer=tokenizer,
        chat=chat,
        min_train_tokens=max(per_batch, per_ranks) + 1,
        too_small_remedy=remedy,
    )


PREPARATION_TIMEOUT = datetime.timedelta(days=7)  # a wait on rank 0's tokenizing, however long


def prepare_on_rank0(
    args: TrainArgs,
    documents: list[Document] | None,
    val_docs: list[Document] | None,
    tokenizer: Tokenizer | None,
    chat: ChatFormat | None,
    dist_info: DistInfo,
) -> PreparedData:
    """Rank 0 writes the token cache, then the other ranks read it (or all fail alike).
    The text's lists are emptied.

    The others wait on a group of their own, without the default group's 30-minute
    timeout: training a tokenizer on and tokenizing a corpus of many GB takes longer.
    They wait holding what names the text's cache, not the text: each rank held a copy
    of the corpus while rank 0 tokenized it.
    """
    error: Exception | None = None
    world_size = dist_info.world_size
    waiting = (
        dist.new_group(backend="gloo", timeout=PREPARATION_TIMEOUT) if world_size > 1 else None
    )
    if dist_info.is_main:
        try:
            data = load_data(args, documents, val_docs, tokenizer, chat, world_size)
        except CorpusError as e:
            error = e
    else:
        try:
            identity = identify(*split_text(args, documents, val_docs, chat))
        except CorpusError:
            identity = None  # rank 0 meets it too (the same text, split alike) and says so
    for docs in (documents, val_docs):
        if docs is not None:
            docs.clear()
    if not dist_info.is_main:
        release_free_memory()  # now, not once rank 0 is done
    elsewhere = CorpusError("rank 0 could not prepare the data (see its error)")
    try:
        share_rank0_error(error, dist_info, elsewhere, group=waiting)
    finally:
        if waiting is not None:
            dist.destroy_process_group(waiting)
    if dist_info.is_main:
        return data
    if identity is None:  # rank 0 split the text otherwise: no cache for this rank's split
        raise elsewhere
    return open_prepared(
        identity, cache_root(args), vocab_size=args.vocab_size, tokenizer=tokenizer, chat=chat
    )


def check_answers_reachable(args: TrainArgs, data: PreparedData, is_main: bool) -> None:
    """A UsageError if no answer of the training conversations, or none scored of the
    held-out ones, lies within --block-size tokens of its conversation's start (no
    window holds it); a warning (rank 0) for the share of training answers that do not."""
    T = args.block_size
    unreachable, answers = unreachable_answers(data.train_loss_mask, T)
    if unreachable == answers:
        raise UsageError(
            f"--block-size {T}: no answer of the conversations starts within {T} tokens of "
            "its conversation's start; raise it (up to the model's context) or shorten the "
            "conversations"
        )
    if unreachable and is_main:
        print(
            f"warning: {unreachable:,} of {answers:,} answer tokens "
            f"({unreachable / answers:.0%}) lie more than --block-size {T} tokens into "
            "their conversation: neither trained on nor scored",
            file=sys.stderr,
        )
    end = args.eval_tokens + 1 if args.eval_tokens else None
    if not scored_answers(data.val[:end], data.val_loss_mask[:end], T):
        # Named where it is the cause: the whole split holds an answer in reach.
        cut = end is not None and scored_answers(data.val, data.val_loss_mask, T)
        within = f" (--eval-tokens {args.eval_tokens})" if cut else ""
        raise UsageError(
            f"the held-out conversations{within} hold no answer within --block-size {T} "
            "tokens of its conversation's start: nothing to score"
        )


def check_out_dir_is_not_a_model(given: Given) -> None:
    """A new run's --out-dir is no model's folder (a step folder, best/, an HF save): that
    folder loads as its model, never as the run written into it (the server and
    evaluation would keep serving the old weights), and best/ or a step folder is
    replaced or pruned with the run inside it."""
    out_dir = Path(given.values.get("out_dir", TrainArgs.out_dir))
    if (out_dir / CONFIG).is_file():
        raise UsageError(
            f"{given.source('out_dir')} {out_dir} is a model's folder (it holds {CONFIG}), "
            "which loads as that model, not as a run written into it; choose another "
            "--out-dir"
        )


def check_out_dir_is_not_text(args: TrainArgs, given: Given) -> None:
    """The run folder is no folder of the text: its checkpoints would be read as text by
    the next command (which refuses a run folder given as text), so the run could not
    be resumed, nor its text trained on again. One inside a text folder is skipped."""
    out_dir = os.path.realpath(args.out_dir)  # no error on a link loop, as resolve() has
    if not os.path.isdir(out_dir):  # a text file named as --out-dir: "is not a folder"
        return
    for name in ("data", "val_data"):
        for path in getattr(args, name) or ():
            if os.path.realpath(path) == out_dir:
                raise UsageError(
                    f"{given.source('out_dir')} {args.out_dir} is the {given.source(name)} "
                    "folder itself: its checkpoints would be read as text; choose another "
                    "--out-dir (a folder inside it is fine)"
                )


def run(argv: Sequence[str] | None) -> int:
    given = explicit_settings(argv, os.environ)
    folder = run_folder(given.values)
    resume = given.values.get("resume")
    if isinstance(resume, str) and resume and not folder.exists():  # "": no resume
        resume_folder(resume, given.source("resume"))  # says there is no such folder
    # One trainer per run folder, from before anything reads it: what the checks below
    # find there (a finished run, checkpoints, a half-written save) stays so meanwhile.
    with run_folder_lock(folder):
        return run_locked(given)


def if_missing(given: Given) -> Given | int:
    """`--if-missing` (without --resume): the exit status where the out dir already holds
    a finished run or a model, else the settings to run: --resume added where it holds an
    unfinished run, as given where it holds none."""
    settings = given.values
    out_dir = Path(settings.get("out_dir", TrainArgs.out_dir))
    if has_checkpoint(out_dir):  # (a model's folder too: kept as it is)
        if settings.get("init_from"):  # before "nothing to do": no fine-tune is done
            check_out_dir_is_not_a_model(given)
            started_from = saved_args(run_checkpoint(out_dir)).get("init_from")
            check_run_init_from(given, started_from, out_dir)
        if (out_dir / CONFIG).is_file():
            # A step folder or best/ (of a finished run or not): a model, not the run
            # folder --resume goes on in; kept as it is, as any model's folder.
            print(f"{out_dir} is a model's folder; nothing to do (--if-missing)")
            return 0
        if finished(out_dir):
            print(f"{out_dir} already holds a finished run; nothing to do (--if-missing)")
            return 0
        # Interrupted (Ctrl-C, `docker compose down`) or killed: carry on with it.
        print(f"{out_dir} holds an unfinished run; resuming it (--if-missing)", flush=True)
        return Given({**settings, "resume": str(out_dir)}, given.sources)
    if (out_dir / RUN_LOG).is_file() and not holds_run(out_dir):
        print(
            f"{out_dir} holds a run stopped before its first checkpoint; starting it "
            "over (--if-missing)",
            flush=True,
        )
    return given


def check_out_dir_holds_no_run(args: TrainArgs, given: Given) -> None:
    """A new run (not --resume) does not write into a folder holding another's checkpoints."""
    out_dir = Path(args.out_dir)
    if not holds_run(out_dir):
        return
    if holds_best_alone(out_dir):
        raise UsageError(
            f"--out-dir {out_dir} holds {BEST}/ but no checkpoint to resume (its step "
            f"folders are gone); to train anew there, move {BEST}/ away, or choose "
            "another --out-dir"
        )
    if args.init_from:  # a fine-tune is a new run: --resume would refuse --init-from
        raise UsageError(
            f"{given.source('out_dir')} {out_dir} already holds checkpoints; a fine-tune "
            f"({given.source('init_from')}) starts a run of its own: choose another "
            "--out-dir"
        )
    if (lost := lost_latest_note(out_dir)) is not None:  # --resume {out_dir} would fail
        raise UsageError(
            f"--out-dir {out_dir} already holds checkpoints, but {lost}; or choose "
            "another --out-dir"
        )
    raise UsageError(
        f"--out-dir {out_dir} already holds checkpoints; pass --resume {out_dir} to "
        "continue, or choose another --out-dir"
    )


def run_locked(given: Given) -> int:
    settings = given.values
    clear_run_folder(settings)
    if settings.get("if_missing") and not settings.get("resume"):
        outcome = if_missing(given)
        if isinstance(outcome, int):
            return outcome
        given = outcome
        settings = given.values
    if not settings.get("resume"):
        check_out_dir_is_not_a_model(given)
    resumed = (
        resume_folder(settings["resume"], given.source("resume"))
        if settings.get("resume")
        else None
    )
    if resumed is not None and settings.get("init_from"):
        check_run_init_from(given, saved_args(resumed).get("init_from"))
    if resumed is None:
        args = make_args(TrainArgs().to_dict(), given)
        if args.tokenizer is not None and args.vocab_size is not None:
            raise UsageError("--vocab-size: --tokenizer brings its own vocabulary; drop one")
        if args.val_data and "val_fraction" in settings:
            source = given.source("val_fraction")
            raise UsageError(f"{source}: --val-data is the held-out text; drop one")
    else:
        args = resumed_args(resumed, given)
        if (note := nothing_to_do(resumed, args)) is not None:
            print(note)
            return 0
    args = with_absolute_paths(args)
    # A resumed fine-tuning run continues from its own checkpoint, not from --init-from's.
    initial = (
        init_folder(args.init_from, given.source("init_from"))
        if args.init_from and resumed is None
        else None
    )
    start = resumed or initial
    start_config = read_config(start) if start is not None else None
    if start is not None:
        # The trainer builds the RoPE tables for the start's whole context, as load_model
        # does, but not through it: a crafted max_position_embeddings (2**40) ended the run
        # after the text was tokenized, as an "out of memory" to lower --batch-size.
        check_rope_tables(start, start_config)
    # What HF users added to the files of the run's tokenizer (a pad token, a chat
    # template) goes into every checkpoint with it.
    source = tokenizer_folder(args, start, given.source("tokenizer"))
    tokenizer_extras = read_tokenizer_extras(source) if source is not None else None
    # And the generation settings of the checkpoint the run starts from (HF's greedy
    # do_sample false, a repetition penalty): the fine-tune is served as it was.
    generation_defaults = carried_generation_config(start) if start is not None else None
    if initial is not None:
        own_tokenizer = names_own_tokenizer(args, initial)
        args = with_checkpoint_shape(args, start_config, given.sources, own_tokenizer)
    out_dir = Path(args.out_dir)
    check_out_dir_is_not_text(args, given)
    if resumed is None:
        check_out_dir_holds_no_run(args, given)
    check_writable(out_dir, "--out-dir")
    check_writable(cache_root(args), "--cache-dir")
    device = resolve_device(args.device)
    if device.type == "cpu":
        tune_malloc()  # before the first large tensor: every step's activations reuse memory
    left_to_the_run = chosen_at_start(args)
    args = with_hardware_defaults(args, device)
    tokenizer = resolve_tokenizer(args, start, given.source("tokenizer"))
    # Checked now, not after tokenizing: no shape rule involves the vocabulary size,
    # known for certain only once the tokenizer is trained.
    planned = start_config or model_config(
        args, tokenizer.get_vocab_size() if tokenizer else args.vocab_size, device, given.sources
    )
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    if device.type == "cpu" and (
        short := shortfall(planned, args.optimizer, local_ranks, start_config is not None)
    ):
        raise UsageError(short)
    if initial is not None:
        # Now (past the memory check), not after the text is read and tokenized
        # (minutes): missing, truncated or diverged weights. The trainer loads them
        # again; this copy is freed.
        check_finite(initial, load_weights(initial, start_config))
    # Read (and so validate) the user's text on every rank, once, before any process waits.
    documents = read_documents(args, "data", resumed, given)
    val_docs = read_documents(args, "val_data", resumed, given)
    chat = None
    if documents is not None and isinstance(documents[0], Conversation):
        if val_docs is not None and not isinstance(val_docs[0], Conversation):
            raise CorpusError("--val-data: text, but --data holds conversations: give one kind")
        chat = chat_format(source)
        tokenizer_extras = with_chat_template(tokenizer_extras, chat)
    elif val_docs is not None and isinstance(val_docs[0], Conversation):
        raise CorpusError("--val-data: conversations, but --data is text: give one kind")
    dist_info = init_distributed(device)
    try:
        if device.type == "cuda":
            device = torch.device("cuda", dist_info.local_rank)
            torch.cuda.set_device(device)
        data = prepare_on_rank0(args, documents, val_docs, tokenizer, chat, dist_info)
        # Tokenized: the text is not needed again. Held for the whole run, a 150 MB
        # file's documents kept its training process at 1.05 GB instead of 0.74.
        del documents, val_docs
        release_free_memory()  # what tokenizing freed, kept by tune_malloc for reuse
        if chat is not None:
            check_answers_reachable(args, data, dist_info.is_main)
            generation_defaults = with_end_of_turn(generation_defaults, chat, data.tokenizer)
        args = with_step_budget(args, device, len(data.train), dist_info.world_size)
        # A step count known only now (`--max-steps none`: the default for this text) may
        # be one the resumed run has reached: training nothing, it would evaluate and
        # save its step again, a second record of it in the log.
        if resumed is not None and (note := nothing_to_do(resumed, args)) is not None:
            print(note)
            return 0
        if dist_info.is_main:
            for warning in settings_warnings(args):
                print(warning, file=sys.stderr)
        config = (
            # Dropout is a training setting, not part of the HF config: take it from the args.
            # A chat template's tokens added to its tokenizer add rows (trainer.py).
            start_config.replace(
                dropout=args.dropout,
                vocab_size=max(start_config.vocab_size, data.tokenizer.get_vocab_size()),
            )
            if start_config is not None
            else model_config(args, data.tokenizer.get_vocab_size(), device, given.sources)
        )
        if dist_info.is_main:
            if resumed is not None:
                print(f"resuming {resumed} at step {trainer_meta(resumed)['step']}", flush=True)
                if (note := changed_text_note(resumed, data.meta["splits"], given)) is not None:
                    print(note, file=sys.stderr)
                if (note := later_steps_note(resumed)) is not None:
                    print(note, file=sys.stderr)
            elif initial is not None:
                print(f"fine-tuning from {initial}: its weights, tokenizer and shape", flush=True)
            budget = budget_summary(args, len(data.train), dist_info.world_size)
            print(
                f"model: {config.num_parameters() / 1e6:.2f}M parameters "
                f"(dim {config.dim}, {config.n_layers} layers, vocab {config.vocab_size}); "
                f"data: {data.meta['splits']['train']['tokens']:,} train tokens, "
                f"{data.meta['splits']['val']['tokens']:,} val tokens; device {device}, "
                f"{args.dtype}, {args.optimizer}; {budget}",
                flush=True,
            )
        trainer = Trainer(
            args,
            data,
            config,
            device,
            dist_info,
            resume_from=resumed,
            init_from=initial,
            tokenizer_extras=tokenizer_extras,
            generation_defaults=generation_defaults,
            chosen_at_start=left_to_the_run,
        )
        # The trainer takes SIGINT and SIGTERM over and, when it is done, restores what it
        # found: a signal after its checkpoints ends the process at once (as one in the
        # instant before its handlers are in) instead of unwinding to "interrupted before
        # training started".
        default_signal_actions()
        result = trainer.train()
        if dist_info.is_main and (
            warning := time_box_warning(args, result.step, result.stopped_by)
        ):
            print(warning, file=sys.stderr)
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
    if dist_info.is_main:
        print(next_command(args.out_dir, result), flush=True)
    return 0


def next_command(out_dir: str, result: TrainResult) -> str:
    """The command a run's end points to: resuming it after a signal; else serving what
    it trained (the server loads the run's last step), or its best/ where that scored
    lower held out than the last step (the model overfitted its text)."""
    if result.signal is not None:
        return f"resume it: python -m training.pretrain --resume {shlex.quote(out_dir)}"
    best = recorded_best_loss(Path(out_dir))
    last = result.val.loss if result.val is not None else None
    if best is not None and last is not None and best < last:
        return (
            f"serve best/ (val loss {best:.4f} nats/token, the last step's {last:.4f}): "
            f"python -m server --checkpoint {shlex.quote(str(Path(out_dir) / BEST))}"
        )
    return f"serve it: python -m server --checkpoint {shlex.quote(out_dir)}"


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


def torch_out_of_memory(error: BaseException) -> str | None:
    """How much a torch allocation that failed asked for, if `error` is one (CUDA's
    OutOfMemoryError, or the CPU allocator's RuntimeError), else None."""
    message = str(error)
    if isinstance(error, torch.OutOfMemoryError):
        asked = re.search(r"Tried to allocate ([\d.]+ [KMGTP]?i?B)", message)
        return asked.group(1) if asked else "?"
    asked = re.search(r"can't allocate memory: you tried to allocate (\d+) bytes", message)
    if asked is None:
        return None
    return format_size(int(asked.group(1)))


def main(argv: Sequence[str] | None = None) -> int:
    try:
        # Until the trainer takes SIGINT and SIGTERM over (a checkpoint, then a clean
        # exit), either unwinds: the run folder's lock file and any folder made for the
        # run are removed, the token cache is left whole.
        with said_by_rank0_only(), signals_unwind():
            return run(argv)
    except (UsageError, CorpusError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except CheckpointWriteError as e:  # not bad input: the machine could not store it
        print(f"error: {e}; {e.what_is_kept}", file=sys.stderr)
        return 1
    except (TrainingDiverged, RankStopped) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except RuntimeError as e:  # torch's CPU allocator raises RuntimeError
        if (asked := torch_out_of_memory(e)) is None:
            raise
        print(
            f"error: out of memory (an allocation of {asked} failed): lower --batch-size or "
            "--block-size, or train a smaller model",
            file=sys.stderr,
        )
        return 1
    except MemoryError:  # Python's or numpy's, e.g. reading a corpus larger than memory
        print("error: out of memory", file=sys.stderr)
        return 1
    except OSError as e:
        if (refusal := unusable_path(e)) is None:
            raise
        print(refusal, file=sys.stderr)
        return 2
    except (KeyboardInterrupt, Terminated) as e:
        # Once training runs, a signal saves a checkpoint and returns normally (trainer.py);
        # before that (reading, tokenizing, building the model) there is nothing to save.
        print(INTERRUPTED_BEFORE_TRAINING, file=sys.stderr)
        return interrupted_status(e)


def exit_process(run: Callable[[], int]) -> NoReturn:
    """Exit with what `run` returns; a torchrun rank skips the interpreter's teardown.
    gloo's worker threads release a finished collective's tensors (the Python objects of
    an agreement's flag) after the rank has moved on, and one still doing so when the
    interpreter finalizes dies taking the GIL: std::terminate then aborts a rank that had
    ended cleanly ("terminate called without an active exception", pytorch/pytorch#190489;
    1 run in ~30 on 2 loaded cores). Everything the run writes is closed by then, the
    process group destroyed; only the standard streams are left to flush. A rank that
    fails past main()'s own errors (a bug, gloo's error when another rank died) prints
    its traceback and exits 1, as Python would."""
    if launched_world_size() == 1:
        sys.exit(run())
    try:
        code = run()
    except SystemExit as e:  # argparse: --help, or a bad flag it has already named
        code = 0 if e.code is None else e.code if isinstance(e.code, int) else 1
    except BaseException:
        traceback.print_exc()
        code = 1
    exit_now(code)


if __name__ == "__main__":
    default_signal_actions()  # the imports are done: main() takes the signals over
    exit_process(main)
