"""TrainArgs: every trainer setting, documented once, here.

Each field is a flag (`max_steps` -> `--max-steps`) and an environment variable
(`POCKETGPT_MAX_STEPS`); `--config FILE` reads a JSON or TOML object of the same
names. Precedence, lowest first: defaults (or, with `--resume`, the resumed run's
settings), config file, environment, command line. A boolean is `--flag` alone
(true) or `--no-flag` on the command line, else one of 1/0, true/false, yes/no or on/off
(`--flag false`, an env var, a config entry); `none` clears an optional value.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import tomllib
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from model.cli import ArgumentParser, env_var, flag
from model.config import MIN_SERVED_CONTEXT, PRESETS
from model.device import resolve_device
from training.prepare import MAX_VOCAB
from training.tokenizer import MIN_VOCAB

# torch takes 64-bit unsigned seeds, and the batch sampler seeds rank r with
# seed * 1000 + r (training/data.py): that must fit as well.
MAX_SEED = 2**64 // 1000 - 1


class UsageError(Exception):
    """A bad flag, file or value; the message names it. The CLI exits 2 with it."""


def doc(help: str) -> dict[str, str]:
    """Field metadata: the one description of a setting, shown by --help."""
    return {"help": help}


@dataclass(frozen=True)
class TrainArgs:
    # data
    data: list[str] = field(
        default_factory=list,
        metadata=doc(
            "text files/folders (.txt, .md, .jsonl of text or messages); none = embedded corpus"
        ),
    )
    val_data: list[str] = field(
        default_factory=list,
        metadata=doc(
            "held-out text files/folders (a document of 200+ characters also in --data, or cut"
            " from one, is refused; a shorter one is left out, unless all are); none ="
            " --val-fraction of --data, in evenly spaced pieces"
        ),
    )
    val_fraction: float = field(
        default=0.05,
        metadata=doc("share of the text held out for validation (not with --val-data)"),
    )
    tokenizer: str | None = field(
        default=None, metadata=doc("reuse this tokenizer.json or checkpoint folder's tokenizer")
    )
    init_from: str | None = field(
        default=None,
        metadata=doc(
            "fine-tune: start from this checkpoint's (or run folder's) weights, tokenizer and"
            " model shape; the optimizer, schedule and step count start afresh"
        ),
    )
    vocab_size: int | None = field(
        default=None,
        metadata=doc("BPE vocabulary size when training a tokenizer (none: the preset's)"),
    )
    cache_dir: str | None = field(
        default=None, metadata=doc("token cache folder (default: <out-dir>/../.cache)")
    )
    # model
    preset: str = field(
        default="auto",
        metadata=doc(
            f"auto or one of: {', '.join(PRESETS)} (auto: small; for a CPU run with --max-time "
            "under 600 s, mini on a CPU with AMX and tiny on others)"
        ),
    )
    dim: int | None = field(default=None, metadata=doc("model width (overrides the preset)"))
    n_layers: int | None = field(
        default=None, metadata=doc("transformer blocks (overrides the preset)")
    )
    n_heads: int | None = field(
        default=None, metadata=doc("attention heads (overrides the preset)")
    )
    n_kv_heads: int | None = field(
        default=None,
        metadata=doc(
            "key/value heads for grouped-query attention (overrides the preset: tiny and mini "
            "share 2; small and base have one per attention head)"
        ),
    )
    ffn_dim: int | None = field(
        default=None, metadata=doc("SwiGLU hidden width (overrides the preset)")
    )
    tie_embeddings: bool | None = field(
        default=None,
        metadata=doc("share the input embedding with the LM head (none: the preset's)"),
    )
    dropout: float = field(default=0.0, metadata=doc("dropout on attention and residual branches"))
    block_size: int | None = field(
        default=None,
        metadata=doc("tokens per sequence = the model's context length (none: the preset's)"),
    )
    # optimisation
    batch_size: int | None = field(
        default=None, metadata=doc("sequences per micro-batch, per rank (none: the preset's)")
    )
    grad_accum: int = field(default=1, metadata=doc("micro-batches accumulated per optimizer step"))
    optimizer: str = field(
        default="muon",
        metadata=doc(
            "muon (Muon for the blocks' matrices, fused AdamW for embeddings and norms) or"
            " adamw (fused AdamW for everything)"
        ),
    )
    lr: float | None = field(
        default=None, metadata=doc("peak learning rate (AdamW and Muon) (none: the preset's)")
    )
    embedding_lr_scale: float = field(
        default=4.0,
        metadata=doc("an untied input embedding's learning rate, as a multiple of --lr"),
    )
    min_lr_ratio: float = field(
        default=0.1, metadata=doc("final learning rate as a fraction of --lr")
    )
    warmup_steps: int | None = field(
        default=None,
        metadata=doc(
            "linear warmup steps (none: 30, or a tenth of the schedule, --decay-steps or else"
            " --max-steps, if that is fewer)"
        ),
    )
    lr_schedule: str = field(
        default="wsd",
        metadata=doc(
            "after warmup: wsd (hold --lr, then decay linearly to --min-lr-ratio over the last"
            " --cooldown-fraction of the run) or cosine (from --lr down to --min-lr-ratio)"
        ),
    )
    cooldown_fraction: float = field(
        default=0.5, metadata=doc("wsd: the share of the run after warmup spent decaying")
    )
    decay_steps: int | None = field(
        default=None,
        metadata=doc("length of the schedule in steps (default: --max-steps)"),
    )
    weight_decay: float = field(
        default=0.1, metadata=doc("decoupled weight decay on matrices (not norms)")
    )
    grad_clip: float = field(
        default=1.0, metadata=doc("clip the global gradient norm to this (0 = off)")
    )
    max_steps: int | None = field(
        default=None,
        metadata=doc(
            "optimizer steps (none: on CPU 600 in bfloat16, 400 in float32; 5000 on CUDA; with"
            " --max-time as many as it allows; never more than 5 passes over the training text)"
        ),
    )
    max_time: float | None = field(
        default=None, metadata=doc("stop after this many seconds of training (none = no limit)")
    )
    seed: int = field(default=1337, metadata=doc("seed for weights, data order and dropout"))
    # evaluation, checkpoints, logging
    eval_interval: int = field(
        default=250, metadata=doc("steps between evaluations (and sample previews)")
    )
    eval_tokens: int = field(
        default=32768, metadata=doc("validation tokens per evaluation (0 = the whole split)")
    )
    sample_tokens: int = field(
        default=64,
        metadata=doc(
            "tokens in the preview printed at each evaluation (0 = off; a preview stops at "
            "the context: --block-size - 1)"
        ),
    )
    log_interval: int = field(
        default=10, metadata=doc("steps between train-loss lines in the JSONL log")
    )
    save_interval: int = field(default=500, metadata=doc("steps between step-XXXXXXX checkpoints"))
    keep_last: int = field(
        default=2, metadata=doc("step checkpoints kept (best/ is kept separately)")
    )
    patience: int = field(
        default=0,
        metadata=doc("stop after this many evaluations without a better val loss (0 = off)"),
    )
    out_dir: str = field(
        default="checkpoints/default",
        metadata=doc(
            "run folder: checkpoints, latest, log.jsonl; a model's folder (best/, a step folder,"
            " an HF save) is refused, as it would go on loading as that model"
        ),
    )
    resume: str | None = field(
        default=None, metadata=doc("continue exactly from this checkpoint or run folder")
    )
    if_missing: bool = field(
        default=False,
        metadata=doc(
            "exit 0 at once if --out-dir already holds a finished run (or a model); resume an"
            " unfinished one (interrupted or killed); given an --init-from the run did not"
            " start from, either is an error; a run stopped by a signal exits 128 + its number"
            " (after saving), as it is not finished"
        ),
    )
    # hardware
    device: str = field(default="auto", metadata=doc("auto (CUDA when available), cpu or cuda"))
    dtype: str = field(
        default="auto",
        metadata=doc(
            "float32, bfloat16 (autocast), or auto: bfloat16 on a CUDA GPU with native bf16"
            " (Ampere+), on a CPU with AVX512-BF16, and on an AMX CPU for models 256+ wide;"
            " float32 otherwise"
        ),
    )
    compile: bool | None = field(
        default=None,
        metadata=doc(
            "torch.compile the model (none: on for runs of 1000+ steps on CPU / 200+ on CUDA"
            " that --max-time, if given, allows 120+ s / 60+ s, when a C/C++ compiler is"
            " installed)"
        ),
    )

    def validate(self, sources: Mapping[str, str] | None = None) -> TrainArgs:
        """Raise UsageError naming the first setting whose value cannot work, as the user
        gave it: `sources` maps a field to its flag, env var or config file entry (a
        field it lacks is named by its flag)."""

        def require(name: str, ok: bool, problem: str, value: object) -> None:
            if not ok:
                raise UsageError(f"{setting_source(name, sources)}: {problem} (got {value!r})")

        # inf and nan pass some range checks below (inf > 0) and then train to a NaN model.
        for name in FIELDS:
            value = getattr(self, name)
            if _base_type(name)[0] is float and value is not None:
                require(name, math.isfinite(value), "must be a finite number", value)
        positive = ("grad_accum", "eval_interval", "log_interval", "save_interval", "keep_last")
        for name in positive:
            require(name, getattr(self, name) >= 1, "must be >= 1", getattr(self, name))
        for name in (
            "batch_size",
            "dim",
            "n_layers",
            "n_heads",
            "n_kv_heads",
            "ffn_dim",
            "decay_steps",
            "max_steps",
        ):
            value = getattr(self, name)
            require(name, value is None or value >= 1, "must be >= 1", value)
        # A shorter context trained a model nothing could serve.
        require(
            "block_size",
            self.block_size is None or self.block_size >= MIN_SERVED_CONTEXT,
            f"must be >= {MIN_SERVED_CONTEXT} (a prompt token and one generated)",
            self.block_size,
        )
        require(
            "vocab_size",
            self.vocab_size is None or MIN_VOCAB <= self.vocab_size <= MAX_VOCAB,
            f"must be in {MIN_VOCAB}..{MAX_VOCAB} (every byte plus <|endoftext|>, up to what "
            "the token cache's uint16 ids hold)",
            self.vocab_size,
        )
        require("seed", 0 <= self.seed <= MAX_SEED, f"must be in 0..{MAX_SEED}", self.seed)
        # An empty path is the working folder: a run written among the user's files, or
        # everything under it read as text.
        require("out_dir", bool(self.out_dir.strip()), "must name a folder", self.out_dir)
        for name in ("data", "val_data"):
            paths = getattr(self, name)
            require(name, all(p.strip() for p in paths), "a path is empty", paths)
        non_negative = ("warmup_steps", "weight_decay", "grad_clip", "eval_tokens")
        for name in (*non_negative, "sample_tokens", "patience"):
            value = getattr(self, name)
            require(name, value is None or value >= 0, "must be >= 0", value)
        require("lr", self.lr is None or self.lr > 0, "must be > 0", self.lr)
        require(
            "embedding_lr_scale",
            self.embedding_lr_scale > 0,
            "must be > 0",
            self.embedding_lr_scale,
        )
        require("min_lr_ratio", 0 <= self.min_lr_ratio <= 1, "must be in [0, 1]", self.min_lr_ratio)
        require(
            "cooldown_fraction",
            0 < self.cooldown_fraction <= 1,
            "must be in (0, 1]",
            self.cooldown_fraction,
        )
        require("val_fraction", 0 < self.val_fraction < 1, "must be in (0, 1)", self.val_fraction)
        require("dropout", 0 <= self.dropout < 1, "must be in [0, 1)", self.dropout)
        require(
            "max_time", self.max_time is None or self.max_time > 0, "must be > 0", self.max_time
        )
        choices = {"preset": ("auto", *PRESETS), "device": ("auto", "cpu", "cuda")}
        choices["dtype"] = ("auto", "float32", "bfloat16")
        choices["optimizer"] = ("adamw", "muon")
        choices["lr_schedule"] = ("wsd", "cosine")
        for name, allowed in choices.items():
            value = getattr(self, name)
            require(name, value in allowed, f"choose one of {', '.join(allowed)}", value)
        try:
            resolve_device(self.device, setting_source("device", sources))
        except ValueError as e:
            raise UsageError(str(e)) from None
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SHAPE_FIELDS = ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "tie_embeddings")


PATH_FIELDS = ("data", "val_data", "tokenizer", "cache_dir", "init_from")

# Settings whose automatic value (here) the trainer decides as a run starts: by the machine
# it runs on (--compile, --dtype) or by its schedule (--warmup-steps). A resumed run
# decides them again, on the machine it resumes on and for the schedule it resumes with
# (a lowered --max-steps), unless they were given.
CHOSEN_AT_START: dict[str, object] = {"compile": None, "dtype": "auto", "warmup_steps": None}


def chosen_at_start(args: TrainArgs) -> list[str]:
    """The CHOSEN_AT_START settings that `args` (not yet resolved) leaves to the run."""
    return [name for name, auto in CHOSEN_AT_START.items() if getattr(args, name) == auto]


def as_saved(name: str, value: object) -> object:
    """Setting `name`'s `value` as trainer_meta.json records it: paths made absolute."""
    if name not in PATH_FIELDS or value is None:
        return value
    if isinstance(value, list):
        return [os.path.abspath(v) for v in value]
    return os.path.abspath(value)


def with_absolute_paths(args: TrainArgs) -> TrainArgs:
    """The input paths made absolute, as trainer_meta.json records them: a run resumed
    from another directory reads the same files (or fails naming them)."""
    return dataclasses.replace(args, **{n: as_saved(n, getattr(args, n)) for n in PATH_FIELDS})


FIELDS = {f.name: f for f in dataclasses.fields(TrainArgs)}
TYPES = typing.get_type_hints(TrainArgs)


def setting_source(name: str, sources: Mapping[str, str] | None) -> str:
    """How the user gave setting `name` (its flag, env var or config entry; the flag if
    `sources` does not say): what an error about its value names."""
    return (sources or {}).get(name, flag(name))


def _base_type(name: str) -> tuple[type, bool]:
    """(scalar type, optional) of a field; list fields report list."""
    hint = TYPES[name]
    if isinstance(hint, types.UnionType):
        return next(a for a in typing.get_args(hint) if a is not type(None)), True
    return typing.get_origin(hint) or hint, False


def _convert(name: str, value: object, source: str) -> object:
    """A config/env/CLI value -> the field's type; UsageError names `source` on failure."""
    kind, optional = _base_type(name)
    try:
        # Empty, as `POCKETGPT_INIT_FROM=` leaves it: unset, as `POCKETGPT_RESUME=` was.
        if optional and (
            value is None or (isinstance(value, str) and value.strip().lower() in ("", "none"))
        ):
            return None
        if kind is list:
            if isinstance(value, str):
                return value.split(os.pathsep) if value else []
            if isinstance(value, list) and all(isinstance(v, str) for v in value):
                return list(value)
            raise ValueError("expected a list of strings")
        if kind is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError("expected true/false")
        if kind is str and not isinstance(value, str):
            # Only a config file gives other types: str() made `out-dir = ["runs/a"]`
            # the folder "['runs/a']", and `tokenizer = true` the path "True".
            raise ValueError("expected a string")
        if kind is int and isinstance(value, (bool, float)):
            raise ValueError("expected an integer")
        if kind is float and isinstance(value, bool):
            raise ValueError("expected a number")
        return kind(value)
    except (TypeError, ValueError, OverflowError) as e:  # Overflow: a float from a huge int
        raise UsageError(f"{source}: invalid value {value!r} ({e})") from None


class _Parser(ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m training.pretrain",
        description="Train a small GPT on text and write checkpoints. "
        "Every flag also reads the environment variable POCKETGPT_<FLAG>.",
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="TOML (.toml) or JSON file of these settings, keys as the flags' names (max-steps "
        "or max_steps); relative paths in it are taken from the working directory, as on the "
        "command line; flags and env vars win over it (env POCKETGPT_CONFIG)",
    )
    defaults = TrainArgs()
    for name, f in FIELDS.items():
        kind, _ = _base_type(name)
        help_text = f.metadata["help"]
        default = getattr(defaults, name)
        # Unset (None, []) needs no note, and some helps say their default themselves.
        if default not in (None, []) and "default:" not in help_text:
            help_text += f" (default: {default!r})"
        if kind is bool:
            # Alone it is true, and it takes true / false too, as a server switch does
            # (_convert reads the word).
            parser.add_argument(
                flag(name), nargs="?", const=True, metavar="true|false", help=help_text
            )
            parser.add_argument(
                flag("no_" + name),
                dest=name,
                action="store_const",
                const=False,
                help=f"the same as {flag(name)} false",
            )
        elif kind is list:
            # `--data a --data b` reads both: the second does not replace the first.
            parser.add_argument(
                flag(name), nargs="+", action="extend", metavar="PATH", help=help_text
            )
        else:
            parser.add_argument(flag(name), metavar=kind.__name__.upper(), help=help_text)
    return parser


# Settings fill a page; a read this long is the wrong file (or /dev/zero, endless).
MAX_CONFIG_BYTES = 1 << 20


def _read_config_file(path: Path) -> tuple[dict, dict[str, str]]:
    """(the settings in the config file at `path`, each one's key as written there)."""
    try:
        # Read, not stat-checked: a pipe (--config <(...)) has no size until read.
        with path.open("rb") as file:
            raw = file.read(MAX_CONFIG_BYTES + 1)
        if len(raw) > MAX_CONFIG_BYTES:
            raise UsageError(f"--config {path}: longer than {MAX_CONFIG_BYTES >> 20} MiB")
        text = raw.decode("utf-8-sig")  # Notepad writes a BOM
    except OSError as e:
        raise UsageError(f"--config {path}: cannot read ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise UsageError(f"--config {path}: not UTF-8 text (byte {e.start})") from None
    # A .toml file is TOML; any other name is read as JSON.
    is_toml = path.suffix.lower() == ".toml"
    try:
        data = tomllib.loads(text) if is_toml else json.loads(text, object_pairs_hook=_unique)
    except _RepeatedKey as e:
        raise UsageError(f"--config {path}: {e.args[0]!r} is given twice") from None
    # ValueError: the decode errors, and an integer past Python's 4,300 digits (json).
    except (ValueError, RecursionError) as e:
        kind = "TOML" if is_toml else "JSON"
        if path.suffix.lower() not in (".toml", ".json"):  # a .yaml, say: read as JSON
            kind += ", as a file not named .toml is read"
        raise UsageError(f"--config {path}: not valid {kind} ({e})") from None
    if not isinstance(data, dict):
        raise UsageError(f"--config {path}: expected an object of settings")
    out, keys = {}, {}
    for key, value in data.items():
        name = key.replace("-", "_")
        if name not in FIELDS:
            raise UsageError(f"--config {path}: unknown setting {key!r}")
        if name in keys:
            raise UsageError(f"--config {path}: {keys[name]!r} and {key!r} are one setting")
        keys[name] = key
        out[name] = _convert(name, value, f"--config {path}: {key}")
    return out, keys


class _RepeatedKey(ValueError):
    pass


def _unique(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """A JSON object whose keys are distinct (json keeps the last of a repeated key)."""
    seen = dict(pairs)
    if len(seen) < len(pairs):
        raise _RepeatedKey(next(key for key in seen if sum(k == key for k, _ in pairs) > 1))
    return seen


@dataclass(frozen=True)
class Given:
    """The settings a user gave, and where each came from (what an error names)."""

    values: dict[str, object]
    sources: dict[str, str]  # field -> "--flag", "POCKETGPT_FLAG" or "--config FILE: key"

    def source(self, name: str) -> str:
        """How setting `name` was given: what an error about it names (its flag if it
        was not given)."""
        return setting_source(name, self.sources)


def explicit_settings(argv: Sequence[str] | None, environ: Mapping[str, str]) -> Given:
    """Settings given by config file, environment and command line, in rising precedence."""
    given = vars(build_parser().parse_args(argv))
    values, sources = {}, {}
    config = given.pop("config", None) or environ.get(env_var("config"))
    if config:
        values, keys = _read_config_file(Path(config))
        # As written there: `max-steps` or `max_steps`.
        sources.update({name: f"--config {config}: {keys[name]}" for name in values})
    for name in FIELDS:
        env = env_var(name)
        # A flag wins over its variable, whose value is then not read (a bad one in the
        # environment need not stop a command line that overrides it).
        if env in environ and name not in given:
            values[name], sources[name] = _convert(name, environ[env], env), env
    for name, value in given.items():
        typed = flag("no_" + name if value is False else name)  # as typed: --no-compile
        if _base_type(name) == (str, True) and isinstance(value, str) and not value.strip():
            # Typed, an empty path (every optional text setting is one) is a shell variable
            # left unset (`--init-from "$BASE"`): read as no setting, the fine-tune asked for
            # trained a new model from scratch, `--resume "$RUN"` started a new run. (An
            # empty POCKETGPT_INIT_FROM stays unset: Docker passes one through.)
            raise UsageError(f"{typed}: a path is empty (got {value!r})")
        values[name], sources[name] = _convert(name, value, typed), typed
    return Given(values, sources)


def make_args(base: Mapping[str, object], given: Given) -> TrainArgs:
    """TrainArgs from `base` (defaults or a resumed run's args) overridden by `given`."""
    known = {k: v for k, v in base.items() if k in FIELDS}
    return TrainArgs(**{**known, **given.values}).validate(given.sources)
