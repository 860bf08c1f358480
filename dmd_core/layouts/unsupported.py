"""Families the project knows but does not load: named in the refusal, so that nothing is mistaken for them.

Asked only after every registered layout has declined a folder: a layout added for a family here wins.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import InputError
from .common import PIPELINE_INDEX, named

FIX = "Fix: distil a teacher of a supported layout (docs/layouts.md lists them), or add a layout for this family (docs/layouts.md, 'Adding a teacher layout')."

# model_index.json's _class_name -> what the family is and why it is not loaded
FAMILIES = {
    "PixArtAlphaPipeline": "PixArt: a transformer on VAE latents (transformer/, not unet/), not supported yet",
    "PixArtSigmaPipeline": "PixArt: a transformer on VAE latents (transformer/, not unet/), not supported yet",
    "LDMPipeline": "latent diffusion on a VQ autoencoder's latents (vqvae/): its latents are not images and no VQ codec is implemented",
    "LDMTextToImagePipeline": "latent diffusion on a VQ autoencoder's latents (vqvae/): its latents are not images and no VQ codec is implemented",
    "StableDiffusionInpaintPipeline": "an inpainting model: its UNet also reads a mask and the masked image's latents",
}

# A component of model_index.json -> the family it marks, for a folder whose _class_name is not in FAMILIES.
COMPONENTS = {
    "vqvae": "latent diffusion on a VQ autoencoder's latents (vqvae/), not supported",
    "transformer": "a transformer backbone (transformer/, not unet/), not supported yet",
    "text_encoder_2": "two text encoders beside parts the SDXL layout does not read, not supported",
}


def refuse_known_family(folder: Path, index: dict) -> None:
    """Raise an InputError naming the family when ``index`` is one of a known, unsupported family."""
    cls = index.get("_class_name")
    if cls in FAMILIES:
        raise InputError(f"{folder / PIPELINE_INDEX} names {cls}, {FAMILIES[cls]}. {FIX}")
    for part, what in COMPONENTS.items():
        if named(index, part):
            raise InputError(f"{folder / PIPELINE_INDEX} names {cls or 'a pipeline'} with {part}/: {what}. {FIX}")
