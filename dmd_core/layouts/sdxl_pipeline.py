"""A diffusers ``StableDiffusionXLPipeline`` folder (SDXL base): a latent, prompt-conditioned VP teacher with two
text encoders and size conditioning.

``model_index.json``, ``unet/`` (a UNet2DConditionModel with ``addition_embed_type`` "text_time"), ``scheduler/``,
``vae/``, ``text_encoder/`` + ``tokenizer/`` (CLIP ViT-L) and ``text_encoder_2/`` + ``tokenizer_2/`` (OpenCLIP bigG,
with a projection). As ``StableDiffusionXLPipeline`` computes them: the prompt's token embeddings are both
encoders' penultimate hidden states side by side (768 + 1280 = 2048 wide at SDXL size), its pooled embedding the
second encoder's projected output; the UNet also reads ``time_ids`` = original size, crop top-left and target
size (the image's own (H, W), (0, 0), (H, W) unless ``teacher.original_size`` / ``crop_top_left`` /
``target_size`` say otherwise). CFG's unconditional row is zeros when the folder's ``force_zeros_for_empty_prompt``
is true (the pipeline's default), else the empty prompt's embeddings. The refiner (``text_encoder_2`` only,
conditioned on an aesthetic score) is refused.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable

import torch

from ..denoisers import Parametrization
from ..errors import InputError
from ..text import PromptEncoder
from .common import PIPELINE_INDEX, RESAVE, TEXT_WEIGHTS_FILE, is_int, named, read_json
from .sd_pipeline import StableDiffusionLayout, load_text_part

Tensor = torch.Tensor
TEXT_PARTS = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
PARTS = ("unet", "scheduler", "vae", *TEXT_PARTS)
OPTIONAL_PARTS = ("image_encoder", "feature_extractor")  # IP-Adapter inputs, [null, null] as save_pretrained writes them
SAVE_WHOLE = "Fix: save the whole pipeline (StableDiffusionXLPipeline.save_pretrained writes unet/, vae/, text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/, scheduler/)."
SIZES = {"original_size": slice(0, 2), "crop_top_left": slice(2, 4), "target_size": slice(4, 6)}  # teacher.* -> add_time_ids
NUM_TIME_IDS = 6
REFINER = (
    "an SDXL refiner (text_encoder_2 only, conditioned on an aesthetic score), which is out of scope: it refines a base model's "
    "latents at low noise rather than generating. Fix: point teacher.path at the SDXL base pipeline (StableDiffusionXLPipeline: "
    "text_encoder/ and text_encoder_2/)."
)


class StableDiffusionXLLayout(StableDiffusionLayout):
    name = "sdxl_pipeline"
    description = (
        "a diffusers StableDiffusionXLPipeline folder (SDXL base: model_index.json, unet/, scheduler/, vae/, text_encoder/, "
        "text_encoder_2/, tokenizer/, tokenizer_2/)"
    )
    pipeline_class = "StableDiffusionXLPipeline"
    # a base model saved through the img2img pipeline is the same folder; a refiner is refused by parametrization
    classes = ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline")
    save_hint = "StableDiffusionXLPipeline.save_pretrained(dir)"
    size_conditioned = True

    def matches_parts(self, parts: set[str]) -> bool:
        return "text_encoder_2" in parts and parts <= {*PARTS, *OPTIONAL_PARTS}

    # ------------------------------------------------------------ parametrisation

    def parametrization(self, folder: Path) -> Parametrization:
        index = read_json(folder / PIPELINE_INDEX, "pipeline index")
        if index.get("requires_aesthetics_score") is True or (named(index, "text_encoder_2") and not named(index, "text_encoder")):
            raise InputError(f"{folder / PIPELINE_INDEX} names {REFINER}")
        return super().parametrization(folder)

    def with_defaults(self, folder: Path, param: Parametrization) -> Parametrization:
        """SDXL's default size conditioning: original and target size the image's (H, W), no crop (the pipeline's
        defaults for an image of the UNet's sample size); a denoiser.json override may set its own."""
        if param.add_time_ids is not None:
            return param
        _, h, w = self.pixel_shape(folder, param)
        return dataclasses.replace(param, add_time_ids=(h, w, 0, 0, h, w))

    def configure(self, folder: Path, param: Parametrization, sizes: dict) -> Parametrization:
        """``param`` with the configured sizes (``teacher.original_size`` [h, w], ``crop_top_left`` [top, left],
        ``target_size`` [h, w]) in place of the defaults; ``teacher.image_size`` is refused (the export and its parity
        check run the pipeline at the UNet's sample_size)."""
        self.refuse_sizes(folder, sizes, tuple(SIZES))
        ids = list(param.add_time_ids)
        for name, value in sizes.items():
            ids[SIZES[name]] = [int(v) for v in value]
        return dataclasses.replace(param, add_time_ids=tuple(ids))

    def check_parts(self, folder: Path, index: dict) -> None:
        missing = [part for part in ("vae", *TEXT_PARTS) if not named(index, part) or not (folder / part).is_dir()]
        if missing:
            raise InputError(f"{folder} is an SDXL pipeline folder without {', '.join(p + '/' for p in missing)}. {SAVE_WHOLE}")

    def check_against_parts(self, folder: Path, unet_cfg: dict) -> None:
        """The UNet reads what the two encoders and the VAE give: token embeddings as wide as both encoders' hidden
        states together, a pooled embedding of the second's projection width plus 6 size embeddings, the VAE's
        latents (else a matmul or a convolution fails mid-sampling)."""
        unet_file = folder / "unet" / "config.json"
        enc1 = read_json(folder / "text_encoder" / "config.json", "text_encoder config")
        enc2 = read_json(folder / "text_encoder_2" / "config.json", "text_encoder_2 config")
        h1, h2, pooled = enc1.get("hidden_size"), enc2.get("hidden_size"), enc2.get("projection_dim")
        key = "encoder_hid_dim" if unet_cfg.get("encoder_hid_dim") is not None else "cross_attention_dim"
        width = unet_cfg.get(key)
        if is_int(h1) and is_int(h2) and is_int(width) and h1 + h2 != width:
            raise InputError(
                f"{unet_file} has {key} {width} but the text encoders' hidden sizes are {h1} + {h2} = {h1 + h2} "
                f"({folder / 'text_encoder'}, {folder / 'text_encoder_2'}). Fix: use the text encoders the UNet was trained with "
                "(save the whole pipeline together)."
            )
        added, time_dim = unet_cfg.get("projection_class_embeddings_input_dim"), unet_cfg.get("addition_time_embed_dim")
        if is_int(added) and is_int(time_dim) and is_int(pooled) and added != pooled + NUM_TIME_IDS * time_dim:
            if added == pooled + 5 * time_dim:  # original size, crop, aesthetic score: the refiner's 5 numbers
                raise InputError(f"{unet_file} is the UNet of {REFINER}")
            raise InputError(
                f"{unet_file} has projection_class_embeddings_input_dim {added} but text_encoder_2's projection_dim {pooled} + "
                f"{NUM_TIME_IDS} x addition_time_embed_dim {time_dim} = {pooled + NUM_TIME_IDS * time_dim}. Fix: use the text "
                "encoders the UNet was trained with (save the whole pipeline together)."
            )
        _check_vae(folder, unet_cfg, unet_file)

    def weight_parts(self, folder: Path) -> tuple[tuple[str, str], ...]:
        return (*super().weight_parts(folder), ("text_encoder_2", TEXT_WEIGHTS_FILE))

    # ------------------------------------------------------------ prompts

    def text_parts(self, folder: Path) -> tuple[str, ...]:
        # model_index.json: force_zeros_for_empty_prompt decides the unconditional row
        return (PIPELINE_INDEX, *TEXT_PARTS)

    def prompt_encoder(self, folder: Path, device: str | torch.device = "cpu") -> "SDXLPromptEncoder":
        """Both tokenizers and text encoders (frozen, float32), the classes model_index.json names."""
        index = read_json(folder / PIPELINE_INDEX, "pipeline index")
        zeros = index.get("force_zeros_for_empty_prompt", True)  # the pipeline's default when the index has none
        if not isinstance(zeros, bool):
            raise InputError(f"{folder / PIPELINE_INDEX}: force_zeros_for_empty_prompt must be true or false, got {json.dumps(zeros)}. {RESAVE}")
        variant = self.weights_variant(folder)
        tok1, enc1 = load_text_part(folder, index, "tokenizer", "text_encoder", variant, device)
        tok2, enc2 = load_text_part(folder, index, "tokenizer_2", "text_encoder_2", variant, device)
        if tok1.model_max_length != tok2.model_max_length:
            raise InputError(
                f"{folder / 'tokenizer'} pads prompts to {tok1.model_max_length} tokens but {folder / 'tokenizer_2'} to {tok2.model_max_length}: "
                "their embeddings are joined token by token. Fix: save both tokenizers with one model_max_length (77 for SDXL)."
            )
        if not any(hasattr(enc, "text_projection") for enc in (enc1, enc2)):
            raise InputError(
                f"{folder / PIPELINE_INDEX} names no text encoder with a projection (CLIPTextModelWithProjection): SDXL's pooled "
                'embedding comes from it. Fix: name text_encoder_2 ["transformers", "CLIPTextModelWithProjection"], as SDXL saves it.'
            )
        return SDXLPromptEncoder([tok1, tok2], [enc1, enc2], zeros)

    # ------------------------------------------------------------ the latent codec

    def pixel_decoder(
        self, folder: Path, device: str | torch.device = "cpu", gradient_checkpointing: bool = False, dtype: torch.dtype | None = None
    ) -> Callable[[Tensor], Tensor]:
        """latents -> images as the pipeline decodes them: ``latents * std / scaling_factor + mean`` (the VAE config's
        latents_mean / latents_std when it has both, else 0 and 1); a ``force_upcast`` VAE stays float32 when float16
        is asked for (SDXL's VAE overflows in float16), as the pipeline does."""
        vae = self.decoding_vae(folder, device, gradient_checkpointing, dtype)
        mean, std = latent_stats(vae)

        def decode(latents: Tensor) -> Tensor:
            z = latents * std.to(latents) / vae.config.scaling_factor + mean.to(latents)
            return vae.decode(z.to(vae.dtype)).sample.float()

        return decode

    def vae_dtype(self, vae, dtype: torch.dtype | None) -> torch.dtype | None:
        """None (float32) for float16 and a ``force_upcast`` VAE, as the pipeline upcasts it; else ``dtype``."""
        return None if dtype == torch.float16 and vae.config.get("force_upcast", False) else dtype

    def encode_pixels(self, folder: Path, images: Tensor, device: str | torch.device = "cpu", batch_size: int = 64) -> Tensor:
        return self.pixel_encoder(folder, device, batch_size)(images)

    def pixel_encoder(self, folder: Path, device: str | torch.device = "cpu", batch_size: int = 64) -> Callable[[Tensor], Tensor]:
        """images in [-1, 1] -> latents: ``(mean of vae.encode - latents_mean) * scaling_factor / latents_std``
        (deterministic; SDXL img2img's map), the VAE loaded once."""
        vae = self.load_vae(folder, device)
        mean, std = (v.to(device) for v in latent_stats(vae))
        scale = vae.config.scaling_factor

        @torch.no_grad()
        def encode(images: Tensor) -> Tensor:
            parts = [(vae.encode(images[s : s + batch_size].to(device)).latent_dist.mean - mean) * scale / std for s in range(0, len(images), batch_size)]
            return torch.cat(parts).float()

        return encode


def latent_stats(vae) -> tuple[Tensor, Tensor]:
    """(mean, std) of the VAE's latents, shaped (1, C, 1, 1): its config's latents_mean / latents_std when both are
    set (as SDXL's pipelines read them), else 0 and 1."""
    c = vae.config.latent_channels
    mean, std = vae.config.get("latents_mean"), vae.config.get("latents_std")
    if mean is None or std is None:
        return torch.zeros(1, c, 1, 1), torch.ones(1, c, 1, 1)
    return torch.tensor(mean, dtype=torch.float32).view(1, c, 1, 1), torch.tensor(std, dtype=torch.float32).view(1, c, 1, 1)


def _check_vae(folder: Path, unet_cfg: dict, unet_file: Path) -> None:
    """The VAE's latents are what the UNet denoises."""
    vae_file = folder / "vae" / "config.json"
    latent, channels = read_json(vae_file, "vae config").get("latent_channels"), unet_cfg.get("in_channels")
    if is_int(latent) and is_int(channels) and latent != channels:
        raise InputError(
            f"{vae_file} has latent_channels {latent} but {unet_file} has in_channels {channels}. "
            "Fix: use the VAE the UNet was trained with (save the whole pipeline together)."
        )


class SDXLPromptEncoder(PromptEncoder):
    """prompts -> {"hidden": (N, L, D1 + D2), "pooled": (N, P)} as ``StableDiffusionXLPipeline.encode_prompt``
    computes them (clip_skip None): each tokenizer pads to its max length, each encoder's penultimate hidden state,
    joined on the last axis; the pooled embedding is the first encoder output that is one vector per prompt (the
    projection of text_encoder_2). No attention mask, as the pipeline passes none."""

    def __init__(self, tokenizers: list, text_encoders: list, zeros_for_empty: bool = True, batch_size: int = 256):
        super().__init__(tokenizers[0], text_encoders[0], batch_size)
        self.tokenizers, self.text_encoders, self.zeros_for_empty = tokenizers, text_encoders, zeros_for_empty

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> dict[str, Tensor]:
        hidden, pooled = [], []
        for s in range(0, len(prompts), self.batch_size):
            batch = prompts[s : s + self.batch_size]
            states, pool = [], None
            for tokenizer, encoder in zip(self.tokenizers, self.text_encoders):
                ids = tokenizer(batch, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
                out = encoder(ids.to(next(encoder.parameters()).device), output_hidden_states=True)
                if pool is None and out[0].ndim == 2:
                    pool = out[0]
                states.append(out.hidden_states[-2])
            if pool is None:
                raise ValueError("no text encoder gave a pooled embedding (SDXL's comes from CLIPTextModelWithProjection)")
            hidden.append(torch.cat(states, dim=-1))
            pooled.append(pool)
        return {"hidden": torch.cat(hidden), "pooled": torch.cat(pooled)}

    def encode_null(self) -> dict[str, Tensor]:
        """CFG's unconditional row as the pipeline makes it without a negative prompt: zeros when
        ``force_zeros_for_empty_prompt``, else the empty prompt's embeddings."""
        row = self.encode([""])
        return {k: torch.zeros_like(v) for k, v in row.items()} if self.zeros_for_empty else row
