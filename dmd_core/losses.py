"""Losses, each a small function with its equation named (DESIGN.md, "The math")."""

from __future__ import annotations

import torch

from .denoisers import EDMDenoiser

Tensor = torch.Tensor


def edm_weight(sigma: Tensor, sigma_data: float) -> Tensor:
    """EDM's loss weight lambda(sigma) = 1/sigma^2 + 1/sigma_data^2 (Karras et al. 2022, Table 1)."""
    return 1 / sigma**2 + 1 / sigma_data**2


def edm_denoising_loss(
    den: EDMDenoiser, x: Tensor, sigma: Tensor, noise: Tensor, class_labels: Tensor | None = None
) -> Tensor:
    """E[ lambda(sigma) * ||D(x + sigma n; sigma) - x||^2 ] (EDM, Eq. 2 with Table 1's weight), per-pixel mean."""
    s = sigma.reshape(-1, 1, 1, 1).to(x.dtype)
    pred = den(x + s * noise, sigma, class_labels)
    return (edm_weight(s, den.sigma_data) * (pred - x) ** 2).mean()


def edm_training_sigmas(n: int, generator: torch.Generator, p_mean: float = -1.2, p_std: float = 1.2) -> Tensor:
    """Training noise levels ln(sigma) ~ N(P_mean, P_std^2) (EDM, Table 1)."""
    return (torch.randn(n, generator=generator, dtype=torch.float64) * p_std + p_mean).exp()
