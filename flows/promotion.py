"""The promotion gate in the flow: a task that decides and records it (``stages.promotion.promote``), the
``dmd-promotion`` artifact that says why, and the state the flow run ends in when the export is not promoted
(Completed or Failed, named ``Not promoted`` either way: ``export.on_not_promoted``)."""

from __future__ import annotations

import time
from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.states import Completed, Failed, State

from dmd_core.render import md_text
from stages.config import PipelineConfig
from stages.gate import METRICS
from stages.promotion import promote
from stages.store import open_store

ARTIFACT_KEY = "dmd-promotion"
NOT_PROMOTED = "Not promoted"


@task(task_run_name="promote")
def promote_export(store: str, pipeline: str, promote_if: str | None, evaluate_dir: str, export_dir: str) -> dict:
    """Decide whether the export replaces the promoted one, and record it if so (one atomic update in the store)."""
    d = promote(open_store(store), pipeline, promote_if, Path(evaluate_dir), Path(export_dir))
    get_run_logger().info("%s%s", d.reason, "".join(f"\n  {c}" for c in d.checks))
    return {"promoted": d.promoted, "reason": d.reason, "checks": d.checks, "record": d.record, "previous": d.previous, "export": export_dir}


def _when(record: dict | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(record["promoted_unix"])) if record and "promoted_unix" in record else "-"


def promotion_markdown(verdict: dict, metrics: dict) -> str:
    """The ``dmd-promotion`` artifact: the decision, each comparison with its values, this run's metrics beside
    the promoted export's, and the promoted export's lineage. Every value from the store is escaped."""
    record, previous = verdict["record"], verdict["previous"]
    head = "Promoted" if verdict["promoted"] else NOT_PROMOTED
    lines = [f"## {head}", "", md_text(verdict["reason"], limit=400), ""]
    if verdict["checks"]:
        lines += [*(f"- {md_text(c, limit=300)}" for c in verdict["checks"]), ""]
    against = previous if verdict["promoted"] else record  # what this export was compared with
    lines += ["| metric | this run | promoted before |" if verdict["promoted"] else "| metric | this run | promoted (stays) |", "|---|---|---|"]
    theirs = (against or {}).get("metrics", {})
    for k in METRICS:
        if k in metrics or k in theirs:
            mine, other = metrics.get(k), theirs.get(k)
            lines.append(f"| {k} | {'-' if mine is None else f'{mine:.6g}'} | {'-' if other is None else f'{other:.6g}'} |")
    lines += ["", f"### {'This export, now promoted' if verdict['promoted'] else 'This export (kept in the store, not promoted)'}", "",
              md_text(verdict["export"], limit=300), ""]  # fmt: skip
    if record:
        lines += ["### The promoted export", "", f"- export: {md_text(record.get('export'), limit=300)} (key {md_text(record.get('export_key'))}), promoted {_when(record)}"]
        for name in ("teacher_digest", "pairs_digest", "distill_key", "evaluate_key", "config_digest", "promote_if"):
            if record.get(name) is not None:
                lines.append(f"- {name}: {md_text(record[name], limit=200)}")
    return "\n".join(lines) + "\n"


def gate(cfg: PipelineConfig, results: dict[str, dict]) -> dict:
    """The promote task on the run's evaluation and export, and its artifact."""
    verdict = promote_export(cfg.store, cfg.export.pipeline, cfg.export.promote_if, results["evaluate"]["out_dir"], results["export"]["out_dir"])
    metrics = results["evaluate"]["manifest"]["info"]["metrics"]
    create_markdown_artifact(key=ARTIFACT_KEY, markdown=promotion_markdown(verdict, metrics), description="Promotion: export.promote_if against the promoted export")
    return verdict


def end_state(cfg: PipelineConfig, verdict: dict | None, result: dict) -> dict | State:
    """The flow's return: its result, or a state named ``Not promoted`` (Completed, or Failed when
    ``export.on_not_promoted`` is fail) that the UI shows on the run, with the reason as its message."""
    if verdict is None:
        return result
    result = {**result, "promotion": {"promoted": verdict["promoted"], "reason": verdict["reason"]}}
    if verdict["promoted"]:
        return result
    message = f"{verdict['reason']}; {'; '.join(verdict['checks'])}" if verdict["checks"] else verdict["reason"]
    if cfg.export.on_not_promoted == "fail":
        return Failed(name=NOT_PROMOTED, message=message)
    return Completed(name=NOT_PROMOTED, message=message, data=result)
