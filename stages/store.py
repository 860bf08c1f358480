"""Content-addressed stage outputs: keys, manifests, checksums, atomic writes.

A stage's output directory is ``<store>/<stage>/<key>`` where ``key`` hashes (stage name, stage
config, upstream digests, stage code version). ``manifest.json`` is written last: its presence and
verified checksums mean the output is complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel

MANIFEST = "manifest.json"


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def digest_json(obj: Any) -> str:
    """sha256 of canonical JSON (sorted keys): stable across runs and machines."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def dir_digest(path: str | Path) -> str:
    """sha256 over (relative path, file sha256) of every non-hidden file below ``path``."""
    root = Path(path)
    entries = sorted(
        (str(p.relative_to(root)), sha256_file(p))
        for p in root.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    return digest_json(entries)


def content_key(stage: str, config: dict, upstream: dict[str, str], code_version: str) -> str:
    """The cache key of a stage output: 20 hex digits of sha256 over everything that determines it."""
    return digest_json({"stage": stage, "config": config, "upstream": upstream, "code": code_version})[:20]


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write to a temporary sibling, fsync, then rename: readers never see a partial file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_text_atomic(path: str | Path, text: str) -> None:
    write_bytes_atomic(path, text.encode())


class FileEntry(BaseModel):
    name: str
    size: int
    sha256: str
    samples: int | None = None
    record: bool = False  # kept for people (resolved config, timings): not part of the output's digest


class Manifest(BaseModel):
    stage: str
    key: str
    code_version: str
    config: dict  # the stage's own section
    pipeline_config: dict  # the whole resolved config
    upstream: dict[str, str]  # name -> digest of each input
    files: list[FileEntry]
    info: dict = {}  # stage-specific facts (solver, nfe, ...)
    wall_time_s: float
    created_unix: float = 0.0

    @property
    def digest(self) -> str:
        """Digest of what the stage made (file checksums), which downstream keys use.

        Leaves out record files (``config.yaml`` with its absolute paths, logs with timings): they must
        not change the identity of identical products (same shards on another machine = same digest).
        """
        made = sorted((f for f in self.files if not f.record), key=lambda f: f.name)
        return digest_json([[f.name, f.sha256] for f in made])

    def save(self, out_dir: str | Path) -> Path:
        path = Path(out_dir) / MANIFEST
        write_text_atomic(path, self.model_dump_json(indent=2) + "\n")
        return path


def file_entry(path: Path, samples: int | None = None, sha256: str | None = None, record: bool | None = None) -> FileEntry:
    """Size and checksum of ``path``; pass ``sha256`` when it was just computed (saves a re-read).

    ``config.yaml`` is a record file unless told otherwise.
    """
    record = path.name == "config.yaml" if record is None else record
    return FileEntry(name=path.name, size=path.stat().st_size, sha256=sha256 or sha256_file(path), samples=samples, record=record)


def read_manifest(out_dir: str | Path) -> Manifest | None:
    path = Path(out_dir) / MANIFEST
    if not path.is_file():
        return None
    try:
        return Manifest.model_validate_json(path.read_text())
    except ValueError:
        return None


def bad_files(out_dir: str | Path, manifest: Manifest) -> list[str]:
    """Names of the manifest's files that are missing or whose size or sha256 does not match."""
    out_dir = Path(out_dir)
    bad = []
    for f in manifest.files:
        p = out_dir / f.name
        if not p.is_file() or p.stat().st_size != f.size or sha256_file(p) != f.sha256:
            bad.append(f.name)
    return bad


def verified_manifest(out_dir: str | Path) -> Manifest | None:
    """The manifest if the output is complete and every checksum verifies, else None."""
    m = read_manifest(out_dir)
    return m if m is not None and not bad_files(out_dir, m) else None


class Timer:
    def __init__(self) -> None:
        self.start = time.perf_counter()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.start
