"""Files on the local disk: checksums and atomic writes. A stage builds its output in a local work
directory with these, whatever store the output is published to."""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any, Callable

from dmd_core.faults import fault_point

HASH_LOG = "DMD_HASH_LOG"  # a file each process appends "<pid> <bytes hashed>" to at exit (benchmarks)


class _HashCounter:
    """Bytes this process has hashed: the benchmark's measure of verification work."""

    bytes = 0


HASHED = _HashCounter()


def log_at_exit(env: str, numbers: Callable[[], list[int]]) -> None:
    """At this process's exit, append ``<pid> <numbers()>`` to the file the variable ``env`` names, if set (the
    counters tests and benchmarks read)."""

    def report() -> None:
        path = os.environ.get(env)
        if path:
            with open(path, "a") as f:
                f.write(" ".join(map(str, [os.getpid(), *numbers()])) + "\n")

    atexit.register(report)


log_at_exit(HASH_LOG, lambda: [HASHED.bytes])


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
            HASHED.bytes += len(block)
    return h.hexdigest()


def digest_json(obj: Any) -> str:
    """sha256 of canonical JSON (sorted keys): stable across runs and machines."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def size_text(n: float) -> str:
    """Bytes for people: '812 B', '3.4 KiB', '1.2 MiB', '5.0 GiB', '2.1 TiB'."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n:,.1f} TiB"


def tmp_sibling(path: Path) -> Path:
    """The temporary name ``path`` is written under before its rename: hidden, and owned by this process (and,
    off the main thread, by this thread: two threads writing one file never share a temporary name)."""
    thread = "" if threading.current_thread() is threading.main_thread() else f".{threading.get_native_id()}"
    return path.with_name(f".{path.name}{thread}.tmp-{os.getpid()}")


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write to a temporary sibling, fsync, then rename: readers never see a partial file.

    A failed write (a full disk) removes its temporary file, so it holds no space."""
    _write_atomic(path, lambda f: f.write(data))


def copy_atomic(src: str | Path, path: str | Path) -> None:
    """Copy ``src`` to ``path`` as ``write_bytes_atomic`` writes (streamed: any size)."""
    with open(src, "rb") as source:
        _write_atomic(path, lambda f: shutil.copyfileobj(source, f, 1 << 20))


def _write_atomic(path: str | Path, write) -> None:
    path = Path(path)
    tmp = tmp_sibling(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        fault_point(f"write/{path.name}")
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def write_text_atomic(path: str | Path, text: str) -> None:
    write_bytes_atomic(path, text.encode())


class Timer:
    def __init__(self) -> None:
        self.start = time.perf_counter()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.start
