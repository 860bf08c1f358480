"""The store as a directory on a local (or shared POSIX) file system.

An output is ``<root>/<stage>/<key>/``, built in the hidden sibling ``.<key>.partial`` and renamed
into place (``os.replace``) once its manifest is written, so a final name only ever holds a complete
output. One builder per output: ``flock`` on a hidden lock file, which the kernel drops when its holder
dies. Verification is cheap after the first time: beside each output a hidden ``.verified.json`` records,
per file, (size, mtime_ns, inode, sha256) as of its last full check; a later check re-hashes only the
files whose stat changed (``dmd verify --deep`` re-hashes everything). Digests of inputs outside the
store (teacher, classifier, prompt files) are remembered the same way under ``<root>/.digests/``.

The store never follows a symbolic link below its root: every path it hands out, reads, writes or deletes
is checked (``contained``), a tree it verifies, resumes or cleans is walked for links (``link_below``),
and a link is refused (InputError) rather than read, written or deleted through. The root itself may be
a link (the user's choice, e.g. onto a larger disk): it is resolved once, when the store is opened.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import stat
from pathlib import Path, PurePosixPath
from typing import Callable, Iterator

from dmd_core.errors import InputError, shown
from dmd_core.faults import fault_point

from ..contract import MANIFEST, ORDER, Manifest
from ..files import digest_json, sha256_file, write_bytes_atomic, write_text_atomic
from .base import SIDE_CACHES, Store, record_parts
from .lockfile import held, lease_s, pid_alive

RECORD = ".verified.json"  # hidden: never part of a manifest or a directory digest
DIGESTS = ".digests"
PARTIAL = ".partial"
RECORDS = "records"  # promotion records and run history (stages/promotion.py, stages/history.py)
_TMP_NAME = re.compile(r"^\..*\.tmp(-(\d+))?$")
log = logging.getLogger("dmd")

# (path, size, mtime_ns, inode) -> sha256, for this process: a file state is hashed at most once.
_SEEN: dict[tuple[str, int, int, int], str] = {}


class LocalStore(Store):
    """Stage outputs in the directory ``root`` (see the module doc)."""

    def __init__(self, root: str | Path):
        self.root = str(root)
        self.path = Path(root)
        # Paths below the root are recognised by either name: as given and as resolved (here, once).
        self._roots = (self.path.absolute(), Path(os.path.realpath(self.path)))

    def __repr__(self) -> str:
        return f"LocalStore({self.root!r})"

    # ---- names
    def output_dir(self, stage: str, key: str) -> Path:
        return self.contained(self.path / stage / key)

    def side_dir(self, kind: str, key: str) -> Path:
        return self.contained(self.path / kind / key)

    def absolute_root(self) -> str:
        return str(self.path.resolve())

    def scratch_dir(self, name: str) -> Path:
        return self.contained(self.path / f".{name}")

    def outputs(self) -> Iterator[tuple[str, Path]]:
        for kind in [*ORDER, *SIDE_CACHES]:
            for m in sorted(self.contained(self.path / kind).glob(f"*/{MANIFEST}")):
                yield kind, self.contained(m).parent

    def contained(self, path: Path) -> Path:
        """``path``, once no component of it below the root is a symbolic link (a dangling one included)
        or ``..``; else InputError. A path outside the root (an output a setting names) is not the store's."""
        parts = self._below_root(Path(path))
        if parts is None:
            return path
        here, parts = parts
        for part in parts:
            if part == "..":
                raise InputError(f"{shown(str(path))} leaves the store {shown(self.root)}. Fix: name a path inside the store.")
            here = here / part
            try:
                if stat.S_ISLNK(os.lstat(here).st_mode):
                    raise link_error(here)
            except (FileNotFoundError, NotADirectoryError):  # nothing below a missing component can be a link
                break
        return path

    def _below_root(self, path: Path) -> tuple[Path, tuple[str, ...]] | None:
        """(the root, the parts of ``path`` below it), ``..`` kept (not folded away), or None when outside."""
        p = path.absolute()
        for root in self._roots:
            try:
                return root, p.relative_to(root).parts
            except ValueError:
                continue
        return None

    def _no_links_in(self, top: Path) -> Path:
        """``top`` once it and everything below it is free of links: what the store verifies, resumes from,
        moves or cleans holds only what its stages wrote."""
        self.contained(top)
        link = link_below(top)
        if link is not None:
            raise link_error(link)
        return top

    def final_dir(self, work: Path) -> Path:
        """The output a work directory is published as."""
        name = work.name
        return work.parent / name[1 : -len(PARTIAL)] if name.startswith(".") and name.endswith(PARTIAL) else work

    # ---- reading
    def read_manifest(self, out: Path) -> Manifest | None:
        path = self.contained(Path(out) / MANIFEST)
        if not path.is_file():
            return None
        try:
            return Manifest.model_validate_json(path.read_text())
        except ValueError:
            return None

    def problems(self, out: Path, m: Manifest, deep: bool = False) -> list[str]:
        out = self._no_links_in(Path(out))
        inside = [f.name for f in m.files if plain_name(f.name)]
        hashes = file_hashes(out, inside, out / RECORD, deep)
        listed = {f.name for f in m.files}
        unlisted = [f"{n} (not in the manifest)" for n in self.required(m) if n not in listed]
        wrong = [f.name if f.name in hashes else f"{f.name} (outside the output)" for f in m.files if hashes.get(f.name) != f.sha256]
        return wrong + unlisted

    def digest(self, path: str | Path) -> str:
        """sha256 over (relative path, file sha256) of every non-hidden file below a folder, or the file's sha256."""
        p = Path(path)
        if p.is_file():
            return file_hashes(p.parent, [p.name], self._digest_record(p))[p.name] or ""
        names = tree_files(p)
        hashes = file_hashes(p, names, self._digest_record(p))
        return digest_json([(n, hashes[n]) for n in names])

    def _digest_record(self, path: Path) -> Path:
        return self.contained(self.path / DIGESTS / (hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:24] + ".json"))

    # ---- writing
    def save_manifest(self, m: Manifest, work: Path) -> None:
        work = self.contained(Path(work))
        record = {}
        for f in m.files:
            st = _stat_key(work / f.name)
            if st is not None and st[0] == f.size:
                record[f.name] = [*st, f.sha256]
        _write_record(work / RECORD, record)
        write_text_atomic(work / MANIFEST, m.model_dump_json(indent=2) + "\n")

    def partial_dir(self, out: Path) -> Path:
        return self.contained(out.parent / f".{out.name}{PARTIAL}")

    def lock(self, out: Path):
        """``flock`` on ``.<key>.lock``, which names its holder; a waiter names it too (lockfile.py)."""
        path = self.contained(out.parent / f".{out.name}.lock")
        out.parent.mkdir(parents=True, exist_ok=True)
        return held(path, f"{out.parent.name} {out.name}")

    def publish(self, work: Path, out: Path) -> None:
        self.contained(work)
        self.contained(out)
        fault_point("publish")
        if out.exists():  # an older, failing copy that was not moved aside (e.g. read-only parts): replace it
            shutil.rmtree(out)
        os.replace(work, out)

    def set_aside(self, out: Path, work: Path) -> None:
        self.contained(work)
        if self.contained(out).exists():
            self._no_links_in(out)  # its parts become the work directory a build resumes from
            (out / MANIFEST).unlink(missing_ok=True)
            shutil.rmtree(work, ignore_errors=True) if work.exists() else None
            os.replace(out, work)

    def clean(self, work: Path) -> None:
        remove_orphans(self._no_links_in(work))
        remove_orphans(self.contained(self.path / DIGESTS))

    def remove(self, out: Path) -> None:
        shutil.rmtree(self.contained(out), ignore_errors=True)
        shutil.rmtree(self.partial_dir(out), ignore_errors=True)

    def check_writable(self) -> None:
        """A store that is a file or cannot be written is refused; nothing is created. Writability is probed
        by creating and removing a hidden file: permission bits say nothing for root, nor for read-only mounts."""
        store = self.path.expanduser()
        if store.exists() and not store.is_dir():
            raise InputError(f"store {store} is a file, not a directory. Fix: point store at a directory (--set store=DIR) or move the file away.")
        parent = store
        while not parent.exists() and parent != parent.parent:  # a new store is made inside its nearest existing parent
            parent = parent.parent
        if not parent.is_dir():
            raise InputError(f"store {store} cannot be created: {parent} is a file. Fix: point store at a directory (--set store=DIR).")
        probe = parent / f".write-test-{os.getpid()}"
        try:
            probe.touch()
            probe.unlink()
        except OSError as e:
            what = "store" if parent == store else f"store {store}: its parent"
            raise InputError(
                f"{what} {parent} is not writable ({e.strerror}). Fix: make it writable or point store at a writable directory (--set store=DIR)."
            ) from None
        lease_s()  # a bad DMD_LOCK_LEASE_S is refused now, not when the first lock is waited for
        self._check_own_dirs()

    def _check_own_dirs(self) -> None:
        """Refuse a link among the store's own directories (stages, side caches, ``.digests``, scratch
        folders) before any stage runs: everything below one would be written through it."""
        if not self.path.is_dir():
            return
        with os.scandir(self.path) as entries:
            for e in sorted(entries, key=lambda e: e.name):
                if e.is_symlink() and (e.name in ORDER or e.name in SIDE_CACHES or e.name == RECORDS or e.name.startswith(".")):
                    raise link_error(Path(e.path))

    def free_bytes(self) -> int:
        where = self.path
        while not where.exists():
            where = where.parent
        return shutil.disk_usage(where).free

    def has_outputs(self, stage: str) -> bool:
        return any(self.contained(self.path / stage).glob("*"))

    def noted(self, name: str) -> bool:
        return self.contained(self.path / DIGESTS / name).is_file()

    def note(self, name: str) -> None:
        path = self.contained(self.path / DIGESTS / name)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch()
        except OSError:  # read-only store: validated again next time
            pass

    # ---- records (promotions, run history): <root>/records/<name>, written by rename
    def _record_path(self, name: str) -> Path:
        return self.contained(self.path.joinpath(RECORDS, *record_parts(name)))

    def read_record(self, name: str) -> bytes | None:
        try:
            return self._record_path(name).read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            return None

    def update_record(self, name: str, change: Callable[[bytes | None], bytes | None]) -> bytes | None:
        """Under ``flock`` on a hidden sibling lock file (dropped by the kernel when its holder dies), then
        written to a temporary sibling and renamed."""
        path = self._record_path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = self.contained(path.with_name(f".{path.name}.lock"))
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            old = self.read_record(name)
            new = change(old)
            if new is None:
                return old
            write_bytes_atomic(path, new)
            return new
        finally:
            os.close(fd)  # releases the flock

    def add_record(self, name: str, data: bytes) -> None:
        path = self._record_path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(path, data)

    def record_names(self, folder: str) -> list[str]:
        top = self._record_path(folder)
        try:
            with os.scandir(top) as entries:
                return sorted(e.name for e in entries if not e.name.startswith(".") and e.is_file(follow_symlinks=False))
        except (FileNotFoundError, NotADirectoryError):
            return []


def link_error(link: Path) -> InputError:
    try:
        target = os.readlink(link)
    except OSError:
        target = "?"
    return InputError(
        f"{shown(str(link))} in the store is a symbolic link (to {shown(target)}); the store never reads, writes or deletes through one. "
        "Fix: remove the link and rerun (to keep outputs on another disk, point store at a directory there)."
    )


def link_below(top: Path) -> Path | None:
    """The first symbolic link below the directory ``top`` (links are not followed), or None."""
    todo = [str(top)]
    while todo:
        try:
            entries = os.scandir(todo.pop())
        except (FileNotFoundError, NotADirectoryError):
            continue
        with entries:
            for e in sorted(entries, key=lambda e: e.name):
                if e.is_symlink():
                    return Path(e.path)
                if e.is_dir(follow_symlinks=False):
                    todo.append(e.path)
    return None


def plain_name(name: str) -> bool:
    """Whether a manifest's file name stays inside its output (relative, no ``..``)."""
    p = PurePosixPath(name)
    return bool(name) and not p.is_absolute() and ".." not in p.parts


# ---------------------------------------------------------------- verification records


def _stat_key(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return (st.st_size, st.st_mtime_ns, st.st_ino)


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


def work_hashes(work: Path, names: list[str]) -> dict[str, str | None]:
    """sha256 of files being built in ``work`` (a work directory is local whatever the store), through its
    verification record: what ``remember_hashes`` or an earlier call recorded for a file's current stat is trusted."""
    return file_hashes(work, names, work / RECORD)


def remember_hashes(work: Path, hashes: dict[str, str]) -> None:
    """Record the sha256 of files just written in ``work``, keyed on their stat now, so a resume need not hash
    them. Builders that record at once (ranks of one run) may drop each other's entries: those are hashed again."""
    record = _read_record(work / RECORD)
    for name, sha in hashes.items():
        st = _stat_key(work / name)
        if st is not None:
            record[name] = [*st, sha]
    _write_record(work / RECORD, record)


def tree_files(path: Path) -> list[str]:
    """Relative names of the non-hidden files below ``path``, sorted."""
    return sorted(
        str(p.relative_to(path))
        for p in path.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )


def remove_orphans(root: Path) -> list[Path]:
    """Delete temporary files and directories (``.<name>.tmp[-PID]``) below ``root`` left by a killed or
    failed writer: they would hold disk space forever. A name with the PID of a live process is kept, and
    a symbolic link is neither followed nor deleted (the store makes none)."""
    removed: list[Path] = []
    todo = [root] if root.is_dir() and not root.is_symlink() else []
    while todo:
        try:
            entries = sorted(os.scandir(todo.pop()), key=lambda e: e.name)
        except OSError:
            continue
        for e in entries:
            m = _TMP_NAME.match(e.name)
            if e.is_symlink():
                continue
            if m is None:
                todo += [Path(e.path)] if e.is_dir(follow_symlinks=False) else []
                continue
            if m.group(2) and int(m.group(2)) != os.getpid() and pid_alive(int(m.group(2))):
                continue
            shutil.rmtree(e.path, ignore_errors=True) if e.is_dir(follow_symlinks=False) else Path(e.path).unlink(missing_ok=True)
            removed.append(Path(e.path))
    if removed:
        log.info("removed %d temporary file(s) left by an interrupted run under %s", len(removed), root)
    return removed
