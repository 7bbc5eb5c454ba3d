"""The checkpoint folder: Hugging Face Llama layout, written atomically.

    config.json             LlamaConfig fields (model_type "llama")
    model.safetensors       weights under HF names (model.layers.0.self_attn.q_proj.weight ...)
    tokenizer.json          tokenizers-library file; tokenizer_config.json beside it
    chat_template.jinja     only if the checkpoint it was trained from had one, and its
                            additional_chat_templates/<name>.jinja (named templates)
    generation_config.json  eos/bos ids and default sampling settings
    ...                     any extra files the caller writes (the trainer's state)

`transformers.AutoModelForCausalLM.from_pretrained(folder)` loads it unchanged.
A save writes `<name>.tmp-<pid>` next to the target, fsyncs every file and the
folder, renames it onto `<name>`, fsyncs the parent, and only then rewrites the
`latest` pointer file. A crash at any moment leaves `latest` naming a complete
checkpoint. Weights are safetensors: loading never unpickles anything.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, normalizers

from model.atomic_files import (
    fsync_path,
    is_temporary,
    replace_dir,
    write_json,
    write_text_atomic,
    write_tokenizer,
)
from model.config import ModelConfig
from model.memory import available_memory, format_size
from model.transformer import Transformer, rope_bytes_per_position, rope_tables

END_OF_TEXT = "<|endoftext|>"  # document separator; doubles as bos/eos for HF
LATEST = "latest"
RUN_LOG = "log.jsonl"  # a run folder's record of its training and evaluation (trainer.py)
CONFIG = "config.json"
WEIGHTS = "model.safetensors"
# What transformers writes instead of WEIGHTS past save_pretrained's max_shard_size.
WEIGHTS_INDEX = "model.safetensors.index.json"
TOKENIZER = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
GENERATION_CONFIG = "generation_config.json"
CHAT_TEMPLATE = "chat_template.jinja"  # where transformers 5 saves a tokenizer's chat template
NAMED_CHAT_TEMPLATES = "additional_chat_templates"  # and its named ones, <name>.jinja each
# tokenizer_config.json fields a checkpoint keeps from the one it was trained from: what
# HF users add to a tokenizer (a pad token, a chat template), which the fields this
# format writes itself do not cover. The ids they name stay right: a run trained from a
# checkpoint keeps its tokenizer.
KEPT_TOKENIZER_FIELDS = (
    "pad_token",
    "unk_token",
    "additional_special_tokens",
    "extra_special_tokens",
    "model_specific_special_tokens",
    "added_tokens_decoder",
    "chat_template",
    "chat_control_tokens",
    "padding_side",
    "truncation_side",
)
HF_PREFIX = "model."  # our module names are HF's minus this prefix (lm_head excepted)
FLOAT_DTYPES = {torch.float32, torch.bfloat16, torch.float16}
# generation_config.json's sampling settings for a model trained from scratch.
NEW_MODEL_SAMPLING: dict[str, object] = {"do_sample": True, "temperature": 0.8, "top_p": 0.95}


class CheckpointError(Exception):
    """A checkpoint folder that cannot be used; the message names the file and the problem."""


class CheckpointWriteError(Exception):
    """A checkpoint that could not be written (a full disk, a file-size limit, a lost
    mount). Nothing of it is left behind, and `latest` still names the previous one."""

    def __init__(self, message: str, root: Path) -> None:
        super().__init__(message)
        self.root = root  # the run folder

    @property
    def what_is_kept(self) -> str:
        if (self.root / LATEST).is_file():
            return "the checkpoint `latest` names is intact"
        return "no checkpoint of this run was saved before it"


# ---------------------------------------------------------------- config <-> HF


def hf_config(config: ModelConfig, eos_id: int) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.dim,
        "intermediate_size": config.ffn_dim,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim,
        "max_position_embeddings": config.max_seq_len,
        "rope_theta": config.rope_theta,
        "rope_scaling": None,
        "rms_norm_eps": config.norm_eps,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": config.tie_embeddings,
        "initializer_range": 0.02,
        "bos_token_id": eos_id,
        "eos_token_id": eos_id,
        "torch_dtype": "float32",
        "use_cache": True,
    }


# The config.json fields that the size of the model's tensors grows with.
SIZE_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "max_position_embeddings",
)


# ModelConfig's fields that config.json names otherwise: what its refusals are named by.
HF_NAMES = {
    "dim": "hidden_size",
    "ffn_dim": "intermediate_size",
    "n_layers": "num_hidden_layers",
    "n_heads": "num_attention_heads",
    "n_kv_heads": "num_key_value_heads",
    "max_seq_len": "max_position_embeddings",
    "norm_eps": "rms_norm_eps",
}


def config_from_hf(hf: Mapping, source: Path) -> ModelConfig:
    def fail(problem: str) -> CheckpointError:
        return CheckpointError(f"{source}: {problem}")

    if hf.get("model_type") != "llama":
        raise fail(f"unsupported model_type {hf.get('model_type')!r} (expected 'llama')")
    if hf.get("hidden_act", "silu") != "silu":
        raise fail(f"unsupported hidden_act {hf['hidden_act']!r} (expected 'silu')")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise fail("biases are not supported (attention_bias / mlp_bias must be false)")
    # transformers 5 writes RoPE settings as rope_parameters (which it reads before the
    # older top-level rope_theta); version 4 wrote rope_scaling. Only plain RoPE is ours.
    for key in ("rope_parameters", "rope_scaling"):
        settings = hf.get(key) or {}
        if not isinstance(settings, Mapping):
            raise fail(f"{key} must be an object or null, not {settings!r}")
        if settings.get("rope_type", settings.get("type", "default")) != "default":
            raise fail(f"unsupported {key} {settings!r} (only plain RoPE)")
    rope = hf.get("rope_parameters") or {}

    def integer(name: str, value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise fail(f"{name} must be an integer, not {value!r}")
        return value

    def number(name: str, value: object) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise fail(f"{name} must be a number, not {value!r}")
        return float(value)

    tie_embeddings = hf.get("tie_word_embeddings", False)
    if not isinstance(tie_embeddings, bool):  # "false" would read as true
        raise fail(f"tie_word_embeddings must be true or false, not {tie_embeddings!r}")

    try:
        heads = integer("num_attention_heads", hf["num_attention_heads"])
        kv_heads = hf.get("num_key_value_heads")
        config = ModelConfig(
            vocab_size=integer("vocab_size", hf["vocab_size"]),
            dim=integer("hidden_size", hf["hidden_size"]),
            n_layers=integer("num_hidden_layers", hf["num_hidden_layers"]),
            n_heads=heads,
            # Absent or null is multi-head attention (as to LlamaConfig); 0 is refused.
            n_kv_heads=integer("num_key_value_heads", kv_heads if kv_heads is not None else heads),
            ffn_dim=integer("intermediate_size", hf["intermediate_size"]),
            max_seq_len=integer("max_position_embeddings", hf["max_position_embeddings"]),
            # Absent fields take LlamaConfig's defaults, so both libraries build one model.
            rope_theta=number("rope_theta", rope.get("rope_theta", hf.get("rope_theta", 1e4))),
            norm_eps=number("rms_norm_eps", hf.get("rms_norm_eps", 1e-6)),
            tie_embeddings=tie_embeddings,
        )
    except KeyError as e:
        raise fail(f"missing field {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        # In config.json's names: "n_layers must be >= 1" named no field of the file.
        problem = str(e).removeprefix("invalid ModelConfig: ")
        raise fail(re.sub(r"\b\w+\b", lambda m: HF_NAMES.get(m[0], m[0]), problem)) from None
    # torch counts a tensor's bytes in int64: shapes past that (a vocab_size of 2**70) failed
    # deep in building the model, with a TypeError or RuntimeError traceback.
    values = config.num_parameters() + 2 * config.max_seq_len * config.head_dim  # + RoPE
    if values * 4 >= 2**63:
        largest = max(SIZE_FIELDS, key=lambda name: hf.get(name, 0))  # the typo, likely
        raise fail(
            f"{largest} {hf[largest]:,}: the model's tensors would hold more values than "
            "torch can size"
        )
    head_dim = hf.get("head_dim")
    if head_dim is not None and integer("head_dim", head_dim) != config.head_dim:
        raise fail(f"head_dim {head_dim} != hidden_size / num_attention_heads = {config.head_dim}")
    return config


# ---------------------------------------------------------------- save


def state_dict_hf(model: Transformer) -> dict[str, torch.Tensor]:
    """Our parameters under HF Llama names, contiguous, without the tied LM head."""
    out = {}
    for name, tensor in model.state_dict().items():
        if name.startswith("lm_head."):
            if model.config.tie_embeddings:
                continue
            out[name] = tensor.detach().contiguous()
        else:
            out[HF_PREFIX + name] = tensor.detach().contiguous()
    return out


def save_checkpoint(
    root: Path,
    name: str,
    model: Transformer,
    tokenizer: Tokenizer,
    *,
    generation_defaults: Mapping[str, object] | None = None,
    tokenizer_extras: TokenizerExtras | None = None,
    extra_files: Mapping[str, Callable[[Path], None]] | None = None,
    update_latest: bool = True,
) -> Path:
    """Atomically write checkpoint `root/name`; then point `root/latest` at it.

    `tokenizer_extras`: what to keep of the tokenizer files of the checkpoint this one
    was trained from. `extra_files` maps a file name to a function that writes it (given
    its path). Returns the final folder.
    """
    extras = tokenizer_extras or TokenizerExtras()
    root = Path(root)
    final = root / name
    tmp = root / f"{name}.tmp-{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            eos_id = end_of_text_id(tokenizer)
        except ValueError as e:
            raise CheckpointError(f"the tokenizer {e}") from None
        write_json(tmp / CONFIG, hf_config(model.config, eos_id))
        weights = {k: v.to("cpu") for k, v in state_dict_hf(model).items()}
        save_file(weights, str(tmp / WEIGHTS), metadata={"format": "pt"})
        # safetensors creates the file owner-only; the weights are as readable as the
        # rest of the folder (e.g. a volume the container wrote, read by the host's user).
        os.chmod(tmp / WEIGHTS, (tmp / CONFIG).stat().st_mode & 0o777)
        write_tokenizer(tokenizer, tmp / TOKENIZER)
        write_json(
            tmp / TOKENIZER_CONFIG,
            extras.fields
            | {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": END_OF_TEXT,
                "eos_token": END_OF_TEXT,
                "model_max_length": model.config.max_seq_len,
                "clean_up_tokenization_spaces": False,
                # transformers 4's PreTrainedTokenizerFast adds token_type_ids otherwise,
                # which LlamaForCausalLM refuses: `generate(**tokenizer(text))` failed.
                "model_input_names": ["input_ids", "attention_mask"],
            },
        )
        for file_name, template in extras.chat_templates.items():
            (tmp / file_name).parent.mkdir(exist_ok=True)
            (tmp / file_name).write_text(template, encoding="utf-8")
        write_json(tmp / GENERATION_CONFIG, generation_config(generation_defaults, eos_id))
        for file_name, write in (extra_files or {}).items():
            write(tmp / file_name)
        for path in tmp.iterdir():
            fsync_path(path)
        fsync_path(tmp)
        replace_dir(tmp, final)
        if update_latest:
            write_text_atomic(root / LATEST, name + "\n")
    except (OSError, SafetensorError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointWriteError(f"{final}: could not be written ({reason})", root) from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


# ---------------------------------------------------------------- load


def is_run_log(path: Path) -> bool:
    """Whether `path` is a trainer's log: JSON records of a `kind`, not documents (a
    `text`) or conversations (`messages`)."""
    if not path.is_file():  # a FIFO's open would wait for a writer
        return False
    try:
        with path.open(encoding="utf-8") as f:
            first = json.loads(f.readline())
    except (OSError, ValueError):
        return False
    return isinstance(first, dict) and "kind" in first and not {"text", "messages"} & set(first)


def resolve_checkpoint(path: Path) -> Path:
    """A checkpoint folder, or a run folder whose `latest` file names one; a
    CheckpointError for neither, or for one whose files link out of it."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint folder")
    if path.name == LATEST and path.is_file():  # `run/latest` named for the run
        raise CheckpointError(
            f"{path}: a run folder's {LATEST} file, not a checkpoint: name its folder, "
            f"{path.parent}"
        )
    if not path.is_dir():  # its weights file, say: "config.json missing" said too little
        raise CheckpointError(f"{path}: a file, not a checkpoint folder (name its folder)")
    if (path / CONFIG).exists():
        return _links_stay_inside(path)
    pointer = path / LATEST
    if pointer.is_file():
        try:
            name = pointer.read_text(encoding="utf-8").strip()
        except UnicodeDecodeError:
            raise CheckpointError(f"{pointer}: not a checkpoint's name (not UTF-8 text)") from None
        # A folder beside `latest` only: not a path, nor "." or ".." (its parent's).
        if not name or "/" in name or name in {".", ".."} or is_temporary(name):
            raise CheckpointError(f"{pointer}: does not name a checkpoint ({name!r})")
        target = path / name
        if not (target / CONFIG).exists():
            raise CheckpointError(f"{pointer} names {name!r}, but {target / CONFIG} is missing")
        return _links_stay_inside(target)
    folders = sorted(path.iterdir()) if path.is_dir() else []
    inside = [f.name for f in folders if (f / CONFIG).is_file() and not is_temporary(f.name)]
    if inside:  # a run folder that lost its `latest` (best/ kept, or the step folders)
        shown = ", ".join(inside if len(inside) <= 3 else [*inside[:2], "...", inside[-1]])
        raise CheckpointError(
            f"{path}: not a checkpoint ({CONFIG} missing and no {LATEST} file); the "
            f"checkpoints inside it: {shown}: name one"
        )
    runs = [f.name for f in folders if (f / LATEST).is_file() and not is_temporary(f.name)]
    if runs:  # the folder that holds the runs (checkpoints/ rather than checkpoints/mine)
        shown = ", ".join(runs if len(runs) <= 3 else [*runs[:2], "...", runs[-1]])
        raise CheckpointError(
            f"{path}: not a checkpoint ({CONFIG} missing and no {LATEST} file); the run "
            f"folders inside it: {shown}: name one"
        )
    if is_run_log(path / RUN_LOG):  # a server started beside a trainer, say
        raise CheckpointError(
            f"{path}: a run folder without a checkpoint (yet: a trainer still running there "
            "writes its first at --save-interval or at its first evaluation)"
        )
    raise CheckpointError(f"{path}: not a checkpoint ({CONFIG} missing and no {LATEST} file)")


def _links_stay_inside(folder: Path) -> Path:
    """`folder`, if none of its files is a link leading out of it: in a crafted checkpoint,
    a chat_template.jinja linked to a file of the server's machine would be rendered into
    every chat prompt, which /tokenize and /detokenize read back to any client. Links into
    a Hugging Face cache's blobs (snapshots/<revision>/x -> ../../blobs/<hash>) are that
    cache's layout."""
    root = folder.resolve()
    inside = [root, root.parent.parent / "blobs"] if root.parent.name == "snapshots" else [root]
    for entry in [*folder.iterdir(), *(folder / NAMED_CHAT_TEMPLATES).glob("*")]:
        if entry.is_symlink() and not any(entry.resolve().is_relative_to(d) for d in inside):
            raise CheckpointError(
                f"{entry}: a link out of the checkpoint folder (to {entry.resolve()}); copy "
                "the file in"
            )
    return folder


def read_config(folder: Path) -> ModelConfig:
    path = Path(folder) / CONFIG
    return config_from_hf(read_json_object(path, required=True), path)


def _check_safetensors_size(path: Path) -> None:
    """Catch truncation with a message that says how much is missing."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: truncated ({size} bytes, no safetensors header)")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > size - 8:
            raise CheckpointError(
                f"{path}: truncated header ({size} bytes, header says {header_len})"
            )
        try:
            header = json.loads(f.read(header_len))
            # JSON, but perhaps not a table of tensors (a list, offsets that are no
            # integers): read as one, it raised an AttributeError or a TypeError.
            ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
            if not all(type(e) is int for e in ends):
                raise TypeError("offsets must be integers")
            end = max(ends, default=0)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError):
            raise CheckpointError(f"{path}: corrupt safetensors header") from None
    expected = 8 + header_len + end
    if size < expected:
        raise CheckpointError(
            f"{path}: truncated (expected {expected:,} bytes, found {size:,}); "
            "the checkpoint was not completely written"
        )


def _weight_files(folder: Path) -> tuple[Path, list[Path]]:
    """(what names the weights, the safetensors files holding them): model.safetensors,
    or the shards model.safetensors.index.json lists."""
    single, index = folder / WEIGHTS, folder / WEIGHTS_INDEX
    if single.is_file():
        return single, [single]
    if not index.is_file():
        if any(folder.glob("pytorch_model*.bin")):
            raise CheckpointError(
                f"{folder}: PyTorch .bin weights are not read (a pickle can run code): save "
                "them as safetensors (transformers' save_pretrained does by default)"
            )
        raise CheckpointError(f"{single}: missing (and no {WEIGHTS_INDEX})")
    try:
        names = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{index}: unreadable ({e!r})") from None
    # File names only: an index must not send the loader outside its folder.
    if not all(
        isinstance(n, str) and n == Path(n).name and n.endswith(".safetensors") for n in names
    ):
        raise CheckpointError(f"{index}: shards must be .safetensors files in its own folder")
    return index, [folder / name for name in sorted(names)]


def load_weights(folder: Path, config: ModelConfig) -> dict[str, torch.Tensor]:
    """Our state-dict names -> tensors, checked against `config`'s shapes."""
    path, files = _weight_files(Path(folder))
    hf_weights: dict[str, torch.Tensor] = {}
    for file in files:
        if not file.is_file():
            raise CheckpointError(f"{file}: missing")
        _check_safetensors_size(file)
        try:
            hf_weights.update(load_file(str(file)))
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{file}: unreadable ({e})") from None
    with torch.device("meta"):
        expected = {name: tuple(t.shape) for name, t in Transformer(config).state_dict().items()}
    if config.tie_embeddings:
        expected.pop("lm_head.weight")
    weights = {}
    for hf_name, tensor in hf_weights.items():
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue  # older HF exports carry the RoPE table; we compute ours
        name = hf_name.removeprefix(HF_PREFIX) if hf_name.startswith(HF_PREFIX) else hf_name
        if name == "lm_head.weight" and config.tie_embeddings:
            continue  # some exporters write the tied head too: the embedding is it, as in HF
        if name not in expected:
            raise CheckpointError(f"{path}: unexpected tensor {hf_name!r} for this {CONFIG}")
        if tuple(tensor.shape) != expected[name]:
            raise CheckpointError(
                f"{path}: {hf_name} has shape {list(tensor.shape)} but {CONFIG} implies "
                f"{list(expected[name])}"
            )
        if tensor.dtype not in FLOAT_DTYPES:
            raise CheckpointError(f"{path}: {hf_name} has unsupported dtype {tensor.dtype}")
        weights[name] = tensor
    missing = sorted(set(expected) - set(weights))
    if missing:
        names = ", ".join(HF_PREFIX + m if m != "lm_head.weight" else m for m in missing[:3])
        raise CheckpointError(f"{path}: {len(missing)} tensors missing ({names}...)")
    return weights


def check_finite(folder: Path, weights: Mapping[str, torch.Tensor]) -> None:
    """Refuse a diverged run's weights, naming the first tensor holding NaN or inf: served,
    every token would be drawn from NaN logits; fine-tuned, every loss would be NaN.

    Arithmetic, unlike load_weights: not for the server's event-loop thread, where it
    would start a second OpenMP team beside the engine's (model/cpu.py).
    """
    name = first_non_finite(weights)
    if name is not None:
        raise CheckpointError(f"{folder}: weight {name} holds NaN or infinite values")


def first_non_finite(tensors: Mapping[str, torch.Tensor]) -> str | None:
    """The name of the first tensor holding NaN or inf, or None if all are finite."""
    return next((name for name, t in tensors.items() if not torch.isfinite(t).all()), None)


def check_rope_tables(folder: Path, config: ModelConfig) -> None:
    """A CheckpointError naming `folder`'s config.json if the RoPE tables of `config`
    cannot fit in memory.

    The RoPE tables (cos and sin, float32) are built for every position: a crafted
    max_position_embeddings (2**40) would ask terabytes of an allocator that fails, or
    of the kernel, which kills the process."""
    tables = rope_bytes_per_position(config) * config.max_seq_len
    if (room := available_memory()) is not None and tables > room:
        raise CheckpointError(
            f"{folder / CONFIG}: max_position_embeddings {config.max_seq_len:,} needs "
            f"{format_size(tables)} of RoPE tables, and at most {format_size(room)} is available"
        )


def load_model(
    folder: Path,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    max_seq_len: int | None = None,
) -> Transformer:
    """Build the Transformer described by `folder` and load its weights (eval mode);
    `max_seq_len`: a shorter context than the checkpoint's to run it with (the RoPE
    tables, and the KV cache sized from the config, end there)."""
    folder = resolve_checkpoint(folder)
    config = read_config(folder)
    if max_seq_len is not None:
        if max_seq_len > config.max_seq_len:
            raise ValueError(
                f"a context of {max_seq_len} tokens is more than the checkpoint's "
                f"{config.max_seq_len}"
            )
        config = config.replace(max_seq_len=max_seq_len)
    check_rope_tables(folder, config)
    weights = load_weights(folder, config)
    check_finite(folder, weights)
    with torch.device("meta"):
        model = Transformer(config)
    model.load_state_dict(weights, strict=False, assign=True)
    if config.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    # The RoPE tables are non-persistent buffers: computed here, off the meta device.
    model.rope_cos, model.rope_sin = rope_tables(config)
    return model.to(device=device, dtype=dtype).eval()


@dataclass(frozen=True)
class TokenizerExtras:
    """What a checkpoint keeps of the tokenizer files of the one it was trained from."""

    # KEPT_TOKENIZER_FIELDS present, and the named tokens (`<name>_token` fields)
    fields: dict[str, object] = field(default_factory=dict)
    # CHAT_TEMPLATE and NAMED_CHAT_TEMPLATES/<name>.jinja (paths in the folder) -> text
    chat_templates: dict[str, str] = field(default_factory=dict)


def read_tokenizer_extras(folder: Path) -> TokenizerExtras:
    """`folder`'s KEPT_TOKENIZER_FIELDS, named tokens and chat template files (any may be
    absent)."""
    config = read_json_object(folder / TOKENIZER_CONFIG)
    fields = {name: config[name] for name in KEPT_TOKENIZER_FIELDS if name in config}
    # And the model's own named tokens (transformers 5 saves `"turn_end_token": "<|x|>"`),
    # which a chat template may write: without them, a fine-tune learned its chats with
    # the token and was then served (and read in transformers) without it. Only tokens
    # (add_bos_token is a setting), and not bos and eos: this format writes its own.
    fields |= {
        name: value
        for name, value in config.items()
        if name.endswith("_token")
        and isinstance(value, str | dict)
        and name not in {"bos_token", "eos_token"}
    }
    templates = [folder / CHAT_TEMPLATE, *sorted((folder / NAMED_CHAT_TEMPLATES).glob("*.jinja"))]
    chat_templates = {}
    for template in templates:
        if not template.exists():
            continue
        try:
            chat_templates[str(template.relative_to(folder))] = template.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{template}: unreadable ({e})") from None
    return TokenizerExtras(fields, chat_templates)


def crlf_as_newline() -> normalizers.Normalizer:
    """The normalizer of the tokenizers the trainer writes: CRLF read as "\n", as the
    trainer reads its text files (training/corpus.py), so that a CRLF prompt is the text
    the model learned, in the server and in transformers alike."""
    return normalizers.Replace("\r\n", "\n")


def text_literally(tokenizer: Tokenizer) -> Tokenizer:
    """`tokenizer`, set to encode `<|endoftext|>` written in text as the text it is, and
    every text whole.

    By default the tokenizers library turns the marker's spelling into the separator's id
    wherever it appears: a prompt or a training document that quotes it would end a
    document mid-text. The separator enters token streams only as its id (prepare.py,
    the server's empty prompt). A runtime setting, not stored in tokenizer.json: every
    tokenizer the project builds or loads passes through here. The truncation and padding
    a tokenizer.json may hold (transformers saves those of its last padded call) are
    turned off: they cut every training document and prompt to that length, or filled
    the token streams with pad ids (transformers ignores them on later calls too).
    """
    tokenizer.encode_special_tokens = True
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer


def read_tokenizer_file(path: Path) -> Tokenizer:
    """A tokenizer.json, reading `<|endoftext|>` spelled in text as text (text_literally)."""
    try:
        return text_literally(Tokenizer.from_file(str(path)))
    except Exception as e:  # the tokenizers library raises a bare Exception
        raise CheckpointError(f"{path}: unreadable ({e})") from None


def load_tokenizer(folder: Path) -> Tokenizer:
    """The checkpoint's tokenizer, checked to yield only ids its model has embeddings for."""
    folder = resolve_checkpoint(folder)
    path = folder / TOKENIZER
    if not path.is_file():
        raise CheckpointError(f"{path}: missing")
    tokenizer = read_tokenizer_file(path)
    # Fewer ids than the model's rows is fine (unused rows); more would index past the
    # embedding mid-run, on the first text that uses them.
    vocab_size = read_config(folder).vocab_size
    if tokenizer.get_vocab_size() > vocab_size:
        raise CheckpointError(
            f"{path}: {tokenizer.get_vocab_size()} token ids, but the model in {CONFIG} has "
            f"vocab_size {vocab_size}; the tokenizer and the weights do not belong together"
        )
    return tokenizer


def end_of_text_id(tokenizer: Tokenizer) -> int:
    """The id of END_OF_TEXT; a ValueError (to be prefixed with the tokenizer's name) if
    the tokenizer has none."""
    eos_id = tokenizer.token_to_id(END_OF_TEXT)
    if eos_id is None:
        raise ValueError(
            f"has no {END_OF_TEXT} token, which separates documents and ends generated text"
        )
    return eos_id


def generation_config(carried: Mapping[str, object] | None, eos_id: int) -> dict:
    """generation_config.json: the settings `carried` from the checkpoint a run started
    from, as they were (None: a new model's, sampling at 0.8 / 0.95), with the separator
    as bos and among the eos ids (besides those it declared: a chat model's <|im_end|>)."""
    settings = dict(carried) if carried is not None else NEW_MODEL_SAMPLING
    declared = settings.get("eos_token_id")
    declared = declared if isinstance(declared, list) else [declared]
    ids = [i for i in declared if isinstance(i, int) and not isinstance(i, bool)]
    eos_ids = [eos_id, *(i for i in ids if i != eos_id)]
    return settings | {
        "bos_token_id": eos_id,
        "eos_token_id": eos_ids[0] if len(eos_ids) == 1 else eos_ids,
    }


def read_generation_config(folder: Path) -> dict:
    """generation_config.json of a checkpoint folder ({} if it has none)."""
    return read_json_object(folder / GENERATION_CONFIG)


def carried_generation_config(folder: Path) -> dict:
    """The generation settings a fine-tune of `folder` keeps: its generation_config.json,
    and the end-of-text and pad ids its config.json declares where that file leaves them
    out (HF's generate and the server read them there then: a chat model's <|im_end|>)."""
    config = read_json_object(folder / CONFIG)
    declared = {k: config[k] for k in ("eos_token_id", "pad_token_id") if config.get(k) is not None}
    return declared | read_generation_config(folder)


def read_json_object(path: Path, *, required: bool = False) -> dict:
    """The JSON object in the file at `path`; if there is none, {} (or, `required`, a
    CheckpointError saying it is missing). A file that is no JSON object is an error, as
    is a folder (or another thing not a file) by the file's name."""
    if not path.exists():
        if required:
            raise CheckpointError(f"{path}: missing")
        return {}
    if not path.is_file():
        shown = "a folder" if path.is_dir() else "not a regular file"
        raise CheckpointError(f"{path}: {shown}, not a JSON file")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable ({e})") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: not a JSON object")
    return config
