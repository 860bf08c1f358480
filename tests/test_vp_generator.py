"""The VP one-step generator's parametrisation: G(z) = x0_theta(z, t*) (docs/math.md §5)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT, write_config
from dmd_core import load_denoiser
from dmd_core.denoisers import Parametrization
from dmd_core.dmd import VP_GENERATOR_TIMESTEP, OneStep
from dmd_core.errors import InputError
from dmd_core.shards import sample_labels, sample_noise
from dmd_core.solvers import teacher_sampler
from stages import chain
from stages.config import load_config


def scaled_linear_alphas_cumprod() -> np.ndarray:
    """Stable Diffusion's schedule by hand: beta_t = (linspace(sqrt(0.00085), sqrt(0.012), 1000))^2."""
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    return np.cumprod(1 - betas)


@pytest.mark.parametrize("timestep", [None, 1, 300, VP_GENERATOR_TIMESTEP, 999])
def test_one_step_level_and_scale_against_the_schedule(vp_teacher, timestep):
    den = load_denoiser(vp_teacher)
    den.param = dataclasses.replace(den.param, one_step_timestep=timestep)
    g = OneStep.of(den)
    t = 999 if timestep is None else timestep
    abar = scaled_linear_alphas_cumprod()[t]
    assert g.level == t and g.scale == 1.0
    # by hand: x0 = (z - sigma eps) / alpha, alpha and sigma from the schedule (diffusers: float32)
    z, labels = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 4, 9])
    with torch.no_grad():
        x = z
        eps = den.unet(x, torch.full((3,), t), class_labels=labels).sample.double()
        want = (x.double() - (1 - abar) ** 0.5 * eps) / abar**0.5
        got = g(den, z, labels)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


def test_edm_one_step_is_sigma_max(edm_teacher):
    den = load_denoiser(edm_teacher)
    assert OneStep.of(den) == OneStep(den.param.sigma_max, den.param.sigma_max)


def test_initial_one_step_std_is_within_2x_of_the_teachers_samples():
    """On the embedded VP teacher: G at initialisation (= the teacher at t*) against PLMS-50 samples."""
    torch.set_num_threads(2)
    den = load_denoiser(ROOT / "data" / "teacher-vp")
    n = 64
    z, labels = sample_noise(0, range(n), (1, 8, 8)), sample_labels(range(n), 10)
    with torch.no_grad():
        teacher = teacher_sampler(den, "pndm", 50)[0](z, labels)
        den.param = dataclasses.replace(den.param, one_step_timestep=VP_GENERATOR_TIMESTEP)
        x = OneStep.of(den)(den, z, labels)
    ratio = float(x.std() / teacher.std())
    assert 0.5 <= ratio <= 2.0, ratio


def test_parametrization_checks_the_timestep():
    Parametrization.from_dict({"kind": "vp", "one_step_timestep": 500})
    for bad in ({"kind": "edm", "one_step_timestep": 500}, {"kind": "vp", "one_step_timestep": 1000}, {"kind": "vp", "one_step_timestep": 2.5}):
        with pytest.raises(ValueError, match="one_step_timestep"):
            Parametrization.from_dict(bad)


@pytest.mark.parametrize("setting", [None, 300])
def test_distill_writes_the_generator_timestep(tmp_path, vp_teacher, setting):
    cfg_path = write_config(tmp_path / "c.yaml", vp_teacher, tmp_path / "store", distill={"steps": 2}, solver="pndm", num_samples=16)
    cfg = load_config(cfg_path, [f"distill.generator_timestep={setting}"] if setting else [])
    chain.run(cfg, "generate", progress=False).manifest
    m = chain.run(cfg, "distill", progress=False).manifest
    out = Path(cfg.store) / "distill" / m.key
    want = setting or VP_GENERATOR_TIMESTEP
    for net in ("generator", "generator_ema"):
        if (out / net).is_dir():
            assert json.loads((out / net / "denoiser.json").read_text())["one_step_timestep"] == want
            assert load_denoiser(out / net).param.one_step_timestep == want
    assert json.loads((out / "fake_score" / "denoiser.json").read_text())["one_step_timestep"] is None


def test_generator_timestep_is_refused_for_edm(tmp_path, edm_teacher):
    cfg_path = write_config(tmp_path / "c.yaml", edm_teacher, tmp_path / "store", distill={})
    cfg = load_config(cfg_path, ["distill.generator_timestep=500"])
    chain.run(cfg, "generate", progress=False).manifest
    with pytest.raises(InputError, match="generator_timestep applies to VP teachers"):
        chain.plan(cfg, "distill")
