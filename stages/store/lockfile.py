"""One builder per output: ``flock`` on a lock file that names its holder.

The holder, once it has the flock, writes (pid, host, start time) into the lock file and rewrites it every
lease/4 seconds from a thread (a heartbeat). A waiter says once whom it waits for and polls. When the
holder's record has not changed for the lease (``DMD_LOCK_LEASE_S``) and the holder is a stopped process
(state ``T``) of this host and user, the very process the record names (its kernel start time matches),
the waiter ends it with SIGKILL: the kernel drops its flock and the waiter builds, resuming its partial
build as after any kill -9. A silent holder it cannot prove stopped (running but hung, on another host,
another user's) is refused with its pid, host and the fix instead (docs/store.md).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
import re
import signal
import socket
import stat
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Iterator

from dmd_core.errors import InputError, shown

LEASE_ENV = "DMD_LOCK_LEASE_S"
DEFAULT_LEASE_S = 600.0
RECORD_BYTES = 512  # the record is rewritten in place at this fixed size: a reader never sees it shrink
_HOST = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,252}$")
log = logging.getLogger("dmd")


def lease_s() -> float:
    """Seconds a lock holder may go without a heartbeat before a waiter reports it (``DMD_LOCK_LEASE_S``)."""
    raw = os.environ.get(LEASE_ENV, "").strip()
    if not raw:
        return DEFAULT_LEASE_S
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise InputError(
            f"{LEASE_ENV}={shown(raw, 40)} is not a positive number of seconds. "
            f"Fix: set it to how long a silent lock holder is waited for (default {DEFAULT_LEASE_S:g}), or unset it."
        )
    return value


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host runs (a zombie, dead but not yet reaped by its parent, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    fields = _stat_fields(pid)
    return not (fields and fields[0] == "Z")


def _stat_fields(pid: int | str) -> list[str] | None:
    """``/proc/<pid>/stat`` after the command name (which may hold spaces and parentheses), None when unreadable."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rpartition(")")[2].split()


def process_state(pid: int) -> str | None:
    """The one-letter state of a process on this host (``T``: stopped), None when it is gone or unknown."""
    fields = _stat_fields(pid)
    if fields is None:
        return None if not pid_alive(pid) else "?"
    return fields[0] if fields else "?"


def process_start(pid: int | str) -> int | None:
    """When a process started, in clock ticks since boot (``starttime``): a reused pid has another one."""
    fields = _stat_fields(pid)
    try:
        return int(fields[19]) if fields else None
    except (IndexError, ValueError):
        return None


@dataclass(frozen=True)
class Holder:
    """Who holds a lock, as its lock file says."""

    pid: int
    host: str
    since: str
    start: int | None = None  # process_start of pid on host, when the holder could read it

    @staticmethod
    def parse(data: bytes) -> Holder | None:
        """The holder a lock file names; None when it names none (released, not yet written, or not a record)."""
        try:
            rec = json.loads(data.decode())
            pid, host, since = rec["pid"], rec["host"], rec["since"]
            start = rec.get("start")
            ok = isinstance(pid, int) and pid > 0 and isinstance(host, str) and _HOST.match(host) and isinstance(since, str) and len(since) <= 40
            start = start if isinstance(start, int) and not isinstance(start, bool) else None
            return Holder(pid, host, datetime.fromisoformat(since).isoformat(), start) if ok else None
        except (ValueError, TypeError, KeyError):
            return None

    @property
    def here(self) -> bool:
        return self.host == socket.gethostname()

    def state(self) -> str | None:
        """Its process state when it runs on this host; None when gone, '' when on another host."""
        return process_state(self.pid) if self.here else ""

    def stopped_here(self) -> bool:
        """True when it is a stopped (``T``) process of this host, the very one that wrote the record."""
        return self.here and self.start is not None and process_state(self.pid) == "T" and process_start(self.pid) == self.start

    def __str__(self) -> str:
        return f"pid {self.pid} on {self.host} since {self.since}"


@contextlib.contextmanager
def held(path: Path, what: str) -> Iterator[None]:
    """Hold the lock file ``path`` for building ``what`` ("<stage> <key>"): wait for (or refuse) another
    holder, then keep this process's record in it until the block ends."""
    lease = lease_s()
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise InputError(f"the lock file {shown(str(path))} is not a regular file. Fix: remove it and rerun.")
        _acquire(fd, what, lease)
        beat = _Heartbeat(fd, lease)
        try:
            yield
        finally:
            beat.stop()
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)  # it names no holder once released
    finally:
        os.close(fd)  # drops the flock


def _locked(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def _acquire(fd: int, what: str, lease: float) -> None:
    """Take the flock; while another process has it, poll; once its record is silent for ``lease``, end a
    stopped holder of this host (SIGKILL) and go on waiting for the kernel to drop its flock, or refuse any other.

    Silence is measured on this process's clock from when the record last changed (no clock is compared
    across hosts). A record whose local pid is gone names no one (its flock is held by an inheritor): wait on."""
    if _locked(fd):
        return
    poll = min(0.5, lease / 8)
    start = changed = time.monotonic()
    seen, told = None, False
    while True:
        data = os.pread(fd, 2 * RECORD_BYTES, 0)
        now = time.monotonic()
        if data != seen:
            seen, changed = data, now
        holder = Holder.parse(data)
        state = holder.state() if holder is not None else None
        if holder is not None and state is None:
            holder = None
        if not told and (holder is not None or now - start > 8 * poll):
            log.info("waiting: %s", _waiting(what, holder, state, lease))
            told = True
        if holder is not None and now - changed > lease:
            if not _take_over(what, holder, lease):
                raise _silent(what, holder, state, lease)
            changed = now  # the kernel drops its flock as it exits: wait for that, a lease at most
        time.sleep(poll)
        if _locked(fd):
            return


def _take_over(what: str, holder: Holder, lease: float) -> bool:
    """End ``holder`` if it is a stopped process of this host and user; True when it was ended."""
    if not holder.stopped_here():
        return False
    try:
        os.kill(holder.pid, signal.SIGKILL)
    except ProcessLookupError:
        return True  # it ended by itself meanwhile
    except PermissionError:  # another user's: theirs to end
        return False
    log.warning(
        "took over %s from %s: it was stopped and silent for %g s (%s), so it was ended (SIGKILL); its finished parts are resumed",
        what, holder, lease, LEASE_ENV,
    )
    return True


def _waiting(what: str, holder: Holder | None, state: str | None, lease: float) -> str:
    if holder is None:
        return f"{what} is being built by another process (its lock names no holder). To build it here instead, stop that process."
    stopped = f"; it is stopped: kill -CONT {holder.pid} resumes it" if state and state in "Tt" else ""
    return (
        f"{what} is being built by {holder}{stopped} (a holder of this host stopped and silent for {lease:g} s, {LEASE_ENV}, "
        "is ended and its work resumed here; any other silent holder is reported). "
        "To build it here instead, stop that process."
    )


def _silent(what: str, holder: Holder, state: str | None, lease: float) -> InputError:
    how = "is stopped and has not answered" if state and state in "Tt" else "has not answered"
    where = "" if holder.here else f"on {holder.host}, "
    return InputError(
        f"{what} is being built by {holder}, which {how} for {lease:g} s ({LEASE_ENV}). "
        f"Fix: {where}let it finish (kill -CONT {holder.pid} if it was stopped) or end it (kill {holder.pid}) and rerun: "
        "its finished parts are kept."
    )


class _Heartbeat:
    """This process's record in the lock file, rewritten every lease/4 seconds until ``stop``."""

    def __init__(self, fd: int, lease: float):
        self.fd, self.beat = fd, 0
        self.since = datetime.now().astimezone().isoformat(timespec="seconds")
        self.start = process_start("self")
        os.ftruncate(fd, 0)
        self._write()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(lease / 4,), name="dmd-lock-heartbeat", daemon=True)
        self._thread.start()

    def _write(self) -> None:
        rec = {"pid": os.getpid(), "host": socket.gethostname(), "since": self.since, "start": self.start, "beat": self.beat}
        os.pwrite(self.fd, json.dumps(rec).encode().ljust(RECORD_BYTES - 1) + b"\n", 0)

    def _run(self, every: float) -> None:
        while not self._done.wait(every):
            self.beat += 1
            with contextlib.suppress(OSError):  # a full disk: the record stays as it was
                self._write()

    def stop(self) -> None:
        self._done.set()
        self._thread.join()
