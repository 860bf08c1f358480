"""Pair shards: WebDataset tar files of (noise, image, class) written reproducibly.

Shard ``i`` holds global indices [i*K, (i+1)*K); the sample key is the zero-padded global index;
members are ``noise.npy``, ``image.npy`` and ``cls.txt`` (conditional models). Tar members carry
mtime 0 and fixed owner and mode, so the same samples give byte-identical shards.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
import webdataset as wds

SHARD_PATTERN = "pairs-{:06d}.tar"
KEY_DIGITS = 10


def shard_name(i: int) -> str:
    return SHARD_PATTERN.format(i)


def shard_ranges(num_samples: int, shard_size: int) -> list[range]:
    """Global index ranges of each shard: [i*K, min((i+1)*K, N))."""
    return [range(s, min(s + shard_size, num_samples)) for s in range(0, num_samples, shard_size)]


def sample_seed(seed: int, *words: int) -> int:
    """A 64-bit seed for (seed, *words), e.g. (seed, sample index): independent of batch size and process count."""
    return int(np.random.SeedSequence([seed, *words]).generate_state(1, np.uint64)[0])


def sample_noise(seed: int, indices: range | list[int], shape: tuple[int, ...]) -> torch.Tensor:
    """z ~ N(0, I) of the given per-sample shape, float32, seeded by (seed, global index)."""
    out = torch.empty((len(indices), *shape), dtype=torch.float32)
    g = torch.Generator()
    for j, idx in enumerate(indices):
        g.manual_seed(sample_seed(seed, idx))
        out[j] = torch.randn(shape, generator=g)
    return out


def sample_labels(indices: range | list[int], num_classes: int) -> torch.Tensor | None:
    """Balanced class labels: sample i gets class i mod C (None for unconditional models)."""
    if num_classes == 0:
        return None
    return torch.tensor([i % num_classes for i in indices], dtype=torch.long)


def write_shard(path: str | Path, indices: range, noise: np.ndarray, image: np.ndarray, labels: np.ndarray | None) -> None:
    """Write one tar shard (to ``path`` as given; the caller renames it into place)."""
    with open(path, "wb") as f:
        # mtime 0 and fixed user/mode: rebuilt shards are byte-identical.
        # Members are encoded here (np.save with allow_pickle=False), so no pickle can enter a shard.
        with wds.TarWriter(f, mtime=0, user="dmd", group="dmd", mode=0o444, encoder=False) as sink:
            for j, idx in enumerate(indices):
                sample = {"__key__": f"{idx:0{KEY_DIGITS}d}", "noise.npy": npy_bytes(noise[j]), "image.npy": npy_bytes(image[j])}
                if labels is not None:
                    sample["cls.txt"] = str(int(labels[j])).encode()
                sink.write(sample)


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def _collate_pairs(samples: list[tuple]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    noise = torch.from_numpy(np.stack([s[0] for s in samples]).astype(np.float32))
    image = torch.from_numpy(np.stack([s[1] for s in samples]).astype(np.float32))
    labels = torch.tensor([int(s[2]) for s in samples]) if len(samples[0]) > 2 else None
    return noise, image, labels


def pair_stream(
    urls: list[str], batch_size: int, seed: int, shuffle_buffer: int = 1000, num_workers: int = 0, conditional: bool = True
):
    """An endless, reproducible stream of (noise, image, labels) batches from pair shards.

    Shards are resampled with replacement (the stream never runs dry); the shard RNG is seeded by
    (``seed``, process rank, loader worker) through webdataset, so each process and worker reads its
    own sequence, and the same seed gives the same batches.
    """
    keys = ("noise.npy", "image.npy", "cls.txt") if conditional else ("noise.npy", "image.npy")
    pipeline = wds.DataPipeline(
        wds.ResampledShards(urls, seed=seed, deterministic=True),
        wds.tarfile_to_samples(),
        wds.shuffle(shuffle_buffer, initial=shuffle_buffer, seed=seed),
        wds.decode(),
        wds.to_tuple(*keys),
        wds.batched(batch_size, collation_fn=_collate_pairs, partial=False),
    )
    if num_workers == 0:
        return iter(pipeline)
    return iter(wds.WebLoader(pipeline, batch_size=None, num_workers=num_workers, persistent_workers=False))
