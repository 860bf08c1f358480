"""Peak memory of generate, distill and evaluate as the number of prompts grows (toy text-to-image teacher).

    python benchmarks/prompt_scale.py [--counts 1000 10000 100000] [--out results/prompt_scale.json]

For each count N, a prompt file of N distinct prompts (the embedded teacher's phrasings of the ten digits,
numbered), used as both the training and the held-out prompts of ``data/digits-t2i.yaml`` with small stage
settings. Each stage runs in its own process (``python -m stages <stage>``) in a fresh store; its peak
resident memory is that process's ``ru_maxrss`` (read from ``wait4``), its time the wall clock. The first
stage (generate) encodes the prompts into the store; distill reads the same output and evaluate encodes
the held-out file once (the same prompts: the same output, so it encodes nothing either).

The last columns project the prompt embeddings to SD v1.5 (77 x 768) and SDXL (77 x 2048 + 1280 pooled)
in float32: what the store holds, and what a process held before the embeddings were streamed (the whole
table, up to 3 copies in distill).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
SD15_ROW, SDXL_ROW = 77 * 768 * 4, (77 * 2048 + 1280) * 4
SETTINGS = [
    "generate.num_samples=256", "generate.steps=10", "generate.shard_size=256", "generate.batch_size=128",
    "distill.steps=4", "distill.batch_size=16", "distill.checkpoint_every=4", "distill.sample_every=4", "distill.log_every=2",
    "distill.ema_decay=0", "evaluate.num_samples=200", "evaluate.batch_size=100", "evaluate.speed_batch_size=16",
    "evaluate.speed_repeats=1", "evaluate.prompt_labels=null",
]  # fmt: skip


def write_prompts(path: Path, n: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"prompt": [f"the digit {WORDS[i % 10]} number {i}" for i in range(n)]}), path)


def run_stage(stage: str, store: Path, prompts: Path) -> dict:
    """Peak RSS (MiB) and wall time (s) of one stage in its own process."""
    args = [sys.executable, "-m", "stages", stage, "--config", str(ROOT / "data" / "digits-t2i.yaml"), "-q",
            "--set", f"store={store}", "--set", f"generate.prompts={prompts}", "--set", f"evaluate.prompts={prompts}",
            *(a for s in SETTINGS for a in ("--set", s))]  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{stage} failed:\n{proc.stderr.read()[-3000:]}")
    return {"peak_rss_mib": usage.ru_maxrss / 1024, "wall_s": wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--counts", type=int, nargs="+", default=[1000, 10_000, 100_000])
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    rows = []
    print(f"{'prompts':>8} | {'stage':>8} | {'peak RSS MiB':>12} | {'wall s':>7} | {'SD v1.5 table GiB':>17} | {'SDXL table GiB':>14}")
    for n in a.counts:
        with tempfile.TemporaryDirectory() as tmp:
            prompts = Path(tmp) / "prompts.parquet"
            write_prompts(prompts, n)
            for stage in ("generate", "distill", "evaluate"):
                r = {"prompts": n, "stage": stage, **run_stage(stage, Path(tmp) / "store", prompts),
                     "sd15_table_gib": n * SD15_ROW / 2**30, "sdxl_table_gib": n * SDXL_ROW / 2**30}  # fmt: skip
                rows.append(r)
                print(f"{n:>8} | {stage:>8} | {r['peak_rss_mib']:>12.0f} | {r['wall_s']:>7.1f} | {r['sd15_table_gib']:>17.1f} | {r['sdxl_table_gib']:>14.1f}", flush=True)
    for stage in ("generate", "distill", "evaluate"):
        peaks = [r["peak_rss_mib"] for r in rows if r["stage"] == stage]
        print(f"{stage}: peak RSS at {a.counts[-1]} prompts / at {a.counts[0]}: {peaks[-1] / peaks[0]:.3f}")
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
