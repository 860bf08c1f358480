"""``dmd demo``: the pipeline on the embedded default (digits), run stage after stage."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from . import distill, evaluate, export, generate
from .config import load_config

log = logging.getLogger("dmd")


def run(progress: bool = True) -> str:
    cfg = load_config()
    g = generate.run(cfg, progress=progress)
    log.info(
        "generate: %d pairs in %d shards (%s, %d network evaluations each) -> %s",
        g.info["num_samples"], g.info["num_shards"], g.info["solver"], g.info["nfe"],
        Path(cfg.store) / generate.STAGE / g.key,
    )  # fmt: skip
    d = distill.run(cfg, progress=progress)
    out = Path(cfg.store) / distill.STAGE / d.key
    final = d.info["final"]
    log.info(
        "distill: %d steps, final loss_dm %.4f, loss_reg %.4f, loss_fake %.4f -> %s (sample grid: %s)",
        d.info["steps"], final.get("loss_dm", float("nan")), final.get("loss_reg", float("nan")),
        final.get("loss_fake", float("nan")), out, out / "samples.png",
    )  # fmt: skip
    e = evaluate.run(cfg, progress=progress)
    out = Path(cfg.store) / evaluate.STAGE / e.key
    print(evaluate.results_table(e), file=sys.stderr)
    log.info("evaluate: %s (grid: %s)", out, out / "grid.png")
    x = export.run(cfg, progress=progress)
    out = Path(cfg.store) / export.STAGE / x.key
    log.info("export: %s (model card: %s; ONNX max |diff| %.1e)", out, out / "README.md", x.info.get("onnx", {}).get("max_abs_diff", float("nan")))
    return str(out)
