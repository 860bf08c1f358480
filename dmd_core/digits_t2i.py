"""The embedded text-to-image teacher: a tiny Stable-Diffusion-layout latent model of the 8x8 digits.

An ``AutoencoderKL`` (1x8x8 images <-> 4x4x4 latents), a ``CLIPTextModel`` with the project's own
tokenizer, and a ``UNet2DConditionModel`` trained with Stable Diffusion's schedule, saved as a plain
``StableDiffusionPipeline`` folder. ``dmd toy teacher --kind t2i`` calls ``train_toy_t2i_teacher``.
"""

from __future__ import annotations

import copy
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .digits import NUM_CLASSES, DigitsClassifier, digits_split, load_digits_data, vp_scheduler
from .text import write_clip_tokenizer

__all__ = ["write_clip_tokenizer"]  # re-exported: the tokenizer files are written by the project (dmd_core.text)

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# Held-out prompts use the same words in strings never seen in training.
TRAIN_TEMPLATES = ("a handwritten {word}", "the digit {d}", "{d}", "{word}", "a {word}")
EVAL_TEMPLATES = ("handwritten {d}", "the digit {word}", "a {d}")
MAX_LENGTH = 8  # bos + at most 3 words + eos, padded with eos
LATENT_SHAPE = (4, 4, 4)


def digit_prompts(split: str) -> list[tuple[str, int]]:
    """(prompt, digit) pairs, template-major: entry i names digit i % 10."""
    templates = {"train": TRAIN_TEMPLATES, "eval": EVAL_TEMPLATES}.get(split)
    if templates is None:
        raise ValueError(f"split {split!r}: choose train or eval")
    return [(t.format(word=DIGIT_WORDS[d], d=d), d) for t in templates for d in range(NUM_CLASSES)]


def prompt_words() -> list[str]:
    """Every word of every prompt, both splits, in a fixed order."""
    prompts = digit_prompts("train") + digit_prompts("eval")
    return list(dict.fromkeys(w for p, _ in prompts for w in p.split()))


# ---------------------------------------------------------------- models


def toy_vae():
    """1x8x8 in [-1, 1] <-> 4x4x4 latents: two blocks, one downsampling (vae_scale_factor 2)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(32, 64), layers_per_block=1, latent_channels=4, norm_num_groups=16, sample_size=8,
    )  # fmt: skip


def toy_text_encoder(vocab_size: int, hidden_size: int = 64):
    """A 2-layer CLIP text transformer; bos 0, eos = pad 1 as ``write_clip_tokenizer`` numbers them."""
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size, projection_dim=hidden_size,
        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=MAX_LENGTH, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    ))  # fmt: skip


def toy_t2i_unet(cross_attention_dim: int = 64, block_out_channels: tuple[int, int] = (32, 64)):
    """SD's UNet layout on 4x4x4 latents: cross-attention at 4x4 and in the 2x2 mid block."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=4, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=block_out_channels,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim, attention_head_dim=8, norm_num_groups=16,
    )  # fmt: skip


def num_parameters(*models) -> int:
    return sum(p.numel() for m in models for p in m.parameters())


# ---------------------------------------------------------------- training


@dataclass
class T2ITraining:
    vae_steps: int = 1000
    vae_batch_size: int = 128
    vae_lr: float = 2e-3
    # 1e-5 keeps the latents centred (channel means |m| < 0.3, posterior std ~0.1) at 28.1 dB held-out PSNR;
    # 1e-6 gave 28.4 dB but channel means up to 1.7 and a decoder twice as sensitive to latent noise,
    # 1e-4 gave 27.3 dB with one channel nearly unused (std 0.09).
    kl_weight: float = 1e-5
    # About 10 min in all on 2 cores. Measured (1 thread, PLMS-50, held-out prompts, guidance 1): 3,500 steps
    # at batch 256 FD-digits 3.06 (98.4% prompt accuracy) vs 5,000 at 128 3.64 (97.3%) for about the same time;
    # UNet blocks (64, 128) (3.2 M parameters) 3,000 at 128: 3.27 (97.4%) in 18% more time, 4x the file.
    steps: int = 3500
    batch_size: int = 256
    lr: float = 1e-3
    warmup: int = 200
    ema_decay: float = 0.999
    prompt_dropout: float = 0.1  # replaced by the empty prompt so classifier-free guidance works
    # Trained jointly (EMA like the UNet), unlike SD's frozen CLIP: a random frozen encoder's token states
    # depend on position and neighbours, so held-out strings transfer badly. At 3,000 UNet steps, PLMS-50 on
    # the held-out prompts, guidance 1 / 2 / 3: frozen 76.7% / 86.0% / 88.8% prompt accuracy (FD-digits 9.6 /
    # 7.5 / 12.4; "handwritten {d}" 60% at guidance 1); joint 96.0% / 100% / 100% (FD-digits 4.3 / 6.4 / 16.2),
    # for 9% more time per step.
    train_text_encoder: bool = True
    unet_channels: tuple[int, int] = (32, 64)
    seed: int = 0


# ---------------------------------------------------------------- VAE


def vae_loss(vae, x: torch.Tensor, kl_weight: float, generator: torch.Generator) -> torch.Tensor:
    """Per-pixel MSE of the reconstruction of a posterior sample + kl_weight * KL(q(z|x) || N(0, I)) per image."""
    post = vae.encode(x).latent_dist
    z = post.mean + post.std * torch.randn(post.mean.shape, generator=generator)
    return torch.nn.functional.mse_loss(vae.decode(z).sample, x) + kl_weight * post.kl().mean()


def train_vae(cfg: T2ITraining, images: torch.Tensor, generator: torch.Generator, progress: bool = True):
    """AdamW, linear warm-up then cosine decay to 0 over ``cfg.vae_steps``; returns the VAE (eval mode) and the losses."""
    vae = toy_vae().train()
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr)
    warmup = max(1, cfg.vae_steps // 20)
    cosine = lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + np.cos(np.pi * s / cfg.vae_steps))  # noqa: E731
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine)
    losses = []
    bar = tqdm(range(cfg.vae_steps), desc="vae", disable=not progress)
    for _ in bar:
        x = images[torch.randint(0, len(images), (cfg.vae_batch_size,), generator=generator)]
        loss = vae_loss(vae, x, cfg.kl_weight, generator)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{np.mean(losses[-100:]):.5f}")
    return vae.eval().requires_grad_(False), losses


@torch.no_grad()
def vae_reconstruction(vae, images: torch.Tensor) -> dict:
    """MSE and PSNR (data range 2, images in [-1, 1]) of decode(posterior mean), clamped as generated images are."""
    recon = vae.decode(vae.encode(images).latent_dist.mean).sample.clamp(-1, 1)
    mse = torch.mean((recon - images) ** 2).item()
    return {"mse": mse, "psnr_db": 10 * np.log10(4.0 / mse), "num_images": len(images)}


@torch.no_grad()
def latent_scaling_factor(vae, images: torch.Tensor) -> float:
    """1 / std of the posterior means of ``images`` (all elements), as Stable Diffusion chose its 0.18215."""
    return 1.0 / vae.encode(images).latent_dist.mean.std().item()


# ---------------------------------------------------------------- UNet


def token_table(tokenizer, prompts: list[str]) -> torch.Tensor:
    """(len(prompts), MAX_LENGTH) input ids, padded as the pipeline pads them."""
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids


def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for pe, p in zip(ema.parameters(), model.parameters()):
            pe.lerp_(p, 1 - decay)


def train_t2i_unet(cfg: T2ITraining, post, scale: float, labels: torch.Tensor, tokenizer, generator: torch.Generator, progress: bool = True):
    """Epsilon MSE on SD's schedule over scaled posterior samples z = (mean + std n) * scale, one random training
    prompt of its digit per image (empty with probability ``prompt_dropout``). Returns the EMA UNet, the text
    encoder (EMA if trained, else its random init) and the losses."""
    text_encoder = toy_text_encoder(len(tokenizer))
    unet = toy_t2i_unet(text_encoder.config.hidden_size, cfg.unet_channels)
    unet_ema, text_ema = copy.deepcopy(unet).eval().requires_grad_(False), copy.deepcopy(text_encoder).eval().requires_grad_(False)
    unet.train()
    text_encoder.train(cfg.train_text_encoder).requires_grad_(cfg.train_text_encoder)
    params = list(unet.parameters()) + (list(text_encoder.parameters()) if cfg.train_text_encoder else [])
    opt = torch.optim.AdamW(params, lr=cfg.lr)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / cfg.warmup))

    # Row t * 10 + d holds training template t for digit d; the last row is the empty prompt.
    train_prompts = [p for p, _ in digit_prompts("train")]
    ids = token_table(tokenizer, [*train_prompts, ""])
    null_row, n_templates = len(train_prompts), len(TRAIN_TEMPLATES)
    with torch.no_grad():
        frozen_table = text_encoder(ids)[0]
    alphas_cumprod = vp_scheduler().alphas_cumprod
    mean, std = post.mean, post.std
    losses = []
    bar = tqdm(range(cfg.steps), desc="t2i unet", disable=not progress)
    for step in bar:
        idx = torch.randint(0, len(mean), (cfg.batch_size,), generator=generator)
        z0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=generator)) * scale
        rows = torch.randint(0, n_templates, (cfg.batch_size,), generator=generator) * NUM_CLASSES + labels[idx]
        rows[torch.rand(cfg.batch_size, generator=generator) < cfg.prompt_dropout] = null_row
        t = torch.randint(0, len(alphas_cumprod), (cfg.batch_size,), generator=generator)
        noise = torch.randn(z0.shape, generator=generator)
        abar = alphas_cumprod[t].reshape(-1, 1, 1, 1)
        z_t = abar.sqrt() * z0 + (1 - abar).sqrt() * noise
        # All 51 prompts go through the encoder each step (cheap); the batch indexes the result.
        table = text_encoder(ids)[0] if cfg.train_text_encoder else frozen_table
        loss = torch.nn.functional.mse_loss(unet(z_t, t, encoder_hidden_states=table[rows]).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        lr_sched.step()
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))  # EMA warm-up: the random init fades fast
        ema_update(unet_ema, unet, decay)
        if cfg.train_text_encoder:
            ema_update(text_ema, text_encoder, decay)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{np.mean(losses[-100:]):.4f}")
    return unet_ema, text_ema, losses


def t2i_pipeline(vae, text_encoder, tokenizer, unet):
    """A StableDiffusionPipeline with Stable Diffusion v1's shipped sampler: PLMS on the training schedule."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    scheduler = PNDMScheduler.from_config(vp_scheduler().config, skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1)
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip


def train_toy_t2i_teacher(cfg: T2ITraining, progress: bool = True):
    """VAE on the 80% split, then the UNet (and optionally the text encoder) on latents of all 1,797 digits.

    Returns the ``StableDiffusionPipeline`` and an info dict (settings, losses, seconds, VAE numbers).
    """
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    images, labels = load_digits_data()
    train_idx, test_idx = digits_split(len(images), seed=0)  # the classifier's split
    t0, c0 = time.perf_counter(), time.process_time()
    vae, vae_losses = train_vae(cfg, images[train_idx], gen, progress)
    # The UNet trains on all digits (as the pixel teachers do). Their posterior is computed once:
    # mean + std * n per step is latent_dist.sample() without re-running the encoder.
    with torch.no_grad():
        post = vae.encode(images).latent_dist
    scale = latent_scaling_factor(vae, images)
    vae.register_to_config(scaling_factor=scale)
    vae_seconds = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = write_clip_tokenizer(tmp, prompt_words(), max_length=MAX_LENGTH)
    unet, text_encoder, losses = train_t2i_unet(cfg, post, scale, labels, tokenizer, gen, progress)
    info = {
        "training": asdict(cfg),
        "parameters": {"vae": num_parameters(vae), "text_encoder": num_parameters(text_encoder), "unet": num_parameters(unet)},
        "vae": {
            "train_images": len(train_idx), "final_loss_mean_last_100": float(np.mean(vae_losses[-100:])),
            "held_out_reconstruction": vae_reconstruction(vae, images[test_idx]),
            "train_reconstruction": vae_reconstruction(vae, images[train_idx]),
            "scaling_factor": scale, "scaling_factor_from": "std of the posterior means of all 1,797 digits (the UNet's training set)",
            "posterior_std_mean": post.std.mean().item(), "scaled_latent_mean": post.mean.mean().item() * scale,
        },  # fmt: skip
        "unet_final_loss_mean_last_200": float(np.mean(losses[-200:])),
        "seconds": {"vae": round(vae_seconds, 1), "total": round(time.perf_counter() - t0, 1)},
        "cpu_seconds": round(time.process_time() - c0, 1),  # all threads; a busy machine inflates wall time, not this
        "torch_threads": torch.get_num_threads(),
    }
    return t2i_pipeline(vae, text_encoder, tokenizer, unet), info


def quiet_hf_bars() -> None:
    """No per-file loading/saving bars from diffusers and transformers: a few tiny files each time, noise in the log."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


def save_t2i_pipeline(pipe, out: str | Path) -> Path:
    """``save_pretrained``, plus the tokenizer's vocab.json and merges.txt: transformers 5 saves only tokenizer.json,
    which transformers 4's (slow) CLIPTokenizer cannot read."""
    quiet_hf_bars()
    pipe.save_pretrained(str(out), safe_serialization=True)
    write_clip_tokenizer(Path(out) / "tokenizer", prompt_words(), max_length=pipe.tokenizer.model_max_length)
    return Path(out)


# ---------------------------------------------------------------- quality


def load_t2i_pipeline(teacher_dir: str | Path):
    """The saved folder, offline, with the sampler it ships (PLMS)."""
    from diffusers import StableDiffusionPipeline

    quiet_hf_bars()
    pipe = StableDiffusionPipeline.from_pretrained(str(teacher_dir), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def sample_t2i(pipe, prompts: list[str], latents: torch.Tensor, guidance_scale: float, steps: int = 50, batch_size: int = 500) -> torch.Tensor:
    """The pipeline's sampler from ``latents`` with CFG, decoded by us to the project's [-1, 1] (the pipeline's
    postprocess would map to [0, 1])."""
    scale = pipe.vae.config.scaling_factor
    out = []
    for s in range(0, len(prompts), batch_size):
        lat = pipe(prompt=prompts[s : s + batch_size], latents=latents[s : s + batch_size], num_inference_steps=steps,
                   guidance_scale=guidance_scale, height=8, width=8, output_type="latent").images  # fmt: skip
        out.append(pipe.vae.decode(lat / scale).sample.clamp(-1, 1))
    return torch.cat(out)


def t2i_report(teacher_dir: str | Path, classifier_dir: str | Path, guidance_scale: float, num_samples: int = 1000, steps: int = 50, seed: int = 1234) -> dict:
    """FD-digits (vs all 1,797 real digits) and prompt accuracy of PLMS-``steps`` samples with CFG on the
    held-out prompts, class-balanced (sample i: eval prompt i mod 30, digit i mod 10), seeded noise."""
    from .metrics import class_accuracy, frechet_distance
    from .shards import sample_noise

    clf = DigitsClassifier.load(classifier_dir)
    real, _ = load_digits_data()
    pipe = load_t2i_pipeline(teacher_dir)
    prompts = digit_prompts("eval")
    chosen = [prompts[i % len(prompts)] for i in range(num_samples)]
    fake = sample_t2i(pipe, [p for p, _ in chosen], sample_noise(seed, range(num_samples), LATENT_SHAPE), guidance_scale, steps)
    digits = torch.tensor([d for _, d in chosen])
    pipe.scheduler.set_timesteps(steps)
    templates = np.arange(num_samples) % len(prompts) // NUM_CLASSES
    by_template = {EVAL_TEMPLATES[k]: class_accuracy(clf, fake[templates == k], digits[templates == k]) for k in range(len(EVAL_TEMPLATES))}
    return {
        "teacher": str(teacher_dir),
        "solver": f"plms-{steps}",
        "nfe": len(pipe.scheduler.timesteps),  # UNet calls per sample; CFG runs each on a doubled batch
        "guidance_scale": guidance_scale,
        "prompts": "eval (held out)",
        "num_samples": num_samples,
        "fd_digits": frechet_distance(clf, real, fake),
        "prompt_accuracy": class_accuracy(clf, fake, digits),
        "prompt_accuracy_by_template": by_template,
    }


def choose_guidance(reports: list[dict], min_accuracy: float = 0.9) -> float:
    """The guidance scale with the best FD-digits among those with prompt accuracy >= ``min_accuracy``
    (if none reaches it: the most accurate)."""
    ok = [r for r in reports if r["prompt_accuracy"] >= min_accuracy]
    best = min(ok, key=lambda r: r["fd_digits"]) if ok else max(reports, key=lambda r: r["prompt_accuracy"])
    return best["guidance_scale"]
