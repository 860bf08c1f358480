"""generate.partitions: shard ranges built apart give the one-process bytes; a killed partition is redone alone;
the S3 store across machines (one cache folder each); the flow's partitions taken by two process workers of a
work pool on a real Prefect server (slow)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from conftest import kill_when, write_config
from dmd_core.errors import InputError
from dmd_core.shards import shard_name
from stages import chain
from stages.config import load_config
from stages.files import sha256_file
from stages.generate import build_partition
from stages.generate.partitions import partition_ranges
from stages.store import open_store

SETS = {"num_samples": 60, "shard_size": 8, "batch_size": 4}  # 8 shards (the last one of 4): partitions of 3, 3 and 2 shards


def shard_digests(out: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted(out.glob("pairs-*.tar"))}


def stats(folder: Path) -> dict[str, tuple[int, int]]:
    """(inode, mtime_ns) of every shard: a shard rewritten (a new temporary file renamed over it) changes both."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted(folder.glob("pairs-*.tar"))}


@pytest.fixture(scope="module")
def one(tmp_path_factory, edm_teacher):
    """The one-process output: its key, shard digests and manifest digest."""
    tmp = tmp_path_factory.mktemp("one")
    cfg = load_config(write_config(tmp / "c.yaml", edm_teacher, tmp / "store", **SETS))
    out = chain.run(cfg, "generate", progress=False)
    return out.manifest.key, shard_digests(out.out_dir), out.manifest.digest


def test_partition_ranges_are_contiguous_and_cover_every_shard():
    assert partition_ranges(8, 3) == [range(0, 3), range(3, 6), range(6, 8)]
    assert partition_ranges(2, 3) == [range(0, 1), range(1, 2), range(2, 2)]
    for shards in range(0, 20):
        for n in range(1, 7):
            ranges = partition_ranges(shards, n)
            assert [i for r in ranges for i in r] == list(range(shards))
            assert max(map(len, ranges)) - min(map(len, ranges)) <= 1


def test_three_partitions_give_the_one_process_bytes(one, tmp_path, edm_teacher):
    key, digests, manifest_digest = one
    cfg = load_config(write_config(tmp_path / "c.yaml", edm_teacher, tmp_path / "store", partitions=3, **SETS))
    p = chain.plan(cfg, "generate")
    assert p.key == key  # partitions are not in the cache key
    store = open_store(cfg.store)
    for k in (2, 0, 1):  # any order
        work = build_partition(cfg, p, k, progress=False)
        assert store.verified(p.out_dir) is None  # a partition publishes nothing
    assert work == store.partial_dir(p.out_dir)
    built = stats(work)
    assert len(built) == 8
    out = chain.run(cfg, "generate", progress=False)
    assert out.out_dir == p.out_dir
    assert shard_digests(out.out_dir) == digests and out.manifest.digest == manifest_digest
    assert stats(out.out_dir) == built  # the publisher computed no shard: it verified and published the partitions'
    assert build_partition(cfg, p, 1, progress=False) == out.out_dir  # published: nothing to do
    with pytest.raises(InputError, match="partition 3 does not exist"):
        build_partition(cfg, p, 3, progress=False)


def test_killed_partition_is_redone_alone(one, tmp_path, edm_teacher):
    """kill -9 of `dmd generate --partition 1` once its second shard is there; the rerun writes only what it lacked,
    the other partitions' shards (and partition 1's finished ones) keep their files; a damaged one is rewritten."""
    key, digests, manifest_digest = one
    cfg_path = write_config(tmp_path / "c.yaml", edm_teacher, tmp_path / "store", partitions=3, **SETS)
    cfg = load_config(cfg_path)
    p = chain.plan(cfg, "generate")
    work = build_partition(cfg, p, 0, progress=False)
    build_partition(cfg, p, 2, progress=False)
    kill_when(["generate", "--config", str(cfg_path), "--partition", "1", "-q"], work, shard_name(4))
    before = stats(work)
    assert {shard_name(i) for i in (0, 1, 2, 3, 4, 6, 7)} <= set(before)
    (work / shard_name(0)).write_bytes(b"damaged")  # partition 0 is damaged meanwhile: a rerun of it rewrites shard 0
    before = stats(work)
    build_partition(cfg, p, 1, progress=False)
    after = stats(work)
    rewritten = {n for n in after if before.get(n) != after[n]}
    assert rewritten <= {shard_name(5)}  # killed before shard 5, or (a slow kill) after it: nothing else moved
    assert shard_name(0) not in rewritten
    build_partition(cfg, p, 0, progress=False)
    again = stats(work)
    assert {n for n in again if after[n] != again[n]} == {shard_name(0)}
    out = chain.run(cfg, "generate", progress=False)
    assert shard_digests(out.out_dir) == digests and out.manifest.digest == manifest_digest
    assert stats(out.out_dir) == again


def test_more_partitions_than_shards_are_refused(tmp_path, edm_teacher):
    cfg = load_config(write_config(tmp_path / "c.yaml", edm_teacher, tmp_path / "store", partitions=9, **SETS))
    with pytest.raises(InputError, match="generate.partitions=9 is more than the 8 shards"):
        chain.plan(cfg, "generate")


def test_a_partition_runs_one_process(tmp_path, edm_teacher):
    cfg = load_config(write_config(tmp_path / "c.yaml", edm_teacher, tmp_path / "store", partitions=2, **SETS))
    with pytest.raises(InputError, match="one process"):
        build_partition(cfg, chain.plan(cfg, "generate"), 0, num_processes=2)


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    from s3_server import environment, s3_server

    with s3_server() as env, environment(env):
        yield env


def test_partitions_on_three_machines_of_an_s3_store(one, s3, tmp_path, edm_teacher, monkeypatch):
    """Each partition on a machine of its own (its own cache folder), the publish on a fourth: the bucket carries
    the shards between them, and the output is the one-process bytes."""
    from s3_server import new_bucket

    from stages.store.object import CACHE_ENV

    key, digests, manifest_digest = one
    url = f"s3://{new_bucket()}/runs"
    cfg = load_config(write_config(tmp_path / "c.yaml", edm_teacher, tmp_path / "unused", partitions=3, **SETS), [f"store={url}"])
    for k in range(3):
        monkeypatch.setenv(CACHE_ENV, str(tmp_path / f"host{k}"))
        p = chain.plan(cfg, "generate")
        work = build_partition(cfg, p, k, progress=False)
        assert sorted(n for n in os.listdir(work) if n.startswith("pairs-") and n.endswith(".tar")) == [
            shard_name(i) for i in partition_ranges(8, 3)[k]
        ]  # this machine wrote (and keeps) its own partition only
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "publisher"))
    out = chain.run(cfg, "generate", progress=False)
    assert out.manifest.key == key
    assert shard_digests(out.out_dir) == digests and out.manifest.digest == manifest_digest
    store = open_store(url)
    assert store.bucket.listing(f"generate/.{key}.partial") == {}  # the staged shards are gone once published
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "reader"))
    assert open_store(url).verified(open_store(url).output_dir("generate", key)).digest == manifest_digest


def start_worker(env: dict, pool: str, cache: Path, *args: str):
    """``prefect worker start`` of a process pool, as on a machine of its own: a cache folder of its own."""
    import subprocess
    import sys

    from conftest import ROOT

    cmd = [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool, "--type", "process", "--limit", "1", "--name", cache.name, *args]
    return subprocess.Popen(cmd, cwd=ROOT, env={**env, "DMD_STORE_CACHE": str(cache)}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def stop(workers) -> None:
    import signal

    for w in workers:
        if w.poll() is None:
            os.killpg(w.pid, signal.SIGTERM)
    for w in workers:
        w.wait(timeout=60)


@pytest.fixture(scope="module")
def pool(s3):
    """A real Prefect server, a process work pool and the partition deployment on it (from this checkout)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    from conftest import ROOT
    from flows.partitions import DEFAULT_DEPLOYMENT, generate_partition

    with prefect_test_harness(server_startup_timeout=600):
        name = "gpu-partitions"
        with get_client(sync_client=True) as client:
            client.create_work_pool(WorkPoolCreate(name=name, type="process"))
        generate_partition.from_source(source=str(ROOT), entrypoint="flows/partitions.py:generate_partition").deploy(
            name=DEFAULT_DEPLOYMENT.split("/")[1], work_pool_name=name, print_next_steps=False
        )  # fmt: skip
        env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_WORKER_PREFETCH_SECONDS": "1"}
        yield name, env


def partition_runs(parent_id: str) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    with get_client(sync_client=True) as client:
        return client.read_flow_runs(flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent_id])))


def s3_config(tmp_path: Path, edm_teacher: Path, monkeypatch) -> tuple[str, list[str]]:
    from s3_server import new_bucket

    from stages.store.object import CACHE_ENV

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "flow"))
    cfg = write_config(tmp_path / "c.yaml", edm_teacher, tmp_path / "unused", partitions=3, **SETS)
    return str(cfg), [f"store=s3://{new_bucket()}/runs"]


def host_shards(tmp_path: Path, host: str, key: str) -> list[str]:
    """The shards a worker's machine wrote or took (its work directory of the output)."""
    return sorted(p.name for p in (tmp_path / host).glob(f"s3-*/generate/.{key}.partial/pairs-*.tar"))


@pytest.mark.slow  # a Prefect server, two workers and their flow runs: about a minute on 2 cores
def test_three_partitions_on_two_process_workers_of_a_prefect_server_and_an_s3_store(one, pool, tmp_path, edm_teacher, monkeypatch):
    """The Done-when test: the flow hands 3 partitions to a process work pool served by 2 workers, each with a
    cache folder of its own (two machines); the flow's generate task publishes the one-process bytes."""
    from flows.pipeline import dmd_pipeline

    key, digests, manifest_digest = one
    name, env = pool
    config, overrides = s3_config(tmp_path, edm_teacher, monkeypatch)
    workers = [start_worker(env, name, tmp_path / h) for h in ("host0", "host1")]
    try:
        result = dmd_pipeline(config=config, overrides=overrides, only="generate")
    finally:
        stop(workers)
    children = partition_runs(result["flow_run_id"])
    assert len(children) == 3 and all(c.state.is_completed() and c.work_pool_name == name for c in children)
    assert sorted(c.parameters["partition"] for c in children) == [0, 1, 2]
    took = [host_shards(tmp_path, h, key) for h in ("host0", "host1")]
    assert all(took) and sorted(took[0] + took[1]) == sorted(digests)  # both machines built partitions, no shard twice
    out = Path(result["outputs"]["generate"])
    assert out.name == key and shard_digests(out) == digests
    assert open_store(overrides[0][len("store="):]).verified(out).digest == manifest_digest


@pytest.mark.slow  # as above, plus a killed run and its redo
def test_a_partition_killed_on_one_worker_is_redone_alone_on_another(one, pool, tmp_path, edm_teacher, monkeypatch):
    """host0 polls once and takes one partition, which is killed (SIGKILL) as it writes its second shard; the flow
    runs that partition again, host1 takes it, takes the shard host0 finished from the bucket and writes the rest;
    the other partitions run once. The output is the one-process bytes."""
    import contextvars
    import threading
    import time

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId, LogFilter, LogFilterFlowRunId

    from flows.pipeline import dmd_pipeline

    key, digests, manifest_digest = one
    name, env = pool
    config, overrides = s3_config(tmp_path, edm_teacher, monkeypatch)
    workers: list = []

    def start_workers() -> None:
        # host0 starts once the partition runs exist (one poll, one run); host1 once host0 has claimed its run
        with get_client(sync_client=True) as client:
            earlier = {r.id for r in client.read_flow_runs()}  # the module's other tests' runs
            for wanted in ("SCHEDULED", "CLAIMED"):
                deadline = time.time() + 300
                while time.time() < deadline:
                    runs = [r for r in client.read_flow_runs() if r.id not in earlier and r.parameters.get("partition") is not None]
                    if wanted == "SCHEDULED" and runs:
                        workers.append(start_worker({**env, "DMD_FAULT": "generate.shard-written:2"}, name, tmp_path / "host0", "--run-once"))
                        break
                    if wanted == "CLAIMED" and any(r.state.type.value != "SCHEDULED" for r in runs):
                        workers.append(start_worker(env, name, tmp_path / "host1"))
                        break
                    time.sleep(0.5)

    launcher = threading.Thread(target=contextvars.copy_context().run, args=(start_workers,), daemon=True)
    launcher.start()
    try:
        result = dmd_pipeline(config=config, overrides=overrides, only="generate")
    finally:
        launcher.join(timeout=60)
        stop(workers)
    children = partition_runs(result["flow_run_id"])
    crashed = [c for c in children if not c.state.is_completed()]
    assert len(children) == 4 and len(crashed) == 1 and crashed[0].state.is_crashed()
    k = crashed[0].parameters["partition"]
    assert sorted(c.parameters["partition"] for c in children if c.state.is_completed()) == [0, 1, 2]
    first = partition_ranges(8, 3)[k].start
    assert host_shards(tmp_path, "host0", key) == [shard_name(first)]  # kept in the bucket as soon as it was written
    assert sorted(host_shards(tmp_path, "host1", key)) == sorted(digests)  # host1 took the rest, and the redo
    redo = next(c for c in children if c.state.is_completed() and c.parameters["partition"] == k)
    with get_client(sync_client=True) as client:
        lines = [log.message for log in client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[redo.id])))]
    n = len(partition_ranges(8, 3)[k])
    assert any(f"{n - 1} shards written, 1 kept (2 files taken from the store)" in line for line in lines), lines
    out = Path(result["outputs"]["generate"])
    assert shard_digests(out) == digests and open_store(overrides[0][len("store="):]).verified(out).digest == manifest_digest


@pytest.mark.slow  # a Prefect server
def test_without_the_deployment_partitions_run_in_the_flow_process(one, pool, tmp_path, edm_teacher, monkeypatch):
    from flows.partitions import DEPLOYMENT_ENV
    from flows.pipeline import dmd_pipeline

    key, digests, manifest_digest = one
    monkeypatch.setenv(DEPLOYMENT_ENV, "dmd-generate-partition/none")
    config, overrides = s3_config(tmp_path, edm_teacher, monkeypatch)
    result = dmd_pipeline(config=config, overrides=overrides, only="generate")
    children = partition_runs(result["flow_run_id"])
    assert sorted(c.parameters["partition"] for c in children if c.state.is_completed()) == [0, 1, 2] and len(children) == 3
    assert shard_digests(Path(result["outputs"]["generate"])) == digests
