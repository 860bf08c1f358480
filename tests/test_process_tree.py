"""Stopping a stage stops every process it started, accelerate workers included."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from conftest import ROOT, add_tiny_evaluate, still_alive, wait_for_processes, write_config

# A generate run long enough to be stopped half-way (the tiny teacher: 100,000 samples take minutes).
LONG = dict(num_samples=100_000, steps=40, shard_size=4096, batch_size=64)


def test_kill_process_tree_reaches_workers_in_their_own_sessions(tmp_path, edm_teacher):
    from stages.launch import kill_process_tree

    cfg = write_config(tmp_path / "c.yaml", edm_teacher, tmp_path / "store", **LONG)
    proc = subprocess.Popen([sys.executable, "-m", "stages", "generate", "-c", str(cfg), "-n", "2", "-q"], cwd=ROOT, stderr=subprocess.DEVNULL)
    procs = wait_for_processes(str(tmp_path), "stages.generate", 3)  # launcher + 2 workers
    assert len({os.getsid(p.pid) for p in procs}) >= 3  # torch elastic gives each worker its own session
    kill_process_tree(proc.pid)
    proc.wait(timeout=30)
    assert still_alive(procs) == []


def test_a_stage_whose_parent_is_killed_hard_stops_with_its_workers(tmp_path, edm_teacher):
    """The flow process SIGKILLed: PR_SET_PDEATHSIG sends the stage SIGTERM, which stops its tree."""
    cfg = write_config(tmp_path / "c.yaml", edm_teacher, tmp_path / "store", **LONG)
    parent = subprocess.Popen(
        [sys.executable, "-c", "import subprocess, sys; subprocess.run(sys.argv[1:])",
         sys.executable, "-m", "stages", "generate", "-c", str(cfg), "-n", "2", "-q"],
        cwd=ROOT, stderr=subprocess.DEVNULL, env={**os.environ, "DMD_EXIT_WITH_PARENT": "1"}, start_new_session=True,
    )  # fmt: skip
    procs = wait_for_processes(str(tmp_path), "stages.generate", 3)
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    assert still_alive(procs) == []


def test_ctrl_c_on_dmd_run_stops_stage_and_local_server(tmp_path, edm_teacher):
    """A terminal's Ctrl-C (SIGINT to the whole foreground group) while generate runs under the flow."""
    import psutil

    cfg = add_tiny_evaluate(write_config(tmp_path / "c.yaml", edm_teacher, tmp_path / "store", distill={}, **LONG))  # every stage's settings are checked first
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}  # the flow's own local server
    reset_sigint = "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); os.execv(sys.argv[1], sys.argv[1:])"
    dmd = subprocess.Popen(
        [sys.executable, "-c", reset_sigint, sys.executable, "-c", "from flows.cli import main; main()", "run", "--config", str(cfg)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    wait_for_processes(str(tmp_path), "generate", 1)
    tree = psutil.Process(dmd.pid).children(recursive=True)
    assert any("server" in p.cmdline() for p in tree) and any("generate" in p.cmdline() for p in tree)
    os.killpg(dmd.pid, signal.SIGINT)
    # Exit 130 and the message say the run stopped at the signal: LONG's generate alone takes minutes, and a run
    # that went on would end 0 or in error. The timeout only keeps a hung run from holding the suite.
    try:
        _, err = dmd.communicate(timeout=600)
    finally:
        if dmd.poll() is None:
            os.killpg(dmd.pid, signal.SIGKILL)
            dmd.wait()
    assert dmd.returncode == 130, err[-2000:]
    assert "interrupted: finished work is kept" in err
    assert still_alive(tree) == []
    assert not list((tmp_path / "store").glob("generate/*/manifest.json")), "generate ran to the end"
