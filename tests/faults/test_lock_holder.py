"""A build's lock names its holder, and a waiter is never left waiting on a stopped one for ever.

The holder writes (pid, host, start time) into the lock file and keeps rewriting it (a heartbeat); a
waiter says once whom it waits for, and when the holder's record stops changing for the lease
(``DMD_LOCK_LEASE_S``: tiny here) it ends a holder it can prove stopped (this host, the same process,
state T) and builds, resuming the partial build as after any kill -9; any other silent holder is refused
with the pid, the host and the fix.

Holders are forked children of the test process; every wait is a poll with a generous deadline, and no
test asserts how long anything took.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import signal
import socket
import threading
import time
from datetime import datetime
from pathlib import Path

import pytest

from common import leftovers, product_files, start_forked, wait_forked
from conftest import write_config
from dmd_core.errors import InputError
from stages.store import LocalStore

importlib.import_module("flows.cli")  # imported once here: each forked ``dmd`` run then starts at once
DEADLINE_S = 60  # generous: only a broken waiter or holder gets near it
WAITING = "still waiting"


def poll(condition, what: str) -> None:
    end = time.monotonic() + DEADLINE_S
    while not condition():
        assert time.monotonic() < end, f"gave up waiting for {what}"
        time.sleep(0.02)


def state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]


def record(store: LocalStore, out: Path) -> dict:
    text = (out.parent / f".{out.name}.lock").read_text().strip()
    return json.loads(text) if text else {}


def hold(store: LocalStore, out: Path, then: str, fake: dict | None = None) -> tuple[int, int]:
    """A forked child that takes the lock of ``out`` (and overwrites its record with ``fake``), then stops
    itself (``then='stop'``) or holds until a byte arrives on the returned pipe end. Returns (pid, pipe)."""
    ready_r, ready_w = os.pipe()
    release_r, release_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 70
        try:
            with store.lock(out):
                if fake is not None:
                    path = out.parent / f".{out.name}.lock"
                    path.write_text(json.dumps({**record(store, out), **fake}))
                os.write(ready_w, b"1")
                if then == "stop":
                    os.kill(os.getpid(), signal.SIGSTOP)
                else:
                    os.read(release_r, 1)
            code = 0
        finally:
            os._exit(code)
    os.close(ready_w), os.close(release_r)
    assert os.read(ready_r, 1) == b"1", "the holder never took the lock"
    os.close(ready_r)
    if then == "stop":
        poll(lambda: state(pid) in "Tt", "the holder to stop")
    return pid, release_w


def attempt(store: LocalStore, out: Path) -> BaseException | str | None:
    """Take and release the lock in a thread: None once taken, the exception raised, or WAITING after the deadline."""
    result: list = []

    def take() -> None:
        try:
            with store.lock(out):
                result.append(None)
        except BaseException as e:  # noqa: BLE001 (reported to the test)
            result.append(e)

    thread = threading.Thread(target=take, daemon=True)
    thread.start()
    thread.join(DEADLINE_S)
    return result[0] if result else WAITING


def end(pid: int) -> None:
    """Kill and reap a child this test started (and has not reaped yet)."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


def waiting_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("waiting:")]


@pytest.fixture
def store(tmp_path) -> LocalStore:
    return LocalStore(tmp_path / "store")


def test_a_stopped_holder_is_named_then_ended_after_the_lease(store, monkeypatch, caplog):
    out = store.output_dir("generate", "k1")
    pid, _ = hold(store, out, "stop")
    try:
        held = record(store, out)
        assert (held["pid"], held["host"]) == (pid, socket.gethostname())
        assert held["start"] == int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[19])
        datetime.fromisoformat(held["since"])
        monkeypatch.setenv("DMD_LOCK_LEASE_S", "0.5")
        with caplog.at_level(logging.INFO, logger="dmd"):
            assert attempt(store, out) is None, "the waiter did not take over"
        lines = waiting_lines(caplog)
        assert len(lines) == 1, lines
        assert lines[0].startswith(f"waiting: generate k1 is being built by pid {pid} on {socket.gethostname()} since {held['since']}")
        assert f"it is stopped: kill -CONT {pid} resumes it" in lines[0]
        took = [r.getMessage() for r in caplog.records if r.getMessage().startswith("took over")]
        assert took == [f"took over generate k1 from pid {pid} on {socket.gethostname()} since {held['since']}: it was stopped "
                        "and silent for 0.5 s (DMD_LOCK_LEASE_S), so it was ended (SIGKILL); its finished parts are resumed"]
        assert wait_pid(pid) == -signal.SIGKILL
    finally:
        end(pid)


def test_a_stopped_process_that_did_not_write_the_record_is_refused_not_ended(store, monkeypatch):
    """The record's pid is stopped but started at another time (a reused pid): it is not ended."""
    out = store.output_dir("generate", "k4")
    pid, _ = hold(store, out, "stop", fake={"start": 1})
    try:
        monkeypatch.setenv("DMD_LOCK_LEASE_S", "0.5")
        e = attempt(store, out)
        assert isinstance(e, InputError), f"the waiter did not refuse: {e!r}"
        for needle in (f"generate k4 is being built by pid {pid} on {socket.gethostname()}", "stopped", f"kill -CONT {pid}", f"kill {pid}", "Fix:"):
            assert needle in str(e), f"{needle!r} not in: {e}"
        assert state(pid) in "Tt", "a process the record cannot be proven to name was ended"
    finally:
        end(pid)
    assert attempt(store, out) is None  # the kernel dropped the dead holder's lock


def test_a_holder_on_another_host_that_stops_answering_is_refused(store, monkeypatch):
    """The record names another host (a store on a shared file system): the fix says where to act."""
    out = store.output_dir("distill", "k2")
    pid, _ = hold(store, out, "stop", fake={"pid": 4242, "host": "build-node-7"})
    try:
        monkeypatch.setenv("DMD_LOCK_LEASE_S", "0.5")
        e = attempt(store, out)
        assert isinstance(e, InputError), f"the waiter did not refuse: {e!r}"
        for needle in ("distill k2 is being built by pid 4242 on build-node-7", "Fix: on build-node-7", "kill 4242"):
            assert needle in str(e), f"{needle!r} not in: {e}"
    finally:
        end(pid)


def test_a_running_holder_keeps_its_lease_and_the_waiter_then_builds(store, monkeypatch, caplog):
    """A holder that is alive answers (its record keeps changing): the waiter outlasts many leases and
    takes the lock when the holder is done."""
    out = store.output_dir("evaluate", "k3")
    monkeypatch.setenv("DMD_LOCK_LEASE_S", "1")  # beats every 0.25 s: a loaded machine still keeps it
    pid, release = hold(store, out, "hold")
    result: list = []
    reaped = False
    try:
        first = record(store, out).get("beat", 0)
        with caplog.at_level(logging.INFO, logger="dmd"):
            waiter = threading.Thread(target=lambda: result.append(attempt(store, out)), daemon=True)
            waiter.start()
            poll(lambda: waiting_lines(caplog), "the waiting line")
            poll(lambda: record(store, out).get("beat", 0) >= first + 6, "six heartbeats (one and a half leases)")
            assert not result, f"the waiter gave up on a live holder: {result}"
            os.write(release, b"1")
            waiter.join(DEADLINE_S)
        assert result == [None]
        assert len(waiting_lines(caplog)) == 1
        reaped = True
        assert wait_pid(pid) == 0
    finally:
        if not reaped:
            end(pid)


def wait_pid(pid: int) -> int:
    _, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def wait_forked_or_kill(pid: int) -> int:
    """A forked run's exit status; killed (and reported as still waiting) past the deadline."""
    end_at = time.monotonic() + DEADLINE_S
    while time.monotonic() < end_at:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        time.sleep(0.05)
    end(pid)
    return -999


def test_a_stopped_dmd_generate_is_taken_over_and_resumed(tmp_path, edm_teacher, monkeypatch):
    """``dmd generate`` stopped after its first shard: an identical run names it, ends it after the lease
    and resumes its partial build to the bytes of an uninterrupted run."""
    import stages.generate

    cfg = write_config(tmp_path / "c.yaml", edm_teacher, tmp_path / "store", num_samples=16, shard_size=8)  # two shards
    run = lambda store, log, env=None: start_forked(["generate", "--config", str(cfg), "-q", "--set", f"store={store}"], tmp_path / log, env=env)  # noqa: E731
    assert wait_forked(run(tmp_path / "clean", "clean.log")) == 0, (tmp_path / "clean.log").read_text()[-2000:]
    clean = LocalStore(tmp_path / "clean")
    (_, ref), = clean.outputs()

    reached: list[str] = []

    def stop_at_second_shard(name: str) -> None:
        reached.append(name)
        if reached.count("generate.shard-written") == 2 and name == "generate.shard-written":
            os.kill(os.getpid(), signal.SIGSTOP)

    monkeypatch.setattr(stages.generate, "fault_point", stop_at_second_shard)
    holder = run(tmp_path / "store", "holder.log")
    monkeypatch.undo()  # only the forked holder stops itself
    try:
        poll(lambda: state(holder) in "TtZ", "the first run to stop")
        assert state(holder) in "Tt", (tmp_path / "holder.log").read_text()[-2000:]
        first_shard = (tmp_path / "store" / "generate" / f".{ref.name}.partial" / "pairs-000000.tar").stat().st_ino
        waiter = run(tmp_path / "store", "waiter.log", {"DMD_LOCK_LEASE_S": "0.5"})
        code = wait_forked_or_kill(waiter)
        log = (tmp_path / "waiter.log").read_text()
        assert code == 0, f"exit {code}:\n{log[-2000:]}"
        assert "Traceback" not in log and "error:" not in log, log[-2000:]
        assert f"waiting: generate {ref.name} is being built by pid {holder}" in log
        assert f"took over generate {ref.name} from pid {holder}" in log
        assert wait_pid(holder) == -signal.SIGKILL
    finally:
        end(holder)
    out = tmp_path / "store" / "generate" / ref.name
    assert product_files(out) == product_files(ref)
    assert (out / "pairs-000000.tar").stat().st_ino == first_shard, "the stopped run's finished shard was not resumed from"
    assert LocalStore(tmp_path / "store").verified(out) is not None
    assert leftovers(tmp_path / "store") == []
