"""What every pocketgpt command shares on its command line: a setting `max_steps` is
the flag `--max-steps` and the environment variable `POCKETGPT_MAX_STEPS`, and a bad
command line is one `error:` line on stderr naming the flag, exit status 2, no usage
block (as for every other bad input)."""

from __future__ import annotations

import argparse
from typing import Any, NoReturn

ENV_PREFIX = "POCKETGPT_"


def flag(name: str) -> str:
    """The command-line flag of setting `name`."""
    return "--" + name.replace("_", "-")


def env_var(name: str) -> str:
    """The environment variable of setting `name`."""
    return ENV_PREFIX + name.upper()


class ArgumentParser(argparse.ArgumentParser):
    """Flags are matched whole: argparse's prefix matching took `--max-step 10` for
    `--max-steps`, hiding the typo, and would change a prefix's meaning once another
    flag shares it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message}\n")
