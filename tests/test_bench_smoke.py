"""Each benchmark command runs end to end on the tiny model and prints its result line.

Numbers are not checked here (benchmarks are not timed tests); the format and the
ratio are, so a broken benchmark is caught before someone needs it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from server_harness import wait_until
from tokenizers import Tokenizer
from torch.optim.optimizer import register_optimizer_step_post_hook

from bench.cli import exit_on_signals
from bench.decode import ours
from bench.reference import STOP_REFERENCE, hf_generate, hf_model, plain_train_steps
from bench.serve import request_body
from bench.train import plain_tokens_per_s
from model.checkpoint import save_checkpoint
from model.config import ModelConfig
from model.transformer import Transformer
from server.protocol import GenerateRequest
from server.validation import DEFAULTED_FIELDS

RATIO = r"= (\d+\.\d+)x"


@contextlib.contextmanager
def python_module(*args: str, env: dict[str, str] | None = None) -> Iterator[subprocess.Popen]:
    """`python -m <args>` in a process group of its own, killed whole at the end however
    the test ends: a benchmark's server or trainer too (a timeout's SIGKILL would skip
    the benchmark's own clean-up and leave them running). `env`: added to this one's."""
    process = subprocess.Popen(
        [sys.executable, "-m", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env=os.environ | (env or {}),
    )
    try:
        yield process
    finally:
        with contextlib.suppress(ProcessLookupError):  # the group has ended: none left
            os.killpg(process.pid, signal.SIGKILL)
        process.communicate()


def run_module(
    *args: str, timeout: float = 300, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    with python_module(*args, env=env) as process:
        stdout, stderr = process.communicate(timeout=timeout)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def run_modules(
    commands: Iterable[Sequence[str]], timeout: float = 120
) -> list[subprocess.CompletedProcess]:
    """run_module of each command, several at once: each mostly imports torch (~2 s),
    one after another the slowest part of the suite."""
    with ThreadPoolExecutor(max_workers=4) as pool:
        return list(pool.map(lambda command: run_module(*command, timeout=timeout), commands))


def run_bench(*args: str) -> str:
    result = run_module(*args)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def test_decode_benchmark_prints_a_ratio_per_batch_size_and_round(tiny_checkpoint: Path) -> None:
    out = run_bench(
        "bench.decode", "--checkpoint", str(tiny_checkpoint), "--batch-sizes", "1,2",
        "--dtype", "bfloat16", "--hf-dtype", "float32", "--rounds", "2",
    )  # fmt: skip
    rounds = [line for line in out.splitlines() if "HF generate" in line]
    assert [line.split()[2] for line in rounds] == ["1", "1", "2", "2"]
    ratios = [float(re.search(RATIO, line).group(1)) for line in rounds]
    assert all(ratio > 0 for ratio in ratios)
    assert all("bfloat16" in line and "HF generate (float32)" in line for line in rounds)
    medians = [line for line in out.splitlines() if "median ratio" in line]
    for batch, line in zip((1, 2), medians, strict=True):
        assert line.startswith(f"decode batch {batch:>3}: median ratio")
        pair = ratios[2 * batch - 2 : 2 * batch]
        median = float(re.search(r"median ratio (\d+\.\d+)x", line).group(1))
        assert abs(median - sum(pair) / 2) <= 0.01  # the printed ratios are rounded


def test_the_raw_engine_takes_prompts_of_their_own_lengths(tiny_checkpoint: Path) -> None:
    # bench.serve's raw engine gets the server's prompts as they are: padded to the
    # longest, it prefilled more tokens than the HTTP side and read the overhead low.
    run = ours(tiny_checkpoint, [[5, 6, 7, 8, 9, 10, 11], [5]], "cpu", "float32")
    assert run["tokens_per_s"] > 0 and run["ms_per_step"] > 0


def test_a_checkpoints_generation_settings_change_neither_side(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    # Carried from a model it was fine-tuned from, such settings would make the server
    # (for what a request leaves out) and HF's generate (for what it is not given) do
    # sampling work the raw engine does not.
    folder = shutil.copytree(tiny_checkpoint, tmp_path / "carried")
    path = folder / "generation_config.json"
    config = json.loads(path.read_text()) if path.is_file() else {}
    carried = {"repetition_penalty": 1.3, "top_k": 5, "min_p": 0.2, "no_repeat_ngram_size": 2}
    path.write_text(json.dumps(config | carried))
    body = request_body(3)
    assert set(DEFAULTED_FIELDS.values()) <= body.keys(), body
    request = GenerateRequest.model_validate(body)
    assert (request.top_k, request.min_p, request.repetition_penalty) == (0, 0.0, 1.0)
    model = hf_model(folder, torch.float32)
    settings = model.generation_config
    assert all(getattr(settings, key) != value for key, value in carried.items()), settings
    assert settings.eos_token_id == config.get("eos_token_id", settings.eos_token_id)


def test_serve_benchmark_reports_no_errors_per_round_and_the_median(tiny_checkpoint: Path) -> None:
    out = run_bench(
        "bench.serve",
        "--checkpoint",
        str(tiny_checkpoint),
        "--clients",
        "3",
        "--rounds",
        "2",
        "--max-batch",
        "2",  # fewer slots than clients: one request waits for a slot
        "--stream-interval",
        "2",  # the bench counts tokens per event, not events
    )
    rounds = [line for line in out.splitlines() if "tok/s over HTTP+SSE" in line]
    assert len(rounds) == 2, out
    for line in rounds:
        assert line.startswith("serve    3 clients") and "errors 0;" in line, line
        assert "max-batch 2, stream-interval 2)" in line, line
        assert re.search(r"the clients used \d+\.\d\d cores$", line), line
        # Inter-token latency as a client sees it: at 2 tokens per event, every event's
        # second token arrives with its first (a gap of 0), the first after the wait.
        itl = re.search(r"ITL p50 (\d+\.\d) ms p99 (\d+\.\d) ms", line)
        assert itl is not None and float(itl.group(1)) == 0.0 < float(itl.group(2)), line
    overheads = [int(re.search(r"overhead (-?\d+)%", line).group(1)) for line in rounds]
    # Each round also runs HF generate on the same prompts as one static batch.
    vs_hf = [
        float(
            re.search(
                r"HF generate static batch \(float32\) [\d,]+ tok/s = (\d+\.\d\d)x", line
            ).group(1)
        )
        for line in rounds
    ]
    assert all(ratio > 0 for ratio in vs_hf), rounds
    (median,) = [line for line in out.splitlines() if "median overhead" in line]
    low, high = sorted(overheads)
    printed = int(re.search(r"median overhead (-?\d+)%", median).group(1))
    assert low - 1 <= printed <= high + 1, (median, overheads)  # the printed ones are rounded
    printed_vs_hf = float(re.search(r"median vs HF static batch (\d+\.\d\d)x", median).group(1))
    assert abs(printed_vs_hf - sum(vs_hf) / 2) <= 0.01, (median, vs_hf)


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_the_plain_loop_multiplies_fp32_as_the_trainer_does(
    device: str, tiny_config: ModelConfig
) -> None:
    # The trainer turns TF32 on for its process on CUDA (training/trainer.py); a plain
    # "float32" loop without it compared TF32 products with full fp32 ones.
    before = torch.get_float32_matmul_precision()
    model = Transformer(tiny_config)
    seen: list[str] = []
    model.register_forward_hook(lambda *_: seen.append(torch.get_float32_matmul_precision()))
    x = torch.randint(0, tiny_config.vocab_size, (2, 16))
    assert plain_train_steps(model, [(x, x)], device=torch.device(device)) > 0
    assert set(seen) == {"high" if device == "cuda" else before}, seen
    assert torch.get_float32_matmul_precision() == before


# The compiled path has its own test (test_training_pretrain).
TINY_TRAINING = ["--preset", "tiny", "--block-size", "32", "--batch-size", "4"]
TINY_TRAINING += ["--vocab-size", "300", "--no-compile"]


def test_train_benchmark_compares_against_the_plain_loop(tmp_path: Path) -> None:
    text = tmp_path / "text.txt"
    sentences = [f"Line {i}: the quick brown fox jumps over the lazy dog." for i in range(3000)]
    text.write_text("\n".join(sentences))
    out = run_bench(
        "bench.train", "--data", str(text), "--steps", "4", "--skip-quality", "--rounds", "2",
        "--", *TINY_TRAINING, "--dtype", "bfloat16", "--optimizer", "adamw",
    )  # fmt: skip
    rounds = [line for line in out.splitlines() if line.startswith("train throughput (")]
    assert len(rounds) == 2, out
    ratios = [float(re.search(RATIO, line).group(1)) for line in rounds]
    assert all(ratio > 0 for ratio in ratios)
    for line in rounds:
        # The mode the run resolved to, read back from it; a bf16 run is also compared
        # with the plain loop under the same autocast.
        assert "pocketgpt (eager, bfloat16, adamw)" in line
        assert re.search(
            r"plain loop \(float32\) .*; plain loop \(bfloat16\) [\d,]+ tok/s = \d+\.\d\dx$", line
        )
    (median,) = [line for line in out.splitlines() if line.startswith("train throughput: median")]
    printed = float(re.search(r"median (\d+\.\d\d)x", median).group(1))
    assert abs(printed - sum(ratios) / 2) <= 0.01, (median, ratios)


def test_train_benchmark_scores_the_held_out_text_on_the_device_it_trained_on(
    tmp_path: Path,
) -> None:
    text = tmp_path / "text.txt"
    text.write_text("\n".join(f"Line {i}: the quick brown fox." for i in range(3000)))
    # Both runs end by their 4 steps (--max-steps, after `--`, goes to both): the time
    # box, which the throughput run must not reach first, is never the limit, however
    # slow the machine (at 4 s a step, --max-time 3 ended it at step 2 of 4).
    out = run_bench(
        "bench.train", "--data", str(text), "--steps", "4", "--max-time", "300",
        "--device", "cpu", "--", *TINY_TRAINING, "--max-steps", "4",
    )  # fmt: skip
    (line,) = [line for line in out.splitlines() if line.startswith("train quality: ")]
    assert re.match(r"train quality: \d+\.\d{3} bits/byte on the held-out last 10%", line)


def test_a_throughput_run_that_stops_short_says_at_which_step_and_why(tmp_path: Path) -> None:
    text = tmp_path / "text.txt"
    text.write_text("\n".join(f"Line {i}: the quick brown fox." for i in range(3000)))
    command = ["bench.train", "--data", str(text), "--steps", "8", "--skip-quality", "--"]
    command += [*TINY_TRAINING, "--max-steps", "5"]
    result = run_module(*command)
    assert result.returncode == 1, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last == (
        "error: the throughput run stopped at step 5 of --steps 8: it stopped by max_steps "
        "(see the arguments after --)"
    ), result.stderr


def test_the_environments_trainer_settings_do_not_reach_the_benchmarks_runs(
    tmp_path: Path,
) -> None:
    # Left set for other work, they changed what the runs measure, or failed them.
    text = tmp_path / "text.txt"
    text.write_text("\n".join(f"Line {i}: the quick brown fox." for i in range(3000)))
    command = ["bench.train", "--data", str(text), "--steps", "4", "--skip-quality", "--"]
    env = {"POCKETGPT_INIT_FROM": str(tmp_path / "base"), "pocketgpt_max_steps": "2"}
    result = run_module(*command, *TINY_TRAINING, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "train throughput (" in result.stdout, result.stdout


def test_ctrl_c_stops_a_benchmark_and_its_trainer_without_a_traceback(tmp_path: Path) -> None:
    text = tmp_path / "text.txt"
    text.write_text("\n".join(f"Line {i}: the quick brown fox." for i in range(3000)))
    command = ["bench.train", "--data", str(text), "--steps", "100000", "--max-time", "300"]
    command += ["--skip-quality", "--", *TINY_TRAINING]
    with python_module(*command) as bench:
        for line in bench.stdout:  # the trainer's own output: it is running
            if line.startswith("model: "):
                break
        bench.send_signal(signal.SIGINT)
        _, stderr = bench.communicate(timeout=60)
        # The trainer ended with it: nothing is left in the benchmark's process group.
        with pytest.raises(ProcessLookupError):
            os.killpg(bench.pid, 0)
    assert bench.returncode == 128 + signal.SIGINT, stderr
    assert "Traceback" not in stderr, stderr


def children(pid: int) -> list[int]:
    """The processes `pid` started (any of its threads) that are running."""
    listed = (task / "children" for task in Path(f"/proc/{pid}/task").iterdir())
    return [int(child) for path in listed for child in path.read_text().split()]


def ended(pid: int) -> bool:
    """Whether process `pid` is gone, or a zombie its new parent has yet to reap."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_a_benchmark_killed_outright_takes_its_server_with_it(tiny_checkpoint: Path) -> None:
    # SIGKILL runs no `finally`: the server it started served on, orphaned.
    command = ["bench.serve", "--checkpoint", str(tiny_checkpoint), "--clients", "1"]
    with python_module(*command, "--rounds", "1000") as bench:
        wait_until(lambda: children(bench.pid), 60, "the benchmark's server started")
        [server] = children(bench.pid)
        bench.kill()
        bench.wait()
        wait_until(lambda: ended(server), 30, "the server ended with its benchmark")


def test_a_signal_stops_a_running_hf_reference_at_its_next_token(tiny_checkpoint: Path) -> None:
    # It runs on a thread the benchmark waits for: a Ctrl-C or SIGTERM waited for the
    # whole reference run (its server left serving meanwhile).
    generating = threading.Event()

    def note_generating(module: torch.nn.Module, inputs: tuple) -> None:
        if type(module).__name__ == "LlamaForCausalLM":
            generating.set()

    results: list[float] = []
    reference = threading.Thread(
        target=lambda: results.append(
            hf_generate(
                tiny_checkpoint,
                torch.randint(0, 256, (1, 8)),
                64,
                temperature=0.8,
                top_p=0.95,
                device=torch.device("cpu"),
                dtype=torch.float32,
                repeats=10**6,  # hours, unless stopped
            )
        ),
        daemon=True,  # not joined at exit if it fails to stop
    )
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    hook = torch.nn.modules.module.register_module_forward_pre_hook(note_generating)
    try:
        exit_on_signals()
        reference.start()
        assert generating.wait(60), "HF generate never ran"
        with pytest.raises(SystemExit) as exited:
            signal.raise_signal(signal.SIGTERM)
        assert exited.value.code == 128 + signal.SIGTERM
        reference.join(30)
        assert not reference.is_alive(), "HF generate ran on past the signal"
        assert len(results) == 1
    finally:
        hook.remove()
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
        STOP_REFERENCE.clear()


def test_load_benchmark_sees_only_expected_statuses_and_drains(tiny_checkpoint: Path) -> None:
    out = run_bench(
        "bench.load", "--checkpoint", str(tiny_checkpoint), "--clients", "8", "--rounds", "2"
    )
    rounds = [line for line in out.splitlines() if line.startswith("load round")]
    assert len(rounds) == 2
    assert all("unexpected 0" in line for line in rounds), rounds
    assert re.search(r"RSS after round 2 vs round 1: [+-]\d+\.\d%", out)


def test_the_benchmarks_server_is_on_loopback_without_the_environments_key(
    tiny_checkpoint: Path,
) -> None:
    # As in the Docker image (POCKETGPT_HOST=0.0.0.0), with a key for the real server:
    # the benchmark's server took both, listened on every interface and answered every
    # client 401 (bench.load's /metrics read was a traceback).
    # The key in lower case: the server reads its settings in any case.
    server_env = {"POCKETGPT_HOST": "0.0.0.0", "pocketgpt_api_key": "for-the-real-server"}
    command = ["bench.load", "--checkpoint", str(tiny_checkpoint), "--clients", "4"]
    result = run_module(*command, "--rounds", "1", env=server_env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "unexpected 0" in result.stdout, result.stdout
    # Without a key, a server on another host than loopback warns that anyone can use it.
    assert "without an API key" not in result.stderr, result.stderr


def test_bad_input_is_one_error_line_naming_it(
    tiny_checkpoint: Path, tokenizer: Tokenizer, tiny_config: ModelConfig, tmp_path: Path
) -> None:
    short = save_checkpoint(
        tmp_path, "short", Transformer(tiny_config.replace(max_seq_len=128)), tokenizer
    )
    ckpt = ["--checkpoint", str(tiny_checkpoint)]
    no_tokenizer = shutil.copytree(tiny_checkpoint, tmp_path / "no_tokenizer")
    (no_tokenizer / "tokenizer.json").unlink()
    text = tmp_path / "text.txt"
    text.write_text("Some text.\n")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("Caf\xe9 au lait.\n".encode("latin-1"))
    blank_end = tmp_path / "blank_end.txt"  # its held-out last 10%: four line ends
    blank_end.write_text("Some text of 30 bytes or so.\n" + "\n" * 4)
    fifo = tmp_path / "fifo.txt"
    os.mkfifo(fifo)
    nul = tmp_path / "nul.txt"
    nul.write_text("Some\0text.\n")
    small = tmp_path / "small.txt"  # less than one training batch
    records = tmp_path / "records.jsonl"
    records.write_text('{"text": "Some text."}\n' * 3000)
    small.write_text("Some text, and more of it.\n" * 20)
    lines = tmp_path / "lines.txt"
    lines.write_text("\n".join(f"Line {i}: the quick brown fox." for i in range(3000)))
    two_steps = ("bench.train", "--data", str(lines), "--steps", "2", "--skip-quality", "--")
    two_steps += (*TINY_TRAINING,)
    cases = {
        ("bench.decode", *ckpt, "--batch-sizes", "1,0"): "--batch-sizes: expected a positive",
        # Refused before batch 1 is measured, not by the server's settings after it.
        ("bench.decode", *ckpt, "--batch-sizes", "1,1025"): "--batch-sizes: at most 1024, got 1025",
        ("bench.decode", "--checkpoint", str(short)): "context of 128 tokens is shorter",
        ("bench.decode", "--checkpoint", str(tmp_path / "none")): "--checkpoint: ",
        # Checked as the server checks it: not a traceback from the first load.
        ("bench.serve", "--checkpoint", str(no_tokenizer)): "tokenizer.json: missing",
        ("bench.serve", *ckpt, "--clients", "a"): "--clients: expected a positive integer",
        ("bench.serve", *ckpt, "--timeout", "0"): "--timeout: expected a positive number",
        # The server's own bounds, refused before it starts: not its error line and then
        # the benchmark's, exit status 1.
        ("bench.serve", *ckpt, "--max-batch", "1025"): "--max-batch: at most 1024, got 1025",
        ("bench.serve", *ckpt, "--stream-interval", "257"): "--stream-interval: at most 256",
        # More clients than the server may queue: refused before it starts (--timeout 1
        # ended such a run at its first round; left alone it ran until its failures).
        ("bench.serve", *ckpt, "--clients", "5000", "--timeout", "1"): (
            "--clients: at most 4096, got 5000 (the server's --max-queue)"
        ),
        ("bench.load", *ckpt, "--clients", "5000", "--timeout", "1"): "--clients: at most 4096",
        ("bench.load", *ckpt, "--rounds", "0"): "--rounds: expected a positive integer",
        ("bench.train", "--data", str(tmp_path / "none.txt")): "none.txt: no such file",
        # It exists: not said to be missing.
        ("bench.train", "--data", os.devnull): f"--data {os.devnull}: not a regular file",
        ("bench.train", "--data", str(fifo)): f"--data {fifo}: not a regular file",
        ("bench.train", "--data", str(tmp_path)): f"--data {tmp_path}: a folder, not a file",
        ("bench.train", "--data", str(records)): (
            f"--data {records}: .jsonl: the benchmark takes one plain text file"
        ),
        ("bench.train", "--data", str(latin1)): "latin1.txt: not UTF-8 (at byte offset 3: invalid",
        # Refused as pretrain would refuse the split, but naming --data, not the split.
        ("bench.train", "--data", str(blank_end)): (
            "blank_end.txt: too small: its last 10% (the held-out text) is blank"
        ),
        ("bench.train", "--data", str(nul)): "nul.txt: binary, not text (a NUL byte at offset 4)",
        # training.pretrain's own error line, not a second one saying that it failed.
        ("bench.train", "--data", str(small), "--skip-quality"): "the corpus is too small",
        # Not handed on to training.pretrain: only what follows `--` is.
        ("bench.train", "--data", str(text), "--sead", "3"): "unrecognized arguments: --sead",
        # Pretrain's flags that the benchmark sets itself: a run elsewhere, or none, was a
        # traceback once pretrain had returned; more --data trained on what it scores.
        (*two_steps, "--out-dir", str(tmp_path / "mine")): (
            "error: --out-dir after `--`: the runs go to a temporary folder"
        ),
        (*two_steps, "--data", str(lines)): "--data after `--`: the benchmark's own",
        (*two_steps, "--help"): "--help after `--`: see python -m training.pretrain --help",
    }
    for (command, message), result in zip(cases.items(), run_modules(cases), strict=True):
        assert result.returncode == 2, (command, result.stderr)
        last = result.stderr.strip().splitlines()[-1]
        assert "error:" in last and message in last, (command, result.stderr)
        assert result.stderr.count("error: ") == 1, (command, result.stderr)
        assert "Traceback" not in result.stderr, command


def test_compiling_where_there_is_no_compiler_is_one_error_line(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    # As the server refuses --compile-decode: bench.decode's --compile was torch's
    # traceback at its first compiled step, bench.serve's the server's error, then its own.
    no_compiler = {"PATH": str(tmp_path)}  # an empty folder
    ckpt = ["--checkpoint", str(tiny_checkpoint), "--device", "cpu"]
    for command in (
        ["bench.decode", *ckpt, "--compile"],
        ["bench.serve", *ckpt, "--compile-decode"],
    ):
        result = run_module(*command, timeout=120, env=no_compiler)
        assert result.returncode == 2, (command, result.stderr[-2000:])
        last = result.stderr.strip().splitlines()[-1]
        assert last == (
            f"error: {command[-1]}: torch.compile on cpu needs a compiler on PATH "
            "(g++ / c++ / clang++); none was found"
        ), (command, result.stderr[-2000:])
        assert result.stderr.count("error: ") == 1, (command, result.stderr)


def test_help_describes_every_option_with_its_default() -> None:
    commands = ("bench.decode", "bench.serve", "bench.load", "bench.train")
    helps = run_modules((command, "--help") for command in commands)
    for result in helps:
        assert result.returncode == 0, result.stderr
        # One block per option: the flag, its metavar, then what it is.
        blocks = re.split(r"\n  (?=--)", result.stdout.split("options:", 1)[1])[1:]
        assert len(blocks) >= 5, result.stdout
        assert all(len(block.split()) > 2 for block in blocks), result.stdout
    decode = " ".join(helps[0].stdout.split())
    assert "(default: 1,8,32)" in decode and "--dtype {auto,float32,bfloat16,float16}" in decode
    assert "(default: None)" not in decode


def test_hf_generate_samples_end_of_text_as_our_engine_does(tiny_checkpoint: Path) -> None:
    # Our engine, with ignore_eos, samples end-of-text as any other token and checks
    # nothing for it. HF's generate held to its length by min_new_tokens masked it out
    # every step (two logits processors, and an end-of-text stopping check): work our
    # engine does not do, 3-7% of HF's step on the tiny model, and another distribution.
    eos = hf_model(tiny_checkpoint, torch.float32).generation_config.eos_token_id
    fed: list[torch.Tensor] = []

    def end_of_text_likeliest(module: torch.nn.Module, inputs: tuple, output: object) -> None:
        if type(module).__name__ == "LlamaForCausalLM":
            output.logits[..., eos] = 1e4  # what the sampling then draws, unless masked
        elif isinstance(module, torch.nn.Embedding) and inputs[0].shape[-1] == 1:
            fed.append(inputs[0])  # a decode step's input: the token sampled before it

    hook = torch.nn.modules.module.register_module_forward_hook(end_of_text_likeliest)
    try:
        hf_generate(
            tiny_checkpoint,
            torch.randint(0, 256, (2, 8)),
            16,
            temperature=0.8,
            top_p=0.95,
            device=torch.device("cpu"),
            dtype=torch.float32,
        )
    finally:
        hook.remove()
    sampled = torch.cat(fed, dim=1)  # the warm-up run's and the timed run's
    assert sampled.shape == (2, 2 * 15), sampled.shape  # every row still makes 16 tokens
    assert (sampled == eos).all(), sampled


def test_the_plain_loop_steps_its_optimizer_once_per_step_of_the_trainers(tmp_path: Path) -> None:
    # A run given --grad-accum (or POCKETGPT_GRAD_ACCUM) steps AdamW once per so many
    # micro-batches; a plain loop stepping it after each did more optimizer work per
    # token than the trainer and read the trainer's ratio high.
    text = tmp_path / "text.txt"
    text.write_text("\n".join(f"Line {i}: the quick brown fox." for i in range(3000)))
    run = tmp_path / "run"
    command = ["training.pretrain", "--data", str(text), "--out-dir", str(run)]
    command += [*TINY_TRAINING, "--max-steps", "1", "--sample-tokens", "0", "--grad-accum", "2"]
    result = run_module(*command)
    assert result.returncode == 0, result.stderr[-2000:]
    forwards, steps = [], []
    forward = torch.nn.modules.module.register_module_forward_hook(
        lambda module, inputs, output: forwards.append(1) if type(module) is Transformer else None
    )
    step = register_optimizer_step_post_hook(lambda *_: steps.append(1))
    try:
        assert plain_tokens_per_s(run, text, 4, torch.device("cpu"), None) > 0
    finally:
        forward.remove()
        step.remove()
    # The warm-up step and --steps 4's timed half, each of 2 micro-batches of 4 rows.
    assert (len(forwards), len(steps)) == (2 * 3, 3)
