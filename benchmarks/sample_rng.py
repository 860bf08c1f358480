"""Per-sample randomness of one DMD generator step: one torch.Generator per sample (the old SampleRNG)
against counter-based Philox draws made in one call for the batch (dmd_core/philox.py).

    python benchmarks/sample_rng.py [--batch 128] [--shape 3 32 32] [--repeats 20]

One "step" draws what the generator step draws: z (the image shape), a class, a timestep and the
noise eps (the image shape). Prints milliseconds per step for both, on the CPU (and CUDA if present).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from dmd_core.dmd import SampleRNG
from dmd_core.shards import sample_seed


def per_sample_generators(seed: int, step: int, batch: int, shape: tuple[int, ...], device: str) -> None:
    """The previous SampleRNG: a CPU torch.Generator per sample, draws stacked, then copied to the device."""
    gens = [torch.Generator().manual_seed(sample_seed(seed, 0, step, i)) for i in range(batch)]
    torch.stack([torch.randn(shape, generator=g) for g in gens]).to(device)
    torch.cat([torch.randint(0, 10, (1,), generator=g) for g in gens]).to(device)
    torch.cat([torch.randint(20, 980, (1,), generator=g) for g in gens]).to(device)
    torch.stack([torch.randn(shape, generator=g) for g in gens]).to(device)


def philox_draws(seed: int, step: int, batch: int, shape: tuple[int, ...], device: str) -> None:
    rng = SampleRNG(seed, 0, step, range(batch), device)
    rng.randn(shape), rng.randint(0, 10), rng.randint(20, 980), rng.randn(shape)


def ms_per_step(fn, batch: int, shape: tuple[int, ...], device: str, repeats: int) -> float:
    fn(0, 0, batch, shape, device)
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for step in range(repeats):
        fn(0, step, batch, shape, device)
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeats * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--shape", type=int, nargs="+", default=[3, 32, 32])
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    shape = tuple(args.shape)
    out = {"batch": args.batch, "shape": list(shape), "threads": torch.get_num_threads()}
    for device in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        old = ms_per_step(per_sample_generators, args.batch, shape, device, args.repeats)
        new = ms_per_step(philox_draws, args.batch, shape, device, args.repeats)
        out[device] = {"per_sample_generators_ms": round(old, 2), "philox_ms": round(new, 2), "speedup": round(old / new, 1)}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
