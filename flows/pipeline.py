"""The ``dmd-pipeline`` Prefect flow: generate -> distill -> evaluate -> export, one task per stage.

The flow walks the stages with the project's one resolver (``stages.chain.walk``): the teacher is
resolved once, each stage is planned once, from the output the previous task returned, and its task
gets that plan. A task runs its stage as a subprocess (``python -m stages <stage> --plan <plan>``: no
re-planning there), so multi-process stages go through ``accelerate launch`` and every output line
reaches the run logs, except the stage's ``dmd-progress`` lines, which update its progress artifact
and its status line on stderr (``flows/terminal.py``: a heartbeat for a stage that reports none).
Each task takes the previous task's result as its ``upstream`` input, so the run graph in the UI shows
generate -> distill -> evaluate -> export. A task that stops early stops the stage's whole process tree.

Cache keys: a task's key is its stage's content address in the store (a hash of the stage config, the
upstream outputs' digests and the stage code version) plus the store's location, never the flow run,
so hits carry across runs. Prefect's record is trusted only while the store output it points to is complete
and its checksums verify (cheap: the store's verification records): the flow checks that before each
task and otherwise refreshes the cache, so a deleted or damaged output is recomputed instead of
returned stale. ``refresh`` forces a stage and everything after it.
"""

from __future__ import annotations

import base64
import contextvars
import hashlib
import logging
import os
import queue
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.context import TaskRunContext
from prefect.runtime import flow_run

from dmd_core.render import md_text
from stages import chain
from stages.config import PipelineConfig, dump_config, load_config
from stages.contract import ORDER, STAGES, Manifest, Plan, StageOutput, StageSpec
from stages.launch import EXIT_WITH_PARENT, kill_process_tree
from stages.progress import ENV as PROGRESS_ENV
from stages.progress import Progress, parse_progress

from .partitions import run_partitions
from .promotion import end_state, gate
from .trends import publish_trends
from .terminal import StatusLine
from stages.store import open_store

PROGRESS_STAGES = tuple(s.name for s in STAGES if s.progress)
STDERR_TAIL = 50


def resolved_config_file(config: str | None, overrides: list[str]) -> tuple[PipelineConfig, str]:
    """Validate the config once and write it, resolved, where every task and subprocess reads it."""
    cfg = load_config(config, overrides)
    text = dump_config(cfg)
    folder = open_store(cfg.store).scratch_dir("flow-configs")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{hashlib.sha256(text.encode()).hexdigest()[:16]}.yaml"
    path.write_text(text)
    return cfg, str(path)


def task_cache_key(stage: str, key: str, out_dir: Path) -> str:
    """``<stage>-<content key>-<store>``: one Prefect database can serve several stores (checkouts,
    users), and a record must never hand one store the output directory of another."""
    store = hashlib.sha256(str(out_dir.resolve()).encode()).hexdigest()[:12]
    return f"{stage}-{key}-{store}"


def cache_key_parameter(context: TaskRunContext, parameters: dict) -> str:
    # The flow plans each stage once and passes the key in (see task_cache_key).
    return parameters["cache_key"]


def _pump(stream, emit, tail: deque, progress: queue.Queue) -> None:
    """Forward a subprocess stream line by line: progress lines to the queue, the rest to the log."""
    for line in iter(stream.readline, ""):
        line = line.rstrip("\n")
        p = parse_progress(line)
        if p is not None:
            progress.put(p)
            continue
        tail.append(line)
        emit(line)


class ProgressArtifact:
    """One progress artifact per stage run (key ``dmd-<stage>-progress``), updated at most once a second."""

    def __init__(self, stage: str):
        self.id = create_progress_artifact(progress=0.0, key=f"dmd-{stage}-progress", description=f"{stage}: starting")
        self.stage, self.latest, self.sent_at, self.unsent = stage, None, 0.0, False

    def update(self, p: Progress | None = None) -> None:
        if p is not None:
            self.latest, self.unsent = p, True
        if self.unsent and time.monotonic() - self.sent_at >= 1.0:
            p = self.latest
            phase = f" — {p.phase}" if p.phase else ""
            update_progress_artifact(self.id, p.percent, description=f"{self.stage}{phase}: {p.done}/{p.total}")
            self.sent_at, self.unsent = time.monotonic(), False

    def finish(self, rc: int) -> None:
        if rc == 0:
            update_progress_artifact(self.id, 100.0, description=f"{self.stage}: finished")
        else:
            percent = self.latest.percent if self.latest else 0.0
            update_progress_artifact(self.id, percent, description=f"{self.stage}: failed (exit status {rc})")


@task(cache_key_fn=cache_key_parameter, persist_result=True, task_run_name="{stage}")
def run_stage(stage: str, config_file: str, plan_file: str, cache_key: str, upstream: dict | None = None, num_processes: int = 1) -> dict:
    """``python -m stages <stage> --plan <plan>``: output streams into the run log, progress into an artifact.

    ``upstream`` is the previous stage's task result (its output directory and manifest): passing it
    makes the dependency visible in the run graph. Returns this stage's verified output the same way.
    However the task ends (failure, cancellation: Prefect turns the runner's SIGTERM into an exception
    here), the stage's whole process tree is stopped.
    """
    logger = get_run_logger()
    cmd = [sys.executable, "-m", "stages", stage, "--config", config_file, "--plan", plan_file]
    if num_processes > 1:
        cmd += ["--num-processes", str(num_processes)]
    env = {**os.environ, PROGRESS_ENV: "1", EXIT_WITH_PARENT: "1"}
    progress = ProgressArtifact(stage) if stage in PROGRESS_STAGES else None
    terminal = StatusLine(stage)  # the same events on stderr, and a heartbeat while there are none
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1, env=env, start_new_session=True)
    out_lines: deque = deque(maxlen=5)
    err_tail: deque = deque(maxlen=STDERR_TAIL)
    events: queue.Queue = queue.Queue()
    # Each pump runs in a copy of this context: Prefect's settings (the flow's own API URL) live in
    # context variables, and a plain thread would log to a server of its own (a temporary one).
    pumps = [
        threading.Thread(target=contextvars.copy_context().run, args=(_pump, proc.stdout, logger.info, out_lines, events), daemon=True),
        threading.Thread(target=contextvars.copy_context().run, args=(_pump, proc.stderr, logger.info, err_tail, events), daemon=True),
    ]
    for t in pumps:
        t.start()
    try:
        with terminal.sharing():  # Prefect's console log lines and the in-place status line take turns
            while proc.poll() is None or any(t.is_alive() for t in pumps):
                try:
                    p = events.get(timeout=0.5)
                except queue.Empty:
                    p = None
                if progress is not None:
                    progress.update(p)
                terminal.update(p)
            rc = proc.wait()
    except BaseException:  # cancelled (Prefect raises on the runner's SIGTERM), interrupted, or failed
        terminal.finish(None)
        kill_process_tree(proc.pid)  # the whole tree: no orphaned accelerate workers
        raise
    while not events.empty():
        p = events.get()
        if progress is not None:
            progress.update(p)
        terminal.update(p)
    if progress is not None:
        progress.finish(rc)
    terminal.finish(rc)
    if rc != 0:
        tail = "\n".join(err_tail)
        raise RuntimeError(f"stage {stage} exited with status {rc}; last {len(err_tail)} lines of stderr:\n{tail}")
    out_dir = Path(out_lines[-1]).resolve()
    m = open_store(load_config(config_file).store).verified(out_dir)
    if m is None:
        raise RuntimeError(f"stage {stage} printed {out_dir}, which holds no verified manifest")
    return {"out_dir": str(out_dir), "manifest": m.model_dump(mode="json")}


def training_curves_png(metrics_parquet: Path) -> bytes:
    """Loss curves (and quality-probe FD, when the run had probes) of a distill run as a PNG."""
    import pyarrow.parquet as pq

    from dmd_core.images import training_curves_png as draw

    return draw(pq.read_table(metrics_parquet).to_pylist())


def metrics_table(results: dict[str, dict], cache: dict[str, str], seconds: dict[str, float]) -> list[dict]:
    """The ``dmd-metrics`` table: one row per metric (16 columns would scroll sideways in the UI's table view)."""
    ev = results["evaluate"]["manifest"]["info"]["metrics"]
    dist = results["distill"]["manifest"]
    row = {
        "teacher_fd": round(ev["teacher_fd"], 4),
        "one_step_fd": round(ev["student_fd"], 4),
        "fd_ratio": round(ev["fd_ratio"], 3),
        "teacher_class_accuracy": ev["teacher_class_accuracy"],
        "one_step_class_accuracy": ev["student_class_accuracy"],
        "speedup": round(ev["speedup"], 1),
        "training_steps": dist["info"]["steps"],
        "distill_compute_s": dist["wall_time_s"],  # when it was computed, even if cached now
        **({"best_probe_fd": round(best["probe_fd"], 4), "best_probe_step": best["step"]} if (best := dist["info"].get("best")) else {}),
        # a stage the config does not need (generate, without a regression loss) is "skipped"
        **{f"{s}_cache": cache.get(s, "skipped") for s in ORDER},
        **{f"{s}_wall_time_s": round(seconds.get(s, 0.0), 1) for s in ORDER},  # in this run
    }
    # a string cell is escaped: the UI may render cells as markdown, and a string here may come from a manifest
    return [{"metric": k, "value": md_text(v, limit=200) if isinstance(v, str) else v} for k, v in row.items()]


def samples_markdown(teacher_nfe: int, grid_png: bytes, curves_png: bytes) -> str:
    """The ``dmd-samples`` markdown: the sample grid and the training curves, inline as data URIs."""
    grid, curves = (base64.b64encode(b).decode() for b in (grid_png, curves_png))
    return (
        f"## Samples: teacher ({teacher_nfe} NFE, left) vs one-step (right)\n\n![grid](data:image/png;base64,{grid})\n\n"
        f"## Training curves\n\n![curves](data:image/png;base64,{curves})\n"
    )


def export_link(export_dir: str | Path) -> dict:
    """The ``dmd-export`` link artifact's link and text (Prefect renders it as markdown ``[text](link)``):
    the store path is escaped text in the link's text, and percent-encoded in the link."""
    card = Path(export_dir).resolve() / "README.md"
    return {"link": card.as_uri(), "link_text": md_text(f"model card: {card}", limit=300)}


def publish(results: dict[str, dict], cache: dict[str, str], seconds: dict[str, float]) -> None:
    """Dashboards: metrics table, sample grid + training curves, link to the export (stable keys)."""
    create_table_artifact(table=metrics_table(results, cache, seconds), key="dmd-metrics", description="Teacher vs one-step generator (evaluate stage)")
    ev = results["evaluate"]["manifest"]["info"]["metrics"]
    grid = (Path(results["evaluate"]["out_dir"]) / "grid.png").read_bytes()
    curves = training_curves_png(Path(results["distill"]["out_dir"]) / "metrics.parquet")
    create_markdown_artifact(key="dmd-samples", markdown=samples_markdown(ev["teacher_nfe"], grid, curves), description="Sample grid and DMD training curves")
    create_link_artifact(key="dmd-export", **export_link(results["export"]["out_dir"]), description="The exported one-step generator")


class StageTasks:
    """``chain.walk``'s way of obtaining an output inside the flow: a ``run_stage`` task per stage."""

    def __init__(self, cfg: PipelineConfig, config_file: str, num_processes: int, refresh: set[str]):
        self.cfg, self.config_file, self.num_processes, self.refresh = cfg, config_file, num_processes, refresh
        self.results: dict[str, dict] = {}  # stage -> its task's result: the next task takes it as its upstream
        self.cache: dict[str, str] = {}
        self.seconds: dict[str, float] = {}
        self.forced = False
        self.store = open_store(cfg.store)

    def __call__(self, s: StageSpec, p: Plan) -> StageOutput:
        self.forced = self.forced or s.name in self.refresh
        valid = self.store.verified(p.out_dir) is not None
        if self.forced and p.out_dir.exists():
            self.store.remove(p.out_dir)  # a refreshed stage (and all after it) really recomputes
            valid = False
        plan_file = p.save(self.store.scratch_dir("flow-plans") / f"{s.name}-{p.key}.json")
        n = self.num_processes if s.multi_process else 1
        t0 = time.perf_counter()
        if s.name == "generate" and not valid:
            run_partitions(self.cfg, self.config_file, plan_file)  # generate.partitions > 1: on the pool's workers first
        task_run = run_stage.with_options(refresh_cache=not valid)
        # Called, not submitted: the task runs in this (main) thread, so a Ctrl-C reaches it and it stops
        # its stage. Passing the previous task's result object is what draws the edge in the run graph.
        up = self.results.get(s.upstream) if s.upstream else None
        state = task_run(s.name, self.config_file, str(plan_file), task_cache_key(s.name, p.key, p.out_dir), up, n, return_state=True)
        result = self.results[s.name] = state.result()
        self.seconds[s.name] = time.perf_counter() - t0
        # hit: Prefect's cache record; store: no record (e.g. a new PREFECT_HOME) but the stage found
        # its verified output in the store and reused it; miss: computed.
        self.cache[s.name] = "hit" if state.name == "Cached" else "store" if valid else "miss"
        if state.name == "Cached":  # run_stage did not run: its status line would be missing
            StatusLine.cached(s.name)
        return StageOutput(Path(result["out_dir"]), Manifest.model_validate(result["manifest"]))


@flow(name="dmd-pipeline", log_prints=True)
def dmd_pipeline(
    config: str | None = None,
    overrides: list[str] | None = None,
    only: str | None = None,
    refresh: list[str] | None = None,
    num_processes: int = 1,
) -> dict:
    """generate -> distill -> evaluate -> export; ``only`` runs one stage from the store's upstream outputs.

    Returns ``{"outputs": {stage: dir}, "cached": {stage: bool}, "flow_run_id": id}``.
    """
    cfg, config_file = resolved_config_file(config, overrides or [])
    tasks = StageTasks(cfg, config_file, num_processes, set(refresh or []))
    # --only: the upstream outputs must be in the store already (an error names the first missing one)
    chain.walk(cfg, only or ORDER[-1], tasks, chain.require_existing(cfg) if only else None, num_processes)
    verdict = None
    if only is None:
        publish(tasks.results, tasks.cache, tasks.seconds)
        verdict = gate(cfg, tasks.results)  # export.promote_if (flows/promotion.py)
        publish_trends(cfg, tasks.results, tasks.cache, tasks.seconds, verdict, num_processes, str(flow_run.id))  # flows/trends.py
    outputs = {s: r["out_dir"] for s, r in tasks.results.items()}
    result = {"outputs": outputs, "cached": {s: c == "hit" for s, c in tasks.cache.items()}, "flow_run_id": str(flow_run.id)}
    return end_state(cfg, verdict, result)  # a state named "Not promoted" when the export is not


ARTIFACT_KEYS = ["dmd-metrics", "dmd-samples", "dmd-export", *(f"dmd-{s}-progress" for s in PROGRESS_STAGES)]
RUN_ARTIFACT_KEYS = ["dmd-promotion", "dmd-run", "dmd-trends"]  # after a full run (flows/promotion.py, flows/trends.py)


def where_dashboards_are(flow_run_id: str, local_server: bool) -> str:
    """A line telling where the run's artifacts can be seen."""
    from prefect.settings import PREFECT_HOME, PREFECT_UI_URL

    if not local_server:
        return f"dashboards:  {PREFECT_UI_URL.value()}/runs/flow-run/{flow_run_id} (artifacts {', '.join(ARTIFACT_KEYS + RUN_ARTIFACT_KEYS)})"
    return (
        f"dashboards:  artifacts {', '.join(ARTIFACT_KEYS + RUN_ARTIFACT_KEYS)} are kept in the local Prefect database under "
        f"{PREFECT_HOME.value()}; to see them: `prefect server start`, then http://127.0.0.1:4200/runs/flow-run/{flow_run_id} "
        "(README: Dashboards)"
    )


def scheduled_deployment(cron: str, config: str | None = None, overrides: list[str] | None = None, name: str = "dmd-pipeline-scheduled"):
    """The pipeline as a deployment on a cron schedule (``dmd schedule`` serves it)."""
    return dmd_pipeline.to_deployment(name=name, cron=cron, parameters={"config": config, "overrides": overrides or []})
