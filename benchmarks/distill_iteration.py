"""Seconds per DMD iteration on the digits default against its compute floor.

    python benchmarks/distill_iteration.py [--iters 30] [--repeats 3]

The floor is the same iteration's network passes timed alone, on the same shapes: generator
forward+backward (the DM and regression batches together), real-score forward, fake-score forward,
fake-score forward+backward, regression-loss forward+backward. Target: iteration / floor <= 1.15.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch
from accelerate import Accelerator

from dmd_core.dmd import SampleRNG
from stages import chain, distill
from stages.config import load_config


def timed(fn, iters: int) -> float:
    fn()  # warm-up
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) / iters


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    cfg = load_config(None, [f"store={tempfile.mkdtemp(prefix='dmd-bench-')}"])
    cfg.distill.pairs = None
    chain.run(cfg, "generate", progress=False)  # the pairs, once (in the temporary store)
    plan = chain.plan(cfg, "distill")
    acc = Accelerator(cpu=True)
    torch.set_num_threads(torch.get_num_threads())
    tr = distill.Trainer(cfg, plan, acc)
    tr.restart_data(0)
    d, B = cfg.distill, cfg.distill.batch_size
    z_ref, y_ref, labels_ref = next(tr.data)
    rng = SampleRNG(0, 0, 0, range(B))
    z, labels = rng.randn(tr.shape), rng.randint(0, 10)
    x_t = torch.randn(B, *tr.shape)
    sigma = torch.full((B,), 1.0, dtype=torch.float64)

    def gen_fwd_bwd():
        x = tr.one_step(tr.gen, torch.cat([z, z_ref]), torch.cat([labels, labels_ref]))
        x.square().mean().backward()

    def real_fwd():
        with torch.no_grad():
            tr.real(x_t, sigma, labels, d.guidance_scale)

    def fake_fwd():
        with torch.no_grad():
            tr.fake(x_t, sigma, labels)

    def fake_fwd_bwd():
        tr.fake(x_t, sigma, labels).square().mean().backward()

    def regression_fwd_bwd():
        x = z_ref.clone().requires_grad_(True)
        tr.gen_loss.regression_loss(x, y_ref).backward()

    step = [0]

    def iteration():
        tr.step(step[0])
        step[0] += 1

    parts = {"generator_fwd_bwd": gen_fwd_bwd, "real_fwd": real_fwd, "fake_fwd": fake_fwd, "fake_fwd_bwd": fake_fwd_bwd, "regression_fwd_bwd": regression_fwd_bwd}
    ratios, iters_s, floors_s = [], [], []
    for _ in range(args.repeats):  # interleaved: this machine's speed drifts over minutes
        floor = {k: timed(fn, args.iters) for k, fn in parts.items()}
        it = timed(iteration, args.iters)
        tr.gen.zero_grad(set_to_none=True), tr.fake.zero_grad(set_to_none=True)
        floors_s.append(sum(floor.values()))
        iters_s.append(it)
        ratios.append(it / sum(floor.values()))
    print(json.dumps({
        "batch_size": B,
        "threads": torch.get_num_threads(),
        "iteration_s": round(statistics.median(iters_s), 4),
        "floor_s": round(statistics.median(floors_s), 4),
        "floor_parts_s": {k: round(v, 4) for k, v in floor.items()},
        "ratio": round(statistics.median(ratios), 3),
        "generator_samples_per_s": round(B / statistics.median(iters_s), 1),
    }, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
