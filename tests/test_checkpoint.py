"""Checkpoint folder: exact round trip, HF transformers compatibility, clear errors, atomicity."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import transformers
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

from model.atomic_files import clear_interrupted_saves
from model.checkpoint import (
    CHAT_TEMPLATE,
    LATEST,
    CheckpointError,
    carried_generation_config,
    config_from_hf,
    generation_config,
    load_model,
    load_tokenizer,
    read_generation_config,
    read_tokenizer_extras,
    resolve_checkpoint,
    save_checkpoint,
)
from model.config import ModelConfig
from model.transformer import Transformer
from tests.conftest import MIXED_TEXT
from tests.test_detokenizer_fuzz import FUZZ
from training.run_folder import (
    BEST,
    TRAINER_META,
    has_checkpoint,
    holds_run,
    lost_latest_note,
    recorded_best_loss,
    run_checkpoint,
    step_folders,
)


def positions_for(ids: torch.Tensor) -> torch.Tensor:
    return torch.arange(ids.shape[1])[None].expand_as(ids)


def with_trained_norms(model: Transformer) -> Transformer:
    """`model` with its norm weights drawn around 1, as training leaves them: at their
    initial 1s, a norm applied in the wrong place (or not at all) changes no logit."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.normal_(1.0, 0.3)
    return model


@pytest.fixture()
def saved(
    tmp_path: Path, tokenizer: Tokenizer, tiny_config: ModelConfig
) -> tuple[Transformer, Path]:
    torch.manual_seed(7)
    model = with_trained_norms(Transformer(tiny_config)).eval()
    return model, save_checkpoint(tmp_path, "step-0000010", model, tokenizer)


def test_save_then_load_is_exact(saved: tuple[Transformer, Path]) -> None:
    model, folder = saved
    loaded = load_model(folder)
    original, restored = model.state_dict(), loaded.state_dict()
    assert original.keys() == restored.keys()
    assert all(torch.equal(original[k], restored[k]) for k in original)
    assert loaded.lm_head.weight is loaded.embed_tokens.weight


def test_latest_pointer_names_the_newest_checkpoint(
    tmp_path: Path, tokenizer: Tokenizer, tiny_config: ModelConfig
) -> None:
    model = Transformer(tiny_config)
    run = tmp_path / "mine"
    save_checkpoint(run, "step-0000001", model, tokenizer)
    save_checkpoint(run, "step-0000002", model, tokenizer)
    assert (run / LATEST).read_text().strip() == "step-0000002"
    assert resolve_checkpoint(run) == run / "step-0000002"
    assert load_model(run).config == tiny_config
    # The `latest` file itself, or the folder holding the runs, named instead of the run:
    # "not a checkpoint (config.json missing and no latest file)" said neither.
    with pytest.raises(
        CheckpointError,
        match=re.escape(f"latest file, not a checkpoint: name its folder, {run}") + "$",
    ):
        resolve_checkpoint(run / LATEST)
    with pytest.raises(CheckpointError, match=r"the run folders inside it: mine: name one$"):
        resolve_checkpoint(tmp_path)
    # A file of a checkpoint, its weights say, named instead of its folder.
    weights = run / "step-0000002" / "model.safetensors"
    with pytest.raises(CheckpointError) as refused:
        resolve_checkpoint(weights)
    assert str(refused.value) == f"{weights}: a file, not a checkpoint folder (name its folder)"
    # A checkpoint folder that is itself named `latest` is one.
    models = tmp_path / "models"
    models.mkdir()
    shutil.copytree(run / "step-0000002", models / LATEST)
    assert resolve_checkpoint(models / LATEST) == models / LATEST
    # Three named whole; a killed save's leftover copy of a run is none to name.
    for name in ("ours", "theirs", f"mine.tmp-{os.getpid() + 1}"):
        shutil.copytree(run, tmp_path / name)
    with pytest.raises(CheckpointError, match=r"inside it: mine, ours, theirs: name one$"):
        resolve_checkpoint(tmp_path)


def test_saving_over_an_existing_checkpoint_replaces_it(
    tmp_path: Path, tokenizer: Tokenizer, tiny_config: ModelConfig
) -> None:
    torch.manual_seed(0)
    save_checkpoint(tmp_path, "best", Transformer(tiny_config), tokenizer)
    torch.manual_seed(1)
    newer = Transformer(tiny_config)
    save_checkpoint(tmp_path, "best", newer, tokenizer)
    assert torch.equal(load_model(tmp_path / "best").embed_tokens.weight, newer.embed_tokens.weight)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best", LATEST]


@torch.inference_mode()
def test_transformers_loads_the_checkpoint_and_agrees_on_logits(
    saved: tuple[Transformer, Path],
) -> None:
    model, folder = saved
    assert_transformers_agrees(model, folder)


@torch.inference_mode()
def test_an_untied_lm_head_round_trips_and_transformers_agrees(
    tmp_path: Path, tokenizer: Tokenizer, tiny_config: ModelConfig
) -> None:
    torch.manual_seed(3)
    model = with_trained_norms(Transformer(tiny_config.replace(tie_embeddings=False))).eval()
    folder = save_checkpoint(tmp_path, "step-0000001", model, tokenizer)
    loaded = load_model(folder)
    assert loaded.lm_head.weight is not loaded.embed_tokens.weight
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)
    assert json.loads((folder / "config.json").read_text())["tie_word_embeddings"] is False
    assert_transformers_agrees(model, folder)


@torch.inference_mode()
@pytest.mark.parametrize(
    "shape",
    [
        {"n_heads": 4, "n_kv_heads": 4},  # plain multi-head attention
        {"n_heads": 8, "n_kv_heads": 1},  # multi-query, head_dim 16
        {"dim": 96, "n_heads": 2, "n_kv_heads": 2, "ffn_dim": 200, "n_layers": 1},
        {"rope_theta": 500000.0, "norm_eps": 1e-6, "tie_embeddings": False},
    ],
    ids=["mha", "mqa", "odd widths", "rope theta, eps, untied"],
)
def test_transformers_agrees_on_logits_across_model_shapes(
    tmp_path: Path, tokenizer: Tokenizer, tiny_config: ModelConfig, shape: dict
) -> None:
    torch.manual_seed(11)
    model = with_trained_norms(Transformer(tiny_config.replace(**shape))).eval()
    folder = save_checkpoint(tmp_path, "step-0000001", model, tokenizer)
    assert_transformers_agrees(model, folder)


def assert_transformers_agrees(model: Transformer, folder: Path) -> None:
    hf = transformers.LlamaForCausalLM.from_pretrained(folder).eval()
    ids = torch.randint(
        0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0)
    )
    ours = model(ids, positions_for(ids))
    theirs = hf(ids).logits
    assert (ours - theirs).abs().max().item() <= 1e-4


@torch.inference_mode()
def test_a_folder_transformers_saved_in_shards_loads_and_agrees(
    saved: tuple[Transformer, Path], tmp_path: Path
) -> None:
    model, folder = saved
    resaved = tmp_path / "resaved"
    hf = transformers.LlamaForCausalLM.from_pretrained(folder)
    hf.save_pretrained(resaved, max_shard_size="100KB")
    assert not (resaved / "model.safetensors").exists()
    assert len(list(resaved.glob("model-*.safetensors"))) > 1
    loaded = load_model(resaved)
    original = model.state_dict()
    assert all(torch.equal(t, original[k]) for k, t in loaded.state_dict().items())
    assert_transformers_agrees(loaded, resaved)


def edit_config(folder: Path, **changes: object) -> None:
    """Set (or, given None, delete) fields of the folder's config.json."""
    config = json.loads((folder / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (folder / "config.json").write_text(json.dumps(config))


@torch.inference_mode()
@pytest.mark.parametrize(
    "changes",
    [
        # transformers 5's RoPE field, which it reads before the top-level rope_theta.
        {"rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}},
        # Absent fields: LlamaConfig's defaults apply (rms_norm_eps 1e-6, not ours).
        {"rms_norm_eps": None},
        {"rope_theta": None},  # 10000
    ],
    ids=["rope_parameters", "no rms_norm_eps", "no rope_theta"],
)
def test_config_fields_mean_what_they_mean_to_transformers(
    saved: tuple[Transformer, Path], changes: dict
) -> None:
    _, folder = saved
    edit_config(folder, **changes)
    assert_transformers_agrees(load_model(folder), folder)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"rope_parameters": {"rope_type": "linear", "factor": 2.0}},
            "unsupported rope_parameters",
        ),
        ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "unsupported rope_scaling"),
        ({"num_hidden_layers": 2.5}, "num_hidden_layers must be an integer"),
        ({"num_hidden_layers": True}, "num_hidden_layers must be an integer"),
        ({"hidden_act": "gelu"}, "unsupported hidden_act"),
        ({"head_dim": 16}, r"head_dim 16 != hidden_size / num_attention_heads = 32"),
        ({"rope_scaling": "linear"}, "rope_scaling must be an object or null, not 'linear'"),
        ({"head_dim": "x"}, "head_dim must be an integer, not 'x'"),
        ({"tie_word_embeddings": "false"}, "tie_word_embeddings must be true or false, not"),
        ({"rms_norm_eps": -1}, r"rms_norm_eps must be a positive number \(got -1.0\)"),
        ({"rope_theta": 0}, r"rope_theta must be a positive number \(got 0.0\)"),
        ({"attention_bias": True}, "biases are not supported"),
        ({"mlp_bias": True}, "biases are not supported"),
        ({"vocab_size": None}, "missing field 'vocab_size'"),
        ({"rms_norm_eps": [1e-5]}, r"config\.json: rms_norm_eps must be a number, not \[1e-05\]"),
        ({"rope_theta": "1e4"}, r"config\.json: rope_theta must be a number, not '1e4'"),
        ({"max_position_embeddings": 0}, r"max_position_embeddings must be >= 1 \(got 0\)"),
        # A CheckpointError (the server's one-line refusal), not a ZeroDivisionError.
        ({"num_attention_heads": 0, "head_dim": None}, r"num_attention_heads must be >= 1"),
    ],
    ids=[
        "scaled rope (v5)",
        "scaled rope (v4)",
        "fractional layers",
        "boolean layers",
        "gelu",
        "head_dim apart from the width",
        "rope_scaling not an object",
        "head_dim not a number",
        "tie_word_embeddings a string",
        "rms_norm_eps negative: every logit NaN",
        "rope_theta zero",
        "attention biases",
        "mlp biases",
        "no vocab_size",
        "rms_norm_eps a list",
        "rope_theta a string",
        "max_position_embeddings zero",
        "no heads",
    ],
)
def test_configs_we_cannot_run_as_written_are_refused(
    saved: tuple[Transformer, Path], changes: dict, message: str
) -> None:
    _, folder = saved
    edit_config(folder, **changes)
    with pytest.raises(CheckpointError, match=message):
        load_model(folder)


def test_the_weights_are_as_readable_as_the_rest_of_the_checkpoint(
    saved: tuple[Transformer, Path],
) -> None:
    _, folder = saved
    modes = {p.name: p.stat().st_mode & 0o777 for p in folder.iterdir()}
    assert modes["model.safetensors"] == modes["config.json"], modes


def test_transformers_tokenizer_matches_ours_on_mixed_scripts(
    saved: tuple[Transformer, Path], tokenizer: Tokenizer
) -> None:
    _, folder = saved
    hf = transformers.AutoTokenizer.from_pretrained(folder)
    text = MIXED_TEXT + " 中文和emoji混合 👩‍💻!"
    ours = tokenizer.encode(text).ids
    assert hf.encode(text, add_special_tokens=False) == ours
    assert hf.decode(ours) == text
    assert load_tokenizer(folder).decode(ours) == text


# Any Unicode, among pieces that byte-level BPE and the CRLF normalizer must get right
# (words after spaces, line ends, punctuation, combining marks, joiners, emoji).
TOKENIZER_TEXT = st.lists(
    st.one_of(
        st.characters(codec="utf-8"),
        st.sampled_from(
            [
                " the",
                " cat",
                "ing",
                "  ",
                "\n",
                "\r\n",
                "\r",
                "\t",
                ".",
                " ,",
                "'s",
                "’",
                "é",
                "e\u0301",
                "世界",
                "🙂",
                "👩\u200d💻",
                "\u00a0",
                "<|",
                "|>",
            ]
        ),
    ),
    max_size=40,
).map("".join)


def test_transformers_tokenizer_agrees_with_ours_on_any_text_but_a_special_token(
    saved: tuple[Transformer, Path],
) -> None:
    # README: the two agree on any text but one that spells a special token.
    _, folder = saved
    hf, ours = transformers.AutoTokenizer.from_pretrained(folder), load_tokenizer(folder)

    @FUZZ
    @given(text=TOKENIZER_TEXT)
    def agree(text: str) -> None:
        ids = ours.encode(text).ids
        assert hf.encode(text, add_special_tokens=False) == ids
        assert hf.decode(ids) == ours.decode(ids) == text.replace("\r\n", "\n")

    agree()


def test_windows_line_ends_read_as_the_trainers_newline_here_and_in_transformers(
    saved: tuple[Transformer, Path], tokenizer: Tokenizer
) -> None:
    # The trainer reads CRLF files as "\n" (corpus.read_text): a CRLF prompt is the same
    # tokens, in the server's tokenizer and in the one transformers loads.
    _, folder = saved
    hf = transformers.AutoTokenizer.from_pretrained(folder)
    expected = tokenizer.encode("Line one.\nLine two.\n\n").ids
    crlf = "Line one.\r\nLine two.\r\n\r\n"
    assert tokenizer.encode(crlf).ids == expected
    assert load_tokenizer(folder).encode(crlf).ids == expected
    assert hf.encode(crlf, add_special_tokens=False) == expected
    assert tokenizer.decode(tokenizer.encode("a lone\r stays").ids) == "a lone\r stays"


@torch.inference_mode()
def test_transformers_generates_from_what_its_tokenizer_returns(
    saved: tuple[Transformer, Path],
) -> None:
    # The usual HF call. transformers 4's PreTrainedTokenizerFast also returned
    # token_type_ids unless the tokenizer_config.json names the inputs, and
    # LlamaForCausalLM refused them.
    _, folder = saved
    config = json.loads((folder / "tokenizer_config.json").read_text())
    assert config["model_input_names"] == ["input_ids", "attention_mask"]
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    assert hf_tokenizer.model_input_names == ["input_ids", "attention_mask"]
    inputs = hf_tokenizer("The meaning of life is", return_tensors="pt")
    assert sorted(inputs) == ["attention_mask", "input_ids"]
    hf = transformers.LlamaForCausalLM.from_pretrained(folder).eval()
    out = hf.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape[1] > inputs["input_ids"].shape[1]  # generated, maybe ending early


def test_a_tied_checkpoint_that_also_stores_its_head_loads_as_transformers_loads_it(
    saved: tuple[Transformer, Path],
) -> None:
    # Some exporters write lm_head.weight beside tied embeddings; HF ties over it.
    model, folder = saved
    assert model.config.tie_embeddings
    weights = load_file(folder / "model.safetensors")
    weights["lm_head.weight"] = weights["model.embed_tokens.weight"].clone()
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    loaded = load_model(folder)
    assert loaded.lm_head.weight is loaded.embed_tokens.weight
    assert all(torch.equal(t, model.state_dict()[k]) for k, t in loaded.state_dict().items())
    assert_transformers_agrees(loaded, folder)


def test_missing_config_is_a_checkpoint_error_naming_the_file(
    saved: tuple[Transformer, Path],
) -> None:
    _, folder = saved
    (folder / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"config\.json"):
        load_model(folder)


def test_truncated_weights_say_how_much_is_missing(saved: tuple[Transformer, Path]) -> None:
    _, folder = saved
    weights = folder / "model.safetensors"
    full = weights.stat().st_size
    for size in (full - 1, full // 2):  # a single byte short is as truncated
        with open(weights, "r+b") as f:
            f.truncate(size)
        with pytest.raises(
            CheckpointError,
            match=rf"model\.safetensors: truncated \(expected {full:,} bytes, found {size:,}\)",
        ):
            load_model(folder)


def test_config_that_disagrees_with_the_weights_names_the_tensor(
    saved: tuple[Transformer, Path],
) -> None:
    _, folder = saved
    config = json.loads((folder / "config.json").read_text())
    config["intermediate_size"] += 64
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"mlp\.\w+_proj\.weight has shape"):
        load_model(folder)


def test_unsupported_model_type_is_rejected(saved: tuple[Transformer, Path]) -> None:
    _, folder = saved
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "gpt2"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="unsupported model_type 'gpt2'"):
        load_model(folder)


def test_a_tokenizer_with_more_ids_than_the_model_has_rows_is_rejected(
    tmp_path: Path, tokenizer: Tokenizer
) -> None:
    small = Transformer(ModelConfig.from_preset("tiny", vocab_size=300))
    folder = save_checkpoint(tmp_path, "step-0000001", small, tokenizer)
    load_model(folder)  # the weights alone are consistent
    with pytest.raises(
        CheckpointError,
        match=rf"tokenizer\.json: {tokenizer.get_vocab_size()} token ids, but the model in "
        r"config\.json has vocab_size 300",
    ):
        load_tokenizer(folder)
    # Spare embedding rows are harmless: a tokenizer with fewer ids loads.
    large = Transformer(ModelConfig.from_preset("tiny", vocab_size=1024))
    padded = save_checkpoint(tmp_path, "step-0000002", large, tokenizer)
    assert load_tokenizer(padded).get_vocab_size() == tokenizer.get_vocab_size()


def test_a_folder_that_is_not_a_checkpoint_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        load_model(tmp_path)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_model(tmp_path / "absent")


def test_interrupted_save_leaves_latest_on_the_previous_checkpoint(
    tmp_path: Path, tokenizer: Tokenizer, tiny_config: ModelConfig
) -> None:
    model = Transformer(tiny_config)
    save_checkpoint(tmp_path, "step-0000001", model, tokenizer)

    def crash(_path: Path) -> None:
        raise KeyboardInterrupt  # the process is interrupted while writing a file

    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, "step-0000002", model, tokenizer, extra_files={"state": crash})
    assert resolve_checkpoint(tmp_path) == tmp_path / "step-0000001"
    assert not (tmp_path / "step-0000002").exists()


def test_a_save_interrupted_over_an_existing_checkpoint_leaves_the_previous_one_whole(
    tmp_path: Path, tokenizer: Tokenizer, tiny_config: ModelConfig
) -> None:
    # best/ is rewritten in place of itself at every improvement: a save stopped midway
    # must leave the one it was replacing, not a mix of the two.
    torch.manual_seed(0)
    kept = Transformer(tiny_config)
    save_checkpoint(tmp_path, BEST, kept, tokenizer, update_latest=False)
    torch.manual_seed(1)
    newer = Transformer(tiny_config)

    def crash(_path: Path) -> None:
        raise KeyboardInterrupt  # the process is interrupted while writing a file

    with pytest.raises(KeyboardInterrupt):
        extra = {TRAINER_META: crash}
        save_checkpoint(tmp_path, BEST, newer, tokenizer, extra_files=extra, update_latest=False)
    original, loaded = kept.state_dict(), load_model(tmp_path / BEST).state_dict()
    assert original.keys() == loaded.keys()
    assert all(torch.equal(original[k], loaded[k]) for k in original)
    assert sorted(p.name for p in tmp_path.iterdir()) == [BEST]


def test_latest_names_a_new_checkpoint_only_once_it_is_renamed_into_place(
    tmp_path: Path, tokenizer: Tokenizer, tiny_config: ModelConfig
) -> None:
    # Stopped at the rename of the finished folder onto its name (os.replace is audited
    # as "os.rename"): `latest` must still name the previous checkpoint.
    model = Transformer(tiny_config)
    save_checkpoint(tmp_path, "step-0000001", model, tokenizer)
    target = tmp_path / "step-0000002"
    armed = True

    def stop_at_the_rename(event: str, args: tuple) -> None:
        if armed and event == "os.rename" and Path(os.fsdecode(args[1])) == target:
            raise KeyboardInterrupt

    sys.addaudithook(stop_at_the_rename)  # hooks stay for the process: disarmed below
    try:
        with pytest.raises(KeyboardInterrupt):
            save_checkpoint(tmp_path, target.name, model, tokenizer)
    finally:
        armed = False
    assert resolve_checkpoint(tmp_path) == tmp_path / "step-0000001"
    assert load_model(tmp_path).config == tiny_config
    assert not target.exists()


def finished_pid() -> int:
    """The pid of a process that has ended (and been reaped)."""
    process = subprocess.Popen([sys.executable, "-c", ""])
    process.wait()
    return process.pid


def test_what_a_killed_save_left_is_cleared_and_a_folder_moved_aside_put_back(
    tmp_path: Path,
) -> None:
    # This process's own pid counts as no writer: in a restarted container the new
    # trainer often has the killed one's.
    half_written = tmp_path / f"step-0000002.tmp-{os.getpid()}"
    moved_aside = tmp_path / f"best.old-{finished_pid()}"
    for folder in (half_written, moved_aside):
        folder.mkdir()
    done = clear_interrupted_saves(tmp_path, lambda name: True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]
    assert done == [
        f"put {moved_aside} back as best: a save killed midway had moved it",
        f"removed {half_written}: a save killed midway left it",
    ]


def test_a_copy_moved_aside_beside_its_replacement_is_removed_and_the_replacement_kept(
    tmp_path: Path,
) -> None:
    # Killed after the second rename: best/ is the new one whole, best.old-<pid> the one
    # it replaced. Putting the old one back would lose the newer save.
    (tmp_path / "best").mkdir()
    (tmp_path / "best" / "model").write_text("newer")
    moved_aside = tmp_path / f"best.old-{finished_pid()}"
    moved_aside.mkdir()
    (moved_aside / "model").write_text("older")
    done = clear_interrupted_saves(tmp_path, lambda name: True)
    assert done == [f"removed {moved_aside}: a save killed midway left it"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]
    assert (tmp_path / "best" / "model").read_text() == "newer"


def test_clearing_killed_saves_leaves_other_names_live_writers_and_links_targets_alone(
    tmp_path: Path,
) -> None:
    # Only the names the caller saves are its leftovers; a live process (our parent)
    # may still be writing its copy; a link is removed, never what it points to.
    ended = finished_pid()
    outside = tmp_path / "outside"
    outside.mkdir()
    run = tmp_path / "run"
    run.mkdir()
    kept = [
        f"notes.tmp-{ended}",  # a name the caller does not save
        f"step-0000003.tmp-{os.getppid()}",  # a live writer's
        "step-0000004.tmp-x",  # no pid: not a save's copy
        f"step-0000005.tmp-{ended}.part",  # the whole name must be one
        "step-0000006.tmp-",
    ]
    for name in kept:
        (run / name).mkdir()
    link = run / f"step-0000007.tmp-{ended}"
    link.symlink_to(outside, target_is_directory=True)
    half_written_file = run / f"state.json.tmp-{ended}"
    half_written_file.write_text("{")
    done = clear_interrupted_saves(run, lambda name: name != "notes")
    assert sorted(p.name for p in run.iterdir()) == sorted(kept)
    assert outside.is_dir()
    assert done == [
        f"removed {half_written_file}: a save killed midway left it",
        f"removed {link}: a save killed midway left it",
    ]


def test_leftover_temp_folder_from_a_killed_save_is_never_picked(
    tmp_path: Path, tokenizer: Tokenizer, tiny_config: ModelConfig
) -> None:
    model = Transformer(tiny_config)
    good = save_checkpoint(tmp_path, "step-0000001", model, tokenizer)
    # What a kill -9 mid-save leaves: a complete-looking temp folder, `latest` untouched.
    shutil.copytree(good, tmp_path / f"step-0000002.tmp-{os.getpid() + 1}")
    assert resolve_checkpoint(tmp_path) == good
    (tmp_path / LATEST).write_text(f"step-0000002.tmp-{os.getpid() + 1}\n")
    with pytest.raises(CheckpointError, match="does not name a checkpoint"):
        resolve_checkpoint(tmp_path)
    (tmp_path / LATEST).write_bytes(b"\xff\xfe")
    with pytest.raises(CheckpointError, match=r"latest: not a checkpoint's name \(not UTF-8"):
        resolve_checkpoint(tmp_path)


def test_loading_a_checkpoint_leaves_the_compiler_unimported(tiny_checkpoint: Path) -> None:
    """load_model builds on the meta device, where most arithmetic runs through decompositions
    that import torch._dynamo (~1 s of every server start); it must not get there."""
    code = (
        "import sys; from model.checkpoint import load_model; "
        f"load_model({str(tiny_checkpoint)!r}); "
        "assert 'torch._dynamo' not in sys.modules, 'load_model imported torch._dynamo'"
    )
    repo = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr


def test_generation_config_keeps_what_a_run_carries_with_the_separator_among_its_eos_ids():
    new = {"do_sample": True, "temperature": 0.8, "top_p": 0.95}
    assert generation_config(None, 0) == new | {"bos_token_id": 0, "eos_token_id": 0}
    # Carried as it was: no do_sample added where the start left it out, nor defaults
    # where it had no file; a chat model's own end ids stay beside the separator.
    assert generation_config({}, 0) == {"bos_token_id": 0, "eos_token_id": 0}
    carried = {"temperature": 0.6, "eos_token_id": [7, 0], "bos_token_id": 5}
    assert generation_config(carried, 0) == {
        "temperature": 0.6,
        "bos_token_id": 0,
        "eos_token_id": [0, 7],
    }
    # A boolean is no token id (JSON's true is not 1).
    assert generation_config({"eos_token_id": [True, 7]}, 0)["eos_token_id"] == [0, 7]


@pytest.mark.parametrize("tied", [True, False])
def test_weights_are_stored_under_hf_llama_names(tmp_path, tokenizer, tiny_config, tied):
    # What other HF-format readers look up: the head outside `model.`, and only untied.
    model = Transformer(tiny_config.replace(tie_embeddings=tied))
    folder = save_checkpoint(tmp_path, "step-0000001", model, tokenizer)
    names = set(load_file(str(folder / "model.safetensors")))
    assert ("lm_head.weight" in names) == (not tied)
    assert all(name.startswith("model.") for name in names - {"lm_head.weight"})
    assert {"model.embed_tokens.weight", "model.norm.weight"} <= names


def test_a_run_folder_before_its_first_checkpoint_is_named_as_such(tmp_path: Path) -> None:
    # A server started beside a trainer that has logged but not yet saved: "not a
    # checkpoint (config.json missing and no latest file)" did not say why.
    (tmp_path / "log.jsonl").write_text('{"kind": "train", "step": 10, "loss": 4.2}\n')
    with pytest.raises(CheckpointError, match=r"a run folder without a checkpoint \(yet: "):
        resolve_checkpoint(tmp_path)
    # A log.jsonl of documents (a folder of text) is no run's log.
    (tmp_path / "log.jsonl").write_text('{"kind": "note", "text": "Dear diary."}\n')
    with pytest.raises(CheckpointError, match=r"not a checkpoint \(config\.json missing"):
        resolve_checkpoint(tmp_path)


@torch.inference_mode()
def test_fields_a_config_leaves_out_take_llamaconfigs_defaults(
    tmp_path: Path, tokenizer: Tokenizer, tiny_config: ModelConfig
) -> None:
    # Older Llama configs write neither: no num_key_value_heads is multi-head attention,
    # no tie_word_embeddings an untied head, to transformers as to us; and no hidden_act
    # is LlamaConfig's silu, not a refusal.
    torch.manual_seed(5)
    shape = {"n_heads": 4, "n_kv_heads": 4, "tie_embeddings": False}
    model = with_trained_norms(Transformer(tiny_config.replace(**shape))).eval()
    folder = save_checkpoint(tmp_path, "step-0000001", model, tokenizer)
    edit_config(folder, num_key_value_heads=None, tie_word_embeddings=None, hidden_act=None)
    loaded = load_model(folder)
    assert (loaded.config.n_kv_heads, loaded.config.tie_embeddings) == (4, False)
    assert_transformers_agrees(loaded, folder)


@pytest.mark.parametrize(
    ("kv_heads", "message"),
    [
        (0, "num_attention_heads 4 is not a multiple of num_key_value_heads 0"),
        (False, "num_key_value_heads must be an integer"),
    ],
    ids=["zero", "false"],
)
def test_a_config_with_no_key_value_heads_is_refused_not_read_as_leaving_them_out(
    tmp_path: Path, tokenizer: Tokenizer, tiny_config: ModelConfig, kv_heads: object, message: str
) -> None:
    # Only an absent (or null) num_key_value_heads means multi-head attention; 0 is no
    # model (transformers divides by it), so it is refused even where the weights fit MHA.
    model = Transformer(tiny_config.replace(n_heads=4, n_kv_heads=4))
    folder = save_checkpoint(tmp_path, "step-0000001", model, tokenizer)
    edit_config(folder, num_key_value_heads=kv_heads)
    with pytest.raises(CheckpointError, match=message):
        load_model(folder)


def test_config_json_names_the_separator_as_bos_and_eos(tiny_checkpoint: Path) -> None:
    # What transformers' generate() starts and stops on without generation_config.json.
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    separator = load_tokenizer(tiny_checkpoint).token_to_id("<|endoftext|>")
    assert config["bos_token_id"] == config["eos_token_id"] == separator


def test_latest_naming_a_folder_outside_its_run_folder_is_refused(
    tmp_path: Path, tokenizer: Tokenizer, tiny_config: ModelConfig
) -> None:
    save_checkpoint(tmp_path / "other", "step-0000001", Transformer(tiny_config), tokenizer)
    run = tmp_path / "run"
    run.mkdir()
    (run / LATEST).write_text("../other/step-0000001\n")
    with pytest.raises(CheckpointError, match="does not name a checkpoint"):
        resolve_checkpoint(run)


@pytest.mark.parametrize("name", ["..", "."])
def test_latest_naming_its_run_folders_parent_or_itself_is_refused(
    tmp_path: Path, tokenizer: Tokenizer, tiny_config: ModelConfig, name: str
) -> None:
    # ".." has no slash, yet names the folder above the run: a checkpoint there (the run
    # folder kept inside a model folder) was served in its place.
    outer = save_checkpoint(tmp_path, "model", Transformer(tiny_config), tokenizer)
    run = outer / "run"
    run.mkdir()
    (run / LATEST).write_text(f"{name}\n")
    with pytest.raises(CheckpointError, match="does not name a checkpoint"):
        resolve_checkpoint(run)


def test_a_checkpoint_whose_file_links_out_of_it_is_refused(
    tmp_path: Path, tokenizer: Tokenizer, tiny_config: ModelConfig
) -> None:
    # A crafted checkpoint's chat_template.jinja linked to a file of the serving machine:
    # rendered into every chat prompt, its text reached any client through /tokenize.
    secret = tmp_path / "secret.txt"
    secret.write_text("aws_secret_access_key = ...")
    folder = save_checkpoint(tmp_path / "run", "step-1", Transformer(tiny_config), tokenizer)
    (folder / CHAT_TEMPLATE).symlink_to(secret)
    for path in (folder, folder.parent):  # named, or by its run's `latest`
        with pytest.raises(CheckpointError, match="a link out of the checkpoint folder"):
            resolve_checkpoint(path)
    with pytest.raises(CheckpointError, match=f"{CHAT_TEMPLATE}: a link out of the"):
        load_tokenizer(folder)
    # A link to a file inside it is its own file; a folder linked whole (best/ -> a step
    # folder) holds its files.
    (folder / CHAT_TEMPLATE).unlink()
    (folder / "template.txt").write_text("{{ messages[0].content }}")
    (folder / CHAT_TEMPLATE).symlink_to("template.txt")
    assert resolve_checkpoint(folder) == folder
    (folder.parent / "linked").symlink_to(folder)
    assert resolve_checkpoint(folder.parent / "linked") == folder.parent / "linked"


def test_a_context_whose_rope_tables_outgrow_the_memory_is_refused_saying_so(
    saved: tuple[Transformer, Path],
) -> None:
    # 2**40 positions: terabytes of RoPE tables, asked of an allocator that failed with a
    # raw torch error (or of the kernel, which kills the process).
    _, folder = saved
    edit_config(folder, max_position_embeddings=2**40)
    with pytest.raises(
        CheckpointError,
        match=r"max_position_embeddings 1,099,511,627,776 needs 256\.00 TiB of RoPE tables",
    ):
        load_model(folder)


def test_a_hugging_face_cache_snapshot_of_links_into_its_blobs_loads(
    tmp_path: Path, tokenizer: Tokenizer, tiny_config: ModelConfig
) -> None:
    # models--org--name/snapshots/<revision>/<file> -> ../../blobs/<hash>: the hub's layout.
    model = Transformer(tiny_config)
    folder = save_checkpoint(tmp_path, "saved", model, tokenizer)
    repo = tmp_path / "models--org--name"
    snapshot, blobs = repo / "snapshots" / "0123abc", repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for number, file in enumerate(sorted(folder.iterdir())):
        file.rename(blobs / f"blob{number}")
        (snapshot / file.name).symlink_to(Path("../../blobs") / f"blob{number}")
    assert resolve_checkpoint(snapshot) == snapshot
    loaded = load_model(snapshot)
    assert all(
        torch.equal(a, b)
        for a, b in zip(loaded.state_dict().values(), model.state_dict().values(), strict=True)
    )


def test_a_run_folder_without_latest_names_its_checkpoints_not_a_killed_saves_leftover(
    tmp_path: Path, tokenizer: Tokenizer, tiny_config: ModelConfig
) -> None:
    good = save_checkpoint(tmp_path, "step-0000001", Transformer(tiny_config), tokenizer)
    shutil.copytree(good, tmp_path / f"step-0000002.tmp-{os.getpid() + 1}")
    (tmp_path / LATEST).unlink()
    with pytest.raises(CheckpointError, match=r"the checkpoints inside it: step-0000001: name"):
        resolve_checkpoint(tmp_path)


def test_a_run_whose_latest_names_a_lost_checkpoint_is_refused_not_continued_from_another(
    tmp_path: Path, tokenizer: Tokenizer, tiny_config: ModelConfig
) -> None:
    # Only a run without `latest` falls back to its newest step folder: one whose pointer
    # names a checkpoint since lost says so, rather than resume from an older step.
    save_checkpoint(tmp_path, "step-0000001", Transformer(tiny_config), tokenizer)
    (tmp_path / LATEST).write_text("step-0000002\n")
    with pytest.raises(CheckpointError, match="step-0000002"):
        run_checkpoint(tmp_path)
    (tmp_path / LATEST).unlink()
    assert run_checkpoint(tmp_path) == tmp_path / "step-0000001"


def test_a_run_folder_holding_only_latest_is_a_run_and_a_best_loss_is_read_as_a_number(
    tmp_path: Path,
) -> None:
    # A `latest` naming a lost checkpoint still marks a run that a new one must not
    # write over; a val_loss that is no float (a hand-edited file) is no loss to beat.
    (tmp_path / LATEST).write_text("step-0000002\n")
    assert holds_run(tmp_path)
    meta = tmp_path / BEST / TRAINER_META
    meta.parent.mkdir()
    for val_loss, recorded in (("low", None), (2.5, 2.5)):
        meta.write_text(json.dumps({"val_loss": val_loss}))
        assert recorded_best_loss(tmp_path) == recorded


def edit_weights(folder: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    """Rewrite the folder's model.safetensors with `edit` applied to its tensors."""
    weights = load_file(folder / "model.safetensors")
    edit(weights)
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})


def test_an_old_exports_rope_table_is_skipped_and_the_model_loads(
    saved: tuple[Transformer, Path],
) -> None:
    # Older HF exports store rotary_emb.inv_freq per layer; ours is computed.
    model, folder = saved
    inv_freq = torch.ones(model.config.head_dim // 2)
    edit_weights(
        folder, lambda w: w.update({"model.layers.0.self_attn.rotary_emb.inv_freq": inv_freq})
    )
    loaded = load_model(folder)
    assert all(torch.equal(t, model.state_dict()[k]) for k, t in loaded.state_dict().items())


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda w: w.update({"model.layers.9.mlp.up_proj.weight": torch.zeros(1)}),
            r"unexpected tensor 'model\.layers\.9\.mlp\.up_proj\.weight' for this config\.json",
        ),
        (lambda w: w.pop("model.norm.weight"), r"1 tensors missing \(model\.norm\.weight\.\.\.\)"),
        (
            lambda w: w.update({"model.norm.weight": w["model.norm.weight"].to(torch.int32)}),
            "model.norm.weight has unsupported dtype torch.int32",
        ),
    ],
    ids=["unexpected", "missing", "integer"],
)
def test_weights_that_are_not_the_configs_model_are_refused_naming_the_tensor(
    saved: tuple[Transformer, Path], edit: Callable, message: str
) -> None:
    _, folder = saved
    edit_weights(folder, edit)
    with pytest.raises(CheckpointError, match=message):
        load_model(folder)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"\x10\x00", r"truncated \(2 bytes, no safetensors header\)"),
        (
            (1000).to_bytes(8, "little") + b'{"a": 1}',
            r"truncated header \(16 bytes, header says 1000\)",
        ),
        # Cut within the header's last 8 bytes: what is left still parses as JSON, yet
        # it is a truncation, not a corrupt file.
        (
            (12).to_bytes(8, "little") + b'{"a": 1}',
            r"truncated header \(16 bytes, header says 12\)",
        ),
        ((8).to_bytes(8, "little") + b"not json", "corrupt safetensors header"),
    ],
    ids=["no header", "cut header", "header cut short by a few bytes", "header no JSON"],
)
def test_a_weights_file_without_a_whole_header_is_refused_saying_so(
    saved: tuple[Transformer, Path], content: bytes, message: str
) -> None:
    _, folder = saved
    (folder / "model.safetensors").write_bytes(content)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: " + message):
        load_model(folder)


@pytest.mark.parametrize(
    "header",
    [
        b"[1, 2]",
        b"5",
        b'{"model.norm.weight": {"dtype": "F32", "shape": [1], "data_offsets": [0, null]}}',
        b'{"model.norm.weight": {"dtype": "F32", "shape": [1], "data_offsets": "04"}}',
    ],
    ids=["a JSON list", "a number", "a null offset", "offsets a string"],
)
def test_a_weights_header_that_is_json_but_no_safetensors_header_is_refused_saying_so(
    saved: tuple[Transformer, Path], header: bytes
) -> None:
    # Whole and valid JSON, but no table of tensors: a CheckpointError (the server's
    # one-line refusal), not an AttributeError or TypeError from reading it as one.
    _, folder = saved
    (folder / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: corrupt safetensors header"):
        load_model(folder)


@pytest.mark.parametrize(
    "shard",
    ["../elsewhere.safetensors", "/tmp/model.safetensors", "model.bin", 3],
    ids=["parent folder", "absolute", "not safetensors", "not a name"],
)
def test_a_shard_index_may_name_only_safetensors_files_beside_it(
    saved: tuple[Transformer, Path], shard: object
) -> None:
    _, folder = saved
    (folder / "model.safetensors").rename(folder / "model-00001-of-00001.safetensors")
    index = {"weight_map": {"model.norm.weight": shard}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(
        CheckpointError, match=r"shards must be \.safetensors files in its own folder"
    ):
        load_model(folder)


def test_a_shard_the_index_names_but_the_folder_lacks_is_named(
    saved: tuple[Transformer, Path],
) -> None:
    _, folder = saved
    (folder / "model.safetensors").rename(folder / "model-00001-of-00002.safetensors")
    names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    index = {"weight_map": {"model.norm.weight": names[0], "lm_head.weight": names[1]}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=rf"{names[1]}: missing$"):
        load_model(folder)


def test_a_run_folder_without_latest_lists_up_to_three_checkpoints_then_elides(
    tmp_path: Path,
) -> None:
    for name in ("best", "step-0000002", "step-0000004"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"inside it: best, step-0000002, step-0000004: "):
        resolve_checkpoint(tmp_path)
    (tmp_path / "step-0000006").mkdir()
    (tmp_path / "step-0000006" / "config.json").write_text("{}")
    with pytest.raises(
        CheckpointError, match=r"inside it: best, step-0000002, \.\.\., step-0000006: "
    ):
        resolve_checkpoint(tmp_path)


def test_transformers_tokenizer_knows_the_models_context(saved: tuple[Transformer, Path]) -> None:
    # Its model_max_length: what transformers truncates to (and warns of) past it.
    model, folder = saved
    hf = transformers.AutoTokenizer.from_pretrained(folder)
    assert hf.model_max_length == model.config.max_seq_len


@torch.inference_mode()
def test_a_checkpoint_runs_with_any_context_up_to_its_own_and_no_longer(
    saved: tuple[Transformer, Path],
) -> None:
    # The server's --max-context: a shorter RoPE table (and cache), the same logits.
    model, folder = saved
    own = model.config.max_seq_len
    assert load_model(folder, max_seq_len=own).config == model.config
    short = load_model(folder, max_seq_len=8)
    assert short.config.max_seq_len == 8 and short.rope_cos.shape[0] == 8
    ids = torch.randint(
        0, model.config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(0)
    )
    torch.testing.assert_close(short(ids, positions_for(ids)), model(ids, positions_for(ids)))
    with pytest.raises(ValueError, match=rf"{own + 1} tokens is more than the checkpoint's {own}"):
        load_model(folder, max_seq_len=own + 1)


def test_a_fine_tune_carries_the_end_and_pad_ids_config_json_alone_declares(
    saved: tuple[Transformer, Path],
) -> None:
    _, folder = saved
    config = json.loads((folder / "config.json").read_text())
    config |= {"eos_token_id": [0, 7], "pad_token_id": 3}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "generation_config.json").write_text(json.dumps({"temperature": 0.6}))
    assert carried_generation_config(folder) == {
        "temperature": 0.6,
        "eos_token_id": [0, 7],
        "pad_token_id": 3,
    }
    # generation_config.json's own ids win; a null in config.json declares nothing.
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": 9}))
    (folder / "config.json").write_text(json.dumps(config | {"pad_token_id": None}))
    assert carried_generation_config(folder) == {"eos_token_id": 9}


def test_a_checkpoint_keeps_the_tokenizer_fields_hf_users_add(
    saved: tuple[Transformer, Path], tmp_path: Path, tokenizer: Tokenizer
) -> None:
    # A pad token and a chat template set in tokenizer_config.json (transformers 4's
    # place for the template) stay in the checkpoints trained from it; our own fields
    # are rewritten for the new model.
    model, folder = saved
    path = folder / "tokenizer_config.json"
    added = {
        "pad_token": "<|endoftext|>",
        "chat_template": "{{ messages }}",
        "padding_side": "left",
    }
    path.write_text(json.dumps(json.loads(path.read_text()) | added | {"model_max_length": 5}))
    extras = read_tokenizer_extras(folder)
    assert extras.fields == added
    again = save_checkpoint(tmp_path / "again", "step-1", model, tokenizer, tokenizer_extras=extras)
    written = json.loads((again / "tokenizer_config.json").read_text())
    assert {k: written[k] for k in added} == added
    assert written["model_max_length"] == model.config.max_seq_len


def test_a_config_whose_tensors_need_2_to_the_63_bytes_is_refused_not_only_past_2_to_the_64(
    tiny_checkpoint: Path,
) -> None:
    # torch sizes a tensor's bytes in int64: float32 values past 2**63 bytes (not only past
    # 2**64) cannot be built. A vocab_size whose embedding alone just crosses that line.
    hf = json.loads((tiny_checkpoint / "config.json").read_text())
    vocab_size = 2**63 // (4 * hf["hidden_size"]) + 1
    with pytest.raises(CheckpointError, match="more values than torch can size"):
        config_from_hf(hf | {"vocab_size": vocab_size}, tiny_checkpoint / "config.json")


def test_a_named_chat_template_linked_out_of_the_checkpoint_is_refused(
    tmp_path: Path, tokenizer: Tokenizer, tiny_config: ModelConfig
) -> None:
    # additional_chat_templates/<name>.jinja is copied into every fine-tune (and rendered by
    # transformers on request): a link out of the folder would carry a file of the machine.
    secret = tmp_path / "secret.txt"
    secret.write_text("aws_secret_access_key = ...")
    folder = save_checkpoint(tmp_path / "run", "step-1", Transformer(tiny_config), tokenizer)
    (folder / "additional_chat_templates").mkdir()
    (folder / "additional_chat_templates" / "tool_use.jinja").symlink_to(secret)
    with pytest.raises(CheckpointError, match=r"tool_use\.jinja: a link out of the checkpoint"):
        resolve_checkpoint(folder)


def test_a_tokenizer_setting_named_like_a_token_is_not_kept_as_one(
    saved: tuple[Transformer, Path],
) -> None:
    # add_bos_token ends in "_token" but is a setting (a bool): kept, a fine-tune's
    # tokenizer_config.json would carry its start's encoding settings as named tokens.
    _, folder = saved
    path = folder / "tokenizer_config.json"
    added = {"add_bos_token": True, "add_eos_token": False, "turn_token": "<|endoftext|>"}
    path.write_text(json.dumps(json.loads(path.read_text()) | added))
    assert read_tokenizer_extras(folder).fields == {"turn_token": "<|endoftext|>"}


def test_a_config_json_that_is_json_but_no_object_is_refused_saying_so(
    saved: tuple[Transformer, Path],
) -> None:
    # A config.json holding a list (a botched edit) failed in config_from_hf with an
    # AttributeError traceback rather than a CheckpointError naming the file.
    _, folder = saved
    (folder / "config.json").write_text("[]")
    with pytest.raises(CheckpointError, match=r"config\.json: not a JSON object"):
        load_model(folder)


def test_a_folder_by_a_json_files_name_is_refused_as_a_folder_not_as_missing(
    saved: tuple[Transformer, Path],
) -> None:
    _, folder = saved
    (folder / "config.json").unlink()
    (folder / "config.json").mkdir()
    with pytest.raises(CheckpointError, match=r"config\.json: a folder, not a JSON file$"):
        load_model(folder)
    # A file that may be absent (generation_config.json): a folder is refused, not skipped.
    (folder / "generation_config.json").unlink()
    (folder / "generation_config.json").mkdir()
    with pytest.raises(CheckpointError, match=r"generation_config\.json: a folder, not a "):
        read_generation_config(folder)


def test_a_single_weights_file_wins_over_a_shard_index_beside_it_as_in_transformers(
    saved: tuple[Transformer, Path],
) -> None:
    # transformers reads model.safetensors when it is there, whatever index lies beside it
    # (one left from an earlier sharded save): so does load_model.
    model, folder = saved
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"model.norm.weight": "model-00001-of-00002.safetensors"}})
    )
    loaded = load_model(folder)
    assert torch.equal(loaded.norm.weight, model.norm.weight)


def test_a_run_folders_step_checkpoints_are_its_step_folders_alone(tmp_path: Path) -> None:
    # A save's temporary copy and a file under a step's name are no checkpoints to resume.
    for name in ("step-0000002", "step-0000010", "step-0000003.tmp-123", "step-12", BEST):
        (tmp_path / name).mkdir()
    (tmp_path / "step-0000020").write_text("not a folder")
    assert [p.name for p in step_folders(tmp_path)] == ["step-0000002", "step-0000010"]


def test_a_folder_holding_best_alone_is_a_run_and_a_path_with_no_folder_no_checkpoint(
    tmp_path: Path,
) -> None:
    assert not holds_run(tmp_path)
    (tmp_path / BEST).mkdir()
    assert holds_run(tmp_path)  # a kept model a new run must not write over
    # Nothing to resume, and a CheckpointError to say so, not an OSError, where the path
    # is no folder at all.
    a_file = tmp_path / "notes.txt"
    a_file.write_text("text")
    assert not has_checkpoint(tmp_path / "missing") and not has_checkpoint(a_file)
    with pytest.raises(CheckpointError):
        run_checkpoint(tmp_path / "missing")


def test_a_latest_naming_a_lost_checkpoint_is_said_with_what_to_resume_instead(
    tmp_path: Path,
) -> None:
    assert lost_latest_note(tmp_path) is None  # no `latest`
    (tmp_path / LATEST).write_text("step-0000009\n")
    note = lost_latest_note(tmp_path)
    assert (
        note
        == f"its {LATEST} names step-0000009, which is gone, and no step folder is left to resume"
    )
    for name in ("step-0000003", "step-0000005"):
        (tmp_path / name).mkdir()
    assert lost_latest_note(tmp_path) == (
        f"its {LATEST} names step-0000009, which is gone; to go on from the newest step "
        f"folder left, pass --resume {tmp_path / 'step-0000005'}"
    )
    # Not a checkpoint's name: no note of a lost one.
    for text in ("\n", "../elsewhere/step-0000009\n"):
        (tmp_path / LATEST).write_text(text)
        assert lost_latest_note(tmp_path) is None
