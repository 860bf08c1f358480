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
keeps its finished shards in the store (``Store.keep_progress``: under the build's hidden partial prefix in the
bucket), and the publisher (and a partition redone elsewhere) takes the ones its work directory lacks
(``Store.take_progress``), each then checked against the checksum written beside it.
"""

from __future__ import annotations

from pathlib import Path

from dmd_core.errors import InputError
from dmd_core.shards import shard_name, shard_ranges

from ..config import PipelineConfig
from ..store import open_store


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


def take_all_shards(cfg: PipelineConfig, work: Path) -> None:
    """Before the publishing build: the shards other machines kept in the store (object store)."""
    g = cfg.generate
    if g.partitions > 1:
        open_store(cfg.store).take_progress(work, shard_files(range(len(shard_ranges(g.num_samples, g.shard_size)))))

