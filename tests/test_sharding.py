"""distill.sharding=fsdp on 2 CPU processes (FSDP2 over gloo): the first step against DDP's, with gradient
checkpointing and with LoRA; a run's checkpoints resume exactly and its networks load in diffusers' layout;
the settings it does not run with are refused up front."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DModel
from safetensors.torch import load_file

from conftest import first_step, kill_when, run_cli, write_config
from dmd_core import load_denoiser
from dmd_core.errors import InputError
from stages import chain
from stages.config import load_config
from stages.distill.sharding import shard_units, skeleton

FSDP = ("distill.sharding=fsdp",)
# Measured here (1 thread per process): FSDP's first step differs from DDP's by 1.3e-7 (full, and with gradient
# checkpointing) and 2.8e-10 (LoRA): reduce-scatter sums in another order than all-reduce. The bound is the DDP
# test's (test_distill): Adam's first step is about lr * sign(g), so a gradient entry near 0 whose sign flips
# moves its weight by up to lr = 1e-4; 1e-5 holds on every host the DDP test has run on.
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def setup(tmp_path_factory, edm_teacher):
    tmp = tmp_path_factory.mktemp("sharding")
    cfg = write_config(tmp / "c.yaml", edm_teacher, tmp / "store", distill={"ema_decay": 0.9})
    chain.run(load_config(cfg), "generate", progress=False)
    return tmp, cfg


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def logs(path: str) -> dict:
    return json.loads(Path(path + ".json").read_text())


@pytest.mark.parametrize("sets", [(), pytest.param(("distill.gradient_checkpointing=true",), marks=pytest.mark.slow),
                                  pytest.param(("distill.generator_lora_rank=4", "distill.fake_lora_rank=4"), marks=pytest.mark.slow)],
                         ids=["full", "gradient-checkpointing", "lora"])  # fmt: skip  # make test: full; make test-slow: all three
def test_first_step_equals_ddp(setup, sets):
    """One step of the same global batch on 2 processes: FSDP's weights and gradient norms are DDP's."""
    tmp, cfg = setup
    name = "-".join(s.split("=")[0].split(".")[-1] for s in sets) or "full"
    # checkpointing recomputes the same numbers: its FSDP step is held against the plain DDP step
    ddp_sets = () if sets == ("distill.gradient_checkpointing=true",) else sets
    ddp_name = "-".join(s.split("=")[0].split(".")[-1] for s in ddp_sets) or "full"
    ddp = str(tmp / f"ddp-{ddp_name}.safetensors")
    if not Path(ddp).is_file():
        first_step(cfg, Path(ddp), 2, ddp_sets)
    fsdp = first_step(cfg, tmp / f"fsdp-{name}.safetensors", 2, (*sets, *FSDP))
    a, b = load_file(ddp), load_file(fsdp)
    assert max_diff(a, b) <= TOLERANCE
    before = load_file(str(Path(load_config(cfg).teacher.path) / "diffusion_pytorch_model.safetensors"))
    # what trained moved far beyond the tolerance: the adapter's B (0 at the start), else the weights
    moved = {k: v for k, v in b.items() if k.startswith("gen.") and "lora_B" in k} or {k: v - before[k[4:]] for k, v in b.items() if k[4:] in before}
    assert max(v.abs().max().item() for v in moved.values()) > 0.5e-4, "the step did not train the generator"  # Adam: ~lr = 1e-4
    for k in ("grad_norm_g", "grad_norm_fake", "loss_dm", "loss_reg", "loss_fake"):
        assert logs(fsdp)[k] == pytest.approx(logs(ddp)[k], rel=1e-5, abs=1e-9), k


def sharded_args(cfg: Path, store: Path, *sets: str) -> list[str]:
    pairs = str(chain.plan(load_config(cfg), "generate").out_dir)
    return ["--config", str(cfg), "-q", "-n", "2", "--set", f"distill.pairs={pairs}", "--set", "distill.sharding=fsdp", "--set", f"store={store}",
            *[a for s in sets for a in ("--set", s)]]  # fmt: skip


def output(proc) -> Path:
    return Path(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def whole(setup) -> Path:
    """``dmd distill -n 2`` sharded, 4 steps in one go: its output."""
    tmp, cfg = setup
    return output(run_cli("distill", *sharded_args(cfg, tmp / "whole")))


def same_networks(out: Path, ref: Path) -> None:
    for net in ("generator", "generator_ema", "fake_score"):
        a = load_file(str(out / net / "diffusion_pytorch_model.safetensors"))
        assert max_diff(a, load_file(str(ref / net / "diffusion_pytorch_model.safetensors"))) == 0, net
    assert (out / "samples.png").read_bytes() == (ref / "samples.png").read_bytes()


def test_run_resumes_exactly_and_saves_diffusers_networks(setup, whole):
    """4 steps at once equal the same run resumed from its step-2 sharded checkpoint (weights, EMA, fake score:
    bit for bit); the networks load with plain diffusers."""
    tmp, cfg = setup
    ckpt = whole / "checkpoints" / "step-0000002"  # written at step 2 of the 4; resumed in another store (not cached)
    # no hidden file: an object store publishes the output's non-hidden files, checkpoints included
    assert sorted(p.name for p in (ckpt / "sharded").iterdir()) == ["__0_0.distcp", "__1_0.distcp", "metadata.dcp"]
    resumed = run_cli("distill", *sharded_args(cfg, tmp / "resumed", f"distill.resume_from={ckpt}"))
    assert "resuming from" in resumed.stderr
    same_networks(output(resumed), whole)
    m = json.loads((whole / "manifest.json").read_text())
    assert m["info"]["num_processes"] == 2
    unet = UNet2DModel.from_pretrained(str(whole / "generator"))
    teacher = UNet2DModel.from_pretrained(load_config(cfg).teacher.path)
    assert sum(p.numel() for p in unet.parameters()) == sum(p.numel() for p in teacher.parameters())
    assert load_denoiser(whole / "generator").param == load_denoiser(load_config(cfg).teacher.path).param


@pytest.mark.slow  # the resume itself is in the fast suite (distill.resume_from reads the same checkpoint)
def test_killed_run_resumes_from_its_sharded_checkpoint(setup, whole):
    """SIGKILL once step 2's checkpoint is complete; the rerun continues from it to the same networks."""
    tmp, cfg = setup
    store = tmp / "killed"
    kill_when(["distill", *sharded_args(cfg, store)], store, "distill/.*.partial/checkpoints/step-0000002/trainer.json")
    assert not [d for d in (store / "distill").iterdir() if not d.name.startswith(".")], "the run finished before it could be killed"
    resumed = run_cli("distill", *sharded_args(cfg, store))
    assert "resuming from" in resumed.stderr
    same_networks(output(resumed), whole)


def test_one_process_is_refused_before_generate(setup):
    tmp, cfg = setup
    store = tmp / "one"
    r = run_cli("distill", "--config", str(cfg), "-q", "--set", f"store={store}", "--set", "distill.sharding=fsdp", check=False)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "distill.sharding=fsdp splits the networks over the processes; this run has 1. Fix: --num-processes 2" in r.stderr
    assert not (store / "generate").exists() or not any((store / "generate").iterdir())


@pytest.mark.parametrize("sets, named", [(["distill.gan=true"], "distill.gan"), (["distill.eval_every=2"], "distill.eval_every"),
                                         (["distill.compile=true"], "distill.compile"), (["distill.mixed_precision=fp16"], "distill.mixed_precision=fp16"),
                                         (["distill.optimizer=adamw8bit"], "distill.optimizer=adamw8bit")])  # fmt: skip
def test_settings_it_does_not_run_with_are_refused(setup, sets, named):
    tmp, cfg = setup
    with pytest.raises(InputError, match=f"{named} does not run with distill.sharding=fsdp. Fix: "):
        load_config(cfg, [*sets, *FSDP])


def test_units_and_skeleton(edm_teacher):
    """Each block of diffusers' block lists and the mid block is one unit; the skeleton holds no memory."""
    unet = UNet2DModel.from_pretrained(str(edm_teacher))
    units = shard_units(unet)
    assert units == [*unet.down_blocks, *unet.up_blocks, unet.mid_block]
    frame = skeleton(unet)
    assert all(p.device.type == "meta" for p in frame.parameters()) and all(p.device.type == "cpu" for p in unet.parameters())
    assert [n for n, _ in frame.named_parameters()] == [n for n, _ in unet.named_parameters()]
    assert torch.equal(next(unet.parameters()), next(UNet2DModel.from_pretrained(str(edm_teacher)).parameters()))
