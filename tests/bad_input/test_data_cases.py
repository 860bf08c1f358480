"""Bad data behind distill.real_data and distill.pairs: every sample is checked (an image's size from its
header before any decode, class, caption, shape, dtype, finiteness, members, the tar itself) and a bad
one is refused before training starts, naming the shard, the sample and the fix.

The shards are built here (a few KB each). The bad sample sits after good ones: a check of the first
sample only would let it through.
"""

from __future__ import annotations

import functools
import importlib
import io
import json
import shutil
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import write_config
from refusal import assert_refused, nothing_started

from dmd_core.shards import npy_bytes, shard_name
from stages.contract import MANIFEST
from stages.files import sha256_file

importlib.import_module("flows.cli")  # imported at collection: each case then runs its command only


def tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def cut_inside_last_member(data: bytes) -> bytes:
    """``data`` (a tar) cut in the middle of its last member's bytes."""
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        last = tar.getmembers()[-1]
    return data[: last.offset_data + last.size // 2]


def png(size: tuple[int, int] = (8, 8), fmt: str = "PNG") -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", size, 128).save(buf, format=fmt)
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


@functools.cache
def huge_png(side: int) -> bytes:
    """A 1-bit gray PNG of side x side zero pixels, written chunk by chunk: a few KB that decode to side² pixels.
    Built without PIL, so the test itself never decodes it."""
    row = b"\0" * (1 + (side + 7) // 8)  # filter byte + packed bits
    z = zlib.compressobj(9)
    data = b"".join(z.compress(row * 500) for _ in range(side // 500)) + z.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", data) + _chunk(b"IEND", b"")


def real_tar(path: Path, bad: dict[str, bytes], at: int = 2, cls: bool = True) -> Path:
    """Three samples (keys 000000..000002): good 8x8 gray PNGs with a class, sample ``at`` replaced by ``bad``."""
    members = []
    for i in range(3):
        sample = {"png": png(), **({"cls": str(i).encode()} if cls else {})} if i != at else bad
        members += [(f"{i:06d}.{ext}", data) for ext, data in sample.items()]
    path.write_bytes(tar_bytes(members))
    return path


@pytest.fixture(scope="module")
def gan_config(tmp_path_factory, edm_teacher):
    """A DM + GAN config without regression (no pairs, so no generate: distill's check is the first thing run)."""
    tmp = tmp_path_factory.mktemp("data-cases")
    cfg = write_config(tmp / "c.yaml", edm_teacher, tmp / "store", distill={"gan": True, "regression_weight": 0.0, "steps": 2})
    return cfg, tmp / "store"


def refused_real(gan_config, real: Path, *needles: str, extra: tuple[str, ...] = ()) -> str:
    cfg, store = gan_config
    with nothing_started(store):  # refused by distill's up-front check: no stage started
        line = assert_refused(["distill", "--config", str(cfg), "-q", "--set", f"distill.real_data={real}", *extra], store, *needles)
    assert "distill.real_data" in line and "Fix:" in line
    return line


NPY_NAN = np.full((1, 8, 8), np.nan, np.float32)

REAL_CASES = {
    # the image member
    "decompression-bomb": ({"png": huge_png(20000), "cls": b"1"}, ("000002", "decompression bomb")),
    "truncated-jpeg": ({"jpg": png(fmt="JPEG")[:200], "cls": b"1"}, ("000002", "cannot be decoded")),
    "not-an-image": ({"png": b"this is a caption, not an image", "cls": b"1"}, ("000002", "cannot be decoded")),
    "image-of-another-size": ({"png": png((12, 8)), "cls": b"1"}, ("000002", "12x8", "8x8")),
    "no-image-member": ({"cls": b"1", "json": b"{}"}, ("000002", "no image")),
    "oversized-member": ({"png": b"\0" * (3 << 20), "cls": b"1"}, ("000002", "3145728 bytes")),
    "npy-with-nan": ({"npy": npy_bytes(NPY_NAN), "cls": b"1"}, ("000002", "NaN")),
    "npy-of-integers": ({"npy": npy_bytes(np.zeros((1, 8, 8), np.int64)), "cls": b"1"}, ("000002", "int64")),
    "npy-of-another-shape": ({"npy": npy_bytes(np.zeros((1, 4, 4), np.float32)), "cls": b"1"}, ("000002", "[1, 4, 4]", "[1, 8, 8]")),
    "npy-that-is-not-npy": ({"npy": b"\x93NUMPY\x01\x00garbage", "cls": b"1"}, ("000002", ".npy")),
    # the class
    "class-not-an-integer": ({"png": png(), "cls": b"seven"}, ("000002", "'seven'", "not an integer")),
    "class-a-float": ({"png": png(), "cls": b"3.0"}, ("000002", "not an integer")),
    "class-out-of-range": ({"png": png(), "cls": b"10"}, ("000002", "class 10", "0..9")),
    "class-negative": ({"png": png(), "cls": b"-3"}, ("000002", "class -3", "0..9")),
    "class-missing": ({"png": png()}, ("000002", "no class")),
}


@pytest.mark.parametrize("case", list(REAL_CASES))
def test_bad_real_sample_is_refused_before_any_stage(gan_config, tmp_path, case):
    bad, needles = REAL_CASES[case]
    refused_real(gan_config, real_tar(tmp_path / "real.tar", bad), "real.tar", *needles)


def test_truncated_real_tar_is_refused(gan_config, tmp_path):
    cut = tmp_path / "cut.tar"
    cut.write_bytes(cut_inside_last_member(real_tar(tmp_path / "whole.tar", {"png": png(), "cls": b"2"}).read_bytes()))
    refused_real(gan_config, cut, "cut.tar", "truncated")


def test_large_image_is_refused_from_its_header_without_decoding(gan_config, tmp_path, monkeypatch):
    """An 8000x8000 PNG (a few KB) must not be decoded to learn that it is not 8x8: 64 MB each, and a set of
    such images decoded in full before the check is gigabytes."""
    from PIL import ImageFile

    real_load = ImageFile.ImageFile.load

    def small_only(img):
        assert img.size[0] * img.size[1] <= 64, f"decoded a {img.size} image"
        return real_load(img)

    monkeypatch.setattr(ImageFile.ImageFile, "load", small_only)
    real = real_tar(tmp_path / "real.tar", {"png": huge_png(8000), "cls": b"1"}, at=1)
    refused_real(gan_config, real, "000001", "8000x8000", "8x8", "resize")


@pytest.fixture(scope="module")
def text_config(tmp_path_factory, sd_teacher):
    tmp = tmp_path_factory.mktemp("data-cases-text")
    (tmp / "p.txt").write_text("the digit 7\n")
    cfg = write_config(tmp / "s.yaml", sd_teacher, tmp / "store", distill={"gan": True, "regression_weight": 0.0, "steps": 2},
                       solver="pndm", steps=4, num_samples=8, shard_size=8, prompts=str(tmp / "p.txt"))  # fmt: skip
    return cfg, tmp / "store"


@pytest.mark.parametrize("caption, needles", [(b"a digit \xff\xfe 7", ("UTF-8",)), (None, ("no caption",))], ids=["caption-not-utf8", "caption-missing"])
def test_bad_caption_is_refused_for_a_text_teacher(text_config, tmp_path, caption, needles):
    bad = {"png": png()} if caption is None else {"png": png(), "txt": caption}
    members = []
    for i in range(3):
        sample = {"png": png(), "txt": b"the digit 7"} if i != 2 else bad
        members += [(f"{i:06d}.{ext}", data) for ext, data in sample.items()]
    (tmp_path / "real.tar").write_bytes(tar_bytes(members))
    refused_real(text_config, tmp_path / "real.tar", "000002", *needles)


# ---------------------------------------------------------------- pairs (distill.pairs)


@pytest.fixture(scope="module")
def made(tmp_path_factory, edm_teacher):
    """A config and a store holding its generate output (in process: seconds)."""
    from stages import chain
    from stages.config import load_config

    tmp = tmp_path_factory.mktemp("pair-cases")
    cfg = write_config(tmp / "c.yaml", edm_teacher, tmp / "store", distill={"steps": 2})
    m = chain.run(load_config(cfg), "generate", progress=False).manifest
    return cfg, tmp / "store", tmp / "store" / "generate" / m.key


def pair(key: int, noise=None, image=None, cls: bytes | None = b"3", drop: str = "") -> list[tuple[str, bytes]]:
    """One pair sample's members (defaults: zeros of the teacher's shape, class 3); arrays or raw bytes."""
    z = np.zeros((1, 8, 8), np.float32) if noise is None else noise
    y = np.zeros((1, 8, 8), np.float32) if image is None else image
    members = {"noise.npy": z, "image.npy": y, **({"cls.txt": cls} if cls is not None else {})}
    return [(f"{key:010d}.{n}", npy_bytes(v) if isinstance(v, np.ndarray) else v) for n, v in members.items() if n != drop]


def crafted_pairs(made, dest: Path, data: bytes, samples: int) -> Path:
    """A copy of the generate output whose first shard is ``data``, its checksums and sample count made to match."""
    _, _, pairs = made
    shutil.copytree(pairs, dest)
    shard = dest / shard_name(0)
    shard.chmod(0o644)
    shard.write_bytes(data)
    (dest / (shard.name + ".sha256")).write_text(sha256_file(shard) + "\n")
    m = json.loads((dest / MANIFEST).read_text())
    for f in m["files"]:
        if f["name"] == shard.name:
            f["size"], f["sha256"], f["samples"] = len(data), sha256_file(shard), samples
    (dest / MANIFEST).write_text(json.dumps(m))
    (dest / ".verified.json").unlink(missing_ok=True)
    return dest


def _npy_declaring(shape: tuple[int, ...]) -> bytes:
    """A .npy whose header declares ``shape`` over a payload of 256 bytes (np.load would allocate the header's size)."""
    head = npy_bytes(np.zeros(0, np.float32))
    header = head[10:].decode("latin1").replace("(0,)", str(shape))
    header = header.rstrip("\n").ljust(len(head) - 10 - 1) + "\n"
    return head[:8] + struct.pack("<H", len(header)) + header.encode("latin1") + b"\0" * 256


PAIR_CASES = {
    "class-99": (pair(2, cls=b"99"), ("class 99", "0..9")),
    "class-negative": (pair(2, cls=b"-3"), ("class -3", "0..9")),
    "class-not-an-integer": (pair(2, cls=b"3.5"), ("not an integer",)),
    "class-missing": (pair(2, cls=None), ("cls.txt",)),
    "nan-image": (pair(2, image=np.full((1, 8, 8), np.nan, np.float32)), ("image.npy", "NaN")),
    "inf-noise": (pair(2, noise=np.full((1, 8, 8), np.inf, np.float32)), ("noise.npy", "NaN or Inf")),
    "another-shape": (pair(2, np.zeros((1, 4, 4), np.float32), np.zeros((1, 4, 4), np.float32)), ("[1, 4, 4]", "[1, 8, 8]")),
    "integer-dtype": (pair(2, np.zeros((1, 8, 8), np.int32), np.zeros((1, 8, 8), np.int32)), ("float",)),
    "member-missing": (pair(2, drop="noise.npy"), ("noise.npy",)),
    "not-npy-payload": (pair(2, image=png()), ("image.npy", "not a .npy")),
    "npy-declaring-4TB": (pair(2, image=_npy_declaring((1 << 40,))), ("image.npy", "declares")),
}


def refused_pairs(made, pairs: Path, *needles: str) -> str:
    cfg, store, _ = made
    with nothing_started(store):  # refused when distill plans: no stage started, nothing written
        line = assert_refused(["distill", "--config", str(cfg), "-q", "--set", f"distill.pairs={pairs}"], store, *needles)
    assert shard_name(0) in line and "Fix:" in line
    return line


@pytest.mark.parametrize("case", list(PAIR_CASES))
def test_crafted_pair_sample_is_refused_before_training(made, tmp_path, case):
    bad, needles = PAIR_CASES[case]
    data = tar_bytes(pair(0) + pair(1) + bad)
    refused_pairs(made, crafted_pairs(made, tmp_path / "pairs", data, 3), "0000000002", *needles)


def test_pair_shard_cut_at_a_sample_boundary_is_refused(made, tmp_path):
    """Three whole samples where the manifest lists four: a tar cut between samples reads as a shorter one."""
    data = tar_bytes(pair(0) + pair(1) + pair(2))
    refused_pairs(made, crafted_pairs(made, tmp_path / "pairs", data, 4), "3 samples", "lists 4")


def test_pair_shard_cut_inside_a_member_is_refused(made, tmp_path):
    data = cut_inside_last_member(tar_bytes(pair(0) + pair(1) + pair(2)))
    refused_pairs(made, crafted_pairs(made, tmp_path / "pairs", data, 3), "not a readable tar")


# ---------------------------------------------------------------- the message when training itself meets NaN


def test_nan_at_the_first_step_from_the_data_blames_the_data(made, tmp_path):
    """Data that reaches training with NaN (past the checks) is named as the cause; the learning rate is not,
    and no checkpoint is named before one exists."""
    import torch
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from stages import chain, distill
    from stages.config import load_config

    cfg, _, _ = made
    c = load_config(cfg, [f"store={tmp_path / 'store'}", f"distill.pairs={made[2]}"])
    AcceleratorState._reset_state()
    tr = distill.Trainer(c, chain.plan(c, "distill"), Accelerator(cpu=True))
    batch = (torch.zeros(4, 1, 8, 8), torch.full((4, 1, 8, 8), float("nan")), torch.arange(4))
    with pytest.raises(distill.TrainingDiverged) as e:
        tr.step(0, batches=[batch])
    message = str(e.value)
    assert "step 1" in message and "NaN" in message and "pairs" in message and "Fix:" in message
    assert "learning rate" not in message and "checkpoints" not in message, message
