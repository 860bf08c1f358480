"""Images/s of the generate stage against a bare solver loop on the same batches (no I/O).

    python benchmarks/generate_throughput.py [--num-samples 1024] [--repeats 8]

The stage's cost beyond the solver (per-sample seeding, shard encoding, sha256, atomic writes) should
overlap the compute: target ratio bare/stage <= 1.05. Uses the embedded digits teacher.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from dmd_core.shards import sample_labels, sample_noise
from dmd_core.solvers import teacher_sampler
from stages import chain, generate
from stages.config import load_config


def bare_loop(cfg, den) -> float:
    """Seconds for the solver alone on the stage's batches (noise made beforehand, results discarded)."""
    g = cfg.generate
    solve, _ = teacher_sampler(den, g.solver, g.steps, g.guidance_scale)
    shape = generate.model_shape(den)
    batches = []
    for shard in range(0, g.num_samples, g.shard_size):
        idx = range(shard, min(shard + g.shard_size, g.num_samples))
        for s in range(0, len(idx), g.batch_size):
            b = idx[s : s + g.batch_size]
            batches.append((sample_noise(g.seed, b, shape), sample_labels(b, den.num_classes)))
    t0 = time.perf_counter()
    for z, labels in batches:
        solve(z, labels)
    return time.perf_counter() - t0


def stage_run(cfg) -> float:
    t0 = time.perf_counter()
    chain.run(cfg, "generate", progress=False).manifest
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-samples", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=8)
    args = ap.parse_args()
    results = {"bare_s": [], "stage_s": []}
    for r in range(args.repeats):
        store = Path(tempfile.mkdtemp(prefix="dmd-bench-"))
        cfg = load_config(None, [f"store={store}", f"generate.num_samples={args.num_samples}"])
        den = chain.resolve_teacher(cfg).load()
        if r == 0:  # warm-up: oneDNN primitive creation and allocator growth, outside both timings
            solve, _ = teacher_sampler(den, cfg.generate.solver, cfg.generate.steps, cfg.generate.guidance_scale)
            solve(torch.randn(cfg.generate.batch_size, *generate.model_shape(den)), None)
        # alternate the order so neither side always runs first
        for name in (("bare_s", "stage_s") if r % 2 == 0 else ("stage_s", "bare_s")):
            results[name].append(bare_loop(cfg, den) if name == "bare_s" else stage_run(cfg))
        shutil.rmtree(store)
    # This machine's timings drift by +-10% over a minute: compare each stage run with the bare run
    # beside it, and report the median of those paired ratios.
    bare, stage = statistics.median(results["bare_s"]), statistics.median(results["stage_s"])
    paired = statistics.median(s / b for s, b in zip(results["stage_s"], results["bare_s"]))
    summary = {
        "num_samples": args.num_samples,
        "bare_images_per_s": round(args.num_samples / bare, 1),
        "stage_images_per_s": round(args.num_samples / stage, 1),
        "ratio_stage_time_over_bare": round(paired, 3),
        "threads": torch.get_num_threads(),
        **results,
    }
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
