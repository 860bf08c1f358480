"""distill.optimizer: adamw (torch's fused AdamW) or adamw8bit (bitsandbytes, CUDA): refused where it cannot run,
naming the fix, before any stage computes; in the cache key only when set. (The 8-bit run and its resume are in
benchmarks/gpu_check.py --parts optimizer8bit: bitsandbytes' 8-bit kernels need CUDA.)"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from conftest import run_cli, write_config
from dmd_core.errors import InputError
from stages import distill
from stages.config import OptimizerConfig, load_config


@pytest.fixture
def cfg(tmp_path, edm_teacher):
    return write_config(tmp_path / "c.yaml", edm_teacher, tmp_path / "store", distill={})


def test_8bit_on_cpu_is_refused_before_generate(cfg, tmp_path):
    r = run_cli("distill", "--config", str(cfg), "-q", "--set", "distill.optimizer=adamw8bit", check=False)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "error: distill.optimizer=adamw8bit needs a CUDA GPU" in r.stderr and "Fix: --set distill.optimizer=adamw on CPU" in r.stderr
    assert not (tmp_path / "store" / "generate").exists() or not any((tmp_path / "store" / "generate").iterdir())


def test_8bit_without_bitsandbytes_names_the_install(cfg, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(InputError, match="needs bitsandbytes, which is not installed. Fix: pip install bitsandbytes"):
        distill.check_optimizer(load_config(cfg, ["distill.optimizer=adamw8bit"]).distill)
    distill.check_optimizer(load_config(cfg).distill)  # adamw needs nothing


def test_8bit_enters_the_key_only_when_set(cfg):
    assert "optimizer" not in distill._optional_upstream(load_config(cfg))
    assert "optimizer" not in distill._optional_upstream(load_config(cfg, ["distill.optimizer=adamw"]))
    assert distill._optional_upstream(load_config(cfg, ["distill.optimizer=adamw8bit"]))["optimizer"] == "adamw8bit"


def test_adamw_is_torch_fused_adamw_with_the_configured_settings():
    """One step of make_optimizer's AdamW against AdamW's closed form (first step: lr * g / (|g| + eps) after decay)."""
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64))
    o = OptimizerConfig(lr=0.1, betas=(0.9, 0.99), weight_decay=0.01)
    opt = distill.trainer.make_optimizer([w], o, "adamw")
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["fused"]
    g = torch.tensor([0.3, -0.2, 0.0], dtype=torch.float64)
    w.grad = g.clone()
    opt.step()
    expected = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64) * (1 - 0.1 * 0.01) - 0.1 * g / (g.abs() + 1e-8)
    assert torch.allclose(w.detach(), expected, rtol=0, atol=1e-12)
