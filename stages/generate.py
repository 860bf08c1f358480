"""Stage ``generate``: the teacher's ODE solutions y for seeded noise z, as WebDataset pair shards.

Output ``<store>/generate/<key>/``: ``pairs-%06d.tar`` shards, a ``.sha256`` beside each (for resume
before the manifest exists), ``config.yaml`` (resolved pipeline config) and ``manifest.json`` (last).
Under ``accelerate launch`` rank r writes shards i = r (mod world); shards are byte-identical whatever
the process count, since sample i's noise depends only on (seed, i).
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from dmd_core.denoisers import Denoiser, EDMDenoiser, VPDenoiser
from dmd_core.errors import InputError
from dmd_core.loading import load_denoiser, resolve_model_dir
from dmd_core.shards import sample_labels, sample_noise, shard_name, shard_ranges, write_shard
from dmd_core.solvers import heun_nfe, heun_sampler, pndm_nfe, pndm_sampler

from .config import GenerateConfig, PipelineConfig, dump_config
from .launch import run_or_reuse
from .progress import progress_bar
from .store import (
    Manifest,
    Timer,
    content_key,
    dir_digest,
    file_entry,
    sha256_file,
    write_text_atomic,
)

STAGE = "generate"
CODE_VERSION = "generate/1"  # bump when the bytes this stage writes change for the same inputs
log = logging.getLogger("dmd")


@dataclass
class GeneratePlan:
    out_dir: Path
    key: str
    teacher_dir: Path
    teacher_digest: str
    denoiser: Denoiser


def key_config(g: GenerateConfig) -> dict:
    """The config fields that determine the shards' bytes (thread count does not)."""
    return g.model_dump(exclude={"num_threads"})


def model_shape(den: Denoiser) -> tuple[int, int, int]:
    if den.param.image_shape:
        return tuple(den.param.image_shape)
    c = den.unet.config
    size = c.sample_size if isinstance(c.sample_size, int) else c.sample_size[0]
    return (c.in_channels, size, size)


def plan(cfg: PipelineConfig) -> GeneratePlan:
    """Validate inputs (loads the teacher: fails fast) and compute the content-addressed output dir."""
    g = cfg.generate
    teacher_dir = resolve_model_dir(cfg.teacher.path)
    den = load_denoiser(teacher_dir)
    if g.solver == "heun" and not isinstance(den, EDMDenoiser):
        raise InputError("generate.solver=heun needs an EDM teacher; this teacher is VP. Fix: --set generate.solver=pndm")
    if g.solver == "pndm" and not isinstance(den, VPDenoiser):
        raise InputError("generate.solver=pndm needs a VP teacher; this teacher is EDM. Fix: --set generate.solver=heun")
    if g.guidance_scale != 1.0 and den.num_classes == 0:
        raise InputError("generate.guidance_scale != 1 needs a class-conditional teacher. Fix: --set generate.guidance_scale=1")
    digest = dir_digest(teacher_dir)
    key = content_key(STAGE, key_config(g), {"teacher": digest}, CODE_VERSION)
    return GeneratePlan(Path(cfg.store) / STAGE / key, key, teacher_dir, digest, den)


def make_solver(den: Denoiser, g: GenerateConfig) -> tuple[Callable, int]:
    """(z, labels) -> y for the configured solver, and its number of network evaluations."""
    if g.solver == "heun":
        def solve(z, labels):
            return heun_sampler(lambda x, s: den(x, s, labels, g.guidance_scale), z, g.steps, den.sigma_min, den.sigma_max)

        return solve, heun_nfe(g.steps)
    return (lambda z, labels: pndm_sampler(den, z, g.steps, labels, g.guidance_scale)), pndm_nfe(den, g.steps)


def shard_is_valid(out_dir: Path, i: int) -> bool:
    path, side = out_dir / shard_name(i), out_dir / (shard_name(i) + ".sha256")
    if not path.is_file():
        return False
    ok = side.is_file() and side.read_text().strip() == sha256_file(path)
    if not ok:
        log.warning("shard %s does not match its checksum: rewriting it", path)
    return ok


def _write_shard_atomic(out_dir: Path, i: int, idx: range, z: np.ndarray, y: np.ndarray, labels) -> None:
    final = out_dir / shard_name(i)
    tmp = out_dir / f".{final.name}.tmp-{os.getpid()}"
    write_shard(tmp, idx, z, y, labels)
    # Checksum first, shard second: a shard under its final name always has its checksum beside it.
    write_text_atomic(out_dir / (final.name + ".sha256"), sha256_file(tmp) + "\n")
    os.replace(tmp, final)


def generate_shards(cfg: PipelineConfig, p: GeneratePlan, rank: int, world: int, device: torch.device, progress: bool) -> None:
    """Write the shards i = rank (mod world) that are missing or fail their checksum."""
    g = cfg.generate
    den = p.denoiser.to(device)
    solve, _ = make_solver(den, g)
    shape = model_shape(den)
    store_dtype = np.dtype(g.dtype)
    ranges = shard_ranges(g.num_samples, g.shard_size)
    todo = [i for i in range(rank, len(ranges), world) if not shard_is_valid(p.out_dir, i)]
    bar = progress_bar(
        STAGE, sum(len(ranges[i]) for i in todo), progress and rank == 0, unit="img",
        phase=f"{len(todo)} shards" + (f" on rank 0 of {world}" if world > 1 else ""),
    )  # fmt: skip
    pending: list[Future] = []
    with ThreadPoolExecutor(max_workers=1) as writer:  # encoding and writing overlap the next shard's compute
        for i in todo:
            idx = ranges[i]
            zs, ys, ls = [], [], []
            for start in range(0, len(idx), g.batch_size):
                b = idx[start : start + g.batch_size]
                # Round the noise to the storage dtype first, so the stored pair is exactly (z, ODE(z)).
                z = sample_noise(g.seed, b, shape).numpy().astype(store_dtype).astype(np.float32)
                labels = sample_labels(b, den.num_classes)
                y = solve(torch.from_numpy(z).to(device), None if labels is None else labels.to(device))
                zs.append(z.astype(store_dtype))
                ys.append(y.float().cpu().numpy().astype(store_dtype))
                ls.append(None if labels is None else labels.numpy())
                bar.update(len(b))
            labels_np = None if ls[0] is None else np.concatenate(ls)
            while len(pending) >= 2:
                pending.pop(0).result()
            pending.append(writer.submit(_write_shard_atomic, p.out_dir, i, idx, np.concatenate(zs), np.concatenate(ys), labels_np))
        for f in pending:
            f.result()
    bar.close()


def finalize(cfg: PipelineConfig, p: GeneratePlan, wall_time: float) -> Manifest:
    """Check every shard, then write manifest.json (last)."""
    g = cfg.generate
    ranges = shard_ranges(g.num_samples, g.shard_size)
    missing = [shard_name(i) for i in range(len(ranges)) if not (p.out_dir / shard_name(i)).is_file()]
    if missing:
        raise InputError(f"generate output {p.out_dir} is missing shards {missing[:5]}{'...' if len(missing) > 5 else ''}; rerun to resume")
    _, nfe = make_solver(p.denoiser, g)
    # Every shard's checksum was computed when it was written, or verified when the run resumed.
    files = [
        file_entry(p.out_dir / shard_name(i), len(r), (p.out_dir / f"{shard_name(i)}.sha256").read_text().strip())
        for i, r in enumerate(ranges)
    ]
    files.append(file_entry(p.out_dir / "config.yaml"))
    m = Manifest(
        stage=STAGE,
        key=p.key,
        code_version=CODE_VERSION,
        config=g.model_dump(),
        pipeline_config=cfg.model_dump(mode="json"),
        upstream={"teacher": p.teacher_digest},
        files=files,
        info={
            "teacher_path": str(p.teacher_dir),
            "parametrization": p.denoiser.param.kind,
            "solver": g.solver,
            "steps": g.steps,
            "nfe": nfe,
            "guidance_scale": g.guidance_scale,
            "num_samples": g.num_samples,
            "num_shards": len(ranges),
            "image_shape": list(model_shape(p.denoiser)),
            "num_classes": p.denoiser.num_classes,
            "dtype": g.dtype,
        },
        wall_time_s=round(wall_time, 3),
    )
    m.save(p.out_dir)
    return m


def _set_threads(g: GenerateConfig, world: int) -> None:
    torch.set_num_threads(g.num_threads or max(1, (os.cpu_count() or 1) // world))


def run(cfg: PipelineConfig, num_processes: int = 1, progress: bool = True) -> Manifest:
    """Make (or reuse) the pair shards for ``cfg``; returns the verified manifest."""
    timer = Timer()
    p = plan(cfg)

    def in_process() -> Manifest:
        _set_threads(cfg.generate, 1)
        generate_shards(cfg, p, 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu"), progress)
        return finalize(cfg, p, timer.seconds)

    return run_or_reuse(STAGE, p.out_dir, cfg, num_processes, in_process)


def run_distributed(cfg: PipelineConfig, progress: bool = True) -> Manifest | None:
    """The body of one process under ``accelerate launch``; rank 0 writes the manifest."""
    from accelerate import PartialState

    timer = Timer()
    state = PartialState(cpu=os.environ.get("DMD_FORCE_CPU") == "1" or not torch.cuda.is_available())
    _set_threads(cfg.generate, state.num_processes)
    p = plan(cfg)
    if state.is_main_process:
        p.out_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(p.out_dir / "config.yaml", dump_config(cfg))
    state.wait_for_everyone()
    generate_shards(cfg, p, state.process_index, state.num_processes, state.device, progress)
    state.wait_for_everyone()
    return finalize(cfg, p, timer.seconds) if state.is_main_process else None


def main() -> None:
    from .cli import stage_app

    stage_app("generate")()


if __name__ == "__main__":
    main()
