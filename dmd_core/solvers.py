"""Teacher ODE solvers: plain functions from noise z to the ODE's solution y (the regression targets, docs/math.md §4)."""

from __future__ import annotations

from typing import Callable

import torch

from .denoisers import Denoiser, VPDenoiser, karras_sigmas
from .errors import InputError

Tensor = torch.Tensor
# x0-predictor at a noise level: (x, sigma or timestep) -> x0.
DenoiseFn = Callable[[Tensor, Tensor], Tensor]
# A teacher's sampler: (z, class labels) -> images.
Sampler = Callable[[Tensor, Tensor | None], Tensor]


def heun_nfe(steps: int) -> int:
    """Network evaluations of EDM's Heun sampler: 2 per step, but the last step is Euler."""
    return 2 * steps - 1


@torch.no_grad()
def heun_sampler(
    denoise: DenoiseFn,
    z: Tensor,
    steps: int = 18,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
) -> Tensor:
    """EDM's deterministic 2nd-order sampler (Karras et al. 2022, Algorithm 1, S_churn = 0).

    Probability-flow ODE dx/dsigma = (x - D(x; sigma)) / sigma from sigma_max to 0, state in float64.
    ``steps`` = 18 gives 35 network evaluations (DMD's CIFAR-10 setting).
    """
    sigmas = torch.cat([karras_sigmas(steps, sigma_min, sigma_max, rho), torch.zeros(1, dtype=torch.float64)])
    sigmas = sigmas.to(z.device)
    x = z.to(torch.float64) * sigmas[0]
    for i in range(steps):
        s_cur, s_next = sigmas[i], sigmas[i + 1]
        d_cur = (x - denoise(x, s_cur).to(torch.float64)) / s_cur
        x_next = x + (s_next - s_cur) * d_cur  # Euler step
        if i < steps - 1:  # Heun correction, except on the last step to sigma = 0
            d_next = (x_next - denoise(x_next, s_next).to(torch.float64)) / s_next
            x_next = x + (s_next - s_cur) * (0.5 * d_cur + 0.5 * d_next)
        x = x_next
    return x.to(z.dtype)


def pndm_prediction_type(den: VPDenoiser) -> str:
    """What the scheduler steps on: PNDMScheduler takes epsilon or v only, so x0 ("sample") teachers give epsilon."""
    return "epsilon" if den.param.prediction_type == "sample" else den.param.prediction_type


def pndm_scheduler(den: VPDenoiser, steps: int = 50):
    """diffusers' PNDMScheduler from the teacher's scheduler config, PLMS only (skip_prk_steps=True)."""
    from diffusers import PNDMScheduler

    sched = PNDMScheduler.from_config(den.scheduler_config, skip_prk_steps=True, prediction_type=pndm_prediction_type(den))
    sched.set_timesteps(steps)
    return sched


def pndm_nfe(den: VPDenoiser, steps: int = 50) -> int:
    return len(pndm_scheduler(den, steps).timesteps)


@torch.no_grad()
def pndm_sampler(
    den: VPDenoiser,
    z: Tensor,
    steps: int = 50,
    class_labels: Tensor | None = None,
    guidance_scale: float = 1.0,
    **cond,
) -> Tensor:
    """Pseudo numerical methods (Liu et al. 2022), PLMS variant, through diffusers' ``PNDMScheduler``.

    The Stable Diffusion setting of DMD's LAION pairs (50 steps). Returns the model-space x0 (latents for SD).
    """
    sched = pndm_scheduler(den, steps)
    kind = sched.config.prediction_type
    x = z * sched.init_noise_sigma
    for t in sched.timesteps:
        out = den.model_output(x, int(t), class_labels, guidance_scale, prediction_type=kind, **cond)
        x = sched.step(out, t, x, return_dict=False)[0]
    return x


def check_solver(solver: str, kind: str) -> None:
    """Heun for EDM teachers, PNDM for VP ones: a mismatch is an InputError that says what to set."""
    if solver == "heun" and kind != "edm":
        raise InputError("generate.solver=heun needs an EDM teacher; this teacher is VP. Fix: --set generate.solver=pndm")
    if solver == "pndm" and kind != "vp":
        raise InputError("generate.solver=pndm needs a VP teacher; this teacher is EDM. Fix: --set generate.solver=heun")
    if solver not in ("heun", "pndm"):
        raise InputError(f"unknown solver {solver!r}. Fix: --set generate.solver=heun (EDM teachers) or pndm (VP teachers)")


def teacher_sampler(den: Denoiser, solver: str, steps: int, guidance_scale: float = 1.0) -> tuple[Sampler, int]:
    """(z, labels) -> images with the teacher's ODE solver, and its network evaluations per sample."""
    check_solver(solver, den.param.kind)
    if solver == "heun":

        def heun(z: Tensor, labels: Tensor | None, **cond) -> Tensor:
            return heun_sampler(lambda x, s: den(x, s, labels, guidance_scale, **cond), z, steps, den.sigma_min, den.sigma_max)

        return heun, heun_nfe(steps)

    def pndm(z: Tensor, labels: Tensor | None, **cond) -> Tensor:
        return pndm_sampler(den, z, steps, labels, guidance_scale, **cond)

    return pndm, pndm_nfe(den, steps)
