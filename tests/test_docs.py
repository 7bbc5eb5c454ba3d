"""The README stays true: every trainer and server setting is documented there."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from server.settings import Settings
from training.args import TrainArgs

README = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


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
