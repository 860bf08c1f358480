"""Arrays read row by row from files on disk, never held whole: prompt embeddings, real-data latents.

A stage that draws rows by index (the DM term's prompts, the GAN term's real images) reads just those
rows with ``os.pread``. Why not ``np.load(mmap_mode="r")``: pages of a file mapping that were touched
count in the process's resident memory, so uniform draws over a large table would grow it to the whole
table; pages read with ``pread`` stay in the kernel's page cache, shared and reclaimable. Written here
because numpy offers no indexed read of a .npy without a mapping.
"""

from __future__ import annotations

import io
import math
import os
from array import array
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .shards import _NPY_HEADER_READERS

Tensor = torch.Tensor
HEADER_LIMIT = 1 << 16  # a .npy header is a few hundred bytes; more is not a file written here


class NpyRows:
    """The rows (first axis) of a C-order .npy file, read by index; the file is opened once per process."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            head = f.read(HEADER_LIMIT)
        buf = io.BytesIO(head)
        try:
            version = np.lib.format.read_magic(buf)
            shape, fortran, dtype = _NPY_HEADER_READERS[version](buf)
        except (KeyError, ValueError, EOFError) as e:
            raise ValueError(f"{self.path} is not a .npy array written here ({e})") from None
        if fortran or dtype.hasobject or not shape:
            raise ValueError(f"{self.path}: rows need a C-order, non-object array with a first axis")
        self.offset, self.dtype, self.shape = buf.tell(), dtype, tuple(shape)
        self.row_bytes = math.prod(shape[1:]) * dtype.itemsize
        size = os.path.getsize(self.path)
        if size != self.offset + shape[0] * self.row_bytes:
            raise ValueError(f"{self.path} holds {size} bytes; its header declares {dtype}{list(shape)}")
        self._fd: int | None = None
        self._pid = -1

    def __len__(self) -> int:
        return self.shape[0]

    def _file(self) -> int:
        if self._pid != os.getpid():  # a forked data-loader worker opens its own descriptor
            self._fd, self._pid = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC), os.getpid()
        return self._fd

    def read(self, idx: Sequence[int] | np.ndarray) -> np.ndarray:
        """Rows ``idx`` (any order, repeats allowed) as a new array (len(idx), *shape[1:])."""
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        if len(idx) and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"row {int(idx.max() if idx.max() >= len(self) else idx.min())} of {self.path} (it has {len(self)})")
        out = np.empty((len(idx), *self.shape[1:]), dtype=self.dtype)
        flat = out.reshape(len(idx), math.prod(self.shape[1:])).view(np.uint8)
        fd = self._file()
        for j, i in enumerate(idx.tolist()):
            data = os.pread(fd, self.row_bytes, self.offset + i * self.row_bytes)
            if len(data) != self.row_bytes:
                raise ValueError(f"{self.path} ended inside row {i}")
            flat[j] = np.frombuffer(data, dtype=np.uint8)
        return out

    def __deepcopy__(self, memo) -> "NpyRows":
        return self  # read-only: copies of a network share it

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fd": None, "_pid": -1}


class ShardedRows:
    """Several .npy files of equal row shape read as one table (rows of file 0, then file 1, ...)."""

    def __init__(self, parts: Sequence[NpyRows]):
        if not parts:
            raise ValueError("ShardedRows needs at least one file")
        self.parts = list(parts)
        self.starts = np.cumsum([0] + [len(p) for p in self.parts])
        self.shape = (int(self.starts[-1]), *self.parts[0].shape[1:])
        self.dtype = self.parts[0].dtype

    def __len__(self) -> int:
        return int(self.starts[-1])

    def read(self, idx: Sequence[int] | np.ndarray) -> np.ndarray:
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        if len(idx) and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"row {int(idx.max())} of a table of {len(self)}")
        out = np.empty((len(idx), *self.shape[1:]), dtype=self.dtype)
        part = np.searchsorted(self.starts, idx, side="right") - 1
        for k in np.unique(part).tolist():
            sel = np.nonzero(part == k)[0]
            out[sel] = self.parts[k].read(idx[sel] - self.starts[k])
        return out

    def __deepcopy__(self, memo) -> "ShardedRows":
        return self


class PromptRows:
    """Embeddings of N prompts and, as row N, of the empty prompt (the unconditional branch of CFG).

    ``parts`` maps a name to a table with N + 1 rows: ``hidden`` (L x D token embeddings, what
    ``encoder_hidden_states`` takes) and, for layouts with one, ``pooled`` (a pooled text embedding).
    ``rows`` reads the rows of a batch of indices as float32 tensors on the host; the text of prompt i
    is ``prompt(i)`` when the table knows its prompts. Immutable: copies of a network share it.
    """

    def __init__(self, parts: dict[str, NpyRows | ShardedRows | Tensor], prompts: "PromptTexts | Sequence[str] | None" = None):
        sizes = {name: len(t) for name, t in parts.items()}
        if "hidden" not in parts or len(set(sizes.values())) != 1:
            raise ValueError(f"PromptRows needs a 'hidden' table and tables of one length, got {sizes}")
        self.parts = {name: t.detach().cpu() if isinstance(t, Tensor) else t for name, t in parts.items()}
        self.texts = prompts

    def __len__(self) -> int:
        return len(self.parts["hidden"])

    @property
    def null_row(self) -> int:
        return len(self) - 1

    def rows(self, idx: Tensor | Sequence[int]) -> dict[str, Tensor]:
        """{name: (B, ...) float32} for the rows ``idx`` (host tensors)."""
        if isinstance(idx, Tensor):
            idx = idx.detach().cpu().reshape(-1)
        out = {}
        for name, table in self.parts.items():
            if isinstance(table, Tensor):
                out[name] = table[torch.as_tensor(idx, dtype=torch.long)].float()
            else:
                out[name] = torch.from_numpy(table.read(np.asarray(idx, dtype=np.int64))).float()
        return out

    def prompt(self, i: int) -> str:
        """The text of prompt ``i`` ('' for the empty row)."""
        if i == self.null_row:
            return ""
        if self.texts is None:
            raise ValueError("these prompt rows do not carry their prompts' text")
        return self.texts[i]

    def __deepcopy__(self, memo) -> "PromptRows":
        return self


class PromptTexts:
    """Prompt i's text from ``prompts.bin`` (UTF-8, concatenated) and ``prompt_offsets.npy`` (N + 1 byte offsets), read by index."""

    def __init__(self, blob: str | Path, offsets: str | Path):
        self.blob, self.offsets = Path(blob), NpyRows(offsets)
        if len(self.offsets) < 1:
            raise ValueError(f"{self.offsets.path} holds no offsets")
        self._fd: int | None = None
        self._pid = -1

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> str:
        if not 0 <= i < len(self):
            raise IndexError(f"prompt {i} of {len(self)}")
        start, stop = self.offsets.read([i, i + 1]).tolist()
        if self._pid != os.getpid():
            self._fd, self._pid = os.open(self.blob, os.O_RDONLY | os.O_CLOEXEC), os.getpid()
        data = os.pread(self._fd, stop - start, start)
        if len(data) != stop - start:
            raise ValueError(f"{self.blob} ended inside prompt {i}")
        return data.decode("utf-8")

    def __deepcopy__(self, memo) -> "PromptTexts":
        return self

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fd": None, "_pid": -1}


def write_prompt_texts(prompts, blob: Path, offsets: Path) -> int:
    """Write an iterable of prompts as ``prompts.bin`` + ``prompt_offsets.npy`` (streamed); returns how many."""
    ends = array("q", [0])  # 8 bytes a prompt
    with open(blob, "wb") as f:
        for p in prompts:
            data = p.encode("utf-8")
            f.write(data)
            ends.append(ends[-1] + len(data))
    with open(offsets, "wb") as f:  # a file object: np.save would append .npy to a path
        np.save(f, np.frombuffer(ends, dtype=np.int64), allow_pickle=False)
    return len(ends) - 1


class JoinedPromptRows(PromptRows):
    """The rows of ``first`` then of ``second`` (each without its unconditional row), then ``first``'s
    unconditional row: training prompts followed by real-data captions, one table for the three networks."""

    def __init__(self, first: PromptRows, second: PromptRows):
        if set(first.parts) != set(second.parts):
            raise ValueError(f"cannot join prompt rows with tables {sorted(first.parts)} and {sorted(second.parts)}")
        self.first, self.second, self.split = first, second, len(first) - 1
        self.parts, self.texts = first.parts, None

    def __len__(self) -> int:
        return len(self.first) + len(self.second) - 1

    def rows(self, idx: Tensor | Sequence[int]) -> dict[str, Tensor]:
        idx = torch.as_tensor(idx.detach().cpu() if isinstance(idx, Tensor) else idx, dtype=torch.long).reshape(-1)
        second = (idx >= self.split) & (idx < self.null_row)
        first_idx = torch.where(idx == self.null_row, self.first.null_row, idx)[~second]
        a, b = self.first.rows(first_idx), self.second.rows(idx[second] - self.split)
        out = {}
        for name in a:
            joined = torch.empty((len(idx), *a[name].shape[1:]), dtype=torch.float32)
            joined[~second], joined[second] = a[name], b[name]
            out[name] = joined
        return out

    def prompt(self, i: int) -> str:
        if i == self.null_row:
            return ""
        return self.first.prompt(i) if i < self.split else self.second.prompt(i - self.split)
