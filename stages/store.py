"""Content-addressed stage outputs: keys, manifests, checksums, verification records, the cache policy.

A stage's output directory is ``<store>/<stage>/<key>`` where ``key`` hashes (stage name, stage
config, upstream digests, stage code version). ``manifest.json`` is written last: its presence and
verified checksums mean the output is complete (docs/formats.md).

Verification is cheap after the first time: beside each output a hidden ``.verified.json`` records,
per file, (size, mtime_ns, inode, sha256) as of its last full check. A later check re-hashes only the
files whose stat changed; ``dmd verify --deep`` re-hashes everything (a file edited in place that kept
its size, mtime and inode is caught only then). Directory digests of inputs outside the store (the
teacher, the classifier) are cached the same way under ``<store>/.digests/``.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple

from pydantic import BaseModel

MANIFEST = "manifest.json"
RECORD = ".verified.json"  # hidden: never part of a manifest or a directory digest
DIGESTS = ".digests"
HASH_LOG = "DMD_HASH_LOG"  # a file each process appends "<pid> <bytes hashed>" to at exit (benchmarks)
log = logging.getLogger("dmd")


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


# ---------------------------------------------------------------- verification records


def _stat_key(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return (st.st_size, st.st_mtime_ns, st.st_ino)


# (path, size, mtime_ns, inode) -> sha256, for this process: a file state is hashed at most once.
_SEEN: dict[tuple[str, int, int, int], str] = {}


def _read_record(path: Path) -> dict[str, list]:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_record(path: Path, record: dict[str, list]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, json.dumps(record, sort_keys=True))
    except OSError:  # a read-only store: verification still works, it is just not remembered
        pass


def file_hashes(root: Path, names: list[str], record_path: Path, deep: bool = False) -> dict[str, str | None]:
    """sha256 of each ``root/name`` (None if absent), re-hashing only files whose stat changed since
    ``record_path`` was written (every file when ``deep``); the record is updated."""
    record = {} if deep else _read_record(record_path)
    out: dict[str, str | None] = {}
    fresh: dict[str, list] = {}
    for name in names:
        path = root / name
        st = _stat_key(path) if path.is_file() else None
        if st is None:
            out[name] = None
            continue
        seen_key = (str(path.resolve()), *st)
        old = record.get(name)
        if old is not None and tuple(old[:3]) == st:
            sha = old[3]
        elif not deep and seen_key in _SEEN:
            sha = _SEEN[seen_key]
        else:
            sha = sha256_file(path)
        _SEEN[seen_key] = sha
        out[name] = sha
        fresh[name] = [*st, sha]
    if fresh != {k: v for k, v in record.items() if k in fresh} or deep:
        _write_record(record_path, {**record, **fresh})
    return out


def tree_files(path: Path) -> list[str]:
    """Relative names of the non-hidden files below ``path``, sorted."""
    return sorted(
        str(p.relative_to(path))
        for p in path.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )


def _digest_record_path(store: str | Path, path: Path) -> Path:
    return Path(store) / DIGESTS / (hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:24] + ".json")


def dir_digest(path: str | Path, store: str | Path | None = None) -> str:
    """sha256 over (relative path, file sha256) of every non-hidden file below ``path``.

    With ``store``, per-file hashes are remembered in ``<store>/.digests/`` (re-hashed when their stat changes).
    """
    root = Path(path)
    names = tree_files(root)
    if store is None:
        return digest_json([(n, sha256_file(root / n)) for n in names])
    hashes = file_hashes(root, names, _digest_record_path(store, root))
    return digest_json([(n, hashes[n]) for n in names])


def file_digest(path: str | Path, store: str | Path) -> str:
    """sha256 of one file outside the store (weights, reference statistics), remembered like dir_digest."""
    p = Path(path)
    return file_hashes(p.parent, [p.name], _digest_record_path(store, p))[p.name] or ""


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
        """Write manifest.json (last) and the verification record of the files it lists."""
        out_dir = Path(out_dir)
        record = {}
        for f in self.files:
            st = _stat_key(out_dir / f.name)
            if st is not None and st[0] == f.size:
                record[f.name] = [*st, f.sha256]
        _write_record(out_dir / RECORD, record)
        path = out_dir / MANIFEST
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


def bad_files(out_dir: str | Path, manifest: Manifest, deep: bool = False) -> list[str]:
    """Names of the manifest's files that are missing or whose size or sha256 does not match."""
    out_dir = Path(out_dir)
    hashes = file_hashes(out_dir, [f.name for f in manifest.files], out_dir / RECORD, deep)
    return [f.name for f in manifest.files if hashes[f.name] != f.sha256]


def verified_manifest(out_dir: str | Path, deep: bool = False) -> Manifest | None:
    """The manifest if the output is complete and every checksum verifies, else None."""
    m = read_manifest(out_dir)
    return m if m is not None and not bad_files(out_dir, m, deep) else None


class StageOutput(NamedTuple):
    """A complete, verified stage output: where it is and what its manifest says."""

    out_dir: Path
    manifest: Manifest


def reuse_or_build(stage: str, out_dir: Path, config_text: str, build: Callable[[], Manifest]) -> Manifest:
    """The cache policy of every stage: a complete, verified output is reused; a failing one is named
    and redone (its finished parts kept for resume); otherwise ``build`` makes it."""
    m = read_manifest(out_dir)
    if m is not None:
        bad = bad_files(out_dir, m)
        if not bad:
            log.info("%s: cached output %s is complete and verified", stage, out_dir)
            return m
        log.warning("%s: %s fails verification (%s): redoing it", stage, out_dir, ", ".join(bad[:5]))
        (out_dir / MANIFEST).unlink()
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out_dir / "config.yaml", config_text)
    return build()


def save_side_output(out_dir: Path, stage: str, key: str, code_version: str, names: list[str], upstream: dict[str, str]) -> Manifest:
    """A manifest for a cache beside the stages (reference statistics, the teacher's numbers): such
    caches are trusted only when they verify, like every stage output."""
    m = Manifest(stage=stage, key=key, code_version=code_version, config={}, pipeline_config={}, upstream=upstream,
                 files=[file_entry(out_dir / n) for n in names], wall_time_s=0.0, created_unix=time.time())  # fmt: skip
    m.save(out_dir)
    return m


def remove_output(out_dir: Path) -> None:
    """Delete an output (``--refresh``), its verification record included."""
    shutil.rmtree(out_dir, ignore_errors=True)


class Timer:
    def __init__(self) -> None:
        self.start = time.perf_counter()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.start
