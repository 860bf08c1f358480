"""DMD losses against their formulas; distribution matching on a Gaussian with closed-form scores."""

from __future__ import annotations

import math

import pytest
import torch

from dmd_core.denoisers import Parametrization
from dmd_core.dmd import DMDSettings, SampleRNG, distribution_matching_term, dm_timestep_range, noise_levels
from dmd_core.errors import InputError
from dmd_core.losses import LPIPSLoss, distribution_matching_loss, dm_normalizer, l2_loss, pseudo_huber_loss


def test_dm_gradient_is_normalised_score_difference():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 5, 5, generator=g, dtype=torch.float64, requires_grad=True)
    p_real = torch.randn(4, 3, 5, 5, generator=g, dtype=torch.float64)
    p_fake = torch.randn(4, 3, 5, 5, generator=g, dtype=torch.float64)
    distribution_matching_loss(x, p_real, p_fake).backward()
    w = (x.detach() - p_real).abs().mean(dim=(1, 2, 3), keepdim=True)
    torch.testing.assert_close(x.grad, (p_fake - p_real) / w / x.numel(), rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(dm_normalizer(x.detach(), p_real), w)


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
        loss, _ = distribution_matching_term(x, None, real, fake, settings, rng)
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


def test_noise_levels_vp():
    abar = torch.linspace(0.99, 0.01, 1000, dtype=torch.float64)
    alpha, sigma, level = noise_levels(Parametrization(kind="vp"), torch.tensor([3, 500]), abar)
    torch.testing.assert_close(alpha**2, abar[[3, 500]])
    torch.testing.assert_close(alpha**2 + sigma**2, torch.ones(2, dtype=torch.float64))
    assert level.tolist() == [3, 500]


def test_pseudo_huber_and_l2_known_values():
    x = torch.zeros(2, 1, 8, 8)
    y = torch.full((2, 1, 8, 8), 0.1)
    c = 0.00054 * math.sqrt(64)
    assert pseudo_huber_loss(x, y).item() == pytest.approx(math.sqrt(64 * 0.01 + c * c) - c, rel=1e-6)
    assert l2_loss(x, y).item() == pytest.approx(0.01, rel=1e-6)
    assert pseudo_huber_loss(x, x).item() == pytest.approx(0.0, abs=1e-9)


def test_lpips_random_backbone_matches_direct_call():
    """RANDOM BACKBONE (the ImageNet weights cannot be downloaded here): checks our preprocessing only."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    loss = LPIPSLoss("alex", random_backbone=True)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 1, 8, 8, generator=g) * 2 - 1
    y = torch.rand(2, 1, 8, 8, generator=g) * 2 - 1
    up = lambda t: F.interpolate(t.repeat(1, 3, 1, 1), size=(224, 224), mode="bilinear", align_corners=False)  # noqa: E731
    direct = loss.lpips(up(x), up(y)).mean()
    assert loss(x, y).item() == pytest.approx(direct.item(), rel=1e-6)
    assert loss(x, x).item() == pytest.approx(0.0, abs=1e-7)
    assert loss(x, y).item() > 0


def test_lpips_missing_weights_names_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(InputError) as e:
        LPIPSLoss("vgg")
    assert "vgg16-397923af.pth" in str(e.value) and "pseudo_huber" in str(e.value)
