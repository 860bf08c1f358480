"""Distill's peak memory against the size of the GAN's real data (issue 28: flat in the number of images).

    python benchmarks/real_data_scale.py [--sizes 500 8000] [--steps 2] [--work DIR]

For each size, a WebDataset of that many random 64x64 PNGs with captions (8 tar shards) is written for a
tiny random Stable-Diffusion-layout teacher (tests/conftest.py's, 1x64x64 pixels, 4x32x32 latents), and
`dmd distill` runs a few steps with the GAN term on all of them (distill.gan=true, distill.real_samples
above the count; no pairs: distill.regression_weight=0) in a fresh store, as a subprocess whose peak RSS
(its own, from os.wait4) and wall time are measured. The run includes the real data's check, its encoding
into the store (stages/distill/real_latents.py), the captions' prompt embeddings and the training steps.
Prints one JSON row per size and the ratio of the largest peak to the smallest.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
SHARDS, LATENT = 8, 32  # 8 tar shards; latents 4 x 32 x 32, images 1 x 64 x 64


def write_real_set(folder: Path, n: int, words: list[str], seed: int = 0) -> None:
    """``n`` random 64x64 grayscale PNGs, each with a caption, over SHARDS tar shards."""
    import webdataset as wds
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    per = -(-n // SHARDS)
    for s in range(SHARDS):
        with wds.TarWriter(str(folder / f"real-{s:06d}.tar")) as sink:
            for i in range(s * per, min(n, (s + 1) * per)):
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (2 * LATENT, 2 * LATENT), dtype=np.uint8), mode="L").save(buf, format="PNG")
                caption = " ".join(rng.choice(words, 4))
                sink.write({"__key__": f"{i:08d}", "png": buf.getvalue(), "prompt.txt": caption.encode()})


def run_distill(config: Path) -> tuple[float, float]:
    """(peak RSS in MiB, wall seconds) of `dmd distill` on ``config`` in a subprocess."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "stages", "distill", "--config", str(config), "-q"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"dmd distill failed ({proc.returncode}):\n{err.decode(errors='replace')[-3000:]}")
    return usage.ru_maxrss / 1024, time.perf_counter() - t0  # ru_maxrss is in KiB on Linux


def main() -> None:
    from conftest import SD_WORDS, make_sd_teacher

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[500, 8000])
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--work", type=Path, default=None, help="keep the data and stores here (default: a temporary folder)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        teacher = work / "teacher"
        if not (teacher / "model_index.json").is_file():
            make_sd_teacher(teacher, latent_size=LATENT)
        (work / "prompts.txt").write_text("the digit 7\na handwritten 3\n")
        rows = []
        for n in args.sizes:
            real = work / f"real-{n}"
            if not real.is_dir():
                write_real_set(real, n, SD_WORDS)
            cfg = {
                "store": str(work / f"store-{n}"),
                "teacher": {"path": str(teacher)},
                "generate": {"prompts": str(work / "prompts.txt")},
                "distill": {"gan": True, "regression_weight": 0.0, "real_data": str(real), "real_samples": 10 * n, "steps": args.steps,
                            "batch_size": 4, "checkpoint_every": args.steps, "sample_every": args.steps, "log_every": 1, "num_threads": 2},
            }  # fmt: skip
            config = work / f"distill-{n}.yaml"
            config.write_text(yaml.safe_dump(cfg))
            peak, wall = run_distill(config)
            data_mib = sum(f.stat().st_size for f in real.iterdir()) / 2**20
            rows.append({"images": n, "real_data_mib": round(data_mib, 1), "peak_rss_mib": round(peak, 1), "wall_s": round(wall, 1)})
            print(json.dumps(rows[-1]), flush=True)
        print(json.dumps({"peak_ratio_largest_to_smallest": round(rows[-1]["peak_rss_mib"] / rows[0]["peak_rss_mib"], 3)}))


if __name__ == "__main__":
    main()
