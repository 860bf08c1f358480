"""``generate.partitions: N``: the pairs' shards in N contiguous ranges, each built on its own, published once.

A partition writes its shards into the output's one work directory (``Store.partial_dir``) exactly as a
one-process run writes them: sample i's noise depends only on (seed, i) and a shard's bytes only on its
samples, so the output is byte-identical whatever N, and N is not in the cache key. Nothing is published
by a partition (``generate.build_partition``); the publishing build (``generate.build``, the flow's ``generate`` task) finds every shard
there and verified, writes the manifest and publishes. A partition killed mid-way is redone alone: the
shards it finished, and every other partition's, verify and are kept. Two builders of one partition at
once (a retry while the first still runs) write the same bytes under atomic renames, so partitions take
no lock; the output's lock is the publisher's.

Where partitions run on different machines: a directory store must be on a shared file system (the work
directory is the store's own). An object store's work directory is local to each machine, so a partition
uploads its finished shards under the build's hidden partial prefix in the bucket (``<stage>/.<key>.partial/``),
and the publisher (and a partition redone elsewhere) downloads the ones its work directory lacks, each
then checked against the checksum written beside it.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from dmd_core.errors import InputError
from dmd_core.shards import shard_name, shard_ranges

from ..config import PipelineConfig
from ..files import tmp_sibling, write_text_atomic
from ..store import Store, open_store

STAGE = "generate"
UPLOADED = ".uploaded.json"  # the object store's record of a work directory's files already in the bucket
log = logging.getLogger("dmd")


def partition_ranges(num_shards: int, n: int) -> list[range]:
    """``n`` contiguous ranges of shard indices covering ``range(num_shards)`` in order, sizes differing by at
    most one (the first ones larger); a partition beyond the shards is empty."""
    q, r = divmod(num_shards, n)
    out, start = [], 0
    for k in range(n):
        size = q + (k < r)
        out.append(range(start, start + size))
        start += size
    return out


def partition_shards(cfg: PipelineConfig, k: int) -> range:
    """The shard indices of partition ``k`` of ``generate.partitions``."""
    g = cfg.generate
    if not 0 <= k < g.partitions:
        raise InputError(f"generate partition {k} does not exist: generate.partitions={g.partitions}. Fix: --partition 0 to {g.partitions - 1}.")
    return partition_ranges(len(shard_ranges(g.num_samples, g.shard_size)), g.partitions)[k]


def shard_files(shards: range | list[int]) -> list[str]:
    """A shard's files: the shard and the checksum beside it (checksum first: a publisher that sees a shard
    sees its checksum)."""
    return [name for i in shards for name in (f"{shard_name(i)}.sha256", shard_name(i))]


def _partial_prefix(store: Store, work: Path) -> str | None:
    """The bucket prefix a work directory's files are kept under (object store), else None."""
    if getattr(store, "bucket", None) is None:
        return None
    return f"{STAGE}/{work.name}"  # work is <cache>/generate/.<key>.partial


def keep_shards(store: Store, work: Path, names: list[str]) -> None:
    """Make finished shards of an unfinished build available to the machine that publishes it: an object store
    uploads them under the build's partial prefix (files already there unchanged are skipped); a directory
    store's work directory is shared already."""
    partial = _partial_prefix(store, work)
    if partial is not None:
        store._upload(work, partial, names)


def take_shards(store: Store, work: Path, names: list[str]) -> int:
    """Download the kept files of ``names`` that ``work`` lacks (object store); their checksums are verified by
    the build that reads them (``finished_shards``). Returns how many were downloaded."""
    partial = _partial_prefix(store, work)
    if partial is None:
        return 0
    there = store.bucket.listing(partial)
    todo = [n for n in names if n in there and not (work / n).exists()]
    if not todo:
        return 0
    log.info("generate: taking %d files kept by other machines from %s/%s", len(todo), store.root, partial)
    tmps = [tmp_sibling(work / n) for n in todo]
    try:
        store.bucket.download_many([(f"{partial}/{n}", str(t)) for n, t in zip(todo, tmps)])
        for n, t in zip(todo, tmps):
            os.replace(t, work / n)
    finally:
        for t in tmps:
            t.unlink(missing_ok=True)
    # recorded as in the bucket already, so the publish that follows does not upload them again
    try:
        done = json.loads((work / UPLOADED).read_text())
    except (OSError, ValueError):
        done = {}
    for n in todo:
        st = (work / n).stat()
        done[n] = [st.st_size, st.st_mtime_ns, st.st_ino, there[n][1]]
    write_text_atomic(work / UPLOADED, json.dumps(done, sort_keys=True))
    return len(todo)


def take_all_shards(cfg: PipelineConfig, work: Path) -> None:
    """Before the publishing build: the shards other machines kept in the store (object store)."""
    g = cfg.generate
    if g.partitions > 1:
        take_shards(open_store(cfg.store), work, shard_files(range(len(shard_ranges(g.num_samples, g.shard_size)))))

