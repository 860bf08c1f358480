"""Run history: one small JSON record per flow run in the store, read back for the trend dashboards.

``records/history/<pipeline>/<teacher>/<UTC time>-<run>.json``: the run's headline metrics, each stage's cache
outcome, wall time and compute, and whether its export was promoted. Kept in the store rather than in the Prefect
database (which a team may reset or move). Each record is written once, under a name of its own (a rename on a
directory, a conditional create on a bucket); names sort by time, so the last N runs are the last N names and a
reader opens only those.
"""

from __future__ import annotations

import json
import time
import uuid

from dmd_core.errors import InputError

from .files import digest_json
from .store import Store

MAX_RUNS = 1000  # the most records a trend reads


def folder(pipeline: str, teacher_digest: str) -> str:
    return f"history/{pipeline}/{digest_json(teacher_digest)[:24]}"


def record_file(now: float, run_id: str | None = None) -> str:
    """A name that sorts by time (microseconds, UTC) and is this run's alone."""
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + f".{int(now % 1 * 1e6):06d}Z"
    return f"{stamp}-{(run_id or uuid.uuid4().hex)[:12]}.json"


def append(store: Store, pipeline: str, teacher_digest: str, record: dict, now: float | None = None, run_id: str | None = None) -> str:
    """Add this run's record (its time added as ``unix``); returns its name."""
    now = time.time() if now is None else now
    name = f"{folder(pipeline, teacher_digest)}/{record_file(now, run_id)}"
    store.add_record(name, (json.dumps({**record, "unix": round(now, 6)}, sort_keys=True) + "\n").encode())
    return name


def last(store: Store, pipeline: str, teacher_digest: str, n: int) -> list[dict]:
    """The last ``n`` runs' records, oldest first; only those ``n`` are read (a listing of names finds them).
    A record that cannot be read (another tool wrote it) is skipped, not fatal to a dashboard."""
    if not 1 <= n <= MAX_RUNS:
        raise InputError(f"runs to show in the trend: {n}. Fix: a number from 1 to {MAX_RUNS}.")
    top = folder(pipeline, teacher_digest)
    records = []
    for name in store.record_names(top)[-n:]:
        data = store.read_record(f"{top}/{name}")
        try:
            record = json.loads(data) if data is not None else None
        except ValueError:
            record = None
        if isinstance(record, dict):
            records.append(record)
    return records
