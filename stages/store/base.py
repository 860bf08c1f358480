"""The store interface: where stage outputs live, how one is found complete, and the cache policy.

An output is addressed by (stage, key) and is complete only when its manifest verifies. A stage always
builds in a local work directory (``partial_dir``); ``publish`` makes it the output. How names, locks,
publishing and verification records are done is the implementation's business (``local.py``: a
directory, ``flock`` and ``os.replace``); stages, the chain and the flow use only this interface.
"""

from __future__ import annotations

import errno
import logging
import re
import time
from abc import ABC, abstractmethod
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Callable, Iterator

from dmd_core.errors import InputError

from ..contract import Manifest, file_entry, required_files

log = logging.getLogger("dmd")
SIDE_CACHES = ("reference", "teacher_eval", "prompt_embeddings", "real_latents")  # outputs beside the stages, computed once and verified like them


class Store(ABC):
    """Where stage outputs live (see the module doc)."""

    root: str

    # ---- names
    @abstractmethod
    def output_dir(self, stage: str, key: str) -> Path:
        """Where the output (stage, key) is read (whether or not it exists yet)."""

    @abstractmethod
    def side_dir(self, kind: str, key: str) -> Path:
        """A cache beside the stages (``reference``, ``teacher_eval``): built once, verified like an output."""

    @abstractmethod
    def absolute_root(self) -> str:
        """The root as another process sees it from anywhere (accelerate workers, flow tasks)."""

    @abstractmethod
    def scratch_dir(self, name: str) -> Path:
        """A local folder for the run's own files (flow plans and configs, launch configs); never an output."""

    @abstractmethod
    def outputs(self) -> Iterator[tuple[str, Path]]:
        """(stage or side-cache kind, output) for every output that has a manifest, in pipeline order."""

    # ---- reading
    @abstractmethod
    def read_manifest(self, out: Path) -> Manifest | None:
        """The output's manifest as written (None when absent or unreadable); not yet verified."""

    @abstractmethod
    def problems(self, out: Path, m: Manifest, deep: bool = False) -> list[str]:
        """Files of ``m`` missing or failing their checksum, and files the output must hold that ``m`` does not list."""

    @abstractmethod
    def digest(self, path: str | Path) -> str:
        """Digest of an input outside the store (a folder or a file: teacher, classifier, prompt file), remembered."""

    def input_dir(self, path: str) -> Path:
        """The folder of an output a setting names (``distill.pairs``, ``evaluate.distill``, ``distill.resume_from``):
        a path, or (an object store) one of the store's outputs, or a folder inside one, by its URL."""
        return Path(path)

    def file_url(self, out: Path, name: str) -> str:
        """Where a reader opens file ``name`` of the output ``out``: its path (an object store: the object's URL
        for the files the stage's ``streamed`` patterns name, which are never copied here)."""
        return str(out / name)

    def verified(self, out: Path, deep: bool = False) -> Manifest | None:
        """The manifest if the output is complete and every checksum verifies, else None."""
        m = self.read_manifest(out)
        return m if m is not None and not self.problems(out, m, deep) else None

    # ---- writing
    @abstractmethod
    def save_manifest(self, m: Manifest, work: Path) -> None:
        """Write the manifest into a work directory, last (and whatever the store keeps to verify it cheaply)."""

    @abstractmethod
    def partial_dir(self, out: Path) -> Path:
        """The local work directory an output is built in; an interrupted build's finished parts stay there."""

    def keep_progress(self, work: Path, names: list[str], last: str | None = None) -> None:
        """Make files of ``work`` (names relative to it), finished parts of an unfinished build (a distill
        checkpoint, generate's shards), available to a build of the same output on another machine; ``last`` (the
        file marking a part complete) after the others. A directory store's work directories are the store's own
        already."""

    def drop_progress(self, work: Path, folder: str) -> None:
        """Forget ``work/folder`` as ``keep_progress`` kept it (a checkpoint superseded by newer ones)."""

    def take_progress(self, work: Path, names: list[str] | None = None) -> int:
        """What builds elsewhere kept (``keep_progress``) of ``names`` (default all) and ``work`` lacks, brought
        into ``work``; how many files came (an object store's builds start with it, in ``set_aside``)."""
        return 0

    @abstractmethod
    def lock(self, out: Path) -> AbstractContextManager:
        """One builder per output at a time; released when its holder dies."""

    @abstractmethod
    def publish(self, work: Path, out: Path) -> None:
        """Make a built work directory the output (the last step of every build)."""

    @abstractmethod
    def set_aside(self, out: Path, work: Path) -> None:
        """A failing output's parts become the work directory (a rebuild resumes from them)."""

    @abstractmethod
    def clean(self, work: Path) -> None:
        """Remove what interrupted writers left below ``work`` (temporary files of dead processes)."""

    @abstractmethod
    def remove(self, out: Path) -> None:
        """Delete an output and any partial build of it (``--refresh``)."""

    @abstractmethod
    def check_writable(self) -> None:
        """Refuse (InputError) a store that cannot be written, or not safely (a link among its own
        directories, a bad lock lease), before any stage runs; creates nothing."""

    @abstractmethod
    def free_bytes(self) -> int:
        """Room left for new outputs."""

    @abstractmethod
    def has_outputs(self, stage: str) -> bool:
        """Whether any output (or partial build) of ``stage`` is in the store."""

    @abstractmethod
    def noted(self, name: str) -> bool:
        """Whether ``note(name)`` was called on this store (small facts remembered across runs)."""

    @abstractmethod
    def note(self, name: str) -> None:
        """Remember ``name`` (best effort: a read-only store forgets)."""

    # ---- records: small JSON documents beside the outputs (promotions, run history), named by relative paths
    @abstractmethod
    def read_record(self, name: str) -> bytes | None:
        """The record ``name`` (e.g. ``promotions/default/<teacher>.json``) as last written whole; None when absent."""

    @abstractmethod
    def update_record(self, name: str, change: Callable[[bytes | None], bytes | None]) -> bytes | None:
        """Replace the record ``name`` by ``change(current)`` (None: leave it) as one atomic step: a reader sees
        the old record or the new one, never part of one, and two updaters never lose one's change (``change``
        may be called again with the other's record). Returns the record as it is after the update."""

    @abstractmethod
    def add_record(self, name: str, data: bytes) -> None:
        """Write a new record under a name nobody else writes (run history: time + random), atomically."""

    @abstractmethod
    def record_names(self, folder: str) -> list[str]:
        """Names of the records directly in ``folder`` (relative to it), sorted; [] when there is none."""

    # ---- the cache policy of every stage
    def reuse_or_build(self, stage: str, out: Path, config_text: str, build: Callable[[Path], Manifest]) -> Manifest:
        """A complete, verified output is reused; a failing one is named and redone (its finished parts kept
        for resume); otherwise ``build(work)`` makes it in ``partial_dir(out)`` and it is published."""
        from ..files import write_text_atomic

        m = self._reusable(stage, out)
        if m is not None:
            return m
        with self.lock(out):
            m = self._reusable(stage, out, quiet=True)  # another process may have finished it while we waited
            if m is not None:
                return m
            work = self.partial_dir(out)
            self.set_aside(out, work)
            self.clean(work)
            try:
                work.mkdir(parents=True, exist_ok=True)
                write_text_atomic(work / "config.yaml", config_text)
                m = build(work)
                self.publish(work, out)
            except BaseException as e:
                self.clean(work)
                if disk_full(e):
                    raise disk_full_error(out.parent) from None
                raise
        return m

    def _reusable(self, stage: str, out: Path, quiet: bool = False) -> Manifest | None:
        m = self.read_manifest(out)
        if m is None:
            if out.exists() and not quiet:
                log.warning("%s: %s has no readable manifest.json: redoing it", stage, out)
            return None
        bad = self.problems(out, m)
        if not bad:
            if not quiet:
                log.info("%s: cached output %s is complete and verified", stage, out)
            return m
        log.warning("%s: %s fails verification (%s): redoing it", stage, out, ", ".join(bad[:5]))
        return None

    def cached_side_output(self, out: Path) -> bool:
        """Whether a side cache is complete and verifies (a failing one is named, and recomputed by the caller)."""
        if self.verified(out) is not None:
            return True
        if self.read_manifest(out) is not None or (out / "manifest.json").is_file():
            log.warning("%s fails verification: recomputing it", out)
        return False

    def publish_side_output(self, out: Path, kind: str, key: str, code_version: str, upstream: dict[str, str], write: Callable[[Path], list[str]]) -> Manifest:
        """A side cache, made like an output: ``write(work)`` writes its files and returns their names, the
        manifest is written last and the work directory published, one writer at a time."""
        with self.lock(out):
            m = self.verified(out)
            if m is not None:  # another process built it while this one waited on the lock: reused, not rebuilt
                return m
            work = self.partial_dir(out)
            self.set_aside(out, work)
            self.clean(work)
            work.mkdir(parents=True, exist_ok=True)
            names = write(work)
            m = Manifest(stage=kind, key=key, code_version=code_version, config={}, pipeline_config={}, upstream=upstream,
                         files=[file_entry(work / n) for n in names], wall_time_s=0.0, created_unix=time.time())  # fmt: skip
            self.save_manifest(m, work)
            self.publish(work, out)
        return m

    @staticmethod
    def required(m: Manifest) -> list[str]:
        return required_files(m)


RECORD_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")


def record_parts(name: str) -> list[str]:
    """The parts of a record's name: plain names only (no ``..``, no hidden names, no absolute path)."""
    parts = name.split("/")
    if not parts or not all(RECORD_NAME.match(p) for p in parts):
        raise InputError(f"record name {name!r} is not a plain relative path. Fix: use letters, digits, '.', '_' and '-' in each part.")
    return parts


def disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` is the disk (or quota) running out, as an OSError or as torch's serializer reports it."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("unexpected pos" in text or "No space left" in text or "file write failed" in text)


def disk_full_error(where: Path) -> InputError:
    """The one-line error for a full disk under ``where`` (finished parts are kept; temporary files removed)."""
    import shutil

    try:
        free = shutil.disk_usage(where if where.exists() else where.parent).free
        room = f" ({free / 2**20:.1f} MiB free)"
    except OSError:
        room = ""
    return InputError(
        f"disk full while writing under {where}{room}. Fix: free space (or set store to a larger disk) and rerun: "
        "finished parts are kept and the run resumes."
    )
