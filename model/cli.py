"""What every pocketgpt command does with a bad command line: one `error:` line on
stderr naming the flag, exit status 2, no usage block (as for every other bad input)."""

from __future__ import annotations

import argparse
from typing import NoReturn


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message}\n")
