"""Pair shards: WebDataset tar files of (noise, image, class) written reproducibly.

Shard ``i`` holds global indices [i*K, (i+1)*K); the sample key is the zero-padded global index;
members are ``noise.npy``, ``image.npy``, ``cls.txt`` (conditional models: the class, or for
text-to-image teachers the prompt's index) and ``prompt.txt`` (text-to-image only). Tar members carry
mtime 0 and fixed owner and mode, so the same samples give byte-identical shards.
"""

from __future__ import annotations

import functools
import hashlib
import io
import math
import re
import tarfile
from pathlib import Path

import numpy as np
import torch
import webdataset as wds

from .errors import InputError, shown

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


def member_bytes(size: int) -> int:
    """What one tar member of ``size`` bytes takes in a shard: its header block and its data padded to whole blocks."""
    return tarfile.BLOCKSIZE * (1 + -(-size // tarfile.BLOCKSIZE))


def shard_sizes(
    num_samples: int, shard_size: int, image_shape: tuple[int, ...], dtype: str, labelled: bool, prompt_sizes: list[int] | None = None
) -> np.ndarray:
    """The bytes of each shard ``write_shard`` makes of ``num_samples`` pairs, exactly: per sample a header and
    the block-padded data of each member (noise.npy, image.npy, cls.txt when ``labelled``, prompt.txt), then
    the tar's two end blocks, the whole padded to the tar stream's record size. ``prompt_sizes``: the UTF-8
    bytes of each prompt of a text-to-image teacher (sample i holds prompt i mod their count)."""
    starts = np.arange(0, num_samples, shard_size, dtype=np.int64)
    stops = np.minimum(starts + shard_size, num_samples)
    npy = len(npy_bytes(np.zeros(image_shape, dtype)))  # one image: its .npy header and payload
    # a label's decimal digits always fit one block
    body = (stops - starts) * (2 * member_bytes(npy) + (member_bytes(1) if labelled or prompt_sizes is not None else 0))
    if prompt_sizes is not None:
        cycle = np.concatenate([[0], np.cumsum([member_bytes(s) for s in prompt_sizes], dtype=np.int64)])

        def before(k: np.ndarray) -> np.ndarray:  # the prompt.txt bytes of samples [0, k): whole cycles, then a prefix
            return k // len(prompt_sizes) * cycle[-1] + cycle[k % len(prompt_sizes)]

        body += before(stops) - before(starts)
    record = tarfile.RECORDSIZE  # TarWriter writes a stream ("w|"): closing pads it to whole records
    return -(-(body + 2 * tarfile.BLOCKSIZE) // record) * record


NPY_MAGIC = b"\x93NUMPY"
_NPY_HEADERS: dict[bytes, tuple[int, np.dtype, tuple, bool, int]] = {}
_NPY_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


def load_npy(data: bytes) -> np.ndarray:
    """np.load for .npy bytes, parsing each distinct header once (every pair member shares one header).

    Written here because np.load re-parses the header with ``ast`` for every array (a third of the
    per-sample loading cost in distill), and because it allocates the array a header declares before
    reading it: here the payload must be exactly that size first, so a crafted header cannot ask for
    terabytes. Anything but a plain, pickle-free .npy is a ValueError."""
    if data[:6] != NPY_MAGIC:
        raise ValueError("not a .npy array (no .npy magic)")
    key = data[: 12 + int.from_bytes(data[8:12], "little")] if data[6:7] != b"\x01" else data[: 10 + int.from_bytes(data[8:10], "little")]
    meta = _NPY_HEADERS.get(key)
    if meta is None:
        meta = _parse_npy_header(data)
        if len(_NPY_HEADERS) < 64:  # honest data has a handful of headers; crafted data may have one per member
            _NPY_HEADERS[key] = meta
    offset, dtype, shape, fortran, nbytes = meta
    if len(data) - offset != nbytes:
        raise ValueError(f"not a whole .npy array: its header declares {dtype}{list(shape)} ({nbytes} bytes), it holds {len(data) - offset}")
    return np.frombuffer(data, dtype=dtype, offset=offset).reshape(shape, order="F" if fortran else "C")


def _parse_npy_header(data: bytes) -> tuple[int, np.dtype, tuple, bool, int]:
    f = io.BytesIO(data)
    version = np.lib.format.read_magic(f)
    if version not in _NPY_HEADER_READERS:
        raise ValueError(f"a .npy of version {version} is not read here")
    shape, fortran, dtype = _NPY_HEADER_READERS[version](f)
    if dtype.hasobject:
        raise ValueError("Object arrays cannot be loaded: the .npy holds pickled objects")
    return f.tell(), dtype, shape, fortran, math.prod(shape) * dtype.itemsize


PAIRS_FIX = "Fix: regenerate the pairs (delete that generate output and rerun dmd generate)."


def parse_class(data: bytes) -> int:
    """A class label as shards write it: ASCII decimal (an optional minus sign, at most 18 digits)."""
    found = re.fullmatch(rb"\s*(-?[0-9]{1,18})\s*", data)
    if found is None:
        raise ValueError(f"its class {shown(data[:60].decode('utf-8', 'replace'), 40)} is not an integer")
    return int(found.group(1))


def _npy_member(sample: dict, name: str) -> np.ndarray:
    try:
        return load_npy(sample[name])
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None


def _decode_pair(sample: dict) -> tuple:
    """Just the members a pair has; webdataset's generic ``decode()`` costs ~5x more per sample.

    A malformed sample (a crafted or foreign shard) is an InputError naming the shard and the sample."""
    try:
        noise, image = _npy_member(sample, "noise.npy"), _npy_member(sample, "image.npy")
        if noise.shape != image.shape or noise.dtype.kind != "f" or image.dtype.kind != "f":
            raise ValueError(f"noise {noise.dtype}{list(noise.shape)} and image {image.dtype}{list(image.shape)} must be float arrays of one shape")
        return (noise, image, parse_class(sample["cls.txt"])) if "cls.txt" in sample else (noise, image)
    except (KeyError, ValueError) as e:
        what = f"no {e.args[0]} member" if isinstance(e, KeyError) else str(e) or type(e).__name__
        raise _pair_error(sample.get("__url__", "?"), sample.get("__key__", "?"), f"is malformed ({what})") from None


def _pair_error(url, key: str, problem: str) -> InputError:
    return InputError(f"{shard_label(url)}: sample {shown(key, 40)} {problem}. {PAIRS_FIX}")


def shard_label(url) -> str:
    """A pair shard for an error line: its name whole, then its directory (the generate output) shortened."""
    folder, _, name = str(url).rpartition("/")  # a path or a URL (s3://...: Path would fold its //)
    return f"pair shard {shown(name, 40)} in {shown(folder or '.')}"


def check_pair_shard(url: str | Path, shape: tuple[int, ...], num_labels: int, samples: int | None = None, sha256: str | None = None) -> int:
    """Every sample of one pair shard as distill will use it, read once: both arrays float, finite and of the
    teacher's ``shape``; a label in ``[0, num_labels)`` exactly when ``num_labels`` > 0; ``samples`` of them
    when the manifest lists a count (a tar cut between two samples reads as a shorter one); its bytes of
    ``sha256`` when given (a shard read from object storage). Returns the count."""
    n = 0
    for sample in tar_samples([{"url": str(url), "sha256": sha256}]):
        noise, image, *label = _decode_pair(sample)
        problem = _pair_problem(noise, image, label, tuple(shape), num_labels)
        if problem:
            raise _pair_error(url, sample["__key__"], problem)
        n += 1
    if samples is not None and n != samples:
        raise InputError(f"{shard_label(url)} holds {n} samples; its manifest lists {samples} (a cut or altered shard). {PAIRS_FIX}")
    return n


def _pair_problem(noise: np.ndarray, image: np.ndarray, label: list[int], shape: tuple[int, ...], num_labels: int) -> str | None:
    if noise.shape != shape:
        return f"holds arrays of shape {list(noise.shape)}; the teacher works in {list(shape)}"
    for name, array in (("noise.npy", noise), ("image.npy", image)):
        if not np.isfinite(array).all():
            return f"has NaN or Inf in {name}"
    if num_labels and not label:
        return f"has no cls.txt member; the teacher is conditional ({num_labels} labels)"
    if label and not num_labels:
        return "has a cls.txt member; the teacher is unconditional"
    if label and not 0 <= label[0] < num_labels:
        return f"has class {label[0]} in cls.txt, outside the teacher's labels 0..{num_labels - 1}"
    return None


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
            members = _tar_members(shard["url"], shard.get("sha256"))
        except ShardChanged:
            raise InputError(f"{shard_label(shard['url'])} does not match the sha256 its manifest lists (changed since it was written). {PAIRS_FIX}") from None
        except (ValueError, UnicodeDecodeError, tarfile.TarError, OSError) as e:
            raise InputError(f"{shard_label(shard['url'])} is not a readable tar ({type(e).__name__}: {shown(str(e), 80)}). {PAIRS_FIX}") from None
        if not members:
            raise InputError(f"{shard_label(shard['url'])} is not a readable tar (it holds no samples). {PAIRS_FIX}")
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


class ShardChanged(Exception):
    """A shard's bytes differ from the sha256 its reader was given."""


OBJECT_SCHEMES = ("s3", "gs", "gcs", "az", "abfs")  # read through fsspec (webdataset's gopen has no handler for them)


def read_shard(url: str) -> bytes:
    """A shard's bytes: a path, one of webdataset's URLs (http, pipe:), or an object-storage URL (fsspec: s3://
    with botocore's usual environment for the endpoint and credentials, gs://), streamed, never stored here."""
    if url.split("://", 1)[0] in OBJECT_SCHEMES and "://" in url:
        import fsspec

        with fsspec.open(url, "rb") as f:
            return f.read()
    with wds.gopen(url) as f:
        return f.read()


def _tar_members(url: str, sha256: str | None = None) -> list[tuple[str, bytes]]:
    """(name, bytes) of a shard's regular files, in order; with ``sha256``, the bytes checked against it first.

    A minimal reader for the plain ustar shards that ``write_shard`` makes, written here because
    Python's tarfile (which webdataset's ``tarfile_to_samples`` uses) was the largest per-sample cost
    of distill's data stream on small images. Shards with other member types go through tarfile.
    """
    import tarfile

    buf = read_shard(url)
    if sha256 is not None and hashlib.sha256(buf).hexdigest() != sha256:
        raise ShardChanged(url)
    members, off = [], 0
    while off + 512 <= len(buf) and buf[off] != 0:
        header = buf[off : off + 512]
        if header[156:157] not in (b"0", b"\0"):
            with tarfile.open(fileobj=io.BytesIO(buf), mode="r:") as tar:  # uncompressed only: no gzip bomb
                return [(m.name, tar.extractfile(m).read()) for m in tar if m.isfile()]
        name = header[:100].split(b"\0", 1)[0].decode()
        prefix = header[345:500].split(b"\0", 1)[0].decode()
        size = int(header[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
        if off + 512 + size > len(buf):
            raise ValueError(f"member {name!r} runs past the end of the file")
        members.append((f"{prefix}/{name}" if prefix else name, buf[off + 512 : off + 512 + size]))
        off += 512 + (size + 511) // 512 * 512
    return members


def _with_checksum(checksums: dict[str, str], shard: dict) -> dict:
    return {**shard, "sha256": checksums.get(shard["url"])}


def pair_stream(
    urls: list[str], batch_size: int, seed: int, shuffle_buffer: int = 1000, num_workers: int = 0, checksums: dict[str, str] | None = None
):
    """An endless, reproducible stream of (noise, image, labels) batches from pair shards.

    Shards are resampled with replacement (the stream never runs dry); the shard RNG is seeded by
    (``seed``, process rank, loader worker) through webdataset, so each process and worker reads its
    own sequence, and the same seed gives the same batches. ``checksums``: the sha256 of shards (by URL) that
    are read where they lie (object storage), checked at every read.
    """
    pipeline = wds.DataPipeline(
        wds.ResampledShards(urls, seed=seed, deterministic=True),
        wds.map(functools.partial(_with_checksum, checksums or {})),
        tar_samples,
        wds.shuffle(shuffle_buffer, initial=shuffle_buffer, seed=seed),
        wds.map(_decode_pair),
        wds.batched(batch_size, collation_fn=_collate_pairs, partial=False),
    )
    if num_workers == 0:
        return iter(pipeline)
    return iter(wds.WebLoader(pipeline, batch_size=None, num_workers=num_workers, persistent_workers=False))

