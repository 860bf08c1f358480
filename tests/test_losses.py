"""DMD losses against their formulas; distribution matching on a Gaussian with closed-form scores."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import tiny_unet
from dmd_core import load_denoiser
from dmd_core.denoisers import EDMDenoiser, Parametrization
from dmd_core.dmd import NUM_LEVELS, DistributionMatchingLoss, DMDSettings, FakeScoreLoss, SampleRNG, dm_timestep_range, noise_levels
from dmd_core.errors import InputError
from dmd_core.losses import LPIPSLoss, distribution_matching_loss, dm_normalizer, l2_loss, pseudo_huber_loss


def test_dm_gradient_is_normalised_score_difference():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 5, 5, generator=g, dtype=torch.float64, requires_grad=True)
    # p_real at a different distance from x per sample, so w is far from 1 and differs between samples
    scale = torch.tensor([0.02, 0.3, 3.0, 40.0], dtype=torch.float64).reshape(-1, 1, 1, 1)
    p_real = x.detach() + scale * torch.randn(4, 3, 5, 5, generator=g, dtype=torch.float64)
    p_fake = p_real + torch.randn(4, 3, 5, 5, generator=g, dtype=torch.float64)
    distribution_matching_loss(x, p_real, p_fake).backward()
    by_hand = [sum(abs(a - b) for a, b in zip(xi.flatten().tolist(), pi.flatten().tolist())) / 75 for xi, pi in zip(x.detach(), p_real)]
    w = torch.tensor(by_hand, dtype=torch.float64).reshape(-1, 1, 1, 1)  # mean |x - p_real| per sample
    assert ((w.log().abs()) > 0.5).all()  # no sample has w near 1
    torch.testing.assert_close(x.grad, (p_fake - p_real) / (w * x.numel()), rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(dm_normalizer(x.detach(), p_real), w, rtol=1e-12, atol=0)


def test_dm_loss_value():
    x = torch.zeros(1, 1, 2, 2, requires_grad=True)
    p_real = torch.full((1, 1, 2, 2), 0.5)  # w = 0.5
    p_fake = torch.full((1, 1, 2, 2), 1.5)  # grad = 2 everywhere
    loss = distribution_matching_loss(x, p_real, p_fake)
    assert loss.item() == pytest.approx(0.5 * 4.0)


def test_dm_nan_gives_zero_gradient():
    x = torch.randn(2, 1, 3, 3, dtype=torch.float64, requires_grad=True)
    p_real = torch.randn(2, 1, 3, 3, dtype=torch.float64)
    p_real[0, 0, 1, 1] = float("nan")  # poisons w of sample 0
    p_fake = torch.randn(2, 1, 3, 3, dtype=torch.float64)
    p_fake[1, 0, 0, 0] = float("inf")
    distribution_matching_loss(x, p_real, p_fake).backward()
    assert torch.isfinite(x.grad).all()
    assert (x.grad[0] == 0).all()
    assert x.grad[1, 0, 0, 0] == 0 and (x.grad[1] != 0).sum() == 8


class GaussianDenoiser:
    """Closed-form x0-denoiser of N(m, s^2 I) under VE noise: m + s^2 / (s^2 + sigma^2) (x - m)."""

    def __init__(self, m, s):
        self.m, self.s = m, s
        self.param = Parametrization(kind="edm", sigma_min=0.002, sigma_max=80.0)

    def __call__(self, x, sigma, labels=None, guidance_scale=1.0):
        sig = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        return self.m + self.s**2 / (self.s**2 + sig**2) * (x - self.m)


def test_distribution_matching_moves_affine_generator_to_gaussian_target():
    m_target, s_target, dim = 0.5, 0.3, 16
    real = GaussianDenoiser(m_target, s_target)
    a = torch.full((dim,), 1.0, dtype=torch.float64, requires_grad=True)  # G(z) = a z + b
    b = torch.zeros(dim, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([a, b], lr=0.01)
    settings = DMDSettings(t_min=0.02, t_max=0.98)
    for step in range(1500):
        rng = SampleRNG(0, 0, step, range(128))
        z = rng.randn((dim,)).double()
        x = a * z + b
        # the fake score: closed-form denoiser of the generator's current distribution N(b, a^2)
        fake = GaussianDenoiser(b.detach(), a.detach().abs())
        loss = DistributionMatchingLoss(settings)(x, None, real, fake, rng)
        opt.zero_grad()
        loss.backward()
        opt.step()
    mean, std = b.detach(), a.detach().abs()
    assert (mean - m_target).abs().max().item() < 0.05 * m_target
    assert ((std - s_target).abs() / s_target).max().item() < 0.05


def test_noise_levels_edm_grid():
    param = Parametrization(kind="edm")
    low, high = dm_timestep_range(DMDSettings())
    assert (low, high) == (20, 981)
    alpha, sigma, level = noise_levels(param, torch.tensor([0, 999]))
    assert alpha.tolist() == [1.0, 1.0]
    assert sigma[0].item() == pytest.approx(0.002) and sigma[1].item() == pytest.approx(80.0)
    assert torch.equal(level, sigma)


class _HostToDevice(torch.utils._python_dispatch.TorchDispatchMode):
    """Ops that take a host (CPU) tensor and give a device tensor: on a GPU each such copy from pageable
    memory makes the host wait. The "meta" device stands in for the GPU, so the test runs anywhere."""

    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        leaves = torch.utils._pytree.tree_leaves
        if any(isinstance(a, torch.Tensor) and a.device.type == "cpu" for a in leaves((args, kwargs))) and any(
            isinstance(o, torch.Tensor) and o.device.type == "meta" for o in leaves(out)
        ):
            self.names.append(func.__name__)
        return out


def test_noise_levels_copy_the_edm_grid_to_a_device_once():
    """Every DMD step calls noise_levels twice; its grid is made on the host, so it must be copied once per
    device, not once per call."""
    t = torch.zeros(4, dtype=torch.long, device="meta")
    noise_levels(Parametrization(kind="edm", sigma_max=79.0), t)  # this grid's first use on this device
    with _HostToDevice() as copies:
        for _ in range(3):
            _, sigma, _ = noise_levels(Parametrization(kind="edm", sigma_max=79.0), t)
    assert copies.names == [] and sigma.device.type == "meta"
    with _HostToDevice() as copies:  # another grid: one copy, so the counter does see copies
        noise_levels(Parametrization(kind="edm", sigma_max=78.0), t)
    assert copies.names == ["_to_copy.default"]


def test_t_max_one_reaches_the_last_level_and_no_further():
    assert dm_timestep_range(DMDSettings(t_max=1.0)) == (20, NUM_LEVELS)
    real = GaussianDenoiser(0.0, 1.0)
    seen = []

    def fake(x, sigma, labels=None):
        seen.append(sigma)
        return real(x, sigma)

    loss = DistributionMatchingLoss(DMDSettings(t_max=1.0))
    for step in range(4):  # 4096 draws: a range one level too long would draw level 1000 (past the grid: an IndexError) ~4 times
        rng = SampleRNG(0, 0, step, range(1024))
        loss(torch.zeros(1024, 1, 1, 1, dtype=torch.float64), None, real, fake, rng)
    sigmas = torch.cat(seen)
    assert sigmas.max().item() == pytest.approx(80.0)  # the top of the grid (level 999) is reached


def test_noise_levels_vp():
    abar = torch.linspace(0.99, 0.01, 1000, dtype=torch.float64)
    alpha, sigma, level = noise_levels(Parametrization(kind="vp"), torch.tensor([3, 500]), abar)
    torch.testing.assert_close(alpha**2, abar[[3, 500]])
    torch.testing.assert_close(alpha**2 + sigma**2, torch.ones(2, dtype=torch.float64))
    assert level.tolist() == [3, 500]


def _fake_score_case(den, alphas_cumprod=None):
    """The callable's loss and the same draws (t, then eps, per sample) replayed for the formula."""
    torch.set_num_threads(1)
    x = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 2 - 1
    labels = torch.tensor([0, 4, 9])
    loss = FakeScoreLoss(den.param, alphas_cumprod)(den, x, labels, SampleRNG(3, 10, 2, range(6, 9)))
    replay = SampleRNG(3, 10, 2, range(6, 9))
    t = replay.randint(0, 1000)
    eps = replay.randn((1, 8, 8)).double()
    return x, labels, loss, t, eps


def test_fake_score_loss_edm_formula():
    den = EDMDenoiser(tiny_unet(11), Parametrization(kind="edm", num_classes=10, null_class=10))
    x, labels, loss, t, eps = _fake_score_case(den)
    total = 0.0
    for i in range(3):  # level t of 1000 Karras sigmas, smallest first: sigma_t = sigma_{999 - t} of the largest-first grid
        k = 999 - int(t[i])
        sigma = (80 ** (1 / 7) + k / 999 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
        pred = den(x[i : i + 1] + sigma * eps[i : i + 1], sigma, labels[i : i + 1])
        total += ((1 / sigma**2 + 1 / 0.5**2) * (pred - x[i : i + 1]) ** 2).sum().item()
    assert loss.item() == pytest.approx(total / x.numel(), rel=1e-6)


def test_fake_score_loss_vp_formula(vp_teacher):
    den = load_denoiser(vp_teacher)
    x, labels, loss, t, eps = _fake_score_case(den, den.alphas_cumprod)
    total = 0.0
    for i in range(3):
        abar = den.alphas_cumprod[int(t[i])].item()
        a, s = math.sqrt(abar), math.sqrt(1 - abar)
        x_t = a * x[i : i + 1] + s * eps[i : i + 1]
        pred = den(x_t, int(t[i]), labels[i : i + 1])
        total += (((x_t - a * pred) / s - eps[i : i + 1]) ** 2).sum().item()
    assert loss.item() == pytest.approx(total / x.numel(), rel=1e-6)


def test_fake_score_loss_vp_needs_alphas_cumprod():
    with pytest.raises(ValueError, match="alphas_cumprod"):
        FakeScoreLoss(Parametrization(kind="vp"))


def test_pseudo_huber_and_l2_known_values():
    x = torch.zeros(2, 1, 8, 8)
    y = torch.full((2, 1, 8, 8), 0.1)
    c = 0.00054 * math.sqrt(64)
    assert pseudo_huber_loss(x, y).item() == pytest.approx(math.sqrt(64 * 0.01 + c * c) - c, rel=1e-6)
    assert l2_loss(x, y).item() == pytest.approx(0.01, rel=1e-6)
    assert pseudo_huber_loss(x, x).item() == pytest.approx(0.0, abs=1e-9)


def _random_lpips() -> LPIPSLoss:
    """RANDOM BACKBONE (the ImageNet weights cannot be downloaded here): the values test our preprocessing only.

    Each conv layer's weights and bias uniform in +-1/sqrt(fan_in), as torch's default init, but drawn here:
    torch's uniform_(-b, b) rounds per instruction set (with ATEN_CPU_CAPABILITY=default half of alexnet's
    weights differ, by up to 3.7e-9, and the float64 LPIPS by 4.9e-8 of its value); torch.rand's [0, 1) values
    and the float64 ops after them are the same on every CPU."""
    loss = LPIPSLoss("alex", random_backbone=True)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for conv in (m for m in loss.lpips.net.modules() if isinstance(m, torch.nn.Conv2d)):
            bound = 1 / math.sqrt(conv.weight[0].numel())
            for p in (conv.weight, conv.bias):
                p.copy_((torch.rand(p.shape, generator=g, dtype=torch.float64) * 2 - 1) * bound)
    return loss


def _pair(shape):
    g = torch.Generator().manual_seed(1)
    return torch.rand(*shape, generator=g) * 2 - 1, torch.rand(*shape, generator=g) * 2 - 1


# LPIPSLoss (alex, _random_lpips's backbone) on _pair((2, 1, 8, 8)), taken in float64, where no
# CPU's kernels move it; the float32 run, as training computes it, is held to a tolerance measured with
#     .venv/bin/python tests/kernel_spread.py test_losses:lpips_float64 test_losses:lpips_float32 --reference test_losses:LPIPS_GOLDEN
# (torch 2.14.1 on an AMD EPYC with AVX2, no AVX-512; 14 runs each, 1 and 2 threads x the 7 kernel choices of
# tests/test_dmd_step.py): float64 at most 1.6e-16 from LPIPS_GOLDEN, float32 1.2e-7 (the bounds: 1e6x and 8x).
LPIPS_GOLDEN = 0.17365699124596234
LPIPS_FLOAT64_REL, LPIPS_FLOAT32_REL = 1e-10, 1e-6


def lpips_value(dtype: torch.dtype) -> float:
    x, y = _pair((2, 1, 8, 8))
    return _random_lpips().to(dtype)(x.to(dtype), y.to(dtype)).item()


def lpips_float64() -> float:
    return lpips_value(torch.float64)


def lpips_float32() -> float:
    return lpips_value(torch.float32)


def test_lpips_preprocessing_properties():
    torch.set_num_threads(1)
    loss = _random_lpips()
    x, y = _pair((2, 1, 8, 8))
    assert loss(x, x).item() == 0.0
    v = loss(x, y).item()
    assert v > 0
    assert loss(x.repeat(1, 3, 1, 1), y.repeat(1, 3, 1, 1)).item() == pytest.approx(v, rel=1e-6)  # gray = 3 equal channels
    for size in (224, 256):  # 224 and larger go to LPIPS as they are (resizing 256 to 224 would change the value)
        big_x, big_y = _pair((1, 3, size, size))
        assert loss(big_x, big_y).item() == pytest.approx(loss.lpips(big_x, big_y).mean().item(), rel=1e-6)


def test_lpips_golden_value():
    torch.set_num_threads(1)
    assert lpips_float64() == pytest.approx(LPIPS_GOLDEN, rel=LPIPS_FLOAT64_REL)
    assert lpips_float32() == pytest.approx(LPIPS_GOLDEN, rel=LPIPS_FLOAT32_REL)


def test_lpips_missing_weights_names_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(InputError) as e:
        LPIPSLoss("vgg")
    assert "vgg16-397923af.pth" in str(e.value) and "pseudo_huber" in str(e.value)
