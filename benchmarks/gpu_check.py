"""The CUDA path on a GPU machine: generate throughput, distill in fp32 and bf16, quality of the result.

    python benchmarks/gpu_check.py --out results.json [--steps 300] [--batch 256]
    python benchmarks/gpu_check.py --out results.json --only t2i     # data/digits-t2i.yaml, all stages
    python benchmarks/gpu_check.py --out results.json --model cifar  # CIFAR-size teacher: precisions, compile, FLOP/s (gpu_cifar.py)
    python benchmarks/gpu_check.py --out results.json --parts memory # distill's memory settings at SD v1.5 size, measured and planned
    python benchmarks/gpu_check.py --out results.json --parts optimizer8bit  # distill.optimizer=adamw8bit: trains, resumes exactly

Uses the embedded digits default (or the text-to-image one) with a temporary store. Prints and writes
one JSON object.

``--parts memory`` (alone): one DMD iteration of SD v1.5's UNet (random weights, 512 x 512, batch 4, bf16 autocast,
CFG 3) with each of distill's memory settings (MEMORY_OPTIONS: full, LoRA 64, 8-bit AdamW, gradient checkpointing,
DDP x2, FSDP x2, FSDP x2 with checkpointing), its peak per process (``torch.cuda.max_memory_allocated``) beside
dmd_core.memory's prediction (benchmarks/sd15_memory.py, ``options``; on one GPU the 2-process rows run rank 0 under
torch's fake process group). Without a GPU it runs the same code at a tiny size on the CPU (a smoke run).
``--parts optimizer8bit`` (alone): the digits default distilled with bitsandbytes' 8-bit AdamW for 20 steps, and
again as 10 steps resumed to 20 from the first run's step-10 checkpoint: the two generators must be equal bit for bit,
the losses finite; beside them the same 20 steps with torch's AdamW (the final losses of both). Without a GPU it runs
with distill.optimizer=adamw (bitsandbytes' 8-bit AdamW is refused on the CPU): a smoke run of the same path.

The GPU machine's Python lacks diffusers, webdataset, pydantic, lpips and bitsandbytes: carry them as wheels
(/work/.library/device/README.md), bitsandbytes trimmed to the CUDA 13.0 library its torch loads (43 MB -> 7 MB;
the working tree and the wheels travel within 64 MiB). Here, once, in the repository's root:

    echo /.whl/ >> .git/info/exclude
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .whl diffusers==0.42.1 webdataset==1.0.2 braceexpand==0.1.7 \
        pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 lpips==0.1.4 bitsandbytes==0.50.2
    zip -d .whl/bitsandbytes-*.whl 'bitsandbytes/libbitsandbytes_cuda1[12]*' 'bitsandbytes/libbitsandbytes_rocm*'

and the device run (carry [".whl"], about 5 minutes):

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site:$PWD || exit; PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py --parts memory --out $OUT/memory.json
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


MEMORY_OPTIONS = ("full", "lora64", "adamw8bit", "checkpointing", "ddp2", "fsdp2", "fsdp2_checkpointing")


def memory_check(res: dict, save=lambda res: None, batch: int = 4, repeats: int = 2) -> None:
    """SD v1.5's DMD iteration with each of MEMORY_OPTIONS: measured peak per process and the plan's prediction
    (sd15_memory.py's options rows), ``save(res)`` after each; tiny configs on the CPU."""
    from sd15_memory import option_rows

    device = "cuda" if torch.cuda.is_available() else "cpu"
    res["memory"] = {"configs": "SD v1.5 (random weights)" if device == "cuda" else "tiny (smoke run)", "options": []}
    rows = res["memory"]["options"]
    option_rows(device == "cpu", device, list(MEMORY_OPTIONS), batch, repeats, save=lambda row: (rows.append(row), save(res)))


def optimizer8bit_check(store: str, res: dict, steps: int = 20) -> None:
    """distill.optimizer=adamw8bit on the digits default: a run of ``steps``, and a run of ``steps`` // 2 resumed from
    the first's middle checkpoint, equal bit for bit; the final losses beside torch's AdamW's (module docstring)."""
    from safetensors.torch import load_file

    kind = "adamw8bit" if torch.cuda.is_available() else "adamw"
    half = steps // 2
    common = [f"store={store}", "generate.num_samples=512", "generate.batch_size=512", "generate.shard_size=512", "distill.batch_size=64",
              f"distill.checkpoint_every={half}", f"distill.sample_every={steps}", f"distill.steps={steps}", "distill.keep_checkpoints=4"]  # fmt: skip
    outs = {}
    for name, sets in (("whole", [f"distill.optimizer={kind}"]), ("adamw", ["distill.optimizer=adamw"])):
        m = chain.run(load_config(None, [*common, *sets]), "distill", progress=False).manifest
        outs[name] = Path(store) / "distill" / m.key
    ckpt = outs["whole"] / "checkpoints" / f"step-{half:07d}"
    m = chain.run(load_config(None, [*common, f"distill.optimizer={kind}", f"distill.resume_from={ckpt}", f"store={store}-resumed"]), "distill", progress=False).manifest
    resumed = Path(f"{store}-resumed") / "distill" / m.key
    weights = lambda out: load_file(str(out / "generator" / "diffusion_pytorch_model.safetensors"))  # noqa: E731
    a, b = weights(outs["whole"]), weights(resumed)
    rows = {name: pq.read_table(out / "metrics.parquet").to_pylist() for name, out in outs.items()}
    res["optimizer8bit"] = {
        "optimizer": kind, "steps": steps,
        "resumed_equal": a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a),
        "max_abs_diff_resumed": max((a[k].double() - b[k].double()).abs().max().item() for k in a),
        "all_finite": all(v == v and abs(v) != float("inf") for r in rows["whole"] for v in r.values() if isinstance(v, float)),
        "final": {name: {k: round(v, 5) for k, v in r[-1].items() if k.startswith("loss")} for name, r in rows.items()},
        "checkpoint_mib": round(sum(f.stat().st_size for f in (ckpt / "accelerate").rglob("*") if f.is_file()) / 2**20, 2),
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--only", choices=["digits", "t2i"], default="digits")
    ap.add_argument("--model", choices=["digits", "cifar"], default="digits", help="cifar: the CIFAR-size speed check (benchmarks/gpu_cifar.py)")
    ap.add_argument("--parts", default="generate,iteration,one_step",
                    help="memory (any model, alone): distill's memory settings at SD v1.5 size, measured and planned; optimizer8bit (alone): 8-bit AdamW trains and resumes exactly; cifar: comma-separated parts: generate, iteration (fp32, bf16, bf16 compiled), iteration-eager (fp32, bf16), "
                         "iteration-bf16 (bf16, bf16 compiled, each profiled), iteration-cudagraphs (bf16, bf16 compiled as CUDA graphs, each profiled), profile (torch.profiler: bf16 iteration and generate), one_step")
    ap.add_argument("--generate-samples", type=int, default=None,
                    help="cifar: images per generate run (default: 1,024-2,048 per precision); with it, only tf32 and bf16 run, each cold then warm")
    args = ap.parse_args()
    store = tempfile.mkdtemp(prefix="dmd-gpu-")
    res: dict = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu", "torch": torch.__version__}
    if "memory" in args.parts.split(","):
        memory_check(res, save=lambda r: Path(args.out).write_text(json.dumps(r, indent=2)))
        print(json.dumps(res, indent=2), flush=True)
        return
    if "optimizer8bit" in args.parts.split(","):
        optimizer8bit_check(store, res)
        print(json.dumps(res, indent=2), flush=True)
        Path(args.out).write_text(json.dumps(res, indent=2))
        return
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
