"""Sweep of the VP one-step generator's timestep t* (G(z) = x0_theta(z, t*), docs/math.md §5).

    python benchmarks/vp_generator_timestep.py [--timesteps 999 700 500 300] [--work DIR] [--set KEY=VALUE ...]

On the embedded VP teacher (data/digits-vp.yaml) at reduced sizes by default (1,024 PLMS-50 pairs,
400 distill steps, 1,000 evaluation samples; ``--set`` overrides them): the pairs are made once, then
distill and evaluate run for each t*. Prints one JSON object and a markdown table (FD-digits,
ratio to the teacher, class accuracy, sigma/alpha at t* = how much the x0 map amplifies an epsilon
error, the last logged generator gradient norm).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "data" / "digits-vp.yaml"
REDUCED = ["generate.num_samples=1024", "distill.steps=400", "distill.checkpoint_every=200", "distill.sample_every=200", "evaluate.num_samples=1000"]


def run(stage: str, sets: list[str]) -> Path:
    args = [sys.executable, "-m", "stages", stage, "--config", str(CONFIG), "--quiet"]
    for s in sets:
        args += ["--set", s]
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{stage} {' '.join(sets)} failed:\n{proc.stderr[-3000:]}")
    return Path(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--timesteps", type=int, nargs="+", default=[999, 700, 500, 300])
    ap.add_argument("--work", type=Path, default=None, help="store directory (default: a new temporary one)")
    ap.add_argument("--set", dest="sets", action="append", default=None, help=f"overrides (default: {' '.join(REDUCED)})")
    args = ap.parse_args()
    import torch

    from dmd_core import load_denoiser

    abar = load_denoiser(ROOT / "data" / "teacher-vp").alphas_cumprod
    store = args.work or Path(tempfile.mkdtemp(prefix="dmd-vp-sweep-"))
    base = [f"store={store}", *(REDUCED if args.sets is None else args.sets)]
    run("generate", base)
    rows = []
    for t in args.timesteps:
        sets = [*base, f"distill.generator_timestep={t}"]
        distill_dir = run("distill", sets)
        m = json.loads((run("evaluate", sets) / "metrics.json").read_text())
        last = pq.read_table(distill_dir / "metrics.parquet").to_pylist()[-1]
        a = float(abar[t].sqrt())
        rows.append({"timestep": t, "sigma_over_alpha": float(torch.sqrt(1 - abar[t]) / a), "teacher_fd": m["teacher_fd"], "student_fd": m["student_fd"],
                     "fd_ratio": m["fd_ratio"], "student_class_accuracy": m["student_class_accuracy"], "last_grad_norm_g": last["grad_norm_g"]})  # fmt: skip
    print(json.dumps({"overrides": base[1:], "rows": rows}, indent=2))
    print("| t* | sigma/alpha | one-step FD-digits | ratio | accuracy | final grad norm G |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['timestep']} | {r['sigma_over_alpha']:.2f} | {r['student_fd']:.2f} | {r['fd_ratio']:.2f} | {r['student_class_accuracy']:.1%} | {r['last_grad_norm_g']:.2f} |")


if __name__ == "__main__":
    main()
