"""Real images for DMD2's GAN term, read from WebDataset shards (docs/formats.md, "Real data").

One sample per key: the image as ``image.npy`` / ``npy`` (float, C x H x W in [-1, 1]: the pair shards'
layout) or ``png`` / ``jpg`` / ``jpeg`` (8-bit, mapped to [-1, 1]); beside it the class as ``cls`` /
``cls.txt`` (an integer) for class-conditional teachers, or the caption as ``prompt.txt`` / ``txt`` for
text-to-image ones. The first ``max_samples`` samples, in shard-name order, are read one at a time (never
the whole set in memory): distill encodes them once into the store (stages/distill/real_latents.py) and
the GAN term reads the rows its draws name (``RealRows``).

Every sample is checked as it is read, within limits: a member larger than an image of the teacher's
size needs is refused unread, and a PNG or JPEG whose header declares another size is refused before it
is decoded. A bad sample is an InputError naming the shard, the sample key, the problem and the fix.
"""

from __future__ import annotations

import io
import math
import re
import tarfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from webdataset.tariterators import base_plus_ext

from .errors import InputError, shown
from .rows import NpyRows, ShardedRows
from .shards import load_npy, parse_class

IMAGE_MEMBERS = ("image.npy", "npy", "png", "jpg", "jpeg")
CLASS_MEMBERS = ("cls", "cls.txt")
PROMPT_MEMBERS = ("prompt.txt", "txt")
USED_MEMBERS = frozenset(IMAGE_MEMBERS + CLASS_MEMBERS + PROMPT_MEMBERS)
IMAGE_FORMATS = ("PNG", "JPEG")  # what Pillow may open a member as: no other decoder sees the data
META_MEMBER = re.compile(r"__[^/]*__($|/)")  # webdataset's metadata members, skipped as it skips them
SETTING = "distill.real_data"


@dataclass(frozen=True)
class RealSpec:
    """What the teacher needs of each real sample."""

    shape: tuple[int, ...]  # C x H x W in pixels
    num_classes: int  # > 0: a class in [0, num_classes) per sample (class-conditional teachers)
    text: bool  # a UTF-8 caption per sample (text-to-image teachers)

    @property
    def member_limit(self) -> int:
        """Bytes a member may have: a float64 array of the image, plus 1 MiB for headers and metadata."""
        return (1 << 20) + 8 * math.prod(self.shape)


class RealRows:
    """The real set in model space as the GAN term indexes it: ``len(rows)`` samples and ``rows[idx]`` (a
    LongTensor of indices, any shape) -> those rows as a float32 tensor on ``device``, read from disk by index
    (``dmd_core.rows``: only the rows drawn are ever in memory)."""

    def __init__(self, table: NpyRows | ShardedRows, device: str | torch.device = "cpu"):
        self.table, self.device = table, torch.device(device)

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, idx: torch.Tensor) -> torch.Tensor:
        idx = torch.as_tensor(idx).detach().cpu()
        rows = self.table.read(idx.reshape(-1).numpy())
        return torch.from_numpy(rows).float().reshape(*idx.shape, *rows.shape[1:]).to(self.device)


def real_shards(path: str | Path) -> list[str]:
    """The shard files of ``path``: a .tar file, or every .tar in a directory (sorted by name)."""
    p = Path(path)
    urls = [str(p)] if p.is_file() and p.suffix == ".tar" else sorted(str(f) for f in p.glob("*.tar") if f.is_file()) if p.is_dir() else []
    if not urls:
        raise InputError(f"{SETTING}: {shown(str(path))} is neither a .tar shard nor a directory with .tar shards. Fix: give 'digits' or a WebDataset of real images.")
    return urls


def real_samples(path: str | Path, max_samples: int, spec: RealSpec, decode_from: int = 0) -> Iterator[tuple[np.ndarray | None, int | None, str | None]]:
    """The first ``max_samples`` samples as (image C x H x W float32, class or None, caption or None), each checked;
    samples before ``decode_from`` come without their image (None, not decoded: a resumed encoding has them)."""
    n = 0
    for url in real_shards(path):
        for sample in _shard_samples(url, spec.member_limit):
            if n == max_samples:
                return
            yield _checked(sample, url, spec, decode=n >= decode_from)
            n += 1
    if n == 0:
        raise InputError(f"{SETTING}: no samples in {shown(str(path))}. Fix: give a WebDataset with at least one image.")


def count_real_samples(path: str | Path, max_samples: int, spec: RealSpec) -> int:
    """How many samples ``real_samples`` yields, from the tar headers alone (no member is read)."""
    n = 0
    for url in real_shards(path):
        for _ in _shard_samples(url, spec.member_limit, read=False):
            if n == max_samples:
                return n
            n += 1
    return n


def check_real_data(path: str | Path, max_samples: int, spec: RealSpec) -> int:
    """Check up to ``max_samples`` samples one at a time, holding none (the check before any stage runs); the count."""
    return sum(1 for _ in real_samples(path, max_samples, spec))


def _refusal(url: str, key: str, problem: str, fix: str) -> InputError:
    return InputError(f"{SETTING}: shard {shown(Path(url).name, 60)}, sample {shown(key, 40)}: {problem}. Fix: {fix}.")


def _shard_samples(url: str, limit: int, read: bool = True) -> Iterator[dict]:
    """One shard's samples ({"__key__", member suffix: bytes}), streamed: members are grouped by key as
    webdataset groups them (the name up to the first dot of its file name); members this module does not
    use are skipped unread, the others must fit in ``limit`` bytes (``read=False``: none is read, the
    values are empty). A tar not readable to its end is refused."""
    sample: dict = {}
    try:
        with tarfile.open(url, mode="r:") as tar:  # uncompressed only: a .tar cannot hide a gzip bomb
            for m in tar:
                key, suffix = base_plus_ext(m.name)
                if not m.isfile() or key is None or META_MEMBER.match(m.name):
                    continue
                if sample and sample["__key__"] != key:
                    yield sample
                    sample = {}
                sample["__key__"] = key
                if suffix.lower() not in USED_MEMBERS:
                    continue
                if m.size > limit:
                    raise _refusal(url, key, f"member {shown(m.name, 60)} is {m.size} bytes, more than an image of the teacher's size needs "
                                   f"(at most {limit})", "resize the real set to the teacher's image size")  # fmt: skip
                sample[suffix.lower()] = tar.extractfile(m).read() if read else b""
            # tarfile stops quietly at a header cut short: whatever follows the last member must be the zero end blocks
            tar.fileobj.seek(tar.offset)
            if tar.fileobj.read(1024).strip(b"\0"):
                raise tarfile.ReadError("a header is cut short")
    except (tarfile.TarError, OSError, EOFError) as e:
        raise InputError(
            f"{SETTING}: shard {shown(Path(url).name, 60)} is not a readable tar, truncated or damaged ({type(e).__name__}: {shown(str(e), 80)}). "
            "Fix: rewrite that shard (an uncompressed tar, e.g. with webdataset's TarWriter) or remove it."
        ) from None
    if sample:
        yield sample


def _checked(sample: dict, url: str, spec: RealSpec, decode: bool = True) -> tuple[np.ndarray | None, int | None, str | None]:
    key = sample["__key__"]
    name = next((n for n in IMAGE_MEMBERS if n in sample), None)
    if name is None:
        raise _refusal(url, key, f"no image ({', '.join(IMAGE_MEMBERS)}); members: {shown(sorted(k for k in sample if not k.startswith('__')), 80)}",
                       "give every sample an image member, or remove the sample")  # fmt: skip
    image = None
    if decode:
        image = _npy_image(sample[name], name, url, key, spec.shape) if name.endswith("npy") else _decoded_image(sample[name], name, url, key, spec.shape)
    label = _label(sample, url, key, spec.num_classes) if spec.num_classes else None
    prompt = _caption(sample, url, key) if spec.text else None
    return image, label, prompt


def _npy_image(data: bytes, name: str, url: str, key: str, shape: tuple[int, ...]) -> np.ndarray:
    try:
        array = load_npy(data)
    except ValueError as e:
        raise _refusal(url, key, f"{name} is not a readable .npy ({shown(str(e), 100)})", "write it with np.save(path, array, allow_pickle=False)") from None
    if array.dtype.kind != "f":
        raise _refusal(url, key, f"{name} holds {array.dtype} values; a real image as .npy is float in [-1, 1]", "save it as float32 in [-1, 1]")
    if array.shape != tuple(shape):
        raise _refusal(url, key, f"{name} holds a {list(array.shape)} array; the teacher makes {list(shape)} images (pixels)",
                       f"resize the real set to {list(shape)}")  # fmt: skip
    if not np.isfinite(array).all():
        raise _refusal(url, key, f"{name} holds NaN or Inf", "replace or remove that sample (real images are finite, in [-1, 1])")
    return array.astype(np.float32)


def _decoded_image(data: bytes, name: str, url: str, key: str, shape: tuple[int, ...]) -> np.ndarray:
    """A PNG or JPEG, its size read from the header first: only an image of the teacher's size is decoded."""
    from PIL import Image

    channels, height, width = shape
    fix = "re-encode that image as PNG or JPEG, or remove the sample"
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)  # a huge declared size is refused, not decoded
        try:
            img = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise _refusal(url, key, f"{name} is a decompression bomb ({shown(str(e), 100)})", f"resize the real set to {width}x{height}") from None
        except Exception as e:  # Pillow raises many types on data that is not an image (UnidentifiedImageError, SyntaxError, ...)
            raise _refusal(url, key, f"{name} cannot be decoded as {' or '.join(IMAGE_FORMATS)} ({type(e).__name__})", fix) from None
        if img.size != (width, height):
            raise _refusal(url, key, f"{name} is a {img.size[0]}x{img.size[1]} image; the teacher makes {width}x{height} (pixels)",
                           f"resize the real set to {width}x{height}")  # fmt: skip
        try:
            array = np.asarray(img.convert("L" if channels == 1 else "RGB"), dtype=np.float32) / 127.5 - 1.0
        except Exception as e:  # a damaged body (truncated, bad CRC or Huffman data): OSError, SyntaxError, zlib.error, ...
            raise _refusal(url, key, f"{name} cannot be decoded ({type(e).__name__}: {shown(str(e), 80)})", fix) from None
    array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
    if array.shape != tuple(shape):
        raise _refusal(url, key, f"{name} decodes to {list(array.shape)}; the teacher makes {list(shape)} images", f"convert the real set to {channels} channels")
    return array


def _label(sample: dict, url: str, key: str, num_classes: int) -> int:
    data = next((sample[n] for n in CLASS_MEMBERS if n in sample), None)
    if data is None:
        raise _refusal(url, key, f"no class (cls or cls.txt); this teacher is class-conditional ({num_classes} classes)",
                       "add a cls member (ASCII decimal) to every sample, or set distill.gan=false")  # fmt: skip
    try:
        label = parse_class(data)
    except ValueError as e:
        raise _refusal(url, key, str(e), "write the class as ASCII decimal in cls or cls.txt") from None
    if not 0 <= label < num_classes:
        raise _refusal(url, key, f"class {label} is outside this teacher's classes 0..{num_classes - 1}", "relabel or remove that sample")
    return label


def _caption(sample: dict, url: str, key: str) -> str:
    data = next((sample[n] for n in PROMPT_MEMBERS if n in sample), None)
    if data is None:
        raise _refusal(url, key, "no caption (prompt.txt or txt); a text-to-image teacher needs one per image", "add a prompt.txt (UTF-8) to every sample")
    try:
        return data.decode("utf-8").strip()
    except UnicodeDecodeError as e:
        raise _refusal(url, key, f"its caption is not UTF-8 (byte {data[e.start]:#04x} at offset {e.start})", "write the captions as UTF-8") from None
