"""The two embedded teachers, EDM (data/digits.yaml) and VP (data/digits-vp.yaml), end to end side by side.

    python benchmarks/teachers_side_by_side.py [--work DIR] [--set KEY=VALUE ...]

Runs generate, distill and evaluate of each config (`make demo`'s sizes) in a fresh store under
``--work``, times each stage's command and prints one JSON object and the README's markdown table:
teacher and one-step FD-digits, their ratio (the quality bar: <= 2.0), class accuracies (>= 95%),
and the wall time of each stage. ``--set`` overrides apply to both configs (e.g.
``--set distill.steps=400``); a VP-only override goes through ``--vp-set``.
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
CONFIGS = {"EDM (data/teacher, Heun-18)": ROOT / "data" / "digits.yaml", "VP (data/teacher-vp, PLMS-50)": ROOT / "data" / "digits-vp.yaml"}
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


def metrics(store: Path) -> dict:
    (manifest,) = store.glob("evaluate/*/manifest.json")
    return json.loads(manifest.read_text())["info"]["metrics"]


def table(rows: dict) -> str:
    head = "| teacher | teacher FD-digits / acc. | one-step FD-digits / acc. | ratio | generate | distill | evaluate |\n|---|---|---|---|---|---|---|\n"
    lines = []
    for name, r in rows.items():
        m, s = r["metrics"], r["wall_s"]
        lines.append(
            f"| {name} | {m['teacher_fd']:.3f} / {m['teacher_class_accuracy']:.1%} | {m['student_fd']:.3f} / "
            f"{m['student_class_accuracy']:.1%} | {m['fd_ratio']:.2f} | {s['generate']:.0f} s | {s['distill']:.0f} s | {s['evaluate']:.0f} s |"
        )
    return head + "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=None, help="working directory (default: a new temporary one)")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="override for both configs, KEY=VALUE")
    ap.add_argument("--vp-set", dest="vp_sets", action="append", default=[], help="override for the VP config only")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="dmd-teachers-"))
    rows = {}
    for i, (name, config) in enumerate(CONFIGS.items()):
        store = work / f"store-{config.stem}"
        sets = [f"store={store}", *args.sets, *(args.vp_sets if "vp" in config.stem else [])]
        wall = {s: round(stage(s, config, sets), 1) for s in STAGES}
        rows[name] = {"config": str(config.relative_to(ROOT)), "overrides": sets[1:], "wall_s": wall, "metrics": metrics(store)}
    print(json.dumps(rows, indent=2))
    print(table(rows))


if __name__ == "__main__":
    main()
