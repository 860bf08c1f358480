"""Ablation of the distillation recipe on the digits default, through the pipeline's own stages.

    python benchmarks/ablation.py [--work DIR] [--recipes dmd,dmd2] [--seeds 0,1,2] [--workers 2]
                                  [--set KEY=VALUE ...] [--plot PATH]

Each recipe is a set of ``--set`` overrides on data/digits.yaml; each (recipe, seed) runs generate
(cached: all recipes share the pairs), distill with quality probes every ``--eval-every`` steps and
evaluate, in one store under ``--work``. Each finished run is written to ``<work>/runs/`` at once, so a
rerun (or a crash) loses nothing and skips what is done. ``--workers N`` runs N runs side by side, each
with cores/N torch threads: the digits UNet is too small for two threads to help one run much, so two
one-thread runs finish sooner than two two-thread runs in turn (the distill times then read about 2x a
quiet one-run number). The teacher is also evaluated at 35 network evaluations (Heun-18) and at 1
(Heun-1: one Euler step). Writes ``<work>/ablation.json`` and prints the README's table (mean and std
over seeds of the FD-digits ratio and class accuracy, median distill wall time, steps); ``--plot PATH`` draws
probe FD against step per recipe.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RECIPES: dict[str, tuple[str, list[str]]] = {
    "regression": ("regression only (no DM term)", ["distill.dm_weight=0"]),
    "dm": ("DM only (no regression)", ["distill.regression_weight=0"]),
    "dmd": ("DMD: DM + regression (the default)", []),
    "dmd_ttur": ("DMD + TTUR 5:1", ["distill.fake_updates_per_generator_update=5"]),
    "dmd2": ("DMD2: DM + GAN + TTUR 5:1, no regression", ["distill.gan=true", "distill.fake_updates_per_generator_update=5", "distill.regression_weight=0"]),
    "dmd2_4step": ("DMD2, 4 steps (999, 749, 499, 249)", ["distill.gan=true", "distill.fake_updates_per_generator_update=5", "distill.regression_weight=0",
                                                         "distill.generator_timesteps=[999,749,499,249]"]),
}


def run_one(config: Path, sets: list[str]) -> dict:
    from stages import chain
    from stages.config import load_config

    cfg = load_config(config, sets)
    t0 = time.perf_counter()
    chain.run(cfg, "generate", progress=False).manifest
    t1 = time.perf_counter()
    dm = chain.run(cfg, "distill", progress=False).manifest
    t2 = time.perf_counter()
    em = chain.run(cfg, "evaluate", progress=False).manifest
    import pyarrow.parquet as pq

    rows = pq.read_table(Path(cfg.store) / "distill" / dm.key / "metrics.parquet").to_pylist()
    curve = [(r["step"], r["probe_fd"]) for r in rows if r.get("probe_fd") is not None]
    return {
        "metrics": em.info["metrics"], "distill_key": dm.key, "steps": dm.info["steps"], "best": dm.info.get("best"),
        "distill_compute_s": dm.wall_time_s, "wall_s": {"generate": t1 - t0, "distill": t2 - t1, "evaluate": time.perf_counter() - t2},
        "probe_curve": curve,
    }  # fmt: skip


def summary(results: dict) -> str:
    head = "| recipe | FD-digits ratio (mean ± std) | class accuracy | distill time (median) | steps | seeds |\n|---|---|---|---|---|---|\n"
    lines = []
    for name, runs in results["recipes"].items():
        ratios = [r["metrics"]["fd_ratio"] for r in runs]
        accs = [r["metrics"]["student_class_accuracy"] for r in runs]
        times = [r["distill_compute_s"] for r in runs]
        sd = lambda v: statistics.stdev(v) if len(v) > 1 else 0.0  # noqa: E731
        lines.append(
            f"| {RECIPES[name][0]} | {statistics.mean(ratios):.2f} ± {sd(ratios):.2f} | {100 * statistics.mean(accs):.2f}% ± {100 * sd(accs):.2f} "
            f"| {statistics.median(times):.0f} s | {runs[0]['steps']} | {len(runs)} |"
        )
    for nfe, t in results.get("teacher", {}).items():
        lines.append(f"| teacher, {nfe} network evaluation{'' if nfe == '1' else 's'} | {t['fd_ratio']:.2f} | {100 * t['class_accuracy']:.2f}% | | | |")
    return head + "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9.5, 4), dpi=110)
    for name, runs in results["recipes"].items():
        for i, r in enumerate(runs):
            steps, fds = zip(*r["probe_curve"]) if r["probe_curve"] else ((), ())
            ax.plot(steps, fds, color=f"C{list(RECIPES).index(name)}", alpha=0.8, label=RECIPES[name][0] if i == 0 else None)
    ax.set(xlabel="generator step", ylabel="probe FD-digits (1,000 samples)", yscale="log", title="Quality during training, digits default")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: the curves fill the axes
    fig.tight_layout()
    fig.savefig(path)


def run_path(work: Path, name: str, seed: int) -> Path:
    return work / "runs" / f"{name}-seed{seed}.json"


def run_jobs(config: Path, base: list[str], work: Path, jobs: list[tuple[str, int]]) -> None:
    """Run each (recipe, seed) not yet done and not claimed by another worker; one result file each."""
    (work / "claims").mkdir(parents=True, exist_ok=True)
    for name, seed in jobs:
        out = run_path(work, name, seed)
        if out.is_file():
            continue
        try:  # the claim: whichever worker creates the file first runs the job
            os.close(os.open(work / "claims" / out.stem, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            continue
        print(f"{name}, seed {seed} ...", file=sys.stderr, flush=True)
        result = {"seed": seed, **run_one(config, [*base, *RECIPES[name][1], f"distill.seed={seed}"])}
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=2))
        tmp.replace(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "ablation")
    ap.add_argument("--recipes", default=",".join(RECIPES))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--workers", type=int, default=1, help="runs side by side (each gets cores/N torch threads)")
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--set", dest="sets", action="append", default=[], help="override for every run, KEY=VALUE")
    ap.add_argument("--plot", type=Path, default=None)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    config = ROOT / "data" / "digits.yaml"
    base = [f"store={args.work / 'store'}", f"distill.eval_every={args.eval_every}", *args.sets]
    names = args.recipes.split(",")
    unknown = sorted(set(names) - set(RECIPES))
    if unknown:
        sys.exit(f"error: unknown recipe(s) {unknown}; choose from {', '.join(RECIPES)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    jobs = [(name, seed) for seed in seeds for name in names]  # seed-major: every recipe gets seed 0 first
    if args.worker:
        run_jobs(config, base, args.work, jobs)
        return
    out = args.work / "ablation.json"
    results = json.loads(out.read_text()) if out.is_file() else {"recipes": {}, "teacher": {}}
    # the pairs first, in this process, so that workers find them cached instead of racing to write them
    from stages import chain
    from stages.config import load_config

    chain.run(load_config(config, base), "generate", progress=False).manifest
    if (args.work / "claims").is_dir():
        for claim in (args.work / "claims").iterdir():  # claims of a crashed earlier run
            claim.unlink()
    if args.workers > 1:
        threads = max(1, (os.cpu_count() or 1) // args.workers)
        cmd = [sys.executable, __file__, "--worker", "--work", str(args.work), "--recipes", args.recipes, "--seeds", args.seeds,
               "--eval-every", str(args.eval_every), *[a for kv in args.sets for a in ("--set", kv)],
               *[a for stage in ("generate", "distill", "evaluate") for a in ("--set", f"{stage}.num_threads={threads}")]]  # fmt: skip
        procs = [subprocess.Popen(cmd) for _ in range(args.workers)]
        if any(p.wait() for p in procs):
            sys.exit("error: a worker failed; rerun the same command to resume (finished runs are kept)")
    else:
        run_jobs(config, base, args.work, jobs)
    results["recipes"] = {}
    for name in RECIPES:
        runs = [json.loads(p.read_text()) for p in sorted((args.work / "runs").glob(f"{name}-seed*.json"))]
        if runs:
            results["recipes"][name] = sorted(runs, key=lambda r: r["seed"])
    # the teacher at 35 and 1 network evaluations (its numbers are cached per protocol in the store)
    for steps, nfe in ((18, 35), (1, 1)):
        m = chain.run(load_config(config, [*base, f"evaluate.teacher_steps={steps}"]), "evaluate", progress=False).manifest.info["metrics"]
        results["teacher"][str(nfe)] = {"fd": m["teacher_fd"], "fd_ratio": m["teacher_fd"] / results_teacher_fd(results, m), "class_accuracy": m["teacher_class_accuracy"]}
    out.write_text(json.dumps(results, indent=2))
    print(summary(results))
    if args.plot:
        plot(results, args.plot)


def results_teacher_fd(results: dict, m: dict) -> float:
    """The reference of every ratio: the teacher at 35 network evaluations (the first teacher row)."""
    return results["teacher"].get("35", {}).get("fd", m["teacher_fd"])


if __name__ == "__main__":
    main()
