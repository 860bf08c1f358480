"""Numeric settings past what they drive (memory, disk, time, the teacher's schedule): each refused before any
stage starts, with one ``error:`` line naming the setting, its bound and the fix (exit 2). Bounds that need no
teacher are the config's (one ``--set`` each below); the ones that do are stages.checks.check_limits' and the
distill stage's, checked on teachers built here: a VP teacher on 500 timesteps, a 2048x2048 one, pipelines
whose model_index.json names a library diffusers cannot load.
"""

from __future__ import annotations

import importlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import add_tiny_evaluate, tiny_unet, write_config
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from refusal import assert_refused, nothing_started

from dmd_core.denoisers import EDMDenoiser, Parametrization, VPDenoiser
from dmd_core.loading import save_denoiser

importlib.import_module("flows.cli")  # imported at collection: each case then runs its command only


def le(bound) -> str:
    return f"less than or equal to {bound}"


# One per bound the config holds, with the bound in the line: each was accepted, then failed mid-stage, ran
# for days, or (generate.steps=1e9: 20.8 GB for its sigma grid; num_threads=1e5: libgomp aborted) took the process down.
SET_CASES = [
    pytest.param("generate.steps=1000000000", ("generate.steps", le(1000)), id="solver-steps"),
    pytest.param("evaluate.teacher_steps=1000000", ("evaluate.teacher_steps", le(1000)), id="teacher-steps"),
    pytest.param("distill.batch_size=100000000", ("distill.batch_size", le(65536)), id="distill-batch"),
    pytest.param("evaluate.speed_batch_size=100000000", ("evaluate.speed_batch_size", le(65536)), id="speed-batch"),
    pytest.param("generate.shard_size=1000000000000", ("generate.shard_size", le(1000000000)), id="shard-size"),
    pytest.param("distill.real_samples=1000000000000", ("distill.real_samples", le(1000000000)), id="real-samples"),
    pytest.param("distill.shuffle_buffer=1000000000000", ("distill.shuffle_buffer", le(1000000000)), id="shuffle-buffer"),
    pytest.param("distill.eval_samples=1000000000000", ("distill.eval_samples", le(1000000000)), id="eval-samples"),
    pytest.param("distill.checkpoint_every=1000000000000", ("distill.checkpoint_every", le(1000000000)), id="checkpoint-every"),
    pytest.param("distill.sample_every=1000000000000", ("distill.sample_every", le(1000000000)), id="sample-every"),
    pytest.param("distill.keep_checkpoints=1000000", ("distill.keep_checkpoints", le(1000)), id="keep-checkpoints"),
    pytest.param("distill.guidance_scale=1e30", ("distill.guidance_scale", le(100)), id="guidance-distill"),
    pytest.param("generate.guidance_scale=1e30", ("generate.guidance_scale", le(100)), id="guidance-generate"),
    pytest.param("distill.generator_optimizer.lr=10", ("distill.generator_optimizer.lr", le(1)), id="lr"),
    pytest.param("distill.fake_optimizer={lr: 1.0, weight_decay: 1.0}", ("distill.fake_optimizer", "lr x weight_decay", "Fix: lower"), id="weight-decay"),
    pytest.param("distill.regression_weight=1e9", ("distill.regression_weight", le(1000)), id="regression-weight"),
    pytest.param("distill.gan_weight_discriminator=1e6", ("distill.gan_weight_discriminator", le(1000)), id="gan-weight"),
    pytest.param("distill.fake_updates_per_generator_update=1000000", ("distill.fake_updates_per_generator_update", le(100)), id="fake-updates"),
    pytest.param("distill.gradient_accumulation_steps=1000000", ("distill.gradient_accumulation_steps", le(100)), id="accumulation"),
    pytest.param("distill.max_grad_norm=1e30", ("distill.max_grad_norm", le(1000000)), id="grad-norm"),
    pytest.param("distill.lpips_resolution=100000", ("distill.lpips_resolution", le(4096)), id="lpips-resolution"),
    pytest.param("generate.num_threads=100000", ("generate.num_threads", le(1024)), id="threads"),
    pytest.param("distill.num_workers=1000000", ("distill.num_workers", le(256)), id="workers"),
    pytest.param("generate.seed=18446744073709551616", ("generate.seed", le(2**63 - 1)), id="seed"),
    pytest.param("evaluate.speed_repeats=1000000", ("evaluate.speed_repeats", le(100)), id="speed-repeats"),
    pytest.param("export.opset=21", ("export.opset", le(20)), id="opset"),
    pytest.param("export.parity_samples=10000000", ("export.parity_samples", le(1024)), id="parity-samples"),
    pytest.param("export.onnx_tolerance=1", ("export.onnx_tolerance", "less than 1"), id="onnx-tolerance"),
]


@pytest.mark.parametrize("override, needles", SET_CASES)
def test_a_setting_past_its_bound_is_refused(tmp_path, edm_teacher, override, needles):
    store = tmp_path / "store"
    cfg = write_config(tmp_path / "c.yaml", edm_teacher, store, distill={})
    with nothing_started(store):
        assert_refused(["generate", "--config", str(cfg), "--set", override], store, *needles)


# ---------------------------------------------------------------- bounds that depend on the teacher


def make_vp500_teacher(path: Path) -> Path:
    """A VP teacher whose schedule has 500 timesteps (DDPM and Stable Diffusion have 1000)."""
    sched = DDPMScheduler(num_train_timesteps=500, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    param = Parametrization(kind="vp", num_classes=10, null_class=10, image_shape=(1, 8, 8))
    return save_denoiser(VPDenoiser(tiny_unet(11), param, sched.alphas_cumprod, dict(sched.config)), path)


@pytest.fixture(scope="module")
def vp500_teacher(tmp_path_factory) -> Path:
    return make_vp500_teacher(tmp_path_factory.mktemp("teacher") / "vp500")


@pytest.fixture(scope="module")
def large_teacher(tmp_path_factory) -> Path:
    """An EDM teacher of 1x2048x2048 images (the tiny UNet's weights do not depend on the image size)."""
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=2048, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16), norm_num_groups=4,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"), num_class_embeds=11)  # fmt: skip
    param = Parametrization(kind="edm", num_classes=10, null_class=10, image_shape=(1, 2048, 2048))
    return save_denoiser(EDMDenoiser(unet, param), tmp_path_factory.mktemp("teacher") / "large")


TEACHER_CASES = [  # (teacher, command, --set values, needles)
    pytest.param("vp500", "generate", ["generate.steps=600"], ("generate.steps=600", "500 timesteps", "Fix: --set generate.steps=50"), id="pndm-steps-vs-T"),
    pytest.param("vp500", "evaluate", ["evaluate.teacher_steps=501"], ("evaluate.teacher_steps=501", "500 timesteps"), id="teacher-steps-vs-T"),
    pytest.param("vp500", "distill", ["distill.generator_timestep=600"],
                 ("distill.generator_timestep is 600", "[1, 499]", "num_train_timesteps is 500", "generator_timestep=250"), id="generator-timestep-vs-T"),  # fmt: skip
    pytest.param("vp500", "distill", ["distill.generator_timesteps=[700,400,200]"], ("distill.generator_timesteps starts at 700", "[1, 499]"), id="generator-timesteps-vs-T"),
    pytest.param("large", "distill", ["distill.batch_size=65536", "distill.regression_weight=0"], ("distill.batch_size=65536", "GiB", "the machine has"), id="distill-batch-memory"),
    pytest.param("large", "generate", ["generate.batch_size=65536", "generate.shard_size=65536", "generate.num_samples=65536"],
                 ("generate.batch_size=65536", "GiB", "the machine has"), id="generate-batch-memory"),  # fmt: skip
]


@pytest.mark.parametrize("teacher, command, overrides, needles", TEACHER_CASES)
def test_a_setting_past_the_teachers_bound_is_refused(request, tmp_path, teacher, command, overrides, needles):
    store = tmp_path / "store"
    path = request.getfixturevalue(f"{teacher}_teacher")
    cfg = write_config(tmp_path / "c.yaml", path, store, distill={}, solver="pndm" if teacher == "vp500" else "heun")
    add_tiny_evaluate(cfg)
    sets = [a for o in overrides for a in ("--set", o)]
    if torch.cuda.is_available() and "memory" in request.node.name:
        needles = tuple(n.replace("the machine", "the GPU") for n in needles)
    with nothing_started(store):
        assert_refused([command, "--config", str(cfg), *sets], store, *needles)


def test_the_default_generator_timestep_follows_the_teachers_schedule(tmp_path, vp500_teacher):
    """On 500 timesteps the default t* is 250 (500 of 1000), and distill's first step draws every timestep from
    the teacher's 500: the step computes (with 1000 it indexed past the schedule)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from dmd_core.dmd import DMDSettings, dm_timestep_range
    from stages import chain, distill
    from stages.config import load_config

    dm_only = {"regression_weight": 0, "batch_size": 2}
    cfg = load_config(write_config(tmp_path / "c.yaml", vp500_teacher, tmp_path / "store", distill=dm_only, solver="pndm"))
    assert dm_timestep_range(DMDSettings(t_max=1.0), 500) == (10, 500)
    AcceleratorState._reset_state()
    torch.set_num_threads(1)
    tr = distill.Trainer(cfg, chain.plan(cfg, "distill"), Accelerator(cpu=True))
    assert tr.one_step.level == 250
    logs = tr.step(0)
    assert all(torch.isfinite(torch.tensor(float(v))) for k, v in logs.items() if k.startswith("loss")), logs


@pytest.fixture(scope="module")
def ddpm_pipeline(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("teacher") / "ddpm"
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    DDPMPipeline(unet=tiny_unet(11), scheduler=sched).save_pretrained(str(path))
    return path


@pytest.mark.parametrize("layout, part", [("ddpm_pipeline", "unet"), ("sd_teacher", "unet"), ("sd_teacher", "safety_checker")])
def test_a_component_diffusers_cannot_load_is_refused_up_front(request, tmp_path, layout, part):
    """model_index.json naming a library nothing provides: it passed generate, distill and evaluate and failed at
    export (StableDiffusionPipeline.from_pretrained imports every component). The class stays a real one."""
    teacher = tmp_path / "teacher"
    shutil.copytree(request.getfixturevalue(layout), teacher)
    index = json.loads((teacher / "model_index.json").read_text())
    index[part] = ["evil_lib", "UNet2DConditionModel" if part == "unet" else "StableDiffusionSafetyChecker"]
    (teacher / "model_index.json").write_text(json.dumps(index))
    store = tmp_path / "store"
    cfg = write_config(tmp_path / "c.yaml", teacher, store, solver="pndm")
    with nothing_started(store):
        assert_refused(["generate", "--config", str(cfg)], store, "model_index.json", part, "evil_lib", "Fix:")
