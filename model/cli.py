"""What every pocketgpt command shares on its command line: a setting `max_steps` is
the flag `--max-steps` and the environment variable `POCKETGPT_MAX_STEPS`, and a bad
command line is one `error:` line on stderr naming the flag, exit status 2, no usage
block (as for every other bad input)."""

from __future__ import annotations

import argparse
from typing import NoReturn

ENV_PREFIX = "POCKETGPT_"


def flag(name: str) -> str:
    """The command-line flag of setting `name`."""
    return "--" + name.replace("_", "-")


def env_var(name: str) -> str:
    """The environment variable of setting `name`."""
    return ENV_PREFIX + name.upper()


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message}\n")
