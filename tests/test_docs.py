"""The docs stay true: every trainer and server setting is in the README and compose, and
every metric the server exports is named in the README."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from server.__main__ import build_parser
from server.metrics import Metrics
from server.protocol import GenerateRequest
from server.routes import router
from server.settings import Settings
from training.args import TrainArgs

README_PATH = Path(__file__).resolve().parent.parent / "README.md"
README = README_PATH.read_text(encoding="utf-8")


# DESIGN.md's serving contract (the design document is kept beside this repository, not
# in it): its /v1/generate fields, routes and metrics. The README's "Where this code
# differs" paragraph names whatever the server has beyond them.
DESIGN_GENERATE_FIELDS = frozenset(
    [
        "prompt",
        "max_tokens",
        "temperature",
        "top_p",
        "top_k",
        "repetition_penalty",
        "stop",
        "seed",
        "stream",
    ]
)
DESIGN_ROUTES = frozenset({"POST /v1/generate", "GET /health", "GET /v1/models", "GET /metrics"})
DESIGN_METRICS = frozenset(
    [
        "requests_total",
        "request_finished_total",
        "requests_running",
        "requests_waiting",
        "prompt_tokens_total",
        "generation_tokens_total",
        "time_to_first_token_seconds",
        "inter_token_latency_seconds",
        "request_latency_seconds",
        "queue_time_seconds",
        "batch_size",
        "kv_cache_usage_ratio",
        "model_load_seconds",
    ]
)


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def exported_metrics() -> set[str]:
    """The server's metrics as the README names them: without the prefix, a counter with
    its `_total`."""
    text = Metrics().render().decode()
    return {
        family.name.removeprefix("pocketgpt_") + ("_total" if family.type == "counter" else "")
        for family in text_string_to_metric_families(text)
        if family.name.startswith("pocketgpt_")
    }


def test_readme_documents_every_trainer_flag_and_env_var() -> None:
    names = [f.name for f in dataclasses.fields(TrainArgs)]
    missing = [
        n for n in names if f"`{flag(n)}`" not in README or f"POCKETGPT_{n.upper()}" not in README
    ]
    assert missing == []


def test_readme_documents_every_server_flag_and_env_var() -> None:
    missing = [
        n
        for n in Settings.model_fields
        if f"`{flag(n)}`" not in README or f"POCKETGPT_{n.upper()}" not in README
    ]
    assert missing == []


def test_readme_names_every_metric_the_server_exports_and_no_other() -> None:
    # Dashboards and alerts are written from the README's list.
    listed = re.search(r"Metrics \(prefix `pocketgpt_`\): (.*?), plus", README, re.S)
    assert listed is not None
    documented = {name.partition("{")[0] for name in re.findall(r"`([^`]+)`", listed[1])}
    assert exported_metrics() == documented


def test_readme_names_every_request_field_route_and_metric_design_md_lacks() -> None:
    # The paragraph says where this code differs from DESIGN.md: a reader who knows the
    # design learns the rest there, so nothing the server adds may be missing from it.
    differs = README.partition("Where this code differs:")[2].partition("Benchmarks and")[0]
    assert differs
    fields = set(GenerateRequest.model_fields) - DESIGN_GENERATE_FIELDS
    routes = {
        f"{method} {route.path.replace('{model_id:path}', '{id}')}"
        for route in router.routes
        for method in route.methods
        if method != "HEAD"  # every GET route answers HEAD too (said above the paragraph)
    } - DESIGN_ROUTES
    metrics = exported_metrics() - DESIGN_METRICS
    assert sorted(name for name in fields | routes | metrics if f"`{name}`" not in differs) == []


def test_readme_rows_say_what_help_says() -> None:
    # One text per setting: the README's table and --help never drift apart.
    rows, defaults = {}, {}
    for line in README.splitlines():
        if line.startswith(("| pretrain | `--", "| server | `--")):
            command, name, _, default, text = (c.strip() for c in line.strip("|").split(" | "))
            rows[command, name.strip("`")] = text
            defaults[command, name.strip("`")] = default
    helps = {("pretrain", flag(f.name)): f.metadata["help"] for f in dataclasses.fields(TrainArgs)}
    helps |= {("server", flag(n)): f.description for n, f in Settings.model_fields.items()}
    assert {key: rows.get(key) for key in helps} == helps
    # And the server's defaults as its --help gives them ("unset", "on", "off", values).
    server_help = {a.option_strings[0]: a.help for a in build_parser()._actions if a.help}
    said = {name: re.search(r"; default ([^;]*)\)$", text) for name, text in server_help.items()}
    assert {n: defaults.get(("server", n)) for n, m in said.items() if m} == {
        n: m.group(1) for n, m in said.items() if m
    }


def test_compose_passes_every_setting_through_but_the_ones_its_services_fix() -> None:
    compose = (README_PATH.parent / "docker-compose.yml").read_text(encoding="utf-8")
    trainer, server = compose.split("\n  server:", 1)
    server = server.split("\n  prometheus:", 1)[0]
    fixed = {"if_missing", "host", "port"}

    def passed_through(name: str, service: str) -> bool:
        """Passed through as it is, or with a default of the service's."""
        var = f"POCKETGPT_{name.upper()}"
        return f"- {var}\n" in service or f"- {var}=${{{var}:-" in service

    # Each service's own: one host variable for both would give the trainer the server's
    # float16, which it refuses (and the server would never start).
    assert "- POCKETGPT_DTYPE=${POCKETGPT_TRAIN_DTYPE:-auto}\n" in trainer
    assert "- POCKETGPT_DTYPE=${POCKETGPT_SERVE_DTYPE:-auto}\n" in server
    fixed.add("dtype")

    missing = [
        n
        for n in (f.name for f in dataclasses.fields(TrainArgs))
        if n not in fixed and not passed_through(n, trainer)
    ]
    missing += [
        n for n in Settings.model_fields if n not in fixed and not passed_through(n, server)
    ]
    assert missing == []
    # Where the trainer writes and what the server serves: the same folder unless set.
    default = "/data/checkpoints/default}"
    assert "- POCKETGPT_OUT_DIR=${POCKETGPT_OUT_DIR:-" + default in trainer
    assert "- POCKETGPT_CHECKPOINT=${POCKETGPT_CHECKPOINT:-" + default in server


def test_the_docker_build_context_leaves_out_what_git_ignores() -> None:
    """What git ignores (a virtual env, checkpoints, a downloaded wheel, caches) is not sent
    to the Docker daemon with every build either; deploy/wheels/, the Dockerfile's own
    source of local wheels, is the one exception."""
    root = README_PATH.parent

    def patterns(name: str) -> list[str]:
        lines = (root / name).read_text(encoding="utf-8").splitlines()
        return [line.strip() for line in lines if line.strip() and not line.startswith("#")]

    docker = patterns(".dockerignore")
    kept_out = [p.rstrip("/") for p in patterns(".gitignore") if p.rstrip("/") != "deploy/wheels"]
    assert [p for p in kept_out if p not in docker and f"**/{p}" not in docker] == []
    # The last pattern a path matches decides: the exception comes after what it undoes.
    assert docker.index("!deploy/wheels") > max(docker.index("**/*.whl"), docker.index("deploy/*"))
