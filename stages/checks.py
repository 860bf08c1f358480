"""Checks that more than one stage makes of its settings against the teacher and the machine."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import psutil
import torch

from dmd_core.errors import InputError
from dmd_core.text import read_prompt_file

from .config import PipelineConfig
from .contract import Teacher
from .files import digest_json, size_text
from .store import Store, open_store

# A batch holds at least this many float32 tensors of its samples' size at once (input, output, one activation
# and its gradient): a lower bound of what it needs, so a batch refused for it could never have run.
TENSORS_PER_SAMPLE = 4
SHARDS_IN_MEMORY = 3  # generate: the shard being filled and two being written


def check_precision(section: str, precision: str) -> None:
    if precision == "fp16" and not torch.cuda.is_available():
        raise InputError(f"{section}.precision=fp16 needs a CUDA GPU. Fix: --set {section}.precision=bf16 (or fp32) on CPU.")


def check_prompts(teacher: Teacher, prompts: str | None, section: str) -> None:
    """A teacher that takes prompts needs a prompt file; any other teacher must not be given one."""
    if teacher.takes_prompts and not prompts:
        raise InputError(
            f"the teacher {teacher.path} is text-to-image: {section}.prompts must name a prompt file. "
            f"Fix: --set {section}.prompts=PATH (a text file, one prompt per line, or a .parquet with a 'prompt' column)."
        )
    if prompts and not teacher.takes_prompts:
        raise InputError(f"{section}.prompts is set but the teacher {teacher.path} is not text-conditioned. Fix: drop {section}.prompts.")


def check_prompt_file(store: Store, path: str, column: str, section: str, labels: str | None = None, num_classes: int | None = None) -> None:
    """Every rule of ``read_prompt_file`` on a prompt file, once per content: the store remembers a file (its
    digest, with the column, labels and classes it was read with) that passed, so a rerun does not parse it again."""
    if not Path(path).is_file():  # no digest of a missing file or a folder: the read names what is wrong
        read_prompt_file(path, column, labels, num_classes, section)
    marker = f"prompts-{store.digest(path)[:32]}-{digest_json([column, labels, num_classes])[:16]}"
    if not store.noted(marker):
        read_prompt_file(path, column, labels, num_classes, section)
        store.note(marker)


def check_guidance(section: str, guidance_scale: float, teacher: Teacher) -> None:
    """Guidance needs a condition to drop: classes or prompts."""
    if guidance_scale != 1.0 and not teacher.guidable:
        raise InputError(f"{section}.guidance_scale != 1 needs a class-conditional or text-to-image teacher. Fix: --set {section}.guidance_scale=1")


def check_solver_steps(setting: str, solver: str, steps: int, teacher: Teacher) -> None:
    """PNDM takes at most one step per training timestep of the teacher (more, and diffusers runs them all at t = 0)."""
    T = teacher.num_timesteps
    if solver == "pndm" and teacher.param.kind == "vp" and steps > T:
        raise InputError(f"{setting}={steps} pndm steps exceed the teacher's {T} timesteps (its scheduler's num_train_timesteps). "
                         f"Fix: --set {setting}={min(50, T)} (at most {T}).")  # fmt: skip


def device_memory() -> tuple[int, str]:
    """(bytes, name) of the memory stages compute in: the first GPU's, else the machine's."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory, "GPU"
    return host_memory()


def host_memory() -> tuple[int, str]:
    return psutil.virtual_memory().total, "machine"


def check_fits(setting: str, value: int, need: int, what: str, memory: tuple[int, str]) -> None:
    """Refuse a setting whose own data (``need`` bytes, a lower bound) is more than all of ``memory``."""
    have, where = memory
    if need > have:
        raise InputError(
            f"{setting}={value} needs at least {size_text(need)} for {what} alone; the {where} has {size_text(have)}. "
            f"Fix: lower {setting} (to well under {max(1, value * have // need)}: the networks need memory too)."
        )


def check_memory(cfg: PipelineConfig, teacher: Teacher, stage: str, num_processes: int = 1) -> None:
    """distill: refuse a run whose predicted memory per device on ``num_processes`` processes (dmd_core.memory:
    weights, gradients, optimizer states and probed activations) is more than the device's free memory, naming
    settings that would fit. A configuration that fitted is remembered per device in the store, so a rerun or a
    cached run probes nothing."""
    if stage != "distill":
        return
    from dmd_core.memory import free_memory

    from .memory_plan import distill_device, distill_memory, refusal, step_settings

    device = distill_device()
    machine = [torch.cuda.get_device_name(0), torch.cuda.get_device_properties(0).total_memory] if device == "cuda" else ["cpu", host_memory()[0]]
    store = open_store(cfg.store)
    settings = step_settings(cfg, teacher, num_processes)  # its processes, optimizer and sharding among them
    marker = f"memory-fits-{digest_json([teacher.digest, repr(settings), cfg.distill.regression_loss, cfg.distill.lpips_resolution, *machine])[:32]}"
    if store.noted(marker):
        return
    try:
        plan, probes, settings = distill_memory(cfg, teacher, num_processes)
    except InputError:
        raise
    except Exception as e:  # a teacher the probe cannot run (an op fake tensors lack): train unplanned, as before
        logging.getLogger("dmd").warning("memory plan skipped: %s: %s", type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        return
    free = free_memory(device)
    if plan.total > free[0]:
        raise refusal(cfg, plan, probes, settings, free)
    store.note(marker)


def check_limits(cfg: PipelineConfig, teacher: Teacher, stage: str) -> None:
    """The bounds of the numeric settings of ``stage`` that depend on the teacher or the machine (config.py bounds the
    rest): solver steps against the teacher's timesteps, and each batch, shard or buffer against the memory it lives in."""
    image = math.prod(teacher.image_shape)  # values of one sample in model space
    widest = max(image, math.prod(teacher.pixel_shape()))  # latent teachers decode to pixels
    per_sample = TENSORS_PER_SAMPLE * 4 * widest
    if stage == "generate":
        g = cfg.generate
        check_solver_steps("generate.steps", g.solver, g.steps, teacher)
        batch = min(g.batch_size, g.shard_size, g.num_samples)
        check_fits("generate.batch_size", g.batch_size, batch * TENSORS_PER_SAMPLE * 4 * image, "its samples", device_memory())
        shard = min(g.shard_size, g.num_samples)
        pair = 2 * image * np.dtype(g.dtype).itemsize
        check_fits("generate.shard_size", g.shard_size, SHARDS_IN_MEMORY * shard * pair, f"{SHARDS_IN_MEMORY} shards of pairs", host_memory())
    elif stage == "distill":
        d = cfg.distill
        check_fits("distill.batch_size", d.batch_size, d.batch_size * per_sample, "its samples", device_memory())
        if d.regression_weight > 0:  # pairs: noise and image, float16 at the least
            check_fits("distill.shuffle_buffer", d.shuffle_buffer, d.shuffle_buffer * 2 * image * 2, "the buffered pairs", host_memory())
        if d.gan and d.real_data != "digits":  # one byte a value at the least (8-bit images)
            pixels = math.prod(teacher.pixel_shape())
            check_fits("distill.real_samples", d.real_samples, d.real_samples * pixels, "the real images", host_memory())
    elif stage == "evaluate":
        e = cfg.evaluate
        steps, setting = (e.teacher_steps, "evaluate.teacher_steps") if e.teacher_steps else (cfg.generate.steps, "generate.steps")
        check_solver_steps(setting, cfg.generate.solver, steps, teacher)
        check_fits("evaluate.batch_size", e.batch_size, e.batch_size * per_sample, "its samples", device_memory())
        check_fits("evaluate.speed_batch_size", e.speed_batch_size, e.speed_batch_size * per_sample, "its samples", device_memory())
    elif stage == "export":
        n = cfg.export.parity_samples
        check_fits("export.parity_samples", n, n * per_sample, "its samples", device_memory())
