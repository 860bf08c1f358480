"""Teacher ODE solvers: plain functions from noise z to the ODE's solution y (the regression targets, docs/math.md §4).

Which solver fits which parametrisation: ``SOLVERS`` (EDM: Heun; VP: PNDM; flow: Heun or Euler)."""

from __future__ import annotations

from typing import Callable

import torch

from .denoisers import Denoiser, FlowDenoiser, VPDenoiser, karras_sigmas
from .errors import InputError

Tensor = torch.Tensor
# x0-predictor at a noise level: (x, sigma or timestep) -> x0.
DenoiseFn = Callable[[Tensor, Tensor], Tensor]
# Velocity of a flow model at a level: (x, s) -> v, the right-hand side of dx/ds = v.
VelocityFn = Callable[[Tensor, Tensor], Tensor]
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


def flow_euler_nfe(steps: int) -> int:
    return steps


@torch.no_grad()
def flow_euler_sampler(velocity: VelocityFn, z: Tensor, sigmas: Tensor) -> Tensor:
    """Euler's method on the flow ODE dx/ds = v(x, s) from x = z at s_0 = 1 down the levels ``sigmas`` (ending in 0):
    x_{i+1} = x_i + (s_{i+1} - s_i) v(x_i, s_i), as diffusers' FlowMatchEulerDiscreteScheduler steps. State in float64."""
    sigmas = sigmas.to(z.device, torch.float64)
    x = z.to(torch.float64)
    for i in range(len(sigmas) - 1):
        x = x + (sigmas[i + 1] - sigmas[i]) * velocity(x, sigmas[i]).to(torch.float64)
    return x.to(z.dtype)


def flow_heun_nfe(steps: int) -> int:
    """Heun on the flow ODE: 2 evaluations per step, the last (to s = 0) Euler, as FlowMatchHeunDiscreteScheduler."""
    return 2 * steps - 1


@torch.no_grad()
def flow_heun_sampler(velocity: VelocityFn, z: Tensor, sigmas: Tensor) -> Tensor:
    """Heun's 2nd-order method (explicit trapezoid) on dx/ds = v(x, s), as diffusers' FlowMatchHeunDiscreteScheduler:
    x' = x_i + (s_{i+1} - s_i) v(x_i, s_i), then x_{i+1} = x_i + (s_{i+1} - s_i) (v(x_i, s_i) + v(x', s_{i+1})) / 2,
    except on the last step to s = 0 (Euler). State in float64."""
    sigmas = sigmas.to(z.device, torch.float64)
    x = z.to(torch.float64)
    for i in range(len(sigmas) - 1):
        s_cur, s_next = sigmas[i], sigmas[i + 1]
        v_cur = velocity(x, s_cur).to(torch.float64)
        x_next = x + (s_next - s_cur) * v_cur  # Euler step
        if i < len(sigmas) - 2:  # Heun correction, except on the last step to s = 0
            v_next = velocity(x_next, s_next).to(torch.float64)
            x_next = x + (s_next - s_cur) * 0.5 * (v_cur + v_next)
        x = x_next
    return x.to(z.dtype)


def _edm_heun(den: Denoiser, steps: int, guidance_scale: float) -> tuple[Sampler, int]:
    def heun(z: Tensor, labels: Tensor | None, **cond) -> Tensor:
        return heun_sampler(lambda x, s: den(x, s, labels, guidance_scale, **cond), z, steps, den.sigma_min, den.sigma_max)

    return heun, heun_nfe(steps)


def _vp_pndm(den: VPDenoiser, steps: int, guidance_scale: float) -> tuple[Sampler, int]:
    def pndm(z: Tensor, labels: Tensor | None, **cond) -> Tensor:
        return pndm_sampler(den, z, steps, labels, guidance_scale, **cond)

    return pndm, pndm_nfe(den, steps)


def _flow(solve: Callable, nfe: Callable[[int], int]) -> Callable[[FlowDenoiser, int, float], tuple[Sampler, int]]:
    """A flow sampler of ``solve`` over the denoiser's own levels; ``cond`` reaches the network (e.g. a layout's inputs)."""

    def build(den: FlowDenoiser, steps: int, guidance_scale: float) -> tuple[Sampler, int]:
        sigmas = den.sigmas(steps)

        def sample(z: Tensor, labels: Tensor | None, **cond) -> Tensor:
            return solve(lambda x, s: den.velocity(x, s, labels, guidance_scale, **cond), z, sigmas)

        return sample, nfe(steps)

    return build


# The solvers of each parametrisation, the default first, with their sampler builders (den, steps, guidance) -> (sampler, NFE).
SOLVERS: dict[str, dict[str, Callable]] = {
    "edm": {"heun": _edm_heun},
    "vp": {"pndm": _vp_pndm},
    "flow": {"heun": _flow(flow_heun_sampler, flow_heun_nfe), "euler": _flow(flow_euler_sampler, flow_euler_nfe)},
}
KIND_NAMES = {"edm": "EDM", "vp": "VP", "flow": "a flow model"}
WHICH = "heun: EDM and flow teachers, pndm: VP teachers, euler: flow teachers"


def default_solver(kind: str) -> str:
    return next(iter(SOLVERS[kind]))


def check_solver(solver: str, kind: str) -> None:
    """Heun for EDM teachers, PNDM for VP ones, Heun or Euler for flow ones: a mismatch is an InputError that says what to set."""
    if solver in SOLVERS[kind]:
        return
    fix = f"Fix: --set generate.solver={default_solver(kind)}" + (" (or euler)" if kind == "flow" else "")
    named_for = [k for k in ("edm", "vp") if solver in SOLVERS[k]]  # the diffusion family a solver is named after
    article = {"edm": "an", "vp": "a"}
    if named_for:
        raise InputError(f"generate.solver={solver} needs {article[named_for[0]]} {KIND_NAMES[named_for[0]]} teacher; this teacher is {KIND_NAMES[kind]}. {fix}")
    fix = f"Fix: --set generate.solver={default_solver(kind)} ({WHICH})"
    if solver in SOLVERS["flow"]:
        raise InputError(f"unknown solver {solver!r} for {article[kind]} {KIND_NAMES[kind]} teacher: it steps a flow teacher's ODE. {fix}")
    raise InputError(f"unknown solver {solver!r}. {fix}")


def teacher_sampler(den: Denoiser, solver: str, steps: int, guidance_scale: float = 1.0) -> tuple[Sampler, int]:
    """(z, labels) -> images with the teacher's ODE solver, and its network evaluations per sample."""
    check_solver(solver, den.param.kind)
    return SOLVERS[den.param.kind][solver](den, steps, guidance_scale)
