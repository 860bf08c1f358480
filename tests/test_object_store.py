"""The store on object storage against real protocol servers on loopback: ``s3://`` on moto's S3 server, reached
through botocore's environment (AWS_ENDPOINT_URL, credentials), and ``gs://`` on tests/gcs_server.py's GCS JSON
API server, reached through STORAGE_EMULATOR_HOST; nothing patched into boto or gcsfs. The in-process cases run
on both (``[s3]``, ``[gs]``).

The store does not know stages apart, so most cases build a tiny output with a stand-in build (milliseconds,
no model); the end-to-end runs are marked slow and run on S3, but for one `dmd generate` on both.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

import gcs_server
import s3_server
from conftest import ROOT
from s3_server import environment

from dmd_core.errors import InputError
from stages import files
from stages.contract import MANIFEST, Manifest, file_entry
from stages.store import open_store
from stages.store.bucket import TRANSFERRED
from stages.store.object import CACHE_ENV, ObjectStore

DEAD_PID = 4_000_000  # above Linux's pid_max: never a live process
FILES = {"weights.bin": b"w" * 3000, "sub/notes.txt": b"a file in a folder\n"}


class S3:
    """moto's S3 server, its objects read and written through boto3."""

    scheme = "s3"

    def __init__(self, stack: contextlib.ExitStack):
        stack.enter_context(environment(stack.enter_context(s3_server.s3_server())))

    def new_bucket(self) -> str:
        return s3_server.new_bucket()

    def objects(self, bucket: str) -> dict[str, bytes]:
        """Listed, then read one by one: an object deleted in between (a run in progress) is left out."""
        import boto3

        s3 = boto3.client("s3")
        out = {}
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            for o in page.get("Contents", []):
                with contextlib.suppress(s3.exceptions.NoSuchKey):
                    out[o["Key"]] = s3.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
        return out

    def put(self, bucket: str, key: str, data: bytes) -> None:
        s3_server.put_object(bucket, key, data)

    def delete(self, bucket: str, key: str) -> None:
        import boto3

        boto3.client("s3").delete_object(Bucket=bucket, Key=key)


class Gcs:
    """tests/gcs_server.py's server, its objects read and written directly (a write makes a new generation)."""

    scheme = "gs"

    def __init__(self, stack: contextlib.ExitStack):
        self.server, env = stack.enter_context(gcs_server.gcs_server())
        stack.enter_context(environment(env))

    def new_bucket(self) -> str:
        return gcs_server.new_bucket(self.server)

    def objects(self, bucket: str) -> dict[str, bytes]:
        return self.server.objects(bucket)

    def put(self, bucket: str, key: str, data: bytes) -> None:
        self.server.put(bucket, key, data)

    def delete(self, bucket: str, key: str) -> None:
        self.server.delete(bucket, key)


@dataclass
class Remote:
    """A bucket on one of the servers; the store's root is ``<scheme>://<name>/runs``."""

    backend: S3 | Gcs
    name: str

    @property
    def url(self) -> str:
        return f"{self.backend.scheme}://{self.name}/runs"

    def objects(self) -> dict[str, bytes]:
        return self.backend.objects(self.name)

    def put(self, key: str, data: bytes) -> None:
        self.backend.put(self.name, key, data)

    def delete(self, key: str) -> None:
        self.backend.delete(self.name, key)

    def another(self) -> "Remote":
        return Remote(self.backend, self.backend.new_bucket())


@pytest.fixture(scope="module")
def servers():
    """Each server started once per module, when a test first needs it."""
    with contextlib.ExitStack() as stack:
        started: dict[str, S3 | Gcs] = {}
        yield lambda kind: started.get(kind) or started.setdefault(kind, {"s3": S3, "gs": Gcs}[kind](stack))


def fresh(servers, kind: str, tmp_path: Path, monkeypatch) -> Remote:
    """A fresh bucket, and a fresh cache folder (as on a new machine)."""
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv("DMD_LOCK_LEASE_S", raising=False)
    monkeypatch.delenv("DMD_FAULT", raising=False)
    backend = servers(kind)
    return Remote(backend, backend.new_bucket())


@pytest.fixture(params=["s3", "gs"])
def bucket(request, servers, tmp_path, monkeypatch) -> Remote:
    return fresh(servers, request.param, tmp_path, monkeypatch)


@pytest.fixture
def s3_bucket(servers, tmp_path, monkeypatch) -> Remote:
    return fresh(servers, "s3", tmp_path, monkeypatch)


def another_machine(monkeypatch, tmp_path: Path, name: str = "other") -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / name))


def tiny_build(store: ObjectStore, kind: str, key: str, log: Path | None = None, seconds: float = 0.0):
    """A stand-in for a stage's build: writes FILES and the manifest (the same bytes every time)."""

    def build(work: Path) -> Manifest:
        if log is not None:
            with open(log, "a") as f:
                f.write(f"{os.getpid()}\n")
        time.sleep(seconds)
        for name, data in FILES.items():
            (work / name).parent.mkdir(parents=True, exist_ok=True)
            (work / name).write_bytes(data)
        m = Manifest(stage=kind, key=key, code_version="t", config={}, pipeline_config={}, upstream={},
                     files=[file_entry(work / n, name=n) for n in FILES], wall_time_s=0.0)  # fmt: skip
        store.save_manifest(m, work)
        return m

    return build


def build_once(store: ObjectStore, key: str = "k1", **kw) -> Path:
    out = store.side_dir("reference", key)
    store.reuse_or_build("reference", out, "config: 1\n", tiny_build(store, "reference", key, **kw))
    return out


def counters() -> tuple[int, int]:
    return TRANSFERRED.down, files.HASHED.bytes


def test_publish_then_read_on_another_machine(bucket, tmp_path, monkeypatch):
    store = open_store(bucket.url)
    assert isinstance(store, ObjectStore) and store.absolute_root() == bucket.url
    store.check_writable()
    out = build_once(store)
    want = {f"runs/reference/k1/{n}": d for n, d in FILES.items()} | {"runs/reference/k1/config.yaml": b"config: 1\n"}
    got = bucket.objects()
    assert {k: v for k, v in got.items() if not k.endswith(MANIFEST)} == want  # nothing else: no partial prefix, no lock
    assert Manifest.model_validate_json(got[f"runs/reference/k1/{MANIFEST}"]).key == "k1"

    before = counters()
    assert store.verified(out) is not None  # the builder's own copy: recorded at publish
    assert counters() == before

    another_machine(monkeypatch, tmp_path)
    there = open_store(bucket.url)
    out2 = there.side_dir("reference", "k1")
    assert out2 != out and not out2.exists()
    assert [(k, p) for k, p in there.outputs()] == [("reference", out2)]
    down, hashed = counters()
    assert there.verified(out2) is not None
    size = sum(map(len, FILES.values()))
    assert counters() == (down + size, hashed + size)  # downloaded and hashed once: listed files only
    assert {n: (out2 / n).read_bytes() for n in FILES} == FILES
    before = counters()
    assert open_store(bucket.url).verified(out2) is not None  # a rerun (a new store object): cached
    assert counters() == before


def test_a_damaged_object_is_refused_and_rebuilt(bucket, tmp_path, monkeypatch):
    store = open_store(bucket.url)
    out = build_once(store)
    bad = b"W" + FILES["weights.bin"][1:]  # same size
    bucket.put("runs/reference/k1/weights.bin", bad)
    m = store.read_manifest(out)
    assert store.problems(out, m) == ["weights.bin"]  # its ETag changed: downloaded and checked
    assert (out / "weights.bin").read_bytes() == FILES["weights.bin"]  # the good copy here is not replaced

    another_machine(monkeypatch, tmp_path)
    there = open_store(bucket.url)
    out2 = there.side_dir("reference", "k1")
    assert there.verified(out2) is None and not (out2 / "weights.bin").exists()
    bucket.put("runs/reference/k1/weights.bin", b"short")
    assert there.problems(out2, m) == ["weights.bin (size 5 in the bucket, 3000 in the manifest)"]

    log = tmp_path / "builds.log"
    build_once(there, log=log)  # fails verification: redone and published again
    assert len(log.read_text().splitlines()) == 1
    assert bucket.objects()["runs/reference/k1/weights.bin"] == FILES["weights.bin"]
    assert there.verified(out2) is not None and store.verified(out) is not None


def test_a_missing_object_fails_verification(bucket):
    store = open_store(bucket.url)
    out = build_once(store)
    bucket.delete("runs/reference/k1/sub/notes.txt")
    assert store.problems(out, store.read_manifest(out)) == ["sub/notes.txt (missing in the bucket)"]


def test_no_manifest_no_output(bucket, tmp_path):
    """Objects under the partial prefix, or under a final prefix without its manifest, are never an output."""
    store = open_store(bucket.url)
    out = build_once(store)
    done = bucket.objects()
    for key, data in done.items():  # a complete-looking copy under the hidden partial prefix, manifest and all
        bucket.put(key.replace("reference/k1/", "reference/.k2.partial/"), data)
        if not key.endswith(MANIFEST):  # and one under a final prefix, without its manifest
            bucket.put(key.replace("reference/k1/", "reference/k3/"), data)
    assert [p.name for _, p in store.outputs()] == ["k1"]
    for key in ("k2", "k3"):
        assert store.read_manifest(store.side_dir("reference", key)) is None
        assert store.verified(store.side_dir("reference", key)) is None
    bucket.delete(f"runs/reference/k1/{MANIFEST}")
    assert store.verified(out) is None and list(store.outputs()) == []  # the local copy is not trusted either


def test_two_builders_at_once_build_once(bucket, tmp_path, monkeypatch):
    """Two processes, a build longer than the lease: the second waits (the first's heartbeat keeps its lease)
    and then reuses the output."""
    monkeypatch.setenv("DMD_LOCK_LEASE_S", "1.5")
    log = tmp_path / "builds.log"
    store = open_store(bucket.url)
    pids = [fork(lambda: build_once(open_store(bucket.url), log=log, seconds=3.5)) for _ in range(2)]
    codes = [os.waitpid(pid, 0)[1] for pid in pids]
    assert codes == [0, 0]
    assert len(log.read_text().splitlines()) == 1
    assert store.verified(store.side_dir("reference", "k1")) is not None
    assert not [k for k in bucket.objects() if ".lock" in k or ".partial" in k]


def test_a_silent_holder_on_another_host_is_taken_over_after_the_lease(bucket, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("DMD_LOCK_LEASE_S", "0.8")
    record = {"pid": 123, "host": "elsewhere", "since": "2026-01-01T00:00:00+00:00", "start": 1, "owner": "x", "beat": 0}
    bucket.put("runs/reference/.k1.lock", json.dumps(record).encode())
    store = open_store(bucket.url)
    t0 = time.monotonic()
    with caplog.at_level("INFO", logger="dmd"):
        build_once(store)
    assert time.monotonic() - t0 >= 0.8
    assert "took over reference k1 from pid 123 on elsewhere" in caplog.text and "silent for 0.8 s" in caplog.text
    assert store.verified(store.side_dir("reference", "k1")) is not None
    assert "runs/reference/.k1.lock" not in bucket.objects()


def test_a_dead_holder_of_this_host_is_taken_over_at_once(bucket, caplog):
    import socket

    record = {"pid": DEAD_PID, "host": socket.gethostname(), "since": "2026-01-01T00:00:00+00:00", "start": 1, "owner": "x", "beat": 0}
    bucket.put("runs/reference/.k1.lock", json.dumps(record).encode())
    store = open_store(bucket.url)
    t0 = time.monotonic()
    with caplog.at_level("INFO", logger="dmd"):
        build_once(store)
    assert time.monotonic() - t0 < 10  # the lease is 120 s
    assert f"from pid {DEAD_PID}" in caplog.text and "its process is gone" in caplog.text


def test_a_live_holder_is_waited_for_across_leases(bucket, monkeypatch):
    """A holder that beats keeps its lock for 2.5 leases; the waiter enters only after it is released."""
    monkeypatch.setenv("DMD_LOCK_LEASE_S", "1")
    store = open_store(bucket.url)
    out = store.side_dir("reference", "k1")
    times: dict[str, float] = {}
    entered = threading.Event()

    def hold():
        with store.lock(out):
            entered.set()
            time.sleep(2.5)
            times["released"] = time.monotonic()

    t = threading.Thread(target=hold)
    t.start()
    entered.wait(10)
    with open_store(bucket.url).lock(out):
        times["entered"] = time.monotonic()
    t.join()
    assert times["entered"] >= times["released"]


def test_a_taken_over_builder_publishes_nothing(bucket, monkeypatch):
    store = open_store(bucket.url)
    out = store.side_dir("reference", "k1")

    def build(work: Path) -> Manifest:
        m = tiny_build(store, "reference", "k1")(work)
        bucket.put("runs/reference/.k1.lock", b'{"owner": "someone else"}')  # as a waiter that took over does
        return m

    with pytest.raises(InputError, match="another builder took this build's lock over"):
        store.reuse_or_build("reference", out, "config: 1\n", build)
    assert f"runs/reference/k1/{MANIFEST}" not in bucket.objects()
    assert bucket.objects()["runs/reference/.k1.lock"] == b'{"owner": "someone else"}'  # not released: it is not this builder's


@pytest.mark.parametrize("point", ["publish", "publish/uploaded", "publish/copied", "publish/moved"])
def test_killed_at_a_publish_point_resumes_to_the_same_bytes(bucket, tmp_path, monkeypatch, point):
    ref = bucket.another()
    build_once(open_store(ref.url))
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    store = open_store(bucket.url)
    monkeypatch.setenv("DMD_FAULT", point)
    pid = fork(lambda: build_once(open_store(bucket.url)))
    monkeypatch.delenv("DMD_FAULT")
    status = os.waitpid(pid, 0)[1]
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, f"{point} was never reached ({status})"
    assert f"runs/reference/k1/{MANIFEST}" not in bucket.objects()
    out = build_once(store)  # the dead builder's lock is taken over at once (its pid is gone)
    assert bucket.objects() == ref.objects()  # nothing left under the partial prefix, no lock, the same bytes
    assert store.verified(out) is not None
    cache = Path(os.environ[CACHE_ENV])
    assert not [p for p in cache.rglob("*") if ".partial" in p.name or ".tmp" in p.name or p.name == ".uploaded.json"]


def test_an_output_named_by_its_url(bucket):
    store = open_store(bucket.url)
    out = build_once(store)
    assert store.input_dir(f"{bucket.url}/reference/k1") == out == store.input_dir(f"{bucket.url}/reference/k1/")
    other_prefix = f"{bucket.backend.scheme}://{bucket.name}/other"
    for other in (f"{other_prefix}/reference/k1", f"{bucket.url}/reference/.k1.partial", "/data/pairs"):
        assert store.input_dir(other) == Path(other)


def test_refusals(bucket, monkeypatch):
    scheme = bucket.backend.scheme
    with pytest.raises(InputError, match="no store for az:// URLs. Fix: a directory, s3://BUCKET/PREFIX .* or gs://BUCKET/PREFIX"):
        open_store("az://bucket/prefix")
    with pytest.raises(InputError, match=f"names no bucket. Fix: store: {scheme}://BUCKET/PREFIX"):
        open_store(f"{scheme}:///prefix")
    with pytest.raises(InputError, match="cannot be written.*Fix: create the bucket"):
        open_store(f"{scheme}://no-such-bucket-here/runs").check_writable()
    monkeypatch.setenv("DMD_LOCK_LEASE_S", "soon")
    with pytest.raises(InputError, match="DMD_LOCK_LEASE_S='soon' is not a positive number"):
        open_store(bucket.url).check_writable()


def test_a_record_update_loses_to_a_write_between_its_read_and_its_write(bucket):
    """Records are conditional writes (create if absent, replace if still the version read): another store's
    write between an update's read and its write makes that write fail, and the update reads again and
    applies its change to the newer record; ``add_record`` refuses a name that exists."""
    a, b = open_store(bucket.url), open_store(bucket.url)
    seen: list[bytes | None] = []

    def increment_after_another_writer(old: bytes | None) -> bytes:
        seen.append(old)
        if len(seen) == 1:  # between b's read and b's write
            a.update_record("counter/n", lambda o: str(int(o or b"0") + 10).encode())
        return str(int(old or b"0") + 1).encode()

    assert b.update_record("counter/n", increment_after_another_writer) == b"11"
    assert seen == [None, b"10"]  # its create lost to a's; it read a's record and wrote on it
    seen.clear()
    assert b.update_record("counter/n", increment_after_another_writer) == b"22"
    assert seen == [b"11", b"21"]  # its replace of the version it read lost to a's
    assert bucket.objects()["runs/records/counter/n"] == b"22" and a.read_record("counter/n") == b"22"
    a.add_record("history/a", b"first")
    with pytest.raises(InputError, match="already exists"):
        b.add_record("history/a", b"second")
    assert b.record_names("counter") == ["n"] and b.read_record("history/a") == b"first"


def test_a_streamed_shard_is_read_where_it_lies_and_checked(bucket, tmp_path):
    """A generate output's pair shard is handed to readers by URL (``file_url``) and read through fsspec
    (``read_shard``: s3fs, gcsfs), its bytes checked against the manifest's sha256 at every read."""
    import hashlib

    import numpy as np

    from dmd_core.shards import check_pair_shard, write_shard

    rng = np.random.default_rng(0)
    noise, image = rng.standard_normal((3, 1, 8, 8), dtype=np.float32), rng.standard_normal((3, 1, 8, 8), dtype=np.float32)
    write_shard(tmp_path / "pairs.tar", range(3), noise, image, np.array([1, 2, 3]))
    data = (tmp_path / "pairs.tar").read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    bucket.put("runs/generate/k1/pairs-000000.tar", data)
    store = open_store(bucket.url)
    url = store.file_url(store.output_dir("generate", "k1"), "pairs-000000.tar")
    assert url == f"{bucket.url}/generate/k1/pairs-000000.tar"
    assert check_pair_shard(url, (1, 8, 8), 10, samples=3, sha256=sha) == 3
    changed = bytearray(data)
    changed[600] ^= 0xFF  # inside the first member's bytes: a readable tar, other numbers
    bucket.put("runs/generate/k1/pairs-000000.tar", bytes(changed))
    with pytest.raises(InputError, match="pair shard 'pairs-000000.tar' .* does not match the sha256 its manifest lists"):
        check_pair_shard(url, (1, 8, 8), 10, samples=3, sha256=sha)


def fork(fn) -> int:
    """Run ``fn`` in a forked child (milliseconds, no imports); exit 0 when it returns."""
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        fn()
        code = 0
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        os._exit(code)


# ---------------------------------------------------------------- the pipeline on the bucket

SHRUNK = ["generate.num_samples=64", "generate.steps=2", "generate.shard_size=32", "generate.batch_size=32", "distill.steps=4",
          "distill.batch_size=8", "distill.checkpoint_every=2", "distill.sample_every=2", "evaluate.num_samples=100",
          "evaluate.batch_size=50", "evaluate.speed_batch_size=8", "evaluate.speed_repeats=1"]  # fmt: skip


def dmd(*args: str, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-c", "from flows.cli import main; main()", *args], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, **(env or {})}, timeout=900)  # fmt: skip
    if check and proc.returncode != 0:
        raise AssertionError(f"dmd {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def logged(path: Path) -> list[list[int]]:
    return [[int(x) for x in line.split()[1:]] for line in path.read_text().splitlines()] if path.exists() else []


def export_distill_key(store: ObjectStore, export: Path) -> str:
    """The key of the distill output an export's evaluation came from."""
    evaluation = Path(json.loads((export / MANIFEST).read_text())["info"]["evaluation"])
    return Path(store.read_manifest(store.output_dir("evaluate", evaluation.name)).info["distill_dir"]).name


@pytest.mark.slow
def test_dmd_run_on_the_bucket_then_fully_cached(s3_bucket, tmp_path, monkeypatch):
    """`dmd run --set store=s3://...` of the digits default (shrunk), then again: the second run downloads
    nothing and hashes nothing; `dmd verify` on another machine downloads and checks every output."""
    sets = [a for s in [f"store={s3_bucket.url}", *SHRUNK] for a in ("--set", s)]
    first = dmd("run", *sets)
    export = Path(first.stdout.strip().splitlines()[-1])
    assert (export / "model_index.json").is_file()
    hashed, moved = tmp_path / "hashed.log", tmp_path / "moved.log"
    again = dmd("run", *sets, env={files.HASH_LOG: str(hashed), "DMD_TRANSFER_LOG": str(moved)})
    assert Path(again.stdout.strip().splitlines()[-1]) == export
    assert [h for h, in logged(hashed)] == [0] * len(logged(hashed)) and logged(hashed)
    assert [down for down, _ in logged(moved)] == [0] * len(logged(moved)) and logged(moved)
    hashed.unlink(), moved.unlink()
    chained = dmd("export", *sets, "-q", env={files.HASH_LOG: str(hashed), "DMD_TRANSFER_LOG": str(moved)})  # no Prefect record: the store's own check
    assert Path(chained.stdout.strip().splitlines()[-1]) == export
    assert logged(hashed) == [[0]] and [down for down, _ in logged(moved)] == [0]

    another_machine(monkeypatch, tmp_path)
    ok = dmd("verify", *sets)
    assert "all outputs verify" in ok.stderr and ok.stdout.count("ok  ") == 6

    # export redone on this machine once the first one is gone: its generator is found through the store
    import shutil

    store = open_store(s3_bucket.url)
    store.remove(store.output_dir("export", export.name))
    shutil.rmtree(tmp_path / "cache")
    redone = Path(dmd("export", *sets, "-q").stdout.strip().splitlines()[-1])
    assert redone == store.output_dir("export", export.name) and store.verified(redone) is not None
    # an explicit input by URL: the pairs in the bucket (distill is cached: same pairs, same key)
    pairs = next(k for k in s3_bucket.objects() if "/generate/" in k and k.endswith(MANIFEST)).split("/")[-2]
    distilled = dmd("distill", *sets, "--set", f"distill.pairs={s3_bucket.url}/generate/{pairs}", "-q")
    assert Path(distilled.stdout.strip().splitlines()[-1]) == store.output_dir("distill", export_distill_key(store, redone))
    s3_bucket.put(next(k for k in s3_bucket.objects() if k.endswith("grid.png") and "/evaluate/" in k), b"not a png")
    failed = dmd("verify", *sets, check=False)
    assert failed.returncode == 1 and "FAIL  evaluate" in failed.stdout and "grid.png" in failed.stdout


RECORDS = {"config.yaml", "manifest.json", "metrics.parquet", "metrics.json", "curves.png", "README.md"}  # paths or timings inside


def products(bucket: Remote) -> dict[str, bytes]:
    """The bucket's product objects (as tests/faults compare outputs): records with paths or timings and checkpoints left out."""
    return {k: v for k, v in bucket.objects().items() if k.rsplit("/", 1)[-1] not in RECORDS and "/checkpoints/" not in k}


def test_generate_on_gcs_publishes_the_s3_run_s_bytes(servers, tmp_path, monkeypatch, edm_teacher):
    """`dmd generate` in a subprocess (gcsfs reached through the STORAGE_EMULATOR_HOST it inherits) on gs://
    and on s3://: the same objects, byte for byte, with nothing partial or locked left."""
    from conftest import run_cli, write_config

    buckets = [fresh(servers, kind, tmp_path, monkeypatch) for kind in ("s3", "gs")]
    for b in buckets:
        run_cli("generate", "--config", str(write_config(tmp_path / f"{b.backend.scheme}.yaml", edm_teacher, b.url)), "-q",
                env={CACHE_ENV: str(tmp_path / f"cache-{b.backend.scheme}")})  # fmt: skip
    on_s3, on_gs = (products(b) for b in buckets)
    assert on_gs == on_s3 and len([k for k in on_gs if k.endswith(".tar")]) == 3
    assert [k for k in buckets[1].objects() if k.endswith(MANIFEST)] == [k for k in buckets[0].objects() if k.endswith(MANIFEST)]
    assert not [k for k in buckets[1].objects() if ".partial/" in k or k.endswith(".lock")]


@pytest.mark.slow
def test_a_stage_killed_after_its_local_move_resumes_to_the_same_bytes(s3_bucket, tmp_path, edm_teacher):
    """distill killed between making its work directory this machine's copy and writing the manifest object
    (the last publish point): the rerun takes the copy back as its work directory and publishes the same bytes."""
    from conftest import run_cli, write_config

    ref = s3_bucket.another()
    run_cli("distill", "--config", str(write_config(tmp_path / "ref.yaml", edm_teacher, ref.url, distill={})), "-q")
    cfg = write_config(tmp_path / "c.yaml", edm_teacher, s3_bucket.url, distill={})
    killed = run_cli("distill", "--config", str(cfg), "-q", check=False, env={"DMD_FAULT": "publish/moved:2"})  # 1: generate's
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert [k for k in s3_bucket.objects() if k.endswith(MANIFEST)] == [k for k in s3_bucket.objects() if "/generate/" in k and k.endswith(MANIFEST)]
    run_cli("distill", "--config", str(cfg), "-q")
    assert products(s3_bucket) == products(ref) and any("/distill/" in k for k in products(ref))
    assert not [k for k in s3_bucket.objects() if ".partial/" in k or k.endswith(".lock")]


@pytest.mark.slow
def test_two_identical_runs_at_once_build_once(s3_bucket, tmp_path, edm_teacher):
    """Two `dmd generate` of one config on the bucket: the second waits on the first's lock object and then
    reuses its output (it neither builds nor takes the lock over). The first is paused (SIGSTOP, for less than
    the lease) once it holds the lock, until the second says it waits: the two overlap however fast each is."""
    from conftest import write_config

    cfg = write_config(tmp_path / "c.yaml", edm_teacher, s3_bucket.url)
    args = [sys.executable, "-m", "stages", "generate", "--config", str(cfg)]
    logs = [tmp_path / "first.log", tmp_path / "second.log"]
    first = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=logs[0].open("w"), text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not [k for k in s3_bucket.objects() if k.endswith(".lock")]:
        time.sleep(0.02)
    os.kill(first.pid, signal.SIGSTOP)
    try:
        second = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=logs[1].open("w"), text=True)
        while time.time() < deadline and "waiting: generate" not in logs[1].read_text() and second.poll() is None:
            time.sleep(0.05)
    finally:
        os.kill(first.pid, signal.SIGCONT)
    out1, out2 = first.communicate(timeout=600)[0], second.communicate(timeout=600)[0]
    err1, err2 = (p.read_text() for p in logs)
    assert first.returncode == 0 and second.returncode == 0, err1[-2000:] + err2[-2000:]
    assert out1.strip().splitlines()[-1] == out2.strip().splitlines()[-1]
    assert "waiting: generate" in err2 and f"pid {first.pid}" in err2 and "took over" not in err2 + err1
    manifests = [k for k in s3_bucket.objects() if k.endswith(MANIFEST)]
    assert len(manifests) == 1 and "/generate/" in manifests[0]
