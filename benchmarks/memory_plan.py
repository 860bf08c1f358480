"""The memory plan (dmd_core.memory) of distill at Stable Diffusion v1.5 and SDXL size, on any machine (no GPU, no
weights): the networks are built from the published configs on the meta device and probed on fake tensors.

    python benchmarks/memory_plan.py --out benchmarks/results/memory_plan.json
    python benchmarks/memory_plan.py --tiny --out /tmp/t.json       # a smoke run of the same code

Two parts:
- ``h100``: the plan of each configuration benchmarks/sd15_memory.py measured on an H100 (SD v1.5, 512x512, bf16
  autocast, CFG 3, batch 1 and 4, with and without gradient checkpointing, pseudo-Huber or LPIPS on decoded
  images, frozen score in bfloat16 or float32), beside the measured peak (benchmarks/results/sd15_memory_h100.json);
  planned as that script ran them (its float32 template UNet resident, its VAE in float32).
- ``fit``: SD v1.5 (512) and SDXL (1024) at batch 1 and 4 per device, bf16 autocast, bfloat16 frozen score,
  pseudo-Huber, with and without checkpointing: full fine-tune, LoRA rank 64 (generator and fake score),
  distill.optimizer=adamw8bit, distill.sharding=fsdp over 2 and 8 processes (the FSDP units distill shards by).

The probes run the networks' calls as the CPU runs them (CPU autocast, PyTorch's CPU attention kernels); the H100
rows say how far that is from a GPU's own peak.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import time
from pathlib import Path

import torch

from dmd_core.denoisers import Parametrization, VPDenoiser
from dmd_core.lora import LoraSettings
from dmd_core.losses import DecodedLoss, LPIPSLoss
from dmd_core.memory import DMDProbes, StepSettings, dmd_step, quiet_diffusers
from dmd_core.rows import PromptRows
from sd15_memory import SD15_UNET  # the SD v1.5 UNet config the H100 peaks were measured with (run as a script from benchmarks/)

# stabilityai/stable-diffusion-xl-base-1.0: unet/config.json; the VAE below is SD v1.5's (SDXL's has its geometry)
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280), layers_per_block=2, transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816, norm_num_groups=32, act_fn="silu",
)  # fmt: skip
VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, act_fn="silu", norm_num_groups=32,
    block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
)  # fmt: skip
SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
TINY_UNET = dict(SD15_UNET, sample_size=8, block_out_channels=(32, 64, 64, 64), cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8)
TINY_VAE = dict(VAE, block_out_channels=(16, 32, 32, 32), norm_num_groups=8)

# name: (UNet config, image side, prompt rows: token embeddings and pooled width, VAE scaling factor)
MODELS = {
    "SD v1.5": (SD15_UNET, 512, (77, 768, None), 0.18215),
    "SDXL": (SDXL_UNET, 1024, (77, 2048, 1280), 0.13025),
    "tiny": (TINY_UNET, 64, (77, 32, None), 0.18215),
}


def teacher(name: str) -> VPDenoiser:
    """The model's UNet on the meta device as a VP denoiser, with a one-prompt table (the prompt and the empty one)."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    cfg, side, (tokens, width, pooled), _ = MODELS[name]
    with torch.device("meta"):
        unet = UNet2DConditionModel(**cfg)
    sched = DDPMScheduler(**SCHEDULER)
    latent = cfg["sample_size"]
    time_ids = (side, side, 0, 0, side, side) if pooled else None
    param = Parametrization(kind="vp", image_shape=(4, latent, latent), text_conditioned=True, add_time_ids=time_ids)
    den = VPDenoiser(unet, param, sched.alphas_cumprod, dict(sched.config)).requires_grad_(False).eval()
    rows = {"hidden": torch.zeros(2, tokens, width)} | ({"pooled": torch.zeros(2, pooled)} if pooled else {})
    den.set_prompts(PromptRows(rows))
    return den


def extras(name: str, vae_cfg: dict):
    """The VAE decoder (built on the CPU: a real 83 M-parameter module the probes read through fake tensors) and
    LPIPS (VGG, random backbone) as distill builds them, per settings."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    base = AutoencoderKL(**vae_cfg, scaling_factor=MODELS[name][3]).requires_grad_(False).eval()
    lpips = LPIPSLoss("vgg", random_backbone=True)
    cache: dict = {}

    def build(s: StepSettings, regression: str, lpips_resolution: int | None, vae_dtype: torch.dtype | None):
        key = (s.gradient_checkpointing, vae_dtype or s.frozen_dtype)
        if key not in cache:
            vae = copy.deepcopy(base)
            with quiet_diffusers():
                vae.to(vae_dtype or s.frozen_dtype)
            if s.gradient_checkpointing:
                vae.enable_gradient_checkpointing()
            cache[key] = vae
        vae = cache[key]
        if regression != "lpips":
            return None, [vae]
        decode = lambda z: vae.decode((z / vae.config.scaling_factor).to(vae.dtype)).sample.float()  # noqa: E731
        return DecodedLoss(lpips, decode, lpips_resolution), [vae, lpips]

    return build


class Planner:
    """One model's probes, with the regression loss (and the VAE's dtype: None, distill.frozen_dtype) chosen per row."""

    def __init__(self, name: str, vae_cfg: dict):
        self.regression, self.resolution, self.vae_dtype = "pseudo_huber", None, None
        build = extras(name, vae_cfg)
        from stages.distill.sharding import shard_units

        self.probes = DMDProbes(teacher(name), lambda s: build(s, self.regression, self.resolution, self.vae_dtype), fake=True, units=shard_units)

    def plan(self, s: StepSettings, regression: str = "pseudo_huber", lpips_resolution: int | None = None, vae_dtype: torch.dtype | None = None):
        if (regression, lpips_resolution, vae_dtype) != (self.regression, self.resolution, self.vae_dtype):
            # the regression probe's cache key does not name these: probed again
            self.probes.cache = {k: v for k, v in self.probes.cache.items() if k[0] != "regression"}
        self.regression, self.resolution, self.vae_dtype = regression, lpips_resolution, vae_dtype
        return dmd_step(self.probes, s)


def gib(n: int) -> float:
    return round(n / 2**30, 2)


def h100_rows(planner: Planner, measured: dict) -> list[dict]:
    """sd15_memory.py's rows as it ran them: besides what distill holds, its float32 UNet the networks are copied from
    stays resident, and its VAE stays in float32."""
    template = 4 * measured["unet_parameters"]
    rows = []
    for m in measured["dmd"]:
        s = StepSettings(batch=m["batch"], regression=True, guidance_scale=3.0, mixed_precision="bf16", gradient_checkpointing=m["gradient_checkpointing"],
                         frozen_dtype=getattr(torch, m["frozen_dtype"]))  # fmt: skip
        t0 = time.perf_counter()
        plan = planner.plan(s, m["regression"], m["lpips_resolution"], torch.float32)
        plan = dataclasses.replace(plan, other={**plan.other, "sd15_memory.py's float32 template UNet": template})
        row = {k: m[k] for k in ("batch", "gradient_checkpointing", "regression", "lpips_resolution", "frozen_dtype")}
        row |= {"measured_gib": m.get("peak_gib"), "predicted_gib": gib(plan.total), "plan_s": round(time.perf_counter() - t0, 1)}
        if m.get("peak_gib"):
            row["predicted_over_measured"] = round(plan.total / 2**30 / m["peak_gib"], 3)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def fit_rows(planner: Planner, name: str) -> list[dict]:
    rows = []
    lora = LoraSettings(64)
    for batch in (1, 4):
        for ckpt in (False, True):
            s = StepSettings(batch=batch, regression=True, guidance_scale=3.0, mixed_precision="bf16", gradient_checkpointing=ckpt, frozen_dtype=torch.bfloat16)  # fmt: skip
            full = planner.plan(s)
            with_lora = planner.plan(dataclasses.replace(s, generator_lora=lora, fake_lora=lora))
            fsdp = lambda n, base=s: planner.plan(dataclasses.replace(base, processes=n, sharding="fsdp")).total  # noqa: E731
            row = {"model": name, "batch": batch, "gradient_checkpointing": ckpt, "full_gib": gib(full.total), "lora64_gib": gib(with_lora.total),
                   "adamw8bit_gib": gib(planner.plan(dataclasses.replace(s, optimizer="adamw8bit")).total), "fsdp2_gib": gib(fsdp(2)),
                   "fsdp8_gib": gib(fsdp(8)), "lora64_fsdp8_gib": gib(fsdp(8, dataclasses.replace(s, generator_lora=lora, fake_lora=lora))),
                   "ddp2_gib": gib(planner.plan(dataclasses.replace(s, processes=2)).total),
                   "generator_parameters": full.networks[0].trainable_params, "lora64_adapter_parameters": with_lora.networks[0].trainable_params}  # fmt: skip
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--tiny", action="store_true", help="small configs, a smoke run of this script")
    ap.add_argument("--measured", default=str(Path(__file__).parent / "results" / "sd15_memory_h100.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    res: dict = {"torch": torch.__version__, "probes": "fake tensors on the CPU (CPU autocast, CPU attention kernels)", "h100": [], "fit": []}
    measured = json.loads(Path(args.measured).read_text())
    names = ["tiny"] if args.tiny else ["SD v1.5", "SDXL"]
    for name in names:
        planner = Planner(name, TINY_VAE if args.tiny else VAE)
        if name != "SDXL":
            res["h100"] = h100_rows(planner, measured)
            save(res, args.out)
        res["fit"] += fit_rows(planner, name)
        save(res, args.out)
    print_tables(res)


def print_tables(res: dict) -> None:
    print("\n| batch | checkpointing | regression | frozen | measured on H100 (GiB) | predicted (GiB) | predicted / measured |")
    print("|---|---|---|---|---|---|---|")
    for r in res["h100"]:
        reg = r["regression"] + (f" at {r['lpips_resolution']}" if r["lpips_resolution"] else "")
        print(f"| {r['batch']} | {'yes' if r['gradient_checkpointing'] else 'no'} | {reg} | {r['frozen_dtype']} | {r['measured_gib']} | {r['predicted_gib']} | {r.get('predicted_over_measured', '-')} |")
    print("\n| model | batch | checkpointing | full | LoRA 64 | 8-bit AdamW | DDP x2 | FSDP x2 | FSDP x8 | LoRA 64 + FSDP x8 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in res["fit"]:
        print(f"| {r['model']} | {r['batch']} | {'yes' if r['gradient_checkpointing'] else 'no'} | {r['full_gib']} | {r['lora64_gib']} | "
              f"{r['adamw8bit_gib']} | {r['ddp2_gib']} | {r['fsdp2_gib']} | {r['fsdp8_gib']} | {r['lora64_fsdp8_gib']} |")  # fmt: skip


def save(res: dict, path: str) -> None:
    """Rewritten after every model, so a run stopped early keeps what it planned."""
    Path(path).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
