"""Run a stage module on several processes through ``accelerate launch`` (DDP; gloo on CPU)."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

from dmd_core.errors import InputError

from .config import PipelineConfig, dump_config
from .contract import Manifest, Plan
from .store import open_store

log = logging.getLogger("dmd")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def distributed_env() -> tuple[int, int]:
    """(rank, world size) as set by accelerate launch / torchrun; (0, 1) otherwise."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def finish_distributed() -> None:
    """Barrier, then tear the process group down: exiting with a live gloo group can abort a rank.

    Unreferenced DDP wrappers are collected first: one whose reducer outlives the group it talks to
    can abort the process at exit ("terminate called without an active exception")."""
    import gc

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


@contextmanager
def signals_ignored(*signums: int) -> Iterator[None]:
    """Ignore these signals inside the block (main thread only, where Python runs signal handlers).

    Termination signals come in bursts (a runner, ``timeout`` and a terminal's Ctrl-C each signal a
    whole process group): a second one must not abort the clean-up the first one started.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.signal(s, signal.SIG_IGN) for s in signums}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)


def kill_process_tree(pid: int, include_root: bool = True, grace_s: float = 10.0) -> None:
    """SIGTERM a process and all its descendants, then SIGKILL what is left after ``grace_s``.

    By tree, not process group: torch elastic (under ``accelerate launch``) starts each worker in a
    session of its own, so killing the launcher's group alone would orphan the workers.
    """
    import psutil

    with signals_ignored(signal.SIGTERM, signal.SIGINT):
        try:
            root = psutil.Process(pid)
            procs = root.children(recursive=True) + ([root] if include_root else [])
        except psutil.NoSuchProcess:
            return
        for p in procs:
            try:
                p.send_signal(signal.SIGTERM)
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(procs, timeout=grace_s)
        for p in alive:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass


EXIT_WITH_PARENT = "DMD_EXIT_WITH_PARENT"


def exit_with_parent() -> None:
    """When ``DMD_EXIT_WITH_PARENT=1`` (set by the flow): get SIGTERM if the parent process dies.

    Linux's prctl(PR_SET_PDEATHSIG); no maintained package wraps just this, so ctypes. It covers a flow
    process killed with SIGKILL, which cannot clean up after itself.
    """
    if os.environ.get(EXIT_WITH_PARENT) != "1" or not sys.platform.startswith("linux"):
        return
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def terminate_on_sigterm(kill_children: bool = True) -> None:
    """On SIGTERM: stop this process's children (accelerate launcher and workers), then exit 143.

    Exiting by SystemExit rather than the default action lets ``finally`` blocks and context managers
    (a local Prefect server) clean up.
    """

    def handler(signum: int, _frame) -> None:
        if kill_children:
            kill_process_tree(os.getpid(), include_root=False)
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def accelerate_launch(stage: str, cfg: PipelineConfig, plan_file: Path, num_processes: int) -> None:
    """``accelerate launch --num_processes N -m stages.<stage> --config <resolved> --plan <plan>``.

    The workers get the plan made here (no re-planning) and the store by absolute path; their
    stdout goes to this process's stderr.
    """
    store = open_store(cfg.store)
    child = cfg.model_copy(deep=True)
    child.store = store.absolute_root()
    scratch = store.scratch_dir("launch")
    scratch.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", prefix="config-", dir=scratch, delete=False) as f:
        f.write(dump_config(child))
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--multi_gpu", "--num_machines", "1", "--num_processes", str(num_processes),
        "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()),
        "-m", f"stages.{stage}", "--config", f.name, "--plan", str(Path(plan_file).resolve()),
    ]  # fmt: skip
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env["DMD_FORCE_CPU"] = "1"
    try:
        rc = subprocess.run(cmd, stdout=sys.stderr, env=env).returncode
    finally:
        os.unlink(f.name)
    if rc != 0:
        raise InputError(f"`stages.{stage}` on {num_processes} processes exited with status {rc}; the log above names the cause")


def launch_plan(stage: str, cfg: PipelineConfig, plan: Plan, num_processes: int) -> Manifest:
    """Run a planned stage on ``num_processes`` processes; returns the manifest rank 0 wrote."""
    plan_file = plan.save(plan.out_dir / ".plan.json")
    accelerate_launch(stage, cfg, plan_file, num_processes)
    m = open_store(cfg.store).read_manifest(plan.out_dir)
    if m is None:
        raise InputError(f"{stage} on {num_processes} processes wrote no manifest in {plan.out_dir}")
    return m
