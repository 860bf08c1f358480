"""One builder per output: ``flock`` on a lock file that names its holder.

The holder, once it has the flock, writes (pid, host, start time) into the lock file and rewrites it every
lease/4 seconds from a thread (a heartbeat). A waiter says once whom it waits for and polls; when the
holder's record has not changed for the lease (``DMD_LOCK_LEASE_S``) the holder is stopped or hung, and
the waiter is refused with its pid, host and the fix. The waiter never kills it: a living process keeps
its flock, and whether to resume or end it is its owner's call (docs/store.md). When the holder dies the
kernel drops its flock and the waiter builds, resuming the partial build as after any kill -9.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
import re
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
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def process_state(pid: int) -> str | None:
    """The one-letter state of a process on this host (``T``: stopped), None when it is gone or unknown."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None if not pid_alive(pid) else "?"
    fields = text.rpartition(")")[2].split()  # the command name before it may hold spaces and parentheses
    return fields[0] if fields else "?"


@dataclass(frozen=True)
class Holder:
    """Who holds a lock, as its lock file says."""

    pid: int
    host: str
    since: str

    @staticmethod
    def parse(data: bytes) -> Holder | None:
        """The holder a lock file names; None when it names none (released, not yet written, or not a record)."""
        try:
            rec = json.loads(data.decode())
            pid, host, since = rec["pid"], rec["host"], rec["since"]
            ok = isinstance(pid, int) and pid > 0 and isinstance(host, str) and _HOST.match(host) and isinstance(since, str) and len(since) <= 40
            return Holder(pid, host, datetime.fromisoformat(since).isoformat()) if ok else None
        except (ValueError, TypeError, KeyError):
            return None

    @property
    def here(self) -> bool:
        return self.host == socket.gethostname()

    def state(self) -> str | None:
        """Its process state when it runs on this host; None when gone, '' when on another host."""
        return process_state(self.pid) if self.here else ""

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
    """Take the flock; while another process has it, poll, and refuse once its record is silent for ``lease``.

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
            raise _silent(what, holder, state, lease)
        time.sleep(poll)
        if _locked(fd):
            return


def _waiting(what: str, holder: Holder | None, state: str | None, lease: float) -> str:
    if holder is None:
        return f"{what} is being built by another process (its lock names no holder). To build it here instead, stop that process."
    stopped = f"; it is stopped: kill -CONT {holder.pid} resumes it" if state and state in "Tt" else ""
    return (
        f"{what} is being built by {holder}{stopped} (a holder silent for {lease:g} s, {LEASE_ENV}, is reported, never killed). "
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
        os.ftruncate(fd, 0)
        self._write()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(lease / 4,), name="dmd-lock-heartbeat", daemon=True)
        self._thread.start()

    def _write(self) -> None:
        rec = {"pid": os.getpid(), "host": socket.gethostname(), "since": self.since, "beat": self.beat}
        os.pwrite(self.fd, json.dumps(rec).encode().ljust(RECORD_BYTES - 1) + b"\n", 0)

    def _run(self, every: float) -> None:
        while not self._done.wait(every):
            self.beat += 1
            with contextlib.suppress(OSError):  # a full disk: the record stays as it was
                self._write()

    def stop(self) -> None:
        self._done.set()
        self._thread.join()
