"""A diffusers ``FluxPipeline`` folder (Flux.1 dev and schnell): a latent, prompt-conditioned flow teacher.

``model_index.json``, ``transformer/`` (a FluxTransformer2DModel), ``scheduler/`` (a FlowMatchEulerDiscreteScheduler
with the dynamic, resolution-dependent shift), ``vae/`` (an AutoencoderKL with ``scaling_factor`` and
``shift_factor``), ``text_encoder/`` + ``tokenizer/`` (CLIP: the pooled embedding) and ``text_encoder_2/`` +
``tokenizer_2/`` (T5: the token embeddings). As ``FluxPipeline`` computes them: the pooled embedding is CLIP's
pooled output of the prompt padded to 77 tokens, the token embeddings T5's last hidden state of the prompt padded
to 512 tokens.

Model space is the VAE's C x H x W latents, unpacked: the denoiser packs them into Flux's 2 x 2 patch tokens, with
their position ids, inside each network call (``mmdit.FluxDenoiser``), so every stage treats Flux as any other
latent teacher. A guidance-distilled model (``guidance_embeds``, Flux-dev) takes the guidance scale as an input
of its one call (the pipeline's ``guidance_scale``); a model without it (Flux-schnell) is guided by CFG against the
empty prompt (the pipeline's ``true_cfg_scale`` with ``negative_prompt=""``) when the scale is not 1.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import InputError
from ..text import PromptEncoder
from .common import PIPELINE_INDEX, TEXT_WEIGHTS_FILE, WEIGHTS_FILE, is_int, read_json
from .sd3_pipeline import StableDiffusion3Layout
from .sd_pipeline import load_text_part

Tensor = torch.Tensor
TEXT_PARTS = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
MAX_SEQUENCE_LENGTH = 512  # FluxPipeline's max_sequence_length: the T5 tokens of every prompt
DEFAULT_LATENT_SIDE = 128  # FluxPipeline's default_sample_size: 1024 x 1024 images through Flux's 8x VAE


class FluxLayout(StableDiffusion3Layout):
    name = "flux_pipeline"
    description = (
        "a diffusers FluxPipeline folder (Flux.1: model_index.json, transformer/, scheduler/, vae/, text_encoder/, text_encoder_2/, "
        "tokenizer/, tokenizer_2/)"
    )
    pipeline_class = "FluxPipeline"
    transformer_class = "FluxTransformer2DModel"
    text_parts_required = TEXT_PARTS

    # ------------------------------------------------------------ parametrisation

    def network_fields(self, folder: Path, tr: dict, shape: tuple[int, int, int], fields: dict) -> dict:
        """Whether the guidance scale is an input (Flux-dev); the dynamic shift counts (H/2)(W/2) packed tokens, the default."""
        embeds = tr.get("guidance_embeds", False)
        if not isinstance(embeds, bool):
            raise InputError(f"{folder / 'transformer' / 'config.json'}: guidance_embeds must be true or false, got {embeds!r}. Fix: re-save the pipeline.")
        return {"guidance_embeds": embeds}

    def default_shape(self, folder: Path, tr: dict) -> tuple[int, int, int]:
        """FluxPipeline's default size (128 x 128 latents: 1024 x 1024 images); the transformer reads 4 channels per
        latent channel (a 2 x 2 patch each)."""
        c = tr.get("in_channels", 64)
        if not (is_int(c) and c > 0 and c % 4 == 0):
            raise InputError(f"{folder / 'transformer' / 'config.json'}: in_channels must be 4 x the VAE's latent channels (2 x 2 patches), got {c!r}. Fix: re-save the pipeline.")
        return (c // 4, DEFAULT_LATENT_SIDE, DEFAULT_LATENT_SIDE)

    def patch(self, tr: dict) -> int:
        return 2  # 2 x 2 packing

    def max_side(self, tr: dict) -> int | None:
        return None  # rotary position embeddings: any size

    def check_widths(self, folder: Path, index: dict, tr: dict) -> None:
        """The transformer reads CLIP's pooled output (hidden_size wide) and T5's states (d_model wide), and 2 x 2
        patches of the VAE's latents."""
        tr_file = folder / "transformer" / "config.json"
        clip = read_json(folder / "text_encoder" / "config.json", "text_encoder config").get("hidden_size")
        t5 = read_json(folder / "text_encoder_2" / "config.json", "text_encoder_2 config").get("d_model")
        same = "Fix: use the text encoders the transformer was trained with (save the whole pipeline together)."
        if is_int(clip) and is_int(tr.get("pooled_projection_dim")) and clip != tr["pooled_projection_dim"]:
            raise InputError(f"{folder / 'text_encoder' / 'config.json'} has hidden_size {clip} but {tr_file} has pooled_projection_dim {tr['pooled_projection_dim']}. {same}")
        if is_int(t5) and is_int(tr.get("joint_attention_dim")) and t5 != tr["joint_attention_dim"]:
            raise InputError(f"{folder / 'text_encoder_2' / 'config.json'} has d_model {t5} but {tr_file} has joint_attention_dim {tr['joint_attention_dim']}. {same}")
        self.check_vae(folder, tr, tr_file, per_channel=4)

    def weight_parts(self, folder: Path) -> tuple[tuple[str, str], ...]:
        return (("transformer", WEIGHTS_FILE), ("vae", WEIGHTS_FILE), ("text_encoder", TEXT_WEIGHTS_FILE), ("text_encoder_2", TEXT_WEIGHTS_FILE))

    # ------------------------------------------------------------ prompts

    def text_parts(self, folder: Path) -> tuple[str, ...]:
        return TEXT_PARTS

    def prompt_encoder(self, folder: Path, device: str | torch.device = "cpu") -> "FluxPromptEncoder":
        """CLIP's and T5's tokenizers and encoders (frozen, float32), the classes model_index.json names."""
        index = read_json(folder / PIPELINE_INDEX, "pipeline index")
        variant = self.weights_variant(folder)
        clip_tok, clip = load_text_part(folder, index, "tokenizer", "text_encoder", variant, device)
        t5_tok, t5 = load_text_part(folder, index, "tokenizer_2", "text_encoder_2", variant, device)
        if hasattr(clip, "text_projection"):
            raise InputError(f"{folder / PIPELINE_INDEX} names text_encoder with a projection: Flux's pooled embedding is CLIP's pooled output, "
                             'unprojected. Fix: name it ["transformers", "CLIPTextModel"], as Flux saves it.')  # fmt: skip
        return FluxPromptEncoder(clip_tok, clip, t5_tok, t5)


class FluxPromptEncoder(PromptEncoder):
    """prompts -> {"hidden": (N, 512, D), "pooled": (N, P)} as ``FluxPipeline.encode_prompt`` computes them: CLIP's
    pooled output of the prompt padded to its max length (77), T5's last hidden state of the prompt padded to 512
    tokens. CFG's unconditional row (Flux-schnell's true CFG) is the empty prompt's."""

    def __init__(self, clip_tokenizer, clip_encoder, t5_tokenizer, t5_encoder, max_sequence_length: int = MAX_SEQUENCE_LENGTH, batch_size: int = 256):
        super().__init__(clip_tokenizer, clip_encoder, batch_size)
        self.t5_tokenizer, self.t5_encoder, self.max_sequence_length = t5_tokenizer, t5_encoder, max_sequence_length

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> dict[str, Tensor]:
        hidden, pooled = [], []
        dev = next(self.text_encoder.parameters()).device
        for s in range(0, len(prompts), self.batch_size):
            batch = prompts[s : s + self.batch_size]
            ids = self.tokenizer(batch, padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
            pooled.append(self.text_encoder(ids.to(dev), output_hidden_states=False).pooler_output)
            ids = self.t5_tokenizer(batch, padding="max_length", max_length=self.max_sequence_length, truncation=True, return_tensors="pt").input_ids
            hidden.append(self.t5_encoder(ids.to(next(self.t5_encoder.parameters()).device), output_hidden_states=False)[0].to(dev))
        return {"hidden": torch.cat(hidden), "pooled": torch.cat(pooled)}
