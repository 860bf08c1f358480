"""Compute precision of the network calls (the solver's ODE state stays float64 whatever is chosen).

- ``fp32``: true float32 (TF32 off for matmuls and cuDNN convolutions), EDM's choice for sampling;
- ``tf32``: TensorFloat-32 tensor cores on Ampere and later GPUs (PyTorch's cuDNN default); on CPU the same as fp32;
- ``bf16`` / ``fp16``: autocast (fp16 on a GPU only).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Literal, get_args

import torch

Precision = Literal["fp32", "tf32", "bf16", "fp16"]  # the config fields generate.precision and evaluate.precision
PRECISIONS = get_args(Precision)
AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


@contextlib.contextmanager
def compute_precision(precision: str, device: torch.device | str) -> Iterator[None]:
    """Network calls inside run at ``precision``; the TF32 switches are restored on exit."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = precision == "tf32"
    try:
        if precision in AUTOCAST:
            with torch.autocast(torch.device(device).type, dtype=AUTOCAST[precision]):
                yield
        else:
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def at_precision(fn: Callable, precision: str, device: torch.device | str) -> Callable:
    """``fn`` with every call inside ``compute_precision``."""

    def call(*args, **kwargs):
        with compute_precision(precision, device):
            return fn(*args, **kwargs)

    return call


def difference(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    """max and mean |a - b| (float64)."""
    d = (a.double() - b.double()).abs()
    return {"max_abs": float(d.max()), "mean_abs": float(d.mean())}
