"""Damaged outputs and checkpoints: every damage is named, never trusted, and a rerun rebuilds exactly
what an undamaged run made (restoring what it must contain, not dropping it)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from common import KILLED, dmd_forked, leftovers, max_weight_diff, product_files
from stages.contract import MANIFEST
from stages.store import LocalStore
from test_kill import pipeline  # noqa: F401  (the session's reference pipeline)

full = pytest.mark.faults_full


def flip(path: Path, at: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if at is None else at
    data[i] ^= 0xFF
    path.chmod(0o644)
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.chmod(0o644)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def edit_manifest(out: Path, change) -> None:
    m = json.loads((out / MANIFEST).read_text())
    change(m)
    (out / MANIFEST).write_text(json.dumps(m))


# (stage, file) of each stage's products: damaged in place by every corruption below
VICTIMS = {
    "generate": "pairs-000001.tar",
    "distill": "generator/diffusion_pytorch_model.safetensors",
    "evaluate": "student_stats.npz",
    "export": "generator.onnx",
}


def _copy(pipeline, stage: str, tmp: Path) -> Path:  # noqa: F811
    ref = pipeline.output(stage)
    out = tmp / stage / ref.name
    shutil.copytree(ref, out)
    return out


@pytest.mark.parametrize("stage", list(VICTIMS))
@pytest.mark.parametrize("damage", ["flip", "truncate", "delete", "empty-list", "drop-entry-and-flip", "garbage-manifest"])
def test_damage_is_named_and_never_verifies(pipeline, tmp_path, stage, damage):  # noqa: F811
    out = _copy(pipeline, stage, tmp_path)
    assert LocalStore(out.parent.parent).verified(out) is not None
    victim = out / VICTIMS[stage]
    if damage == "flip":
        flip(victim)
    elif damage == "truncate":
        truncate(victim)
    elif damage == "delete":
        victim.unlink()
    elif damage == "empty-list":
        edit_manifest(out, lambda m: m.update(files=[]))
    elif damage == "drop-entry-and-flip":
        edit_manifest(out, lambda m: m.update(files=[f for f in m["files"] if f["name"] != VICTIMS[stage]]))
        flip(victim)
    else:
        (out / MANIFEST).write_text("{oops")
    store = LocalStore(out.parent.parent)
    assert store.verified(out) is None
    m = store.read_manifest(out)
    if m is not None:
        assert any(name.startswith(VICTIMS[stage]) for name in store.problems(out, m)), store.problems(out, m)


@pytest.mark.parametrize(
    "stage, damage",
    [
        ("generate", "drop-entry-and-flip"),
        ("distill", "delete-intermediate-grid"),
        pytest.param("evaluate", "flip", marks=full),
        pytest.param("export", "delete", marks=full),
        pytest.param("distill", "flip", marks=full),
    ],
)
def test_damaged_output_is_rebuilt_exactly(pipeline, tmp_path, stage, damage):  # noqa: F811
    store = pipeline.store_before(stage, tmp_path / "store")
    ref = pipeline.output(stage)
    shutil.copytree(ref, store / stage / ref.name)
    out = store / stage / ref.name
    if damage == "drop-entry-and-flip":
        edit_manifest(out, lambda m: m.update(files=[f for f in m["files"] if f["name"] != VICTIMS[stage]]))
        flip(out / VICTIMS[stage])
    elif damage == "delete-intermediate-grid":
        (out / "samples" / "step-0000002.png").unlink()
    elif damage == "flip":
        flip(out / VICTIMS[stage])
    else:
        (out / VICTIMS[stage]).unlink()
    code = dmd_forked(pipeline.args(stage, store), tmp_path / "rerun.log")
    log = (tmp_path / "rerun.log").read_text()
    assert code == 0, log[-3000:]
    named = "step-0000002.png" if damage == "delete-intermediate-grid" else VICTIMS[stage]
    assert "fails verification" in log and named in log, log[-2000:]
    m = LocalStore(out.parent.parent).verified(out)
    assert m is not None
    if stage != "export":  # (an export's model card names its own directory, so its digest differs between stores)
        assert m.digest == LocalStore(ref.parent.parent).read_manifest(ref).digest  # same files, same checksums: downstream keys unchanged
    assert product_files(out) == product_files(ref)
    assert leftovers(store) == []


@pytest.fixture
def two_checkpoints(pipeline, tmp_path):  # noqa: F811
    """A distill run killed just before its manifest: checkpoints step-2 and step-4 on disk."""
    store = pipeline.store_before("distill", tmp_path / "store")
    assert dmd_forked(pipeline.args("distill", store), tmp_path / "killed.log", fault="distill.before-manifest") == KILLED
    partial = next((store / "distill").glob(".*.partial"))
    return store, partial / "checkpoints"


def _nan_weights(ckpt: Path) -> None:
    import numpy as np
    from safetensors.numpy import load_file, save_file

    from stages.files import sha256_file

    path = ckpt / "accelerate" / "model.safetensors"
    tensors = {k: np.full_like(v, np.nan) for k, v in load_file(str(path)).items()}
    save_file(tensors, str(path))
    sums = json.loads((ckpt / "checksums.json").read_text())
    sums["accelerate/model.safetensors"] = sha256_file(path)  # checksums fine: only the values are poisoned
    (ckpt / "checksums.json").write_text(json.dumps(sums))


CHECKPOINT_DAMAGE = {
    "truncated-model": (lambda c: truncate(c / "accelerate" / "model.safetensors"), "model.safetensors"),
    "trainer-json-garbage": (lambda c: (c / "trainer.json").write_text("{oops"), "trainer.json"),
    "optimizer-byte-flipped": (lambda c: flip(c / "accelerate" / "optimizer.bin"), "optimizer.bin"),
    "nan-weights": (_nan_weights, "NaN/Inf"),
    "checksums-missing": (lambda c: (c / "checksums.json").unlink(), "checksums.json"),
}


@pytest.mark.parametrize(
    "damage", [d if d == "optimizer-byte-flipped" else pytest.param(d, marks=full) for d in CHECKPOINT_DAMAGE]
)
def test_damaged_newest_checkpoint_is_skipped(pipeline, two_checkpoints, tmp_path, damage):  # noqa: F811
    store, ckpts = two_checkpoints
    hurt, needle = CHECKPOINT_DAMAGE[damage]
    hurt(ckpts / "step-0000004")
    code = dmd_forked(pipeline.args("distill", store), tmp_path / "rerun.log")
    log = (tmp_path / "rerun.log").read_text()
    assert code == 0, log[-3000:]
    assert "skipping checkpoint step-0000004" in log and needle in log, log[-2000:]
    assert "resuming from" in log and "step-0000002" in log
    out, ref = pipeline.output("distill", store), pipeline.output("distill")
    w = "generator/diffusion_pytorch_model.safetensors"
    assert max_weight_diff(out / w, ref / w) == 0.0
    assert product_files(out) == product_files(ref)
