"""What a run starts from: the checkpoint `--resume` continues (with the args it was
trained with, and what may change) or `--init-from` fine-tunes, and whether a run is done."""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Mapping
from pathlib import Path

from model.checkpoint import (
    LATEST,
    CheckpointError,
    read_config,
    resolve_checkpoint,
)
from model.config import PRESETS, ModelConfig
from training.args import (
    CHOSEN_AT_START,
    SHAPE_FIELDS,
    Given,
    TrainArgs,
    UsageError,
    as_saved,
    make_args,
    setting_source,
)
from training.run_folder import (
    BEST,
    STEP_DIR,
    TRAINER_META,
    holds_best_alone,
    latest_names,
    lost_latest_note,
    run_checkpoint,
    step_folders,
    trainer_meta,
)
from training.trainer_state import TRAINING_STATE


def with_checkpoint_shape(
    args: TrainArgs,
    config: ModelConfig,
    sources: Mapping[str, str],
    own_tokenizer: bool,
) -> TrainArgs:
    """`--init-from`: the model is the checkpoint's, so a flag choosing another shape,
    vocabulary or tokenizer is an error (one giving the checkpoint's own value is not, as
    with --resume; `own_tokenizer`: --tokenizer names one defined as the checkpoint's
    is). The shape fields take the checkpoint's values (what `auto_dtype`
    reads, and what trainer_meta.json records), the preset the one given if it builds
    that shape with the shape flags given, else the one of that shape (`auto` if none),
    and the block size defaults to the context it was trained to."""
    shape = {name: getattr(config, name) for name in SHAPE_FIELDS}
    # The preset of that shape, if one has it, so its lr and batch size (AUTO) apply rather
    # than those of the preset a time box would pick for a new model.
    preset = next(
        (name for name, p in PRESETS.items() if all(getattr(p, n) == v for n, v in shape.items())),
        "auto",
    )
    given_shape = {n: getattr(args, n) for n in SHAPE_FIELDS}
    if args.preset in PRESETS and _builds_shape(args.preset, given_shape, shape):
        # The pretraining command repeated: `--preset tiny --n-kv-heads 4` names the
        # shape of a model trained so, and its preset's lr and batch size apply.
        preset = args.preset
    checkpoints = {"preset": preset, **shape, "vocab_size": config.vocab_size}
    given = [n for n, value in checkpoints.items() if getattr(args, n) not in (None, "auto", value)]
    given += ["tokenizer"] if args.tokenizer is not None and not own_tokenizer else []
    if given:
        names = ", ".join(setting_source(name, sources) for name in given)
        raise UsageError(f"--init-from fixes the model and its tokenizer: drop {names}")
    block_size = args.block_size or config.max_seq_len
    if block_size > config.max_seq_len:
        raise UsageError(
            f"{setting_source('block_size', sources)} {block_size}: the --init-from model reads "
            f"at most {config.max_seq_len} tokens"
        )
    return dataclasses.replace(
        args, preset=preset, block_size=block_size, vocab_size=config.vocab_size, **shape
    )


def _builds_shape(
    preset: str, given_shape: Mapping[str, object], shape: Mapping[str, object]
) -> bool:
    """Whether `preset` with the shape flags given (`given_shape`: field -> value, None
    where not given) builds the model `shape`."""
    overrides = {n: v for n, v in given_shape.items() if v is not None}
    try:
        built = ModelConfig.from_preset(preset, **overrides)
    except ValueError:  # a shape that cannot be: not the checkpoint's
        return False
    return all(getattr(built, n) == v for n, v in shape.items())


def check_resume_settings(
    given: Given, saved: Mapping[str, object], config: ModelConfig, run_folder: Path
) -> None:
    """`--resume`: the model and tokenizer are the checkpoint's, so a flag choosing
    another shape, vocabulary or tokenizer is an error (one repeating the run's own value
    is not: the command that started the run, with --resume added, continues it), the
    block size may not pass the context the model was built for, and the run goes on in
    its own folder."""
    settings = given.values
    out_dir = settings.get("out_dir")
    if isinstance(out_dir, str) and os.path.realpath(out_dir) != os.path.realpath(run_folder):
        raise UsageError(
            f"{setting_source('out_dir', given.sources)} {out_dir}: --resume goes on in the "
            f"folder of the run it continues ({run_folder}); to branch a run, copy its folder "
            "and resume the copy"
        )

    def changed(name: str) -> bool:
        if name not in settings:
            return False
        # Absolute both: runs saved before paths were made absolute hold them as given.
        if as_saved(name, settings[name]) == as_saved(name, saved.get(name)):
            return False
        if name == "preset" and saved.get(name) == "auto" and settings[name] in PRESETS:
            # The preset `auto` chose, named (with the run's shape flags): no change.
            shape = {n: getattr(config, n) for n in SHAPE_FIELDS}
            given_shape = {n: settings.get(n, saved.get(n)) for n in SHAPE_FIELDS}
            return not _builds_shape(settings[name], given_shape, shape)
        # A shape the preset chose is saved as None: the model's own value is no change.
        return name not in SHAPE_FIELDS or settings[name] != getattr(config, name)

    def refuse(names: tuple[str, ...], what: str) -> None:
        if given_now := [name for name in names if changed(name)]:
            flags = ", ".join(setting_source(name, given.sources) for name in given_now)
            raise UsageError(f"--resume continues the run's {what}: drop {flags}")

    refuse(("preset", *SHAPE_FIELDS, "vocab_size", "tokenizer"), "model and tokenizer")
    # Restored from the checkpoint, not made anew: a value given now would change nothing.
    kept = ", ".join(f"{name} {saved.get(name)}" for name in ("optimizer", "seed"))
    refuse(("optimizer", "seed"), f"optimizer state and random state ({kept})")
    block_size = settings.get("block_size")
    if isinstance(block_size, int) and block_size > config.max_seq_len:
        raise UsageError(
            f"{setting_source('block_size', given.sources)} {block_size}: the resumed model reads "
            f"at most {config.max_seq_len} tokens"
        )


def saved_args(folder: Path) -> dict:
    """The TrainArgs (as a dict) a trainer checkpoint was written with."""
    args = trainer_meta(folder).get("args")
    if not isinstance(args, dict):
        raise CheckpointError(f"{folder / TRAINER_META}: holds no trainer args")
    return args


# What a time-boxed run given no --max-steps saved as its step count before 2026-12-06.
UNLIMITED_STEPS = 10**12

# The settings choosing the text a run trains and is scored on, and the windows it is
# scored in: `--resume` may change them, with a warning. --eval-tokens changes what is
# scored alone (how many of the validation windows).
TEXT_CHOICES = (("--data", "data"), ("--val-data", "val_data"), ("--val-fraction", "val_fraction"))
SCORING_CHOICES = (*TEXT_CHOICES, ("--block-size", "block_size"))
VALIDATION_CHOICES = (("--eval-tokens", "eval_tokens"),)


def differs_from_saved(name: str, given: Given, saved: dict) -> bool:
    if name not in given.values:
        return False  # (a resumed run's missing --data is named when it is read)
    return as_saved(name, given.values[name]) != as_saved(name, saved.get(name))


def resumed_args(folder: Path, given: Given) -> TrainArgs:
    """The args a run resumed from `folder` continues with: its own, overridden by the
    settings given now (those that may change: check_resume_settings)."""
    saved = saved_args(folder)
    check_resume_settings(given, saved, read_config(folder), folder.parent)
    # Other text choices are judged by the text they read once it is read, where the
    # checkpoint recorded its splits' hashes (changed_text_note): the same files at a new
    # path (a moved mount) are no other text.
    recorded = _recorded_splits(folder)
    judged_later = TEXT_CHOICES if recorded is not None and _hashed(recorded) else ()
    differ = [
        flag
        for flag, name in SCORING_CHOICES
        if differs_from_saved(name, given, saved) and (flag, name) not in judged_later
    ]
    scored = [f for f, name in VALIDATION_CHOICES if differs_from_saved(name, given, saved)]
    if differ or scored:
        flags = differ + scored
        what = "its batches and its validation" if differ else "its validation"
        print(
            f"warning: {' and '.join(flags)} differ{'s' if len(flags) == 1 else ''} from "
            f"what the run was started with: {what} will differ (best/ then compares "
            "losses measured otherwise)",
            file=sys.stderr,
        )
    # Runs saved before --lr-schedule existed followed a cosine, and before --optimizer
    # existed trained with AdamW: they resume so. The run goes on in the folder it is
    # resumed from, not where it was first written (a copy of a run folder must not
    # write into its original). --if-missing is how this command was run, not a setting
    # of the run it continues.
    before_settings = {"lr_schedule": "cosine", "optimizer": "adamw"}
    base = {**before_settings, **saved, "out_dir": str(folder.parent), "if_missing": False}
    # A time-boxed run saved before 2026-12-06 has no step count of its own, only
    # "unlimited": unset again, so that it takes the one a new run gets (with_step_budget),
    # and `--max-time none` no endless run whose schedule never decays.
    if base.get("max_steps") == UNLIMITED_STEPS:
        base["max_steps"] = None
    # What the machine chose, this machine chooses again (a run compiled on one with a
    # compiler resumes on one without; bf16 where this CPU has no bf16 units is slow); the
    # warmup its schedule chose, the schedule resumed with (a 400-step run's 30 steps
    # covered all of a --max-steps 12 it was resumed with: its rate never decayed).
    # (Saved as "machine_chosen", compile and dtype alone, before 2026-12-07.)
    meta = trainer_meta(folder)
    chosen = meta.get("chosen_at_start", meta.get("machine_chosen", []))
    base |= {name: CHOSEN_AT_START[name] for name in CHOSEN_AT_START if name in chosen}
    try:
        return make_args(base, given)
    except (TypeError, ValueError) as e:  # a saved value of the wrong type
        raise CheckpointError(f"{folder / TRAINER_META}: invalid trainer args ({e})") from None


def check_run_init_from(given: Given, started_from: object, if_missing: Path | None = None) -> None:
    """`--init-from` beside `--resume`, or beside `--if-missing` that found a run in
    `if_missing` (its --out-dir): the run's own starting point, as the command that
    started it names it, is taken (a resumed fine-tune continues its own checkpoint);
    another is an error. --if-missing resumes or keeps a run, never fine-tunes one."""
    init_from = given.values["init_from"]
    real = os.path.realpath  # not Path.resolve: that raises on a loop of links
    if isinstance(started_from, str) and real(init_from) == real(started_from):
        return
    named = f"{given.source('init_from')} {init_from}"
    if if_missing is not None:
        run = f"fine-tuned from {started_from}" if isinstance(started_from, str) else "trained anew"
        raise UsageError(
            f"{named}: {given.source('out_dir')} {if_missing} holds a run {run}, which "
            f"{given.source('if_missing')} resumes or keeps; move that run away, or choose "
            "another --out-dir for this fine-tune"
        )
    if not isinstance(started_from, str):
        raise UsageError(
            f"{given.source('init_from')} starts a new run from a checkpoint and "
            f"{given.source('resume')} continues one: pass one"
        )
    raise UsageError(
        f"{named}: the resumed run was fine-tuned from {started_from}; it goes on from its own "
        f"checkpoint: drop {given.source('init_from')}"
    )


def _recorded_splits(folder: Path) -> dict[str, dict] | None:
    """The train and val splits the checkpoint in `folder` recorded, as prepare() counts
    them (sizes; their sha256 too since 2026-12-05), None if it recorded none."""
    recorded = trainer_meta(folder).get("data")
    if not isinstance(recorded, dict):
        return None
    splits = {split: recorded.get(split) for split in ("train", "val")}
    return splits if all(isinstance(s, dict) for s in splits.values()) else None


def _hashed(splits: dict[str, dict]) -> bool:
    return all(split.get("sha256") for split in splits.values())


def changed_text_note(resumed: Path, splits: dict, given: Given) -> str | None:
    """A warning when the text a run resumed from `resumed` reads now (its splits as
    prepare() counts and hashes them: `splits`) is not the text it was saved on: other
    --data, --val-data or --val-fraction given, or files under the same --data edited,
    added or removed. None if the splits match (other paths to the same text included),
    if the checkpoint recorded none, or if other settings were given and it recorded no
    hashes to judge them by (resumed_args warned of those)."""
    recorded = _recorded_splits(resumed)
    saved = saved_args(resumed)
    flags = [flag for flag, name in TEXT_CHOICES if differs_from_saved(name, given, saved)]
    if recorded is None or (flags and not _hashed(recorded)):
        return None
    changed = []
    for split, text, consequence in (
        ("train", "training", "its batches differ"),
        (
            "val",
            "validation",
            "its validation differs (best/ then compares losses measured otherwise)",
        ),
    ):
        then, now = recorded[split], splits[split]
        differ = [n for n in ("bytes", "documents", "tokens") if then.get(n) != now[n]]
        if differ:  # said by the first measure that differs
            measure, was = differ[0], then.get(differ[0])
            was = f"{was:,}" if isinstance(was, int) else "?"
            sizes = f"{was} {measure} then, {now[measure]:,} now"
            changed.append((f"{text} text: {sizes}", consequence))
        # (Checkpoints saved before the hash was recorded, or a token cache made by other
        # means, have none: sizes alone.)
        elif then.get("sha256") and now.get("sha256") and then["sha256"] != now["sha256"]:
            changed.append((f"{text} text: the same size, not the same text", consequence))
    if not changed:
        return None
    what = "; ".join(change for change, _ in changed)
    consequences = " and ".join(consequence for _, consequence in changed)
    if flags:
        named = " and ".join(flags) + (" differs" if len(flags) == 1 else " differ")
        return f"warning: {named} from what the run was started with ({what}): {consequences}"
    return f"warning: the text has changed since {resumed.name} was saved ({what}): {consequences}"


def later_steps_note(resumed: Path) -> str | None:
    """What a resume from a step folder older than the run's newest, and not the one
    `latest` names (going back), does with the steps after it; None for any other."""
    newest = step_folders(resumed.parent)[-1:]
    if not newest or newest[0].name <= resumed.name or not STEP_DIR.fullmatch(resumed.name):
        return None
    if latest_names(resumed):  # the one `latest` names is where the run is
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
    # A run a signal stopped at its budget's end (in its last evaluation) has that
    # evaluation still to make, and its finish to record.
    unfinished = meta.get("stopped_by") == "signal"
    # A damaged value is left for reading the training state to report.
    max_steps, max_time = args.max_steps, args.max_time
    if isinstance(step, int) and max_steps is not None and step >= max_steps + unfinished:
        return f"is at step {step}, at or past --max-steps {max_steps}"
    out_of_time = isinstance(seconds, float) and max_time is not None and seconds >= max_time
    if out_of_time and not unfinished:
        return f"has trained {seconds:.0f} s, at or past --max-time {max_time:g}"
    return None


def nothing_to_do(folder: Path, args: TrainArgs) -> str | None:
    """What to say, instead of training, where the run resumed from `folder` has reached
    what ends it under `args` (budget_spent); None if it has steps to go."""
    done = budget_spent(folder, args)
    if done is None:
        return None
    if later_steps_note(folder) is not None:  # going back: its own budget
        return f"{folder}: the checkpoint {done}, as saved; nothing to do (raise it to train on)"
    return f"{folder.parent}: the run {done}; nothing to do (raise it to train on)"


def init_folder(path: str, source: str) -> Path:
    """The checkpoint `--init-from` (given as `source`) names: a checkpoint or a run folder."""
    try:
        return resolve_checkpoint(Path(path))
    except CheckpointError as e:
        raise UsageError(f"{source}: {e}") from None


def resume_folder(path: str, source: str) -> Path:
    """The trainer checkpoint `--resume` (given as `source`) names: a checkpoint or a run
    folder."""
    try:
        folder = run_checkpoint(Path(path))
    except CheckpointError as e:
        if holds_best_alone(Path(path)):
            raise UsageError(
                f"{source} {path}: no checkpoint to resume, only {BEST}/ (a model: serve it, "
                "or fine-tune it with --init-from)"
            ) from None
        if Path(path).is_dir() and (lost := lost_latest_note(Path(path))) is not None:
            raise UsageError(f"{source} {path}: {lost}") from None
        raise UsageError(f"{source}: {e}") from None
    if folder.parent == Path(path) and not (folder.parent / LATEST).exists():
        print(f"warning: {path} has no {LATEST} file; resuming from {folder.name}", file=sys.stderr)
    for name in (TRAINING_STATE, TRAINER_META):
        if not (folder / name).is_file():
            raise UsageError(
                f"{source} {path}: {folder} has no {name}; not a trainer checkpoint (a model "
                "folder such as best/ can be fine-tuned with --init-from)"
            )
    return folder


def finished(folder: Path) -> bool:
    """Whether the trainer checkpoint in `folder` ended its run (by steps, time or early
    stopping), not a signal or a periodic save that a kill left the newest. Runs saved
    before trainer_meta.json recorded it count as finished."""
    try:
        meta = trainer_meta(run_checkpoint(folder))
    except CheckpointError:
        return True  # not a trainer checkpoint (nothing to resume): leave it alone
    return meta.get("stopped_by", "max_steps") not in (None, "signal")
