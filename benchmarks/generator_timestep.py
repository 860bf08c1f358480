"""Sweep of the one-step generator's timestep t* (G(z) = x0_theta(z, t*)): VP teachers (docs/math.md §5) and
flow teachers (G(z) = z - s* v(z, s*), s* the t*-th shifted level, §14).

    python benchmarks/generator_timestep.py [--teacher vp|flow] [--timesteps 999 700 500 300] [--work DIR] [--set KEY=VALUE ...]

On the embedded VP (data/digits-vp.yaml) or flow (data/digits-flow.yaml) teacher at reduced sizes by default
(1,024 pairs, 400 distill steps, 1,000 evaluation samples; ``--set`` overrides them): the pairs are made once,
then distill and evaluate run for each t*. Prints one JSON object and a markdown table (FD-digits, ratio to the
teacher, class accuracy, the factor by which x0 = G(z) amplifies an error of the network's output at t*: sigma/alpha
of an epsilon for VP, s* of a velocity for flow, and the last logged generator gradient norm).
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
CONFIGS = {"vp": ROOT / "data" / "digits-vp.yaml", "flow": ROOT / "data" / "digits-flow.yaml"}
REDUCED = ["generate.num_samples=1024", "distill.steps=400", "distill.checkpoint_every=200", "distill.sample_every=200", "evaluate.num_samples=1000"]


def run(config: Path, stage: str, sets: list[str]) -> Path:
    args = [sys.executable, "-m", "stages", stage, "--config", str(config), "--quiet"]
    for s in sets:
        args += ["--set", s]
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{stage} {' '.join(sets)} failed:\n{proc.stderr[-3000:]}")
    return Path(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", choices=sorted(CONFIGS), default="vp")
    ap.add_argument("--timesteps", type=int, nargs="+", default=[999, 700, 500, 300])
    ap.add_argument("--work", type=Path, default=None, help="store directory (default: a new temporary one)")
    ap.add_argument("--set", dest="sets", action="append", default=None, help=f"overrides (default: {' '.join(REDUCED)})")
    args = ap.parse_args()
    import torch

    from dmd_core import load_denoiser
    from dmd_core.dmd import noise_process

    config = CONFIGS[args.teacher]
    teacher = load_denoiser(ROOT / "data" / f"teacher-{args.teacher}")
    process = noise_process(teacher.param, getattr(teacher, "alphas_cumprod", None))
    store = args.work or Path(tempfile.mkdtemp(prefix=f"dmd-{args.teacher}-sweep-"))
    base = [f"store={store}", *(REDUCED if args.sets is None else args.sets)]
    run(config, "generate", base)
    rows = []
    for t in args.timesteps:
        sets = [*base, f"distill.generator_timestep={t}"]
        distill_dir = run(config, "distill", sets)
        m = json.loads((run(config, "evaluate", sets) / "metrics.json").read_text())
        last = pq.read_table(distill_dir / "metrics.parquet").to_pylist()[-1]
        alpha, sigma, _ = process.levels(torch.tensor([t]))
        # x0 = (x - sigma eps) / alpha (VP); x0 = x - s v (flow): the factor on the network output's error
        gain = float(sigma / alpha) if args.teacher == "vp" else float(sigma)
        rows.append({"timestep": t, "level": float(sigma), "error_gain": gain, "teacher_fd": m["teacher_fd"], "student_fd": m["student_fd"],
                     "fd_ratio": m["fd_ratio"], "student_class_accuracy": m["student_class_accuracy"], "last_grad_norm_g": last["grad_norm_g"]})  # fmt: skip
    print(json.dumps({"overrides": base[1:], "rows": rows}, indent=2))
    gain = "sigma/alpha" if args.teacher == "vp" else "s*"
    print(f"| t* | {gain} | one-step FD-digits | ratio | accuracy | final grad norm G |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['timestep']} | {r['error_gain']:.3f} | {r['student_fd']:.2f} | {r['fd_ratio']:.2f} | {r['student_class_accuracy']:.1%} | {r['last_grad_norm_g']:.2f} |")


if __name__ == "__main__":
    main()
