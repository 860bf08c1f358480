"""Trends across runs: each run appends its record to the store's run history (stages/history.py) and publishes
``dmd-run`` (a table: headline metrics, each stage's cache outcome, wall time and compute) and ``dmd-trends``
(markdown with an embedded PNG of the last ``TREND_RUNS`` runs of the same pipeline and teacher, read from the
store, not from the Prefect database)."""

from __future__ import annotations

import base64
import math
import os
import time

from prefect.artifacts import create_markdown_artifact, create_table_artifact

from dmd_core.render import md_text
from stages import history
from stages.config import PipelineConfig
from stages.contract import ORDER, spec
from stages.store import open_store

TREND_RUNS = 30  # runs in the trend plot (the records read: only these)
HEADLINE = ("fd_ratio", "student_fd", "student_class_accuracy", "speedup")


def compute_units(cfg: PipelineConfig, stage: str, processes: int, gpu: bool) -> int:
    """Devices a stage kept busy: its processes' GPUs, or the CPU cores its threads used."""
    if gpu:
        return processes
    cores = os.cpu_count() or 1
    threads = getattr(getattr(cfg, stage), "num_threads", None) or max(1, cores // processes)
    return min(cores, threads * processes)


def run_record(cfg: PipelineConfig, results: dict[str, dict], cache: dict[str, str], seconds: dict[str, float],
               verdict: dict | None, num_processes: int, gpu: bool, flow_run_id: str) -> dict:  # fmt: skip
    """This run's history record: headline metrics, and per stage its cache outcome, wall time in this run and the
    compute it spent (device-hours; 0 when it was cached)."""
    ev = results["evaluate"]["manifest"]["info"]["metrics"]
    stages = {}
    for s in ORDER:
        if s not in results:
            continue  # a stage the config does not need
        processes = num_processes if spec(s).multi_process else 1
        spent = 0.0 if cache.get(s) in ("hit", "store") else float(results[s]["manifest"]["wall_time_s"])
        stages[s] = {"cache": cache.get(s, "miss"), "wall_s": round(seconds.get(s, 0.0), 3),
                     "compute_h": round(spent * compute_units(cfg, s, processes, gpu) / 3600, 6)}  # fmt: skip
    return {
        "flow_run_id": flow_run_id,
        "export_key": results["export"]["manifest"]["key"],
        "promoted": None if verdict is None else bool(verdict["promoted"]),
        "metrics": {k: ev.get(k) for k in HEADLINE},
        "device": "GPU" if gpu else "CPU",
        "stages": stages,
    }


def run_table(record: dict) -> list[dict]:
    """The ``dmd-run`` table: one row per value (the UI's table view shows it without scrolling sideways)."""
    unit = f"{record['device']}-h"
    # a manifest's string is escaped (the UI may render cells as markdown); the rest are this module's own words
    rows: dict = {k: round(v, 4) if isinstance(v, float) else md_text(v, limit=100) if isinstance(v, str) else v for k, v in record["metrics"].items()}
    rows["promoted"] = {True: "yes", False: "no", None: "-"}[record["promoted"]]
    for s, st in record["stages"].items():
        rows[f"{s}_cache"] = st["cache"]
        rows[f"{s}_wall_time_s"] = round(st["wall_s"], 1)
        rows[f"{s}_compute"] = f"{st['compute_h']:.4f} {unit}"
    rows["total_compute"] = f"{sum(st['compute_h'] for st in record['stages'].values()):.4f} {unit}"
    rows["cache_hits"] = sum(st["cache"] in ("hit", "store") for st in record["stages"].values())
    return [{"metric": k, "value": v} for k, v in rows.items()]


def _num(v) -> float:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else math.nan


def trend_series(records: list[dict]) -> dict[str, list[float]]:
    """The plotted values, one per run (oldest first; NaN where a run lacks one)."""
    series = {k: [_num(r.get("metrics", {}).get(k)) for r in records] for k in ("fd_ratio", "student_class_accuracy", "speedup")}
    for s in ORDER:
        series[f"{s}_wall_s"] = [_num(r.get("stages", {}).get(s, {}).get("wall_s")) for r in records]
    series["compute_h"] = [sum(_num(st.get("compute_h")) for st in r.get("stages", {}).values()) for r in records]
    series["cache_hits"] = [float(sum(st.get("cache") in ("hit", "store") for st in r.get("stages", {}).values())) for r in records]
    return series


def trend_figure(records: list[dict]):
    """Six panels over the runs: FD ratio (promoted runs starred), class accuracy, speedup, each stage's wall time,
    compute and cache hits."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = trend_series(records)
    x = list(range(1, len(records) + 1))
    labels = [time.strftime("%m-%d %H:%M", time.gmtime(r["unix"])) if isinstance(r.get("unix"), (int, float)) else str(i) for i, r in zip(x, records)]
    fig, axes = plt.subplots(2, 3, figsize=(14, 6.4), dpi=100)
    unit = f"{records[-1].get('device', 'CPU')}-hours" if records else "hours"
    panels = [("fd_ratio", "FD ratio (one-step / teacher)"), ("student_class_accuracy", "one-step class accuracy"), ("speedup", "speedup vs the teacher")]
    for ax, (key, title) in zip(axes[0], panels):
        ax.plot(x, s[key], marker="o", ms=4, label=key)
        ax.set(title=title)
    promoted = [i for i, r in zip(x, records) if r.get("promoted")]
    axes[0][0].scatter(promoted, [s["fd_ratio"][i - 1] for i in promoted], marker="*", s=120, color="gold", edgecolor="black", zorder=3, label="promoted")
    axes[0][0].legend(fontsize=7)
    for st in ORDER:
        axes[1][0].plot(x, s[f"{st}_wall_s"], marker="o", ms=3, label=st)
    axes[1][0].set(title="wall time per stage (s)")
    axes[1][0].legend(fontsize=7)
    axes[1][1].plot(x, s["compute_h"], marker="o", ms=4, label="compute")
    axes[1][1].set(title=f"compute spent ({unit})")
    axes[1][2].plot(x, s["cache_hits"], marker="o", ms=4, drawstyle="steps-mid", label="cache hits")
    axes[1][2].set(title=f"stages cached (of {len(ORDER)})", ylim=(-0.2, len(ORDER) + 0.2))
    step = max(1, len(x) // 10)
    for ax in axes.flat:
        ax.grid(alpha=0.3)
        ax.set_xticks(x[::step], labels[::step], rotation=30, fontsize=7)
    fig.suptitle(f"last {len(records)} run(s)")
    fig.tight_layout()
    return fig


def trend_png(records: list[dict]) -> bytes:
    import io

    import matplotlib.pyplot as plt

    fig = trend_figure(records)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def trend_markdown(pipeline: str, records: list[dict], png: bytes, rows: int = 10) -> str:
    """The ``dmd-trends`` markdown: the plot as a data URI, then the last ``rows`` runs as a table (newest first)."""
    lines = [f"## Last {len(records)} run(s) of pipeline {md_text(pipeline)}", "", f"![trends](data:image/png;base64,{base64.b64encode(png).decode()})", "",
             "| run (UTC) | FD ratio | class accuracy | speedup | compute | cached stages | promoted |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in reversed(records[-rows:]):
        m, st = r.get("metrics", {}), r.get("stages", {})
        when = time.strftime("%Y-%m-%d %H:%M", time.gmtime(r["unix"])) if isinstance(r.get("unix"), (int, float)) else "-"
        cell = lambda v, f: "-" if not math.isfinite(_num(v)) else format(_num(v), f)  # noqa: E731
        compute = sum(_num(v.get("compute_h")) for v in st.values())
        hits = sum(v.get("cache") in ("hit", "store") for v in st.values())
        promoted = {True: "yes", False: "**no**", None: "-"}.get(r.get("promoted"), "-")
        lines.append(f"| {when} | {cell(m.get('fd_ratio'), '.3f')} | {cell(m.get('student_class_accuracy'), '.3f')} | {cell(m.get('speedup'), '.1f')} | "
                     f"{compute:.4f} {md_text(r.get('device', ''))}-h | {hits}/{len(st)} | {promoted} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def publish_trends(cfg: PipelineConfig, results: dict[str, dict], cache: dict[str, str], seconds: dict[str, float],
                   verdict: dict | None, num_processes: int, flow_run_id: str, runs: int = TREND_RUNS) -> dict:  # fmt: skip
    """Append this run to the store's history, then publish ``dmd-run`` and ``dmd-trends`` (the last ``runs`` runs)."""
    import torch

    store = open_store(cfg.store)
    teacher = results["evaluate"]["manifest"]["upstream"]["teacher"]  # the teacher digest, as promotion keys it
    record = run_record(cfg, results, cache, seconds, verdict, num_processes, torch.cuda.is_available(), flow_run_id)
    history.append(store, cfg.export.pipeline, teacher, record, run_id=flow_run_id.replace("-", ""))
    create_table_artifact(table=run_table(record), key="dmd-run", description="This run: quality, each stage's cache, wall time and compute")
    records = history.last(store, cfg.export.pipeline, teacher, runs)
    create_markdown_artifact(key="dmd-trends", markdown=trend_markdown(cfg.export.pipeline, records, trend_png(records)),
                             description=f"Quality and cost over the last {len(records)} run(s) (the store's run history)")  # fmt: skip
    return record
