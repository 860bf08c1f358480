"""Stage export: fresh-process bit identity, ONNX parity, model card, the README's plain-diffusers recipe."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT, write_config
from dmd_core import load_denoiser
from dmd_core.dmd import OneStep
from dmd_core.errors import InputError
from dmd_core.shards import sample_labels, sample_noise
from stages import chain, export
from stages.config import load_config

CLASSIFIER = str(ROOT / "data" / "classifier")


@pytest.fixture(scope="module")
def exported(tmp_path_factory, edm_teacher):
    """A tiny config exported straight away: export runs the evaluation it needs first."""
    tmp = tmp_path_factory.mktemp("export")
    cfg = write_config(tmp / "c.yaml", edm_teacher, tmp / "store", distill={"ema_decay": 0.9})
    cfg.write_text(cfg.read_text() + (
        "evaluate:\n  num_samples: 100\n  batch_size: 50\n  features: digits\n"
        f"  classifier: {CLASSIFIER}\n  speed_batch_size: 8\n  speed_repeats: 1\n  num_threads: 1\n"
    ))  # fmt: skip
    m = chain.run(load_config(cfg), "export", progress=False).manifest
    return cfg, Path(load_config(cfg).store) / "export" / m.key, m


def evaluation_info(m) -> dict:
    return json.loads((Path(m.info["evaluation"]) / "manifest.json").read_text())["info"]


def test_layout_and_checks_recorded(exported):
    cfg, out, m = exported
    for name in ("generator/config.json", "generator/diffusion_pytorch_model.safetensors", "generator/denoiser.json",
                 "model_index.json", "one_step.json", "generator.onnx", "grid.png", "README.md"):  # fmt: skip
        assert (out / name).is_file(), name
    assert m.info["onnx"]["max_abs_diff"] <= 1e-4 and m.info["onnx"]["inputs"] == 16 and m.info["onnx"]["opset"] == 17
    lo, hi = m.info["output_range"]
    assert m.info["onnx"]["max_rel_diff"] == pytest.approx(m.info["onnx"]["max_abs_diff"] / max(-lo, hi), rel=1e-9)
    assert f"[{lo:.3f}, {hi:.3f}]" in (out / "README.md").read_text()
    assert m.info["torch_parity"] == {"bit_identical": True, "inputs": 16}
    spec = json.loads((out / "one_step.json").read_text())
    assert spec["parametrization"] == "edm" and spec["sigma_max"] == 80.0 and spec["num_classes"] == 10 and spec["null_class"] == 10
    assert spec["alpha"] == 1.0 and spec["sigma"] == 80.0


def test_fresh_process_reproduces_evaluated_images_bit_for_bit(exported, tmp_path):
    cfg, out, m = exported
    c = load_config(cfg)
    den = load_denoiser(evaluation_info(m)["generator_dir"])
    assert Path(evaluation_info(m)["generator_dir"]).name == "generator_ema"
    z, labels = sample_noise(c.evaluate.seed, range(16), (1, 8, 8)), sample_labels(range(16), 10)
    with torch.no_grad():
        want = OneStep.of(den)(den, z, labels).numpy()
    result = tmp_path / "x.npy"
    code = "import sys; from dmd_core.pipeline import sample_to_file; sample_to_file(sys.argv[1], int(sys.argv[2]), 16, sys.argv[3])"
    subprocess.run([sys.executable, "-c", code, str(out), str(c.evaluate.seed), str(result)], check=True, cwd=ROOT)
    assert np.array_equal(np.load(result), want)


def test_onnx_matches_pytorch(exported):
    import onnxruntime

    cfg, out, m = exported
    den = load_denoiser(out / "generator")
    g = torch.Generator().manual_seed(3)
    z, labels = torch.randn(5, 1, 8, 8, generator=g), torch.tensor([0, 3, 5, 9, 10])  # 10: the null class
    got = onnxruntime.InferenceSession(str(out / "generator.onnx")).run(None, {"noise": z.numpy(), "class_labels": labels.numpy()})[0]
    with torch.no_grad():
        want = OneStep.of(den)(den, z, labels).numpy()
    assert np.abs(got - want).max() <= 1e-4


def test_model_card_has_metrics_and_checksums(exported):
    cfg, out, m = exported
    card = (out / "README.md").read_text()
    r = m.info["metrics"]
    assert f"{r['student_fd']:.4f}" in card and f"{r['teacher_fd']:.4f}" in card and f"{r['speedup']:.1f}x" in card
    for f in m.files:
        if f.name not in ("README.md",):
            assert f.sha256 in card, f.name
    assert "regression_weight: 0.25" in card  # the resolved config


def test_readme_recipe_without_the_project(exported):
    """The README's plain-diffusers lines give the pipeline's images (float32 vs float64 preconditioning)."""
    from dmd_core.pipeline import OneStepPipeline

    cfg, out, m = exported
    readme = (ROOT / "README.md").read_text()
    code = re.search(r"```python\n(# Without dmd-pipeline:.*?)```", readme, re.S).group(1)
    scope: dict = {}
    exec(code.replace("EXPORT_DIR", str(out)), scope)
    pipe = OneStepPipeline.from_pretrained(str(out))
    want = pipe(class_labels=scope["labels"], noise=scope["z"], output_type="pt")
    assert torch.allclose(scope["image"], want.float(), atol=1e-5)
    # frozen like the evaluated generator: CPU linear kernels round differently for weights that require grad
    assert not any(p.requires_grad for p in pipe.generator.parameters())


def test_onnx_parity_failure_is_refused(exported, tmp_path):
    cfg, out, m = exported
    c = load_config(cfg, [f"store={tmp_path / 'store'}", "export.onnx_tolerance=1e-30",
                          f"evaluate.distill={evaluation_info(m)['distill_dir']}"])  # fmt: skip
    with pytest.raises(InputError, match="ONNX parity failed"):
        chain.run(c, "export", progress=False).manifest
    assert not [d for d in (tmp_path / "store" / "export").iterdir() if not d.name.startswith(".")]  # nothing under a final name
    bad = next((tmp_path / "store" / "export").glob(".*.partial"))
    assert not (bad / "generator.onnx").exists() and not (bad / "manifest.json").exists()


@pytest.mark.parametrize("timestep", [None, 500])
def test_one_step_json_lets_plain_diffusers_reproduce_a_vp_generator(vp_teacher, timestep, tmp_path):
    """one_step.json's recipe by hand: x0 = (z - sigma * UNet(z, t*)) / alpha, alpha and sigma at t* (T-1 if unset)."""
    den = load_denoiser(vp_teacher)
    den.param = dataclasses.replace(den.param, one_step_timestep=timestep)
    spec = export.one_step_spec(den)
    t = timestep or 999
    abar = float(den.alphas_cumprod[t])
    assert spec["timestep"] == t and spec["alpha"] == pytest.approx(abar**0.5, rel=1e-12) and spec["sigma"] == pytest.approx((1 - abar) ** 0.5, rel=1e-12)
    assert spec["input_scale"] == 1.0
    z, labels = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(3)), torch.arange(4)
    with torch.no_grad():
        x = z
        eps = den.unet(x, torch.full((4,), spec["timestep"]), class_labels=labels).sample
        want = OneStep.of(den)(den, z, labels)
        pipe = export.pipeline_for(den)
        got_pipe = pipe(class_labels=labels, noise=z, output_type="pt")
    assert torch.allclose((x - spec["sigma"] * eps) / spec["alpha"], want, atol=1e-5 * float(want.abs().max()))
    assert pipe.config.one_step_timestep == timestep and torch.equal(got_pipe, want)
    # the README's VP recipe on this generator saved as an export (pipeline + one_step.json)
    pipe.save_pretrained(str(tmp_path))
    (tmp_path / "one_step.json").write_text(json.dumps(spec))
    code = re.search(r"```python\n(# Without dmd-pipeline, VP.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    scope: dict = {}
    exec(code.replace("EXPORT_DIR", str(tmp_path)), scope)
    with torch.no_grad():
        want = OneStep.of(den)(den, scope["z"], scope["labels"])
    assert torch.allclose(scope["image"], want.float(), atol=1e-5 * float(want.abs().max()))
