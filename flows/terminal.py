"""Each running stage's status line on the flow's stderr (``dmd run``, ``dmd demo``).

The flow's task feeds a :class:`StatusLine` the same :class:`~stages.progress.Progress` events it gives
the stage's progress artifact, and calls :meth:`StatusLine.update` with none at least twice a second,
so a stage that reports nothing (export; distill loading its teacher) still shows that it runs.

- On a terminal: one line per stage, redrawn in place (carriage return, clear to the end of the line)
  whenever its text changes (the elapsed time ticks once a second), ended by the stage's final line
  and a newline.
- Elsewhere (a log file, CI): a plain line at the start, at each phase change, every ``every`` seconds
  (5) and at the end.

Lines look like ``generate  [#####-----]  52%  1065/2048 img  8 shards  00:41 elapsed, ~00:38 left``,
``export: running (00:12)``, ``generate: done in 01:02``, ``generate: cached``. They go to stderr: the
last line on stdout is the output path. The stage's other output reaches the terminal through Prefect's
console log handler (it is forwarded as log records), never through this class; :meth:`StatusLine.sharing`
makes those handlers clear the in-place line before each record and redraw it after.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TextIO

from tqdm import tqdm
from tqdm.utils import disp_trim

from stages.progress import Progress

EVERY = 5.0  # seconds between plain lines when stderr is not a terminal
CLEAR = "\r\x1b[K"  # carriage return, erase to the end of the line (no tqdm helper writes just this)
BAR = "{desc}  [{bar:10}]{percentage:4.0f}%  {n_fmt}/{total_fmt} {unit}{phase}  {elapsed} elapsed"


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or closed
        return False


def _columns(stream: TextIO) -> int:
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, ValueError, OSError):
        return 80


class StatusLine:
    """One stage's status line; ``clock``, ``stream``, ``tty`` and ``width`` are injectable for tests."""

    def __init__(
        self,
        stage: str,
        stream: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
        tty: bool | None = None,
        every: float = EVERY,
        width: int | None = None,
    ):
        self.stage, self.clock, self.every, self.width = stage, clock, every, width
        self.stream = stream if stream is not None else sys.stderr
        self.tty = _isatty(self.stream) if tty is None else tty
        self.started = clock()
        self.latest: Progress | None = None
        self.since: tuple[float, int] | None = None  # (time, done) at the current phase's first event
        self.rate: float | None = None  # units per second in this phase, at its latest event
        self.printed: tuple[float, str | None] | None = None  # not a terminal: (time, phase) of the last line
        self.shown = ""  # on a terminal: the text of the in-place line ("" while there is none)
        self.lock = threading.RLock()  # the task's thread draws, the log pumps' threads log
        self.update()

    def _elapsed(self) -> str:
        return tqdm.format_interval(self.clock() - self.started)

    def text(self) -> str:
        """The line as it stands: a bar once the stage reported progress, a heartbeat before."""
        p = self.latest
        if p is None:
            return f"{self.stage}: running ({self._elapsed()})"
        now = self.clock()
        line = tqdm.format_meter(
            p.done, max(p.total, 1), now - self.started, prefix=self.stage, ascii="-#", unit=p.unit or "it",
            bar_format=BAR, phase=f"  {p.phase}" if p.phase else "",
        )  # fmt: skip
        if p.done >= p.total:  # the stage still writes its output, measures speed, ...
            line += ", finishing"
        elif self.rate:  # not tqdm's {remaining}: that counts from the stage's start (teacher loading included)
            line += f", ~{tqdm.format_interval((p.total - p.done) / self.rate)} left"
        return line

    def update(self, p: Progress | None = None) -> None:
        """A progress event, or ``None``: the clock moved (heartbeat, elapsed time)."""
        with self.lock:
            now = self.clock()
            if p is not None:
                if self.latest is None or p.phase != self.latest.phase:
                    self.since = (now, p.done)
                t0, d0 = self.since  # the rate of this phase at its latest event, as tqdm's (not decaying between events)
                self.rate = (p.done - d0) / (now - t0) if p.done > d0 and now > t0 else None
                self.latest = p
            if self.tty:
                self._draw(self.text())
                return
            phase = None if self.latest is None else self.latest.phase  # None: no progress reported yet
            if self.printed is None or phase != self.printed[1] or now - self.printed[0] >= self.every:
                self._write(self.text() + "\n")
                self.printed = (now, phase)

    def finish(self, rc: int | None) -> None:
        """The stage ended: exit status ``rc``, or ``None`` when the task stopped it (cancelled, Ctrl-C)."""
        if rc == 0:
            end = f"{self.stage}: done in {self._elapsed()}"
        elif rc is None:
            end = f"{self.stage}: stopped after {self._elapsed()}"
        else:
            end = f"{self.stage}: failed (exit status {rc}) after {self._elapsed()}"
        with self.lock:
            self._write((CLEAR if self.tty and self.shown else "") + end + "\n")
            self.shown = ""

    @staticmethod
    def cached(stage: str, stream: TextIO | None = None) -> None:
        """A stage that did not run: Prefect returned its cached result."""
        (stream if stream is not None else sys.stderr).write(f"{stage}: cached\n")

    def _draw(self, text: str) -> None:
        # Hand-written: tqdm draws its own bars this way (tqdm.utils.disp_trim keeps the line within the
        # terminal, so that the carriage return still reaches its start), but offers no writer for a
        # line whose text it did not make.
        text = disp_trim(text, (self.width or _columns(self.stream)) - 1)
        if text != self.shown:
            self._write(CLEAR + text)
            self.shown = text

    def _write(self, s: str) -> None:
        try:
            self.stream.write(s)
            self.stream.flush()
        except (OSError, ValueError):  # a closed or broken stderr never fails the stage
            pass

    @contextmanager
    def sharing(self) -> Iterator[None]:
        """While the stage runs, log handlers that write on this stream take turns with the status line:
        each record clears the in-place line before it is written and redraws it after."""
        handlers = _stream_handlers(self.stream)
        for h in handlers:
            h.emit = self._around(h.emit)  # an instance attribute over the class's method
        try:
            yield
        finally:
            for h in handlers:
                del h.emit

    def _around(self, emit: Callable[[logging.LogRecord], None]) -> Callable[[logging.LogRecord], None]:
        def emit_between(record: logging.LogRecord) -> None:
            with self.lock:
                if self.shown:
                    self._write(CLEAR)
                emit(record)
                if self.shown:
                    self._write(self.shown)

        return emit_between


def _stream_handlers(stream: TextIO) -> list[logging.StreamHandler]:
    """The stream handlers (Prefect's console handler among them) of any logger that write on ``stream``."""

    def same(s: object) -> bool:
        if s is stream:
            return True
        try:
            return s.fileno() == stream.fileno()  # type: ignore[attr-defined]
        except (AttributeError, ValueError, OSError):
            return False

    loggers = [logging.getLogger(), *(lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger))]
    found: dict[int, logging.StreamHandler] = {}
    for lg in loggers:
        for h in lg.handlers:
            if isinstance(h, logging.StreamHandler) and "emit" not in vars(h) and same(h.stream):
                found[id(h)] = h
    return list(found.values())
