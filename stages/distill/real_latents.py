"""GAN real data in model space, encoded once per (real data, sample count, teacher) and read back by index.

Side output ``<store>/real_latents/<key>/`` (docs/formats.md, "Real latents"): ``latents-%06d.npy``
(float32 rows of ``ROWS_PER_SHARD`` samples in model space: a latent teacher's VAE latents, a pixel
teacher's pixels), ``labels.npy`` (int64 classes, class-conditional teachers), ``captions.parquet``
(column ``prompt``, one row per sample in sample order, text-to-image teachers), ``manifest.json`` last.
The key is the real data's digest, ``distill.real_samples``, the teacher's digest (its VAE and what each
sample must hold) and ``VERSION``.

Built streamed: samples are decoded and encoded ``ENCODE_BATCH`` at a time and appended to the open shard,
so memory is one batch of pixels, whatever the set's size. A finished shard (its checksum beside it)
survives a kill: a rerun decodes only the samples of the missing shards. Under several processes
(accelerate) the first to take the store's lock builds; the others wait on the lock, then reuse it.
"""

from __future__ import annotations

import hashlib
import logging
import os
from array import array
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dmd_core.errors import InputError
from dmd_core.real_data import SETTING, RealRows, RealSpec, count_real_samples, real_samples
from dmd_core.rows import NpyRows, ShardedRows
from dmd_core.text import iter_prompts

from ..config import DistillConfig
from ..contract import Teacher
from ..files import digest_json, sha256_file, tmp_sibling, write_text_atomic
from ..prompt_rows import PromptSource
from ..store import Store

KIND = "real_latents"
VERSION = "real_latents/1"
ROWS_PER_SHARD = 4096  # 256 MiB of SD v1.5 latents (4 x 64 x 64 float32); a multiple of ENCODE_BATCH
ENCODE_BATCH = 64  # samples decoded and encoded at a time: 192 MiB of pixels at 512 x 512 RGB
LABELS, CAPTIONS = "labels.npy", "captions.parquet"
log = logging.getLogger("dmd")


@dataclass
class RealSet:
    """The real set as the GAN term reads it: images by index, their classes, their captions."""

    images: RealRows  # N rows in model space, read from disk by index
    labels: torch.Tensor | None  # N class indices (class-conditional teachers)
    captions: PromptSource | None  # N captions in sample order (text-to-image teachers)

    def __len__(self) -> int:
        return len(self.images)


def real_spec(teacher: Teacher) -> RealSpec:
    """What each real sample must hold for ``teacher``: its pixel shape, a class (class-conditional), a caption (text)."""
    return RealSpec(tuple(teacher.pixel_shape()), 0 if teacher.takes_prompts else teacher.param.num_classes, teacher.takes_prompts)


def latents_name(shard: int) -> str:
    return f"latents-{shard:06d}.npy"


def latents_key(store: Store, d: DistillConfig, teacher: Teacher) -> str:
    return digest_json({"kind": KIND, "real_data": store.digest(d.real_data), "samples": d.real_samples, "teacher": teacher.digest, "code": VERSION})[:20]


def real_set(store: Store, d: DistillConfig, teacher: Teacher, device="cpu") -> RealSet:
    """distill.real_data in ``teacher``'s model space: read from the store, encoded first if it is not there.

    Every process calls this: one builds under the store's lock (publish_side_output), the others wait
    on the lock and find it complete; each then reads only the rows its own draws name."""
    out = store.side_dir(KIND, latents_key(store, d, teacher))
    if not store.cached_side_output(out):
        up = {"real_data": f"wds:{store.digest(d.real_data)}:{d.real_samples}", "teacher": teacher.digest}
        write = lambda work: encode_into(work, d.real_data, d.real_samples, teacher, device)  # noqa: E731
        store.publish_side_output(out, KIND, out.name, VERSION, up, write)  # resumes: finished shards of the partial build are kept
    return open_real_set(out, device)


def open_real_set(folder: Path, device="cpu") -> RealSet:
    """The real set of a real-latents output (nothing is read but headers, the labels and the captions' row count)."""
    shards = sorted(folder.glob("latents-[0-9]*.npy"))
    images = RealRows(ShardedRows([NpyRows(s) for s in shards]), device)
    labels = torch.from_numpy(np.load(folder / LABELS, allow_pickle=False)) if (folder / LABELS).is_file() else None
    captions = None
    if (folder / CAPTIONS).is_file():
        path, n = folder / CAPTIONS, len(images)
        ident = f"{sha256_file(path)}:prompt"  # its content: the same captions give the same prompt rows
        captions = PromptSource(ident, lambda: iter_prompts(path, "prompt"), lambda: n)
    return RealSet(images, labels, captions)


@torch.no_grad()
def encode_into(work: Path, path: str, max_samples: int, teacher: Teacher, device) -> list[str]:
    """Decode and encode the real set into ``work`` batch by batch, shard by shard (finished shards, checksum
    beside them, are kept from an earlier run); the labels and captions are rewritten from the set (no image
    is decoded for them). Returns the names of the files made."""
    spec = real_spec(teacher)
    n = count_real_samples(path, max_samples, spec)
    sizes = [min(ROWS_PER_SHARD, n - s) for s in range(0, n, ROWS_PER_SHARD)]
    kept = 0  # shards are written in order: the finished ones are a prefix
    while kept < len(sizes) and _finished(work, latents_name(kept)):
        kept += 1
    start = kept * ROWS_PER_SHARD
    log.info("%s: %d real images, encoding %d of them into %s", KIND, n, n - min(start, n), work)
    encode = teacher.pixel_encoder(device) if start < n else None
    shape = tuple(teacher.image_shape)
    labels, captions = array("q"), _CaptionWriter(work / CAPTIONS) if spec.text else None
    writer, batch = None, []
    j = -1
    for j, (image, label, caption) in enumerate(real_samples(path, max_samples, spec, decode_from=start)):
        if j >= n:
            break
        if label is not None:
            labels.append(label)
        if captions is not None:
            captions.add(caption)
        if image is None:
            continue
        batch.append(image)
        if len(batch) == ENCODE_BATCH or j + 1 == n or (j + 1) % ROWS_PER_SHARD == 0:
            rows = encode(torch.from_numpy(np.stack(batch))).float().cpu().numpy()
            if not np.isfinite(rows).all():
                raise InputError(f"{SETTING}: the teacher's encoder turns real samples {j + 1 - len(batch)}..{j} into NaN or Inf. "
                                 "Fix: check the teacher's VAE weights (re-download the teacher).")  # fmt: skip
            shard = j // ROWS_PER_SHARD
            writer = writer or _ShardWriter(work / latents_name(shard), (sizes[shard], *shape))
            writer.append(rows)
            batch = []
            if writer.full:
                writer.close()
                writer = None
    if j + 1 != n:
        raise InputError(f"{SETTING}: {path} changed while it was read ({j + 1} samples, {n} before). Fix: leave the real data unchanged while distill runs.")
    names = [latents_name(k) for k in range(len(sizes))]
    if spec.num_classes:
        with open(tmp_sibling(work / LABELS), "wb") as f:  # a file object: np.save would append .npy to a path
            np.save(f, np.frombuffer(labels, dtype=np.int64), allow_pickle=False)
        os.replace(tmp_sibling(work / LABELS), work / LABELS)
        names.append(LABELS)
    if captions is not None:
        names.append(captions.close())
    return names


class _ShardWriter:
    """One .npy shard written as rows arrive: its header (the row count known up front) first, then batches
    of rows; on close its checksum beside it, then the shard under its own name (a kill leaves neither)."""

    def __init__(self, path: Path, shape: tuple[int, ...]):
        self.path, self.shape, self.rows = path, shape, 0
        self.tmp = tmp_sibling(path)
        self.f = open(self.tmp, "wb")
        self.hash = hashlib.sha256()
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype("<f4")), "fortran_order": False, "shape": shape}
        head = _HashingWriter(self.f, self.hash)
        np.lib.format.write_array_header_1_0(head, header)

    @property
    def full(self) -> bool:
        return self.rows == self.shape[0]

    def append(self, rows: np.ndarray) -> None:
        data = np.ascontiguousarray(rows, dtype="<f4")
        assert data.shape[1:] == self.shape[1:] and self.rows + len(data) <= self.shape[0], (data.shape, self.shape, self.rows)
        self.f.write(data.data)
        self.hash.update(data.data)
        self.rows += len(data)

    def close(self) -> None:
        self.f.close()
        write_text_atomic(self.path.with_name(f"{self.path.name}.sha256"), self.hash.hexdigest() + "\n")
        os.replace(self.tmp, self.path)


class _HashingWriter:
    """A file-like for numpy's header writer: bytes go to the file and into the shard's running checksum."""

    def __init__(self, f, h):
        self.f, self.h = f, h

    def write(self, data: bytes) -> int:
        self.h.update(data)
        return self.f.write(data)


class _CaptionWriter:
    """``captions.parquet`` written as captions arrive: a row group per ROWS_PER_SHARD captions."""

    def __init__(self, path: Path):
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.path, self.tmp, self.pa = path, tmp_sibling(path), pa
        self.schema = pa.schema([("prompt", pa.string())])
        self.sink = pq.ParquetWriter(self.tmp, self.schema)
        self.pending: list[str] = []

    def add(self, caption: str) -> None:
        self.pending.append(caption)
        if len(self.pending) == ROWS_PER_SHARD:
            self._flush()

    def _flush(self) -> None:
        if self.pending:
            self.sink.write_table(self.pa.table({"prompt": self.pending}, schema=self.schema))
            self.pending = []

    def close(self) -> str:
        self._flush()
        self.sink.close()
        os.replace(self.tmp, self.path)
        return self.path.name


def _finished(work: Path, name: str) -> bool:
    side = work / f"{name}.sha256"
    return (work / name).is_file() and side.is_file() and side.read_text().strip() == sha256_file(work / name)
