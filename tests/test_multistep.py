"""DMD2's k-step generators: the sampler, backward simulation, k = 1 = today's path, exact resume, evaluate/export."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, write_config
from dmd_core import load_denoiser
from dmd_core.denoisers import Parametrization
from dmd_core.dmd import BackwardSimulation, MultiStep, OneStep, SampleRNG
from dmd_core.errors import InputError
from stages import chain
from stages.config import load_config

STEPS4 = [999, 749, 499, 249]


def sd_schedule() -> torch.Tensor:
    from diffusers import DDPMScheduler

    return DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear").alphas_cumprod


def test_simulated_inputs_are_the_renoised_samples_of_a_constant_generator():
    """G(x, t) = c for every input: the input of a sample simulated to step k >= 1 is alpha_{t_k} c + sigma_{t_k} eps_k."""
    abar = sd_schedule()
    param = Parametrization(kind="vp", image_shape=(1, 2, 2), one_step_timestep=999, generator_timesteps=tuple(STEPS4))
    steps = MultiStep(OneStep(999, 1.0), tuple(STEPS4[1:]), param, abar)
    c = torch.linspace(-1, 1, 4).reshape(1, 1, 2, 2)
    calls = []

    def constant(x, level, labels):
        calls.append(x.shape[0])
        return c.expand(x.shape[0], -1, -1, -1)

    z = torch.randn(16, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    inputs, levels = BackwardSimulation(steps)(constant, z, None, SampleRNG(3, 0, 5, range(16)))
    replay = SampleRNG(3, 0, 5, range(16))
    k = replay.randint(0, 4)
    eps = [replay.randn((1, 2, 2)) for _ in range(3)]
    assert set(k.tolist()) == {0, 1, 2, 3}  # every step is drawn in this batch
    for i in range(16):
        if k[i] == 0:
            assert torch.equal(inputs[i], z[i]) and levels[i] == 999
            continue
        t = STEPS4[k[i]]
        want = abar[t].double().sqrt() * c[0].double() + (1 - abar[t].double()).sqrt() * eps[k[i] - 1][i].double()
        torch.testing.assert_close(inputs[i].double(), want, rtol=1e-6, atol=1e-6)
        assert levels[i] == t
    assert calls == [16, 16, 16]  # steps 0, 1, 2 ran (without gradients) to make the input of step 3


def test_sampler_applies_every_step(edm_teacher):
    den = load_denoiser(edm_teacher)
    den.param = Parametrization.from_dict({**den.param.to_dict(), "generator_timesteps": [999, 499]})
    steps = MultiStep.of(den)
    z, labels = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1)), torch.arange(3)
    eps = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got = steps(den, z, labels, lambda j: eps)
        x0 = OneStep.of(den)(den, z, labels)
        from dmd_core.dmd import noise_levels

        _, sigma, level = noise_levels(den.param, torch.full((3,), 499), None)
        want = den(x0 + sigma.reshape(-1, 1, 1, 1).float() * eps, level, labels)
    assert steps.num_steps == 2 and torch.equal(got, want)


def weights(path: Path) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in load_file(str(path / "diffusion_pytorch_model.safetensors")).items()}


@pytest.mark.parametrize("teacher, one", [("edm_teacher", [999]), ("vp_teacher", [500])])
def test_one_timestep_is_todays_one_step_generator(tmp_path, request, teacher, one):
    path = request.getfixturevalue(teacher)
    solver = {} if teacher == "edm_teacher" else {"solver": "pndm", "steps": 4}
    cfg = load_config(write_config(tmp_path / "c.yaml", path, tmp_path / "store", distill={"steps": 2}, **solver))
    chain.run(cfg, "generate", progress=False).manifest
    today = chain.run(cfg, "distill", progress=False).manifest
    listed = chain.run(load_config(write_config(tmp_path / "l.yaml", path, tmp_path / "store", distill={"steps": 2, "generator_timesteps": one}, **solver)), "distill", progress=False).manifest
    assert listed.key != today.key
    a, b = (weights(Path(cfg.store) / "distill" / m.key / "generator") for m in (today, listed))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_four_steps_train_resume_exactly_and_evaluate(tmp_path, edm_teacher):
    d = {"steps": 4, "checkpoint_every": 2, "keep_checkpoints": 2, "generator_timesteps": STEPS4, "fake_updates_per_generator_update": 2}
    ev = ["evaluate.features=digits", f"evaluate.classifier={ROOT / 'data' / 'classifier'}", "evaluate.num_samples=80", "evaluate.batch_size=40",
          "evaluate.speed_batch_size=4", "evaluate.speed_repeats=1"]  # fmt: skip
    cfg = load_config(write_config(tmp_path / "c.yaml", edm_teacher, tmp_path / "store", distill=d), ev)
    chain.run(cfg, "generate", progress=False).manifest
    m = chain.run(cfg, "distill", progress=False).manifest
    out = Path(cfg.store) / "distill" / m.key
    assert load_denoiser(out / "generator").param.generator_timesteps == tuple(STEPS4)
    want = {n: weights(out / n) for n in ("generator", "fake_score")}
    for name in ("manifest.json", "generator", "fake_score", "checkpoints/step-0000004"):
        shutil.rmtree(out / name) if (out / name).is_dir() else (out / name).unlink()
    assert chain.run(cfg, "distill", progress=False).manifest.key == m.key
    for n, w in want.items():
        got = weights(out / n)
        assert max(float((got[k] - w[k]).abs().max()) for k in got) <= 1e-6, n
    assert len(pq.read_table(out / "metrics.parquet").to_pylist()) == 4
    r = chain.run(cfg, "evaluate", progress=False).manifest.info["metrics"]
    assert r["student_nfe"] == 4 and r["student_fd"] > 0
    # export: OneStepPipeline runs the 4 steps; ONNX is one network call, run 4 times by the parity check

    e = chain.run(load_config(tmp_path / "c.yaml", [*ev, "export.parity_samples=4"]), "export", progress=False).manifest
    x = Path(cfg.store) / "export" / e.key
    spec = json.loads((x / "one_step.json").read_text())
    assert spec["network_evaluations"] == 4 and spec["generator_timesteps"] == STEPS4 and len(spec["later_steps"]) == 3
    assert e.info["onnx"]["max_rel_diff"] <= 1e-4 and e.info["torch_parity"]["bit_identical"]
    from dmd_core.pipeline import OneStepPipeline
    from dmd_core.shards import sample_labels, sample_noise

    pipe = OneStepPipeline.from_pretrained(str(x))
    gen = load_denoiser(x / "generator")
    z, labels = sample_noise(5, range(3), (1, 8, 8)), sample_labels(range(3), 10)
    from dmd_core.dmd import step_noise

    with torch.no_grad():
        want = MultiStep.of(gen)(gen, z, labels, step_noise(5, range(3), (1, 8, 8)))
    assert torch.equal(pipe(class_labels=labels, seed=5, output_type="pt"), want)


def test_bad_generator_timesteps_are_refused(tmp_path, edm_teacher):
    base = write_config(tmp_path / "c.yaml", edm_teacher, tmp_path / "store", distill={})
    chain.run(load_config(base), "generate", progress=False).manifest
    for bad, msg in (("[749, 499]", "starting at 999"), ("[999, 499, 749]", "decreasing"), ("[999, 0]", r"\[1, 999\]")):
        with pytest.raises(InputError, match=msg):
            chain.plan(load_config(base, [f"distill.generator_timesteps={bad}"]), "distill")
