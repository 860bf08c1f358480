"""One DMD iteration, written as the paper's Algorithm 1 (Yin et al. 2024) with docs/math.md's details.

    x = G(z)                                                one step from noise (§5)
    loss_G = loss_DM(x) + lambda_reg * l(G(z_ref), y_ref)   GeneratorLoss (§6, §8)
    loss_fake = denoising loss of mu_fake on stopgrad(x)    FakeScoreLoss (§7)

The three networks are denoisers (``dmd_core.denoisers``): the generator and the fake score are
trainable copies of the teacher; the real score is the frozen teacher. Randomness comes from a
``SampleRNG``: every draw of sample i at step s depends only on (seed, s, i), so a batch split over
processes draws exactly what one process would (§9). Nothing here returns a Python float: reading
one back forces a device sync on every micro-step.
"""

from __future__ import annotations

import functools
import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch.profiler import record_function

from . import philox
from .denoisers import Denoiser, Parametrization, flow_training_sigmas, karras_sigmas
from .losses import distribution_matching_loss, edm_weight, eps_mse_loss
from .shards import sample_seed

Tensor = torch.Tensor
NUM_LEVELS = 1000  # T of EDM models: the size of the Karras sigma grid (a VP model's T is its schedule's length)


class NoiseProcess:
    """What DMD asks of a parametrisation (docs/math.md §6, §7, §13, §14): T integer levels t, each with its
    x_t = alpha_t x + sigma_t eps and the ``level`` its denoisers take; the one-step generator's input; the
    fake score's loss weighting. One subclass per ``Parametrization.kind`` (``noise_process``)."""

    num_levels: int  # T

    def levels(self, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(alpha_t, sigma_t, level) for integer t in [0, T), float64 (level: what the denoiser takes)."""
        raise NotImplementedError

    def one_step(self, param: Parametrization) -> tuple[float, float]:
        """(level, scale) of the one-step generator G(z) = mu(scale * z, level) of a model with ``param`` (§5)."""
        raise NotImplementedError

    def fake_score_loss(self, pred: Tensor, x: Tensor, x_t: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
        """The fake score's denoising loss of its x0 prediction ``pred`` at x_t (alpha, sigma broadcast to x; §7)."""
        raise NotImplementedError


class EDMProcess(NoiseProcess):
    """VE: alpha = 1, sigma = the t-th of T Karras sigmas, smallest first; level = sigma."""

    num_levels = NUM_LEVELS

    def __init__(self, param: Parametrization):
        self.sigma_min, self.sigma_max, self.sigma_data = param.sigma_min, param.sigma_max, param.sigma_data

    def levels(self, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        sigma = _karras_levels(self.sigma_min, self.sigma_max, t.device)[t]
        return torch.ones_like(sigma), sigma, sigma

    def one_step(self, param: Parametrization) -> tuple[float, float]:
        return param.sigma_max, param.sigma_max  # x_T = sigma_max z, as the teacher's sampler starts

    def fake_score_loss(self, pred: Tensor, x: Tensor, x_t: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
        return (edm_weight(sigma, self.sigma_data) * (pred - x) ** 2).mean()  # EDM's weighting


class VPProcess(NoiseProcess):
    """DDPM: alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t) of the schedule's T timesteps; level = t."""

    def __init__(self, alphas_cumprod: Tensor | None):
        if alphas_cumprod is None:
            raise ValueError("a VP model's noise levels need the teacher's alphas_cumprod")
        self.alphas_cumprod = alphas_cumprod
        self.num_levels = int(alphas_cumprod.shape[0])

    def levels(self, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        abar = self.alphas_cumprod.to(t.device, torch.float64)[t]
        return abar.sqrt(), (1 - abar).sqrt(), t

    def one_step(self, param: Parametrization) -> tuple[float, float]:
        # z itself as x_t* (as DMD takes x_T = z); t* = one_step_timestep, T - 1 when unset (DMD's choice)
        return (self.num_levels - 1 if param.one_step_timestep is None else param.one_step_timestep), 1.0

    def fake_score_loss(self, pred: Tensor, x: Tensor, x_t: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
        return eps_mse_loss((x_t - alpha * pred) / sigma, eps)  # DDPM's simple loss, whatever the prediction type


class FlowProcess(NoiseProcess):
    """Rectified flow (§14): alpha = 1 - s, sigma = s with s the t-th of T shifted levels shift((t + 1) / T),
    smallest first (the scheduler's training sigmas; level 999 is s = 1, pure noise); level = s."""

    num_levels = NUM_LEVELS

    def __init__(self, param: Parametrization):
        self.param = param

    def levels(self, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        s = _flow_levels(self.param, t.device)[t]
        return 1 - s, s, s

    def one_step(self, param: Parametrization) -> tuple[float, float]:
        # G(z) = z - s* v(z, s*): z itself as x_s*, which at s* = 1 (t* = T - 1, the default) is pure noise
        t = self.num_levels - 1 if param.one_step_timestep is None else param.one_step_timestep
        return float(_flow_levels(self.param, torch.device("cpu"))[t]), 1.0

    def fake_score_loss(self, pred: Tensor, x: Tensor, x_t: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
        # flow matching on the fake score: ||v_fake - (eps - x)||^2 with v_fake = (x_t - pred) / s equals
        # ||(pred - x) / s||^2; this form avoids the cancellation of x_t - pred against s (eps - x) at small s
        return (((pred - x) / sigma) ** 2).mean()


PROCESSES: dict[str, Callable[[Parametrization, Tensor | None], NoiseProcess]] = {
    "edm": lambda param, abar: EDMProcess(param),
    "vp": lambda param, abar: VPProcess(abar),
    "flow": lambda param, abar: FlowProcess(param),
}


def noise_process(param: Parametrization, alphas_cumprod: Tensor | None = None) -> NoiseProcess:
    """The NoiseProcess of a parametrisation (VP: of the teacher's ``alphas_cumprod``)."""
    return PROCESSES[param.kind](param, alphas_cumprod)


def noise_process_of(den: Denoiser) -> NoiseProcess:
    return noise_process(den.param, getattr(den, "alphas_cumprod", None))


def num_levels(param: Parametrization, alphas_cumprod: Tensor | None = None) -> int:
    """T, the integer timesteps of the model's noise levels: a VP model's training timesteps, EDM's and flow's grid size."""
    return noise_process(param, alphas_cumprod).num_levels


class SampleRNG:
    """Per-sample draws keyed by (seed, stream, step) and counted by global sample index (docs/math.md §9):
    Philox on the batch's device, one call per draw for the whole batch."""

    def __init__(self, seed: int, stream: int, step: int, indices: range | list[int], device: torch.device | str = "cpu"):
        self.key = sample_seed(seed, stream, step)
        if isinstance(indices, range) and indices.step == 1:
            self.indices = torch.arange(indices.start, indices.stop, dtype=torch.int64, device=device)
        else:
            self.indices = torch.tensor(list(indices), dtype=torch.int64, device=device)
        self.device = device
        self.draws = 0  # each draw of this object gets its own counter word

    def _next(self) -> int:
        self.draws += 1
        return self.draws - 1

    def randn(self, shape: tuple[int, ...]) -> Tensor:
        n = math.prod(shape)
        return philox.normal(self.key, self.indices, self._next(), n).reshape(len(self.indices), *shape)

    def randint(self, low: int, high: int) -> Tensor:
        """Integers uniform in [low, high), one per sample."""
        return philox.integers(self.key, self.indices, self._next(), low, high)


def noise_levels(param: Parametrization, t: Tensor, alphas_cumprod: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """(alpha_t, sigma_t, level) for integer t in [0, T): level is what the denoiser takes (docs/math.md §6 step 1).

    EDM: alpha = 1, sigma = the t-th of T Karras sigmas, smallest first.
    VP: alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t), level = t.
    Flow: alpha = 1 - s, sigma = s, the t-th of T shifted levels, smallest first; level = s.
    """
    return noise_process(param, alphas_cumprod).levels(t)


@functools.lru_cache(maxsize=16)
def _karras_levels(sigma_min: float, sigma_max: float, device: torch.device) -> Tensor:
    """noise_levels' EDM grid, smallest first, copied to ``device`` once: a copy per call from host memory
    makes the host wait for the GPU twice in every DMD step."""
    return karras_sigmas(NUM_LEVELS, sigma_min, sigma_max).flip(0).to(device)


@functools.lru_cache(maxsize=16)
def _flow_levels(param: Parametrization, device: torch.device) -> Tensor:
    """The flow grid of noise_levels on ``device``, made once per parametrisation (as _karras_levels)."""
    return flow_training_sigmas(param, NUM_LEVELS).to(device)


# DMD's own choice for VP generators is T - 1; there x0 = (x - sigma eps) / alpha multiplies any error
# of the network's eps by sigma/alpha (14.6 for Stable Diffusion's schedule, 157 for DDPM's). The measured
# default is mid-range (docs/math.md §5 has the numbers): T / 2, 500 of Stable Diffusion's and DDPM's 1000.
VP_GENERATOR_TIMESTEP = 500


def default_generator_timestep(num_train_timesteps: int) -> int:
    """The default t* of a VP generator on a schedule of ``num_train_timesteps``: the same point of it as 500 of 1000."""
    return max(1, VP_GENERATOR_TIMESTEP * num_train_timesteps // NUM_LEVELS)


@dataclass(frozen=True)
class OneStep:
    """G(z) = mu_theta(scale * z, level, c): one network evaluation from z ~ N(0, I) (docs/math.md §5).

    EDM: level = scale = sigma_max (x_T = sigma_max z, as the teacher's sampler starts).
    VP: level = t*, scale = 1 (z itself, as DMD takes x_T = z; a standard DDIM step at t* then
    reproduces G); t* = the generator's ``one_step_timestep``, T - 1 when unset (DMD's choice).
    Flow: level = s* (s at t*, 1 by default: G(z) = z - v(z, 1)), scale = 1 (§14).
    """

    level: float
    scale: float

    @classmethod
    def of(cls, den: Denoiser) -> "OneStep":
        return cls(*noise_process_of(den).one_step(den.param))

    def __call__(self, generator: Callable, z: Tensor, labels: Tensor | None) -> Tensor:
        """``generator`` may be wrapped (DDP); this object carries the parametrisation."""
        return generator(z * self.scale, self.level, labels)


@dataclass(frozen=True)
class MultiStep:
    """DMD2's k-step generator (docs/math.md §13): x0 = G(z) at t_0 (OneStep), then for each later t_j
    x_j = alpha_j x0 + sigma_j eps_j (fresh noise) and x0 = G(x_j, t_j). One entry is OneStep itself."""

    first: OneStep
    later: tuple[int, ...]  # t_1 > t_2 > ... in the teacher's T (EDM: on the Karras grid of noise_levels)
    param: Parametrization
    alphas_cumprod: Tensor | None = None

    @classmethod
    def of(cls, den: Denoiser) -> "MultiStep":
        ts = den.param.generator_timesteps or ()
        return cls(OneStep.of(den), tuple(ts[1:]), den.param, getattr(den, "alphas_cumprod", None))

    @property
    def num_steps(self) -> int:
        return 1 + len(self.later)

    def renoise(self, x0: Tensor, j: int, eps: Tensor) -> tuple[Tensor, Tensor]:
        """(x at t_{j+1}, its level) from x0: alpha x0 + sigma eps."""
        t = torch.full((x0.shape[0],), self.later[j], dtype=torch.long, device=x0.device)
        alpha, sigma, level = noise_levels(self.param, t, self.alphas_cumprod)
        return _bcast(alpha, x0) * x0 + _bcast(sigma, x0) * eps.to(x0.dtype), level

    def __call__(self, generator: Callable, z: Tensor, labels: Tensor | None, noise: Callable[[int], Tensor] | None = None) -> Tensor:
        """``noise(j)``: the eps of later step j (needed when there is one)."""
        x0 = self.first(generator, z, labels)
        for j in range(len(self.later)):
            x_t, level = self.renoise(x0, j, noise(j))
            x0 = generator(x_t, level, labels)
        return x0


def step_noise(seed: int, idx: range | list[int], shape: tuple[int, ...]) -> Callable[[int], Tensor]:
    """eps_j of sample i for the later steps of a k-step sampler, seeded by (seed, j, i): batch-independent."""
    from .shards import sample_noise

    return lambda j: sample_noise(sample_seed(seed, STEP_NOISE_STREAM, j) % (2**63), idx, shape)


STEP_NOISE_STREAM = 7919


class BackwardSimulation:
    """DMD2's training input for a k-step generator: each sample draws its step k uniformly; its input at t_k is
    made by running the current generator through the earlier steps without gradients, re-noising in between
    (as the sampler does). Returns (input, level) of the step that gets gradients; k = 0 is OneStep's input."""

    def __init__(self, steps: MultiStep):
        self.steps = steps

    def __call__(self, generator: Callable, z: Tensor, labels: Tensor | None, rng: SampleRNG) -> tuple[Tensor, Tensor]:
        s = self.steps
        k = rng.randint(0, s.num_steps)
        eps = [rng.randn(tuple(z.shape[1:])) for _ in s.later]  # always drawn: the draws do not depend on k
        inputs = z * s.first.scale
        levels = torch.full((z.shape[0],), float(s.first.level), dtype=torch.float64, device=z.device)
        with torch.no_grad():
            x_t = level = None
            for j in range(len(s.later)):
                if not bool((k > j).any()):  # no sample needs this step or a later one
                    break
                x0 = s.first(generator, z, labels) if j == 0 else generator(x_t, level, labels)
                x_t, level = s.renoise(x0.float(), j, eps[j])
                take = k == j + 1
                inputs = torch.where(_bcast(take, inputs).bool(), x_t.to(inputs.dtype), inputs)
                levels = torch.where(take, level.to(levels.dtype), levels)
        return inputs, levels


def random_labels(rng: SampleRNG, num_classes: int) -> Tensor | None:
    """Class labels drawn uniformly for the distribution matching term (None if unconditional)."""
    return rng.randint(0, num_classes) if num_classes else None


def _bcast(v: Tensor, x: Tensor) -> Tensor:
    return v.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)


def _cat(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    return None if a is None else torch.cat([a, b])


def _loss_precision(x: Tensor) -> Tensor:
    """The generator's samples in float32 at least for the losses: bf16/fp16 samples are upcast, float64 ones
    kept (a float64 run is free of float32 rounding end to end; tests/test_dmd_step.py's golden numbers are one)."""
    return x if x.dtype == torch.float64 else x.float()


@dataclass
class DMDSettings:
    """The distribution matching settings of one run (docs/math.md §3, §6, §8)."""

    guidance_scale: float = 1.0  # CFG on the real score only
    regression_weight: float = 0.25  # lambda_reg
    dm_weight: float = 1.0  # weight of loss_DM (0: regression only, the DMD paper's "w/o distribution matching")
    t_min: float = 0.02  # DM timesteps t ~ U[t_min T, t_max T]
    t_max: float = 0.98


def dm_timestep_range(s: DMDSettings, levels: int = NUM_LEVELS) -> tuple[int, int]:
    """[low, high) integer range of t for the distribution matching loss (T = ``levels``); t_max = 1 means level T - 1."""
    return int(s.t_min * levels), min(int(s.t_max * levels) + 1, levels)


class DistributionMatchingLoss:
    """loss_DM of generator samples x (docs/math.md §6): guided real score against unguided fake score."""

    def __init__(self, settings: DMDSettings):
        self.settings = settings

    def __call__(self, x: Tensor, labels: Tensor | None, real: Denoiser, fake: Callable, rng: SampleRNG) -> Tensor:
        process = noise_process_of(real)
        t = rng.randint(*dm_timestep_range(self.settings, process.num_levels))
        eps = rng.randn(tuple(x.shape[1:])).to(x.dtype)
        alpha, sigma, level = process.levels(t)
        x_t = _bcast(alpha, x) * x.detach() + _bcast(sigma, x) * eps
        with torch.no_grad(), record_function("dmd.scores"):  # the name of this part in a torch.profiler trace
            p_real = real(x_t, level, labels, self.settings.guidance_scale)
            p_fake = fake(x_t, level, labels)
        return distribution_matching_loss(x, p_real.to(x.dtype), p_fake.to(x.dtype))


class GeneratorLoss:
    """loss_G = loss_DM(G(z)) + lambda_reg * l(G(z_ref), y_ref) (docs/math.md §5, §6, §8).

    Returns (loss_G, {"loss_dm", "loss_reg"} as tensors, x = stopgrad(G(z)) for the fake-score update).
    ``one_step`` is G's parametrisation (default: the teacher's, ``OneStep.of(real)``); ``gen`` itself
    may be wrapped (DDP) and need not carry one.
    """

    def __init__(
        self,
        settings: DMDSettings,
        regression_loss: Callable[[Tensor, Tensor], Tensor] | None = None,
        one_step: OneStep | None = None,
        adversarial: Callable[[Tensor, Tensor | None, SampleRNG], Tensor] | None = None,
        adversarial_weight: float = 0.0,
        simulation: BackwardSimulation | None = None,
    ):
        if settings.regression_weight > 0 and regression_loss is None:
            raise ValueError("regression_weight > 0 needs a regression_loss")
        self.settings = settings
        self.one_step = one_step
        self.dm = DistributionMatchingLoss(settings)
        self.regression_loss = regression_loss
        # DMD2: + w_G * softplus(-D(G(z))) through the frozen fake score (dmd_core.gan)
        self.adversarial, self.adversarial_weight = adversarial, adversarial_weight
        # DMD2's k-step generators: the DM sample comes from a simulated step k (None: one step)
        self.simulation = simulation

    def __call__(
        self,
        gen: Callable,
        real: Denoiser,
        fake: Callable,
        z: Tensor,
        labels: Tensor | None,
        rng: SampleRNG,
        z_ref: Tensor | None = None,
        y_ref: Tensor | None = None,
        labels_ref: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor], Tensor]:
        lam = self.settings.regression_weight
        regress = lam > 0 and z_ref is not None
        # One generator call on both batches, as one forward/backward through G is cheaper than two.
        z_all, labels_all = (torch.cat([z, z_ref]), _cat(labels, labels_ref)) if regress else (z, labels)
        one_step = self.one_step or OneStep.of(real)
        if self.simulation is None:
            x_all = _loss_precision(one_step(gen, z_all, labels_all))
        else:  # the DM batch at its simulated steps; the regression batch at the first step (its pairs start from noise)
            inputs, levels = self.simulation(gen, z, labels, rng)
            if regress:
                inputs = torch.cat([inputs, z_ref * one_step.scale])
                levels = torch.cat([levels, torch.full((len(z_ref),), float(one_step.level), dtype=levels.dtype, device=levels.device)])
            x_all = _loss_precision(gen(inputs, levels, labels_all))
        x, x_reg = x_all[: len(z)], x_all[len(z) :]
        w_dm = self.settings.dm_weight
        loss_dm = self.dm(x, labels, real, fake, rng) if w_dm > 0 else x.new_zeros(())
        loss_reg = self.regression_loss(x_reg, y_ref) if regress else x.new_zeros(())
        loss_g = (loss_dm if w_dm == 1 else w_dm * loss_dm) + lam * loss_reg
        terms = {"loss_dm": loss_dm, "loss_reg": loss_reg}
        if self.adversarial is not None:
            terms["loss_gan_g"] = self.adversarial(x, labels, rng)
            loss_g = loss_g + self.adversarial_weight * terms["loss_gan_g"]
        return loss_g, terms, x.detach()


class FakeScoreLoss:
    """Denoising loss of the fake score on x = stopgrad(G(z)), t ~ U over all T levels (docs/math.md §7).

    EDM: (1/sigma^2 + 1/sigma_data^2) ||mu_fake(x_t) - x||^2; VP: epsilon-MSE; flow: v-MSE (§14).
    Per-element mean.
    """

    def __init__(self, param: Parametrization, alphas_cumprod: Tensor | None = None):
        self.param, self.alphas_cumprod = param, alphas_cumprod
        self.process = noise_process(param, alphas_cumprod)  # a VP fake score needs the teacher's alphas_cumprod

    @classmethod
    def for_teacher(cls, teacher: Denoiser) -> "FakeScoreLoss":
        return cls(teacher.param, getattr(teacher, "alphas_cumprod", None))

    def __call__(self, fake: Callable, x: Tensor, labels: Tensor | None, rng: SampleRNG) -> Tensor:
        x = x.detach()
        t = rng.randint(0, self.process.num_levels)
        eps = rng.randn(tuple(x.shape[1:])).to(x.dtype)
        alpha, sigma, level = self.process.levels(t)
        a, s = _bcast(alpha, x), _bcast(sigma, x)
        x_t = a * x + s * eps
        pred = fake(x_t, level, labels)
        return self.process.fake_score_loss(pred, x, x_t, eps, a, s)


class GANLogits:
    """D(x) = head(bottleneck of fake(x_t, t)): x noised at t uniform over all T levels, DMD2's 'diffusion GAN'
    (docs/math.md §12). ``fake`` is the callable to run, ``tap`` the BottleneckTap on its UNet."""

    def __init__(self, param: Parametrization, alphas_cumprod: Tensor | None = None):
        self.param, self.alphas_cumprod = param, alphas_cumprod
        self.process = noise_process(param, alphas_cumprod)

    def __call__(self, fake: Callable, tap, head: Callable, x: Tensor, labels: Tensor | None, rng: SampleRNG) -> Tensor:
        t = rng.randint(0, self.process.num_levels)
        eps = rng.randn(tuple(x.shape[1:])).to(x.dtype)
        alpha, sigma, level = self.process.levels(t)
        x_t = _bcast(alpha, x) * x + _bcast(sigma, x) * eps
        return head(tap.bottleneck(lambda: fake(x_t, level, labels)))


@contextmanager
def frozen(module: torch.nn.Module) -> Iterator[None]:
    """Inside the block the module's parameters do not require grad (restored after): a gradient flows
    through it to its inputs and reaches none of its weights. The backward belongs inside too: a gradient-
    checkpointed forward is recomputed there, and a recompute under other flags saves other tensors."""
    flags = [p.requires_grad for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in zip(module.parameters(), flags):
            p.requires_grad_(f)


class AdversarialLoss:
    """The generator's GAN term softplus(-D(x)) through the fake score and head, which the caller holds
    ``frozen`` for the generator's forward and backward: the gradient reaches x (and so G) but no weight of
    the fake score or head (DMD2's generator turn)."""

    def __init__(self, gan_logits: GANLogits, fake: torch.nn.Module):
        self.gan_logits, self.fake = gan_logits, fake  # fake: the module itself, not a DDP wrapper

    def __call__(self, x: Tensor, labels: Tensor | None, rng: SampleRNG) -> Tensor:
        from .gan import generator_gan_loss

        if torch.is_grad_enabled() and any(p.requires_grad for p in self.fake.parameters()):
            raise RuntimeError("the fake score trains in the generator's GAN term: run the generator's update inside frozen(fake)")
        return generator_gan_loss(self.gan_logits(self.fake, self.fake.gan_tap, self.fake.gan_head, x, labels, rng))
