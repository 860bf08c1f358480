"""Heun against the exact probability-flow ODE solution of Gaussian data; PNDM against diffusers' own loop."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import PNDMScheduler

from conftest import make_vp_teacher
from dmd_core import load_denoiser
from dmd_core.errors import InputError
from dmd_core.solvers import heun_nfe, heun_sampler, pndm_nfe, pndm_sampler, teacher_sampler

M, S = 0.3, 0.1  # data ~ N(M, S^2 I)
SMIN, SMAX = 0.002, 80.0


def gaussian_denoiser(x, sigma):
    """Exact x0-denoiser of N(M, S^2 I): E[x0 | x_sigma] = M + S^2/(S^2 + sigma^2) (x - M)."""
    return M + S**2 / (S**2 + sigma**2) * (x - M)


def exact_solution(z):
    """PF-ODE from x(SMAX) = SMAX z to sigma = 0: x(sigma) - M scales with sqrt(S^2 + sigma^2)."""
    return M + (SMAX * z - M) * S / math.sqrt(S**2 + SMAX**2)


def heun_error(steps, z):
    y = heun_sampler(gaussian_denoiser, z, steps, SMIN, SMAX)
    return (y - exact_solution(z)).abs().max().item()


def test_heun_nfe():
    assert heun_nfe(18) == 35


def test_heun_converges_to_exact_solution():
    z = torch.randn(64, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert heun_error(1024, z) < 1e-4


def test_heun_is_second_order():
    z = torch.randn(64, 1, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    e18, e36, e72 = (heun_error(n, z) for n in (18, 36, 72))
    assert e18 > 1e-3 * S  # Heun-18 is not exact on a narrow Gaussian ...
    assert 3.0 < e18 / e36 < 5.0  # ... but halving the step divides the error by ~4
    assert 3.0 < e36 / e72 < 5.0


def test_heun_counts_network_evaluations():
    calls = []

    def counting(x, sigma):
        calls.append(float(sigma))
        return gaussian_denoiser(x, sigma)

    heun_sampler(counting, torch.zeros(1, 1, 2, 2, dtype=torch.float64), 18, SMIN, SMAX)
    assert len(calls) == 35
    assert calls[0] == pytest.approx(SMAX) and min(calls) == pytest.approx(SMIN)


def test_pndm_matches_diffusers_loop(vp_teacher):
    den = load_denoiser(vp_teacher)
    z = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([1, 2, 3])
    ours = pndm_sampler(den, z, steps=20, class_labels=labels)

    # diffusers' own loop, written as its docs show it
    sched = PNDMScheduler.from_pretrained(str(vp_teacher / "scheduler"), skip_prk_steps=True)
    sched.set_timesteps(20)
    x = z * sched.init_noise_sigma
    with torch.no_grad():
        for t in sched.timesteps:
            eps = den.unet(x, t, class_labels=labels).sample
            x = sched.step(eps, t, x).prev_sample
    torch.testing.assert_close(ours, x, rtol=1e-5, atol=1e-5)
    assert pndm_nfe(den, 50) == 51  # PLMS with skip_prk_steps: 50 steps + the warm-up repeat


def test_pndm_sample_teacher_steps_on_epsilon(tmp_path):
    """PNDMScheduler takes epsilon or v only: an x0 ("sample") teacher's prediction is fed to it as epsilon."""
    path = make_vp_teacher(tmp_path / "vp-sample", prediction_type="sample")
    den = load_denoiser(path)
    z = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([1, 2, 3])
    ours = pndm_sampler(den, z, steps=20, class_labels=labels)

    sched = PNDMScheduler.from_pretrained(str(path / "scheduler"), skip_prk_steps=True, prediction_type="epsilon")
    sched.set_timesteps(20)
    abar = sched.alphas_cumprod.to(torch.float64)
    x = z * sched.init_noise_sigma
    with torch.no_grad():
        for t in sched.timesteps:
            x0 = den.unet(x, t, class_labels=labels).sample
            alpha, sigma = abar[t].sqrt(), (1 - abar[t]).sqrt()
            eps = ((x.double() - alpha * x0.double()) / sigma).float()
            x = sched.step(eps, t, x).prev_sample
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(ours, x, rtol=0, atol=1e-5)


def test_teacher_sampler_heun_is_heun_sampler(edm_teacher):
    den = load_denoiser(edm_teacher)
    z = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([4, 7])
    sample, nfe = teacher_sampler(den, "heun", 3, guidance_scale=1.5)
    direct = heun_sampler(lambda x, s: den(x, s, labels, 1.5), z, 3, den.sigma_min, den.sigma_max)
    assert torch.equal(sample(z, labels), direct)
    assert nfe == 5 and teacher_sampler(den, "heun", 18, 1.0)[1] == 35


def test_teacher_sampler_pndm_is_pndm_sampler(vp_teacher):
    den = load_denoiser(vp_teacher)
    z = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([4, 7])
    sample, nfe = teacher_sampler(den, "pndm", 5, guidance_scale=2.0)
    assert torch.equal(sample(z, labels), pndm_sampler(den, z, 5, labels, 2.0))
    assert nfe == pndm_nfe(den, 5) and teacher_sampler(den, "pndm", 50)[1] == pndm_nfe(den, 50) == 51


def test_teacher_sampler_refuses_the_wrong_teacher_kind(edm_teacher, vp_teacher):
    with pytest.raises(InputError) as e:
        teacher_sampler(load_denoiser(vp_teacher), "heun", 18, 1.0)
    assert str(e.value) == "generate.solver=heun needs an EDM teacher; this teacher is VP. Fix: --set generate.solver=pndm"
    with pytest.raises(InputError) as e:
        teacher_sampler(load_denoiser(edm_teacher), "pndm", 50, 1.0)
    assert str(e.value) == "generate.solver=pndm needs a VP teacher; this teacher is EDM. Fix: --set generate.solver=heun"
    with pytest.raises(InputError, match="unknown solver 'euler'"):
        teacher_sampler(load_denoiser(edm_teacher), "euler", 18, 1.0)
