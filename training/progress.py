"""Progress bars on stderr for long work (tokenizing, training, evaluating): redrawn in
place on a terminal, and whole lines in a log, where tqdm's carriage returns would make
one endless line.
"""

from __future__ import annotations

import sys
from typing import TextIO

from tqdm import tqdm


class _LinePerRefresh:
    """A tqdm bar's stream where stderr is no terminal (a log file, `docker compose
    logs`): each refresh on a line of its own, where tqdm's "\r" would rewrite one line
    for ever (one endless line in the log)."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def write(self, text: str) -> None:
        # A refresh is "\r" + the bar + padding that blanked a longer one; clearing and
        # closing write only "\r", spaces or "\n". A whole line at once: a log reader
        # (docker logs) holds back a line until it ends, and others' lines must not
        # land on its end.
        line = text.replace("\r", "").rstrip()
        if line:
            self.stream.write(line + "\n")

    def flush(self) -> None:
        self.stream.flush()


def bar_output() -> dict:
    """tqdm options for a bar on stderr: on a terminal, redrawn in place; elsewhere, a
    line every 30 s."""
    if sys.stderr.isatty():
        return {"dynamic_ncols": True}
    # miniters 1: each step checks the clock. Left to adapt, miniters grew to the steps of
    # 30 s; once steps slowed (an evaluation), tqdm's monitor thread refreshed the bar
    # (it does so for a bar whose miniters > 1) without moving the time of its last
    # line, and the next step printed another: lines in pairs, seconds apart.
    return {
        "file": _LinePerRefresh(sys.stderr),
        "mininterval": 30.0,
        "miniters": 1,
        "ncols": 100,
    }


def progress_bar(label: str | None, total: int, unit: str) -> tqdm:
    """A tqdm bar on stderr for work that may be long: it shows once the work has run
    for a second (short work prints nothing), and never without a `label`."""
    return tqdm(
        total=total,
        unit=unit,
        unit_scale=True,
        desc=label,
        delay=1.0,
        disable=label is None,
        **bar_output(),
    )
