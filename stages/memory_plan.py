"""Distill's memory plan (dmd_core.memory) for a config and its teacher: the table ``dmd plan --memory`` prints, and
the check that refuses, before anything runs, a distill run that does not fit the device's free memory, naming the
settings that would make it fit."""

from __future__ import annotations

import dataclasses
import functools
import math

import torch

from dmd_core.errors import InputError
from dmd_core.lora import LoraSettings
from dmd_core.memory import DMDProbes, StepMemory, StepSettings, dmd_step, gib, held_modules, largest_batch, quiet_diffusers

from .config import MAX_BATCH, DistillConfig, PipelineConfig
from .contract import Teacher

LORA_RANK = 64  # the rank the refusal suggests: DMD2 and the diffusers LoRA examples use 64 for SD-size networks
# A suggested setting's plan takes at most this share of the free memory: the rest is the process's own, and on a GPU
# the kernels' workspaces (cuDNN's convolutions, attention backward), which are no op's output: the plan was 3-27%
# under the peaks measured on an H100 (README "Fitting a teacher on your GPUs").
HEADROOM = {"cpu": 0.9, "cuda": 0.75}


def distill_device() -> str:
    """Where distill trains: Accelerate's default device."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def lora(d: DistillConfig, rank: int | None) -> LoraSettings | None:
    return None if rank is None else LoraSettings(rank, d.lora_alpha, d.lora_dropout, tuple(d.lora_target_modules) if d.lora_target_modules else None)


def step_settings(cfg: PipelineConfig, teacher: Teacher, num_processes: int = 1) -> StepSettings:
    """The distill settings as the memory model takes them, on ``num_processes`` processes (`dmd distill -n`)."""
    d = cfg.distill
    regression = d.regression_weight > 0
    pair_bytes = 2 * math.prod(teacher.image_shape) * torch.finfo(getattr(torch, cfg.generate.dtype)).bits // 8 if regression else 0
    return StepSettings(
        batch=d.batch_size, regression=regression, distribution_matching=d.dm_weight > 0, guidance_scale=float(d.guidance_scale),
        mixed_precision=d.mixed_precision, gradient_checkpointing=d.gradient_checkpointing, frozen_dtype=getattr(torch, d.frozen_dtype),
        generator_lora=lora(d, d.generator_lora_rank), fake_lora=lora(d, d.fake_lora_rank), ema=d.ema_decay > 0, gan=d.gan,
        accumulation=d.gradient_accumulation_steps, data_bytes_per_sample=pair_bytes, optimizer=d.optimizer,
        processes=num_processes, sharding=d.sharding,
    )  # fmt: skip


def distill_probes(cfg: PipelineConfig, teacher: Teacher) -> DMDProbes:
    """The probes of ``teacher`` as distill runs it: the real score (text-to-image: with a one-prompt table), the
    frozen modules distill keeps (a latent teacher's VAE in distill.frozen_dtype, LPIPS with a random backbone: the
    same shapes as the ImageNet one, no download), and the regression loss when it holds networks (LPIPS)."""
    d = cfg.distill
    den = teacher.load("cpu", [""] if teacher.takes_prompts else None)

    @functools.lru_cache(maxsize=4)
    def decoder(ckpt: bool, dtype: torch.dtype):
        if not teacher.latent:
            return None
        with quiet_diffusers():  # its advice on casting a loaded VAE: distill casts it the same way
            return teacher.pixel_decoder("cpu", ckpt, dtype)

    @functools.lru_cache(maxsize=1)
    def lpips():
        from dmd_core.losses import LPIPSLoss

        return LPIPSLoss(d.lpips_net, random_backbone=True)

    def extras(s: StepSettings):
        decode = decoder(s.gradient_checkpointing, s.frozen_dtype)
        frozen = held_modules(decode) if decode is not None else []
        if d.regression_loss != "lpips" or not s.regression:  # pseudo-Huber, L2: a few tensors per sample, no network
            return None, frozen
        from dmd_core.losses import DecodedLoss

        loss = DecodedLoss(lpips(), decode, d.lpips_resolution) if decode is not None else lpips()
        return loss, [*frozen, lpips()]

    from .distill.sharding import shard_units

    return DMDProbes(den, extras, units=shard_units)


def shardable(d: DistillConfig) -> bool:
    """Whether the config would take distill.sharding=fsdp (DistillConfig refuses it with some settings)."""
    try:
        type(d).model_validate({**d.model_dump(), "sharding": "fsdp"})
    except ValueError:
        return False
    return True


def candidates(d: DistillConfig, s: StepSettings, alone: bool = False) -> list[tuple[str, StepSettings]]:
    """Settings that lower the memory, each added to the ones before (``alone``: each by itself): gradient
    checkpointing, a bfloat16 frozen score, bf16 mixed precision, FSDP (on more than one process), 8-bit optimizer
    states (on CUDA, unsharded), LoRA adapters; only those not already set. LoRA last: it changes what trains, the others how."""
    out: list[tuple[str, StepSettings]] = []
    steps = [
        ("distill.gradient_checkpointing=true", not s.gradient_checkpointing, {"gradient_checkpointing": True}),
        ("distill.frozen_dtype=bfloat16", s.frozen_dtype == torch.float32, {"frozen_dtype": torch.bfloat16}),
        ("distill.mixed_precision=bf16", s.mixed_precision == "no", {"mixed_precision": "bf16"}),
        ("distill.sharding=fsdp", s.processes > 1 and s.sharding == "none" and shardable(d), {"sharding": "fsdp"}),
        ("distill.optimizer=adamw8bit", distill_device() == "cuda" and s.optimizer == "adamw" and s.sharding == "none", {"optimizer": "adamw8bit"}),
        (f"distill.generator_lora_rank={LORA_RANK} and distill.fake_lora_rank={LORA_RANK}", s.generator_lora is None and s.fake_lora is None,
         {"generator_lora": lora(d, LORA_RANK), "fake_lora": lora(d, LORA_RANK)}),
    ]  # fmt: skip
    names: list[str] = []
    base = s
    for name, applies, change in steps:
        if applies and not (name.endswith("adamw8bit") and not alone and s.sharding == "fsdp"):  # DistillConfig refuses the two together
            s = dataclasses.replace(base if alone else s, **change)
            names = [name] if alone else [*names, name]
            out.append((" and ".join(names), s))
    return out


def fitting(d: DistillConfig, probes: DMDProbes, s: StepSettings, free: int, most: int = 2) -> list[str]:
    """What would fit in ``HEADROOM`` of ``free`` bytes, each with its predicted memory: up to ``most`` of the
    ``candidates`` at the configured batch, and the largest power-of-two batch with the settings as they are (with
    all of the candidates, when neither fits)."""
    have, found = int(free * HEADROOM[distill_device()]), []
    changes = candidates(d, s)
    for name, other in changes:
        plan = dmd_step(probes, other)
        if plan.total <= have:
            found.append(f"with {name}: {gib(plan.total)}")
            if len(found) == most:
                break
    bases = [("", s)] + ([(f" and {changes[-1][0]}", changes[-1][1])] if changes and not found else [])
    for extra, base in bases:
        at = lambda b: dmd_step(probes, dataclasses.replace(base, batch=b))  # noqa: E731
        batch = largest_batch(at, have, min(s.batch - 1, MAX_BATCH))
        if batch:
            batch = 2 ** int(math.log2(batch))
            found.append(f"with distill.batch_size={batch}{extra}: {gib(at(batch).total)}")
            break
    return found


def distill_memory(cfg: PipelineConfig, teacher: Teacher, num_processes: int = 1) -> tuple[StepMemory, DMDProbes, StepSettings]:
    """The plan of one distill iteration per device on ``num_processes`` processes, its probes and settings."""
    probes, s = distill_probes(cfg, teacher), step_settings(cfg, teacher, num_processes)
    return dmd_step(probes, s), probes, s


def refusal(cfg: PipelineConfig, plan: StepMemory, probes: DMDProbes, s: StepSettings, free: tuple[int, str]) -> InputError:
    """The one-line error of a run that does not fit, naming what would make it fit."""
    have, where = free
    fixes = fitting(cfg.distill, probes, s, have)
    fix = "; or ".join(fixes) if fixes else "a device with more memory (no batch size or memory setting fits this teacher here)"
    return InputError(
        f"distill needs about {gib(plan.total)} per device at distill.batch_size={s.batch}{f' on {s.processes} processes' if s.processes > 1 else ''} "
        f"(predicted, at the {plan.peak_phase}'s peak; "
        f"`dmd plan --memory` shows the table), more than the {gib(have)} free ({where}). Fix: {fix}."
    )
