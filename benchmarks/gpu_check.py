"""The CUDA path on a GPU machine: generate throughput, distill in fp32 and bf16, quality of the result.

    python benchmarks/gpu_check.py --out results.json [--steps 300] [--batch 256]
    python benchmarks/gpu_check.py --out results.json --only t2i     # data/digits-t2i.yaml, all stages
    python benchmarks/gpu_check.py --out results.json --model cifar  # CIFAR-size teacher: precisions, compile, FLOP/s (gpu_cifar.py)

Uses the embedded digits default (or the text-to-image one) with a temporary store. Prints and writes
one JSON object.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch

from dmd_core import load_denoiser
from dmd_core.digits import DigitsClassifier, load_digits_data
from dmd_core.dmd import OneStep
from dmd_core.metrics import class_accuracy, frechet_distance
from dmd_core.shards import sample_labels, sample_noise
from stages import chain, distill, evaluate, generate
from stages.config import DEFAULT_CONFIG, load_config


@torch.no_grad()
def one_step_quality(gen_dir: Path, n: int = 2000) -> dict:
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    G = load_denoiser(gen_dir, dev)
    idx = range(n)
    z, labels = sample_noise(1234, idx, (1, 8, 8)).to(dev), sample_labels(idx, 10).to(dev)
    x = OneStep.of(G)(G, z, labels).float().clamp(-1, 1).cpu()
    clf = DigitsClassifier.load(DEFAULT_CONFIG.parent / "classifier")
    real, _ = load_digits_data()
    return {"fd_digits": frechet_distance(clf, real, x), "class_accuracy": class_accuracy(clf, x, labels.cpu())}


def t2i_check(store: str, res: dict) -> None:
    """data/digits-t2i.yaml as committed, stage by stage on this machine's GPU: wall times and the evaluate numbers."""
    cfg = load_config(DEFAULT_CONFIG.parent / "digits-t2i.yaml", [f"store={store}"])
    for name, stage in (("generate", generate), ("distill", distill), ("evaluate", evaluate)):
        t0 = time.perf_counter()
        m = stage.run(cfg, progress=False)
        res[f"{name}_s"] = round(time.perf_counter() - t0, 1)
        print(json.dumps({name: res[f"{name}_s"]}), flush=True)
    res["metrics"] = {k: v for k, v in m.info["metrics"].items() if isinstance(v, (int, float))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--only", choices=["digits", "t2i"], default="digits")
    ap.add_argument("--model", choices=["digits", "cifar"], default="digits", help="cifar: the CIFAR-size speed check (benchmarks/gpu_cifar.py)")
    ap.add_argument("--parts", default="generate,iteration,one_step",
                    help="cifar: comma-separated parts: generate, iteration (fp32, bf16, bf16 compiled), iteration-eager (fp32, bf16), "
                         "iteration-bf16 (bf16, bf16 compiled, each profiled), iteration-cudagraphs (bf16, bf16 compiled as CUDA graphs, each profiled), profile (torch.profiler: bf16 iteration and generate), one_step")
    ap.add_argument("--generate-samples", type=int, default=None,
                    help="cifar: images per generate run (default: 1,024-2,048 per precision); with it, only tf32 and bf16 run, each cold then warm")
    args = ap.parse_args()
    store = tempfile.mkdtemp(prefix="dmd-gpu-")
    res: dict = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu", "torch": torch.__version__}
    if args.model == "cifar":
        from gpu_cifar import cifar_check

        cifar_check(res, args.parts.split(","), args.generate_samples, save=lambda r: Path(args.out).write_text(json.dumps(r, indent=2)))
        print(json.dumps(res, indent=2), flush=True)
        return
    if args.only == "t2i":
        res["digits_t2i"] = {}
        t2i_check(store, res["digits_t2i"])
        print(json.dumps(res, indent=2), flush=True)
        Path(args.out).write_text(json.dumps(res, indent=2))
        return

    cfg = load_config(None, [f"store={store}", "generate.batch_size=1024", "generate.shard_size=1024"])
    t0 = time.perf_counter()
    g = chain.run(cfg, "generate", progress=False).manifest
    res["generate"] = {"images": g.info["num_samples"], "nfe": g.info["nfe"], "seconds": round(time.perf_counter() - t0, 2),
                       "images_per_s": round(g.info["num_samples"] / (time.perf_counter() - t0), 1)}  # fmt: skip

    for precision in ("no", "bf16"):
        c = load_config(None, [
            f"store={store}", "generate.batch_size=1024", "generate.shard_size=1024",
            f"distill.steps={args.steps}", f"distill.batch_size={args.batch}", f"distill.mixed_precision={precision}",
            f"distill.checkpoint_every={args.steps}", f"distill.sample_every={args.steps}", "distill.num_workers=4",
        ])  # fmt: skip
        t0 = time.perf_counter()
        m = chain.run(c, "distill", progress=False).manifest
        wall = time.perf_counter() - t0
        out = Path(store) / "distill" / m.key
        rows = pq.read_table(out / "metrics.parquet").to_pylist()
        steady = [r["samples_per_s"] for r in rows[len(rows) // 2 :]]
        res[f"distill_{precision}"] = {
            "steps": args.steps, "batch": args.batch, "wall_s": round(wall, 1),
            "samples_per_s_median": round(sorted(steady)[len(steady) // 2], 1),
            "final": {k: round(v, 5) for k, v in rows[-1].items() if k.startswith("loss")},
            "all_finite": all(v == v and abs(v) != float("inf") for r in rows for v in r.values()),
            **one_step_quality(out / "generator"),
        }  # fmt: skip
        print(json.dumps(res, indent=2), flush=True)
    Path(args.out).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
