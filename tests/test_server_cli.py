"""`python -m server` as a user runs it: flags, a bad checkpoint, SIGTERM drain."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

import httpx
import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file, save_file
from server_harness import (
    abandon_request,
    english_tokenizer,
    metric_samples,
    random_checkpoint,
    sse_events,
    wait_until,
)
from tokenizers import Tokenizer, decoders

from model.checkpoint import WEIGHTS, CheckpointError, load_model, read_config
from model.kv_cache import KVCache
from server.__main__ import (
    DrainingServer,
    check_before_loading,
    listening_socket,
    setting_source,
)
from server.app import create_app
from server.http11 import uvicorn_config
from server.loading import model_name
from server.sampler import Sampler
from server.settings import Settings
from server.validation import sampling_defaults


def run_server(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60, cwd: Path | None = None
) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("POCKETGPT_")} | (env or {})
    return subprocess.run(
        [sys.executable, "-m", "server", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=cwd,
    )


def run_servers(
    *runs: tuple[tuple[str, ...], dict[str, str] | None],
) -> list[subprocess.CompletedProcess]:
    """run_server of each (args, env) at once: each run mostly imports torch (~2 s on
    one core), one after another the slowest part of these tests."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        return list(pool.map(lambda run: run_server(*run[0], env=run[1]), runs))


def test_help_lists_every_flag_with_its_env_var():
    result = run_server("--help")
    assert result.returncode == 0
    for flag in (
        "--checkpoint",
        "--host",
        "--port",
        "--device",
        "--dtype",
        "--max-batch",
        "--max-queue",
        "--api-key",
    ):
        assert flag in result.stdout
        assert "POCKETGPT_" + flag[2:].upper().replace("-", "_") in result.stdout


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return random_checkpoint(tmp_path_factory.mktemp("ckpt"), english_tokenizer())


def test_no_checkpoint_named_and_none_at_the_default_says_to_train_one(tmp_path):
    result = run_server(cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: checkpoints/default: no such checkpoint folder in {tmp_path} (the default "
        "--checkpoint): train the default model there first (python -m training.pretrain), "
        "or name a checkpoint with --checkpoint"
    ]
    # Named, the same folder is the user's own path: no advice about the default.
    named = run_server("--checkpoint", "checkpoints/default", cwd=tmp_path)
    assert named.stderr.strip().splitlines() == [
        "error: checkpoints/default: no such checkpoint folder"
    ]


def test_bad_checkpoint_from_env_or_flag_exits_2_with_one_line(checkpoint, tmp_path):
    missing = run_server(env={"POCKETGPT_CHECKPOINT": str(tmp_path / "nowhere")})
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'nowhere'}: no such checkpoint folder"
    ]

    truncated = tmp_path / "truncated"
    truncated.mkdir()
    for path in checkpoint.iterdir():
        data = path.read_bytes()
        (truncated / path.name).write_bytes(
            data[: len(data) // 2] if path.name == WEIGHTS else data
        )
    no_tokenizer = tmp_path / "no-tokenizer"
    shutil.copytree(checkpoint, no_tokenizer)
    (no_tokenizer / "tokenizer.json").unlink()
    # A SentencePiece-style decoder (as in many HF Llama folders): its tokens are not
    # byte-level strings, so the server could not stream their text.
    metaspace = tmp_path / "metaspace"
    shutil.copytree(checkpoint, metaspace)
    tokenizer = Tokenizer.from_file(str(metaspace / "tokenizer.json"))
    tokenizer.decoder = decoders.Metaspace()
    tokenizer.save(str(metaspace / "tokenizer.json"))
    results = run_servers(
        *((("--checkpoint", str(folder)), None) for folder in (truncated, no_tokenizer, metaspace))
    )
    assert [result.returncode for result in results] == [2, 2, 2]
    lines = [result.stderr.strip().splitlines() for result in results]
    assert WEIGHTS in lines[0][0] and "truncated" in lines[0][0] and len(lines[0]) == 1
    assert lines[1] == [f"error: {no_tokenizer / 'tokenizer.json'}: missing"]
    (line,) = lines[2]
    assert line.startswith(
        f"error: {metaspace / 'tokenizer.json'}: unsupported tokenizer decoder (Metaspace)"
    )


@pytest.mark.parametrize(
    ("key", "message"),
    [
        # A blank POCKETGPT_API_KEY= line would let a bare `Authorization: Bearer` in.
        (" \n", "must not be empty"),
        # No header can send it: every request would be refused.
        ("abc\x01def", "must not hold a control character"),
        ("abc\x7fdef", "must not hold a control character"),
    ],
    ids=["empty", "control character", "DEL"],
)
def test_an_api_key_no_client_can_send_is_refused(checkpoint, key, message):
    result = run_server("--checkpoint", str(checkpoint), env={"POCKETGPT_API_KEY": key})
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"error: POCKETGPT_API_KEY: {message}"), line


def test_an_api_key_is_taken_as_a_header_can_send_it():
    # Whitespace around it (a key file's newline) is no header's; a tab inside may be.
    settings = Settings(checkpoint="unused", api_key=" k3y\tpart\n")
    assert settings.api_key is not None
    assert settings.api_key.get_secret_value() == "k3y\tpart"
    # A space inside is a header value's too (the first one after `Bearer` parts them).
    spaced = Settings(checkpoint="unused", api_key="two words").api_key
    assert spaced is not None and spaced.get_secret_value() == "two words"


@pytest.mark.parametrize(
    ("name", "least", "below", "message"),
    [
        # Below 1 KiB a request line and its usual headers, or a small body, do not fit.
        ("max_body_bytes", 1024, 1023, "greater than or equal to 1024"),
        ("max_header_bytes", 1024, 1023, "greater than or equal to 1024"),
        # A request given no time at all: every one would be a 408.
        ("request_timeout", 0.001, 0, "greater than 0"),
        ("max_queue", 0, -1, "greater than or equal to 0"),  # 0: never wait
        ("drain_timeout", 0, -1, "greater than or equal to 0"),  # 0: cut off at once
        ("prefill_chunk", 1, 0, "greater than or equal to 1"),
        # No context at all: refused as a setting, before the checkpoint is read.
        ("max_context", 1, 0, "greater than or equal to 1"),
        # No thread to run on, no slot to generate in, no token an event could carry.
        ("threads", 1, 0, "greater than or equal to 1"),
        ("max_batch", 1, 0, "greater than or equal to 1"),
        ("stream_interval", 1, 0, "greater than or equal to 1"),
        ("port", 0, -1, "greater than or equal to 0"),  # 0: the system picks one
    ],
)
def test_a_setting_at_its_least_is_taken_and_one_below_refused(name, least, below, message):
    assert getattr(Settings(checkpoint="unused", **{name: least}), name) == least
    with pytest.raises(ValidationError, match=message):
        Settings(checkpoint="unused", **{name: below})


@pytest.mark.parametrize(
    ("name", "most", "above", "message"),
    [
        # Past it no port exists: refused as a setting, not as a failed bind.
        ("port", 65535, 65536, "less than or equal to 65535"),
        ("stream_interval", 256, 257, "less than or equal to 256"),
        ("max_batch", 1024, 1025, "less than or equal to 1024"),
        ("threads", 1024, 1025, "less than or equal to 1024"),
    ],
)
def test_a_setting_at_its_most_is_taken_and_one_above_refused(name, most, above, message):
    assert getattr(Settings(checkpoint="unused", **{name: most}), name) == most
    with pytest.raises(ValidationError, match=message):
        Settings(checkpoint="unused", **{name: above})


@pytest.mark.parametrize("name", ["request_timeout", "drain_timeout"])
@pytest.mark.parametrize("value", ["inf", "nan"])
def test_a_timeout_is_a_finite_number_of_seconds(name, value):
    # "inf" would never time a request out (nor end a drain); NaN compares false to any
    # deadline.
    with pytest.raises(ValidationError, match="Input should be a finite number"):
        Settings(checkpoint="unused", **{name: value})


def test_a_checkpoint_of_spaces_only_is_refused_as_an_empty_one():
    # POCKETGPT_CHECKPOINT= followed by a stray space names no folder either.
    with pytest.raises(ValidationError, match="must name a checkpoint folder"):
        Settings(checkpoint="  ")


def test_a_bad_setting_is_named_as_the_user_gave_it_flag_or_env_var(checkpoint):
    # Docker users configure by environment: the error must name the variable they set.
    from_env = run_server(
        "--checkpoint", str(checkpoint), env={"POCKETGPT_MAX_BATCH": "0", "POCKETGPT_PORT": "x"}
    )
    assert from_env.returncode == 2
    (line,) = from_env.stderr.strip().splitlines()
    assert line.startswith("error: ")
    assert "POCKETGPT_MAX_BATCH: Input should be greater than or equal to 1" in line
    assert "POCKETGPT_PORT: Input should be a valid integer" in line
    assert "--max-batch" not in line

    # The command line itself: one line too, not argparse's usage block.
    bad_choice = run_server("--checkpoint", str(checkpoint), "--dtype", "int8")
    assert bad_choice.returncode == 2
    (line,) = bad_choice.stderr.strip().splitlines()
    assert line.startswith("error: argument --dtype: invalid choice: 'int8'"), line
    # A flag cut short is no flag (argparse would take it for the one it begins).
    cut_short = run_server("--checkpoint", str(checkpoint), "--max-batc", "3")
    assert cut_short.returncode == 2
    assert cut_short.stderr == "error: unrecognized arguments: --max-batc 3\n"

    # A flag wins over the env var, and is what the message then names.
    from_flag = run_server(
        "--checkpoint", str(checkpoint), "--max-batch", "-3", env={"POCKETGPT_MAX_BATCH": "4"}
    )
    assert from_flag.returncode == 2
    assert from_flag.stderr.strip().splitlines() == [
        "error: --max-batch: Input should be greater than or equal to 1"
    ]
    endless = run_server("--checkpoint", str(checkpoint), "--drain-timeout", "inf")
    assert endless.returncode == 2
    assert endless.stderr.strip() == "error: --drain-timeout: Input should be a finite number"
    # CUDA asked for on a machine without it (hidden here, whatever the machine has).
    no_gpu = {"CUDA_VISIBLE_DEVICES": "", "POCKETGPT_DEVICE": "cuda"}
    cuda = run_server("--checkpoint", str(checkpoint), env=no_gpu)
    assert cuda.returncode == 2
    assert cuda.stderr.strip() == (
        "error: POCKETGPT_DEVICE cuda: CUDA is not available on this machine"
    )


def test_a_thread_count_past_any_machines_cores_is_refused_before_loading(checkpoint):
    # 100,000 (a typo's extra zeros) started that many OpenMP threads as the model loaded
    # and crashed the process with SIGSEGV, no word; past 2**31 a traceback and exit 1.
    for threads in ("100000", str(2**31)):
        result = run_server(
            "--checkpoint", str(checkpoint), "--port", "0", env={"POCKETGPT_THREADS": threads}
        )
        assert result.returncode == 2
        assert result.stderr == (
            "error: POCKETGPT_THREADS: Input should be less than or equal to 1024\n"
        )


def test_a_setting_is_named_by_its_env_var_only_when_the_environment_set_it(monkeypatch):
    for name in [key for key in os.environ if key.upper().startswith("POCKETGPT_")]:
        monkeypatch.delenv(name)
    # A default is named by its flag, the way to change it ("POCKETGPT_PORT 8000:
    # cannot listen" named a variable the user never set).
    assert setting_source("port", {}) == "--port"
    monkeypatch.setenv("POCKETGPT_PORT", "8001")
    assert setting_source("port", {}) == "POCKETGPT_PORT"
    assert setting_source("port", {"port": "8002"}) == "--port"  # the flag wins
    assert setting_source("host", {}) == "--host"
    # Settings reads variables in any case; the one given is named (as the docs spell it).
    monkeypatch.setenv("pocketgpt_host", "x")
    assert setting_source("host", {}) == "POCKETGPT_HOST"


def test_a_busy_port_or_a_host_not_on_this_machine_exits_2_with_one_line(checkpoint):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_server("--checkpoint", str(checkpoint), "--port", str(port))
        # Named as the user set it: env names are read in any case, as pydantic reads them.
        from_env = run_server("--checkpoint", str(checkpoint), env={"pocketgpt_port": str(port)})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: --port {port}: cannot listen on 127.0.0.1:{port} (Address already in use)"
    ]
    assert from_env.returncode == 2
    assert from_env.stderr.strip().splitlines() == [
        f"error: POCKETGPT_PORT {port}: cannot listen on 127.0.0.1:{port} (Address already in use)"
    ]
    # 192.0.2.1 is TEST-NET-1 (RFC 5737): an address no machine here has.
    result = run_server("--checkpoint", str(checkpoint), env={"POCKETGPT_HOST": "192.0.2.1"})
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: POCKETGPT_HOST 192.0.2.1: cannot listen on 192.0.2.1:8000 (")


def server_not_as_root(*args: str) -> subprocess.CompletedProcess[str]:
    """`python -m server ARGS` run to its end, without the environment's settings, as
    `nobody` where the suite runs as root (who may read anything and bind any port): by
    util-linux's setpriv, which execs a Python that lives in root's home (pyenv) where
    subprocess's user= cannot."""
    as_nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    return subprocess.run(
        [*(as_nobody if os.geteuid() == 0 else []), sys.executable, "-m", "server", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={k: v for k, v in os.environ.items() if not k.startswith("POCKETGPT_")},
    )


def test_a_port_this_user_may_not_bind_is_named_as_the_port(tmp_path):
    # A port below the first a user other than root may bind (Linux: 1024 unless set
    # otherwise): the port is what to change, not the host.
    first = int(Path("/proc/sys/net/ipv4/ip_unprivileged_port_start").read_text())
    assert first > 1, "this machine lets any user bind any port"
    port = str(first - 1)
    result = server_not_as_root("--checkpoint", str(tmp_path), "--port", port)
    assert result.returncode == 2
    assert result.stderr == (
        f"error: --port {port}: cannot listen on 127.0.0.1:{port} (Permission denied)\n"
    )


def test_an_ipv6_host_is_listened_on_as_ipv6():
    # As uvicorn binds it: --host ::1 is an IPv6 address, no IPv4 host name.
    for host, family in (("::1", socket.AF_INET6), ("127.0.0.1", socket.AF_INET)):
        settings = Settings(checkpoint="unused", host=host, port=0)
        with listening_socket(settings, {}) as sock:
            assert (sock.family, sock.getsockname()[0]) == (family, host)


def with_context_of(checkpoint: Path, positions: int, folder: Path) -> Path:
    """A copy of `checkpoint` in `folder` whose config.json says `positions` of context."""
    shutil.copytree(checkpoint, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"max_position_embeddings": positions}))
    return folder


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_kv_cache_past_this_machines_memory_exits_2_saying_what_context_fits(
    checkpoint, tmp_path, dtype
):
    # A long-context model at the default --max-batch: the zeroed cache was an exit 137
    # from the kernel's OOM killer, with no word. On a CPU the cache is float32 whatever
    # the weights' dtype: the same 32 TiB for bf16 weights.
    long = with_context_of(checkpoint, 2**24, tmp_path / "long")
    env = {"POCKETGPT_MAX_BATCH": "1024", "POCKETGPT_DTYPE": dtype}
    refused = run_server("--checkpoint", str(long), env=env)
    assert refused.returncode == 2
    (line,) = refused.stderr.strip().splitlines()
    # Not one slot of that context fits: the context is what to lower.
    fits = re.fullmatch(
        r"error: the KV cache for POCKETGPT_MAX_BATCH 1024 x a context of 16,777,216 tokens "
        r"needs 32\.00 TiB \(the weights ([\d.]+) MiB, the sampler's rows, RoPE tables "
        r"and a step's working memory [\d.]+ TiB more\), and at most ([\d,.]+) GiB is "
        r"available: lower "
        r"--max-context to at most ([\d,]+)",
        line,
    )
    assert fits is not None, line
    weights_mib, available_gib, context = (float(g.replace(",", "")) for g in fits.groups())
    # The context named is the most whose cache, RoPE tables and a step's keys and values
    # of one layer, gathered, fit beside the weights and the sampler's rows, and a step's,
    # in what the line says is available (printed to 0.01 GiB: within a few tokens of it).
    config = read_config(long)
    cache_per_token = KVCache.bytes_per_token(config, torch.float32)
    per_context_token = 1024 * (cache_per_token + cache_per_token // config.n_layers)
    per_context_token += 2 * config.head_dim * torch.float32.itemsize  # RoPE's cos and sin
    room = available_gib * 2**30 - weights_mib * 2**20
    per_slot = Sampler.bytes_per_slot(config.vocab_size)
    room -= 1024 * (per_slot + Sampler.step_bytes_per_row(config.vocab_size))
    assert abs(context - room / per_context_token) <= 0.005 * 2**30 / per_context_token + 1

    past = run_server("--checkpoint", str(checkpoint), "--max-context", "1025")
    assert past.returncode == 2
    assert past.stderr.strip() == (
        "error: --max-context 1025: more than the checkpoint's context of 1024 tokens"
    )


def test_a_config_whose_shapes_torch_cannot_size_is_refused_at_start_naming_the_field(
    checkpoint, tmp_path
):
    # A hand-edited size past int64 (alone, or as a tensor's bytes) ended the start-up in
    # a TypeError / RuntimeError traceback from building the model's shapes.
    edits = {"vocab_size": 2**70, "hidden_size": 2**62, "max_position_embeddings": 10**30}
    folders = {}
    for field, value in edits.items():
        folder = shutil.copytree(checkpoint, tmp_path / field)
        config = json.loads((folder / "config.json").read_text())
        config.pop("head_dim")  # so that hidden_size alone is edited
        (folder / "config.json").write_text(json.dumps(config | {field: value}))
        folders[field] = folder
    runs = run_servers(*((("--checkpoint", str(f), "--port", "0"), None) for f in folders.values()))
    for (field, folder), run in zip(folders.items(), runs, strict=True):
        assert run.returncode == 2, run.stderr
        assert run.stderr == (
            f"error: {folder / 'config.json'}: {field} {edits[field]:,}: the model's tensors "
            "would hold more values than torch can size\n"
        )


def test_a_context_no_request_fits_in_is_refused_at_start(checkpoint, tmp_path):
    # A prompt holds a token at least (the end-of-text an empty one starts after) and asks
    # for one more: at a context of 1 the server came up ready and answered every request
    # 400. The --max-context given, or the checkpoint's own (a config.json saying 1: the
    # trainer refuses --block-size 1).
    fits_none = "no request fits (a prompt of at least 1 token and 1 generated need 2)"
    short = with_context_of(checkpoint, 1, tmp_path / "short")
    one, own = run_servers(
        (("--checkpoint", str(checkpoint), "--port", "0", "--max-context", "1"), None),
        (("--checkpoint", str(short), "--port", "0"), None),
    )
    assert one.returncode == 2
    assert one.stderr == f"error: --max-context 1: {fits_none}\n"
    assert own.returncode == 2
    assert own.stderr == f"error: {short}: its context of 1 token: {fits_none}\n"


def test_a_max_context_from_2_to_the_checkpoints_own_is_taken_and_one_more_refused(checkpoint):
    context = read_config(checkpoint).max_seq_len
    for taken in (2, context):
        check_before_loading(Settings(checkpoint=checkpoint, max_context=taken), {})
    with pytest.raises(ValueError) as refused:
        check_before_loading(Settings(checkpoint=checkpoint, max_context=context + 1), {})
    assert str(refused.value) == (
        f"--max-context {context + 1}: more than the checkpoint's context of {context} tokens"
    )


def test_max_context_serves_a_long_context_model_within_it(checkpoint, tmp_path):
    long = with_context_of(checkpoint, 2**24, tmp_path / "long")
    with served(long, "--max-context", "64", "--max-batch", "1024") as (_, url):
        (card,) = httpx.get(f"{url}/v1/models").json()["data"]
        assert card["max_context"] == 64
        prompt = english_tokenizer().encode("The engine").ids
        body = {"prompt": "The engine", "temperature": 0, "ignore_eos": True, "stream": True}
        filling = {"max_tokens": 64 - len(prompt)}
        with httpx.stream("POST", f"{url}/v1/generate", json=body | filling) as response:
            events = [e for e in sse_events(response) if isinstance(e, dict)]
        assert events[-1]["usage"]["total_tokens"] == 64
        one_more = httpx.post(f"{url}/v1/generate", json=body | {"max_tokens": 65 - len(prompt)})
        assert one_more.status_code == 400
        assert "exceeds the served context of 64 tokens" in one_more.json()["error"]["message"]
    # The same tokens as the whole model's greedy decoding (full forwards, no cache).
    model, ids = load_model(checkpoint), list(prompt)
    with torch.no_grad():
        while len(ids) < 64:
            logits = model(torch.tensor([ids]), torch.arange(len(ids))[None])
            ids.append(int(logits[0, -1].argmax()))
    assert [i for e in events for i in e["token_ids"]] == ids[len(prompt) :]


def test_a_model_that_fails_to_load_ends_the_process_with_exit_1(checkpoint, tmp_path):
    # Passes the start-up checks, fails in the loading thread: the process must exit
    # (a restart policy acts only on an exit), not stay up answering 503 for ever. A
    # diverged run's weights would serve text drawn from NaN logits.
    diverged = tmp_path / "diverged"
    shutil.copytree(checkpoint, diverged)
    weights = load_file(diverged / WEIGHTS)
    weights["model.layers.0.mlp.down_proj.weight"][0, 0] = float("nan")
    save_file(weights, diverged / WEIGHTS, metadata={"format": "pt"})
    result = run_server("--checkpoint", str(diverged), "--port", "0")
    assert result.returncode == 1, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last == (
        f"error: failed to load: {diverged}: weight layers.0.mlp.down_proj.weight holds NaN or "
        "infinite values"
    )
    assert "Traceback" not in result.stderr and "ERROR" not in result.stderr, result.stderr


def test_compile_without_a_compiler_exits_2_naming_the_flag_or_env_var(checkpoint, tmp_path):
    no_compilers = {"PATH": str(tmp_path)}  # an empty folder: no g++, c++ or clang++
    result, from_env = run_servers(
        (("--checkpoint", str(checkpoint), "--compile-decode", "true"), no_compilers),
        (("--checkpoint", str(checkpoint)), no_compilers | {"POCKETGPT_COMPILE_DECODE": "1"}),
    )
    assert result.returncode == 2
    missing = "torch.compile on cpu needs a compiler on PATH (g++ / c++ / clang++); none was found"
    assert result.stderr.strip().splitlines() == [f"error: --compile-decode: {missing}"]
    assert from_env.returncode == 2
    assert from_env.stderr.strip().splitlines() == [f"error: POCKETGPT_COMPILE_DECODE: {missing}"]


class ServerProcess:
    """A `python -m server` process, its output read as it comes (a pipe left full would
    stall it) and kept."""

    def __init__(self, command: list[str], preexec_fn: Callable[[], None] | None) -> None:
        pipe = subprocess.PIPE
        self.process = subprocess.Popen(
            command, stdout=pipe, stderr=pipe, text=True, preexec_fn=preexec_fn
        )
        self._stdout: list[str] = []
        self._stderr: list[str] = []
        self._readers = [
            threading.Thread(target=self._keep, args=(pipe, lines))
            for pipe, lines in (
                (self.process.stdout, self._stdout),
                (self.process.stderr, self._stderr),
            )
        ]
        for reader in self._readers:
            reader.start()

    @staticmethod
    def _keep(pipe: IO[str], lines: list[str]) -> None:
        for line in pipe:
            lines.append(line)

    def url(self) -> str | None:
        """Where the server listens, once uvicorn's log line has said so."""
        for line in list(self._stderr):
            if match := re.search(r"Uvicorn running on (http://\S+)", line):
                return match.group(1)
        assert self.process.poll() is None, "".join(self._stderr)
        return None

    def output(self) -> tuple[str, str]:
        """Everything the process wrote to stdout and to stderr, once it has ended."""
        self.process.wait(timeout=30)
        for reader in self._readers:
            reader.join()
        for pipe in (self.process.stdout, self.process.stderr):
            assert pipe is not None
            pipe.close()  # read to its end: closed now, not whenever it is collected
        return "".join(self._stdout), "".join(self._stderr)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.output()


@contextlib.contextmanager
def served(
    checkpoint: Path, *flags: str, preexec_fn: Callable[[], None] | None = None
) -> Iterator[tuple[ServerProcess, str]]:
    """`python -m server` on a port the system picks (no free port to race another
    process for), ready; killed at the end if still running. It logs at info level:
    uvicorn's line says the port."""
    command = [sys.executable, "-m", "server", "--checkpoint", str(checkpoint)]
    command += ["--port", "0", "--log-level", "info", *flags]
    server = ServerProcess(command, preexec_fn)
    try:
        wait_until(lambda: server.url() is not None, 60, "python -m server listening")
        base_url = server.url()
        assert base_url is not None

        def ready() -> bool:
            assert server.process.poll() is None, server.output()[1]
            try:
                return httpx.get(f"{base_url}/health").status_code == 200
            except httpx.TransportError:
                return False

        wait_until(ready, 60, "python -m server ready", interval=0.1)
        yield server, base_url
    finally:
        server.stop()


def test_the_server_raises_its_open_files_limit_to_the_hard_limit(checkpoint):
    # Each connection is a descriptor: at a soft limit of 1,024 (systemd's, many
    # containers'), that many idle connections locked every other client out.
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)

    def low_soft_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))

    with served(checkpoint, preexec_fn=low_soft_limit) as (server, _):
        limits = Path(f"/proc/{server.process.pid}/limits").read_text()
    (line,) = [line for line in limits.splitlines() if line.startswith("Max open files")]
    soft = line.split()[3]
    assert soft == (str(hard) if hard != resource.RLIM_INFINITY else "256"), line


def test_a_server_open_beyond_this_machine_without_a_key_is_warned_of(tmp_path):
    # Bound for an instant only: the missing checkpoint ends it before it serves. Port 0:
    # the system picks one, and the warning names the one picked.
    missing = ["--checkpoint", str(tmp_path / "none"), "--port", "0"]
    result = run_server(*missing, "--host", "0.0.0.0")
    assert result.returncode == 2
    warning, error = result.stderr.strip().splitlines()
    assert re.fullmatch(
        "warning: --host 0.0.0.0 without an API key: anyone who can reach port [1-9][0-9]* "
        r"can generate \(set POCKETGPT_API_KEY\)",
        warning,
    ), warning
    assert error.startswith("error: ")
    keyed = run_server(*missing, "--host", "0.0.0.0", env={"POCKETGPT_API_KEY": "k"})
    local = run_server(*missing)  # 127.0.0.1
    for quiet in (keyed, local):
        assert quiet.returncode == 2 and "warning" not in quiet.stderr


def test_an_empty_host_is_refused_not_bound_to_every_interface(tmp_path):
    # A blank POCKETGPT_HOST= line (a .env file's) bound every interface, as 0.0.0.0
    # does, with the localhost Host check off: the network, where 127.0.0.1 was meant.
    missing = ["--checkpoint", str(tmp_path / "none"), "--port", "0"]
    blank = (
        ("POCKETGPT_HOST", {"POCKETGPT_HOST": ""}),
        ("POCKETGPT_HOST", {"POCKETGPT_HOST": " "}),
    )
    for given, env in (*blank, ("--host", {})):
        result = run_server(*missing, *([] if env else ["--host", ""]), env=env)
        assert result.returncode == 2
        assert result.stderr == f"error: {given}: must name an interface (0.0.0.0 for all)\n"


def test_an_empty_or_unusable_checkpoint_setting_is_refused_by_name(tmp_path):
    # A blank POCKETGPT_CHECKPOINT= line served the working folder, if it held one.
    result = run_server("--port", "0", env={"POCKETGPT_CHECKPOINT": ""})
    assert result.returncode == 2
    assert result.stderr == (
        "error: POCKETGPT_CHECKPOINT: must name a checkpoint folder (unset it for the default)\n"
    )
    # A name past the file system's limit: Python's exists() raises (was a traceback).
    too_long = tmp_path / ("a" * 300)
    result = run_server("--checkpoint", str(too_long), "--port", "0")
    assert result.returncode == 2
    assert result.stderr == f"error: --checkpoint {too_long}: File name too long\n"


def test_the_access_log_leaves_out_answered_probes_but_not_a_request_its_client_left(
    checkpoint,
):
    with served(checkpoint) as (server, url):
        assert httpx.get(f"{url}/metrics?probe=1").status_code == 200
        assert httpx.head(f"{url}/health").status_code == 200  # uptime checkers send HEAD
        assert httpx.get(f"{url}/v1/models").status_code == 200
        assert httpx.post(f"{url}/metrics").status_code == 405
        refused = httpx.get(f"{url}/health", headers={"Host": "attacker.example"})
        assert refused.status_code == 400
        # A JSON request whose client gives up waiting: cancelled, counted as 499.
        abandon_request(url, {"prompt": "Hi", "max_tokens": 1000, "ignore_eos": True})
        gave_up = ("pocketgpt_requests_total", (("status", "499"),))
        cancelled = ("pocketgpt_request_finished_total", (("reason", "cancelled"),))

        def counted() -> bool:
            samples = metric_samples(url)
            return samples.get(gave_up) == 1 and samples[cancelled] == 1

        wait_until(counted, 60, "the 499 counted and the generation cancelled")
        server.process.send_signal(signal.SIGTERM)
        log, errors = server.output()
    lines = log.splitlines()
    assert any('"GET /v1/models HTTP/1.1" 200' in line for line in lines), log
    assert any('"POST /metrics HTTP/1.1" 405' in line for line in lines), log  # an error
    assert any('"GET /health HTTP/1.1" 400' in line for line in lines), log  # a probe's too
    # uvicorn sends and logs nothing once the client has gone: the 499 is logged alike.
    assert any('"POST /v1/generate HTTP/1.1" 499' in line for line in lines), log
    # Its cancelled generation leaves no asyncio error behind (an unread gather's).
    assert "Traceback" not in errors and "never retrieved" not in errors, errors
    # served() polled /health until ready: none of its 200s is logged either (a 503 while
    # the model loaded may be: an error).
    probes = ('GET /health HTTP/1.1" 200', 'GET /metrics?probe=1 HTTP/1.1" 200')
    probes += ('HEAD /health HTTP/1.1" 200',)
    assert not any(probe in line for probe in probes for line in lines), log


def test_at_log_level_debug_the_access_log_keeps_the_probes_too(checkpoint):
    # --log-level debug is for seeing everything: a health check's 200 included.
    with served(checkpoint, "--log-level", "debug") as (server, url):
        assert httpx.get(f"{url}/metrics").status_code == 200
        server.process.send_signal(signal.SIGTERM)
        log, _ = server.output()
    lines = log.splitlines()
    for probe in ('"GET /health HTTP/1.1" 200', '"GET /metrics HTTP/1.1" 200'):
        assert any(probe in line for line in lines), log


def test_generation_config_defaults_sample_unless_do_sample_is_false(tmp_path):
    # Left out, do_sample leaves the file's temperature and top_p to sample with (vLLM's
    # reading; the trainer writes no do_sample): only false means greedy.
    path = tmp_path / "generation_config.json"
    given = {"temperature": 0.6, "top_p": 0.9, "min_p": 0.1, "max_new_tokens": 7}
    path.write_text(json.dumps(given))
    assert sampling_defaults(tmp_path) == {
        "temperature": 0.6,
        "top_p": 0.9,
        "min_p": 0.1,
        "max_tokens": 7,
    }
    path.write_text(json.dumps({"do_sample": False, **given}))
    assert sampling_defaults(tmp_path) == {"temperature": 0.0, "max_tokens": 7}
    path.write_text(json.dumps({"min_p": 1.5}))
    with pytest.raises(CheckpointError, match="min_p: Input should be less than or equal to 1"):
        sampling_defaults(tmp_path)
    # Neither true nor false: refused, not read as "not false" (sampling).
    for value in ("no", 0, "false"):
        path.write_text(json.dumps({"do_sample": value, **given}))
        with pytest.raises(CheckpointError) as refused:
            sampling_defaults(tmp_path)
        assert str(refused.value) == (f"{path}: do_sample: must be true or false, got {value!r}")


def test_a_generation_config_field_given_as_null_gives_no_default(tmp_path):
    # HF writes a field it leaves unset as null (GenerationConfig.to_dict): no default
    # then, as if left out, not a None a request's sampling would be built with.
    path = tmp_path / "generation_config.json"
    path.write_text(json.dumps({"temperature": None, "top_k": None, "top_p": 0.9}))
    assert sampling_defaults(tmp_path) == {"top_p": 0.9}


def test_the_checkpoint_generation_config_gives_the_sampling_defaults(checkpoint, tmp_path):
    config = json.loads((checkpoint / "generation_config.json").read_text(encoding="utf-8"))
    bad_values = ({"temperature": 500}, {"max_new_tokens": 0}, {"eos_token_id": [0, 10**6]})
    config_paths = []
    for number, bad in enumerate(bad_values):
        folder = shutil.copytree(checkpoint, tmp_path / f"bad-{number}")
        config_paths.append(folder / "generation_config.json")
        config_paths[-1].write_text(json.dumps(config | bad), encoding="utf-8")
    refused = run_servers(*((("--checkpoint", str(path.parent)), None) for path in config_paths))
    assert [result.returncode for result in refused] == [2, 2, 2]
    lines = [result.stderr.strip().splitlines() for result in refused]
    assert lines[0] == [
        f"error: {config_paths[0]}: temperature: Input should be less than or equal to 100, "
        "as in a request"
    ]
    assert lines[1] == [
        f"error: {config_paths[1]}: max_new_tokens: Input should be greater than or equal to "
        "1, as in a request"
    ]
    (line,) = lines[2]
    assert line.startswith(
        f"error: {config_paths[2]}: eos_token_id [0, 1000000] is not one or more token ids below "
    )

    folder = shutil.copytree(checkpoint, tmp_path / "greedy")
    config_path = folder / "generation_config.json"

    # HF's generate draws greedily from a folder whose config says so, with its repetition
    # penalty; so does the server for a request that leaves them out, whatever its seed.
    penalised = {"do_sample": False, "repetition_penalty": 50, "max_new_tokens": 5}
    config_path.write_text(json.dumps(config | penalised), encoding="utf-8")
    body = {"prompt": "Once upon a time", "max_tokens": 16, "ignore_eos": True}
    with served(folder) as (_, url):

        def text(**extra: object) -> str:
            return httpx.post(f"{url}/v1/generate", json=body | extra, timeout=60).json()["text"]

        greedy = text(temperature=0, repetition_penalty=50)
        assert text(seed=1) == text(seed=2) == text(temperature=0) == greedy
        assert text(temperature=0, repetition_penalty=1.0) != greedy
        assert text(seed=1, temperature=1.0) != greedy
        left_out = httpx.post(f"{url}/v1/generate", json={"prompt": "Once", "ignore_eos": True})
        assert left_out.json()["usage"]["completion_tokens"] == 5


def test_a_switch_given_alone_turns_on(checkpoint):
    with served(checkpoint, "--api-key", "k3y", "--metrics-open") as (_, url):
        assert httpx.get(f"{url}/metrics").status_code == 200
        assert httpx.get(f"{url}/v1/models").status_code == 401
    refused = run_server("--metrics-open", "sometimes", "--checkpoint", str(checkpoint))
    assert refused.returncode == 2
    assert refused.stderr.startswith("error: --metrics-open: "), refused.stderr


class StreamReader(threading.Thread):
    """A streaming request read on its own thread, keeping every event."""

    def __init__(
        self,
        base_url: str,
        max_tokens: int,
        path: str = "/v1/generate",
        prompt: str | list[str] = "drain",
    ) -> None:
        super().__init__()
        self.url, self.max_tokens, self.prompt = base_url + path, max_tokens, prompt
        self.events: list[dict | str] = []
        self.opened = threading.Event()  # the 200 and its headers arrived: submitted
        self.first = threading.Event()  # the first event arrived
        self.start()

    def run(self) -> None:
        body = {"prompt": self.prompt, "max_tokens": self.max_tokens, "ignore_eos": True}
        with httpx.stream("POST", self.url, json=body | {"stream": True}, timeout=60) as r:
            self.opened.set()
            for event in sse_events(r):
                self.events.append(event)
                self.first.set()


def test_sigterm_stops_admitting_finishes_running_streams_and_exits_0(checkpoint):
    with served(checkpoint) as (server, base_url):
        reader = StreamReader(base_url, 300)
        assert reader.first.wait(60)
        server.process.send_signal(signal.SIGTERM)
        wait_until(lambda: httpx.get(f"{base_url}/health").status_code == 503, 60, "health 503")
        refused = httpx.post(f"{base_url}/v1/generate", json={"prompt": "late"})
        assert refused.status_code == 503
        assert refused.json()["error"]["type"] == "unavailable"
        draining = ("pocketgpt_server_state", (("pocketgpt_server_state", "draining"),))
        assert metric_samples(base_url)[draining] == 1
        reader.join(60)
        assert server.process.wait(timeout=30) == 0
        log = server.output()[1]
    # Where it listens, and what it serves.
    assert f"Uvicorn running on {base_url} (Press CTRL+C to quit)" in log
    assert f"serving {checkpoint} as '{checkpoint.parent.name}': " in log
    assert ", cpu, float32, max-batch 32, sampling defaults from " in log
    assert "generation_config.json: temperature 0.8, top_p 0.95; ready in " in log
    events = reader.events
    assert events[-1] == "[DONE]"
    assert events[-2]["finish_reason"] == "length"
    assert events[-2]["usage"]["completion_tokens"] == 300


@contextlib.contextmanager
def partial_upload(base_url: str) -> Iterator[socket.socket]:
    """A connection that sent a /v1/generate head and 9 of the 36 body bytes it declares."""
    port = int(base_url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        head = b"POST /v1/generate HTTP/1.1\r\nHost: localhost\r\n"
        head += b"Content-Type: application/json\r\nContent-Length: 36\r\n\r\n"
        sock.sendall(head + b'{"prompt"')
        yield sock


def read_until_closed(sock: socket.socket) -> bytes:
    answer = b""
    while chunk := sock.recv(65536):
        answer += chunk
    return answer


def test_a_request_still_sending_its_body_at_shutdown_gets_a_503_envelope(checkpoint):
    with served(checkpoint) as (server, base_url):
        with partial_upload(base_url) as uploading:
            # Served after the upload's bytes, which arrived first, were read.
            assert httpx.get(f"{base_url}/health").status_code == 200
            server.process.send_signal(signal.SIGTERM)
            answer = read_until_closed(uploading)
        assert server.process.wait(timeout=30) == 0
        log = server.output()[1]
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503 "), answer
    assert json.loads(body) == {
        "error": {"type": "unavailable", "message": "the server is shutting down"}
    }
    # Not uvicorn's cancel at its graceful timeout, 5 s on.
    assert "Cancel" not in log and "Traceback" not in log, log


def test_a_shutdown_right_after_a_408_exits_cleanly(checkpoint):
    with served(checkpoint, "--request-timeout", "0.5") as (server, base_url):
        with partial_upload(base_url) as stalled:
            answer = read_until_closed(stalled)  # the 408, then the server's FIN
            assert answer.startswith(b"HTTP/1.1 408 "), answer
            # The connection still lingers (reading what the client might yet send):
            # shutting down now must neither answer it twice nor wait on it.
            server.process.send_signal(signal.SIGTERM)
            assert server.process.wait(timeout=30) == 0
        log = server.output()[1]
    assert "Traceback" not in log, log


def test_past_the_drain_timeout_every_unfinished_stream_ends_with_an_error_event(checkpoint):
    # One slot, eight streams of 1,000 tokens: far more work than the 0.5 s drain allows.
    shut_down = {"error": {"type": "unavailable", "message": "the server shut down"}}
    with served(checkpoint, "--max-batch", "1", "--drain-timeout", "0.5") as (server, url):
        readers = [StreamReader(url, 1000) for _ in range(8)]
        assert all(reader.opened.wait(60) for reader in readers)  # all submitted
        server.process.send_signal(signal.SIGTERM)
        for reader in readers:
            reader.join(60)
        assert server.process.wait(timeout=30) == 0
        log = server.output()[1]
    assert "drain timeout: " in log and " requests cut off" in log, log
    # Each stream either finished within the drain or was ended by the error event:
    # none is cut off mid-body.
    endings = [reader.events[-1] if reader.events else None for reader in readers]
    assert all(end in ("[DONE]", shut_down) for end in endings), endings
    assert shut_down in endings


def test_a_second_signal_ends_every_unfinished_request_at_once_as_the_timeout_would(checkpoint):
    # One slot and a drain timeout far longer than the test: only the second signal can
    # end eight 1,000-token streams and a JSON request queued behind them.
    shut_down = {"error": {"type": "unavailable", "message": "the server shut down"}}
    with served(checkpoint, "--max-batch", "1", "--drain-timeout", "600") as (server, url):
        readers = [StreamReader(url, 1000) for _ in range(8)]
        assert all(reader.opened.wait(60) for reader in readers)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            body = {"prompt": "wait", "max_tokens": 1000, "ignore_eos": True}
            waiting = pool.submit(httpx.post, f"{url}/v1/generate", json=body, timeout=60)

            def all_nine_submitted() -> bool:
                return "pocketgpt_requests_waiting 8.0" in httpx.get(f"{url}/metrics").text

            wait_until(all_nine_submitted, 60, "one request running, eight waiting")
            server.process.send_signal(signal.SIGTERM)
            wait_until(lambda: httpx.get(f"{url}/health").status_code == 503, 60, "health 503")
            state = ("pocketgpt_server_state", (("pocketgpt_server_state", "draining"),))
            assert metric_samples(url)[state] == 1
            server.process.send_signal(signal.SIGTERM)
            assert server.process.wait(timeout=30) == 0
            cut_off = waiting.result()
        for reader in readers:
            reader.join(60)
        log = server.output()[1]
    assert cut_off.status_code == 503 and cut_off.json() == shut_down
    endings = [reader.events[-1] if reader.events else None for reader in readers]
    assert endings.count(shut_down) == 8, endings
    # Said at the first signal, before anything ends.
    assert "draining on SIGTERM: 9 requests unfinished, new ones refused (503); they " in log
    assert log.index("draining on SIGTERM") < log.index("second signal: 9 requests cut off")
    assert "Traceback" not in log, log


def test_a_completions_stream_cut_off_at_shutdown_ends_with_the_error_event(checkpoint):
    shut_down = {"error": {"type": "unavailable", "message": "the server shut down"}}
    with served(checkpoint, "--max-batch", "1", "--drain-timeout", "600") as (server, url):
        # Two choices of 1,000 tokens on one slot: one runs, one waits.
        reader = StreamReader(url, 1000, "/v1/completions", ["one", "two"])
        assert reader.first.wait(60)
        server.process.send_signal(signal.SIGTERM)
        wait_until(lambda: httpx.get(f"{url}/health").status_code == 503, 60, "health 503")
        late = httpx.post(f"{url}/v1/completions", json={"prompt": "late"})
        assert late.status_code == 503 and late.json()["error"]["type"] == "unavailable"
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=30) == 0
        reader.join(60)
        log = server.output()[1]
    *chunks, last = reader.events
    assert last == shut_down
    assert chunks and all(chunk["object"] == "text_completion" for chunk in chunks)
    assert "second signal: 2 requests cut off" in log, log


@contextlib.contextmanager
def draining_server(settings: Settings) -> Iterator[tuple[DrainingServer, int]]:
    """`python -m server`'s DrainingServer in a thread, on a loopback port whose
    connections have a 4 KB send buffer (inherited from the listening socket: a client
    that stops reading holds a response up at once, as a slow network would); yields it
    and its port once ready. SIGTERM is `handle_exit` (a thread gets no signals)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    app = create_app(settings)
    server = DrainingServer(uvicorn_config(app, settings), app, settings.drain_timeout)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        wait_until(lambda: app.state.status == "ready", 60, "server ready")
        yield server, port
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
        assert not thread.is_alive(), "the server did not stop within 30 s"


def unread_stream(port: int) -> socket.socket:
    """A connection that asks for a 1,000-token stream and reads nothing of it yet."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(60)  # a regression fails the test instead of hanging the suite
    sock.connect(("127.0.0.1", port))
    body = json.dumps({"prompt": "slow", "max_tokens": 1000, "ignore_eos": True, "stream": True})
    head = "POST /v1/generate HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
    sock.sendall(f"{head}Content-Length: {len(body)}\r\n\r\n{body}".encode())
    return sock


def generated(port: int) -> bool:
    """Whether the server has finished generating one request (by its length)."""
    finished = ("pocketgpt_request_finished_total", (("reason", "length"),))
    return metric_samples(f"http://127.0.0.1:{port}").get(finished) == 1


def test_a_drain_waits_for_a_slow_reader_and_cuts_off_one_that_stopped_reading(checkpoint, capfd):
    # Generated is not sent: uvicorn's shutdown began once the engine was idle and cut a
    # stream still being written after 5 s, mid-body, whatever --drain-timeout said.
    settings = Settings(checkpoint=str(checkpoint), drain_timeout=30)
    with draining_server(settings) as (server, port), unread_stream(port) as slow:
        wait_until(lambda: generated(port), 60, "all 1,000 tokens generated")
        server.handle_exit(signal.SIGTERM, None)
        # Five of uvicorn's ticks: it would have begun its own shutdown at the first.
        with pytest.raises(AssertionError, match="timed out"):
            wait_until(lambda: server.should_exit, 0.5, "the server's shutdown")
        answer = read_until_closed(slow)  # read only now: 30 s to do it in
        assert answer.endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n"), answer[-200:]  # chunked
        assert answer.count(b"data: ") == 1000 + 1  # a token each, then [DONE]
    assert "Traceback" not in capfd.readouterr().err
    # One that never reads is disconnected at the deadline, not waited for.
    settings = Settings(checkpoint=str(checkpoint), drain_timeout=0.5)
    with draining_server(settings) as (server, port), unread_stream(port) as stalled:
        wait_until(lambda: generated(port), 60, "all 1,000 tokens generated")
        server.handle_exit(signal.SIGTERM, None)
        wait_until(lambda: server.should_exit, 30, "the drain ended")
        cut_off = read_until_closed(stalled)  # what the kernel had of it, then the end
        assert cut_off.startswith(b"HTTP/1.1 200 ") and not cut_off.endswith(b"0\r\n\r\n")
    err = capfd.readouterr().err
    assert "drain timeout: 1 responses cut off unsent (their clients did not read them)" in err
    assert "Traceback" not in err and "Cancel" not in err


def test_a_server_stopped_while_its_model_loads_exits_at_once_and_cleanly(checkpoint):
    # The load went on to its end (here: compiling the decode step) before the
    # process could exit, and a teardown under the still-running load aborted it
    # ("terminate called without an active exception", exit 134).
    command = [sys.executable, "-m", "server", "--checkpoint", str(checkpoint)]
    command += ["--port", "0", "--log-level", "info", "--compile-decode", "true"]
    server = ServerProcess(command, None)
    try:
        wait_until(lambda: server.url() is not None, 60, "python -m server listening")
        loading = httpx.get(f"{server.url()}/health", timeout=30)
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=30) == 0
        log = server.output()[1]
    finally:
        server.stop()
    assert loading.status_code == 503 and "loading" in loading.json()["error"]["message"]
    assert "terminate called" not in log and "ready in" not in log, log


def test_a_model_name_is_taken_without_the_whitespace_around_it_and_a_blank_one_refused(
    tmp_path,
):
    # `POCKETGPT_MODEL_NAME=notes ` (a .env line's trailing space) reported the id
    # "notes ": every request naming "notes" was refused, and GET /v1/models/notes 404.
    assert Settings(checkpoint="unused", model_name=" notes \n").model_name == "notes"
    # A blank line named no model while seeming to: refused, as for the other names.
    missing = ["--checkpoint", str(tmp_path / "none"), "--port", "0"]
    for given, args, env in (
        ("POCKETGPT_MODEL_NAME", [], {"POCKETGPT_MODEL_NAME": " "}),
        ("--model-name", ["--model-name", ""], {}),
    ):
        result = run_server(*missing, *args, env=env)
        assert result.returncode == 2
        assert result.stderr == (
            f"error: {given}: must name a model (unset it for the checkpoint's folder name)\n"
        )


def test_the_model_id_is_the_name_given_else_the_served_folders_own(
    checkpoint, tmp_path, monkeypatch
):
    run = checkpoint.parent  # random_checkpoint's root: the run folder, `latest` in it
    assert model_name(Settings(checkpoint=checkpoint, model_name="notes")) == "notes"
    assert model_name(Settings(checkpoint=checkpoint)) == run.name
    assert model_name(Settings(checkpoint=run)) == run.name
    # A model folder outside any run (copied, or downloaded) is named itself.
    alone = tmp_path / "alone"
    shutil.copytree(checkpoint, alone)
    assert model_name(Settings(checkpoint=alone)) == "alone"
    # Given relative to the working folder (`--checkpoint .`): the folder it names.
    monkeypatch.chdir(alone)
    assert model_name(Settings(checkpoint=".")) == "alone"
    monkeypatch.chdir(checkpoint)
    assert model_name(Settings(checkpoint=".")) == run.name
    # A run folder is named itself, even kept in a folder that holds a `latest` too.
    (tmp_path / "latest").write_text("alone\n")
    nested = tmp_path / "notes"
    shutil.copytree(run, nested)
    assert model_name(Settings(checkpoint=nested)) == "notes"


def test_a_checkpoint_file_this_user_may_not_read_is_named_as_other_commands_name_it(
    checkpoint,
):
    # Was "error: [Errno 13] Permission denied: '…/model.safetensors'", where the
    # trainer and evaluator say "error: <file>: Permission denied".
    with contextlib.ExitStack() as stack:
        root = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        root.chmod(0o755)
        folder = root / "ckpt"
        shutil.copytree(checkpoint, folder)
        folder.chmod(0o755)
        for path in folder.iterdir():
            path.chmod(0o644)
        (folder / WEIGHTS).chmod(0)
        result = server_not_as_root("--checkpoint", str(folder), "--port", "0")
    assert result.returncode == 2
    assert result.stderr == f"error: {folder / WEIGHTS}: Permission denied\n"
