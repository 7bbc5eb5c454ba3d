"""Server settings: one object, read from `POCKETGPT_<NAME>` env vars or given directly.

`python -m server` turns every field into a flag (`max_batch` -> `--max-batch`) whose
help is the field's description, so this file is the one place settings are documented.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from model.cli import ENV_PREFIX

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
MAX_BATCH_LIMIT = 1024  # --max-batch's bound
MAX_STREAM_INTERVAL = 256  # --stream-interval's bound


def is_loopback(host: str) -> bool:
    """Whether binding `host` listens on this machine only."""
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve anywhere
        return False


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore")

    checkpoint: Path = Field(
        Path("checkpoints/default"),
        description="checkpoint folder, or a run folder whose `latest` file names one",
    )
    host: str = Field("127.0.0.1", description="interface to bind (0.0.0.0 for all)")
    port: int = Field(8000, ge=0, le=65535, description="TCP port")
    device: Literal["auto", "cuda", "cpu"] = Field(
        "auto", description="where the model runs; auto = CUDA when available"
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="weights and KV-cache dtype (a CPU keeps the KV cache in float32, where "
        "its attention runs fastest); auto = bfloat16 on CUDA (float16 before Ampere, where "
        "bf16 is only emulated), float32 on CPU",
    )
    threads: int | None = Field(
        None,
        ge=1,
        # Past any machine's cores: OpenMP then starts that many threads as the model
        # loads, and 100,000 (a typo's extra zeros) crashed the process (SIGSEGV).
        le=1024,
        description="torch CPU threads; default torch's own (one per core). On a shared "
        "machine 1 can be faster: oversubscribed cores make the thread pool stall",
    )
    compile_decode: bool = Field(
        False,
        description="torch.compile the decode step. CPU: one graph for a lone stream and "
        "one for larger batches, weights frozen into each: on 2 AMX CPU cores a lone stream "
        "~2.5x faster per token in bfloat16, ~1.4x in float32; on 2 Zen 4 cores 32 streams "
        "~1.4x in bfloat16. Adds ~100 s to start-up the first time, ~40 s once cached on "
        "disk, and two frozen copies of the weights. CUDA (with "
        "--cuda-graphs): the step every graph captures, 1.7-1.8x faster per step for `base` "
        "on an H200; adds ~40 s to start-up with its kernels cached on disk, more the "
        "first time. Needs a C/C++ compiler",
    )
    cuda_graphs: bool = Field(
        True,
        description="on CUDA, replay captured CUDA graphs of the decode step (one per "
        "batch-size and key-length bucket, captured at start-up) instead of launching its "
        "kernels one by one from Python; false = eager. No effect on CPU",
    )
    max_batch: int = Field(
        32, ge=1, le=MAX_BATCH_LIMIT, description="KV-cache slots: requests generating at once"
    )
    max_context: int | None = Field(
        None,
        ge=1,
        description="tokens of context a request may use (prompt + generated), at most the "
        "checkpoint's; default: the checkpoint's. The KV cache holds --max-batch x this many "
        "tokens: lower it to serve a long-context model in less memory",
    )
    max_queue: int = Field(
        256,
        ge=0,
        description="requests allowed to wait while every slot is busy; beyond it: 429 (0: never "
        "wait)",
    )
    prefill_chunk: int = Field(
        256, ge=1, description="prompt tokens prefilled per engine step (chunked prefill)"
    )
    stream_interval: int = Field(
        1,
        ge=1,
        le=MAX_STREAM_INTERVAL,
        description="tokens per SSE event: a stream's event goes out once this many new "
        "tokens have gathered (and at the end). 1 = every token; more spares the server "
        "per-event work at many concurrent streams, for burstier streams",
    )
    api_key: SecretStr | None = Field(
        None,
        description="require `Authorization: Bearer <key>` on every route but /health and "
        "the API docs when set (whitespace around it, a key file's newline, is dropped)",
    )
    metrics_open: bool = Field(
        False, description="with --api-key: serve /metrics without the key (a keyless Prometheus)"
    )
    allowed_hosts: str | None = Field(
        None,
        description="host names a request's Host header may give, comma-separated (* for "
        "any); beyond them: 400. Default: on a loopback --host, localhost names only (so a "
        "web page whose name an attacker rebinds to 127.0.0.1 cannot use the server), else "
        "any. Behind a proxy that sends its own Host, list the names it sends (localhost names "
        "always pass); once set, the check applies on any --host (with docker compose, list "
        "`server`, the name Prometheus scrapes)",
    )
    cors_origins: str | None = Field(
        None,
        description="origins whose web pages may call the server, comma-separated "
        "(`https://app.example`, `http://localhost:3000`; * for any): their requests' "
        "answers carry CORS headers, and their preflights (OPTIONS) are answered without "
        "the API key (the page sends it with the request itself). Default: none (a page on "
        "another origin cannot read an answer)",
    )
    max_body_bytes: int = Field(
        1 << 20, ge=1024, description="largest request body accepted; beyond it: 413"
    )
    max_header_bytes: int = Field(
        16 * 1024,
        ge=1024,
        description="largest request head (request line and headers) accepted; beyond it: 431",
    )
    request_timeout: float = Field(
        30.0,
        gt=0,
        allow_inf_nan=False,
        description="seconds a client has to send a whole request (head and body), from "
        "connecting or from its previous response; beyond it: 408 and the connection closes "
        "(a response is never cut by it); a client whose response waits unread (its socket "
        "full) that long is disconnected",
    )
    drain_timeout: float = Field(
        30.0,
        ge=0,
        allow_inf_nan=False,
        description="seconds running streams may finish after SIGTERM",
    )
    model_name: str | None = Field(
        None,
        description="model id reported by the API; default: the run folder's name (also when "
        "one of its step folders or best/ is served), else the model folder's",
    )
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field(
        "info", description="uvicorn log level"
    )

    def allowed_host_names(self) -> frozenset[str] | None:
        """The Host names requests may give (without a port); None: any. Localhost names
        always pass (a browser cannot send them from another site's page): local probes,
        a Docker health check, work whatever is listed."""
        if self.allowed_hosts is not None:
            names = {name.strip().lower() for name in self.allowed_hosts.split(",")}
            return None if "*" in names else frozenset(names - {""}) | LOOPBACK_NAMES
        return LOOPBACK_NAMES | {self.host.lower()} if is_loopback(self.host) else None

    def cors_origin_list(self) -> list[str] | None:
        """The origins --cors-origins lists (["*"] for any); None: no CORS."""
        return None if self.cors_origins is None else self.cors_origins.split(",")

    @field_validator("host")
    @classmethod
    def _interface_named(cls, host: str) -> str:
        # Empty (a blank POCKETGPT_HOST= line) binds every interface, as 0.0.0.0 does:
        # a server meant for this machine alone would answer the network, for any Host.
        if not host.strip():
            raise ValueError("must name an interface (0.0.0.0 for all)")
        return host.strip()

    @field_validator("checkpoint", mode="before")
    @classmethod
    def _folder_named(cls, checkpoint: object) -> object:
        # Empty (a blank POCKETGPT_CHECKPOINT= line) is the working folder: served if it
        # happened to hold a checkpoint, else refused without naming the variable.
        if isinstance(checkpoint, str) and not checkpoint.strip():
            raise ValueError("must name a checkpoint folder (unset it for the default)")
        return checkpoint

    @field_validator("model_name")
    @classmethod
    def _model_named(cls, name: str | None) -> str | None:
        # "notes " (a .env line's trailing space) was the id clients had to send: every
        # request naming "notes" was refused. A blank line named no model at all.
        if name is None:
            return None
        if not name.strip():
            raise ValueError("must name a model (unset it for the checkpoint's folder name)")
        return name.strip()

    @field_validator("allowed_hosts")
    @classmethod
    def _hosts_named(cls, hosts: str | None) -> str | None:
        # Empty (a blank POCKETGPT_ALLOWED_HOSTS= line) would refuse every name but
        # localhost's while the health check, on 127.0.0.1, said all was well.
        if hosts is not None and not hosts.replace(",", "").strip():
            raise ValueError("must name at least one host (unset it for the default)")
        return hosts

    @field_validator("cors_origins")
    @classmethod
    def _origins_written_as_browsers_send_them(cls, origins: str | None) -> str | None:
        # A browser's Origin header is scheme://host[:port] in lower case, nothing after
        # (a listed "http://localhost:3000/" would match no page): kept in that form.
        if origins is None:
            return None
        listed = [origin.strip().lower() for origin in origins.split(",") if origin.strip()]
        if not listed:
            raise ValueError("must name at least one origin (unset it for no CORS)")
        for origin in listed:
            url = urlsplit(origin)
            if origin != "*" and (
                not (url.scheme and url.netloc) or url.path or url.query or url.fragment
            ):
                raise ValueError(
                    f"{origin!r} is no origin: scheme://host[:port], nothing after "
                    "(as a browser's Origin header gives it)"
                )
        return ",".join(listed)

    @field_validator("api_key")
    @classmethod
    def _key_sendable(cls, key: SecretStr | None) -> SecretStr | None:
        # An empty key (a blank POCKETGPT_API_KEY= line) would let a bare
        # `Authorization: Bearer` in while looking like protection. A header value
        # cannot begin or end with whitespace, nor hold a control character but a tab: a
        # key read from a file with its newline could never be matched (every 401).
        if key is None:
            return None
        value = key.get_secret_value().strip()
        if not value:
            raise ValueError("must not be empty (unset it to serve without a key)")
        if any((ord(c) < 0x20 and c != "\t") or ord(c) == 0x7F for c in value):
            raise ValueError("must not hold a control character (no header can send it)")
        return SecretStr(value)
