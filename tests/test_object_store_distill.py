"""distill on the object store (moto's S3 server on loopback): the pair shards are streamed from the bucket, never
copied to the machine, and checked against their manifest's sha256 as they are read; checkpoints go to the bucket
as they are written, and a run killed on one machine resumes on another from the last complete one."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import run_cli, write_config
from s3_server import environment, new_bucket, objects, put_object, s3_server
from stages.store.object import CACHE_ENV


@pytest.fixture(scope="module")
def server():
    with s3_server() as env, environment(env):
        yield env


@pytest.fixture(scope="module")
def reference(tmp_path_factory, edm_teacher) -> Path:
    """The same distill run on a directory store: its output."""
    tmp = tmp_path_factory.mktemp("reference")
    cfg = write_config(tmp / "c.yaml", edm_teacher, tmp / "store", distill={})
    return Path(run_cli("distill", "--config", str(cfg), "-q").stdout.strip().splitlines()[-1])


def generator(out: Path) -> dict:
    return load_file(str(out / "generator" / "diffusion_pytorch_model.safetensors"))


def on(machine: Path, **env: str) -> dict[str, str]:
    return {CACHE_ENV: str(machine), "DMD_LOCK_LEASE_S": "3", **env}


def test_pairs_are_streamed_and_checked(server, tmp_path, edm_teacher, reference):
    """generate on one machine, distill on another: the second never holds a shard, trains the directory store's
    generator bit for bit, and refuses a shard changed in the bucket (same size, other bytes) by its sha256."""
    bucket = new_bucket()
    cfg = write_config(tmp_path / "c.yaml", edm_teacher, f"s3://{bucket}/runs", distill={})
    run_cli("generate", "--config", str(cfg), "-q", env=on(tmp_path / "a"))
    out = Path(run_cli("distill", "--config", str(cfg), "-q", env=on(tmp_path / "b")).stdout.strip().splitlines()[-1])
    assert not list((tmp_path / "b").rglob("pairs-*.tar")), "a shard was copied to the machine"
    shards = [k for k in objects(bucket) if k.endswith(".tar") and "/generate/" in k]
    assert len(shards) == 3
    a, b = generator(out), generator(reference)
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)

    # a published checkpoint continued on a fresh machine by its URL: fetched, then the same as from a local copy
    step2 = f"s3://{bucket}/runs/distill/{out.name}/checkpoints/step-0000002"
    longer = ["--set", "distill.steps=6", "-q"]
    by_url = run_cli("distill", "--config", str(cfg), "--set", f"distill.resume_from={step2}", *longer, env=on(tmp_path / "d"))
    assert "resuming from" in by_url.stderr and any((tmp_path / "d").rglob(".fetched/distill/*/checkpoints/step-0000002/trainer.json"))
    local_cfg = write_config(tmp_path / "l.yaml", edm_teacher, tmp_path / "local-store", distill={})
    by_path = run_cli("distill", "--config", str(local_cfg), "--set", f"distill.resume_from={reference}/checkpoints/step-0000002", *longer)
    a, b = generator(Path(by_url.stdout.strip().splitlines()[-1])), generator(Path(by_path.stdout.strip().splitlines()[-1]))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    nothing = run_cli("distill", "--config", str(cfg), "--set", f"distill.resume_from={step2}9", *longer, check=False, env=on(tmp_path / "d"))
    assert nothing.returncode == 2 and "holds nothing in the bucket" in nothing.stderr and "Traceback" not in nothing.stderr

    data = bytearray(objects(bucket)[shards[1]])
    data[600] ^= 0xFF  # inside the first member's bytes: a readable tar, other numbers
    put_object(bucket, shards[1], bytes(data))
    changed = run_cli("distill", "--config", str(cfg), "-q", "--set", "distill.steps=6", check=False, env=on(tmp_path / "c"))
    assert changed.returncode == 2 and "Traceback" not in changed.stderr
    assert f"pair shard 'pairs-000001.tar' in 's3://{bucket}/runs/generate/" in changed.stderr and shards[1].endswith("pairs-000001.tar")
    assert "does not match the sha256 its manifest lists" in changed.stderr


@pytest.mark.slow  # the streaming test above stays in make test; this one is a fault run (kill -9, then a second machine)
def test_killed_run_resumes_on_another_machine_from_the_bucket(server, tmp_path, edm_teacher, reference):
    """Killed while its step-4 checkpoint was uploading (all but trainer.json in the bucket): another machine takes
    step 2 from the bucket, skips the incomplete step 4, and ends with the uninterrupted run's generator."""
    bucket = new_bucket()
    cfg = write_config(tmp_path / "c.yaml", edm_teacher, f"s3://{bucket}/runs", distill={})
    killed = run_cli("distill", "--config", str(cfg), "-q", check=False, env=on(tmp_path / "a", DMD_FAULT="keep-progress/uploaded:2"))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    kept = sorted({k.split("/checkpoints/")[1].split("/")[0] for k in objects(bucket) if "/checkpoints/" in k})
    assert kept == ["step-0000002", "step-0000004"]
    assert not [k for k in objects(bucket) if k.endswith("step-0000004/trainer.json")]
    resumed = run_cli("distill", "--config", str(cfg), "-q", env=on(tmp_path / "b"))
    assert "resuming from" in resumed.stderr and "step-0000002" in resumed.stderr
    out = Path(resumed.stdout.strip().splitlines()[-1])
    a, b = generator(out), generator(reference)
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    assert not [k for k in objects(bucket) if ".partial/" in k], "the build's progress outlived its publish"
