"""Promotion: whether an export replaces the promoted export of its teacher and pipeline, and the record of it.

``export.promote_if`` (stages/gate.py) is checked against the last promoted export of the same teacher and
pipeline (``export.pipeline``); a passing export (the first one always passes) is recorded as promoted:
``records/promotions/<pipeline>/<teacher>.json`` in the store, replaced in one atomic update
(``Store.update_record``: a rename under a lock here, a conditional PUT on a bucket) with its metrics and lineage
(teacher, pairs, distill output, evaluation, export, config digest, time). A failing export stays in the store,
not promoted, and the record is left as it was.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from dmd_core.errors import InputError

from .files import digest_json
from .gate import METRICS, Rule, parse
from .store import Store




def record_name(pipeline: str, teacher_digest: str) -> str:
    """The promotion record of (pipeline, teacher): the teacher by its digest (folder sha256 and settings)."""
    return f"promotions/{pipeline}/{digest_json(teacher_digest)[:24]}.json"


@dataclass
class Decision:
    promoted: bool  # this export is (now, or already was) the promoted one
    reason: str  # one line for people
    checks: list[str]  # each comparison with its values
    record: dict  # the promotion record after the decision (this export's, or the one that stays)
    previous: dict | None  # the record before the decision


def lineage(store: Store, evaluate_dir: Path, export_dir: Path) -> dict:
    """What the promotion record says of an export: its metrics and where it came from."""
    em = store.verified(Path(evaluate_dir))
    xm = store.verified(Path(export_dir))
    if em is None or xm is None:
        raise InputError(f"promotion needs a verified evaluation and export; {evaluate_dir if em is None else export_dir} is not. Fix: rerun dmd run.")
    distill_dir = em.info.get("distill_dir")
    dm = store.read_manifest(Path(distill_dir)) if distill_dir else None
    metrics = {k: v for k, v in em.info["metrics"].items() if k in METRICS and isinstance(v, (int, float)) and not isinstance(v, bool)}
    return {
        "export": str(Path(export_dir)),
        "export_key": xm.key,
        "export_digest": xm.digest,
        "teacher_digest": em.upstream.get("teacher") or xm.info.get("teacher_digest"),
        "pairs_digest": dm.upstream.get("pairs") if dm is not None else None,
        "distill_key": Path(distill_dir).name if distill_dir else None,
        "generator_digest": em.upstream.get("distill"),
        "evaluate_key": em.key,
        "config_digest": digest_json(xm.pipeline_config),
        "metrics": metrics,
    }


def decide(rule: Rule | None, candidate: dict, current: dict | None) -> tuple[bool, str, list[str]]:
    """Whether ``candidate`` replaces ``current`` (both promotion records, or lineages); pure."""
    if current is None:
        return True, "first export of this teacher and pipeline: promoted", []
    if current.get("export_digest") == candidate["export_digest"]:
        return True, "already the promoted export", []
    if rule is None:
        return True, "export.promote_if is null: every export is promoted", []
    ok, checks = rule.check(candidate["metrics"], current.get("metrics", {}))
    what = f"export.promote_if {rule.text!r} against the promoted export {current.get('export_key')}"
    return ok, f"{what}: {'passes, promoted' if ok else 'fails, not promoted'}", checks


def promote(store: Store, pipeline: str, promote_if: str | None, evaluate_dir: Path, export_dir: Path, now: float | None = None) -> Decision:
    """Decide whether the export replaces the promoted export of its teacher and pipeline, and record it if so:
    one atomic update of the promotion record (two runs deciding at once: the later decides against the earlier's)."""
    rule = parse(promote_if) if promote_if is not None else None
    candidate = lineage(store, evaluate_dir, export_dir)
    name = record_name(pipeline, candidate["teacher_digest"])
    seen: dict = {}

    def change(old: bytes | None) -> bytes | None:
        current = _load(old, name)
        ok, reason, checks = decide(rule, candidate, current)
        seen.update(previous=current, ok=ok, reason=reason, checks=checks)
        if not ok or (current is not None and current.get("export_digest") == candidate["export_digest"]):
            return None
        record = {"pipeline": pipeline, **candidate, "promote_if": promote_if, "promoted_unix": round(time.time() if now is None else now, 3),
                  "replaced": None if current is None else current.get("export_key")}  # fmt: skip
        return (json.dumps(record, indent=2, sort_keys=True) + "\n").encode()

    after = store.update_record(name, change)
    return Decision(seen["ok"], seen["reason"], seen["checks"], _load(after, name) or {}, seen["previous"])


def _load(data: bytes | None, name: str) -> dict | None:
    if data is None:
        return None
    try:
        record = json.loads(data)
    except ValueError:
        record = None
    if not isinstance(record, dict):
        raise InputError(f"promotion record {name} in the store is unreadable. Fix: delete it (the next passing export is promoted).")
    return record


def current(store: Store, pipeline: str, teacher_digest: str) -> dict | None:
    """The promotion record of (pipeline, teacher), or None when nothing was promoted yet."""
    name = record_name(pipeline, teacher_digest)
    return _load(store.read_record(name), name)


def describe(record: dict) -> str:
    """The promoted export for people: where, when, its metrics and lineage."""
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(record["promoted_unix"]))
    metrics = record.get("metrics", {})
    lines = [
        f"promoted export: {record['export']}",
        f"  pipeline {record['pipeline']}, promoted {when}" + (f", replacing {record['replaced']}" if record.get("replaced") else ""),
        f"  metrics: " + ", ".join(f"{k} {metrics[k]:.6g}" for k in METRICS if k in metrics),
        f"  teacher {record['teacher_digest']}",
        f"  pairs {record.get('pairs_digest') or '(none: no regression loss)'}; distill {record.get('distill_key')}; "
        f"evaluate {record.get('evaluate_key')}; export {record['export_key']}; config {record['config_digest'][:16]}",
    ]
    if record.get("promote_if"):
        lines.append(f"  gate: {record['promote_if']}")
    return "\n".join(lines)
