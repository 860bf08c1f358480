"""Files on the local disk: checksums and atomic writes. A stage builds its output in a local work
directory with these, whatever store the output is published to."""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

from dmd_core.faults import fault_point

HASH_LOG = "DMD_HASH_LOG"  # a file each process appends "<pid> <bytes hashed>" to at exit (benchmarks)


class _HashCounter:
    """Bytes this process has hashed: the benchmark's measure of verification work."""

    bytes = 0


HASHED = _HashCounter()


def _report_hashed() -> None:
    path = os.environ.get(HASH_LOG)
    if path:
        with open(path, "a") as f:
            f.write(f"{os.getpid()} {HASHED.bytes}\n")


atexit.register(_report_hashed)


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


def tmp_sibling(path: Path) -> Path:
    """The temporary name ``path`` is written under before its rename: hidden, and owned by this process."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write to a temporary sibling, fsync, then rename: readers never see a partial file.

    A failed write (a full disk) removes its temporary file, so it holds no space."""
    path = Path(path)
    tmp = tmp_sibling(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
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
