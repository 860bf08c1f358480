"""Loading a teacher's UNet: built on the meta device and filled by the load (load_unet) against the
ordinary build, whose random initialisation the load then overwrites.

    python benchmarks/teacher_load.py [--models cifar,sd] [--repeats 3]

cifar: google/ddpm-cifar10-32's layout with class embeddings (35.75 M parameters); sd: Stable Diffusion
1.5's UNet2DConditionModel layout (859.5 M). Random weights, saved as safetensors in a temporary folder
(3.4 GB for sd). Prints the median seconds of each way over --repeats loads, after one warm-up load
(the file then sits in the page cache, so the numbers are the build's cost, not the disk's).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel, UNet2DModel
from safetensors.torch import load_file

from dmd_core.loading import WEIGHTS_FILE, load_unet
from gpu_cifar import cifar_unet_config

MODELS = {
    "cifar": (UNet2DModel, cifar_unet_config()),
    "sd": (UNet2DConditionModel, dict(sample_size=64, cross_attention_dim=768)),  # diffusers' defaults are SD 1.5's layout
}


def ordinary_load(cls, folder: Path) -> torch.nn.Module:
    """What load_unet did before: from_config (random init), then the strict load."""
    unet = cls.from_config(cls.load_config(str(folder)))
    unet.load_state_dict(load_file(str(folder / WEIGHTS_FILE)), strict=True)
    return unet


def median_seconds(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="cifar,sd", help="comma-separated, from: " + ", ".join(MODELS))
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            cls, cfg = MODELS[name]
            folder = Path(tmp) / name
            torch.manual_seed(0)
            net = cls.from_config(cfg)
            params = sum(p.numel() for p in net.parameters())
            net.save_pretrained(str(folder), safe_serialization=True)
            del net
            built, ordinary = load_unet(folder), ordinary_load(cls, folder)
            assert all(torch.equal(a, b) for a, b in zip(built.state_dict().values(), ordinary.state_dict().values()))
            del built, ordinary
            rows[name] = {"parameters_m": round(params / 1e6, 2),
                          "load_unet_s": round(median_seconds(lambda: load_unet(folder), args.repeats), 3),
                          "ordinary_s": round(median_seconds(lambda: ordinary_load(cls, folder), args.repeats), 3)}  # fmt: skip
            print(json.dumps({name: rows[name]}), flush=True)


if __name__ == "__main__":
    main()
