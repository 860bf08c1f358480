"""Stage generate: determinism (processes, batch size), resume, corruption, readback, content addressing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from conftest import kill_when, run_cli, write_config
from dmd_core.shards import shard_name
from stages import chain
from stages.config import load_config
from stages.files import sha256_file


def shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("pairs-*.tar"))}


def gen(cfg_path: Path, *sets: str, n: int = 1) -> Path:
    proc = run_cli("generate", "--config", str(cfg_path), "-q", *[a for s in sets for a in ("--set", s)], "-n", str(n))
    out = Path(proc.stdout.strip().splitlines()[-1])
    assert (out / "manifest.json").is_file()
    return out


@pytest.fixture(scope="module")
def base(tmp_path_factory, edm_teacher):
    """One reference output: 40 samples in shards of 16 (the last one partial), batch 8."""
    tmp = tmp_path_factory.mktemp("gen")
    cfg = write_config(tmp / "c.yaml", edm_teacher, tmp / "store")
    m = chain.run(load_config(cfg), "generate", progress=False).manifest
    return cfg, Path(load_config(cfg).store) / "generate" / m.key


def test_webdataset_readback(base):
    _, out = base
    urls = [str(out / shard_name(i)) for i in range(3)]
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode())
    assert len(samples) == 40
    assert [s["__key__"] for s in samples] == [f"{i:010d}" for i in range(40)]
    for s in samples:
        assert set(s) >= {"noise.npy", "image.npy", "cls.txt"}
        assert s["noise.npy"].dtype == np.float32 and s["noise.npy"].shape == (1, 8, 8)
        assert s["image.npy"].dtype == np.float32 and s["image.npy"].shape == (1, 8, 8)
    noise = np.stack([s["noise.npy"] for s in samples])
    assert abs(noise.mean()) < 0.08 and abs(noise.std() - 1) < 0.08
    assert [int(s["cls.txt"]) for s in samples] == [i % 10 for i in range(40)]
    # no pickles, nothing but the three members per sample
    import tarfile

    with tarfile.open(urls[0]) as tar:
        members = tar.getmembers()
        assert {m.name.split(".", 1)[1] for m in members} == {"noise.npy", "image.npy", "cls.txt"}
        assert all(m.mtime == 0 for m in members)


def test_manifest_lists_shards_with_checksums(base):
    _, out = base
    m = json.loads((out / "manifest.json").read_text())
    shards = [f for f in m["files"] if f["name"].startswith("pairs-")]
    assert [f["samples"] for f in shards] == [16, 16, 8]
    for f in m["files"]:
        assert sha256_file(out / f["name"]) == f["sha256"]
    assert m["info"]["nfe"] == 5 and m["info"]["solver"] == "heun"
    assert m["upstream"]["teacher"] and m["config"]["num_samples"] == 40
    assert m["pipeline_config"]["generate"]["shard_size"] == 16


def test_images_are_the_teacher_ode_solution(base, edm_teacher):
    """The stored image equals a direct Heun solve of the stored noise: the last sample of every shard
    (batches are solved one ahead of the writes, and a shard's last batch lands with the next shard's first)."""
    import torch

    from dmd_core import load_denoiser
    from dmd_core.solvers import heun_sampler

    _, out = base
    den = load_denoiser(edm_teacher)
    shards = sorted(out.glob("pairs-*.tar"))
    assert len(shards) == 3
    for shard in shards:
        s = list(wds.WebDataset(str(shard), shardshuffle=False).decode())[-1]
        z = torch.from_numpy(s["noise.npy"])[None]
        label = torch.tensor([int(s["cls.txt"])])
        y = heun_sampler(lambda x, sig: den(x, sig, label), z, 3, den.sigma_min, den.sigma_max)
        np.testing.assert_allclose(s["image.npy"], y[0].numpy(), atol=1e-5)


def test_same_config_reuses_output(base):
    cfg, out = base
    before = (out / "manifest.json").stat().st_mtime_ns
    assert gen(cfg) == out
    assert (out / "manifest.json").stat().st_mtime_ns == before


def test_two_processes_byte_identical(base):
    cfg, out = base
    ref = shard_bytes(out)
    store2 = cfg.parent / "store-2proc"
    out2 = gen(cfg, f"store={store2}", n=2)
    assert out2.name == out.name  # same content address
    assert shard_bytes(out2) == ref


@pytest.mark.slow  # batch-size independence of the noise is exact and fast-tested (test_two_processes_byte_identical)
def test_batch_size_changes_within_tolerance(base):
    """Batch 64 vs 7 over one 64-sample shard and a partial one: same noise, images within 1e-4."""
    cfg, _ = base
    sets = ("generate.num_samples=70", "generate.shard_size=64")
    big, small = gen(cfg, *sets, "generate.batch_size=64"), gen(cfg, *sets, "generate.batch_size=7")
    assert big != small
    for name in shard_bytes(big):
        a = list(wds.WebDataset(str(big / name), shardshuffle=False).decode())
        b = list(wds.WebDataset(str(small / name), shardshuffle=False).decode())
        assert [s["__key__"] for s in a] == [s["__key__"] for s in b]
        for sa, sb in zip(a, b):
            np.testing.assert_array_equal(sa["noise.npy"], sb["noise.npy"])
            np.testing.assert_allclose(sa["image.npy"], sb["image.npy"], atol=1e-4, rtol=0)


def test_float16_storage(base):
    cfg, _ = base
    out = gen(cfg, "generate.dtype=float16")
    s = next(iter(wds.WebDataset(str(out / shard_name(0)), shardshuffle=False).decode()))
    assert s["noise.npy"].dtype == np.float16 and s["image.npy"].dtype == np.float16


@pytest.mark.slow  # make test rebuilds a flipped, unlisted shard in tests/faults/test_corruption.py
def test_corrupted_shard_is_detected_and_rewritten(base, tmp_path):
    cfg, out = base
    store = tmp_path / "store"
    out2 = gen(cfg, f"store={store}")
    ref = shard_bytes(out2)
    victim = out2 / shard_name(1)
    data = bytearray(victim.read_bytes())
    data[1000] ^= 0xFF
    victim.chmod(0o644)
    victim.write_bytes(bytes(data))
    proc = run_cli("generate", "--config", str(cfg), "--set", f"store={store}", "-q")
    assert shard_name(1) in proc.stderr
    assert shard_bytes(out2) == ref


@pytest.mark.slow  # a kill fault point; reuse of finished shards stays fast-tested (test_corrupted_shard_is_detected_and_rewritten)
def test_kill_and_resume_equals_uninterrupted(base, tmp_path):
    cfg, out = base
    store = tmp_path / "store"
    sets = ["--set", f"store={store}", "--set", "generate.num_samples=160", "--set", "generate.steps=8"]
    kill_when(["generate", "--config", str(cfg), "-q", *sets], store, "generate/.*.partial/pairs-000001.tar")
    partial = next(store.glob("generate/.*.partial"))
    assert not (partial / "manifest.json").exists()
    kept = {p.name: p.stat().st_mtime_ns for p in partial.glob("pairs-*.tar")}
    assert 0 < len(kept) < 10

    resumed = Path(run_cli("generate", "--config", str(cfg), "-q", *sets).stdout.strip().splitlines()[-1])
    assert resumed.name == partial.name[1 : -len(".partial")] and not partial.exists()
    assert {n: (resumed / n).stat().st_mtime_ns for n in kept} == kept  # finished shards were kept (renamed with their directory), not rewritten
    assert not list(resumed.glob(".*tmp*"))
    fresh = tmp_path / "fresh"
    uninterrupted = gen(cfg, *[s for s in sets[1::2] if not s.startswith("store=")], f"store={fresh}")
    assert shard_bytes(resumed) == shard_bytes(uninterrupted)
    assert len(shard_bytes(resumed)) == 10


def test_pndm_generate_with_vp_teacher(tmp_path, vp_teacher):
    cfg = write_config(tmp_path / "c.yaml", vp_teacher, tmp_path / "store", solver="pndm", steps=4, num_samples=6, shard_size=4)
    m = chain.run(load_config(cfg), "generate", progress=False).manifest
    assert m.info["solver"] == "pndm" and m.info["nfe"] == 5 and m.info["parametrization"] == "vp"
    assert [f.samples for f in m.files if f.name.startswith("pairs-")] == [4, 2]
