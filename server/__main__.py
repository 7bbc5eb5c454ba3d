"""`python -m server`: serve a checkpoint with uvicorn.

Every Settings field is a flag (`--max-batch`) and an env var (`POCKETGPT_MAX_BATCH`);
a flag wins over the env var. The port is bound, the checkpoint checked and the memory
its weights and KV cache need compared with what the system may give (on CUDA, the GPU's
free memory) before the model loads, so a busy port, a bad checkpoint or a cache past
the machine ends the process with one line naming the problem and exit status 2.

SIGTERM / SIGINT drain: /health and /v1/generate answer 503 at once, running
requests finish and their responses are sent (up to --drain-timeout; a client that
has not read its response a second past that is disconnected), then uvicorn shuts
down and the process exits 0. A second signal cuts the drain short: the unfinished
requests end at once as they would at the timeout (a 503, or an error event closing
the stream).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import resource
import signal
import socket
import sys
import time
import typing
from pathlib import Path
from types import FrameType

from model.cli import (
    ArgumentParser,
    default_signal_actions,
    env_var,
    exit_now,
    exit_on_signals_while_importing,
    flag,
    signals_exit,
    unusable_path,
)

INTERRUPTED_BEFORE_SERVING = "interrupted before the server started"
if __name__ == "__main__":  # before the imports below (uvicorn, pydantic)
    exit_on_signals_while_importing(INTERRUPTED_BEFORE_SERVING)

import uvicorn
from pydantic import ValidationError

from model.config import MIN_SERVED_CONTEXT
from server.settings import Settings, is_loopback

if typing.TYPE_CHECKING:
    import torch
    from fastapi import FastAPI

    from model.config import ModelConfig
    from server.http11 import EnvelopeH11Protocol


log = logging.getLogger("server")
# Past the drain deadline, how long the streams just ended get to send their error event
# before a connection still not written is cut off.
SEND_GRACE_SECONDS = 1.0


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="python -m server",
        description="Serve a pocketgpt checkpoint: POST /v1/generate (JSON or SSE), "
        "POST /v1/completions and /v1/chat/completions (OpenAI's APIs), POST /tokenize, "
        "POST /detokenize, GET /health, GET /v1/models[/ID], GET /metrics.",
    )
    for name, field in Settings.model_fields.items():
        default = "unset" if field.default is None else field.default
        choices = (
            typing.get_args(field.annotation)
            if typing.get_origin(field.annotation) is typing.Literal
            else None
        )
        switch = {}
        if field.annotation is bool:  # `--metrics-open` alone, or `--cuda-graphs false`
            switch = {"nargs": "?", "const": "true", "metavar": "true|false"}
            default = "on" if default else "off"
        parser.add_argument(
            flag(name),
            dest=name,
            choices=choices,
            help=f"{field.description} (env {env_var(name)}; default {default})",
            **switch,
        )
    return parser


def setting_source(name: str, given: dict[str, str]) -> str:
    """The name the user gave a setting by: its env var if set there and not on the
    command line (a Docker user sets POCKETGPT_MAX_BATCH and would not find
    `--max-batch`), else its flag (also for a default: the flag is how to change it)."""
    from_env = name not in given and set_in_environment(name)
    return env_var(name) if from_env else flag(name)


def set_in_environment(name: str) -> bool:
    """Whether the environment sets setting `name` (as pydantic reads it: any case)."""
    return env_var(name) in {key.upper() for key in os.environ}


def check_checkpoint_exists(settings: Settings, given: dict[str, str]) -> None:
    """That the checkpoint folder exists, said before torch is imported (~2 s)."""
    try:
        if settings.checkpoint.exists():
            return
    except OSError as e:  # a folder above it this user may not enter, a name too long
        raise ValueError(
            f"{setting_source('checkpoint', given)} {settings.checkpoint}: {e.strerror}"
        ) from None
    if "checkpoint" not in given and not set_in_environment("checkpoint"):
        # `python -m server` before any training, or from another folder than the trainer's.
        raise ValueError(
            f"{settings.checkpoint}: no such checkpoint folder in {Path.cwd()} (the default "
            f"{flag('checkpoint')}): train the default model there first (python -m "
            f"training.pretrain), or name a checkpoint with {flag('checkpoint')}"
        )
    raise ValueError(f"{settings.checkpoint}: no such checkpoint folder")


def check_before_loading(settings: Settings, given: dict[str, str]) -> None:
    """Fail fast, before the model loads, on anything that would stop it loading."""
    from model.checkpoint import read_config
    from model.device import resolve_device
    from model.inductor import has_compiler, missing_compiler_message
    from server.loading import check_serving_files

    device = resolve_device(settings.device, setting_source("device", given))
    if settings.compile_decode and not has_compiler(device):
        source = setting_source("compile_decode", given)
        raise ValueError(f"{source}: {missing_compiler_message(device)}")
    folder = check_serving_files(settings.checkpoint)
    config = read_config(folder)
    if settings.max_context is not None:
        if settings.max_context > config.max_seq_len:
            raise ValueError(
                f"{setting_source('max_context', given)} {settings.max_context}: more than "
                f"the checkpoint's context of {config.max_seq_len} tokens"
            )
        config = config.replace(max_seq_len=settings.max_context)
    if config.max_seq_len < MIN_SERVED_CONTEXT:
        # Every request would be a 400, while /health said ready.
        named = (
            f"{setting_source('max_context', given)} {settings.max_context}"
            if settings.max_context is not None
            else f"{folder}: its context of 1 token"
        )
        raise ValueError(
            f"{named}: no request fits (a prompt of at least 1 token and 1 generated need "
            f"{MIN_SERVED_CONTEXT})"
        )
    check_memory(settings, given, config, device)


def check_memory(
    settings: Settings, given: dict[str, str], config: ModelConfig, device: torch.device
) -> None:
    """That the weights and the KV cache (zeroed at start-up) fit in what the system may
    give, or the GPU has free: past it, Linux kills the process with no word (exit 137),
    CUDA fails in the loading, and a long-context model at the default --max-batch can
    ask for many times the machine. Refused, the line says what fits."""
    from model.kv_cache import KVCache, cache_dtype
    from model.memory import available_memory, format_size
    from model.transformer import rope_bytes_per_position
    from server.loading import resolve_dtype
    from server.sampler import Sampler

    if device.type == "cuda":
        import torch

        available, _ = torch.cuda.mem_get_info(device)
        offered, machine = f"{format_size(available)} is free on {device}", "GPU"
    else:
        available, machine = available_memory(), "machine"
        offered = f"at most {format_size(available or 0)} is available"
    dtype = resolve_dtype(settings.dtype, device)
    # --compile-decode on a CPU freezes a copy of the weights into each graph it builds at
    # start-up (a lone stream's, and one for larger batches: server/runner.py) beside the
    # model's own. Uncounted, weights of half the machine passed, and the compile was
    # killed by the OOM killer (exit 137, no word).
    frozen = 0
    if settings.compile_decode and device.type == "cpu":
        frozen = 1 if settings.max_batch == 1 else 2
    compile_decode = setting_source("compile_decode", given)
    copies = ("", "frozen copy", "two frozen copies")[frozen]
    counted = f" (the model's and {compile_decode}'s {copies})" if frozen else ""
    weights = config.num_parameters() * dtype.itemsize * (1 + frozen)
    cache_per_token = KVCache.bytes_per_token(config, cache_dtype(device, dtype))
    cache = cache_per_token * settings.max_batch * config.max_seq_len
    # Beside the cache, a slot takes (per token of context, and once) and so does a
    # position of the context:
    # - zeroed at start-up: the sampler's rows a slot (server/sampler.py) and the RoPE
    #   tables' cos and sin a position. Uncounted, a large vocabulary at many slots (656
    #   MB for 128k tokens at --max-batch 1024), or a small model's tables at --max-batch
    #   1, were killed by the OOM killer at the size the check said fits;
    # - a step's working memory, at its largest when every slot steps at the full
    #   context: each row's keys and values of one layer, gathered (kv_cache.py: a step's
    #   slots are rarely one contiguous run, read in place), then its sampling's rows
    #   (counted together: high by the smaller). Uncounted, a 2-layer model whose cache
    #   filled what was available grew 50% past it at its first full batch.
    per_slot_token = cache_per_token + cache_per_token // config.n_layers
    per_slot = Sampler.bytes_per_slot(config.vocab_size)
    per_slot += Sampler.step_bytes_per_row(config.vocab_size)
    per_position = rope_bytes_per_position(config)
    slot_bytes = (per_slot_token * config.max_seq_len + per_slot) * settings.max_batch
    extra = slot_bytes - cache + per_position * config.max_seq_len
    if available is None or weights + cache + extra <= available:
        return
    if weights >= available:
        ways = [f"without {compile_decode}"] if frozen else []
        if dtype.itemsize > 2:
            ways.append(f"with {setting_source('dtype', given)} bfloat16")
        ways.append(f"on a {machine} with more memory")
        serve = ways[0] if len(ways) == 1 else f"{', '.join(ways[:-1])}, or {ways[-1]}"
        raise ValueError(
            f"the weights alone need {format_size(weights)} in {str(dtype).removeprefix('torch.')}"
            f"{counted}, and {offered}: serve {serve}"
        )
    batch, context = setting_source("max_batch", given), setting_source("max_context", given)
    room = available - weights
    # What fits of each, the other left as it is; named only if the server would take it:
    # a context of 1 token (where no request fits) was advised, then refused at start.
    fitting = {
        batch: (
            (room - per_position * config.max_seq_len)
            // (per_slot_token * config.max_seq_len + per_slot),
            1,
        ),
        context: (
            (room - per_slot * settings.max_batch)
            // (per_slot_token * settings.max_batch + per_position),
            MIN_SERVED_CONTEXT,
        ),
    }
    remedies = [
        f"{name} to at most {fits:,}" for name, (fits, least) in fitting.items() if fits >= least
    ]
    remedy = "lower " + (", or ".join(remedies) if remedies else f"{batch} and {context}")
    raise ValueError(
        f"the KV cache for {batch} {settings.max_batch} x a context of "
        f"{config.max_seq_len:,} tokens needs {format_size(cache)} (the weights "
        f"{format_size(weights)}{counted}, the sampler's rows, RoPE tables and a step's "
        f"working memory {format_size(extra)} more), and {offered}: {remedy}"
    )


def listening_socket(settings: Settings, given: dict[str, str]) -> socket.socket:
    """The server's socket, bound before anything loads: a busy port or an unknown host
    is one line naming the setting, not uvicorn's exit 3 after the model has loaded."""
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET  # as uvicorn does
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((settings.host, settings.port))
    except OSError as e:
        sock.close()
        name = "port" if e.errno in (errno.EADDRINUSE, errno.EACCES) else "host"
        where = f"{settings.host}:{settings.port}"
        raise ValueError(
            f"{setting_source(name, given)} {getattr(settings, name)}: cannot listen on "
            f"{where} ({e.strerror or e})"
        ) from None
    return sock


class DrainingServer(uvicorn.Server):
    """uvicorn with a drain phase before its own graceful shutdown."""

    def __init__(self, config: uvicorn.Config, app: FastAPI, drain_timeout: float) -> None:
        super().__init__(config)
        self.app = app
        self.drain_timeout = drain_timeout
        self.drain_deadline: float | None = None
        self.cut_off_by = "drain timeout"  # what ends requests still running at the deadline
        self.failure: str | None = None  # why the server stopped itself

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        serving = self.app.state.serving
        if serving is None:
            self.should_exit = True  # nothing to drain
            return
        if self.drain_deadline is not None:  # a second signal: the deadline is now
            self.drain_deadline, self.cut_off_by = time.monotonic(), "second signal"
            return
        # Not re-raised after shutdown (uvicorn would): a drained exit is a clean exit.
        self.drain_deadline = time.monotonic() + self.drain_timeout
        from server.app import begin_drain  # loaded by now: create_app ran

        begin_drain(self.app, serving)
        # Said now: uvicorn's "Shutting down" comes only once the drain is over.
        log.info(
            "draining on %s: %d requests unfinished, new ones refused (503); they have up "
            "to %g s (--drain-timeout; a second signal ends them now)",
            signal.Signals(sig).name,
            serving.engine.num_unfinished,
            self.drain_timeout,
        )

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if sockets:  # uvicorn says where it listens only for the sockets it binds itself
            host, port = sockets[0].getsockname()[:2]
            address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            logging.getLogger("uvicorn.error").info(
                "Uvicorn running on http://%s (Press CTRL+C to quit)", address
            )

    async def on_tick(self, counter: int) -> bool:
        state = self.app.state
        if not self.should_exit and state.status.startswith("failed"):
            self.failure = state.status
        elif not self.should_exit and state.serving is not None and state.serving.engine.failed:
            from server.engine import FAILED  # loaded by now: the engine ran

            self.failure = FAILED
        if self.failure is not None:
            # Out, not up and unhealthy: a restart policy acts only on an exit.
            self.should_exit = True
        if self.drain_deadline is not None and not self.should_exit:
            engine = self.app.state.serving.engine
            if engine.num_unfinished and time.monotonic() >= self.drain_deadline:
                # Cut off now, each request with an error output, so that the streams end
                # properly before uvicorn's own shutdown (which would drop them mid-body).
                log.warning("%s: %d requests cut off", self.cut_off_by, engine.num_unfinished)
                engine.stop()  # joins the engine thread: the grace below counts from here
                self.drain_deadline = time.monotonic()
            if engine.num_unfinished == 0:
                # Generated is not sent: a slow reader's stream is still being written.
                # uvicorn's shutdown would cancel it mid-body after 5 s whatever the drain
                # timeout, with a traceback; past the deadline (and the moment its error
                # event needs) a client that stopped reading is disconnected instead.
                unsent = self._unsent_responses()
                if unsent and time.monotonic() >= self.drain_deadline + SEND_GRACE_SECONDS:
                    log.warning(
                        "%s: %d responses cut off unsent (their clients did not read them)",
                        self.cut_off_by,
                        len(unsent),
                    )
                    for connection in unsent:
                        connection.transport.abort()
                    unsent = []
                self.should_exit = not unsent
        return await super().on_tick(counter)

    def _unsent_responses(self) -> list[EnvelopeH11Protocol]:
        """The connections whose response has begun but is not yet all handed to the
        kernel: still being produced, or waiting in the transport's buffer for the
        client to read."""
        return [
            connection
            for connection in self.server_state.connections
            if (
                connection.cycle is not None
                and connection.cycle.response_started  # not a request still arriving:
                and not connection.cycle.response_complete  # uvicorn's shutdown answers it
            )
            or connection.transport.get_write_buffer_size()
        ]


def raise_open_files_limit() -> None:
    """Every connection holds a file descriptor: at the usual soft limit of 1,024, that
    many idle connections locked every other client out. Any process may raise its soft
    limit to its hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):  # an unlimited hard limit, say
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    given = {name: value for name, value in vars(args).items() if value is not None}
    try:
        settings = Settings(**given)
    except ValidationError as e:
        # pydantic words a validator's own message "Value error, <message>".
        problems = "; ".join(
            f"{setting_source(str(err['loc'][0]), given)}: "
            + err["msg"].removeprefix("Value error, ")
            for err in e.errors()
        )
        print(f"error: {problems}", file=sys.stderr)
        return 2
    try:
        sock = listening_socket(settings, given)
        if settings.api_key is None and not is_loopback(settings.host):
            print(
                f"warning: {setting_source('host', given)} {settings.host} without an API "
                f"key: anyone who can reach port {sock.getsockname()[1]} can generate (set "
                f"{env_var('api_key')})",
                file=sys.stderr,
            )
        check_checkpoint_exists(settings, given)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    raise_open_files_limit()
    # Until uvicorn takes SIGINT and SIGTERM over, they end the command in one line (an
    # exception raised inside torch's 1-2 s import could be lost: the server started).
    with signals_exit(INTERRUPTED_BEFORE_SERVING):
        # Imported only now (torch is slow to import), so --help and flag errors are
        # instant.
        from model.checkpoint import CheckpointError
        from server.app import create_app
        from server.http11 import uvicorn_config

        try:
            check_before_loading(settings, given)
        except (CheckpointError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        except OSError as e:  # a checkpoint file this user may not read, say
            print(unusable_path(e) or f"error: {e}", file=sys.stderr)
            return 2
        app = create_app(settings)
    server = DrainingServer(uvicorn_config(app, settings), app, settings.drain_timeout)
    server.run(sockets=[sock])
    if server.failure is not None:
        print(f"error: {server.failure}", file=sys.stderr)
        return 1
    if app.state.status == "loading":
        # Stopped while the model loads: its thread runs on in torch, and the interpreter's
        # teardown under it aborts the process ("terminate called without an active
        # exception"). Nothing is left to close.
        exit_now(0)
    return 0


if __name__ == "__main__":
    default_signal_actions()  # the imports are done: main() takes the signals over
    sys.exit(main())
