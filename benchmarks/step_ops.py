"""What one DMD step asks of the device beyond its network passes, counted on the CPU.

    python benchmarks/step_ops.py [--batch 64]

On a GPU every dispatched operation is at least one kernel launch (a few microseconds of host time),
and every read of a device value (``.item()``, ``float()``, ``bool()``, ``nonzero``) makes the host wait
until the device has finished: after it the device idles while the host queues the next work. This
counts both for one step of the digits default and for its network passes alone (generator
forward+backward on the DM and regression batches, real forward, fake forward, fake forward+backward),
plus the operations of one per-sample ``randn`` draw, and how many operations the step dispatches
before its first network call (while the device, idle after the previous step's one read, waits).
The counts do not depend on the device.
"""

from __future__ import annotations

import argparse
import collections
import json
import tempfile

import torch
from accelerate import Accelerator
from torch.utils._python_dispatch import TorchDispatchMode

from dmd_core.dmd import SampleRNG
from stages import chain, distill
from stages.config import load_config

DEVICE_READS = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "is_nonzero"}


class Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: collections.Counter = collections.Counter()
        self.before_network = None  # operations dispatched before the first convolution

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if name == "convolution" and self.before_network is None:
            self.before_network = sum(self.ops.values())
        self.ops[name] += 1
        return func(*args, **(kwargs or {}))

    def reads(self) -> int:
        return sum(n for name, n in self.ops.items() if name in DEVICE_READS)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=64)
    args = ap.parse_args()
    cfg = load_config(None, [f"store={tempfile.mkdtemp(prefix='dmd-ops-')}", "generate.num_samples=512", f"distill.batch_size={args.batch}"])
    cfg.distill.pairs = None
    chain.run(cfg, "generate", progress=False)
    tr = distill.Trainer(cfg, chain.plan(cfg, "distill"), Accelerator(cpu=True))
    tr.restart_data(0)
    tr.step(0)  # the first step builds optimizer state
    with Count() as step:
        tr.step(1)
    B = cfg.distill.batch_size
    z_ref, y_ref, labels_ref = next(tr.data)
    rng = SampleRNG(0, 0, 0, range(B))
    z, labels = rng.randn(tr.shape), rng.randint(0, 10)
    x_t, sigma = torch.randn(B, *tr.shape), torch.full((B,), 1.0, dtype=torch.float64)
    with Count() as floor:
        tr.one_step(tr.gen, torch.cat([z, z_ref]), torch.cat([labels, labels_ref])).square().mean().backward()
        with torch.no_grad():
            tr.real(x_t, sigma, labels, cfg.distill.guidance_scale)
            tr.fake(x_t, sigma, labels)
        tr.fake(x_t, sigma, labels).square().mean().backward()
    with Count() as draw:
        SampleRNG(0, 0, 0, range(B)).randn(tr.shape)
    extra = step.ops - floor.ops
    print(json.dumps({
        "batch_size": B,
        "ops_per_step": sum(step.ops.values()),
        "ops_in_network_passes": sum(floor.ops.values()),
        "ops_per_randn_draw": sum(draw.ops.values()),
        "device_reads_per_step": step.reads(),
        "ops_before_the_first_network_call": step.before_network,
        "most_common_extra_ops": dict(extra.most_common(8)),
    }, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
