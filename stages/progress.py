"""Progress of a stage: a tqdm bar on a terminal; under the flow, lines it turns into progress artifacts.

The flow sets ``DMD_PROGRESS_LINES=1`` for its stage subprocesses (accelerate workers inherit it). A bar
then prints ``dmd-progress <stage> <done> <total> <unit> <phase>`` on stdout, at most once per whole
percent, instead of drawing: the flow reads those lines (progress artifacts, the terminal's status line:
``flows/terminal.py``), the run log stays readable.
"""

from __future__ import annotations

import os
import sys
from typing import NamedTuple

from tqdm.auto import tqdm

ENV = "DMD_PROGRESS_LINES"
PREFIX = "dmd-progress "


class Progress(NamedTuple):
    stage: str
    done: int
    total: int
    phase: str
    unit: str = ""

    @property
    def percent(self) -> float:
        return 100.0 * self.done / max(self.total, 1)


class ProgressLines:
    """The part of tqdm's interface the stages use, printing ``dmd-progress`` lines."""

    def __init__(self, stage: str, total: int, initial: int = 0, phase: str = "", unit: str = "it"):
        self.stage, self.total, self.n, self.phase = stage, total, initial, phase
        self.unit = unit.replace(" ", "_") or "it"  # one word: the phase after it may have spaces
        self.last_percent = -1
        self._emit()

    def _emit(self, force: bool = False) -> None:
        pct = int(100 * self.n / max(self.total, 1))
        if force or pct > self.last_percent:
            self.last_percent = pct
            line = f"{PREFIX}{self.stage} {self.n} {self.total} {self.unit} {self.phase}"
            print(line.rstrip(), file=sys.stdout, flush=True)

    def update(self, n: int = 1) -> None:
        self.n += n
        self._emit()

    def set_description(self, phase: str) -> None:
        self.phase = phase
        self._emit(force=True)

    def set_postfix(self, **_: object) -> None:
        pass

    def close(self) -> None:
        pass


Bar = tqdm | ProgressLines


def progress_bar(stage: str, total: int, show: bool, initial: int = 0, unit: str = "it", phase: str = "") -> Bar:
    """A bar over ``total`` units of a stage's work; ``show=False`` (quiet, or not rank 0) shows nothing."""
    if show and os.environ.get(ENV) == "1":
        return ProgressLines(stage, total, initial, phase, unit)
    desc = f"{stage} {phase}".strip()
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=not show, dynamic_ncols=True)


def parse_progress(line: str) -> Progress | None:
    """The :class:`Progress` a ``dmd-progress`` line reports; ``None`` for any other line."""
    if not line.startswith(PREFIX):
        return None
    parts = line[len(PREFIX) :].split(" ", 4)
    try:
        rest = parts[3:] + ["", ""]
        return Progress(parts[0], int(parts[1]), int(parts[2]), phase=rest[1], unit=rest[0])
    except (IndexError, ValueError):
        return None
