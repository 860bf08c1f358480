"""Seconds per DMD2 step (DM + GAN + TTUR 5:1, no regression) on the digits default, with the GAN term's
fake-score passes stopped at the bottleneck (eager runs' default) against run whole.

    python benchmarks/gan_step.py [--iters 10] [--repeats 3]

The head reads only the mid block's output, so the up path's forward in its passes is wasted work: three
passes a fake update (real, generated) and generator update (adversarial). Both modes give the same numbers
(tests/test_gan.py checks); this measures the time. The two modes alternate on one trainer, since this
machine's speed drifts over minutes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile

import torch
from accelerate import Accelerator

from stages import chain, distill
from stages.config import load_config

from distill_iteration import timed  # warm-up, then the mean over iters

DMD2 = ["distill.gan=true", "distill.fake_updates_per_generator_update=5", "distill.regression_weight=0"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    cfg = load_config(None, [f"store={tempfile.mkdtemp(prefix='dmd-bench-')}", *DMD2])
    tr = distill.Trainer(cfg, chain.plan(cfg, "distill"), Accelerator(cpu=True))
    tap = tr.unwrap(tr.fake).gan_tap
    step = [0]

    def iteration():
        tr.step(step[0])
        step[0] += 1

    runs: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(args.repeats):
        for stop_early in (True, False):
            tap.stop_early = stop_early
            runs[stop_early].append(timed(iteration, args.iters))
    stopped, whole = statistics.median(runs[True]), statistics.median(runs[False])
    print(json.dumps({
        "recipe": " ".join(DMD2),
        "batch_size": cfg.distill.batch_size,
        "threads": torch.get_num_threads(),
        "step_s_stopped_at_bottleneck": round(stopped, 4),
        "step_s_whole_forward": round(whole, 4),
        "speedup": round(whole / stopped, 3),
    }, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
