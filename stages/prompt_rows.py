"""Prompt embeddings, encoded once per (text encoder, prompt file, dtype) and read back by index.

Side output ``<store>/prompt_embeddings/<key>/`` (docs/formats.md, "Prompt embeddings"):
``<part>-%06d.npy`` (rows of ``ROWS_PER_SHARD`` prompts: ``hidden``, and ``pooled`` where the layout has
one), ``null-<part>.npy`` (CFG's unconditional row), ``prompts.bin`` + ``prompt_offsets.npy`` (the texts,
read by index), ``manifest.json`` last. The key is the text encoder's digest (the teacher folders the
layout's encoder reads), the prompt file's identity (``<digest>:<column>``, as the stages' keys hold it)
and the storage dtype, so generate, distill, evaluate and a resumed distill share one output; each
finished shard survives a kill (a rerun encodes only the missing ones). One process encodes: others wait
on the store's lock, then read. Memory is one batch of prompts and one shard of rows at a time.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from dmd_core.rows import NpyRows, PromptRows, PromptTexts, ShardedRows, write_prompt_texts
from dmd_core.text import iter_prompts

from .config import PipelineConfig
from .contract import PROMPT_TEXTS, Plan, StageOutput, Teacher
from .files import digest_json, sha256_file, tmp_sibling, write_text_atomic
from .progress import progress_bar
from .store import Store, open_store

KIND = "prompt_embeddings"
VERSION = "prompt_embeddings/1"
ROWS_PER_SHARD = 4096  # 1 GiB of rows at SD v1.5 size (77 x 768 float32): one shard is built in memory at a time
ENCODE_BATCH = 64
TEXTS, OFFSETS = PROMPT_TEXTS
log = logging.getLogger("dmd")


class PromptSource:
    """Where the prompts come from: a user's prompt file (``path``, ``column``), or a copy of its texts.

    ``ident`` is ``<digest>:<column>`` of the user's file, as the stages' keys hold it; a copy written by
    generate (``prompts.bin``) carries the same ident, so either builds the same output."""

    def __init__(self, ident: str, read: Callable[[], Iterator[str]], count: Callable[[], int]):
        self.ident, self.read, self.count = ident, read, count

    @staticmethod
    def file(store: Store, path: str | Path, column: str, ident: str | None = None) -> "PromptSource":
        ident = ident or f"{store.digest(path)}:{column}"
        return PromptSource(ident, lambda: iter_prompts(path, column), lambda: sum(1 for _ in iter_prompts(path, column)))

    @staticmethod
    def listed(prompts: list[str]) -> "PromptSource":
        """Prompts held by the caller (real-data captions), identified by their content."""
        return PromptSource(f"{digest_json(prompts)}:listed", lambda: iter(prompts), lambda: len(prompts))

    @staticmethod
    def texts(folder: str | Path, ident: str) -> "PromptSource":
        """The prompts a generate output keeps beside its pairs."""
        texts = PromptTexts(Path(folder) / TEXTS, Path(folder) / OFFSETS)
        return PromptSource(ident, lambda: (texts[i] for i in range(len(texts))), lambda: len(texts))


def encoder_digest(store: Store, teacher: Teacher) -> str:
    """What the prompt encoder reads of the teacher (its text parts; the whole teacher when the layout names none)."""
    parts = teacher.layout.text_parts(teacher.path)
    if not parts:
        return teacher.digest
    digest = digest_json([[p, store.digest(teacher.path / p)] for p in parts])
    return f"{digest}:{teacher.variant}" if teacher.variant else digest  # text_encoder/ may hold both kinds: say which one is read


def embeddings_key(store: Store, teacher: Teacher, ident: str, dtype: str) -> str:
    return digest_json({"kind": KIND, "encoder": encoder_digest(store, teacher), "prompts": ident, "dtype": dtype, "code": VERSION})[:20]


@dataclass(frozen=True)
class Spread:
    """The processes of one ``accelerate launch`` that encode together: rank r encodes shards k = r (mod world)."""

    rank: int
    world: int
    barrier: Callable[[], None]


def prompt_rows(
    store: Store, teacher: Teacher, source: PromptSource, dtype: str = "float32", device="cpu", progress: bool = False, spread: Spread | None = None
) -> PromptRows:
    """The prompt rows of ``source`` for ``teacher``: read from the store, encoded first if they are not there.

    With ``spread`` (every process of a launch calls it), each process first encodes its share of the shards
    into the partial build (disjoint files, each renamed into place), then rank 0 publishes it; a process
    that finds the output complete encodes nothing but still meets the others at both barriers."""
    out = store.side_dir(KIND, embeddings_key(store, teacher, source.ident, dtype))
    up = {"teacher": teacher.digest, "prompts": source.ident}
    publish = lambda: store.publish_side_output(  # noqa: E731  (resumes: finished shards of the partial build are kept)
        out, KIND, out.name, VERSION, up, lambda work: encode_into(work, teacher, source, dtype, device, progress)
    )
    if spread is not None and spread.world > 1:
        if not store.cached_side_output(out):
            work = store.partial_dir(out)
            work.mkdir(parents=True, exist_ok=True)
            encode_into(work, teacher, source, dtype, device, progress and spread.rank == 0, (spread.rank, spread.world))
        spread.barrier()
        if spread.rank == 0 and not store.cached_side_output(out):
            publish()  # every shard is finished: this hashes and publishes
        spread.barrier()
    elif not store.cached_side_output(out):
        publish()
    return open_rows(out)


def open_rows(folder: Path) -> PromptRows:
    """The prompt rows of a prompt-embeddings output (nothing is read but headers)."""
    parts = {}
    for name in ("hidden", "pooled"):
        shards = sorted(folder.glob(f"{name}-[0-9]*.npy"))
        if shards:
            parts[name] = ShardedRows([*(NpyRows(s) for s in shards), NpyRows(folder / f"null-{name}.npy")])
    return PromptRows(parts, PromptTexts(folder / TEXTS, folder / OFFSETS))


@torch.no_grad()
def encode_into(work: Path, teacher: Teacher, source: PromptSource, dtype: str, device, progress: bool, share: tuple[int, int] = (0, 1)) -> list[str]:
    """Encode the prompts of ``source`` into ``work`` shard by shard (a finished shard, checksum beside it,
    is kept from an earlier run; ``share`` = (r, w): only shards k = r mod w); returns the names of the files made."""
    if not (work / TEXTS).is_file() or not (work / OFFSETS).is_file():
        tmp, tmp_off = tmp_sibling(work / TEXTS), tmp_sibling(work / OFFSETS)
        write_prompt_texts(source.read(), tmp, tmp_off)
        os.replace(tmp_off, work / OFFSETS)  # the texts last: their presence says both are whole
        os.replace(tmp, work / TEXTS)
    texts = PromptTexts(work / TEXTS, work / OFFSETS)
    n = len(texts)
    encoder = teacher.prompt_encoder(device)
    names: list[str] = [TEXTS, OFFSETS]
    null = {k: v.cpu().numpy().astype(dtype) for k, v in encoder.encode_null().items()}
    for part, rows in null.items():
        names.append(_save(work, f"null-{part}.npy", rows))
    shards = range(0, n, ROWS_PER_SHARD)
    mine = [s for s in shards if (s // ROWS_PER_SHARD) % share[1] == share[0]]
    todo = [s for s in mine if not all(_finished(work, f"{p}-{s // ROWS_PER_SHARD:06d}.npy") for p in null)]
    bar = progress_bar(KIND, sum(min(ROWS_PER_SHARD, n - s) for s in todo), progress, unit="prompt", phase=f"{n} prompts, {len(todo)} shards to encode")
    for s in todo:
        stop = min(s + ROWS_PER_SHARD, n)
        chunks: dict[str, list[np.ndarray]] = {p: [] for p in null}
        for b in range(s, stop, ENCODE_BATCH):
            enc = encoder.encode([texts[i] for i in range(b, min(b + ENCODE_BATCH, stop))])
            for p in null:
                chunks[p].append(enc[p].cpu().numpy().astype(dtype))
            bar.update(min(b + ENCODE_BATCH, stop) - b)
        for p in null:
            _save(work, f"{p}-{s // ROWS_PER_SHARD:06d}.npy", np.concatenate(chunks[p]))
    bar.close()
    names += [f"{p}-{s // ROWS_PER_SHARD:06d}.npy" for s in shards for p in null]
    return names


def _save(work: Path, name: str, rows: np.ndarray) -> str:
    """``rows`` under ``name``, atomically, its checksum first (so a finished file always has one beside it)."""
    tmp = tmp_sibling(work / name)
    with open(tmp, "wb") as f:  # a file object: np.save would append .npy to a path
        np.save(f, np.ascontiguousarray(rows), allow_pickle=False)
    write_text_atomic(work / f"{name}.sha256", sha256_file(tmp) + "\n")
    os.replace(tmp, work / name)
    return name


def _finished(work: Path, name: str) -> bool:
    side = work / f"{name}.sha256"
    return (work / name).is_file() and side.is_file() and side.read_text().strip() == sha256_file(work / name)


def plan_rows(cfg: PipelineConfig, p: Plan, column: str, device="cpu", progress: bool = False, spread: Spread | None = None) -> PromptRows | None:
    """The prompt rows of a plan that reads a prompt file (generate, distill without pairs, evaluate); None otherwise."""
    if "prompts" not in p.inputs:
        return None
    digest = p.upstream["prompts"].split(":")[0]  # as the plan hashed it: the file is not hashed again
    store = open_store(cfg.store)
    source = PromptSource.file(store, p.inputs["prompts"], column, f"{digest}:{column}")
    return prompt_rows(store, p.teacher(), source, cfg.generate.prompt_dtype, device, progress, spread)


def pair_rows(cfg: PipelineConfig, teacher: Teacher, pairs: StageOutput, device="cpu", progress: bool = False) -> PromptRows:
    """The prompt rows of a text-to-image generate output: the ones generate encoded (the same key), or, when
    they are gone from the store, encoded again from the prompts the pairs keep."""
    ident, dtype = pairs.manifest.upstream["prompts"], pairs.manifest.config.get("prompt_dtype", "float32")
    return prompt_rows(open_store(cfg.store), teacher, PromptSource.texts(pairs.out_dir, ident), dtype, device, progress)
