"""One builder per output on object storage: a lock object created conditionally and held by a lease.

A builder creates ``<stage>/.<key>.lock`` with ``If-None-Match: *``: of any number of racing builders, on
any hosts, exactly one succeeds. Its record names it (pid, host, start time, a random owner id); a thread
rewrites it every lease/4 seconds with ``If-Match`` on the version it last wrote (a heartbeat), and release
deletes it, again only if it is still that version. A waiter polls the object and takes the lock over,
replacing the object with ``If-Match`` on the version it saw (so one waiter wins), when

- the record has not changed for the lease (``DMD_LOCK_LEASE_S``; 120 s by default for object stores),
  measured on the waiter's own clock (no two hosts' clocks are compared): its holder died, hung or lost
  the network; or
- the record names a process of this host that is gone (or whose pid now belongs to another process):
  it died, and waiting out the lease would only delay the rerun.

A holder that was taken over (stopped for longer than the lease, then resumed) learns it at its next
heartbeat or when it is about to publish (``confirm``), and refuses to publish: the builder that took
over publishes. A live holder's heartbeat runs during any long step, so a waiter outlasts any number of
leases and then reuses its output.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from datetime import datetime
from typing import Iterator

from dmd_core.errors import InputError

from .bucket import Bucket
from .lockfile import LEASE_ENV, Holder, lease_s, pid_alive, process_start

DEFAULT_OBJECT_LEASE_S = 120.0  # a dead holder on another host delays a rerun this long; a live one beats every lease/4
log = logging.getLogger("dmd")

_HELD: dict[str, "Lease"] = {}  # lock object -> this process's lease on it


def object_lease_s() -> float:
    """The lease of object-store locks: ``DMD_LOCK_LEASE_S`` when set (validated as for the local store), else 120 s."""
    return lease_s() if os.environ.get(LEASE_ENV, "").strip() else DEFAULT_OBJECT_LEASE_S


class Lease:
    """This process's hold on a lock object: its record, kept fresh by a heartbeat thread until ``stop``."""

    def __init__(self, bucket: Bucket, rel: str, what: str, etag: str, record: dict, lease: float):
        self.bucket, self.rel, self.what, self.etag, self.record = bucket, rel, what, etag, record
        self.lost = False
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(lease / 4,), name="dmd-lease-heartbeat", daemon=True)
        self._thread.start()

    def _run(self, every: float) -> None:
        while not self._done.wait(every):
            self.record["beat"] += 1
            try:
                new = self.bucket.replace(self.rel, _encode(self.record), self.etag)
            except Exception:  # the network: the next beat retries; a waiter takes over only after a whole lease
                continue
            if new is None:
                self.lost = True
                log.warning("%s: another builder took this build's lock over (it was silent for the lease, %s)", self.what, LEASE_ENV)
                return
            self.etag = new

    def confirm(self) -> None:
        """Refuse (InputError) to go on once the lock is another builder's."""
        got = None if self.lost else self.bucket.read(self.rel)
        if got is None or _owner(got[0]) != self.record["owner"]:
            self.lost = True
            raise InputError(
                f"{self.what}: another builder took this build's lock over (this one was silent for the lease, {LEASE_ENV}), "
                "so it publishes nothing. Fix: rerun: the other builder's output is reused once it is published."
            )

    def stop(self) -> None:
        self._done.set()
        self._thread.join()


def held(bucket: Bucket, rel: str) -> Lease | None:
    """This process's lease on the lock object ``rel``, if it holds one."""
    return _HELD.get(bucket.path(rel))


@contextlib.contextmanager
def leased(bucket: Bucket, rel: str, what: str) -> Iterator[Lease]:
    """Hold the lock object ``rel`` for building ``what`` ("<stage> <key>") until the block ends."""
    lease = object_lease_s()
    record = {
        "pid": os.getpid(), "host": socket.gethostname(), "since": datetime.now().astimezone().isoformat(timespec="seconds"),
        "start": process_start("self"), "owner": uuid.uuid4().hex, "beat": 0, "lease_s": lease,
    }  # fmt: skip
    etag = _acquire(bucket, rel, what, record, lease)
    hold = Lease(bucket, rel, what, etag, record, lease)
    _HELD[bucket.path(rel)] = hold
    try:
        yield hold
    finally:
        hold.stop()
        _HELD.pop(bucket.path(rel), None)
        if not hold.lost:
            with contextlib.suppress(Exception):  # unreachable now: the lease expires by itself
                bucket.delete_if(rel, hold.etag)


def _acquire(bucket: Bucket, rel: str, what: str, record: dict, lease: float) -> str:
    """Create the lock object, or wait: poll it, and take it over from a holder proven gone or silent for ``lease``."""
    data = _encode(record)
    etag = bucket.create(rel, data)
    poll = min(1.0, lease / 8)
    changed = time.monotonic()
    seen, told = None, False
    while etag is None:
        got = bucket.read(rel)
        if got is None:  # released between the two requests
            etag = bucket.create(rel, data)
            continue
        body, tag = got
        now = time.monotonic()
        if tag != seen:
            seen, changed = tag, now
        holder = Holder.parse(body)
        gone = holder is not None and _gone(holder)
        if gone or now - changed > lease:
            etag = bucket.replace(rel, data, tag)
            if etag is not None:
                why = "its process is gone" if gone else f"it was silent for {lease:g} s ({LEASE_ENV})"
                log.warning("took over %s from %s: %s; this process builds it", what, holder or "a holder with no record", why)
            continue
        if not told:
            who = holder or "another process (its lock names no holder)"
            log.info("waiting: %s is being built by %s; a holder silent for %g s (%s) is taken over", what, who, lease, LEASE_ENV)
            told = True
        time.sleep(poll)
    return etag


def _gone(holder: Holder) -> bool:
    """Whether ``holder`` is a process of this host that has ended (its pid free, or now another process's)."""
    if not holder.here:
        return False
    if not pid_alive(holder.pid):
        return True
    now = process_start(holder.pid)
    return holder.start is not None and now is not None and now != holder.start


def _owner(data: bytes) -> str | None:
    try:
        return json.loads(data.decode()).get("owner")
    except (ValueError, AttributeError):
        return None


def _encode(record: dict) -> bytes:
    return json.dumps(record).encode()
