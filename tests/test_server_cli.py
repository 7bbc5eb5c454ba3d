"""`python -m server` as a user runs it: flags, a bad checkpoint, SIGTERM drain."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest
from server_harness import english_tokenizer, random_checkpoint, sse_events, wait_until

from model.checkpoint import WEIGHTS


def run_server(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("POCKETGPT_")} | (env or {})
    return subprocess.run(
        [sys.executable, "-m", "server", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


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
    result = run_server("--checkpoint", str(truncated))
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert WEIGHTS in line and "truncated" in line

    no_tokenizer = tmp_path / "no-tokenizer"
    shutil.copytree(checkpoint, no_tokenizer)
    (no_tokenizer / "tokenizer.json").unlink()
    result = run_server("--checkpoint", str(no_tokenizer))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: {no_tokenizer / 'tokenizer.json'}: missing"
    ]


def test_compile_without_a_compiler_exits_2_naming_the_flag(checkpoint, tmp_path):
    no_compilers = {"PATH": str(tmp_path)}  # an empty folder: no g++, c++ or clang++
    result = run_server(
        "--checkpoint", str(checkpoint), "--compile-decode", "true", env=no_compilers
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: --compile-decode: torch.compile on cpu needs a compiler on PATH"
        " (g++ / c++ / clang++); none was found"
    ]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_sigterm_stops_admitting_finishes_running_streams_and_exits_0(checkpoint):
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "server",
            "--checkpoint",
            str(checkpoint),
            "--port",
            str(port),
            "--log-level",
            "warning",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:

        def ready() -> bool:
            assert process.poll() is None, process.stderr.read()
            try:
                return httpx.get(f"{base_url}/health").status_code == 200
            except httpx.TransportError:
                return False

        wait_until(ready, 60, "python -m server ready", interval=0.1)
        events: list[dict | str] = []
        first = threading.Event()

        def read_stream() -> None:
            body = {"prompt": "drain", "max_tokens": 300, "ignore_eos": True, "stream": True}
            with httpx.stream("POST", f"{base_url}/v1/generate", json=body, timeout=60) as r:
                for event in sse_events(r):
                    events.append(event)
                    first.set()

        reader = threading.Thread(target=read_stream)
        reader.start()
        assert first.wait(20)
        process.send_signal(signal.SIGTERM)
        wait_until(lambda: httpx.get(f"{base_url}/health").status_code == 503, 5, "health 503")
        refused = httpx.post(f"{base_url}/v1/generate", json={"prompt": "late"})
        assert refused.status_code == 503
        assert refused.json()["error"]["type"] == "unavailable"
        reader.join(60)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert events[-1] == "[DONE]"
    assert events[-2]["finish_reason"] == "length"
    assert events[-2]["usage"]["completion_tokens"] == 300
