"""Pair shards: WebDataset tar files of (noise, image, class) written reproducibly.

Shard ``i`` holds global indices [i*K, (i+1)*K); the sample key is the zero-padded global index;
members are ``noise.npy``, ``image.npy``, ``cls.txt`` (conditional models: the class, or for
text-to-image teachers the prompt's index) and ``prompt.txt`` (text-to-image only). Tar members carry
mtime 0 and fixed owner and mode, so the same samples give byte-identical shards.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
import webdataset as wds

from .errors import InputError

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


def write_shard(
    path: str | Path, indices: range, noise: np.ndarray, image: np.ndarray, labels: np.ndarray | None, prompts: list[str] | None = None
) -> None:
    """Write one tar shard (to ``path`` as given; the caller renames it into place); ``prompts``: the list labels index."""
    with open(path, "wb") as f:
        # mtime 0 and fixed user/mode: rebuilt shards are byte-identical.
        # Members are encoded here (np.save with allow_pickle=False), so no pickle can enter a shard.
        with wds.TarWriter(f, mtime=0, user="dmd", group="dmd", mode=0o444, encoder=False) as sink:
            for j, idx in enumerate(indices):
                sample = {"__key__": f"{idx:0{KEY_DIGITS}d}", "noise.npy": npy_bytes(noise[j]), "image.npy": npy_bytes(image[j])}
                if labels is not None:
                    sample["cls.txt"] = str(int(labels[j])).encode()
                if prompts is not None:
                    sample["prompt.txt"] = prompts[int(labels[j])].encode()
                sink.write(sample)


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


_NPY_HEADERS: dict[bytes, tuple[int, np.dtype, tuple, bool]] = {}


def load_npy(data: bytes) -> np.ndarray:
    """np.load for .npy bytes, parsing each distinct header once (every pair member shares one header).

    Written here because np.load re-parses the header with ``ast`` for every array, which was a
    third of the per-sample loading cost in distill.
    """
    header_len = 10 + int.from_bytes(data[8:10], "little") if data[6] == 1 else 12 + int.from_bytes(data[8:12], "little")
    key = data[:header_len]
    meta = _NPY_HEADERS.get(key)
    if meta is None:
        array = np.load(io.BytesIO(data), allow_pickle=False)
        _NPY_HEADERS[key] = (header_len, array.dtype, array.shape, bool(np.isfortran(array)))
        return array
    offset, dtype, shape, fortran = meta
    return np.frombuffer(data, dtype=dtype, offset=offset).reshape(shape, order="F" if fortran else "C")


def _decode_pair(sample: dict) -> tuple:
    """Just the members a pair has; webdataset's generic ``decode()`` costs ~5x more per sample.

    A malformed sample (a crafted or foreign shard) is an InputError naming the shard and the sample."""
    try:
        noise, image = load_npy(sample["noise.npy"]), load_npy(sample["image.npy"])
        if noise.shape != image.shape or noise.dtype.kind != "f" or image.dtype.kind != "f":
            raise ValueError(f"noise {noise.dtype}{list(noise.shape)} and image {image.dtype}{list(image.shape)} must be float arrays of one shape")
        return (noise, image, int(sample["cls.txt"])) if "cls.txt" in sample else (noise, image)
    except (KeyError, ValueError, IndexError, EOFError) as e:
        what = f"no {e.args[0]} member" if isinstance(e, KeyError) else str(e) or type(e).__name__
        raise InputError(
            f"pair shard {sample.get('__url__', '?')}: sample {sample.get('__key__', '?')!r} is malformed ({what}). "
            "Fix: regenerate the pairs (delete that generate output and rerun dmd generate)."
        ) from None


def read_pairs(url: str | Path, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The first ``n`` pairs of one shard, in order, as float32 (noise, image, labels or None)."""
    samples = tar_samples([{"url": str(url)}])
    pairs = [_decode_pair(s) for s, _ in zip(samples, range(n))]
    return _collate_pairs(pairs)


def check_pair_batch(batch: tuple, shape: tuple[int, ...], where: str) -> None:
    """The pairs' samples must have the shape the teacher works in (a generate output of another teacher shape would not)."""
    if tuple(batch[0].shape[1:]) != tuple(shape):
        raise InputError(f"the pairs in {where} hold samples of shape {list(batch[0].shape[1:])}; the teacher works in {list(shape)}. "
                         "Fix: regenerate the pairs with this teacher.")  # fmt: skip


def _collate_pairs(samples: list[tuple]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    if len({s[0].shape for s in samples}) > 1 or len({len(s) for s in samples}) > 1:
        raise InputError("pair shards mix samples of different shapes, or with and without cls.txt. Fix: regenerate the pairs.")
    noise = torch.from_numpy(np.stack([s[0] for s in samples]).astype(np.float32))
    image = torch.from_numpy(np.stack([s[1] for s in samples]).astype(np.float32))
    labels = torch.tensor([s[2] for s in samples]) if len(samples[0]) > 2 else None
    return noise, image, labels


def tar_samples(src):
    """Pipeline stage: shard dicts ({"url": ...}) -> samples {"__key__", "__url__", member suffix: bytes}.

    An unreadable shard is an InputError naming it."""
    import tarfile

    for shard in src:
        try:
            members = _tar_members(shard["url"])
        except (ValueError, UnicodeDecodeError, tarfile.TarError, OSError) as e:
            raise InputError(f"pair shard {shard['url']} is not a readable tar ({type(e).__name__}: {e}). Fix: regenerate the pairs.") from None
        if not members:
            raise InputError(f"pair shard {shard['url']} is not a readable tar (it holds no samples). Fix: regenerate the pairs.")
        sample: dict = {}
        for name, data in members:
            key, _, suffix = name.partition(".")
            if sample and sample["__key__"] != key:
                yield sample
                sample = {}
            sample["__key__"], sample["__url__"] = key, shard["url"]
            sample[suffix] = data
        if sample:
            yield sample


def _tar_members(url: str) -> list[tuple[str, bytes]]:
    """(name, bytes) of a shard's regular files, in order.

    A minimal reader for the plain ustar shards that ``write_shard`` makes, written here because
    Python's tarfile (which webdataset's ``tarfile_to_samples`` uses) was the largest per-sample cost
    of distill's data stream on small images. Shards with other member types go through tarfile.
    """
    import tarfile

    with wds.gopen(url) as f:
        buf = f.read()
    members, off = [], 0
    while off + 512 <= len(buf) and buf[off] != 0:
        header = buf[off : off + 512]
        if header[156:157] not in (b"0", b"\0"):
            with tarfile.open(fileobj=io.BytesIO(buf)) as tar:
                return [(m.name, tar.extractfile(m).read()) for m in tar if m.isfile()]
        name = header[:100].split(b"\0", 1)[0].decode()
        prefix = header[345:500].split(b"\0", 1)[0].decode()
        size = int(header[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
        if off + 512 + size > len(buf):
            raise ValueError(f"member {name!r} runs past the end of the file")
        members.append((f"{prefix}/{name}" if prefix else name, buf[off + 512 : off + 512 + size]))
        off += 512 + (size + 511) // 512 * 512
    return members


def pair_stream(
    urls: list[str], batch_size: int, seed: int, shuffle_buffer: int = 1000, num_workers: int = 0
):
    """An endless, reproducible stream of (noise, image, labels) batches from pair shards.

    Shards are resampled with replacement (the stream never runs dry); the shard RNG is seeded by
    (``seed``, process rank, loader worker) through webdataset, so each process and worker reads its
    own sequence, and the same seed gives the same batches.
    """
    pipeline = wds.DataPipeline(
        wds.ResampledShards(urls, seed=seed, deterministic=True),
        tar_samples,
        wds.shuffle(shuffle_buffer, initial=shuffle_buffer, seed=seed),
        wds.map(_decode_pair),
        wds.batched(batch_size, collation_fn=_collate_pairs, partial=False),
    )
    if num_workers == 0:
        return iter(pipeline)
    return iter(wds.WebLoader(pipeline, batch_size=None, num_workers=num_workers, persistent_workers=False))

