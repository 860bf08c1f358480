"""Bad inputs that are files in or beside the store: crafted pair shards (with a manifest made to match),
upstream outputs that are not what a setting names, checkpoints, reference statistics, settings that
fail only against the data. Each is refused with exit 2 and one ``error: ... Fix:`` line, nothing new
under a final name, and before any stage computes when it can be known then."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from conftest import add_tiny_evaluate, write_config
from refusal import assert_refused, nothing_started

from dmd_core.shards import npy_bytes, shard_name
from stages.contract import MANIFEST
from stages.files import sha256_file


@pytest.fixture(scope="module")
def made(tmp_path_factory, edm_teacher):
    """A config and a store holding its generate output (in process: seconds)."""
    from stages import chain
    from stages.config import load_config

    tmp = tmp_path_factory.mktemp("store-cases")
    cfg = add_tiny_evaluate(write_config(tmp / "c.yaml", edm_teacher, tmp / "store", distill={}))
    m = chain.run(load_config(cfg), "generate", progress=False).manifest
    return cfg, tmp / "store", tmp / "store" / "generate" / m.key


def _tar(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _sample(key: str, noise=None, image=None, cls: bytes | None = b"3") -> list[tuple[str, bytes]]:
    z = np.zeros((1, 8, 8), np.float32) if noise is None else noise
    y = np.zeros((1, 8, 8), np.float32) if image is None else image
    out = [(f"{key}.noise.npy", npy_bytes(z) if isinstance(z, np.ndarray) else z), (f"{key}.image.npy", npy_bytes(y) if isinstance(y, np.ndarray) else y)]
    return out + ([(f"{key}.cls.txt", cls)] if cls is not None else [])


def _object_npy() -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)  # a pickle inside: must not be loaded
    return buf.getvalue()


CRAFTED_SHARDS = {
    "missing-image-member": (_tar([(n, d) for n, d in _sample("0000000000") if "image" not in n] * 1 + _sample("0000000001")), "image.npy"),
    "image-of-another-shape": (_tar(_sample("0000000000", image=np.zeros((3, 8, 8), np.float32)) * 1), "must be float arrays of one shape"),
    "noise-and-image-of-another-shape": (_tar(_sample("0000000000", np.zeros((3, 4, 4), np.float32), np.zeros((3, 4, 4), np.float32))), "shape"),
    "integer-arrays": (_tar(_sample("0000000000", np.zeros((1, 8, 8), np.int64), np.zeros((1, 8, 8), np.int64))), "float arrays"),
    "pickled-object-array": (_tar(_sample("0000000000", image=_object_npy())), "Object arrays cannot be loaded"),
    "garbage-npy": (_tar(_sample("0000000000", image=b"\x93NUMPY garbage")), "malformed"),
    "class-not-a-number": (_tar(_sample("0000000000", cls=b"seven")), "malformed"),
    "not-a-tar": (b"\x00garbage" * 300, "not a readable tar"),
    "truncated-member": (_tar(_sample("0000000000"))[:700], "not a readable tar"),
}


def _crafted_pairs(pairs: Path, dest: Path, data: bytes) -> Path:
    """A copy of a generate output whose first shard is ``data``, with its checksums made to match."""
    shutil.copytree(pairs, dest)
    shard = dest / shard_name(0)
    shard.chmod(0o644)
    shard.write_bytes(data)
    (dest / (shard.name + ".sha256")).write_text(sha256_file(shard) + "\n")
    m = json.loads((dest / MANIFEST).read_text())
    for f in m["files"]:
        if f["name"] == shard.name:
            f["size"], f["sha256"] = len(data), sha256_file(shard)
    (dest / MANIFEST).write_text(json.dumps(m))
    (dest / ".verified.json").unlink(missing_ok=True)
    return dest


@pytest.mark.parametrize("case", list(CRAFTED_SHARDS))
def test_crafted_shard_is_named(made, tmp_path, case):
    cfg, store, pairs = made
    data, needle = CRAFTED_SHARDS[case]
    crafted = _crafted_pairs(pairs, tmp_path / "pairs", data)
    # every shard is read in the first steps: a batch of 4 from 3 shards, resampled
    line = assert_refused(["distill", "--config", str(cfg), "-q", "--set", f"distill.pairs={crafted}", "--set", "distill.shuffle_buffer=1",
                           "--set", "distill.steps=30", "--set", "distill.checkpoint_every=100"], store, needle)  # fmt: skip
    assert "pairs" in line


def _given(tmp: Path, made, what: str) -> Path:
    cfg, store, pairs = made
    d = tmp / what
    if what == "empty-dir":
        d.mkdir()
    elif what == "no-manifest":
        shutil.copytree(pairs, d)
        (d / MANIFEST).unlink()
    elif what == "garbage-manifest":
        shutil.copytree(pairs, d)
        (d / MANIFEST).write_text("{oops")
    elif what == "manifest-of-another-stage":
        shutil.copytree(pairs, d)
        m = json.loads((d / MANIFEST).read_text())
        m["stage"] = "evaluate"
        (d / MANIFEST).write_text(json.dumps(m))
    elif what == "file":
        d.write_text("not a directory")
    return d


@pytest.mark.parametrize(
    "what, needle",
    [
        ("missing", "no such directory"),
        ("empty-dir", "not a complete generate output"),
        ("no-manifest", "not a complete generate output"),
        ("garbage-manifest", "not a complete generate output"),
        ("manifest-of-another-stage", "evaluate output, not a generate output"),
        ("file", "no such directory"),
    ],
)
def test_distill_pairs_must_be_a_complete_generate_output(made, tmp_path, what, needle):
    cfg, store, _ = made
    d = _given(tmp_path, made, what)
    assert_refused(["distill", "--config", str(cfg), "--set", f"distill.pairs={d}"], store, "distill.pairs", needle)


def _checkpoint(tmp: Path, kind: str) -> Path:
    ckpt = tmp / "ckpt"
    if kind == "missing":
        return ckpt
    ckpt.mkdir()
    if kind == "no-trainer-json":
        (ckpt / "accelerate").mkdir()
    elif kind == "checksum-mismatch":
        (ckpt / "trainer.json").write_text(json.dumps({"step": 2}))
        (ckpt / "weights.bin").write_bytes(b"abc")
        (ckpt / "checksums.json").write_text(json.dumps({"weights.bin": "0" * 64}))
    elif kind == "garbage-trainer-json":
        (ckpt / "trainer.json").write_text("{oops")
        (ckpt / "checksums.json").write_text("{}")
    return ckpt


@pytest.mark.parametrize(
    "kind, needle",
    [("missing", "not a distill checkpoint"), ("no-trainer-json", "not a distill checkpoint"),
     ("checksum-mismatch", "does not match its checksum"), ("garbage-trainer-json", "unreadable")],
)  # fmt: skip
def test_resume_from_is_checked_before_anything_runs(made, tmp_path, kind, needle):
    cfg, _, _ = made
    store = tmp_path / "fresh-store"  # nothing generated yet: the refusal must come first
    with nothing_started(store):  # generate, which distill needs first, neither started nor wrote anything
        assert_refused(["distill", "--config", str(cfg), "--set", f"store={store}", "--set", f"distill.resume_from={_checkpoint(tmp_path, kind)}"], store,
                       "distill.resume_from", needle)  # fmt: skip


def _npz(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


REFERENCES = {
    "missing-file": (lambda d: d / "nope.npz", "no such file"),
    "not-an-npz": (lambda d: (d / "x.npz").write_bytes(b"garbage") and d / "x.npz", "unreadable"),
    "no-sigma": (lambda d: _npz(d / "x.npz", mu=np.zeros(64)), "unreadable"),
    "pickled-mu": (lambda d: _npz(d / "x.npz", mu=np.array([{"a": 1}], dtype=object), sigma=np.eye(64)), "unreadable"),
    "shapes-disagree": (lambda d: _npz(d / "x.npz", mu=np.zeros(64), sigma=np.eye(3)), "do not fit together"),
    "nan-statistics": (lambda d: _npz(d / "x.npz", mu=np.full(64, np.nan), sigma=np.eye(64)), "NaN"),
    "other-feature-dimension": (lambda d: _npz(d / "x.npz", mu=np.zeros(2048), sigma=np.eye(2048)), "dimensional"),
}


@pytest.mark.parametrize("case", list(REFERENCES))
def test_evaluate_reference_is_checked_before_anything_runs(made, tmp_path, case):
    cfg, _, _ = made
    make, needle = REFERENCES[case]
    store = tmp_path / "fresh-store"
    assert_refused(["evaluate", "--config", str(cfg), "--set", f"store={store}", "--set", f"evaluate.reference={make(tmp_path)}"], store, needle)


@pytest.mark.parametrize(
    "setting, needle",
    [
        ("evaluate.num_samples=32", "must exceed the feature dimension"),
        ("evaluate.classifier=/nonexistent/classifier", "evaluate.classifier"),
        ("generate.num_samples=900000000", "GiB"),  # 900M pairs cannot fit on this disk
    ],
)
def test_settings_that_fail_against_the_data_fail_first(made, tmp_path, setting, needle):
    cfg, _, _ = made
    store = tmp_path / "fresh-store"
    with nothing_started(store):  # refused before generate or distill started
        assert_refused(["evaluate", "--config", str(cfg), "--set", f"store={store}", "--set", setting], store, needle)
