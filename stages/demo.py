"""``dmd demo``: the pipeline on the embedded default (digits), run stage after stage."""

from __future__ import annotations

import logging
from pathlib import Path

from . import generate
from .config import load_config

log = logging.getLogger("dmd")


def run(progress: bool = True) -> str:
    cfg = load_config()
    m = generate.run(cfg, progress=progress)
    out = Path(cfg.store) / generate.STAGE / m.key
    log.info(
        "generate: %d pairs in %d shards (%s, %d network evaluations each) -> %s",
        m.info["num_samples"], m.info["num_shards"], m.info["solver"], m.info["nfe"], out,
    )  # fmt: skip
    return str(out)
