"""The store on object storage: ``store: s3://bucket/prefix`` (AWS S3, MinIO, any S3-compatible server) or
``gs://bucket/prefix`` (Google Cloud Storage), through a bucket class (bucket.py, gcs.py) whose versions of an
object (an ETag, a generation) tell its writes apart.

In the bucket, below the prefix:

- ``<stage>/<key>/<files>`` and ``<stage>/<key>/manifest.json``: an output, complete only when its manifest
  object exists. The manifest is written last; a prefix without one is never read as an output.
- ``<stage>/.<key>.partial/<files>``: a build's objects, uploaded there first and then copied under the
  final prefix (server-side), so the final prefix only ever receives a finished build.
- ``<stage>/.<key>.lock``: the one builder's lease (lease.py: conditional create, heartbeat, take-over).

On this machine (``DMD_STORE_CACHE``, default ``~/.cache/dmd/stores``; one folder per store URL):

- ``<stage>/<key>/``: the output materialised, what ``output_dir`` hands the stages. ``.cached.json``
  records the digest of the manifest it was materialised from and, per file, (size, mtime_ns, inode,
  sha256, ETag). Checking a cached output reads its manifest object and lists its objects (two small
  requests), downloads nothing and hashes nothing; a file whose ETag in the bucket or whose stat here
  changed is downloaded again and verified against the manifest's sha256.
- ``<stage>/.<key>.partial/``: the local work directory a stage builds in, as with the local store
  (interrupted builds resume from it on this machine); ``.digests/`` and scratch folders.

Every local path is the local store's (a ``LocalStore`` on the cache folder): links refused, temporary
files of dead writers removed, digests of inputs remembered.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Callable, Iterator

from dmd_core.errors import InputError, shown
from dmd_core.faults import fault_point

from ..contract import MANIFEST, ORDER, Manifest, spec
from ..files import sha256_file, tmp_sibling, write_bytes_atomic, write_text_atomic
from .base import SIDE_CACHES, Store, record_parts
from .bucket import Bucket
from .lease import held, leased
from .local import PARTIAL, RECORD, RECORDS, LocalStore, plain_name, tree_files

CACHE_ENV = "DMD_STORE_CACHE"
RECORD_TRIES = 20  # conditional writes of one record lost to other writers before giving up
CACHED = ".cached.json"  # hidden: never uploaded, never part of a manifest
FETCHED = ".fetched.json"  # hidden: the object versions a folder fetched by input_dir holds
log = logging.getLogger("dmd")


def cache_folder(url: str) -> Path:
    """This machine's folder for the store ``url``: below ``DMD_STORE_CACHE`` (default ``~/.cache/dmd/stores``)."""
    base = os.environ.get(CACHE_ENV, "").strip() or os.path.join(os.environ.get("XDG_CACHE_HOME", "").strip() or "~/.cache", "dmd", "stores")
    scheme, _, rest = url.partition("://")
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", rest).strip("-.")[:60]
    return Path(base).expanduser().absolute() / f"{scheme}-{slug}-{hashlib.sha256(url.encode()).hexdigest()[:12]}"


class ObjectStore(Store):
    """Stage outputs in a bucket, materialised on demand in a local cache (see the module doc)."""

    def __init__(self, url: str, bucket: type = Bucket):
        """``bucket``: the bucket class of the URL's service (``open_store`` picks it by scheme)."""
        self.root = url.rstrip("/")
        self.bucket = bucket(self.root)
        if not self.bucket.bucket:
            raise InputError(f"store {shown(url)} names no bucket. Fix: store: {url.partition('://')[0]}://BUCKET/PREFIX.")
        self.local = LocalStore(cache_folder(self.root))
        self._just_read: dict[str, bytes] = {}  # manifest bytes read_manifest fetched, for the problems() call that follows

    def __repr__(self) -> str:
        return f"ObjectStore({self.root!r})"

    # ---- names (local paths; the bucket's names follow from them)
    def output_dir(self, stage: str, key: str) -> Path:
        return self.local.output_dir(stage, key)

    def side_dir(self, kind: str, key: str) -> Path:
        return self.local.side_dir(kind, key)

    def absolute_root(self) -> str:
        return self.root

    def scratch_dir(self, name: str) -> Path:
        return self.local.scratch_dir(name)

    def final_dir(self, work: Path) -> Path:
        return self.local.final_dir(work)

    def input_dir(self, path: str) -> Path:
        """``<root>/<stage>/<key>`` is that output's folder here (fetched when it is verified); a folder inside an
        output that its manifest does not list (``<root>/distill/<key>/checkpoints/step-N``: checkpoints are uploaded
        with the output, never fetched by its readers) is fetched now; else a path."""
        rest = path[len(self.root) + 1 :].strip("/").split("/") if path.startswith(self.root + "/") else []
        if len(rest) < 2 or any(p.startswith(".") or p in ("", "..") for p in rest):
            return Path(path)
        if len(rest) == 2:
            return self.local.output_dir(*rest)
        return self._fetch_folder("/".join(rest)) if rest[0] in ORDER else Path(path)

    def _fetch_folder(self, rel: str) -> Path:
        """The bucket folder ``rel`` copied into this machine's scratch space; files whose object version was
        fetched before are kept. Its contents are checked by their reader (a checkpoint by its checksums.json)."""
        objects = self.bucket.listing(rel)
        if not objects:
            raise InputError(f"{shown(f'{self.root}/{rel}')} holds nothing in the bucket. Fix: name a folder of a published output "
                             f"(e.g. {self.root}/distill/<key>/checkpoints/step-N).")  # fmt: skip
        here = self.scratch_dir("fetched") / rel
        record = _read_json(here / FETCHED)
        todo = [n for n, (size, version) in objects.items()
                if not plain_name(n) or record.get(n) != version or _stat_key(here / n) is None or (here / n).stat().st_size != size]  # fmt: skip
        bad = [n for n in todo if not plain_name(n)]
        if bad:
            raise InputError(f"{shown(f'{self.root}/{rel}/{bad[0]}')} is not a plain name. Fix: name another folder.")
        for n in todo:
            (here / n).parent.mkdir(parents=True, exist_ok=True)
        self._download([(f"{rel}/{n}", here / n) for n in todo])
        write_text_atomic(here / FETCHED, json.dumps({n: v for n, (_, v) in objects.items()}))
        return here

    def file_url(self, out: Path, name: str) -> str:
        remote = self._remote(out)
        if remote is not None and _streamed(remote.split("/")[0], name):
            return f"{self.root}/{remote}/{name}"
        return str(out / name)

    def _remote(self, out: Path) -> str | None:
        """The bucket folder of an output (``<stage>/<key>``); None for any other path (a work directory, an
        output a setting names outside the store): those are local directories."""
        below = self.local._below_root(Path(out))
        if below is None:
            return None
        parts = below[1]
        if len(parts) != 2 or any(p.startswith(".") or p == ".." for p in parts):
            return None
        return f"{parts[0]}/{parts[1]}"

    def outputs(self) -> Iterator[tuple[str, Path]]:
        for kind in [*ORDER, *SIDE_CACHES]:
            for key in self.bucket.folders(kind):
                if not key.startswith(".") and self.bucket.exists(f"{kind}/{key}/{MANIFEST}"):
                    yield kind, self.local.output_dir(kind, key)

    # ---- reading
    def _manifest_bytes(self, remote: str) -> bytes | None:
        got = self.bucket.read(f"{remote}/{MANIFEST}")
        return None if got is None else got[0]

    def read_manifest(self, out: Path) -> Manifest | None:
        remote = self._remote(out)
        if remote is None:
            return self.local.read_manifest(out)
        data = self._manifest_bytes(remote)
        if data is not None:
            self._just_read[remote] = data
        try:
            return None if data is None else Manifest.model_validate_json(data)
        except ValueError:
            return None

    def problems(self, out: Path, m: Manifest, deep: bool = False) -> list[str]:
        """The output as the bucket holds it, materialised here: files whose bytes (downloaded when this
        machine has no verified copy of that object version) fail the manifest's sha256, and files the
        bucket lacks. ``deep``: every file downloaded and hashed again."""
        remote = self._remote(out)
        if remote is None:
            return self.local.problems(out, m, deep)
        data = self._just_read.pop(remote, None) or self._manifest_bytes(remote)
        if data is None:
            return [f"{MANIFEST} (missing in the bucket)"]
        try:
            if Manifest.model_validate_json(data) != m:
                return [f"{MANIFEST} (changed in the bucket since it was read)"]
        except ValueError:
            return [f"{MANIFEST} (unreadable)"]
        digest = hashlib.sha256(data).hexdigest()
        out = self.local._no_links_in(Path(out))
        record = {} if deep else _read_cached(out / CACHED, digest)
        objects = self.bucket.listing(remote)
        bad: list[str] = []
        fresh: dict[str, list] = {}
        fetch: list[tuple[str, str, str]] = []  # (name, sha256, ETag) of the files to download
        for f in m.files:
            if not plain_name(f.name):
                bad.append(f"{f.name} (outside the output)")
                continue
            obj = objects.get(f.name)
            if obj is None:
                bad.append(f"{f.name} (missing in the bucket)")
                continue
            path = out / f.name
            self.local.contained(path)
            st = _stat_key(path)
            old = record.get(f.name)
            if old is not None and st is not None and tuple(old[:3]) == st and old[3] == f.sha256 and old[4] == obj[1]:
                fresh[f.name] = old  # this object version was verified here, and the copy is unchanged
                continue
            if obj[0] != f.size:
                bad.append(f"{f.name} (size {obj[0]} in the bucket, {f.size} in the manifest)")
                continue
            if _streamed(m.stage, f.name) and not deep:  # read where it lies; its reader checks the sha256
                continue
            fetch.append((f.name, f.sha256, obj[1]))
        # an object's ETag as listed before its download: one replaced meanwhile fails its next check, not this one
        for (name, sha, etag), ok in zip(fetch, self._fetch(remote, out, [(n, s) for n, s, _ in fetch])):
            if ok:
                fresh[name] = [*_stat_key(out / name), sha, etag]
            else:
                bad.append(name)
        listed = {f.name for f in m.files}
        bad += [f"{n} (not in the manifest)" for n in self.required(m) if n not in listed]
        if not bad:
            if not (out / MANIFEST).is_file() or (out / MANIFEST).read_bytes() != data:
                write_bytes_atomic(out / MANIFEST, data)
            if fresh != record:
                _write_cached(out / CACHED, digest, fresh)
        return bad

    def _download(self, pairs: list[tuple[str, Path]]) -> None:
        """(object, local file) pairs downloaded concurrently, each to a temporary name renamed into place."""
        tmps = [tmp_sibling(path) for _, path in pairs]
        try:
            self.bucket.download_many([(rel, str(t)) for (rel, _), t in zip(pairs, tmps)])
            for (_, path), t in zip(pairs, tmps):
                os.replace(t, path)
        finally:
            for t in tmps:
                t.unlink(missing_ok=True)

    def _fetch(self, remote: str, out: Path, files: list[tuple[str, str]]) -> list[bool]:
        """Download (name, sha256) files of the output ``remote`` into ``out``, concurrently, each under a temporary
        name renamed once its bytes have the sha256 (a damaged object never replaces a copy here); whether each did."""
        if not files:
            return []
        tmps = [tmp_sibling(out / n) for n, _ in files]
        for t in tmps:
            t.parent.mkdir(parents=True, exist_ok=True)
        done = []
        try:
            self.bucket.download_many([(f"{remote}/{n}", str(t)) for (n, _), t in zip(files, tmps)])
            for (name, sha), tmp in zip(files, tmps):
                ok = sha256_file(tmp) == sha
                if ok:
                    os.replace(tmp, out / name)
                done.append(ok)
        finally:
            for t in tmps:
                t.unlink(missing_ok=True)
        return done

    def digest(self, path: str | Path) -> str:
        return self.local.digest(path)

    # ---- writing
    def save_manifest(self, m: Manifest, work: Path) -> None:
        self.local.save_manifest(m, work)

    def partial_dir(self, out: Path) -> Path:
        return self.local.partial_dir(out)

    def _lock_name(self, out: Path) -> str:
        remote = self._remote(out)
        if remote is None:
            raise InputError(f"{shown(str(out))} is not an output of the store {shown(self.root)}. Fix: build outputs through the store.")
        stage, key = remote.split("/")
        return f"{stage}/.{key}.lock"

    def lock(self, out: Path):
        """A lease on ``<stage>/.<key>.lock`` in the bucket (lease.py): one builder on any host."""
        out.parent.mkdir(parents=True, exist_ok=True)
        return leased(self.bucket, self._lock_name(out), f"{out.parent.name} {out.name}")

    def publish(self, work: Path, out: Path) -> None:
        """Upload the work directory under the hidden partial prefix, copy it under the final prefix, make it this
        machine's materialised copy, and write the manifest object last. Interrupted anywhere before the
        manifest, a rerun finds no output, takes the copy back as its work directory (finished parts kept,
        finished uploads skipped) and publishes again."""
        remote = self._remote(out)
        if remote is None:
            return self.local.publish(work, out)
        self.local._no_links_in(work)
        self.local.contained(out)
        fault_point("publish")
        data = (work / MANIFEST).read_bytes()
        m = Manifest.model_validate_json(data)
        stage, key = remote.split("/")
        partial = f"{stage}/.{key}{PARTIAL}"
        names = [n for n in tree_files(work) if n != MANIFEST]  # every file the stage left (checkpoints too), as the local store keeps them
        self._upload(work, partial, names)
        fault_point("publish/uploaded")
        self.bucket.copy([(f"{partial}/{n}", f"{remote}/{n}") for n in names])
        objects = self.bucket.listing(remote)
        self.bucket.delete([f"{remote}/{n}" for n in objects if n not in names and n != MANIFEST])  # an older build's leftovers
        fault_point("publish/copied")
        # this machine's copy: the work directory itself, recorded against the objects just copied
        record = _read_json(work / RECORD)
        fresh = {}
        for f in m.files:
            st, rec, obj = _stat_key(work / f.name), record.get(f.name), objects.get(f.name)
            if st is not None and rec is not None and tuple(rec[:3]) == st and rec[3] == f.sha256 and obj is not None:
                fresh[f.name] = [*st, f.sha256, obj[1]]
        _write_cached(work / CACHED, hashlib.sha256(data).hexdigest(), fresh)
        if out.exists():
            shutil.rmtree(out)
        os.replace(work, out)
        self.bucket.delete([f"{partial}/{n}" for n in names])
        fault_point("publish/moved")
        lease = held(self.bucket, self._lock_name(out))
        if lease is not None:
            lease.confirm()  # a builder whose lock was taken over publishes nothing
        self.bucket.put(f"{remote}/{MANIFEST}", data)  # the output exists from here on
        (out / ".uploaded.json").unlink(missing_ok=True)

    def _partial_prefix(self, work: Path) -> str | None:
        """The bucket's partial prefix of a local work directory (``<stage>/.<key>.partial``), or None."""
        below = self.local._below_root(Path(work))
        parts = below[1] if below is not None else ()
        if len(parts) != 2 or not (parts[1].startswith(".") and parts[1].endswith(PARTIAL)) or parts[0] not in ORDER:
            return None
        return f"{parts[0]}/{parts[1]}"

    def keep_progress(self, work: Path, names: list[str], last: str | None = None) -> None:
        """Upload ``names`` (then ``last``) under the build's partial prefix, skipping those already there unchanged:
        a build of the same output on another machine starts from them (``take_progress``)."""
        partial = self._partial_prefix(work)
        if partial is None:
            return
        self._upload(work, partial, [n for n in names if n != last])
        if last is not None:
            fault_point("keep-progress/uploaded")
            self._upload(work, partial, [last])

    def drop_progress(self, work: Path, folder: str) -> None:
        partial = self._partial_prefix(work)
        if partial is not None:
            self.bucket.delete([f"{partial}/{folder}/{n}" for n in self.bucket.listing(f"{partial}/{folder}")])

    def take_progress(self, work: Path, names: list[str] | None = None) -> int:
        """The partial prefix's objects (of ``names``, default all) that ``work`` lacks, downloaded: progress kept by
        builds elsewhere. Each part verifies itself before the build trusts it (a checkpoint its checksums.json,
        a shard its .sha256). Returns how many files came."""
        partial = self._partial_prefix(work)
        if partial is None:
            return 0
        there = self.bucket.listing(partial)
        todo = [n for n in sorted(there if names is None else set(names) & set(there)) if plain_name(n) and not (work / n).exists()]
        if not todo:
            return 0
        log.info("%s: taking %d files kept by builds elsewhere from %s", work.parent.name, len(todo), shown(f"{self.root}/{partial}"))
        for n in todo:
            self.local.contained(work / n).parent.mkdir(parents=True, exist_ok=True)
        self._download([(f"{partial}/{n}", work / n) for n in todo])
        done = _read_json(work / ".uploaded.json")  # already in the bucket: a publish does not upload them again
        done.update({n: [*_stat_key(work / n), there[n][1]] for n in todo})
        write_text_atomic(work / ".uploaded.json", json.dumps(done, sort_keys=True))
        return len(todo)

    def _upload(self, work: Path, partial: str, names: list[str]) -> None:
        """Upload ``names`` under ``partial``, skipping files an interrupted publish already uploaded unchanged
        (``.uploaded.json``: stat and ETag per file)."""
        mark = work / ".uploaded.json"
        done = _read_json(mark)
        there = self.bucket.listing(partial)
        todo = []
        for n in names:
            st, rec = _stat_key(work / n), done.get(n)
            if not (rec is not None and st is not None and tuple(rec[:3]) == st and there.get(n, (None, None))[1] == rec[3]):
                todo.append(n)
        self.bucket.upload([(str(work / n), f"{partial}/{n}") for n in todo])
        there = self.bucket.listing(partial)
        done.update({n: [*_stat_key(work / n), there[n][1]] for n in names if n in there})
        write_text_atomic(mark, json.dumps(done, sort_keys=True))
        missing = [n for n in names if n not in there]
        if missing:
            raise InputError(f"uploading {work} to {shown(self.root)}: {', '.join(missing[:3])} did not arrive. Fix: rerun (finished uploads are kept).")

    def set_aside(self, out: Path, work: Path) -> None:
        remote = self._remote(out)
        if remote is not None:
            self.bucket.delete([f"{remote}/{MANIFEST}"])  # a failing output stops being one before anything is rebuilt
            (self.local.contained(out) / CACHED).unlink(missing_ok=True)
        self.local.set_aside(out, work)
        if self._partial_prefix(work) is not None:
            work.mkdir(parents=True, exist_ok=True)
            self.take_progress(work)

    def clean(self, work: Path) -> None:
        self.local.clean(work)

    def remove(self, out: Path) -> None:
        remote = self._remote(out)
        if remote is not None:
            stage, key = remote.split("/")
            self.bucket.delete([f"{remote}/{MANIFEST}"])  # first: never an output with missing objects
            partial = f"{stage}/.{key}{PARTIAL}"
            self.bucket.delete([f"{remote}/{n}" for n in self.bucket.listing(remote)] + [f"{partial}/{n}" for n in self.bucket.listing(partial)])
        self.local.remove(out)

    def check_writable(self) -> None:
        """The local cache folder as the local store checks its root, then the bucket: reachable, writable, and
        honouring conditional writes."""
        self.local.check_writable()
        self.bucket.check()

    def free_bytes(self) -> int:
        return self.local.free_bytes()  # stages build on this machine's disk

    def has_outputs(self, stage: str) -> bool:
        return self.local.has_outputs(stage) or bool(self.bucket.folders(stage))

    def noted(self, name: str) -> bool:
        return self.local.noted(name)  # facts about this machine's inputs and devices: remembered here

    def note(self, name: str) -> None:
        self.local.note(name)

    # ---- records (promotions, run history): ``records/<name>`` objects in the bucket, each one PUT (whole or absent)
    def read_record(self, name: str) -> bytes | None:
        got = self.bucket.read(f"{RECORDS}/{'/'.join(record_parts(name))}")
        return None if got is None else got[0]

    def update_record(self, name: str, change: Callable[[bytes | None], bytes | None]) -> bytes | None:
        """Read the record and its ETag, then write ``change(old)`` only if it is still that version
        (If-Match; If-None-Match when there was none): a concurrent update makes this one read again."""
        rel = f"{RECORDS}/{'/'.join(record_parts(name))}"
        for _ in range(RECORD_TRIES):
            got = self.bucket.read(rel)
            old = None if got is None else got[0]
            new = change(old)
            if new is None:
                return old
            done = self.bucket.create(rel, new) if got is None else self.bucket.replace(rel, new, got[1])
            if done is not None:
                return new
        raise InputError(f"record {shown(rel)} in {shown(self.root)} kept changing under {RECORD_TRIES} updates. Fix: rerun.")

    def add_record(self, name: str, data: bytes) -> None:
        rel = f"{RECORDS}/{'/'.join(record_parts(name))}"
        if self.bucket.create(rel, data) is None:
            raise InputError(f"record {shown(rel)} already exists in {shown(self.root)}. Fix: rerun (a new name is drawn).")

    def record_names(self, folder: str) -> list[str]:
        return sorted(n for n in self.bucket.listing(f"{RECORDS}/{'/'.join(record_parts(folder))}") if "/" not in n and not n.startswith("."))


def _streamed(stage: str, name: str) -> bool:
    """Whether readers stream this file of a ``stage`` output from the bucket (StageSpec.streamed)."""
    return stage in ORDER and any(fnmatch.fnmatchcase(name, pattern) for pattern in spec(stage).streamed)


def _stat_key(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except (FileNotFoundError, NotADirectoryError):
        return None
    return (st.st_size, st.st_mtime_ns, st.st_ino)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _read_cached(path: Path, digest: str) -> dict[str, list]:
    """The per-file record of a materialised output, if it was made from the manifest with this digest."""
    data = _read_json(path)
    files = data.get("files")
    return files if data.get("manifest") == digest and isinstance(files, dict) else {}


def _write_cached(path: Path, digest: str, files: dict[str, list]) -> None:
    try:
        write_text_atomic(path, json.dumps({"manifest": digest, "files": files}, sort_keys=True))
    except OSError:  # a read-only cache: verification still works, it is just not remembered
        pass
