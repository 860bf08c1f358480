"""The stage contract and the checks a run makes before anything computes."""

from __future__ import annotations

import subprocess
import sys

import pytest
from diffusers import UNet2DModel

from conftest import ROOT, add_tiny_evaluate, write_config
from dmd_core.denoisers import EDMDenoiser, Parametrization
from dmd_core.errors import InputError
from dmd_core.loading import save_denoiser
from stages import chain
from stages.config import load_config
from stages.contract import STAGES, Teacher
from stages.store import LocalStore


def rgb_edm_teacher(path):
    """A 3x16x16 class-conditional EDM teacher (random weights)."""
    unet = UNet2DModel(sample_size=16, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4, num_class_embeds=11)  # fmt: skip
    param = Parametrization(kind="edm", num_classes=10, null_class=10, image_shape=(3, 16, 16))
    return save_denoiser(EDMDenoiser(unet, param), path)


def test_digits_features_are_refused_for_images_they_cannot_read(tmp_path):
    """evaluate.features=digits reads 1x8x8 images: a 3x16x16 teacher is refused before generate runs."""
    cfg = load_config(add_tiny_evaluate(write_config(tmp_path / "c.yaml", rgb_edm_teacher(tmp_path / "t"), tmp_path / "store", distill={})))
    with pytest.raises(InputError, match=r"evaluate.features=digits measures 1x8x8 digit images; this teacher makes 3x16x16.*Fix: --set evaluate.features=inception"):
        chain.check(cfg, "export")
    chain.check(cfg, "distill")  # the stages before evaluate do not ask for it
    assert not (tmp_path / "store" / "generate").exists()


def test_dmd_run_refuses_a_missing_teacher_before_the_prefect_server(tmp_path):
    """One error line, exit 2, no flow run started (no Prefect output, nothing in the store)."""
    cfg = write_config(tmp_path / "c.yaml", tmp_path / "no-such-teacher", tmp_path / "store")
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--config", str(cfg)], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: model directory not found") and "Fix:" in lines[0], proc.stderr
    assert "flow run" not in proc.stderr.lower() and "prefect" not in proc.stderr.lower()
    assert not (tmp_path / "store").exists()


def test_teacher_is_read_once_per_process(edm_teacher):
    a, b = Teacher.at(str(edm_teacher), "d"), Teacher.at(str(edm_teacher), "d")
    assert a is b and a.image_shape == (1, 8, 8) and not a.takes_prompts and a.guidable


def test_every_stage_has_a_module_with_the_contract():
    from stages.registry import module

    for s in STAGES:
        m = module(s.name)
        assert callable(m.plan) and callable(m.build) and callable(m.run_distributed), s.name


def test_store_names_outputs_and_partial_builds(tmp_path):
    store = LocalStore(tmp_path)
    out = store.output_dir("generate", "abc")
    assert out == tmp_path / "generate" / "abc"
    assert store.partial_dir(out) == tmp_path / "generate" / ".abc.partial"
    assert store.final_dir(store.partial_dir(out)) == out and store.final_dir(out) == out
    assert store.scratch_dir("flow-plans") == tmp_path / ".flow-plans"
