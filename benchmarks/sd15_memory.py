"""Memory and time of DMD on Stable Diffusion v1.5 at 512x512, with random weights in SD v1.5's configs.

    python benchmarks/sd15_memory.py --out sd15.json            # on a GPU
    python benchmarks/sd15_memory.py --tiny --out /tmp/t.json   # a smoke run of the same code on CPU

No weights are downloaded: the UNet and VAE are built from SD v1.5's published configs (below) with
random initialisation, which has the same memory and time as the trained weights. Two measurements,
each at batch 1 and 4, with and without gradient checkpointing:

- ``unet``: one forward + backward of the UNet (float32 weights, bf16 autocast: what
  ``distill.mixed_precision=bf16`` runs), the activation cost one trainable network adds;
- ``dmd``: one whole DMD iteration with the project's own losses (``GeneratorLoss``, ``FakeScoreLoss``):
  generator and fake score trainable (float32 weights, fused AdamW, bf16 autocast), the real score frozen in
  ``frozen_dtype``, CFG 3 on the real score, the regression either pseudo-Huber on latents or LPIPS on
  VAE-decoded images (random VGG backbone; same cost) resized to ``lpips_resolution``. The generator runs on
  the DM batch and the regression batch together (2B latents), as distill does.

Prompt embeddings come from the prompt table (computed once before training), so the text encoder is not
resident during training and is not counted. Peak memory is ``torch.cuda.max_memory_allocated`` over the
timed iterations (after the optimizers' states exist); time is the mean of the timed iterations.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import time

import torch

from dmd_core.denoisers import Parametrization, VPDenoiser
from dmd_core.dmd import DMDSettings, FakeScoreLoss, GeneratorLoss, OneStep, SampleRNG
from dmd_core.losses import DecodedLoss, LPIPSLoss, pseudo_huber_loss

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
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    unet_cfg, vae_cfg = (TINY_UNET, TINY_VAE) if tiny else (SD15_UNET, SD15_VAE)
    torch.manual_seed(0)
    with torch.device(device):  # initialise on the GPU directly: seconds instead of a minute for 860 M parameters
        unet = UNet2DConditionModel(**unet_cfg)
        vae = AutoencoderKL(**vae_cfg).requires_grad_(False).eval()
    sched = DDPMScheduler(**SD15_SCHEDULER)
    res = unet_cfg["sample_size"]
    param = Parametrization(kind="vp", image_shape=(4, res, res), text_conditioned=True)
    real = VPDenoiser(unet, param, sched.alphas_cumprod, dict(sched.config)).to(device)
    dim = unet_cfg["cross_attention_dim"]
    real.set_prompts(torch.randn(9, TEXT_TOKENS, dim, device=device))  # 8 prompts + the empty one (CFG)
    return real, vae


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
    gen_loss = GeneratorLoss(DMDSettings(guidance_scale=3.0), reg, OneStep.of(gen))
    fake_loss = FakeScoreLoss.for_teacher(real)
    shape = real.param.image_shape
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

    try:
        return peak_and_time(step, device, warmup, repeats)
    finally:
        del gen, fake, frozen, opt_g, opt_f


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--tiny", action="store_true", help="small configs, for a CPU smoke run of this script")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    real, vae = build(args.tiny, device)
    n_unet = sum(p.numel() for p in real.unet.parameters())
    res: dict = {
        "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu", "torch": torch.__version__,
        "configs": "tiny (smoke run)" if args.tiny else "SD v1.5 (random weights)",
        "unet_parameters": n_unet, "vae_parameters": sum(p.numel() for p in vae.parameters()),
        "resident_weights_gib": {  # generator + fake (float32 + AdamW's two moments + grads) and the frozen score
            "trainable_fp32_adamw_per_network": round(n_unet * 16 / 2**30, 2), "frozen_bf16": round(n_unet * 2 / 2**30, 2),
        },
        "unet": [], "dmd": [],
    }  # fmt: skip
    real.requires_grad_(False)
    for batch in (1, 4):
        for ckpt in (False, True):
            r = guarded(unet_fwd_bwd, real, batch, ckpt, device, 1, args.repeats)
            res["unet"].append({"batch": batch, "gradient_checkpointing": ckpt, **r})
            print(json.dumps(res["unet"][-1]), flush=True)
            save(res, args.out)
    runs = [(b, c, "pseudo_huber", None, "bfloat16") for b in (1, 4) for c in (False, True)]
    runs += [(b, c, "lpips", 224, "bfloat16") for b in (1, 4) for c in (False, True)]
    runs += [(4, True, "lpips", None, "bfloat16"), (4, True, "pseudo_huber", None, "float32")]
    for batch, ckpt, reg, size, frozen in runs:
        r = guarded(dmd_iteration, real, vae, batch, ckpt, reg, size, frozen, device, 1, args.repeats)
        row = {"batch": batch, "gradient_checkpointing": ckpt, "regression": reg, "lpips_resolution": size, "frozen_dtype": frozen, **r}
        res["dmd"].append(row)
        print(json.dumps(row), flush=True)
        save(res, args.out)


def save(res: dict, path: str) -> None:
    """Rewritten after every row, so a run stopped at its time limit keeps what it measured."""
    with open(path, "w") as f:
        json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
