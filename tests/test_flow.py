"""The flow parametrisation (docs/math.md §14): x0 from v, the timestep shift against diffusers' schedulers,
denoiser.json round trips and the guidance-as-input hook."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from dmd_core.denoisers import (
    FlowDenoiser,
    Parametrization,
    flow_fields,
    flow_mu,
    flow_sampling_sigmas,
    flow_training_sigmas,
)
from dmd_core.dmd import (
    DistributionMatchingLoss,
    DMDSettings,
    FakeScoreLoss,
    MultiStep,
    OneStep,
    SampleRNG,
    dm_timestep_range,
    noise_levels,
    num_levels,
)
from dmd_core.errors import InputError
from dmd_core.loading import load_denoiser, save_denoiser
from dmd_core.solvers import check_solver, default_solver, flow_euler_sampler, teacher_sampler
from conftest import tiny_unet

FLOW = Parametrization(kind="flow", num_classes=10, null_class=10, image_shape=(1, 8, 8), shift=3.0)


def flow_den(param: Parametrization = FLOW, seed: int = 0) -> FlowDenoiser:
    return FlowDenoiser(tiny_unet(11, seed).double(), param).requires_grad_(False)


def batch(n: int = 3, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g, dtype=torch.float64), torch.tensor([0, 4, 9][:n])


def test_x0_is_x_minus_s_v_at_timestep_s_times_T():
    den = flow_den()
    x, labels = batch()
    s = torch.tensor([0.9, 0.5, 0.02], dtype=torch.float64)
    v = den.unet(x, s * 1000, class_labels=labels).sample
    torch.testing.assert_close(den(x, s, labels), x - s.reshape(-1, 1, 1, 1) * v, rtol=0, atol=1e-12)
    torch.testing.assert_close(den.velocity(x, s, labels), v, rtol=1e-10, atol=1e-10)
    # the forward process and its target: x_s = (1 - s) x0 + s eps has v = eps - x0, and x_s - s v = x0
    x0, eps = batch(seed=2)[0], batch(seed=3)[0]
    x_s = (1 - s.reshape(-1, 1, 1, 1)) * x0 + s.reshape(-1, 1, 1, 1) * eps
    torch.testing.assert_close(x_s - s.reshape(-1, 1, 1, 1) * (eps - x0), x0, rtol=0, atol=1e-14)


def test_cfg_on_x0_equals_cfg_on_v():
    den, g = flow_den(), 4.0
    x, labels = batch()
    s = 0.7
    v_c = den.unet(x, torch.full((3,), s * 1000, dtype=torch.float64), class_labels=labels).sample
    v_u = den.unet(x, torch.full((3,), s * 1000, dtype=torch.float64), class_labels=torch.full((3,), 10)).sample
    v_cfg = v_u + g * (v_c - v_u)
    torch.testing.assert_close(den.velocity(x, s, labels, g), v_cfg, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(den(x, s, labels, g), x - s * v_cfg, rtol=1e-12, atol=1e-12)


class GuidanceNet(torch.nn.Module):
    """v = guidance * x: shows what reaches the network."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(()))
        self.calls: list[dict] = []

    def forward(self, x, t, guidance=None, class_labels=None, return_dict=False):
        self.calls.append({"t": t, "guidance": guidance, "labels": class_labels})
        return (x * guidance.reshape(-1, 1, 1, 1).to(x.dtype) * self.w,)


def test_guidance_embeds_passes_the_scale_as_an_input_in_one_call():
    den = FlowDenoiser(GuidanceNet(), Parametrization(kind="flow", num_classes=10, null_class=10, guidance_embeds=True))
    x, labels = batch()
    out = den(x, 0.5, labels, guidance_scale=3.5)
    assert len(den.unet.calls) == 1  # no CFG pair
    call = den.unet.calls[0]
    assert call["guidance"].dtype == torch.float32 and call["guidance"].tolist() == [3.5] * 3
    assert call["labels"].tolist() == [0, 4, 9] and call["t"].tolist() == [500.0] * 3
    torch.testing.assert_close(out, x - 0.5 * 3.5 * x)


def test_static_shift_matches_the_schedulers_sigmas():
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    train = flow_training_sigmas(FLOW, 1000)
    torch.testing.assert_close(train.flip(0).float(), sched.sigmas, rtol=1e-6, atol=0)
    assert train[-1] == 1.0 and train[0] == pytest.approx(3 * 0.001 / (1 + 2 * 0.001), rel=1e-12)  # shift s / (1 + (shift-1) s)
    sched.set_timesteps(7)
    sampling = flow_sampling_sigmas(FLOW, 7)
    assert sampling.dtype == torch.float64 and torch.equal(sampling.float(), sched.sigmas)
    torch.testing.assert_close((sampling[:-1] * 1000).float(), sched.timesteps)  # the network's timesteps


def test_dynamic_shift_is_fluxs():
    param = Parametrization(kind="flow", image_shape=(16, 64, 64), use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
    seq = 32 * 32  # Flux packs 2x2 latent patches into one token
    mu = 0.5 + (1.15 - 0.5) / (4096 - 256) * (seq - 256)
    assert flow_mu(param) == pytest.approx(mu, rel=1e-12)
    assert flow_mu(Parametrization(kind="flow", image_seq_len=4096, use_dynamic_shifting=True)) == pytest.approx(1.15, rel=1e-12)
    assert flow_mu(FLOW) is None
    s = torch.arange(1, 1001, dtype=torch.float64) / 1000
    torch.testing.assert_close(flow_training_sigmas(param, 1000), math.exp(mu) / (math.exp(mu) + (1 / s - 1)), rtol=1e-12, atol=0)
    # FluxPipeline: sigmas linspace(1, 1/N, N) passed to set_timesteps with mu from calculate_shift
    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
    base = [1.0, 0.75, 0.5, 0.25]
    sched.set_timesteps(sigmas=base, mu=mu)
    assert torch.equal(flow_sampling_sigmas(param, 4, base).float(), sched.sigmas)
    sb = torch.tensor(base, dtype=torch.float64)
    torch.testing.assert_close(flow_sampling_sigmas(param, 4, base)[:-1], math.exp(mu) / (math.exp(mu) + (1 / sb - 1)), rtol=1e-6, atol=0)


def test_parametrization_round_trip_and_refusals():
    p = Parametrization(kind="flow", num_classes=10, null_class=10, image_shape=(1, 8, 8), shift=3.0, use_dynamic_shifting=True,
                        image_seq_len=64, guidance_embeds=True, one_step_timestep=800, generator_timesteps=(800, 400))  # fmt: skip
    assert Parametrization.from_dict(p.to_dict()) == p
    assert "shift" not in Parametrization(kind="edm").to_dict() and "guidance_embeds" not in Parametrization(kind="vp").to_dict()
    assert Parametrization.from_dict({"kind": "flow", "generator_timesteps": [999, 500]}).generator_timesteps == (999, 500)
    bad = [
        ({"kind": "edm", "shift": 3.0}, "shift set a flow model's timestep shift"),
        ({"kind": "flow", "shift": 0}, "shift must be a finite number > 0"),
        ({"kind": "flow", "use_dynamic_shifting": 1}, "use_dynamic_shifting must be true or false"),
        ({"kind": "flow", "num_train_timesteps": 0}, "num_train_timesteps must be an integer > 0"),
        ({"kind": "flow", "base_image_seq_len": 5000}, "base_image_seq_len must be below max_image_seq_len"),
        ({"kind": "flow", "generator_timesteps": [500, 250]}, "starting at 999"),
        ({"kind": "edm", "one_step_timestep": 500}, "one_step_timestep must be an integer in \\[1, 999\\] of a VP or flow model"),
        ({"kind": "rf"}, "kind must be 'edm' or 'vp'"),
    ]
    for d, match in bad:
        with pytest.raises(ValueError, match=match):
            Parametrization.from_dict(d)


def test_flow_fields_of_scheduler_configs():
    sd3 = dict(FlowMatchEulerDiscreteScheduler(shift=3.0).config)
    assert Parametrization(kind="flow", **flow_fields(sd3)).shift == 3.0
    flux = dict(FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, shift=3.0).config)
    p = Parametrization(kind="flow", **flow_fields(flux))
    assert p.use_dynamic_shifting and (p.base_shift, p.max_shift, p.max_image_seq_len) == (0.5, 1.15, 4096)
    for key, value in [("shift_terminal", 0.1), ("use_karras_sigmas", True), ("time_shift_type", "linear"), ("invert_sigmas", True)]:
        with pytest.raises(ValueError, match=f"sets {key}="):
            flow_fields({**sd3, key: value})


def test_a_saved_flow_generator_loads_back(tmp_path):
    param = Parametrization(kind="flow", num_classes=10, null_class=10, image_shape=(1, 8, 8), shift=3.0, one_step_timestep=999)
    den = FlowDenoiser(tiny_unet(11, seed=4), param)
    save_denoiser(den, tmp_path / "gen")
    back = load_denoiser(tmp_path / "gen")
    assert isinstance(back, FlowDenoiser) and back.param == param
    x, labels = batch()
    x = x.float()
    with torch.no_grad():
        torch.testing.assert_close(back(x, 1.0, labels), den(x, 1.0, labels), rtol=0, atol=0)


# ---------------------------------------------------------------- DMD terms (docs/math.md §14)


def test_noise_levels_are_the_shifted_grid():
    t = torch.tensor([0, 499, 999])
    alpha, sigma, level = noise_levels(FLOW, t)
    u = (t.double() + 1) / 1000
    torch.testing.assert_close(sigma, 3 * u / (1 + 2 * u), rtol=1e-12, atol=0)
    assert torch.equal(level, sigma) and torch.equal(alpha, 1 - sigma) and sigma[-1] == 1.0
    assert num_levels(FLOW) == 1000


def test_one_step_generator_is_z_minus_v_at_s_star():
    den = flow_den()
    z, labels = batch()
    assert OneStep.of(den) == OneStep(1.0, 1.0)
    v = den.unet(z, torch.full((3,), 1000.0, dtype=torch.float64), class_labels=labels).sample
    torch.testing.assert_close(OneStep.of(den)(den, z, labels), z - v, rtol=0, atol=1e-12)
    at_500 = FlowDenoiser(den.unet, dataclasses.replace(FLOW, one_step_timestep=500))
    assert OneStep.of(at_500) == OneStep(pytest.approx(3 * 0.501 / (1 + 2 * 0.501), rel=1e-12), 1.0)


def test_multistep_renoises_on_the_flow_line():
    den = FlowDenoiser(flow_den().unet, Parametrization(kind="flow", num_classes=10, null_class=10, shift=3.0, generator_timesteps=(999, 499)))
    steps = MultiStep.of(den)
    x0, eps = batch()[0], batch(seed=7)[0]
    x_t, level = steps.renoise(x0, 0, eps)
    s = 3 * 0.5 / (1 + 2 * 0.5)
    torch.testing.assert_close(x_t, (1 - s) * x0 + s * eps, rtol=0, atol=1e-14)
    torch.testing.assert_close(level, torch.full((3,), s, dtype=torch.float64), rtol=1e-14, atol=0)


def test_fake_score_loss_is_flow_matching_on_v():
    den = flow_den()
    x, labels = batch(seed=5)
    loss = FakeScoreLoss.for_teacher(den)(den, x, labels, SampleRNG(3, 10, 2, range(6, 9)))
    replay = SampleRNG(3, 10, 2, range(6, 9))
    t = replay.randint(0, 1000)
    eps = replay.randn((1, 8, 8)).double()
    total = 0.0
    for i in range(3):
        u = (int(t[i]) + 1) / 1000
        s = 3 * u / (1 + 2 * u)
        x_s = (1 - s) * x[i : i + 1] + s * eps[i : i + 1]
        v_fake = den.unet(x_s, torch.tensor([s * 1000], dtype=torch.float64), class_labels=labels[i : i + 1]).sample
        total += ((v_fake - (eps[i : i + 1] - x[i : i + 1])) ** 2).sum().item()  # || v_fake - (eps - x0) ||^2
    assert loss.item() == pytest.approx(total / x.numel(), rel=1e-9)


def test_dm_gradient_by_hand():
    """d loss_DM / dx = (p_fake - p_real) / w / numel with the x0 predictions at x_s = (1 - s) x + s eps, s on the grid."""
    real = flow_den(seed=0)
    fake = flow_den(seed=1)
    g, (x, labels) = 2.5, batch(seed=9)
    x = x.clone().requires_grad_(True)
    settings = DMDSettings(guidance_scale=g)
    DistributionMatchingLoss(settings)(x, labels, real, fake, SampleRNG(0, 0, 0, range(3))).backward()

    rng = SampleRNG(0, 0, 0, range(3))  # the same draws, replayed
    t = rng.randint(*dm_timestep_range(settings))
    eps = rng.randn((1, 8, 8)).double()
    u = (t.double() + 1) / 1000
    s = (3 * u / (1 + 2 * u)).reshape(-1, 1, 1, 1)
    assert 0.02 * 3 / 1.04 < float(s.min()) and float(s.max()) <= 1.0
    xd = x.detach()
    x_s = (1 - s) * xd + s * eps

    def v(net, lab):
        return net.unet(x_s, (s * 1000).flatten(), class_labels=lab).sample

    with torch.no_grad():
        null = torch.full((3,), 10)
        v_real = v(real, null) + g * (v(real, labels) - v(real, null))
        p_real, p_fake = x_s - s * v_real, x_s - s * v(fake, labels)
    w = (xd - p_real).abs().mean(dim=(1, 2, 3), keepdim=True)
    want = (p_fake - p_real) / w / xd.numel()
    torch.testing.assert_close(x.grad, want, rtol=1e-9, atol=1e-15)


def test_distill_sets_a_flow_generators_s_star():
    from stages.config import DistillConfig
    from stages.distill.trainer import generator_parametrization

    assert generator_parametrization(DistillConfig(), FLOW) == FLOW  # t* = 999: s* = 1
    assert generator_parametrization(DistillConfig(generator_timestep=500), FLOW).one_step_timestep == 500
    k_step = generator_parametrization(DistillConfig(generator_timesteps=[999, 500]), FLOW)
    assert (k_step.one_step_timestep, k_step.generator_timesteps) == (999, (999, 500))


# ---------------------------------------------------------------- teacher solvers against diffusers' schedulers


def diffusers_loop(sched, net, z: torch.Tensor, labels: torch.Tensor, guidance_scale: float = 1.0) -> torch.Tensor:
    """The SD3 pipeline's denoising loop: CFG on v of a [null; cond] batch, ``scheduler.step`` on it."""
    x = z.clone()
    null = torch.full_like(labels, 10)
    for t in sched.timesteps:
        if guidance_scale == 1.0:
            v = net(x, t.expand(len(x)), class_labels=labels).sample
        else:
            v_u, v_c = net(torch.cat([x, x]), t.expand(2 * len(x)), class_labels=torch.cat([null, labels])).sample.chunk(2)
            v = v_u + guidance_scale * (v_c - v_u)
        x = sched.step(v, t, x, return_dict=False)[0]
    return x


@pytest.mark.parametrize("solver, steps, guidance", [("euler", 6, 1.0), ("heun", 5, 1.0), ("euler", 4, 3.0), ("heun", 3, 3.0)])
def test_solvers_equal_the_diffusers_schedulers(solver, steps, guidance):
    from diffusers import FlowMatchHeunDiscreteScheduler

    den = flow_den()
    z, labels = batch()
    sampler, nfe = teacher_sampler(den, solver, steps, guidance)
    got = sampler(z, labels)
    sched = (FlowMatchEulerDiscreteScheduler if solver == "euler" else FlowMatchHeunDiscreteScheduler)(shift=3.0)
    sched.set_timesteps(steps)
    assert nfe == len(sched.timesteps) == (steps if solver == "euler" else 2 * steps - 1)
    with torch.no_grad():
        want = diffusers_loop(sched, den.unet, z, labels, guidance)
    # the schedulers step in float32 (they upcast the sample to float32), the solvers in float64
    assert float((got - want).norm() / want.norm()) < 1e-5
    unguided = teacher_sampler(den, solver, steps, 1.0)[0](z, labels) if guidance != 1.0 else None
    if unguided is not None:  # the guidance is felt
        assert float((unguided - got).norm() / got.norm()) > 1e-2


def test_euler_with_fluxs_dynamic_shift_equals_the_scheduler():
    param = Parametrization(kind="flow", num_classes=10, null_class=10, image_shape=(1, 8, 8), use_dynamic_shifting=True, image_seq_len=1024)
    den = flow_den(param)
    z, labels = batch()
    base = [1.0, 0.75, 0.5, 0.25]  # FluxPipeline's np.linspace(1.0, 1 / N, N)
    got = flow_euler_sampler(lambda x, s: den.velocity(x, s, labels), z, flow_sampling_sigmas(param, 4, base))
    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    sched.set_timesteps(sigmas=base, mu=flow_mu(param))
    with torch.no_grad():
        want = diffusers_loop(sched, den.unet, z, labels)
    assert float((got - want).norm() / want.norm()) < 1e-5


def test_float32_teacher_within_1e_4():
    from diffusers import FlowMatchHeunDiscreteScheduler

    den = FlowDenoiser(tiny_unet(11, 0), FLOW).requires_grad_(False)
    z, labels = batch()
    z = z.float()
    got = teacher_sampler(den, "heun", 4, 2.0)[0](z, labels)
    assert got.dtype == torch.float32
    sched = FlowMatchHeunDiscreteScheduler(shift=3.0)
    sched.set_timesteps(4)
    with torch.no_grad():
        want = diffusers_loop(sched, den.unet, z, labels, 2.0)
    assert float((got - want).norm() / want.norm()) < 1e-4


def test_solver_choice_for_flow_teachers():
    den = flow_den()
    with pytest.raises(InputError, match=r"^generate.solver=pndm needs a VP teacher; this teacher is a flow model\. Fix: --set generate.solver=heun"):
        teacher_sampler(den, "pndm", 10)
    for kind, fix in (("edm", "an EDM teacher: it steps a flow teacher's ODE. Fix: --set generate.solver=heun"),
                      ("vp", "a VP teacher: it steps a flow teacher's ODE. Fix: --set generate.solver=pndm")):  # fmt: skip
        with pytest.raises(InputError, match=f"^unknown solver 'euler' for {fix} \\(heun: EDM and flow teachers, pndm: VP"):
            check_solver("euler", kind)
    with pytest.raises(InputError, match=r"^unknown solver 'rk4'\. Fix: --set generate.solver=heun \(heun: EDM and flow"):
        check_solver("rk4", "flow")
    check_solver("heun", "flow")
    check_solver("euler", "flow")
    assert default_solver("flow") == "heun"


def test_the_guidance_input_reaches_the_network_in_the_solver():
    """Flux-dev style: each solver call passes the scale as ``guidance`` once, and ``cond`` keywords through."""
    net = GuidanceNet().double()
    den = FlowDenoiser(net, Parametrization(kind="flow", num_classes=10, null_class=10, guidance_embeds=True))
    sampler, nfe = teacher_sampler(den, "euler", 3, 3.5)
    z, labels = batch()
    x = sampler(z, labels)
    assert len(net.calls) == nfe == 3 and all(c["guidance"].tolist() == [3.5] * 3 for c in net.calls)
    # v = 3.5 x: each Euler step multiplies x by 1 + 3.5 (s_{i+1} - s_i)
    sig = flow_sampling_sigmas(den.param, 3)
    factor = torch.prod(1 + 3.5 * (sig[1:] - sig[:-1]))
    torch.testing.assert_close(x, z * factor, rtol=1e-12, atol=1e-12)
