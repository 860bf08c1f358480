"""``generate.partitions`` under the flow: each partition a flow run of the deployment
``dmd-generate-partition/partition``, taken by any worker of its work pool, on any host.

Why flow runs of a deployment, not task runs: in Prefect 3 a task run executes in the process of the flow
run that makes it (``.submit()`` / ``.map()``: the flow's task runner, threads of that one process), or,
deferred with ``.delay()``, in a task worker (``prefect task serve``), a process of its own that belongs to no
work pool and gets no job template (no GPU request, no image, no pod). Work-pool workers (process, Docker,
Kubernetes) execute flow runs of deployments only. So a partition is a flow run created with
``run_deployment`` (a child of the pipeline's run in the UI), and any worker of the pool takes it, started
as the pool's job template says (one GPU each).

The pipeline's flow creates the N runs at once, waits for them, and creates a run again for a partition
whose run crashed or failed (a killed worker, a lost node): that partition's verified shards are kept and
the other partitions are not touched. Once every partition has verified, the flow's ``generate`` task
publishes as always: it finds every shard there and verified (an object store: downloaded from the build's
partial prefix), computes none, and writes the manifest. Without the deployment (``dmd run`` on its own
server, no work pool), the partitions run in turn in the flow's own process, each a child flow run.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment
from prefect.exceptions import ObjectNotFound
from prefect.states import Cancelling

from stages.config import PipelineConfig, load_config
from stages.contract import Plan
from stages.generate import build_partition
from stages.store import open_store

FLOW_NAME = "dmd-generate-partition"
DEPLOYMENT_ENV = "DMD_PARTITION_DEPLOYMENT"  # another deployment name (flow/deployment), e.g. one per work pool
DEFAULT_DEPLOYMENT = f"{FLOW_NAME}/partition"
TRIES = 3  # runs of one partition before the flow fails (a partition that fails for a reason fails every time)
POLL_S = 1.0
WAIT_WARN_S = 60.0  # a partition run still waiting for a worker after this long is named in the log


def deployment_name() -> str:
    return os.environ.get(DEPLOYMENT_ENV, "").strip() or DEFAULT_DEPLOYMENT


@flow(name=FLOW_NAME, flow_run_name="generate-partition-{partition}", log_prints=True)
def generate_partition(config: str, plan: dict, partition: int) -> dict:
    """Build partition ``partition`` of the generate output ``plan`` names, on the worker that took this run.

    ``config`` is the resolved config's text and ``plan`` the flow's plan, passed by value: a worker on another
    host has no access to the pipeline's scratch files. The output's folder is this machine's for the key."""
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.yaml").write_text(config)
        cfg = load_config(str(Path(tmp) / "config.yaml"))
    p = Plan(**{**plan, "out_dir": open_store(cfg.store).output_dir("generate", plan["key"])})
    t0 = time.perf_counter()
    logger = get_run_logger()
    forward = ToRunLog(logger)  # the stage's own log lines (shards taken, rewritten) into this run's log
    dmd = logging.getLogger("dmd")
    level = dmd.level
    dmd.setLevel(logging.INFO)
    dmd.addHandler(forward)
    try:
        work = build_partition(cfg, p, partition, progress=False)
    finally:
        dmd.removeHandler(forward)
        dmd.setLevel(level)
    logger.info("generate partition %d of %d: shards verified in %s (%.1f s)", partition, cfg.generate.partitions, work, time.perf_counter() - t0)
    return {"partition": partition, "work": str(work), "host": os.uname().nodename}


class ToRunLog(logging.Handler):
    def __init__(self, logger):
        super().__init__(logging.INFO)
        self.logger = logger

    def emit(self, record: logging.LogRecord) -> None:
        self.logger.log(record.levelno, record.getMessage())


def run_partitions(cfg: PipelineConfig, config_path: str, plan_file: Path) -> None:
    """Build every partition of ``generate.partitions`` (more than one) as flow runs of the partition deployment,
    redoing a crashed or failed one up to ``TRIES`` runs; returns once every partition has verified."""
    n = cfg.generate.partitions
    if n <= 1:
        return
    logger = get_run_logger()
    params = {"config": Path(config_path).read_text(), "plan": json.loads(Path(plan_file).read_text())}
    name = deployment_name()
    with get_client(sync_client=True) as client:
        try:
            client.read_deployment_by_name(name)
        except ObjectNotFound:
            logger.info("generate: no deployment %s (README: Running it for a team): the %d partitions run here, one after another", name, n)
            for k in range(n):
                generate_partition(**params, partition=k)
            return
        runs = {k: run_deployment(name, parameters={**params, "partition": k}, timeout=0) for k in range(n)}
        logger.info("generate: %d partitions submitted to %s", n, name)
        tries = dict.fromkeys(runs, 1)
        waiting_since = time.monotonic()
        try:
            while runs:
                time.sleep(POLL_S)
                waiting = []
                for k, run in list(runs.items()):
                    state = client.read_flow_run(run.id).state
                    if state is not None and state.is_scheduled():
                        waiting.append(k)
                    if state is None or not state.is_final():
                        continue
                    if state.is_completed():
                        del runs[k]
                        continue
                    if tries[k] >= TRIES:
                        raise RuntimeError(f"generate partition {k} of {n} ended {state.name} in {TRIES} runs (last: {run.name}): {state.message}")
                    logger.warning("generate partition %d ended %s (%s): running it again; its verified shards are kept", k, state.name, state.message)
                    runs[k] = run_deployment(name, parameters={**params, "partition": k}, timeout=0)
                    tries[k] += 1
                if not waiting:
                    waiting_since = time.monotonic()
                elif time.monotonic() - waiting_since > WAIT_WARN_S:  # no worker free (or none started): say so, keep waiting
                    logger.warning("generate partitions %s not taken by any worker of %s's work pool for %.0f s", waiting, name, time.monotonic() - waiting_since)
                    waiting_since = time.monotonic()
        except BaseException:  # failed, cancelled, interrupted: the partitions still running stop too
            for run in runs.values():
                try:
                    client.set_flow_run_state(run.id, Cancelling(message="the pipeline's run stopped"), force=True)
                except Exception:  # best effort: the run may have ended meanwhile
                    pass
            raise
