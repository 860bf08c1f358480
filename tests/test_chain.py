"""The one resolver: each stage planned once, each input verified cheaply, a cached run loads and hashes nothing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from conftest import ROOT, add_tiny_evaluate, run_cli, write_config
from dmd_core.errors import InputError
from stages import chain
from stages import files
from stages.store import LocalStore, local
from stages.config import load_config
from stages.registry import ORDER, STAGES


@pytest.fixture(scope="module")
def done(tmp_path_factory, edm_teacher):
    """The whole chain once, in this process, counting which files were hashed."""
    tmp = tmp_path_factory.mktemp("chain")
    cfg = add_tiny_evaluate(write_config(tmp / "c.yaml", edm_teacher, tmp / "store", distill={}))
    hashed: list[str] = []
    real = local.sha256_file

    def counting(path, chunk=1 << 20):
        hashed.append(str(Path(path).resolve()))
        return real(path, chunk)

    mp = pytest.MonkeyPatch()
    mp.setattr(local, "sha256_file", counting)
    mp.setattr(local, "_SEEN", {})  # as in a fresh process: earlier tests may have hashed the same teacher
    outputs = chain.walk(load_config(cfg), "export", chain.local_obtain(load_config(cfg), progress=False))
    mp.undo()
    return cfg, outputs, hashed


def test_first_run_hashes_each_file_at_most_once(done, edm_teacher):
    cfg, outputs, hashed = done
    assert list(outputs) == ORDER
    dupes = sorted({p for p in hashed if hashed.count(p) > 1})
    assert dupes == [], "\n".join(dupes)
    teacher_files = [str(p.resolve()) for p in Path(edm_teacher).iterdir()]
    assert sorted(p for p in hashed if p in teacher_files) == sorted(teacher_files)  # the teacher: once each


def test_cached_run_hashes_nothing_and_loads_no_weights(done, monkeypatch):
    cfg, outputs, _ = done

    def no_weights(*a, **k):
        raise AssertionError("a fully cached run loaded weights")

    import dmd_core.layouts.common

    monkeypatch.setattr(dmd_core.layouts.common, "load_unet", no_weights)  # every layout loads its UNet through it
    before = files.HASHED.bytes
    again = chain.run(load_config(cfg), "export", progress=False)
    assert files.HASHED.bytes == before
    assert again.out_dir == outputs["export"].out_dir


def test_a_fresh_process_rerun_hashes_nothing(done, tmp_path):
    cfg, outputs, _ = done
    log = tmp_path / "hashed.log"
    proc = run_cli("export", "--config", str(cfg), "-q", env={files.HASH_LOG: str(log)})
    assert Path(proc.stdout.strip().splitlines()[-1]) == outputs["export"].out_dir
    assert [int(line.split()[1]) for line in log.read_text().splitlines()] == [0]


def test_changed_in_place_is_caught_only_by_deep(done):
    """Same size, mtime and inode: only a full re-hash (dmd verify --deep) sees the change."""
    cfg, outputs, _ = done
    out = outputs["evaluate"].out_dir
    path = out / "grid.png"
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    try:
        with open(path, "r+b") as f:  # in place: the inode stays
            f.write(data)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
        assert LocalStore(out.parent.parent).verified(out) is not None
        proc = run_cli("verify", "--config", str(cfg), "--deep", check=False)
        assert proc.returncode == 1 and "FAIL" in proc.stdout and "grid.png" in proc.stdout
        assert LocalStore(out.parent.parent).verified(out) is None  # the deep check updated the record
    finally:
        data[-5] ^= 0xFF
        path.write_bytes(bytes(data))
    assert LocalStore(out.parent.parent).verified(out, deep=True) is not None
    proc = run_cli("verify", "--config", str(cfg))
    assert "all outputs verify" in proc.stderr and proc.stdout.count("ok") >= 6


def test_damaged_side_cache_is_recomputed_not_trusted(done):
    cfg, outputs, _ = done
    teacher_eval = next(p for p in (Path(load_config(cfg).store) / "teacher_eval").iterdir() if not p.name.startswith("."))
    good = (teacher_eval / "metrics.json").read_text()
    (teacher_eval / "metrics.json").write_text(good.replace('"teacher_fd": ', '"teacher_fd": 1'))
    proc = run_cli("evaluate", "--config", str(cfg), "--set", "evaluate.speed_repeats=2", "-q")
    assert "teacher numbers from cache" not in proc.stderr and "fails verification" in proc.stderr
    assert (teacher_eval / "metrics.json").read_text() == good
    m = LocalStore(load_config(cfg).store).read_manifest(Path(proc.stdout.strip().splitlines()[-1]))
    assert m.info["metrics"]["teacher_fd"] == outputs["evaluate"].manifest.info["metrics"]["teacher_fd"]


def test_plan_never_runs_a_stage(tmp_path, edm_teacher):
    cfg = load_config(write_config(tmp_path / "c.yaml", edm_teacher, tmp_path / "store", distill={}))
    p = chain.plan(cfg, "generate")
    assert p.out_dir == Path(cfg.store) / "generate" / p.key and not p.out_dir.exists()
    with pytest.raises(InputError, match="the generate output is missing from the store"):
        chain.plan(cfg, "distill")


def test_distill_on_an_empty_store_runs_generate_first(tmp_path, edm_teacher):
    cfg = write_config(tmp_path / "c.yaml", edm_teacher, tmp_path / "store", distill={"steps": 1, "checkpoint_every": 1})
    proc = run_cli("distill", "--config", str(cfg), "-q")
    assert (Path(proc.stdout.strip().splitlines()[-1]) / "manifest.json").is_file()
    assert len(list((tmp_path / "store" / "generate").glob("*/manifest.json"))) == 1


def test_one_registry_serves_cli_flow_and_docs():
    from flows.pipeline import ARTIFACT_KEYS
    from stages.cli import STAGE_COMMANDS

    assert list(STAGE_COMMANDS) == ORDER
    assert [f"dmd-{s.name}-progress" for s in STAGES if s.progress] == ARTIFACT_KEYS[3:]
    readme = (ROOT / "README.md").read_text()
    for s in STAGES:
        assert f"| `{s.name}`: {s.summary} |" in readme, s.name
