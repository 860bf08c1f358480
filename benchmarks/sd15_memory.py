"""Memory and time of DMD on Stable Diffusion v1.5 at 512x512, with random weights in SD v1.5's configs.

    python benchmarks/sd15_memory.py --out sd15.json            # on a GPU
    python benchmarks/sd15_memory.py --tiny --out /tmp/t.json   # a smoke run of the same code on CPU
    python benchmarks/sd15_memory.py --parts options --out o.json   # distill's memory settings only

No weights are downloaded: the UNet and VAE are built from SD v1.5's published configs (below) with
random initialisation, which has the same memory and time as the trained weights. Three measurements; the
first two each at batch 1 and 4, with and without gradient checkpointing:

- ``unet``: one forward + backward of the UNet (float32 weights, bf16 autocast: what
  ``distill.mixed_precision=bf16`` runs), the activation cost one trainable network adds;
- ``dmd``: one whole DMD iteration with the project's own losses (``GeneratorLoss``, ``FakeScoreLoss``):
  generator and fake score trainable (float32 weights, fused AdamW, bf16 autocast), the real score frozen in
  ``frozen_dtype``, CFG 3 on the real score, the regression either pseudo-Huber on latents or LPIPS on
  VAE-decoded images (random VGG backbone; same cost) resized to ``lpips_resolution``. The generator runs on
  the DM batch and the regression batch together (2B latents), as distill does.

- ``options``: one DMD iteration per distill memory setting (``OPTIONS``: full, gradient checkpointing, LoRA rank 16
  and 64, bitsandbytes' 8-bit AdamW, DDP over 2 processes, FSDP over 2, FSDP over 2 with checkpointing) at
  ``--options-batch``, its networks built as distill builds them (no template, no VAE; pseudo-Huber on latents,
  CFG 3, bf16 autocast, bfloat16 frozen score), the peak per process measured from before the networks exist,
  beside dmd_core.memory's prediction for the same settings (``predicted_over_measured``). The DDP and FSDP rows
  run 2 processes (gloo on CPU, NCCL on 2 GPUs), or on one GPU rank 0 alone under torch's fake process group
  (NCCL refuses two processes on one GPU; the collectives move no data, their buffers are allocated as in a real
  run): ``--launch``. The 8-bit row needs bitsandbytes (0.50.2 ran it on CPU too).

Prompt embeddings come from the prompt table (computed once before training), so the text encoder is not
resident during training and is not counted. Peak memory is ``torch.cuda.max_memory_allocated`` over the
timed iterations (after the optimizers' states exist; ``options``: less what was allocated before the row); on
CPU (``options`` only) torch's allocator events; time is the mean of the timed iterations.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import importlib.util
import json
import math
import time

import torch

from dmd_core.denoisers import Parametrization, VPDenoiser
from dmd_core.dmd import DMDSettings, FakeScoreLoss, GeneratorLoss, OneStep, SampleRNG
from dmd_core.lora import LoraSettings
from dmd_core.losses import DecodedLoss, LPIPSLoss, pseudo_huber_loss
from dmd_core.memory import StepSettings

# runwayml/stable-diffusion-v1-5: unet/config.json, vae/config.json, scheduler/scheduler_config.json
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, downsample_padding=1, mid_block_scale_factor=1,
    act_fn="silu", norm_num_groups=32, norm_eps=1e-5, cross_attention_dim=768, attention_head_dim=8,
)  # fmt: skip
SD15_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, sample_size=512, layers_per_block=2, act_fn="silu", norm_num_groups=32,
    block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    scaling_factor=0.18215,
)  # fmt: skip
SD15_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", prediction_type="epsilon")
TEXT_TOKENS, TEXT_DIM = 77, 768  # CLIP ViT-L/14's text states: what the UNet cross-attends to

TINY_UNET = dict(SD15_UNET, sample_size=8, block_out_channels=(32, 64, 64, 64), cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8)
TINY_VAE = dict(SD15_VAE, sample_size=64, block_out_channels=(16, 32, 32, 32), norm_num_groups=8)


def build(tiny: bool, device: str):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    real = teacher(tiny, device)
    with torch.device(device):
        vae = AutoencoderKL(**(TINY_VAE if tiny else SD15_VAE)).requires_grad_(False).eval()
    return real, vae


def teacher(tiny: bool, device: str, prompts: int = 8) -> VPDenoiser:
    """The UNet as a VP denoiser with a table of ``prompts`` random prompt embeddings and the empty one (CFG). On the
    meta device: the plan's copy (shapes only)."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    unet_cfg = TINY_UNET if tiny else SD15_UNET
    with torch.device(device):  # initialise on the GPU directly: seconds instead of a minute for 860 M parameters
        unet = UNet2DConditionModel(**unet_cfg)
    sched = DDPMScheduler(**SD15_SCHEDULER)
    res = unet_cfg["sample_size"]
    param = Parametrization(kind="vp", image_shape=(4, res, res), text_conditioned=True)
    real = VPDenoiser(unet, param, sched.alphas_cumprod, dict(sched.config)).to(device)
    table = torch.randn(prompts + 1, TEXT_TOKENS, unet_cfg["cross_attention_dim"], device="cpu" if device == "meta" else device)
    real.set_prompts(table)
    return real


def peak_and_time(fn, device: str, warmup: int, repeats: int) -> dict:
    """Run ``fn`` warmup times, then ``repeats`` timed times; peak memory over the timed ones (GiB)."""
    cuda = device == "cuda"
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    if cuda:
        torch.cuda.synchronize()
    out = {"ms": round((time.perf_counter() - t0) / repeats * 1e3, 1)}
    if cuda:
        out["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return out


def guarded(fn, *args, **kw) -> dict:
    try:
        return fn(*args, **kw)
    except torch.cuda.OutOfMemoryError:
        return {"oom": True}
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def unet_fwd_bwd(real, batch: int, ckpt: bool, device: str, warmup: int, repeats: int) -> dict:
    net = copy.deepcopy(real).requires_grad_(True).train()
    if ckpt:
        net.unet.enable_gradient_checkpointing()
    shape = (batch, *real.param.image_shape)
    x, labels = torch.randn(shape, device=device), torch.zeros(batch, dtype=torch.long, device=device)
    t = torch.full((batch,), 500, device=device)

    def step():
        with torch.autocast(device, dtype=torch.bfloat16):
            net(x, t, labels).float().square().mean().backward()
        net.zero_grad(set_to_none=True)

    try:
        return peak_and_time(step, device, warmup, repeats)
    finally:
        del net


def dmd_iteration(real, vae, batch: int, ckpt: bool, regression: str, lpips_resolution: int | None, frozen_dtype: str,
                  device: str, warmup: int, repeats: int) -> dict:  # fmt: skip
    """One generator update + one fake-score update, as dmd_core.step's generator_update and fake_score_updates make them."""
    gen, fake, frozen = copy.deepcopy(real), copy.deepcopy(real), copy.deepcopy(real)
    frozen.unet.to(getattr(torch, frozen_dtype))  # as distill.frozen_dtype does: the weights only
    gen.param = dataclasses.replace(real.param, one_step_timestep=500)  # the VP generator's t*
    for net in (gen, fake):
        net.requires_grad_(True).train()
        if ckpt:
            net.unet.enable_gradient_checkpointing()
    if ckpt:
        vae.enable_gradient_checkpointing()
    else:
        vae.disable_gradient_checkpointing()
    opt_g = torch.optim.AdamW(gen.parameters(), lr=1e-5, fused=device == "cuda")
    opt_f = torch.optim.AdamW(fake.parameters(), lr=1e-5, fused=device == "cuda")
    if regression == "lpips":
        decode = lambda z: vae.decode(z / vae.config.scaling_factor).sample.float()  # noqa: E731
        reg = DecodedLoss(LPIPSLoss("vgg", random_backbone=True).to(device), decode, lpips_resolution)
    else:
        reg = pseudo_huber_loss
    step = dmd_step_fn(gen, frozen, fake, opt_g, opt_f, reg, batch, device)
    try:
        return peak_and_time(step, device, warmup, repeats)
    finally:
        del gen, fake, frozen, opt_g, opt_f, step


def dmd_step_fn(gen, frozen, fake, opt_g, opt_f, reg, batch: int, device: str):
    """One DMD iteration (CFG 3, bf16 autocast): G's update through the frozen and fake scores, then the fake score's."""
    gen_loss = GeneratorLoss(DMDSettings(guidance_scale=3.0), reg, OneStep.of(getattr(gen, "module", gen)))  # gen: maybe a DDP wrapper
    fake_loss = FakeScoreLoss.for_teacher(frozen)
    shape = frozen.param.image_shape
    step_no = [0]

    def step():
        s, idx = step_no[0], range(batch)
        rng = SampleRNG(0, 0, s, idx, device)
        z, labels = rng.randn(shape), torch.randint(0, 8, (batch,), device=device)
        z_ref, y_ref = torch.randn(batch, *shape, device=device), torch.randn(batch, *shape, device=device)
        with torch.autocast(device, dtype=torch.bfloat16):
            loss_g, _, x = gen_loss(gen, frozen, fake, z, labels, rng, z_ref, y_ref, labels)
            loss_g.backward()
        opt_g.step()
        opt_g.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=torch.bfloat16):
            fake_loss(fake, x, labels, SampleRNG(0, 1, s, idx, device)).backward()
        opt_f.step()
        opt_f.zero_grad(set_to_none=True)
        step_no[0] += 1

    return step


@dataclasses.dataclass(frozen=True)
class Option:
    """One of distill's memory settings, in the ``options`` rows."""

    name: str
    lora: int | None = None  # distill.generator_lora_rank and distill.fake_lora_rank
    optimizer: str = "adamw"  # distill.optimizer
    checkpointing: bool = False  # distill.gradient_checkpointing
    processes: int = 1
    sharding: str = "none"  # distill.sharding: with several processes, DDP (none) or FSDP

    def settings(self, batch: int, shape: tuple[int, ...]) -> StepSettings:
        """The plan's settings of the iteration ``option_step`` runs (pseudo-Huber on latents, CFG 3, bf16 autocast,
        bfloat16 frozen score, no EMA; its float32 reference pairs are one step's, where distill holds two steps':
        half a pair's bytes per sample)."""
        lora = LoraSettings(self.lora) if self.lora else None
        return StepSettings(
            batch=batch, regression=True, guidance_scale=3.0, mixed_precision="bf16", gradient_checkpointing=self.checkpointing,
            frozen_dtype=torch.bfloat16, generator_lora=lora, fake_lora=lora, data_bytes_per_sample=4 * math.prod(shape),
            optimizer=self.optimizer, processes=self.processes, sharding=self.sharding,
        )  # fmt: skip


OPTIONS = {o.name: o for o in (
    Option("full"), Option("checkpointing", checkpointing=True), Option("lora16", lora=16), Option("lora64", lora=64),
    Option("adamw8bit", optimizer="adamw8bit"), Option("ddp2", processes=2), Option("fsdp2", processes=2, sharding="fsdp"),
    Option("fsdp2_checkpointing", checkpointing=True, processes=2, sharding="fsdp"),
)}  # fmt: skip


def option_step(tiny: bool, device: str, o: Option, batch: int, world: int = 1):
    """One DMD iteration's networks built as distill builds them (stages/distill/trainer.py): the teacher, two copies
    trained (all of them, or LoRA adapters; checkpointing; ``world`` > 1: sharded as distill.sharding=fsdp shards
    them, or wrapped in DDP as Accelerate wraps them), the teacher itself as the frozen score in bfloat16, AdamW
    (fused, or bitsandbytes' 8-bit); no VAE."""
    from torch.distributed.device_mesh import init_device_mesh

    from dmd_core.lora import add_lora, set_trainable
    from stages.distill.sharding import shard

    torch.manual_seed(0)
    real = teacher(tiny, device).requires_grad_(False).eval()
    gen, fake = copy.deepcopy(real), copy.deepcopy(real)
    real.unet.to(torch.bfloat16)
    gen.param = dataclasses.replace(real.param, one_step_timestep=500)  # the VP generator's t*
    for net in (gen, fake):
        if o.checkpointing:
            net.unet.enable_gradient_checkpointing()
        if o.lora:
            add_lora(net.unet, LoraSettings(o.lora), 0)
        set_trainable(net, net.unet)
        net.train()
        if world > 1 and o.sharding == "fsdp":
            shard(net.unet, init_device_mesh(device, (world,)))

    def optimizer(net):
        params = [p for p in net.parameters() if p.requires_grad]
        if o.optimizer == "adamw8bit":
            import bitsandbytes as bnb

            return bnb.optim.AdamW8bit(params, lr=1e-5)
        return torch.optim.AdamW(params, lr=1e-5, fused=True)

    opt_g, opt_f = optimizer(gen), optimizer(fake)
    if world > 1 and o.sharding == "none":  # Accelerate's DDP: default buckets, no gradient_as_bucket_view
        ids = [torch.cuda.current_device()] if device == "cuda" else None
        gen, fake = (torch.nn.parallel.DistributedDataParallel(net, device_ids=ids) for net in (gen, fake))
        if torch.distributed.get_backend() == "fake":  # its all-reduce returns nothing: a hook that leaves the bucket as it is
            for net in (gen, fake):
                net.register_comm_hook(None, _bucket_as_is)
    return dmd_step_fn(gen, real, fake, opt_g, opt_f, pseudo_huber_loss, batch, device)


def _bucket_as_is(state, bucket):  # unannotated: DDP checks a return annotation, and this module's are strings
    fut = torch.futures.Future()
    fut.set_result(bucket.buffer())
    return fut


def measured_peak(make_step, device: str, warmup: int, repeats: int) -> dict:
    """``make_step()`` builds the networks and returns one iteration; run it warmup times (the optimizer states
    appear), then ``repeats`` timed times. Peak bytes over the timed ones, counted from before the networks exist:
    ``torch.cuda.max_memory_allocated`` less what was allocated before; on the CPU, torch's allocator events
    (torch.profiler's memory events, as tests/test_memory_plan.py counts them)."""
    gc.collect()  # an earlier row's networks held in reference cycles (FSDP's hooks): freed now, not inside this count
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        step = make_step()
        out = peak_and_time(step, device, warmup, repeats)
        out["peak_bytes"] = torch.cuda.max_memory_allocated() - base
        del step
        return out
    from torch.profiler import ProfilerActivity, profile, record_function

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step = make_step()
        for _ in range(warmup):
            step()
        with record_function("timed"):
            t0 = time.perf_counter()
            for _ in range(repeats):
                step()
            ms = (time.perf_counter() - t0) / repeats * 1e3
        del step
    events = prof.profiler.kineto_results.events()
    window = next(e for e in events if e.name() == "timed")
    live = peak = 0
    for t, n in sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]" and e.device_type().name == "CPU"):
        live += n
        if window.start_ns() <= t <= window.end_ns():
            peak = max(peak, live)
    return {"ms": round(ms, 1), "peak_bytes": peak}


def option_row(tiny: bool, device: str, o: Option, batch: int, warmup: int, repeats: int, world: int = 1) -> dict:
    """The measured peak of one option on this process (``world`` > 1: in a process group of that size)."""
    return measured_peak(lambda: option_step(tiny, device, o, batch, world), device, warmup, repeats)


def _worker(rank: int, world: int, port: int, tiny: bool, device: str, o: Option, batch: int, warmup: int, repeats: int, queue) -> None:
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1 if device == "cpu" else torch.get_num_threads())
    if device == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if device == "cuda" else "gloo", rank=rank, world_size=world)
    try:
        queue.put((rank, guarded(option_row, tiny, device, o, batch, warmup, repeats, world)))
    finally:
        dist.destroy_process_group()


def distributed_row(tiny: bool, device: str, o: Option, batch: int, warmup: int, repeats: int, launch: str) -> dict:
    """DDP or FSDP over ``o.processes``: ``spawn`` runs that many processes (gloo on the CPU, NCCL on as many GPUs)
    and reports the largest per-process peak; ``fake`` runs rank 0 alone in this process under torch's fake process
    group (collectives that move no data, their outputs allocated as real ones are): a process's memory in a real
    run, less the communication library's own buffers. One GPU takes ``fake`` (NCCL refuses two processes on one
    GPU)."""
    import socket

    import torch.distributed as dist
    import torch.multiprocessing as mp

    if launch == "fake":
        from torch.testing._internal.distributed.fake_pg import FakeStore

        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=o.processes)
        try:
            return {"launch": "fake process group, rank 0", **option_row(tiny, device, o, batch, warmup, repeats, o.processes)}
        finally:
            dist.destroy_process_group()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(_worker, (o.processes, port, tiny, device, o, batch, warmup, repeats, queue), nprocs=o.processes, start_method="spawn")
    ranks = dict(queue.get() for _ in range(o.processes))
    peaks = [ranks[r].get("peak_bytes") for r in sorted(ranks)]
    if any(p is None for p in peaks):
        return {"launch": f"{o.processes} processes", "ranks": [ranks[r] for r in sorted(ranks)], "oom": True}
    return {"launch": f"{o.processes} processes", "ms": max(ranks[r]["ms"] for r in ranks), "peak_bytes": max(peaks), "rank_peaks_bytes": peaks}


def option_rows(tiny: bool, device: str, names: list[str], batch: int, repeats: int, launch: str = "auto", save=lambda row: None) -> list[dict]:
    """Each option's measured peak per process beside the plan's prediction (dmd_core.memory at the same settings)."""
    from dmd_core.memory import DMDProbes, dmd_step
    from stages.distill.sharding import shard_units

    plan_teacher = teacher(tiny, "cpu" if tiny else "meta", prompts=1)
    probes = DMDProbes(plan_teacher, fake=not tiny, units=shard_units)  # one set of probes: the options share what they do not change
    if launch == "auto":
        launch = "spawn" if device == "cpu" or torch.cuda.device_count() >= 2 else "fake"
    rows = []
    for name in names:
        o = OPTIONS[name]
        row = {"option": name, "batch": batch}
        try:
            if o.optimizer == "adamw8bit" and importlib.util.find_spec("bitsandbytes") is None:
                row["skipped"] = "needs bitsandbytes"
            elif o.processes > 1:
                row |= guarded(distributed_row, tiny, device, o, batch, 1, repeats, launch)
            else:
                row |= guarded(option_row, tiny, device, o, batch, 1, repeats)
        except Exception as e:  # one option failing must not lose the others' numbers
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        t0 = time.perf_counter()
        plan = dmd_step(probes, o.settings(batch, plan_teacher.param.image_shape))
        row |= {"predicted_bytes": plan.total, "plan_s": round(time.perf_counter() - t0, 1), "predicted_gib": round(plan.total / 2**30, 3)}
        if row.get("peak_bytes"):
            row |= {"measured_gib": round(row["peak_bytes"] / 2**30, 3), "predicted_over_measured": round(plan.total / row["peak_bytes"], 3)}
        rows.append(row)
        print(json.dumps(row), flush=True)
        save(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--tiny", action="store_true", help="small configs, for a CPU smoke run of this script")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--parts", default="unet,dmd,options", help="comma-separated: unet, dmd, options (distill's memory settings: measured and planned)")
    ap.add_argument("--options", default=",".join(OPTIONS), help=f"the options rows: {', '.join(OPTIONS)}")
    ap.add_argument("--options-batch", type=int, default=4)
    ap.add_argument("--launch", choices=["auto", "spawn", "fake"], default="auto",
                    help="the DDP and FSDP rows: spawn: real processes (gloo on CPU, NCCL on a GPU each); fake: rank 0 under torch's fake process group; auto: fake on one GPU")
    args = ap.parse_args()
    parts = args.parts.split(",")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    res: dict = {"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu", "torch": torch.__version__,
                 "configs": "tiny (smoke run)" if args.tiny else "SD v1.5 (random weights)"}  # fmt: skip
    if "unet" in parts or "dmd" in parts:
        template_rows(res, parts, args.tiny, device, args.repeats, args.out)
    if "options" in parts:  # after the template networks are freed: each row counts what it builds
        res["options"] = []
        option_rows(args.tiny, device, args.options.split(","), args.options_batch, args.repeats, args.launch,
                    lambda row: (res["options"].append(row), save(res, args.out)))  # fmt: skip


def template_rows(res: dict, parts: list[str], tiny: bool, device: str, repeats: int, out: str) -> None:
    """The ``unet`` and ``dmd`` rows: copies of one float32 template UNet (resident throughout), its VAE in float32."""
    real, vae = build(tiny, device)
    n_unet = sum(p.numel() for p in real.unet.parameters())
    res |= {
        "unet_parameters": n_unet, "vae_parameters": sum(p.numel() for p in vae.parameters()),
        "resident_weights_gib": {  # generator + fake (float32 + AdamW's two moments + grads) and the frozen score
            "trainable_fp32_adamw_per_network": round(n_unet * 16 / 2**30, 2), "frozen_bf16": round(n_unet * 2 / 2**30, 2),
        },
        "unet": [], "dmd": [],
    }  # fmt: skip
    real.requires_grad_(False)
    for batch in (1, 4) if "unet" in parts else ():
        for ckpt in (False, True):
            r = guarded(unet_fwd_bwd, real, batch, ckpt, device, 1, repeats)
            res["unet"].append({"batch": batch, "gradient_checkpointing": ckpt, **r})
            print(json.dumps(res["unet"][-1]), flush=True)
            save(res, out)
    runs = [(b, c, "pseudo_huber", None, "bfloat16") for b in (1, 4) for c in (False, True)]
    runs += [(b, c, "lpips", 224, "bfloat16") for b in (1, 4) for c in (False, True)]
    runs += [(4, True, "lpips", None, "bfloat16"), (4, True, "pseudo_huber", None, "float32")]
    for batch, ckpt, reg, size, frozen in runs if "dmd" in parts else ():
        r = guarded(dmd_iteration, real, vae, batch, ckpt, reg, size, frozen, device, 1, repeats)
        row = {"batch": batch, "gradient_checkpointing": ckpt, "regression": reg, "lpips_resolution": size, "frozen_dtype": frozen, **r}
        res["dmd"].append(row)
        print(json.dumps(row), flush=True)
        save(res, out)
    del real, vae
    if device == "cuda":
        torch.cuda.empty_cache()


def save(res: dict, path: str) -> None:
    """Rewritten after every row, so a run stopped at its time limit keeps what it measured."""
    with open(path, "w") as f:
        json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
