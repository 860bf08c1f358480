"""Load and save denoisers and their teachers' parts, whatever the folder's layout (dmd_core.layouts).

The entry points the stages call: each asks ``dmd_core.layouts.detect`` which layout a folder is (a denoiser
directory, a DDPMPipeline folder, a StableDiffusionPipeline folder, ...) and lets it answer. A generator
or fake score is saved as a denoiser directory (``save_denoiser``): ``config.json``, the safetensors
weights, ``denoiser.json`` and, for VP models, ``scheduler/``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from diffusers import DDPMScheduler

from .denoisers import Denoiser, Parametrization, VPDenoiser
from .errors import InputError
from .layouts import StableDiffusionLayout, detect, known_layouts
from .layouts.common import PARAM_FILE, PIPELINE_INDEX, SCHEDULER_FILE, TEXT_WEIGHTS_FILE, WEIGHTS_FILE, check_weights, load_unet
from .layouts.common import read_scheduler_config, resolve_model_dir
from .text import PromptEncoder

__all__ = [
    "PARAM_FILE", "PIPELINE_INDEX", "SCHEDULER_FILE", "TEXT_WEIGHTS_FILE", "WEIGHTS_FILE", "check_weights", "encode_latents",
    "is_pipeline_folder", "known_layouts", "latent_decoder", "load_denoiser", "load_prompt_encoder", "load_unet", "load_vae",
    "read_parametrization", "read_scheduler_config", "resolve_model_dir", "save_denoiser",
]  # fmt: skip


def read_parametrization(path: str | os.PathLike) -> Parametrization:
    """A teacher's parametrisation without loading weights (image_shape from the UNet config if absent)."""
    folder = resolve_model_dir(path)
    return detect(folder).parametrization(folder)


def load_denoiser(path: str | os.PathLike, device: str | torch.device = "cpu") -> Denoiser:
    """The denoiser in ``path`` (any layout) as an EDM or VP x0-predictor, frozen, in eval mode."""
    folder = resolve_model_dir(path)
    return detect(folder).load_denoiser(folder, device)


def load_prompt_encoder(path: str | os.PathLike, device: str | torch.device = "cpu") -> PromptEncoder:
    """The teacher's own tokenizer and text encoder (frozen) as a ``dmd_core.text.PromptEncoder``."""
    folder = resolve_model_dir(path)
    return detect(folder).prompt_encoder(folder, device)


def load_vae(path: str | os.PathLike, device: str | torch.device = "cpu"):
    """A Stable Diffusion pipeline's AutoencoderKL (frozen); ``vae.config.scaling_factor`` maps its latents to model space."""
    folder = resolve_model_dir(path)
    layout = detect(folder)
    if not isinstance(layout, StableDiffusionLayout):
        raise InputError(f"{folder} is a {layout.name} teacher: it has no VAE (its model space is pixels). Fix: use its images as they are.")
    return layout.load_vae(folder, device)


def latent_decoder(path: str | os.PathLike, device: str | torch.device = "cpu", gradient_checkpointing: bool = False, dtype: torch.dtype | None = None):
    """Model space -> images (``Layout.pixel_decoder``): the VAE decoder of latent teachers, identity for pixel ones."""
    folder = resolve_model_dir(path)
    return detect(folder).pixel_decoder(folder, device, gradient_checkpointing, dtype)


def encode_latents(path: str | os.PathLike, images: torch.Tensor, device: str | torch.device = "cpu", batch_size: int = 64) -> torch.Tensor:
    """Images in [-1, 1] -> model space (``Layout.encode_pixels``): VAE latents times scaling_factor for latent teachers."""
    folder = resolve_model_dir(path)
    return detect(folder).encode_pixels(folder, images, device, batch_size)


def is_pipeline_folder(model_dir: str | os.PathLike) -> bool:
    return (Path(model_dir) / PIPELINE_INDEX).is_file()


def save_denoiser(den: Denoiser, path: str | os.PathLike) -> Path:
    """Write ``den`` as a denoiser directory: save_pretrained (safetensors) + denoiser.json (+ scheduler)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    den.unet.save_pretrained(str(path), safe_serialization=True)
    (path / PARAM_FILE).write_text(json.dumps(den.param.to_dict(), indent=2) + "\n")
    if isinstance(den, VPDenoiser):
        DDPMScheduler.from_config(den.scheduler_config).save_pretrained(str(path / "scheduler"))
    return path
