"""Checks that more than one stage makes of its settings against the teacher and the machine."""

from __future__ import annotations

import torch

from dmd_core.errors import InputError

from .contract import Teacher


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


def check_guidance(section: str, guidance_scale: float, teacher: Teacher) -> None:
    """Guidance needs a condition to drop: classes or prompts."""
    if guidance_scale != 1.0 and not teacher.guidable:
        raise InputError(f"{section}.guidance_scale != 1 needs a class-conditional or text-to-image teacher. Fix: --set {section}.guidance_scale=1")
