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
import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple

from pydantic import BaseModel

from dmd_core.errors import InputError
from dmd_core.faults import fault_point

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


def required_files(manifest: Manifest) -> list[str]:
    """The files an output of ``manifest.stage`` must have, whatever its manifest lists (stage modules say)."""
    from .registry import STAGES

    for s in STAGES:
        if s.name == manifest.stage:
            return getattr(s.module, "required_files", lambda m: [])(manifest)
    return []  # a side cache (reference statistics, teacher numbers): its listed files


def bad_files(out_dir: str | Path, manifest: Manifest, deep: bool = False) -> list[str]:
    """Names of the manifest's files that are missing or whose size or sha256 does not match, and of the
    files the output must have that the manifest does not list (a manifest is not trusted for its own list)."""
    out_dir = Path(out_dir)
    hashes = file_hashes(out_dir, [f.name for f in manifest.files], out_dir / RECORD, deep)
    listed = {f.name for f in manifest.files}
    unlisted = [f"{n} (not in the manifest)" for n in required_files(manifest) if n not in listed]
    return [f.name for f in manifest.files if hashes[f.name] != f.sha256] + unlisted


def verified_manifest(out_dir: str | Path, deep: bool = False) -> Manifest | None:
    """The manifest if the output is complete and every checksum verifies, else None."""
    m = read_manifest(out_dir)
    return m if m is not None and not bad_files(out_dir, m, deep) else None


class StageOutput(NamedTuple):
    """A complete, verified stage output: where it is and what its manifest says."""

    out_dir: Path
    manifest: Manifest


# ---------------------------------------------------------------- building under a hidden name

PARTIAL = ".partial"
_TMP_NAME = re.compile(r"^\..*\.tmp(-(\d+))?$")


def partial_dir(out_dir: Path) -> Path:
    """Where an output is built: a hidden sibling, renamed to ``out_dir`` once its manifest is written.

    So a final name only ever holds a complete output, and an interrupted build keeps its finished
    parts (shards, checkpoints) here for the rerun to resume from."""
    return out_dir.parent / f".{out_dir.name}{PARTIAL}"


def final_dir_of(path: Path) -> Path:
    """The final name of a (possibly partial) output directory."""
    name = path.name
    return path.parent / name[1 : -len(PARTIAL)] if name.startswith(".") and name.endswith(PARTIAL) else path


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_orphans(root: Path) -> list[Path]:
    """Delete temporary files and directories (``.<name>.tmp[-PID]``) below ``root`` left by a killed or
    failed writer: they would hold disk space forever. A name with the PID of a live process is kept."""
    removed = []
    if not root.is_dir():
        return removed
    for path in sorted(root.rglob(".*"), key=lambda q: len(q.parts)):
        m = _TMP_NAME.match(path.name)
        if m is None or not os.path.lexists(path):
            continue
        if m.group(2) and int(m.group(2)) != os.getpid() and _pid_alive(int(m.group(2))):
            continue
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() and not path.is_symlink() else path.unlink(missing_ok=True)
        removed.append(path)
    if removed:
        log.info("removed %d temporary file(s) left by an interrupted run under %s", len(removed), root)
    return removed


@contextlib.contextmanager
def output_lock(out_dir: Path):
    """One builder per output at a time (other processes wait, then reuse what it made).

    ``flock`` on a hidden lock file beside the output: the kernel drops it when its holder dies, so a
    killed run never leaves a stale lock."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(out_dir.parent / f".{out_dir.name}.lock", "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting: another process is building %s", out_dir)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def publish(work: Path, out_dir: Path) -> None:
    """Rename a built output to its final name (the last step of every build)."""
    fault_point("publish")
    if out_dir.exists():  # an older, failing copy that was not moved aside (e.g. read-only parts): replace it
        shutil.rmtree(out_dir)
    os.replace(work, out_dir)


def disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` is the disk (or quota) running out, as an OSError or as torch's serializer reports it."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("unexpected pos" in text or "No space left" in text or "file write failed" in text)


def disk_full_error(where: Path) -> InputError:
    """The one-line error for a full disk under ``where`` (finished parts are kept; temporary files removed)."""
    try:
        free = shutil.disk_usage(where if where.exists() else where.parent).free
        room = f" ({free / 2**20:.1f} MiB free)"
    except OSError:
        room = ""
    return InputError(
        f"disk full while writing under {where}{room}. Fix: free space (or set store to a larger disk) and rerun: "
        "finished parts are kept and the run resumes."
    )


def reuse_or_build(stage: str, out_dir: Path, config_text: str, build: Callable[[Path], Manifest]) -> Manifest:
    """The cache policy of every stage: a complete, verified output is reused; a failing one is named
    and redone (its finished parts kept for resume); otherwise ``build(work_dir)`` makes it under a hidden
    name (``partial_dir``), which is renamed to ``out_dir`` when complete."""
    m = _reusable(stage, out_dir)
    if m is not None:
        return m
    with output_lock(out_dir):
        m = _reusable(stage, out_dir, quiet=True)  # another process may have finished it while we waited
        if m is not None:
            return m
        work = partial_dir(out_dir)
        if out_dir.exists():  # failing verification: its parts are the partial output now
            (out_dir / MANIFEST).unlink(missing_ok=True)
            shutil.rmtree(work, ignore_errors=True) if work.exists() else None
            os.replace(out_dir, work)
        remove_orphans(work)
        remove_orphans(out_dir.parent.parent / DIGESTS)
        try:
            work.mkdir(parents=True, exist_ok=True)
            write_text_atomic(work / "config.yaml", config_text)
            m = build(work)
            publish(work, out_dir)
        except BaseException as e:
            remove_orphans(work)
            if disk_full(e):
                raise disk_full_error(out_dir.parent) from None
            raise
    return m


def _reusable(stage: str, out_dir: Path, quiet: bool = False) -> Manifest | None:
    m = read_manifest(out_dir)
    if m is None:
        if out_dir.exists() and not quiet:
            log.warning("%s: %s has no readable manifest.json: redoing it", stage, out_dir)
        return None
    bad = bad_files(out_dir, m)
    if not bad:
        if not quiet:
            log.info("%s: cached output %s is complete and verified", stage, out_dir)
        return m
    log.warning("%s: %s fails verification (%s): redoing it", stage, out_dir, ", ".join(bad[:5]))
    return None


def save_side_output(out_dir: Path, stage: str, key: str, code_version: str, names: list[str], upstream: dict[str, str]) -> Manifest:
    """A manifest for a cache beside the stages (reference statistics, the teacher's numbers): such
    caches are trusted only when they verify, like every stage output."""
    m = Manifest(stage=stage, key=key, code_version=code_version, config={}, pipeline_config={}, upstream=upstream,
                 files=[file_entry(out_dir / n) for n in names], wall_time_s=0.0, created_unix=time.time())  # fmt: skip
    m.save(out_dir)
    return m


def remove_output(out_dir: Path) -> None:
    """Delete an output (``--refresh``), its verification record and any partial build included."""
    shutil.rmtree(out_dir, ignore_errors=True)
    shutil.rmtree(partial_dir(out_dir), ignore_errors=True)


class Timer:
    def __init__(self) -> None:
        self.start = time.perf_counter()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.start
