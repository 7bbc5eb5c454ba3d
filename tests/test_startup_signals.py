"""Ctrl-C or SIGTERM while a command imports torch (1-2 s, the first thing each one does)
ends it with one line and 128 + the signal's number, not Python's traceback of the
import under way (Ctrl-C) or a silent death (SIGTERM)."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from model.cli import (
    Terminated,
    default_signal_actions,
    exit_on_signals_while_importing,
    interrupted_status,
    signals_unwind,
    unusable_path,
)
from tests.test_training_pretrain import CORPUS, REPO, TINY, python_env

# Runs MODULE ARGS as `python -m` does, sending the signal to itself as the command first
# imports IMPORTED: where a signal lands in practice, without a race against a clock.
SIGNAL_AT_IMPORT = """
import os, runpy, signal, sys

class SignalAtImport:
    def __init__(self, stop, imported):
        self.stop, self.imported = stop, imported

    def find_spec(self, name, path=None, target=None):
        if name == self.imported:
            sys.meta_path.remove(self)
            os.kill(os.getpid(), self.stop)
        return None

sys.meta_path.insert(0, SignalAtImport(signal.Signals[sys.argv[1]], sys.argv[2]))
module, sys.argv = sys.argv[3], sys.argv[3:]
runpy.run_module(module, run_name="__main__", alter_sys=True)
"""


def run_signalled_at_import(
    stop: signal.Signals, imported: str, module: str, args: list[str]
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", SIGNAL_AT_IMPORT, stop.name, imported, module, *args],
        cwd=REPO,
        env=python_env(),
        capture_output=True,
        text=True,
        timeout=60,
        # A shell's background job ignores SIGINT, and a child inherits that: restore it.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
# numpy: imported from inside torch's C extension, whose import swallows its exceptions
# (the server, stopped there, started anyway).
@pytest.mark.parametrize("imported", ["torch", "numpy"])
@pytest.mark.parametrize(
    ("module", "said"),
    [
        ("training.pretrain", "interrupted before training started: no checkpoint written"),
        ("training.evaluate", "interrupted: no bits per byte"),
        ("server", "interrupted before the server started"),
    ],
)
def test_a_signal_while_torch_imports_ends_the_command_in_one_line(
    tmp_path: Path, stop: signal.Signals, imported: str, module: str, said: str
) -> None:
    run = tmp_path / "run"
    # The server is given a folder that exists: a missing one is refused before torch's
    # import, which then never runs.
    (folder := tmp_path / "a-folder").mkdir()
    args = {
        "training.pretrain": [*TINY, "--data", str(CORPUS), "--out-dir", str(run)],
        "training.evaluate": ["--checkpoint", str(run), "--data", str(CORPUS)],
        "server": ["--checkpoint", str(folder), "--port", "0"],
    }[module]
    process = run_signalled_at_import(stop, imported, module, args)
    assert (process.returncode, process.stderr) == (128 + stop, said + "\n")
    assert process.stdout == ""
    assert not run.exists()


def test_signals_are_handled_inside_the_block_only_and_an_ignored_one_stays_ignored() -> None:
    # The suite calls commands' main() in its own process: the handlers a command sets
    # must be undone after it, and a background job's ignored Ctrl-C never turned on.
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with signals_unwind():
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            with pytest.raises(Terminated):
                signal.raise_signal(signal.SIGTERM)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) is before[signal.SIGTERM]
        default_signal_actions()
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
        exit_on_signals_while_importing("interrupted")
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)


def test_an_interrupted_command_exits_as_a_shell_reports_the_signal_that_stopped_it() -> None:
    assert interrupted_status(KeyboardInterrupt()) == 128 + signal.SIGINT
    assert interrupted_status(Terminated()) == 128 + signal.SIGTERM


def test_only_a_path_not_ours_to_use_or_too_long_is_refused_as_unusable() -> None:
    # Any other OSError (a missing file, a full disk) is said by the command its own way.
    denied = PermissionError(errno.EACCES, os.strerror(errno.EACCES), "/run/x")
    assert unusable_path(denied) == "error: /run/x: Permission denied"
    too_long = OSError(errno.ENAMETOOLONG, os.strerror(errno.ENAMETOOLONG), "/a" * 300)
    assert unusable_path(too_long) == f"error: {'/a' * 300}: File name too long"
    assert unusable_path(FileNotFoundError(errno.ENOENT, "No such file", "/x")) is None
    assert unusable_path(OSError(errno.EFBIG, "File too large", "/x")) is None


def test_a_command_run_in_a_thread_leaves_the_signals_alone() -> None:
    # Only the main thread may set handlers: a command's main() called from a thread (a
    # test's, a notebook's) must run, not fail on signal.signal's ValueError.
    failed: list[BaseException] = []

    def run() -> None:
        try:
            with signals_unwind():
                pass
        except BaseException as e:
            failed.append(e)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert failed == []
