"""What every pocketgpt command shares on its command line: a setting `max_steps` is
the flag `--max-steps` and the environment variable `POCKETGPT_MAX_STEPS`, and a bad
command line is one `error:` line on stderr naming the flag, exit status 2, no usage
block (as for every other bad input)."""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any, NoReturn

ENV_PREFIX = "POCKETGPT_"


def flag(name: str) -> str:
    """The command-line flag of setting `name`."""
    return "--" + name.replace("_", "-")


def env_var(name: str) -> str:
    """The environment variable of setting `name`."""
    return ENV_PREFIX + name.upper()


def is_setting_variable(name: str) -> bool:
    """Whether the environment variable `name` sets a pocketgpt setting (in any case, as
    the server reads them)."""
    return name.upper().startswith(ENV_PREFIX)


class ArgumentParser(argparse.ArgumentParser):
    """Flags are matched whole: argparse's prefix matching took `--max-step 10` for
    `--max-steps`, hiding the typo, and would change a prefix's meaning once another
    flag shares it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message}\n")


class Terminated(BaseException):
    """SIGTERM, unwinding as Ctrl-C's KeyboardInterrupt does (`finally` blocks and
    context managers clean up, the command says what it leaves), where SIGTERM's default
    action killed the process on the spot without a word. A BaseException, as
    KeyboardInterrupt is: no `except Exception` on the way swallows it."""


def _raise_terminated(signum: int, frame: object) -> NoReturn:
    raise Terminated


@contextlib.contextmanager
def _handled_by(on_sigint: Any, on_sigterm: Any) -> Iterator[None]:
    """SIGINT and SIGTERM handled so inside the block, as they were afterwards (the suite
    calls commands' main() in its own process). A signal the process was started
    ignoring (a background job's SIGINT) stays ignored. Only the main thread may set
    handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for s, handler in ((signal.SIGINT, on_sigint), (signal.SIGTERM, on_sigterm)):
        if previous[s] is not signal.SIG_IGN:
            signal.signal(s, handler)
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def signals_unwind() -> contextlib.AbstractContextManager[None]:
    """SIGINT raises KeyboardInterrupt (Python's default) and SIGTERM Terminated inside
    the block."""
    return _handled_by(signal.default_int_handler, _raise_terminated)


def signals_exit(message: str) -> contextlib.AbstractContextManager[None]:
    """SIGINT and SIGTERM print `message` and exit 128 + the signal's number at once
    inside the block: for imports, whose code may catch the exception signals_unwind
    raises (a server stopped while torch's C extension loaded started anyway)."""
    exit_saying_so = _exit_saying(message)
    return _handled_by(exit_saying_so, exit_saying_so)


def _exit_saying(message: str) -> Callable[[int, object], NoReturn]:
    def exit_saying_so(signum: int, frame: object) -> NoReturn:
        print(message, file=sys.stderr)
        exit_now(128 + signum)

    return exit_saying_so


def unusable_path(e: OSError) -> str | None:
    """The one-line refusal of a path a command was given, or one inside it, that it
    cannot use: not this user's to read or write, or a name too long for the file
    system (Python's exists() and is_file() raise that one). None for any other."""
    if isinstance(e, PermissionError) or e.errno == errno.ENAMETOOLONG:
        return f"error: {e.filename}: {e.strerror}"
    return None


def exit_on_signals_while_importing(message: str) -> None:
    """For a command's `__main__`, before its slow imports (torch: 1-2 s): SIGINT and
    SIGTERM print `message` and exit 128 + the signal's number at once, where Ctrl-C
    printed Python's traceback of the import under way. Nothing is open yet to close.
    Call default_signal_actions() once the imports are done, before main(), which
    takes the signals over: a signal after main() is not one before the work began.
    A signal the process was started ignoring stays ignored."""
    exit_saying_so = _exit_saying(message)
    for s in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(s) is not signal.SIG_IGN:
            signal.signal(s, exit_saying_so)


def default_signal_actions() -> None:
    """SIGINT and SIGTERM end the process at once, without a word (their default
    actions), where a handler set earlier would report them as something else: the
    trainer's "interrupted before training started" once it has written checkpoints, or
    exit_on_signals_while_importing's message once the imports are done. Ignored
    signals stay ignored; only the main thread may set handlers."""
    if threading.current_thread() is threading.main_thread():
        for s in (signal.SIGINT, signal.SIGTERM):
            if signal.getsignal(s) is not signal.SIG_IGN:
                signal.signal(s, signal.SIG_DFL)


def interrupted_status(error: BaseException) -> int:
    """The exit status of a command ended by `error` (KeyboardInterrupt or Terminated),
    as a shell reports a process killed by the signal: 128 + its number."""
    return 128 + (signal.SIGINT if isinstance(error, KeyboardInterrupt) else signal.SIGTERM)


def exit_now(code: int) -> NoReturn:
    """Exit with `code` once the standard streams are flushed, skipping the interpreter's
    teardown: where a thread may still be inside torch, finalizing under it can abort the
    process (std::terminate). Only for a process with nothing else left to close."""
    with contextlib.suppress(OSError, ValueError):  # a closed or full stream: exit still
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)
