"""The memory plan (dmd_core.memory, `dmd plan --memory`, distill's up-front check) against measured peaks.

"Measured" here is the CPU allocator's own count: torch.profiler's memory events (every allocation and free of
torch's CPU allocator, in order), summed from before the teacher is loaded; the peak is taken over a whole DMD
iteration (dmd_core.step's generator update and fake-score update, the trainer's construction: teacher copies,
frozen dtype, checkpointing, fused AdamW, EMA) after a first iteration has made the optimizer states. The plan
never runs that iteration: it probes each network's call on 2 and 3 samples and adds parameter counts.
"""

from __future__ import annotations

import copy
import dataclasses
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from torch.profiler import ProfilerActivity, profile, record_function
from typer.testing import CliRunner

from dmd_core.denoisers import Parametrization, VPDenoiser
from dmd_core.dmd import DMDSettings, FakeScoreLoss, GeneratorLoss, OneStep, SampleRNG, random_labels
from dmd_core.loading import load_denoiser
from dmd_core.lora import LoraSettings, add_lora, set_trainable
from dmd_core.losses import DecodedLoss, LPIPSLoss, pseudo_huber_loss
from dmd_core.memory import DMDProbes, LiveBytes, StepSettings, dmd_step, largest_batch
from dmd_core.step import Sums, fake_score_updates, generator_update

from conftest import ROOT, run_cli

DIGITS = ROOT / "data" / "teacher"
TOLERANCE = 0.15  # the bound; the runs below land within 0.1%, digits with checkpointing 4.4% under


def digits_teacher():
    return load_denoiser(DIGITS)


def tiny_sd_teacher(latent: int = 8):
    """A small Stable-Diffusion-layout denoiser (cross-attention UNet, SD's schedule, a random prompt table)."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=latent, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, norm_num_groups=8, attention_head_dim=4,
    )  # fmt: skip
    sched = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    den = VPDenoiser(unet, Parametrization(kind="vp", image_shape=(4, latent, latent), text_conditioned=True), sched.alphas_cumprod, dict(sched.config))
    den.requires_grad_(False).eval().set_prompts(torch.randn(9, 8, 32))
    return den


def lpips_on_latents(s: StepSettings):
    """LPIPS (AlexNet, random backbone) on a tiny VAE's decoded images, as distill builds it for a latent teacher."""
    torch.manual_seed(1)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16), latent_channels=4, norm_num_groups=4, sample_size=16,
    ).requires_grad_(False).eval()  # fmt: skip
    lpips = LPIPSLoss("alex", random_backbone=True)
    return DecodedLoss(lpips, lambda z: vae.decode(z / 0.18215).sample.float(), None), [vae, lpips]


class CPUAccelerator:
    """What dmd_core.step asks of Accelerate, on one CPU process."""

    def __init__(self, dtype):
        self.dtype = dtype

    def backward(self, loss):
        loss.backward()

    def no_sync(self, net):
        return nullcontext()

    def autocast(self):
        return torch.autocast("cpu", dtype=self.dtype) if self.dtype else nullcontext()

    def clip_grad_norm_(self, params, max_norm):
        return torch.nn.utils.clip_grad_norm_(params, max_norm)


def measured_peak(load_teacher, s: StepSettings, extras=None) -> int:
    """Peak bytes of torch's CPU allocator during the second of two DMD iterations, counted from before the teacher
    and the regression loss's networks are built (see the module docstring). One thread: tiny ops on a busy machine
    run 4 to 70 times slower on two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _measured_peak(load_teacher, s, extras)
    finally:
        torch.set_num_threads(threads)


def _measured_peak(load_teacher, s: StepSettings, extras) -> int:
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        real = load_teacher()
        reg_loss = extras(s)[0] if extras else (pseudo_huber_loss if s.regression else None)
        gen, fake = copy.deepcopy(real), copy.deepcopy(real)
        if s.frozen_dtype != torch.float32:
            real.unet.to(s.frozen_dtype)
        for net, lora in ((gen, s.generator_lora), (fake, s.fake_lora)):
            if s.gradient_checkpointing:
                net.unet.enable_gradient_checkpointing()
            if lora is not None:
                add_lora(net.unet, lora, 0)
            set_trainable(net, net.unet)
            net.train()
        opt_g, opt_f = (torch.optim.AdamW([p for p in n.parameters() if p.requires_grad], lr=1e-4, fused=True) for n in (gen, fake))
        ema = {k: v.detach().clone().float() for k, v in gen.unet.state_dict().items()} if s.ema else None  # noqa: F841
        gen_loss = GeneratorLoss(DMDSettings(guidance_scale=s.guidance_scale, regression_weight=0.25 if s.regression else 0.0), reg_loss, OneStep.of(gen))
        fake_loss, acc, shape, B = FakeScoreLoss.for_teacher(real), CPUAccelerator(s.autocast), tuple(real.param.image_shape), s.batch

        def pairs(step):  # the trainer reads the next step's pairs ahead
            rng = SampleRNG(0, 2, step, range(B))
            return rng.randn(shape), rng.randn(shape), random_labels(rng, real.num_classes)

        ahead = pairs(0) if s.regression else None
        for step in range(2):
            with record_function("measured") if step == 1 else nullcontext():
                rng = SampleRNG(0, 0, step, range(B))
                draws = [(rng, rng.randn(shape), random_labels(rng, real.num_classes))]
                xs, labels, _ = generator_update(acc, gen, real, fake, opt_g, gen_loss, draws, [ahead] if ahead else None, 10.0, Sums())
                batch = lambda k, m: (xs[m], labels[m], SampleRNG(0, 10, step, range(B)))  # noqa: E731
                fake_score_updates(acc, fake, opt_f, fake_loss, batch, 1, 1, 10.0, Sums())
                ahead = pairs(step + 1) if s.regression else None
    events = prof.profiler.kineto_results.events()
    window = next(e for e in events if e.name() == "measured")
    live = peak = 0
    for t, n in sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]" and e.device_type().name == "CPU"):
        live += n
        if window.start_ns() <= t <= window.end_ns():
            peak = max(peak, live)
    return peak


def pair_bytes(load_teacher) -> int:
    return 2 * 4 * int(torch.tensor(load_teacher().param.image_shape).prod())


CASES = {
    "digits, batch 64": (digits_teacher, StepSettings(batch=64, regression=True, ema=True), None),
    "digits, batch 64, checkpointing": (digits_teacher, StepSettings(batch=64, regression=True, ema=True, gradient_checkpointing=True), None),
    "tiny SD, batch 8, CFG 3": (tiny_sd_teacher, StepSettings(batch=8, regression=True, guidance_scale=3.0), None),
    "tiny SD, batch 8, CFG 3, checkpointing": (tiny_sd_teacher, StepSettings(batch=8, regression=True, guidance_scale=3.0, gradient_checkpointing=True), None),
    "tiny SD, LoRA 4, bf16 autocast, bfloat16 frozen": (
        tiny_sd_teacher,
        StepSettings(batch=8, regression=True, mixed_precision="bf16", frozen_dtype=torch.bfloat16, generator_lora=LoraSettings(4), fake_lora=LoraSettings(4)),
        None,
    ),
    "tiny SD, LPIPS on decoded images": (tiny_sd_teacher, StepSettings(batch=2, regression=True, guidance_scale=3.0), lpips_on_latents),
}


@pytest.mark.parametrize("case", list(CASES))
def test_plan_within_15_percent_of_the_measured_peak(case):
    load_teacher, s, extras = CASES[case]
    s = dataclasses.replace(s, data_bytes_per_sample=pair_bytes(load_teacher))
    predicted = dmd_step(DMDProbes(load_teacher(), extras), s).total
    measured = measured_peak(load_teacher, s, extras)
    print(f"{case}: predicted {predicted / 2**20:.2f} MiB, measured {measured / 2**20:.2f} MiB, ratio {predicted / measured:.4f}")
    assert abs(predicted / measured - 1) < TOLERANCE


def test_fake_tensor_probes_predict_what_real_ones_do():
    """An SD-size teacher's probes run on fake tensors: on the tiny SD teacher, with checkpointing (its recomputation
    inside the backward), they give the real tensors' plan."""
    s = StepSettings(batch=8, regression=True, guidance_scale=3.0, gradient_checkpointing=True)
    real, fake = (dmd_step(DMDProbes(tiny_sd_teacher(), fake=f), s) for f in (False, True))
    assert real.phases == pytest.approx(fake.phases, rel=0.01)
    assert real.resident == fake.resident


def test_probe_predicts_another_batch_op_by_op():
    """Probed on 2 and 3 samples, a checkpointed UNet's forward and backward at 12 samples has the live bytes, op by
    op, of the real call at 12 (gradients, recomputed blocks and all), to one tensor of 12 KB (0.2%) that the call
    on 12 samples keeps longer."""
    probes = DMDProbes(tiny_sd_teacher())
    s = StepSettings(batch=12, gradient_checkpointing=True)
    predicted, _ = probes.fake_update(s)
    fake, loss = probes.network(True, True, None), FakeScoreLoss.for_teacher(probes.teacher)
    tracker = LiveBytes()
    with tracker:  # as the probe does: the inputs made inside
        rng, x, labels = probes.draws(12, 10)
        loss(fake, x, labels, rng).backward()
    measured = np.asarray(tracker.timeline)
    assert len(measured) == len(predicted.two)
    assert np.abs(predicted.at(12) - measured).max() <= 0.002 * measured.max()


def test_sharding_ddp_and_8bit_states_are_parameter_arithmetic():
    """Against the 1-process plan of the same probes: FSDP over 2 processes halves the generator's and the fake score's
    weights, gradients and optimizer states (and the EMA), not the frozen score's nor the activations, and adds its
    largest unit made whole, twice; DDP on 2 adds its buckets (the trained gradients again); bitsandbytes' 8-bit AdamW
    keeps 2 bytes of state per trained parameter instead of 8, and a float32 scale per 256 values of each moment,
    except in tensors under 4,096 values (float32 moments)."""
    from stages.distill.sharding import shard_units

    teacher = tiny_sd_teacher()
    units = [sum(p.numel() * 4 for p in u.parameters()) for u in shard_units(teacher.unet)]
    rest = sum(p.numel() * 4 for p in teacher.unet.parameters()) - sum(units)
    probes = DMDProbes(teacher, units=shard_units)
    s = StepSettings(batch=8, regression=True, guidance_scale=3.0, ema=True)
    one = dmd_step(probes, s)
    fsdp = dmd_step(probes, dataclasses.replace(s, processes=2, sharding="fsdp"))
    ddp = dmd_step(probes, dataclasses.replace(s, processes=2))
    eight = dmd_step(probes, dataclasses.replace(s, optimizer="adamw8bit"))
    half = lambda n: -(-n // 2)  # noqa: E731
    g, f, real = one.networks[:3]
    assert g.trainable_params == f.trainable_params == sum(p.numel() for p in teacher.unet.parameters())
    small = sum(p.numel() for p in teacher.unet.parameters() if p.numel() < 4096)
    assert g.small_params == f.small_params == small and 0 < small < g.trainable_params / 10
    assert not real.trainable_params
    for n in (g, f):
        assert (fsdp.weights(n), fsdp.grads(n), fsdp.optimizer(n)) == (half(n.weights), half(n.trainable_bytes), half(8 * n.trainable_params))
        assert (one.weights(n), one.grads(n), one.optimizer(n)) == (n.weights, n.trainable_bytes, 8 * n.trainable_params)
        assert eight.optimizer(n) == 8 * small + 2 * (n.trainable_params - small) + (n.trainable_params - small) // 32
    assert fsdp.weights(real) == one.weights(real) and [n.activations for n in fsdp.networks] == [n.activations for n in one.networks]
    assert fsdp.other["EMA of the generator"] == half(one.other["EMA of the generator"])
    assert fsdp.gathered == 2 * max(*units, rest) and one.gathered == 0
    trained = g.weights + f.weights + 8 * (g.trainable_params + f.trainable_params) + one.other["EMA of the generator"]
    assert one.resident - fsdp.resident == trained - (half(g.weights) + half(f.weights) + 2 * half(8 * g.trainable_params) + fsdp.other["EMA of the generator"])
    fake_phase = one.phases["fake-score update"] - f.trainable_bytes + half(f.trainable_bytes) + fsdp.gathered
    assert fsdp.phases["fake-score update"] == fake_phase
    assert one.phases["generator update"] - half(g.trainable_bytes) + fsdp.gathered <= fsdp.phases["generator update"] <= one.phases["generator update"] + fsdp.gathered
    assert ddp.total == one.total + g.trainable_bytes + f.trainable_bytes == one.total + ddp.other["DDP's gradient buckets"]
    assert eight.total == one.total - (one.optimizer(g) - eight.optimizer(g)) - (one.optimizer(f) - eight.optimizer(f))


def test_refusal_suggests_fsdp_on_several_processes_and_8bit_states_on_cuda(monkeypatch):
    import stages.memory_plan as memory_plan
    from stages.config import DistillConfig

    names = lambda s: [name for name, _ in memory_plan.candidates(DistillConfig(), s, alone=True)]  # noqa: E731
    s = StepSettings(batch=8)
    monkeypatch.setattr(memory_plan, "distill_device", lambda: "cpu")
    assert "distill.sharding=fsdp" not in names(s) and "distill.optimizer=adamw8bit" not in names(s)
    assert "distill.sharding=fsdp" in names(dataclasses.replace(s, processes=2))
    assert "distill.sharding=fsdp" not in names(dataclasses.replace(s, processes=2, sharding="fsdp"))
    monkeypatch.setattr(memory_plan, "distill_device", lambda: "cuda")
    assert "distill.optimizer=adamw8bit" in names(s) and "distill.optimizer=adamw8bit" not in names(dataclasses.replace(s, optimizer="adamw8bit"))
    assert "distill.optimizer=adamw8bit" not in names(dataclasses.replace(s, processes=2, sharding="fsdp"))  # FSDP's shards: not bitsandbytes'
    combined = [name for name, _ in memory_plan.candidates(DistillConfig(), dataclasses.replace(s, processes=2))]
    assert any("distill.sharding=fsdp" in n for n in combined) and not any("adamw8bit" in n for n in combined if "fsdp" in n)
    with_gan = DistillConfig(gan=True)  # FSDP does not run with the GAN term: not suggested
    assert "distill.sharding=fsdp" not in [name for name, _ in memory_plan.candidates(with_gan, dataclasses.replace(s, processes=2), alone=True)]


def test_largest_batch_is_the_last_that_fits():
    probes = DMDProbes(digits_teacher())
    s = StepSettings(batch=1, regression=True)
    at = lambda b: dmd_step(probes, dataclasses.replace(s, batch=b))  # noqa: E731
    have = at(37).total
    assert largest_batch(at, have, 1000) == 37
    assert largest_batch(at, at(1).total - 1, 1000) == 0


def cli(*args: str):
    from stages.cli import app

    return CliRunner().invoke(app, list(args))


def test_plan_memory_prints_the_table(tmp_path: Path):
    r = cli("plan", "--memory", "--set", f"store={tmp_path / 'store'}")
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert lines[1].split() == ["network", "weights", "grads", "optimizer", "activations"]
    assert [line.split()[0] for line in lines[2:5]] == ["generator", "fake", "real"]
    assert any(line.startswith("total per device: ") for line in lines)
    assert "fits" in r.output and "distill.gradient_checkpointing=true" in r.output


def test_plan_memory_takes_the_processes(tmp_path: Path):
    """-n 2 with distill.sharding=fsdp: the table per device, the trained networks' weights halved (2.7 MiB to 1.3)."""
    r = cli("plan", "--memory", "-n", "2", "--set", f"store={tmp_path / 'store'}", "--set", "distill.sharding=fsdp")
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert lines[0].startswith("distill, per device, at distill.batch_size=64 on 2 processes (FSDP)")
    rows = {line.split("  ")[0]: line.split() for line in lines[2:7]}
    assert rows["generator"][1:3] == ["1.3", "MiB"] and rows["real score (frozen)"][3:5] == ["2.7", "MiB"]
    assert "FSDP's largest unit made whole" in r.output and "DDP's gradient buckets" not in r.output


@pytest.mark.skipif(psutil.virtual_memory().available > 70 * 2**30, reason="the machine could hold distill at batch 65,536")
def test_distill_refuses_a_batch_that_does_not_fit(tmp_path: Path):
    """Refused before generate runs (32 pairs asked), in one error line naming the prediction and a batch that fits."""
    store = tmp_path / "store"
    r = run_cli("distill", "--set", f"store={store}", "--set", "generate.num_samples=32", "--set", "distill.batch_size=65536", check=False, timeout=120)
    assert r.returncode == 2
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "distill needs about" in errors[0] and "GiB per device at distill.batch_size=65536" in errors[0]
    assert "Fix: with distill.batch_size=" in errors[0]
    assert not (store / "generate").exists()


def test_batch_above_the_bound_is_refused_by_the_config(tmp_path: Path):
    r = run_cli("distill", "--set", f"store={tmp_path}", "--set", "distill.batch_size=1000000000", check=False, timeout=120)
    assert r.returncode == 2 and "distill.batch_size: Input should be less than or equal to 65536" in r.stderr


def test_the_up_front_check_plans_for_the_processes_of_the_run(tmp_path: Path, monkeypatch):
    """`dmd distill -n 3` and `dmd run -n 3` check distill's memory on the 3 processes it will run on."""
    import stages.chain as chain
    from dmd_core.errors import InputError
    from flows.cli import app as flows_app
    from stages.config import load_config

    memory: list[tuple[str, int]] = []
    monkeypatch.setattr(chain, "check_memory", lambda cfg, teacher, stage, n=1: memory.append((stage, n)))
    chain.check(load_config(None, [f"store={tmp_path}"]), "distill", 3)
    assert memory == [("generate", 3), ("distill", 3)]

    checked: list[tuple[str, int]] = []

    def stop(cfg, target, num_processes=1):
        checked.append((target, num_processes))
        raise InputError("checked")

    monkeypatch.setattr(chain, "check", stop)
    for args in (["distill", "-n", "3"], ["run", "-n", "3"]):
        r = CliRunner().invoke(flows_app, [*args, "--set", f"store={tmp_path}"])
        assert r.exit_code == 2 and "checked" in r.output, r.output
    assert checked == [("distill", 3), ("export", 3)]
