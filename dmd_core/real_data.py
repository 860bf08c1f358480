"""Real images for DMD2's GAN term, read from WebDataset shards (docs/formats.md, "Real data").

One sample per key: the image as ``image.npy`` / ``npy`` (float, C x H x W in [-1, 1]: the pair shards'
layout) or ``png`` / ``jpg`` / ``jpeg`` (8-bit, mapped to [-1, 1]); beside it the class as ``cls`` /
``cls.txt`` (an integer) for class-conditional teachers, or the caption as ``prompt.txt`` / ``txt`` for
text-to-image ones. The first ``max_samples`` samples, in shard-name order, are held in memory: the GAN
term draws its real batch per sample by index (deterministic and the same on every process).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import webdataset as wds

from .errors import InputError
from .shards import load_npy

IMAGE_MEMBERS = ("image.npy", "npy", "png", "jpg", "jpeg")
CLASS_MEMBERS = ("cls", "cls.txt")
PROMPT_MEMBERS = ("prompt.txt", "txt")


@dataclass
class RealData:
    images: torch.Tensor  # N x C x H x W, float32 in [-1, 1], pixel space
    labels: torch.Tensor | None  # N class indices, or None
    prompts: list[str] | None  # N captions, or None


def real_shards(path: str | Path) -> list[str]:
    """The shard files of ``path``: a .tar file, or every .tar in a directory (sorted by name)."""
    p = Path(path)
    urls = [str(p)] if p.is_file() and p.suffix == ".tar" else sorted(str(f) for f in p.glob("*.tar")) if p.is_dir() else []
    if not urls:
        raise InputError(f"distill.real_data: {path} is neither a .tar shard nor a directory with .tar shards. Fix: give 'digits' or a WebDataset of real images.")
    return urls


def _member(sample: dict, names: tuple[str, ...]):
    return next((sample[n] for n in names if n in sample), None)


def _image(data: bytes, name: str, channels: int | None) -> np.ndarray:
    if name.endswith("npy"):
        return load_npy(data).astype(np.float32)
    from PIL import Image

    img = Image.open(io.BytesIO(data))
    img = img.convert("L" if channels == 1 else "RGB")
    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def read_real_data(path: str | Path, max_samples: int, channels: int | None = None) -> RealData:
    """Decode up to ``max_samples`` samples (image, and class or caption where present)."""
    images, labels, prompts = [], [], []
    pipeline = wds.DataPipeline(wds.SimpleShardList(real_shards(path)), wds.tarfile_to_samples())
    for sample in pipeline:
        if len(images) == max_samples:
            break
        name = next((n for n in IMAGE_MEMBERS if n in sample), None)
        if name is None:
            raise InputError(f"distill.real_data: sample {sample['__key__']!r} has no image ({', '.join(IMAGE_MEMBERS)}); members: {sorted(k for k in sample if not k.startswith('__'))}")
        images.append(_image(sample[name], name, channels))
        cls, prompt = _member(sample, CLASS_MEMBERS), _member(sample, PROMPT_MEMBERS)
        labels.append(None if cls is None else int(cls))
        prompts.append(None if prompt is None else prompt.decode().strip())
    if not images:
        raise InputError(f"distill.real_data: no samples in {path}")
    if len({a.shape for a in images}) > 1:
        raise InputError(f"distill.real_data: images of different shapes in {path}: {sorted({a.shape for a in images})[:3]}")
    return RealData(
        torch.from_numpy(np.stack(images)),
        torch.tensor(labels) if all(v is not None for v in labels) else None,
        prompts if all(v is not None for v in prompts) else None,
    )


def check_real_data(data: RealData, image_shape: tuple[int, ...], num_classes: int, text: bool, path) -> None:
    """The real set fits the teacher: same pixel shape, a class in range for each sample, a caption for text teachers."""
    if tuple(data.images.shape[1:]) != tuple(image_shape):
        raise InputError(f"distill.real_data: {path} holds {list(data.images.shape[1:])} images; the teacher makes {list(image_shape)} (pixels). Fix: resize the real set.")
    if text and data.prompts is None:
        raise InputError(f"distill.real_data: {path} has samples without a caption (prompt.txt or txt); a text-to-image teacher needs one per image.")
    if num_classes and not text:
        if data.labels is None:
            raise InputError(f"distill.real_data: {path} has samples without a class (cls); this teacher is class-conditional ({num_classes} classes).")
        if int(data.labels.min()) < 0 or int(data.labels.max()) >= num_classes:
            raise InputError(f"distill.real_data: classes in {path} span {int(data.labels.min())}..{int(data.labels.max())}; the teacher has {num_classes}.")
