"""Preconditioning, CFG, VP conversions and loading, against closed forms."""

from __future__ import annotations

import json
import math

import pytest
import torch
from diffusers import UNet2DModel
from torch import nn

from conftest import make_edm_teacher, make_vp_teacher
from dmd_core import load_denoiser
from dmd_core.denoisers import EDMDenoiser, Parametrization, VPDenoiser, cfg_combine, edm_precond, karras_sigmas
from dmd_core.errors import InputError
from dmd_core.loading import load_unet


class StubUNet(nn.Module):
    """F(x, t, class) = 2 x + t + class (or + 0 without classes), with diffusers' calling convention."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(()))

    def forward(self, x, t, class_labels=None, return_dict=False):
        out = 2 * x + t.reshape(-1, 1, 1, 1).to(x.dtype)
        if class_labels is not None:
            out = out + class_labels.reshape(-1, 1, 1, 1).to(x.dtype)
        return (out,)


@pytest.mark.parametrize("sigma", [0.002, 0.5, 1.0, 80.0])
def test_edm_precond_closed_form(sigma):
    sd = 0.5
    c_skip, c_out, c_in, c_noise = edm_precond(torch.tensor(sigma, dtype=torch.float64), sd)
    assert c_skip.item() == pytest.approx(sd**2 / (sigma**2 + sd**2), rel=1e-12)
    assert c_out.item() == pytest.approx(sigma * sd / math.sqrt(sigma**2 + sd**2), rel=1e-12)
    assert c_in.item() == pytest.approx(1 / math.sqrt(sigma**2 + sd**2), rel=1e-12)
    assert c_noise.item() == pytest.approx(math.log(sigma) / 4, rel=1e-12)


def test_edm_precond_known_values():
    c_skip, c_out, c_in, c_noise = edm_precond(torch.tensor(0.5, dtype=torch.float64), 0.5)
    assert (c_skip.item(), c_out.item(), c_in.item(), c_noise.item()) == pytest.approx(
        (0.5, 0.3535533905932738, 1.4142135623730951, -0.17328679513998632), rel=1e-12
    )


def test_edm_wrapper_is_cskip_x_plus_cout_F():
    den = EDMDenoiser(StubUNet(), Parametrization(kind="edm"))
    x = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    sigma = torch.tensor([0.1, 1.0, 20.0], dtype=torch.float64)
    c_skip, c_out, c_in, c_noise = (c.reshape(-1, 1, 1, 1) for c in edm_precond(sigma, 0.5))
    expected = c_skip * x + c_out * (2 * c_in * x + c_noise.float().double())
    torch.testing.assert_close(den(x, sigma), expected, rtol=1e-6, atol=1e-6)


def test_cfg_formula_on_x0():
    den = EDMDenoiser(StubUNet(), Parametrization(kind="edm", num_classes=3, null_class=3))
    x = torch.randn(2, 1, 4, 4, dtype=torch.float64)
    labels = torch.tensor([0, 2])
    cond = den(x, 2.0, labels)
    uncond = den(x, 2.0, None)
    for g in (0.0, 1.0, 1.75, 4.0):
        torch.testing.assert_close(den(x, 2.0, labels, guidance_scale=g), uncond + g * (cond - uncond))
    assert cfg_combine(torch.tensor(1.0), torch.tensor(3.0), 1.5).item() == 4.0
    # the unconditional branch used the null class: the stub adds the label, c_out(2)*3 more than class 0
    c_out = edm_precond(torch.tensor(2.0, dtype=torch.float64), 0.5)[1].item()
    torch.testing.assert_close(uncond[0] - cond[0], torch.full_like(x[0], 3 * c_out))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_vp_conversion_recovers_x0(prediction_type):
    abar = torch.linspace(0.999, 0.01, 1000, dtype=torch.float64)
    x0 = torch.randn(4, 1, 4, 4, dtype=torch.float64)
    eps = torch.randn_like(x0)
    t = torch.tensor([0, 250, 600, 999])
    a, s = abar[t].sqrt().reshape(-1, 1, 1, 1), (1 - abar[t]).sqrt().reshape(-1, 1, 1, 1)
    xt = a * x0 + s * eps
    target = {"epsilon": eps, "v_prediction": a * eps - s * x0, "sample": x0}[prediction_type]

    class Oracle(nn.Module):  # predicts exactly the right target
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones((), dtype=torch.float64))

        def forward(self, x, tt, return_dict=False):
            return (target,)

    den = VPDenoiser(Oracle(), Parametrization(kind="vp", prediction_type=prediction_type), abar, {})
    torch.testing.assert_close(den(xt, t), x0, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(den.model_output(xt, t), target, rtol=1e-9, atol=1e-9)
    for kind, want in (("epsilon", eps), ("v_prediction", a * eps - s * x0), ("sample", x0)):  # any type on request
        torch.testing.assert_close(den.model_output(xt, t, prediction_type=kind), want, rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError, match="unknown prediction_type"):
        den.model_output(xt, t, prediction_type="flow")
    alpha, sigma = den.alpha_sigma(t)
    torch.testing.assert_close(alpha**2 + sigma**2, torch.ones(4, dtype=torch.float64))


def test_karras_sigmas_endpoints_and_formula():
    s = karras_sigmas(18, 0.002, 80.0)
    assert s[0].item() == pytest.approx(80.0, rel=1e-12) and s[-1].item() == pytest.approx(0.002, rel=1e-12)
    i = 5
    expected = (80 ** (1 / 7) + i / 17 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    assert s[i].item() == pytest.approx(expected, rel=1e-12)
    assert bool((s[1:] < s[:-1]).all())


def test_load_denoiser_roundtrip(tmp_path):
    path = make_edm_teacher(tmp_path / "t")
    den = load_denoiser(path)
    assert isinstance(den, EDMDenoiser) and den.sigma_min == 0.002 and den.sigma_max == 80.0
    assert den.num_classes == 10 and den.null_class == 10
    unet = UNet2DModel.from_pretrained(str(path))  # plain diffusers loads the same directory
    x = torch.randn(2, 1, 8, 8)
    t = torch.tensor([0.1, -0.3])
    labels = torch.tensor([1, 10])
    torch.testing.assert_close(unet(x, t, class_labels=labels).sample, den.unet(x, t, class_labels=labels).sample)
    assert den(x, torch.tensor([0.5, 3.0]), labels).shape == x.shape
    assert not any(p.requires_grad for p in den.parameters())


def test_loading_a_unet_never_initialises_weights_it_overwrites(tmp_path, monkeypatch):
    """Random initialisation runs on the meta device only (free); the load then fills every weight."""
    path = make_edm_teacher(tmp_path / "t")
    devices = []
    kaiming = nn.init.kaiming_uniform_  # what nn.Conv2d and nn.Linear initialise with

    def recording(tensor, *args, **kwargs):
        devices.append(tensor.device.type)
        return kaiming(tensor, *args, **kwargs)

    monkeypatch.setattr(nn.init, "kaiming_uniform_", recording)
    unet = load_unet(path)
    assert devices and set(devices) == {"meta"}, devices
    saved = UNet2DModel.from_pretrained(str(path)).state_dict()
    assert unet.state_dict().keys() == saved.keys()
    assert all(torch.equal(unet.state_dict()[k], saved[k]) for k in saved)


def test_a_unet_with_computed_buffers_is_built_the_ordinary_way(tmp_path, monkeypatch):
    """A tensor that __init__ computes and no weights file holds (a non-persistent buffer) keeps its value."""
    import functools

    init = UNet2DModel.__init__

    @functools.wraps(init)  # diffusers reads the config's names from this signature
    def with_computed_buffer(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.register_buffer("table", torch.arange(4.0), persistent=False)

    monkeypatch.setattr(UNet2DModel, "__init__", with_computed_buffer)
    unet = load_unet(make_edm_teacher(tmp_path / "t"))
    assert torch.equal(unet.table, torch.arange(4.0)) and not any(p.is_meta for p in unet.parameters())


def test_saving_a_loaded_unet_leaves_its_config_as_it_was(tmp_path):
    """diffusers' first save writes two keys into the live config; a compiled forward guards on the config."""
    unet = load_unet(make_edm_teacher(tmp_path / "t"))
    before = dict(unet.config)
    unet.save_pretrained(str(tmp_path / "saved"))
    assert dict(unet.config) == before


def test_load_vp_denoiser(tmp_path):
    path = make_vp_teacher(tmp_path / "vp", prediction_type="v_prediction")
    den = load_denoiser(path)
    assert isinstance(den, VPDenoiser) and den.num_train_timesteps == 1000
    assert den.param.prediction_type == "v_prediction"


def test_load_errors(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_denoiser(tmp_path / "nope")
    path = make_edm_teacher(tmp_path / "t")
    cfg = json.loads((path / "config.json").read_text())
    cfg["block_out_channels"] = [16, 32]
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError, match="do not match"):
        load_denoiser(path)


@pytest.mark.parametrize("sample_size", [8, [8, 8]])
def test_image_shape_comes_from_the_unet_config_when_absent(tmp_path, sample_size):
    path = make_edm_teacher(tmp_path / "t")
    param = json.loads((path / "denoiser.json").read_text())
    del param["image_shape"]
    (path / "denoiser.json").write_text(json.dumps(param))
    cfg = json.loads((path / "config.json").read_text())
    cfg["sample_size"] = sample_size
    (path / "config.json").write_text(json.dumps(cfg))
    assert load_denoiser(path).param.image_shape == (1, 8, 8)


def test_image_shape_neither_in_denoiser_json_nor_unet_config(tmp_path):
    path = make_edm_teacher(tmp_path / "t")
    param = json.loads((path / "denoiser.json").read_text())
    param["image_shape"] = None
    (path / "denoiser.json").write_text(json.dumps(param))
    cfg = json.loads((path / "config.json").read_text())
    cfg["sample_size"] = None
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError, match="image_shape"):
        load_denoiser(path)
