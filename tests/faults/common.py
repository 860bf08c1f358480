"""Shared pieces of the fault-injection suite: a reference pipeline, a forked ``dmd`` runner, comparisons.

Each interrupted run is a forked child of the test process running ``dmd`` in-process with
``DMD_FAULT`` set (dmd_core/faults.py): the fault point SIGKILLs the child exactly where named, and
a fork costs milliseconds where a fresh interpreter costs seconds of imports. Children run torch on
one thread (forking after OpenMP has run is safe only then).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
from pathlib import Path

import numpy as np
import yaml
from safetensors.numpy import load_file

from conftest import ROOT, TINY_DISTILL, make_edm_teacher

STAGE_ORDER = ["generate", "distill", "evaluate", "export"]


def start_forked(args: list[str], log: Path, fault: str | None = None, env: dict | None = None) -> int:
    """Start ``dmd <args>`` in a forked child writing to ``log``; returns its pid."""
    log.parent.mkdir(parents=True, exist_ok=True)
    pid = os.fork()
    if pid:
        return pid
    code = 70  # the child: never returns into pytest
    try:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1), os.dup2(fd, 2)
        sys.stdout = sys.stderr = open(fd, "w", buffering=1, closefd=False)  # (dmd's log handler follows sys.stderr)
        # as in a fresh process: handlers an earlier test left on the root logger (Prefect's console handler, bound
        # to the parent's stream) would print their own failures into the child's log
        root = logging.getLogger()
        for handler in root.handlers[:]:
            root.removeHandler(handler)
        import torch

        torch.set_num_threads(1)
        os.environ.pop("DMD_FAULT", None)
        os.environ.update({**(env or {}), **({"DMD_FAULT": fault} if fault else {})})
        from flows.cli import app

        try:
            app(args, prog_name="dmd")
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 71
    finally:
        sys.stdout.flush()
        os._exit(code)


def wait_forked(pid: int) -> int:
    """A child's exit status, or -signal when a signal ended it."""
    _, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def dmd_forked(args: list[str], log: Path, fault: str | None = None, env: dict | None = None) -> int:
    """Run ``dmd <args>`` in a forked child; its exit status, or -signal when a signal ended it."""
    return wait_forked(start_forked(args, log, fault, env))


def write_pipeline_config(path: Path, teacher: Path, store: Path) -> Path:
    """Small enough for seconds per stage; 3 shards, 4 distill steps with checkpoints at 2 and 4."""
    cfg = {
        "store": str(store),
        "teacher": {"path": str(teacher)},
        "generate": {"num_samples": 40, "steps": 3, "shard_size": 16, "batch_size": 8, "seed": 7, "num_threads": 1},
        "distill": {**TINY_DISTILL, "keep_checkpoints": 3},
        "evaluate": {"num_samples": 100, "batch_size": 25, "features": "digits", "classifier": str(ROOT / "data" / "classifier"),
                     "speed_batch_size": 8, "speed_repeats": 1, "num_threads": 1},
        "export": {"parity_samples": 4},
    }  # fmt: skip
    path.write_text(yaml.safe_dump(cfg))
    return path


class Pipeline:
    """A config and a store holding the uninterrupted outputs of every stage."""

    def __init__(self, root: Path):
        self.root = root
        self.teacher = make_edm_teacher(root / "teacher")
        self.store = root / "reference-store"
        self.config = write_pipeline_config(root / "pipeline.yaml", self.teacher, self.store)
        code = dmd_forked(["export", "--config", str(self.config), "-q"], root / "reference.log")
        assert code == 0, (root / "reference.log").read_text()[-3000:]

    def output(self, stage: str, store: Path | None = None) -> Path:
        found = [p for p in ((store or self.store) / stage).iterdir() if not p.name.startswith(".")]
        assert len(found) == 1, found
        return found[0]

    def store_before(self, stage: str, dest: Path) -> Path:
        """A copy of the reference store holding the outputs upstream of ``stage`` only."""
        keep = STAGE_ORDER[: STAGE_ORDER.index(stage)]
        shutil.copytree(self.store, dest, ignore=lambda d, names: [n for n in names if Path(d) == self.store and n in STAGE_ORDER and n not in keep])
        return dest

    def args(self, stage: str, store: Path, *extra: str) -> list[str]:
        return [stage, "--config", str(self.config), "-q", "--set", f"store={store}", *extra]


def product_files(out: Path) -> dict[str, bytes]:
    """The bytes of an output's products: every non-hidden file except records with paths or timings."""
    records = {"config.yaml", "manifest.json", "metrics.parquet", "metrics.json", "curves.png", "README.md"}
    return {
        str(p.relative_to(out)): p.read_bytes()
        for p in sorted(out.rglob("*"))
        if p.is_file() and p.name not in records and "checkpoints" not in p.relative_to(out).parts
        and not any(part.startswith(".") for part in p.relative_to(out).parts)
    }  # fmt: skip


def max_weight_diff(a: Path, b: Path) -> float:
    """max |a - b| over every tensor of two safetensors files with the same keys."""
    ta, tb = load_file(str(a)), load_file(str(b))
    assert ta.keys() == tb.keys()
    return max(float(np.abs(ta[k].astype(np.float64) - tb[k].astype(np.float64)).max()) for k in ta)


def leftovers(store: Path) -> list[str]:
    """Temporary files and partial builds left in the store (none may survive a finished rerun)."""
    return sorted(str(p.relative_to(store)) for p in store.rglob(".*") if ".tmp" in p.name or p.name.endswith(".partial"))


KILLED = -signal.SIGKILL
