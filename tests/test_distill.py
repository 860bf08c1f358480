"""Stage distill: outputs, multi-process parity, exact resume, NaN guard, errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from diffusers import UNet2DModel
from PIL import Image
from safetensors.torch import load_file

from conftest import first_step_one_and_two_processes, kill_when, run_cli, write_config
from dmd_core import load_denoiser
from dmd_core.errors import InputError
from stages import chain, distill
from stages.config import load_config


@pytest.fixture(scope="module")
def setup(tmp_path_factory, edm_teacher):
    tmp = tmp_path_factory.mktemp("distill")
    cfg = write_config(tmp / "c.yaml", edm_teacher, tmp / "store", distill={})
    chain.run(load_config(cfg), "generate", progress=False).manifest
    return tmp, cfg


@pytest.fixture(scope="module")
def trained(setup):
    tmp, cfg = setup
    m = chain.run(load_config(cfg), "distill", progress=False).manifest
    return cfg, Path(load_config(cfg).store) / "distill" / m.key, m


def weights(path: Path) -> dict[str, torch.Tensor]:
    # cloned: load_file maps the file, and some tests overwrite it afterwards
    return {k: v.clone() for k, v in load_file(str(path / "diffusion_pytorch_model.safetensors")).items()}


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def test_outputs_load_and_log(trained, edm_teacher):
    cfg, out, m = trained
    den = load_denoiser(out / "generator")
    assert den.param == load_denoiser(edm_teacher).param
    UNet2DModel.from_pretrained(str(out / "generator"))
    load_denoiser(out / "fake_score")
    rows = pq.read_table(out / "metrics.parquet").to_pylist()
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for col in ("loss_dm", "loss_reg", "loss_g", "loss_fake", "grad_norm_g", "grad_norm_fake", "lr_g", "lr_fake", "samples_per_s", "wall_time_s"):
        assert all(isinstance(r[col], float) and r[col] == r[col] for r in rows), col
    r = rows[-1]
    assert r["loss_g"] == pytest.approx(r["loss_dm"] + 0.25 * r["loss_reg"], rel=1e-5)
    grid = Image.open(out / "samples.png")
    assert grid.size[0] == 10 * 32 + 11 * 2  # one column per class
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["step-0000002.png", "step-0000004.png"]
    assert m.info["steps"] == 4 and m.upstream["teacher"]
    # step 1: the fake score is the teacher (same weights, both unguided here), so p_fake == p_real
    # exactly and loss_DM is 0; it must not stay 0 once the fake score has been trained
    assert abs(rows[0]["loss_dm"]) < 1e-9 and all(r["loss_dm"] > 1e-6 for r in rows[1:])
    assert all(r["lr_g"] == 1e-4 and r["lr_fake"] == 1e-4 for r in rows)
    # the checkpoint of the last step holds exactly the final generator
    assert max_diff(weights(out / "generator"), weights(out / "checkpoints" / "step-0000004" / "generator")) == 0


def test_cached_rerun(trained):
    cfg, out, m = trained
    proc = run_cli("distill", "--config", str(cfg), "-q")
    assert proc.stdout.strip().splitlines()[-1] == str(out)
    assert "cached" in proc.stderr


def test_two_processes_take_the_same_first_step(setup):
    tmp, cfg = setup
    one, two = first_step_one_and_two_processes(cfg, tmp)
    a, b = load_file(one), load_file(two)
    assert max_diff(a, b) <= 1e-5
    la, lb = json.loads(Path(one + ".json").read_text()), json.loads(Path(two + ".json").read_text())
    # gradient norms after all-reduce: equal only if the 2-process gradient is the mean, not the sum
    assert la["grad_norm_g"] == pytest.approx(lb["grad_norm_g"], rel=1e-5)
    assert la["grad_norm_fake"] == pytest.approx(lb["grad_norm_fake"], rel=1e-5)


@pytest.mark.slow  # make test kills distill mid-step and mid-checkpoint in tests/faults/test_kill.py (byte-identical resume)
def test_kill_and_resume_is_exact(setup):
    tmp, cfg = setup
    sets = ["distill.steps=40", "distill.checkpoint_every=10"]
    ref = chain.run(load_config(cfg, [*sets, f"store={tmp / 'ref'}", f"distill.pairs={_pairs(cfg)}"]), "distill", progress=False).manifest
    ref_dir = tmp / "ref" / "distill" / ref.key

    store = tmp / "killed"
    args = ["--config", str(cfg), "-q", "--set", f"store={store}", "--set", f"distill.pairs={_pairs(cfg)}", *[a for s in sets for a in ("--set", s)]]
    kill_when(["distill", *args], store, "distill/.*.partial/checkpoints/step-0000010/trainer.json")
    assert not [d for d in (store / "distill").iterdir() if not d.name.startswith(".")], "the run finished before it could be killed"
    resumed = run_cli("distill", *args)
    assert "resuming from" in resumed.stderr
    out = Path(resumed.stdout.strip().splitlines()[-1])
    assert out == store / "distill" / ref.key
    assert max_diff(weights(out / "generator"), weights(ref_dir / "generator")) <= 1e-6
    assert max_diff(weights(out / "fake_score"), weights(ref_dir / "fake_score")) <= 1e-6
    assert [r["step"] for r in pq.read_table(out / "metrics.parquet").to_pylist()] == list(range(1, 41))


def _pairs(cfg) -> str:
    return str(chain.plan(load_config(cfg), "generate").out_dir)


def test_resume_from_checkpoint_with_more_steps(trained):
    cfg, out, _ = trained
    ckpt = out / "checkpoints" / "step-0000004"
    longer = chain.run(load_config(cfg, ["distill.steps=6", f"distill.resume_from={ckpt}"]), "distill", progress=False).manifest
    rows = pq.read_table(Path(load_config(cfg).store) / "distill" / longer.key / "metrics.parquet").to_pylist()
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    with pytest.raises(InputError) as e:
        chain.run(load_config(cfg, ["distill.steps=6", f"distill.resume_from={ckpt}", "distill.regression_weight=0.5", "distill.seed=3"]), "distill", progress=False).manifest
    assert "regression_weight" in str(e.value) and "seed" in str(e.value)


def test_nan_loss_stops_and_keeps_last_checkpoint(setup, monkeypatch):
    tmp, cfg = setup
    calls = {"n": 0}

    def poisoned(x, y):
        calls["n"] += 1
        return torch.tensor(float("nan")) if calls["n"] == 3 else torch.zeros(())

    monkeypatch.setattr(distill.trainer, "regression_loss_fn", lambda d: poisoned)
    c = load_config(cfg, [f"store={tmp / 'nan'}", f"distill.pairs={_pairs(cfg)}"])
    with pytest.raises(distill.TrainingDiverged) as e:
        chain.run(c, "distill", progress=False).manifest
    assert "step 3" in str(e.value) and "loss_reg" in str(e.value)
    assert not [d for d in (tmp / "nan" / "distill").iterdir() if not d.name.startswith(".")]  # nothing under a final name
    out = next((tmp / "nan" / "distill").glob(".*.partial"))
    assert (out / "checkpoints" / "step-0000002" / "trainer.json").is_file()
    assert not (out / "manifest.json").exists()


def test_nan_gradient_with_finite_losses_stops_before_a_checkpoint_holds_it(setup):
    """A NaN gradient (finite losses, so only the norm shows it) poisons the weights at the optimizer step;
    the step must stop there, not at the next step's NaN loss after a checkpoint may have saved it."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    tmp, cfg = setup
    c = load_config(cfg, [f"store={tmp / 'nan-grad'}", f"distill.pairs={_pairs(cfg)}"])
    AcceleratorState._reset_state()
    tr = distill.Trainer(c, chain.plan(c, "distill"), Accelerator(cpu=True))
    tr.restart_data(0)
    tr.step(0)
    weight = next(p for p in tr.fake.parameters() if p.requires_grad)
    weight.register_hook(lambda g: torch.full_like(g, float("nan")))
    with pytest.raises(distill.TrainingDiverged) as e:
        tr.step(1)
    assert "step 2: grad_norm_fake is NaN or Inf" in str(e.value)
    assert not torch.isfinite(weight).all()  # what the check is for: the optimizer already wrote NaN


def test_lpips_without_weights_is_refused(setup):
    tmp, cfg = setup
    proc = run_cli("distill", "--config", str(cfg), "--set", "distill.regression_loss=lpips", check=False, env={"TORCH_HOME": str(tmp / "empty")})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "vgg16-397923af.pth" in proc.stderr and "pseudo_huber" in proc.stderr


@pytest.mark.parametrize("sets, message", [
    (["distill.t_min=0.99"], "distill.t_min (0.99) must be below distill.t_max (0.98). Fix: lower t_min or raise t_max."),
    (["distill.dm_weight=0", "distill.regression_weight=0"],
     "distill.dm_weight and distill.regression_weight are both 0: the generator would have no loss. Fix: set one above 0."),
    (["distill.generator_timestep=500", "distill.generator_timesteps=[999,499]"],
     "distill.generator_timesteps starts at 999 but distill.generator_timestep is 500. Fix: drop one of them."),
])  # fmt: skip
def test_rules_between_settings_refuse_the_config_as_it_is_read(setup, sets, message):
    """The distill rules that need no teacher are the config's: refused by load_config, each with its own fix."""
    _, cfg = setup
    with pytest.raises(InputError) as e:
        load_config(cfg, sets)
    assert str(e.value).endswith(f"distill: {message}") and str(e.value).count("Fix:") == 1


def test_pairs_from_another_teacher_are_refused(setup, tmp_path):
    from conftest import make_edm_teacher

    _, cfg = setup
    other = make_edm_teacher(tmp_path / "other", seed=5)
    with pytest.raises(InputError) as e:
        chain.plan(load_config(cfg, [f"teacher.path={other}", f"distill.pairs={_pairs(cfg)}"]), "distill")
    assert "another teacher" in str(e.value) and "digest" in str(e.value)


def test_incomplete_pairs_are_refused(setup, tmp_path):
    _, cfg = setup
    broken = tmp_path / "pairs"
    shutil.copytree(_pairs(cfg), broken)
    (broken / "manifest.json").unlink()
    (broken / "pairs-000001.tar").unlink()
    with pytest.raises(InputError) as e:
        chain.plan(load_config(cfg, [f"distill.pairs={broken}"]), "distill")
    msg = str(e.value)
    assert "not a complete generate output" in msg and "pairs-000001.tar" in msg and "pairs-000000.tar" not in msg


@pytest.mark.slow  # two-process parity stays in the fast suite (test_two_processes_take_the_same_first_step)
def test_cli_two_processes_end_to_end(setup):
    tmp, cfg = setup
    store = tmp / "cli2"
    proc = run_cli("distill", "--config", str(cfg), "-q", "-n", "2", "--set", f"store={store}", "--set", f"distill.pairs={_pairs(cfg)}")
    out = Path(proc.stdout.strip().splitlines()[-1])
    m = json.loads((out / "manifest.json").read_text())
    assert m["info"]["num_processes"] == 2 and m["info"]["steps"] == 4
    load_denoiser(out / "generator")


def test_gradient_accumulation_equals_the_larger_batch(setup):
    """2 micro-batches of 4 take the same step as one batch of 8 (same samples, noise and timesteps)."""
    from accelerate import Accelerator

    tmp, cfg = setup
    g = torch.Generator().manual_seed(5)
    z_ref, y_ref, labels_ref = torch.randn(8, 1, 8, 8, generator=g), torch.rand(8, 1, 8, 8, generator=g) * 2 - 1, torch.arange(8)
    results = []
    for batch, accum in ((8, 1), (4, 2)):
        c = load_config(cfg, [f"distill.batch_size={batch}", f"distill.gradient_accumulation_steps={accum}", f"distill.pairs={_pairs(cfg)}"])
        tr = distill.Trainer(c, chain.plan(c, "distill"), Accelerator(cpu=True))
        parts = [(z_ref[i : i + batch], y_ref[i : i + batch], labels_ref[i : i + batch]) for i in range(0, 8, batch)]
        logs = tr.step(0, batches=parts)
        results.append((logs, {k: v.clone() for k, v in tr.gen.unet.state_dict().items()}))
    (la, wa), (lb, wb) = results
    assert la["grad_norm_g"] == pytest.approx(lb["grad_norm_g"], rel=1e-5)
    assert la["grad_norm_fake"] == pytest.approx(lb["grad_norm_fake"], rel=1e-5)
    # Adam's first update is about lr * g / |g|: summation-order noise in near-zero gradient entries
    # moves those weights by a fraction of lr (1e-4 here), so compare at a quarter of it.
    assert max_diff(wa, wb) <= 2.5e-5


@pytest.mark.slow  # make test rebuilds a distill output from its final checkpoint in tests/faults/test_corruption.py
def test_damaged_output_is_rebuilt_from_the_final_checkpoint(trained):
    cfg, out, m = trained
    before, grid = weights(out / "generator"), (out / "samples.png").read_bytes()
    (out / "generator" / "diffusion_pytorch_model.safetensors").write_bytes(b"damaged")
    shutil.rmtree(out / "samples")  # the rebuild works from the final checkpoint alone, without samples/
    proc = run_cli("distill", "--config", str(cfg), "-q")
    assert "fails verification" in proc.stderr and "rebuilding the outputs" in proc.stderr
    assert max_diff(weights(out / "generator"), before) == 0
    assert (out / "samples.png").read_bytes() == grid  # the final grid, redrawn from the final checkpoint


class _DeviceWaits(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the ops that make the host wait for the device: a tensor read as a Python number (.item(),
    float(), bool()) or a data-dependent shape (nonzero, masked_select)."""

    WAITS = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "is_nonzero"}

    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.split(".")[0] in self.WAITS:
            self.names.append(func.__name__)
        return func(*args, **(kwargs or {}))


def test_a_step_reads_the_device_once_and_updates_the_ema_in_closed_form(setup):
    """Trainer.step makes no .item()/float()/bool() of a device value: its scalars come back in one transfer
    (host_logs). The fused EMA update is ema' = d * ema + (1 - d) * theta'."""
    from accelerate import Accelerator

    tmp, cfg = setup
    c = load_config(cfg, ["distill.ema_decay=0.9", f"distill.pairs={_pairs(cfg)}", "distill.max_grad_norm=1.0"])
    tr = distill.Trainer(c, chain.plan(c, "distill"), Accelerator(cpu=True))
    tr.restart_data(0)
    tr.step(0)
    ema0 = {k: v.clone() for k, v in tr.ema.items()}
    with _DeviceWaits() as waits:
        logs = tr.step(1)
    assert waits.names == []
    assert {"loss_dm", "loss_reg", "loss_g", "loss_fake", "grad_norm_g", "grad_norm_fake"} <= logs.keys()
    assert all(isinstance(v, float) and v == v for v in logs.values())
    theta = tr.unwrap(tr.gen).unet.state_dict()
    for k in ema0:  # within float32 rounding of the float64 closed form (2 ulp)
        expected = 0.9 * ema0[k].double() + 0.1 * theta[k].double()
        assert ((tr.ema[k].double() - expected).abs() <= 2 * 2**-24 * expected.abs() + 1e-12).all(), k
