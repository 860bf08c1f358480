"""The three embedded teachers, EDM (data/digits.yaml), VP (data/digits-vp.yaml) and flow (data/digits-flow.yaml),
end to end side by side.

    python benchmarks/teachers_side_by_side.py [--work DIR] [--only edm,vp,flow] [--seeds N] [--set KEY=VALUE ...]

Runs generate, distill and evaluate of each config (`make demo`'s sizes) in a fresh store under
``--work``, times each stage's command and prints one JSON object and the README's markdown table:
teacher and one-step FD-digits, their ratio (the quality bar: <= 2.0), class accuracies (>= 95%),
the speedup (images/s, one-step over the teacher's solver) and the wall time of each stage.
``--seeds N`` distils each teacher N times (distill.seed 0..N-1, one shared generate) and reports each
seed's numbers and their mean. ``--set`` overrides apply to every config (e.g. ``--set distill.steps=400``);
one teacher's go through ``--vp-set`` or ``--flow-set``. A full run of the three at `make demo`'s sizes takes
about 25 minutes on 2 CPU cores (each teacher: generate 1.5-3 min, distill 5 min, evaluate 1 min), times N for distill
and evaluate.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {
    "edm": ("EDM (data/teacher, Heun-18)", ROOT / "data" / "digits.yaml"),
    "vp": ("VP (data/teacher-vp, PLMS-50)", ROOT / "data" / "digits-vp.yaml"),
    "flow": ("flow (data/teacher-flow, DiT, Heun-18)", ROOT / "data" / "digits-flow.yaml"),
}
STAGES = ("generate", "distill", "evaluate")


def stage(name: str, config: Path, sets: list[str]) -> float:
    args = [sys.executable, "-m", "stages", name, "--config", str(config), "--quiet"]
    for s in sets:
        args += ["--set", s]
    t0 = time.perf_counter()
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args[2:])} failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0


def metrics(config: Path, sets: list[str]) -> dict:
    """The metrics of the evaluation ``config`` with ``sets`` made (found by its key, as the stages compute it)."""
    from stages.chain import plan
    from stages.config import load_config

    cfg = load_config(config, sets)
    return json.loads((Path(cfg.store) / "evaluate" / plan(cfg, "evaluate").key / "manifest.json").read_text())["info"]["metrics"]


def mean_row(runs: list[dict]) -> dict:
    """The mean of each number over the seeds' metrics (the table's row when there are several)."""
    keys = [k for k, v in runs[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return {k: sum(r[k] for r in runs) / len(runs) for k in keys}


def table(rows: dict) -> str:
    head = (
        "| teacher | teacher FD-digits / acc. | one-step FD-digits / acc. | ratio | speedup | generate | distill | evaluate |\n"
        "|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for name, r in rows.items():
        m, s = r["metrics"], r["wall_s"]
        seeds = f" (mean of {len(r['seeds'])} seeds)" if len(r["seeds"]) > 1 else ""
        lines.append(
            f"| {name}{seeds} | {m['teacher_fd']:.3f} / {m['teacher_class_accuracy']:.1%} | {m['student_fd']:.3f} / "
            f"{m['student_class_accuracy']:.1%} | {m['fd_ratio']:.2f} | {m['speedup']:.1f}x | {s['generate']:.0f} s | {s['distill']:.0f} s | {s['evaluate']:.0f} s |"
        )
    return head + "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=None, help="working directory (default: a new temporary one)")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="override for both configs, KEY=VALUE")
    ap.add_argument("--vp-set", dest="vp_sets", action="append", default=[], help="override for the VP config only")
    ap.add_argument("--flow-set", dest="flow_sets", action="append", default=[], help="override for the flow config only")
    ap.add_argument("--only", default="edm,vp,flow", help="the teachers to run, comma-separated (edm, vp, flow)")
    ap.add_argument("--seeds", type=int, default=1, help="distill (and evaluate) each teacher with distill.seed 0..N-1")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="dmd-teachers-"))
    own = {"vp": args.vp_sets, "flow": args.flow_sets}
    rows = {}
    for key in args.only.split(","):
        name, config = CONFIGS[key]
        store = work / f"store-{config.stem}"
        sets = [f"store={store}", *args.sets, *own.get(key, [])]
        wall = {"generate": round(stage("generate", config, sets), 1), "distill": 0.0, "evaluate": 0.0}
        runs = []
        for seed in range(args.seeds):
            seed_sets = [*sets, f"distill.seed={seed}"] if args.seeds > 1 else sets
            for s in ("distill", "evaluate"):
                wall[s] += round(stage(s, config, seed_sets) / args.seeds, 1)  # the mean over the seeds
            runs.append(metrics(config, seed_sets))
        rows[name] = {"config": str(config.relative_to(ROOT)), "overrides": sets[1:], "wall_s": wall, "seeds": runs, "metrics": mean_row(runs)}
    print(json.dumps(rows, indent=2))
    print(table(rows))


if __name__ == "__main__":
    main()
