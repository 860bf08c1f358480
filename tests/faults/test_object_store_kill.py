"""kill -9 at the object store's publish points (and distill's progress upload) on a bucket of moto's S3 server,
then rerun, half of the time on another machine (an empty cache folder): the bucket ends with an uninterrupted
run's products byte for byte, no output is under its final prefix before its manifest, nothing partial or locked
is left. ``make faults`` kills at each point (``make test`` has the object store's own kill test of a stand-in build,
tests/test_object_store.py, and distill's progress upload, tests/test_object_store_distill.py).

Runs are subprocesses, not forks: s3fs keeps an event-loop thread, and forking a threaded process is unsafe.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from conftest import run_cli, write_config
from s3_server import environment, new_bucket, objects, s3_server
from stages.contract import MANIFEST
from stages.store.object import CACHE_ENV

full = pytest.mark.faults_full
RECORDS = {"config.yaml", "manifest.json", "metrics.parquet", "metrics.json", "curves.png", "README.md"}  # paths or timings inside

POINTS = [  # (fault, where it fires: generate's publish is the 1st, distill's the 2nd)
    pytest.param("publish/copied:2", "distill", marks=full),  # distill's objects under the final prefix, no manifest yet
    pytest.param("publish:1", "generate", marks=full),
    pytest.param("publish/uploaded:1", "generate", marks=full),
    pytest.param("publish/copied:1", "generate", marks=full),
    pytest.param("publish/moved:1", "generate", marks=full),
    pytest.param("keep-progress/uploaded:1", "distill", marks=full),  # a checkpoint uploaded but for its trainer.json
    pytest.param("publish/uploaded:2", "distill", marks=full),
    pytest.param("publish/moved:2", "distill", marks=full),
]


@pytest.fixture(scope="module")
def server():
    with s3_server() as env, environment(env):
        yield env


@pytest.fixture(scope="module")
def reference(server, tmp_path_factory, edm_teacher) -> str:
    """A bucket holding an uninterrupted `dmd distill` (and its generate)."""
    tmp = tmp_path_factory.mktemp("reference")
    bucket = new_bucket()
    cfg = write_config(tmp / "c.yaml", edm_teacher, f"s3://{bucket}/runs", distill={})
    run_cli("distill", "--config", str(cfg), "-q", env={CACHE_ENV: str(tmp / "cache")})
    return bucket


def products(bucket: str) -> dict[str, bytes]:
    """The bucket's product objects: records with paths or timings, checkpoints and the progress copies left out."""
    return {k: v for k, v in objects(bucket).items() if k.rsplit("/", 1)[-1] not in RECORDS and "/checkpoints/" not in k}


@pytest.mark.parametrize("fault, stage", POINTS)
def test_killed_on_the_bucket_resumes_to_the_same_bytes(reference, tmp_path, edm_teacher, fault, stage):
    bucket = new_bucket()
    cfg = write_config(tmp_path / "c.yaml", edm_teacher, f"s3://{bucket}/runs", distill={})
    killed = run_cli("distill", "--config", str(cfg), "-q", check=False, env={CACHE_ENV: str(tmp_path / "a"), "DMD_FAULT": fault})
    assert killed.returncode == -signal.SIGKILL, f"the fault point {fault} was never reached:\n{killed.stderr[-2000:]}"
    manifests = [k for k in objects(bucket) if k.endswith(MANIFEST)]
    assert not [k for k in manifests if f"/{stage}/" in k], "an output was complete before its publish ended"
    if fault.startswith("publish:"):  # killed before its first upload: the bucket holds nothing of it but the lock
        assert not [k for k in objects(bucket) if f"/{stage}/" in k and not k.endswith(".lock")]
    machine = tmp_path / ("b" if len(fault) % 2 else "a")  # another machine, or this one again
    run_cli("distill", "--config", str(cfg), "-q", env={CACHE_ENV: str(machine)})
    assert products(bucket) == products(reference)
    assert not [k for k in objects(bucket) if ".partial/" in k or k.endswith(".lock")]
