"""The ``dmd-pipeline`` Prefect flow: generate -> distill -> evaluate -> export, one task per stage.

Each task runs its stage as a subprocess (``python -m stages <stage> --config <resolved> -n N``), so
multi-process stages go through ``accelerate launch`` and every output line reaches the run logs.

Cache keys: a task's key is its stage's content address in the store (``<stage>-<key>``: a hash of the
stage config, the upstream outputs' digests and the stage code version), never the flow run, so hits
carry across runs. Prefect's record is trusted only while the store output it points to is complete
and its checksums verify: the flow checks that before each task and otherwise refreshes the cache, so a
deleted or damaged output is recomputed instead of returned stale. ``refresh`` forces a stage and
everything after it.
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import shutil
import subprocess
import sys
import threading
from collections import deque
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.context import TaskRunContext

from stages import distill, evaluate, export, generate
from stages.config import PipelineConfig, dump_config, load_config
from stages.store import verified_manifest

STAGES = {"generate": generate, "distill": distill, "evaluate": evaluate, "export": export}
ORDER = list(STAGES)
STDERR_TAIL = 50


def resolved_config_file(config: str | None, overrides: list[str]) -> tuple[PipelineConfig, str]:
    """Validate the config once and write it, resolved, where every task and subprocess reads it."""
    cfg = load_config(config, overrides)
    text = dump_config(cfg)
    folder = Path(cfg.store) / ".flow-configs"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{hashlib.sha256(text.encode()).hexdigest()[:16]}.yaml"
    path.write_text(text)
    return cfg, str(path)


def stage_output(stage: str, cfg: PipelineConfig) -> tuple[str, Path]:
    """(content key, output dir) of a stage; its upstream outputs must exist (they ran before it)."""
    p = STAGES[stage].plan(cfg, progress=False) if stage != "generate" else generate.plan(cfg)
    return p.key, p.out_dir


def stage_cache_key(context: TaskRunContext, parameters: dict) -> str:
    cfg = load_config(parameters["config_file"])
    return f"{parameters['stage']}-{stage_output(parameters['stage'], cfg)[0]}"


def _pump(stream, emit, tail: deque | None) -> None:
    for line in iter(stream.readline, ""):
        line = line.rstrip("\n")
        if tail is not None:
            tail.append(line)
        emit(line)


@task(cache_key_fn=stage_cache_key, persist_result=True, task_run_name="{stage}")
def run_stage(stage: str, config_file: str, num_processes: int = 1) -> dict:
    """``python -m stages <stage>``; stdout and stderr stream into the run log; returns the manifest."""
    logger = get_run_logger()
    cmd = [sys.executable, "-m", "stages", stage, "--config", config_file, "--quiet"]
    if num_processes > 1 and stage != "export":
        cmd += ["--num-processes", str(num_processes)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1, start_new_session=True)
    out_lines: deque = deque(maxlen=5)
    err_tail: deque = deque(maxlen=STDERR_TAIL)
    pumps = [
        threading.Thread(target=_pump, args=(proc.stdout, logger.info, out_lines), daemon=True),
        threading.Thread(target=_pump, args=(proc.stderr, logger.info, err_tail), daemon=True),
    ]
    for t in pumps:
        t.start()
    try:
        rc = proc.wait()
    finally:
        if proc.poll() is None:  # the task was cancelled or failed: no orphaned accelerate workers
            os.killpg(proc.pid, 9)
    for t in pumps:
        t.join()
    if rc != 0:
        tail = "\n".join(err_tail)
        raise RuntimeError(f"stage {stage} exited with status {rc}; last {len(err_tail)} lines of stderr:\n{tail}")
    out_dir = Path(out_lines[-1])
    m = verified_manifest(out_dir)
    if m is None:
        raise RuntimeError(f"stage {stage} printed {out_dir}, which holds no verified manifest")
    return {"out_dir": str(out_dir), "manifest": m.model_dump(mode="json")}


def _png_data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def training_curves_png(metrics_parquet: Path) -> bytes:
    """Loss curves of a distill run as a PNG (matplotlib, headless)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pyarrow.parquet as pq

    rows = pq.read_table(metrics_parquet).to_pylist()
    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
    for name in ("loss_dm", "loss_reg", "loss_fake"):
        ax.plot(steps, [r[name] for r in rows], label=name)
    ax.set_xlabel("step")
    ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def publish(results: dict[str, dict], cached: dict[str, bool]) -> None:
    """Dashboards: metrics table, sample grid + training curves, link to the export (stable keys)."""
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
        "distill_wall_time_s": dist["wall_time_s"],
        **{f"{s}_cache": "hit" if cached[s] else "miss" for s in ORDER},
    }
    create_table_artifact(table=[row], key="dmd-metrics", description="Teacher vs one-step generator (evaluate stage)")
    grid = Path(results["evaluate"]["out_dir"]) / "grid.png"
    curves = base64.b64encode(training_curves_png(Path(results["distill"]["out_dir"]) / "metrics.parquet")).decode()
    create_markdown_artifact(
        key="dmd-samples",
        markdown=(
            f"## Samples: teacher ({ev['teacher_nfe']} NFE, left) vs one-step (right)\n\n![grid]({_png_data_uri(grid)})\n\n"
            f"## Training curves\n\n![curves](data:image/png;base64,{curves})\n"
        ),
        description="Sample grid and DMD training curves",
    )
    card = Path(results["export"]["out_dir"]).resolve() / "README.md"
    create_link_artifact(key="dmd-export", link=card.as_uri(), link_text=f"model card: {card}", description="The exported one-step generator")


@flow(name="dmd-pipeline", log_prints=True)
def dmd_pipeline(
    config: str | None = None,
    overrides: list[str] | None = None,
    only: str | None = None,
    refresh: list[str] | None = None,
    num_processes: int = 1,
) -> dict:
    """generate -> distill -> evaluate -> export; ``only`` runs one stage from the store's upstream outputs.

    Returns ``{"outputs": {stage: dir}, "cached": {stage: bool}}``.
    """
    cfg, config_file = resolved_config_file(config, overrides or [])
    refresh = set(refresh or [])
    stages = ORDER if only is None else [only]
    results, cached = {}, {}
    forced = False
    for stage in stages:
        if only is not None:
            for up in ORDER[: ORDER.index(stage)]:
                if verified_manifest(stage_output(up, cfg)[1]) is None:
                    raise RuntimeError(f"--only {stage}: the {up} output is missing from the store; run the pipeline (or --only {up}) first")
        forced = forced or stage in refresh
        out_dir = stage_output(stage, cfg)[1]
        valid = verified_manifest(out_dir) is not None
        if forced and out_dir.exists():
            shutil.rmtree(out_dir)  # a refreshed stage (and all after it) really recomputes
            valid = False
        state = run_stage.with_options(refresh_cache=not valid)(stage, config_file, num_processes, return_state=True)
        results[stage] = state.result()
        cached[stage] = state.name == "Cached"
    if only is None:
        publish(results, cached)
    return {"outputs": {s: r["out_dir"] for s, r in results.items()}, "cached": cached}


def scheduled_deployment(cron: str, config: str | None = None, overrides: list[str] | None = None, name: str = "dmd-pipeline-scheduled"):
    """The pipeline as a deployment on a cron schedule (``dmd schedule`` serves it)."""
    return dmd_pipeline.to_deployment(name=name, cron=cron, parameters={"config": config, "overrides": overrides or []})
