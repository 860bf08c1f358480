"""One DMD iteration, written as the paper's Algorithm 1 (Yin et al. 2024) with DESIGN.md's details.

    x = G(z)                                   one step from noise
    loss_G = loss_DM(x) + lambda_reg * l(G(z_ref), y_ref)
    loss_fake = denoising loss of mu_fake on stopgrad(x)

The three networks are denoisers (``dmd_core.denoisers``): the generator and the fake score are
trainable copies of the teacher; the real score is the frozen teacher. Randomness comes from a
``SampleRNG``: every draw of sample i at step s depends only on (seed, s, i), so a batch split over
processes draws exactly what one process would.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .denoisers import Denoiser, Parametrization, karras_sigmas
from .losses import distribution_matching_loss, edm_weight, eps_mse_loss
from .shards import sample_seed

Tensor = torch.Tensor
NUM_LEVELS = 1000  # T: VP's training timesteps; for EDM the size of the Karras sigma grid


class SampleRNG:
    """Per-sample generators seeded by (seed, stream, step, global sample index)."""

    def __init__(self, seed: int, stream: int, step: int, indices: range | list[int], device: torch.device | str = "cpu"):
        self.gens = [torch.Generator().manual_seed(sample_seed(seed, stream, step, i)) for i in indices]
        self.device = device

    def randn(self, shape: tuple[int, ...]) -> Tensor:
        return torch.stack([torch.randn(shape, generator=g) for g in self.gens]).to(self.device)

    def randint(self, low: int, high: int) -> Tensor:
        """Integers uniform in [low, high), one per sample."""
        return torch.cat([torch.randint(low, high, (1,), generator=g) for g in self.gens]).to(self.device)


def noise_levels(param: Parametrization, t: Tensor, alphas_cumprod: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """(alpha_t, sigma_t, level) for integer t in [0, T): level is what the denoiser takes.

    EDM: alpha = 1, sigma = the t-th of T Karras sigmas, smallest first (DESIGN.md step 1).
    VP: alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t), level = t.
    """
    if param.kind == "edm":
        grid = karras_sigmas(NUM_LEVELS, param.sigma_min, param.sigma_max).flip(0).to(t.device)
        sigma = grid[t]
        return torch.ones_like(sigma), sigma, sigma
    abar = alphas_cumprod.to(t.device, torch.float64)[t]
    return abar.sqrt(), (1 - abar).sqrt(), t


def one_step(generator: Callable, param: Parametrization, z: Tensor, labels: Tensor | None) -> Tensor:
    """G(z) = mu_theta(sigma_max z, sigma_max, c) for EDM; mu_theta(z, T - 1, c) for VP (DESIGN.md)."""
    if param.kind == "edm":
        return generator(z * param.sigma_max, param.sigma_max, labels)
    return generator(z, NUM_LEVELS - 1, labels)


def _bcast(v: Tensor, x: Tensor) -> Tensor:
    return v.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)


@dataclass
class DMDSettings:
    guidance_scale: float = 1.0  # on the real score only
    regression_weight: float = 0.25  # lambda_reg
    t_min: float = 0.02  # DM timesteps t ~ U[t_min T, t_max T]
    t_max: float = 0.98


def dm_timestep_range(s: DMDSettings) -> tuple[int, int]:
    """[low, high) integer range of t for the distribution matching loss."""
    return int(s.t_min * NUM_LEVELS), int(s.t_max * NUM_LEVELS) + 1


def distribution_matching_term(
    x: Tensor,
    labels: Tensor | None,
    real: Denoiser,
    fake: Callable,
    settings: DMDSettings,
    rng: SampleRNG,
) -> tuple[Tensor, dict[str, float]]:
    """DESIGN.md steps 1-5: perturb x (detached), score it with the guided real and unguided fake denoisers."""
    low, high = dm_timestep_range(settings)
    t = rng.randint(low, high)
    eps = rng.randn(tuple(x.shape[1:])).to(x.dtype)
    alpha, sigma, level = noise_levels(real.param, t, getattr(real, "alphas_cumprod", None))
    x_t = _bcast(alpha, x) * x.detach() + _bcast(sigma, x) * eps
    with torch.no_grad():
        p_real = real(x_t, level, labels, settings.guidance_scale)
        p_fake = fake(x_t, level, labels)
    loss = distribution_matching_loss(x, p_real.to(x.dtype), p_fake.to(x.dtype))
    return loss, {"dm_t_mean": t.float().mean().item()}


def fake_score_loss(fake: Callable, param: Parametrization, x: Tensor, labels: Tensor | None, rng: SampleRNG, alphas_cumprod: Tensor | None = None) -> Tensor:
    """Denoising loss of the fake score on generator samples, t ~ U over the full range (DESIGN.md).

    EDM: (1/sigma^2 + 1/sigma_data^2) ||mu_fake(x_t) - x||^2; VP: epsilon-MSE.
    """
    x = x.detach()
    t = rng.randint(0, NUM_LEVELS)
    eps = rng.randn(tuple(x.shape[1:])).to(x.dtype)
    alpha, sigma, level = noise_levels(param, t, alphas_cumprod)
    a, s = _bcast(alpha, x), _bcast(sigma, x)
    x_t = a * x + s * eps
    pred = fake(x_t, level, labels)
    if param.kind == "edm":
        return (edm_weight(s, param.sigma_data) * (pred - x) ** 2).mean()
    return eps_mse_loss((x_t - a * pred) / s, eps)


def random_labels(rng: SampleRNG, num_classes: int) -> Tensor | None:
    """Class labels drawn uniformly for the distribution matching term (None if unconditional)."""
    return rng.randint(0, num_classes) if num_classes else None
