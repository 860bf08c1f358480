"""The local Prefect server `dmd run` starts: an unusable PREFECT_HOME is refused before it starts, a slow
start is waited for while the server makes progress, a start that fails or stalls is one error line naming
the server's log, and a server lost mid-run (killed, or not answering) ends the run within seconds with one
error line, its stages stopped and their finished work kept.

Cases that need a real server share one migrated PREFECT_HOME kept in pytest's cache: a fresh one spends
~30 s creating its database, a migrated one starts in ~7 s. Runs that must end in a hard exit are forked.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest
from conftest import ROOT, add_tiny_evaluate, write_config
from bad_input.refusal import assert_refused, nothing_started, read_only_dir

import flows.server as server

# Wraps the real `prefect server start` command (its argv after the wrapper's own): prints a line every
# 0.25 s for DELAY seconds (a start that is slow but progressing), then becomes the server.
SLOW_START = """
import os, sys, time
end = time.monotonic() + float(os.environ["DELAY"])
while time.monotonic() < end:
    print("still starting", flush=True)
    time.sleep(0.25)
os.execv(sys.argv[1], sys.argv[1:])
"""
# A "server" that writes its pid, then neither answers nor works nor prints: a start that stalled.
STALLED = "import os, sys, time; open(os.environ['PIDFILE'], 'w').write(str(os.getpid())); time.sleep(600)"
# A "server" that fails the way a real one does: a traceback on its output, then exit status 3.
CRASHING = "import sys; print('Traceback (most recent call last):'); print('sqlite3.OperationalError: unable to open database file'); sys.exit(3)"
# A stand-in stage: records that it runs, and that a SIGTERM stopped it (as a real stage keeps its finished work).
STAND_IN_STAGE = """
import signal, sys, time
marker = sys.argv[1]
def stop(*_):
    open(marker, "w").write("stopped")
    sys.exit(143)
signal.signal(signal.SIGTERM, stop)
open(marker, "w").write("running")
time.sleep(600)
"""
DEADLINE_S = 60  # a bound for a run that never ends, far above the seconds it takes; not a speed check


@pytest.fixture(scope="module")
def migrated_home(request) -> Path:
    return request.config.cache.mkdir("dmd-prefect-home")


@pytest.fixture
def cfg(tmp_path, edm_teacher) -> Path:
    return add_tiny_evaluate(write_config(tmp_path / "c.yaml", edm_teacher, tmp_path / "store", distill={}))


def refused_run(cfg: Path, home: Path, *needles: str, env: dict | None = None) -> str:
    """``dmd run`` on its own local server with this PREFECT_HOME: refused (exit 2, one line naming PREFECT_HOME)."""
    return assert_refused(["run", "--config", str(cfg)], cfg.parent / "store", *needles, env={"PREFECT_HOME": str(home), "PREFECT_API_URL": None, **(env or {})})


# ---------------------------------------------------------------- an unusable PREFECT_HOME: refused before the server starts


def test_prefect_home_that_is_a_file(tmp_path, cfg):
    home = tmp_path / "home"
    home.write_text("not a directory\n")
    with nothing_started(tmp_path / "store"):
        line = refused_run(cfg, home, "PREFECT_HOME", "is a file", str(home))
    assert home.read_text() == "not a directory\n" and "Fix: point PREFECT_HOME at" in line


def test_prefect_home_under_a_file(tmp_path, cfg):
    (tmp_path / "plain").write_text("x\n")
    with nothing_started(tmp_path / "store"):
        refused_run(cfg, tmp_path / "plain" / "home", "PREFECT_HOME", "cannot be created")


def test_prefect_home_read_only(tmp_path, cfg):
    home = read_only_dir(tmp_path / "ro")
    try:
        with nothing_started(tmp_path / "store"):
            refused_run(cfg, home, "PREFECT_HOME", "is not writable", str(home))
    finally:
        if os.path.ismount(home):
            subprocess.run(["umount", str(home)], check=False)
        else:
            home.chmod(0o755)


def test_corrupt_prefect_database(tmp_path, cfg):
    home = tmp_path / "home"
    home.mkdir()
    garbage = b"this is no SQLite database\n" * 200
    (home / "prefect.db").write_bytes(garbage)
    with nothing_started(tmp_path / "store"):
        line = refused_run(cfg, home, "PREFECT_HOME", "prefect.db", "not a SQLite database", "move it away")
    assert (home / "prefect.db").read_bytes() == garbage, "the check never touches the database"
    assert len(line) < 400


# ---------------------------------------------------------------- starting: waited for while it progresses, one line when it fails


def test_server_that_exits_during_its_start_is_one_line_naming_its_log(tmp_path, cfg, monkeypatch):
    monkeypatch.setattr(server, "SERVER_COMMAND", [sys.executable, "-c", CRASHING])
    line = refused_run(cfg, tmp_path / "home", "local Prefect server", "exit status 3", "unable to open database file", "log")
    log = _log_named(line)
    assert "unable to open database file" in log.read_text()
    log.unlink()


def test_stalled_server_start_gives_up_and_stops_it(tmp_path, cfg, monkeypatch):
    monkeypatch.setattr(server, "SERVER_COMMAND", [sys.executable, "-c", STALLED])
    pidfile = tmp_path / "server.pid"
    line = refused_run(cfg, tmp_path / "home", "no progress for 2 s", "DMD_SERVER_START_STALL_S", "log",
                       env={"DMD_SERVER_START_STALL_S": "2", "PIDFILE": str(pidfile)})  # fmt: skip
    pid = int(pidfile.read_text())
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    _log_named(line).unlink()


def test_bad_start_bound_is_refused_before_the_server(tmp_path, cfg):
    with nothing_started(tmp_path / "store"):
        refused_run(cfg, tmp_path / "home", "DMD_SERVER_START_STALL_S", "positive number of seconds", env={"DMD_SERVER_START_STALL_S": "soon"})


def _slow_start(tmp_path: Path, monkeypatch, home: Path, delay_s: float) -> None:
    wrapper = tmp_path / "slow_start.py"
    wrapper.write_text(SLOW_START)
    monkeypatch.setattr(server, "SERVER_COMMAND", [sys.executable, str(wrapper), *server.SERVER_COMMAND])
    monkeypatch.setenv("DELAY", str(delay_s))
    with server.local_server(home=home) as api:
        assert httpx.get(f"{api}/health", timeout=30).status_code == 200


def test_slow_but_progressing_start_is_waited_for(tmp_path, monkeypatch, migrated_home):
    """Without an answer for 4 s, but printing: the stall bound (2 s here) does not apply to a server that progresses."""
    monkeypatch.setenv("DMD_SERVER_START_STALL_S", "2")
    _slow_start(tmp_path, monkeypatch, migrated_home, 4)


@pytest.mark.faults_full  # ~100 s: a start slower than the fixed 90 s that used to fail a loaded machine's run
def test_start_slower_than_ninety_seconds_is_waited_for(tmp_path, monkeypatch, migrated_home):
    _slow_start(tmp_path, monkeypatch, migrated_home, 95)


def test_busy_port_is_retried_on_another(monkeypatch, migrated_home):
    """The port picked free was taken before the server bound it: another one is picked."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        ports = iter([busy])
        monkeypatch.setattr(server, "free_port", lambda: next(ports, None) or _free_port())
        with server.local_server(home=migrated_home) as api:
            assert f":{busy}/" not in api
            assert httpx.get(f"{api}/health", timeout=30).status_code == 200


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- the server lost while a run uses it


def _run_stand_in_stage(log: Path, marker: Path, env: dict) -> int:
    """Fork a child that runs a stand-in stage under ``prefect_api()`` (the local server and its watchdog); its pid."""
    pid = os.fork()
    if pid:
        return pid
    code = 70  # the child: never returns into pytest
    try:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1), os.dup2(fd, 2)
        sys.stdout = sys.stderr = open(fd, "w", buffering=1, closefd=False)
        os.environ.update(env)
        with server.prefect_api():
            subprocess.run([sys.executable, "-c", STAND_IN_STAGE, str(marker)])
        code = 0
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 71
    finally:
        sys.stdout.flush()
        os._exit(code)


def _lose_the_server(tmp_path: Path, home: Path, lose, env: dict | None = None) -> tuple[int, str, psutil.Process, float]:
    """Start the forked run, ``lose(server)`` once its stage runs; (exit status, output, server, seconds to the end)."""
    log, marker = tmp_path / "run.log", tmp_path / "stage.state"
    pid = _run_stand_in_stage(log, marker, {"PREFECT_HOME": str(home), **(env or {})})
    try:
        deadline = time.monotonic() + 300  # a bound for a server that never starts (a fresh home migrates first)
        while not (marker.exists() and marker.read_text() == "running"):
            done, _ = os.waitpid(pid, os.WNOHANG)
            assert not done, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "the stand-in stage never started"
            time.sleep(0.1)
        srv = next(p for p in psutil.Process(pid).children() if "server" in p.cmdline())
        lost_at = time.monotonic()
        lose(srv)
        while time.monotonic() - lost_at < DEADLINE_S:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
                return code, log.read_text(), srv, time.monotonic() - lost_at
            time.sleep(0.2)
        raise AssertionError(f"the run did not end within {DEADLINE_S} s of losing its server:\n{log.read_text()[-3000:]}")
    finally:
        _kill_tree(pid)
        if marker.exists() and marker.read_text() == "running":  # a failed case: the stand-in is still there
            for p in psutil.process_iter(["cmdline"]):
                if str(marker) in (p.info["cmdline"] or []):
                    p.kill()


def _kill_tree(pid: int) -> None:
    try:
        procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.send_signal(signal.SIGCONT)
            p.kill()
        except psutil.NoSuchProcess:
            pass
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass


def _assert_one_error_line(out: str, *needles: str) -> str:
    assert "Traceback" not in out, out[-3000:]
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, out[-3000:]
    for needle in needles:
        assert needle in errors[0], f"{needle!r} not in: {errors[0]}"
    return errors[0]


def _log_named(line: str) -> Path:
    """The server log an error line names (kept for the user: the test removes it)."""
    found = re.search(r"'([^']+\.log)'", line)
    assert found and Path(found.group(1)).is_file(), line
    return Path(found.group(1))


def _gone(p: psutil.Process) -> bool:
    try:
        return p.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_server_killed_mid_run_ends_it_with_one_line(tmp_path, migrated_home):
    code, out, srv, _ = _lose_the_server(tmp_path, migrated_home, lambda p: p.kill())
    assert code == server.EXIT_SERVER_LOST, out[-3000:]
    line = _assert_one_error_line(out, f"(pid {srv.pid})", "stopped during the run", "killed by signal 9", "finished work is kept", "Fix: rerun", "it resumes")
    assert (tmp_path / "stage.state").read_text() == "stopped", "the stage was not stopped by SIGTERM"
    _log_named(line).unlink()


def test_server_that_stops_answering_ends_the_run_and_is_stopped(tmp_path, migrated_home):
    code, out, srv, _ = _lose_the_server(tmp_path, migrated_home, lambda p: p.suspend(), env={"DMD_SERVER_UNANSWERED_S": "3"})
    assert code == server.EXIT_SERVER_LOST, out[-3000:]
    line = _assert_one_error_line(out, f"(pid {srv.pid})", "did not answer for 3 s", "finished work is kept", "Fix:")
    assert (tmp_path / "stage.state").read_text() == "stopped"
    assert _gone(srv), "the unanswering server was left running"
    _log_named(line).unlink()


@pytest.mark.faults_full  # ~60 s: a real `dmd run` (a tiny but long distill) whose server is killed, then resumed
def test_dmd_run_whose_server_is_killed_mid_distill_keeps_its_work_and_resumes(tmp_path, edm_teacher, migrated_home):
    from conftest import processes_mentioning

    cfg = add_tiny_evaluate(write_config(tmp_path / "c.yaml", edm_teacher, tmp_path / "store", distill={"steps": 20, "checkpoint_every": 2, "sample_every": 1000}))
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(migrated_home)
    dmd = [sys.executable, "-m", "flows", "run", "--config", str(cfg)]
    run = subprocess.Popen(dmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 600  # a bound for a stage that never checkpoints, not a speed check
        while not list((tmp_path / "store" / "distill").glob(".*/checkpoints/step-*")):
            assert run.poll() is None and time.monotonic() < deadline, run.communicate()[1][-3000:]
            time.sleep(0.2)
        srv = next(p for p in psutil.Process(run.pid).children() if "server" in p.cmdline())
        srv.kill()
        out, err = run.communicate(timeout=DEADLINE_S)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait()
    assert run.returncode == server.EXIT_SERVER_LOST, err[-3000:]
    assert out == ""
    line = _assert_one_error_line(err, f"(pid {srv.pid})", "finished work is kept", "Fix: rerun")
    _log_named(line).unlink()
    assert processes_mentioning(str(tmp_path)) == [], "a stage process outlived the run"
    assert list((tmp_path / "store" / "generate").glob("*/manifest.json")), "the finished generate output was lost"
    assert list((tmp_path / "store" / "distill").glob(".*/checkpoints/step-*")), "distill's checkpoints were lost"
    rerun = subprocess.run([*dmd, "--only", "distill"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "distill: resuming from" in rerun.stderr
    assert Path(rerun.stdout.splitlines()[-1]).parent == tmp_path / "store" / "distill"
