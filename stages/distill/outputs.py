"""What a distill run leaves in its output directory (and in each checkpoint): the networks as denoiser
directories, the sample grids, metrics.parquet, curves.png and, last, the manifest."""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors.torch import save_file

from dmd_core.dmd import SampleRNG
from dmd_core.faults import fault_point
from dmd_core.images import save_grid, training_curves_png
from dmd_core.loading import save_denoiser
from dmd_core.lora import LORA_DIR, fused_copy, has_lora, load_trainable_state, save_adapter

from ..config import PipelineConfig
from ..contract import Manifest, Plan, file_entry, stage_manifest, tree_entries
from ..files import tmp_sibling, write_bytes_atomic
from ..store import open_store
from .trainer import STREAM_SAMPLES, Trainer


def save_network(den, target: Path, adapter_only: bool = False) -> None:
    """``den`` as a denoiser directory; one with a LoRA adapter as its fused network in that directory and the
    adapter in ``lora/`` (peft's format), or with ``adapter_only`` (checkpoints: the teacher holds the rest) the
    adapter alone."""
    if not has_lora(den.unet):
        save_denoiser(den, target)
        return
    save_adapter(den.unet, target / LORA_DIR)
    if not adapter_only:
        save_denoiser(fused_copy(den), target)


def save_networks(nets: dict, best: dict | None, target: Path, adapter_only: bool = False) -> None:
    """generator/, generator_ema/, generator_best/ (with best.json) and fake_score/ as denoiser directories from
    ``nets`` (``Trainer.whole_networks``) and ``best`` (the best-so-far generator's state); ``adapter_only``:
    LoRA-trained networks as their adapters alone (``save_network``)."""
    gen, fake = nets["generator"], nets["fake_score"]
    save_network(gen, target / "generator", adapter_only)
    save_network(fake, target / "fake_score", adapter_only)
    if getattr(fake, "gan_head", None) is not None:  # DMD2's head, saved with the fake score
        save_file({k: v.contiguous() for k, v in fake.gan_head.state_dict().items()}, str(target / "fake_score" / "gan_head.safetensors"))
    if "ema" in nets:
        save_network(nets["ema"], target / "generator_ema", adapter_only)
    if best is not None:
        best_net = copy.deepcopy(gen)
        load_trainable_state(best_net.unet, {k: v.to(best_net.dtype) for k, v in best["state"].items()})
        save_network(best_net, target / "generator_best", adapter_only)
        (target / "best.json").write_text(json.dumps({k: best[k] for k in ("step", "probe_fd")}, indent=2) + "\n")


@torch.no_grad()
def sample_grid(tr: Trainer, path: Path, gen=None) -> None:
    """Fixed noise, 8 rows; one column per class (text-to-image: per prompt, the first 10), decoded to pixels,
    written by the main process. ``gen``: the generator to run (default the one training; sharded, every process
    runs it)."""
    C = min(tr.label_range, 10) if tr.takes_prompts else tr.num_classes
    n = 8 * (C or 8)
    rng = SampleRNG(tr.d.seed, STREAM_SAMPLES, 0, range(n), tr.acc.device)
    z = rng.randn(tr.shape)
    labels = torch.arange(n, device=tr.acc.device) % C if C else None
    gen = tr.unwrap(tr.gen) if gen is None else gen.to(tr.acc.device)
    with tr.acc.autocast():
        x = tr.to_pixels(tr.steps(gen, z, labels, lambda j: rng.randn(tr.shape)).float())
    if tr.acc.is_main_process:
        save_grid(x, path, nrow=C or 8)


def write_metrics(rows: list[dict], path: Path) -> None:
    """One row per logged step; columns that only some rows have (the probe's) are null elsewhere."""
    names = list(dict.fromkeys(k for r in rows for k in r))
    tmp = tmp_sibling(path)
    pq.write_table(pa.Table.from_pylist([{k: r.get(k) for k in names} for r in rows]), tmp)
    os.replace(tmp, path)


def finalize(cfg: PipelineConfig, p: Plan, tr: Trainer, rows: list[dict], wall: float) -> Manifest | None:
    """The networks, metrics, final grid and curves in the output directory, then its manifest. Every process
    calls it (sharded networks are gathered whole); the main process writes and returns the manifest."""
    nets = tr.whole_networks()
    if not tr.acc.is_main_process:
        return None
    out = p.out_dir
    save_networks(nets, tr.best, out)
    write_metrics(rows, out / "metrics.parquet")
    final_grid = out / "samples" / f"step-{cfg.distill.steps:07d}.png"
    if not final_grid.is_file():  # rebuilding from the final checkpoint after samples/ was lost
        final_grid.parent.mkdir(parents=True, exist_ok=True)
        sample_grid(tr, final_grid, nets["generator"])  # sharded: the gathered copy, on the main process alone
    shutil.copyfile(final_grid, out / "samples.png")
    write_bytes_atomic(out / "curves.png", training_curves_png(rows))
    files = [e for sub in ("generator", "generator_ema", "generator_best", "fake_score", "samples") for e in tree_entries(out, sub)]
    # metrics.parquet holds timings and curves.png is drawn from them: records, so a deterministic retrain keeps the same digest
    files += [file_entry(out / "metrics.parquet", record=True), file_entry(out / "curves.png", record=True), file_entry(out / "samples.png"), file_entry(out / "config.yaml")]
    if tr.best is not None:
        files.append(file_entry(out / "best.json"))
    last = rows[-1] if rows else {}
    info = {
        "pairs_dir": p.inputs.get("pairs"),
        "teacher_path": p.inputs["teacher"],
        "steps": cfg.distill.steps,
        "num_processes": tr.world,
        "final": {k: v for k, v in last.items() if k.startswith(("loss", "grad"))},
        "samples_per_s": last.get("samples_per_s"),
        "ema": tr.ema is not None,
        "best": None if tr.best is None else {k: tr.best[k] for k in ("step", "probe_fd")},
    }
    if tr.lora:  # what each adapter adds (distill.*_lora_rank); their networks are saved fused, the adapters in lora/
        info["lora"] = tr.lora
    m = stage_manifest(cfg, p, files, info, wall)
    fault_point("distill.before-manifest")
    open_store(cfg.store).save_manifest(m, out)
    return m

