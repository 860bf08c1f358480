"""Wall time of a fully cached `dmd run`: the digits teacher against a ~0.7 GB teacher, side by side.

    python benchmarks/cached_rerun.py [--repeats 3] [--work DIR]

Rerunning from cache is what teams do most ("re-evaluate without regenerating or retraining"), so a
cached run must cost about the same whatever the teacher's size: target ratio (large / digits) <= 1.3.
The large teacher is a randomly initialised class-conditional UNet2DModel with 1x8x8 inputs and
channels (512, 1024) (about 180 M parameters, 0.7 GB of safetensors); sample counts are tiny, since only
the cached rerun is timed. Each pipeline runs once to fill its store, then `dmd run` (its own local
Prefect server, one PREFECT_HOME per teacher) is timed `--repeats` times, alternating the teachers.
Every process appends the bytes it hashed to a log (``DMD_HASH_LOG``), reported per run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
TINY = {
    "generate": {"num_samples": 16, "steps": 2, "shard_size": 16, "batch_size": 16},
    "distill": {"steps": 1, "batch_size": 2, "regression_loss": "pseudo_huber", "checkpoint_every": 1, "sample_every": 1, "log_every": 1, "shuffle_buffer": 4},
    "evaluate": {"num_samples": 80, "batch_size": 40, "features": "digits", "classifier": str(ROOT / "data" / "classifier"), "speed_batch_size": 4, "speed_repeats": 1},
    "export": {"parity_samples": 2},
}


def large_teacher(path: Path) -> int:
    """A random ~0.7 GB EDM teacher in the denoiser layout; returns its size in bytes."""
    import torch
    from diffusers import UNet2DModel

    from dmd_core.denoisers import EDMDenoiser, Parametrization
    from dmd_core.loading import save_denoiser

    if not (path / "denoiser.json").is_file():
        torch.manual_seed(0)
        unet = UNet2DModel(
            sample_size=8, in_channels=1, out_channels=1, layers_per_block=2, block_out_channels=(512, 1024),
            down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"), num_class_embeds=11,
        )  # fmt: skip
        param = Parametrization(kind="edm", num_classes=10, null_class=10, image_shape=(1, 8, 8))
        save_denoiser(EDMDenoiser(unet, param), path)
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def dmd_run(config: Path, home: Path, hash_log: Path) -> float:
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false", DMD_HASH_LOG=str(hash_log))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", "from flows.cli import main; main()", "run", "--config", str(config)],
                          cwd=ROOT, env=env, capture_output=True, text=True)  # fmt: skip
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"dmd run --config {config} failed:\n{proc.stderr[-3000:]}")
    return seconds


def hashed_bytes(log: Path) -> int:
    total = sum(int(line.split()[1]) for line in log.read_text().splitlines()) if log.is_file() else 0
    log.unlink(missing_ok=True)
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--work", type=Path, default=None, help="working directory (default: a new temporary one)")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="dmd-cached-rerun-"))
    work.mkdir(parents=True, exist_ok=True)
    teachers = {"digits": ROOT / "data" / "teacher", "large": work / "large-teacher"}
    sizes = {"digits": sum(f.stat().st_size for f in teachers["digits"].iterdir() if f.is_file()), "large": large_teacher(teachers["large"])}
    configs = {}
    for name, teacher in teachers.items():
        cfg = {"store": str(work / f"store-{name}"), "teacher": {"path": str(teacher)}, **TINY}
        configs[name] = work / f"{name}.yaml"
        configs[name].write_text(yaml.safe_dump(cfg))
    result: dict = {"teacher_bytes": sizes, "first_run_s": {}, "first_run_hashed_bytes": {}, "cached_run_s": {n: [] for n in teachers}, "cached_run_hashed_bytes": {n: [] for n in teachers}}
    log = work / "hashed.log"
    for name in teachers:
        result["first_run_s"][name] = round(dmd_run(configs[name], work / f"home-{name}", log), 1)
        result["first_run_hashed_bytes"][name] = hashed_bytes(log)
    for r in range(args.repeats):
        for name in (("digits", "large") if r % 2 == 0 else ("large", "digits")):
            result["cached_run_s"][name].append(round(dmd_run(configs[name], work / f"home-{name}", log), 2))
            result["cached_run_hashed_bytes"][name].append(hashed_bytes(log))
    med = {n: statistics.median(v) for n, v in result["cached_run_s"].items()}
    result["cached_run_median_s"] = med
    result["ratio_large_over_digits"] = round(med["large"] / med["digits"], 3)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
