"""A diffusers ``StableDiffusionPipeline`` folder (SD 1.x/2.x): a latent, prompt-conditioned VP teacher.

``model_index.json``, ``unet/`` (a UNet2DConditionModel on the VAE's latents), ``scheduler/``, ``vae/`` (an
AutoencoderKL: the latent codec), ``text_encoder/`` and ``tokenizer/`` (the classes model_index.json names,
e.g. CLIPTextModel and CLIPTokenizer). Every part is loaded in float32 whatever dtype it was saved in, as
the UNet is: a pipeline saved in float16 then gives the pairs diffusers gives in float32.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable

import torch

from ..errors import InputError
from ..text import PromptEncoder
from .common import PIPELINE_INDEX, RESAVE, TEXT_WEIGHTS_FILE, WEIGHTS_FILE, check_weights, is_int, named, one_line, variant_name
from .common import read_json
from .ddpm_pipeline import DDPMPipelineLayout

Tensor = torch.Tensor
TEXT_PARTS = ("text_encoder", "tokenizer", "vae")
SAVE_WHOLE = "Fix: save the whole pipeline (StableDiffusionPipeline.save_pretrained writes unet/, vae/, text_encoder/, tokenizer/, scheduler/)."
# Files a tokenizer reads its vocabulary from: fast (tokenizer.json), BPE, WordPiece, SentencePiece.
VOCABULARIES = (("tokenizer.json",), ("vocab.json", "merges.txt"), ("vocab.txt",), ("spiece.model",), ("sentencepiece.bpe.model",))


class StableDiffusionLayout(DDPMPipelineLayout):
    name = "sd_pipeline"
    description = "a diffusers StableDiffusionPipeline folder (SD 1.x/2.x: model_index.json, unet/, scheduler/, vae/, text_encoder/, tokenizer/)"
    takes_prompts = True
    pipeline_class = "StableDiffusionPipeline"
    classes = ("StableDiffusionPipeline",)
    save_hint = "StableDiffusionPipeline.save_pretrained(dir)"

    def matches_parts(self, parts: set[str]) -> bool:
        return bool(parts & set(TEXT_PARTS)) and parts <= {"unet", "scheduler", *TEXT_PARTS}

    # ------------------------------------------------------------ parametrisation

    def conditioning(self, embeds: int | None) -> dict:
        return {"num_classes": 0, "null_class": None, "text_conditioned": True}

    def check_parts(self, folder: Path, index: dict) -> None:
        missing = [part for part in TEXT_PARTS if not named(index, part) or not (folder / part).is_dir()]
        if missing:
            raise InputError(f"{folder} is a text-to-image pipeline folder without {', '.join(p + '/' for p in missing)}. {SAVE_WHOLE}")

    def check_against_parts(self, folder: Path, unet_cfg: dict) -> None:
        """The text encoder's width is what the UNet reads, the VAE's latents what it denoises
        (else a matmul or a convolution fails mid-sampling)."""
        enc_file, vae_file, unet_file = folder / "text_encoder" / "config.json", folder / "vae" / "config.json", folder / "unet" / "config.json"
        hidden = read_json(enc_file, "text_encoder config").get("hidden_size")
        # encoder_hid_dim: the UNet projects the prompt embeddings to cross_attention_dim itself
        key = "encoder_hid_dim" if unet_cfg.get("encoder_hid_dim") is not None else "cross_attention_dim"
        width = unet_cfg.get(key)
        if is_int(hidden) and is_int(width) and hidden != width:
            raise InputError(
                f"{enc_file} has hidden_size {hidden} but {unet_file} has {key} {width}. "
                "Fix: use the text encoder the UNet was trained with (save the whole pipeline together)."
            )
        latent, channels = read_json(vae_file, "vae config").get("latent_channels"), unet_cfg.get("in_channels")
        if is_int(latent) and is_int(channels) and latent != channels:
            raise InputError(
                f"{vae_file} has latent_channels {latent} but {unet_file} has in_channels {channels}. "
                "Fix: use the VAE the UNet was trained with (save the whole pipeline together)."
            )

    def weight_parts(self, folder: Path) -> tuple[tuple[str, str], ...]:
        return (("unet", WEIGHTS_FILE), ("vae", WEIGHTS_FILE), ("text_encoder", TEXT_WEIGHTS_FILE))

    # ------------------------------------------------------------ prompts

    def text_parts(self, folder: Path) -> tuple[str, ...]:
        return ("text_encoder", "tokenizer")

    def prompt_encoder(self, folder: Path, device: str | torch.device = "cpu") -> PromptEncoder:
        """The pipeline's own tokenizer and text encoder (frozen, float32), the classes model_index.json names."""
        index = read_json(folder / PIPELINE_INDEX, "pipeline index")
        return PromptEncoder(*load_text_part(folder, index, "tokenizer", "text_encoder", self.weights_variant(folder), device))

    # ------------------------------------------------------------ the latent codec

    def load_vae(self, folder: Path, device: str | torch.device = "cpu"):
        """The pipeline's AutoencoderKL (frozen, float32); ``vae.config.scaling_factor`` maps its latents to model space."""
        from diffusers import AutoencoderKL

        variant = self.weights_variant(folder)
        vae_dir = _check_part(folder, "vae", WEIGHTS_FILE, variant)
        scale = read_json(vae_dir / "config.json", "vae config").get("scaling_factor", 0.18215)
        if not _positive_number(scale):
            raise InputError(f"{vae_dir}/config.json: scaling_factor must be a finite number > 0, got {json.dumps(scale)}. {RESAVE}")
        return load_model(vae_dir, AutoencoderKL, variant, "VAE").to(device)

    def vae_geometry(self, folder: Path) -> tuple[int, int]:
        """(image channels, f) of the VAE: its input channels and the factor from latent to image side, 2 per down
        block (the pipelines' ``vae_scale_factor``)."""
        vae_file = folder / "vae" / "config.json"
        vae = read_json(vae_file, "vae config")
        blocks, channels = vae.get("block_out_channels"), vae.get("in_channels", 3)
        if not (isinstance(blocks, list) and blocks and is_int(channels) and channels > 0):
            raise InputError(f"{vae_file}: block_out_channels must be a list and in_channels a positive integer. {RESAVE}")
        return channels, 2 ** (len(blocks) - 1)

    def pixel_shape(self, folder: Path, param) -> tuple[int, int, int]:
        """The VAE's image side: the latents' sides times its factor, its input channels."""
        channels, f = self.vae_geometry(folder)
        _, h, w = param.image_shape
        return (channels, h * f, w * f)

    def decoding_vae(self, folder: Path, device: str | torch.device, gradient_checkpointing: bool, dtype: torch.dtype | None):
        """The VAE as ``pixel_decoder`` runs it: its weights in ``vae_dtype`` (None: float32); with
        ``gradient_checkpointing`` its backward recomputes the decoder's activations (less memory for LPIPS)."""
        vae = self.load_vae(folder, device)
        dtype = self.vae_dtype(vae, dtype)
        if dtype is not None:
            vae.to(dtype)
        if gradient_checkpointing:
            vae.enable_gradient_checkpointing()
        return vae

    def vae_dtype(self, vae, dtype: torch.dtype | None) -> torch.dtype | None:
        """The dtype the VAE decodes in when ``dtype`` is asked for: that one."""
        return dtype

    def pixel_decoder(
        self, folder: Path, device: str | torch.device = "cpu", gradient_checkpointing: bool = False, dtype: torch.dtype | None = None
    ) -> Callable[[Tensor], Tensor]:
        """latents -> images: ``vae.decode(latents / scaling_factor)`` (``decoding_vae``; ``dtype``: the VAE's weights,
        e.g. bfloat16 on a GPU; images come back as float32)."""
        vae = self.decoding_vae(folder, device, gradient_checkpointing, dtype)
        scale = vae.config.scaling_factor

        def decode(latents: Tensor) -> Tensor:
            return vae.decode((latents / scale).to(vae.dtype)).sample.float()

        return decode

    def pixel_encoder(self, folder: Path, device: str | torch.device = "cpu", batch_size: int = 64) -> Callable[[Tensor], Tensor]:
        """images in [-1, 1] -> latents: the mean of ``vae.encode`` times scaling_factor (deterministic), the VAE loaded once."""
        vae = self.load_vae(folder, device)
        scale = vae.config.scaling_factor

        @torch.no_grad()
        def encode(images: Tensor) -> Tensor:
            parts = [vae.encode(images[s : s + batch_size].to(device)).latent_dist.mean * scale for s in range(0, len(images), batch_size)]
            return torch.cat(parts).float()

        return encode

    def check_loads(self, folder: Path) -> None:
        self.load_denoiser(folder)
        self.prompt_encoder(folder)
        self.load_vae(folder)


def load_model(model_dir: Path, cls: type, variant: str | None = None, what: str | None = None) -> torch.nn.Module:
    """``cls.from_pretrained(model_dir)`` (a diffusers model: a VAE, a transformer) in float32 (the ``variant`` weights,
    upcast; sharded weights read through their index), frozen; a file that does not load, or weights that do not fill
    the config's model, are one InputError naming it (``what``, default the class name)."""
    from diffusers.utils import logging as d_logging

    what = what or cls.__name__
    weights, fix = model_dir / variant_name(WEIGHTS_FILE, variant), f"Fix: save the {what} and its config together (save_pretrained), or re-download the teacher."
    verbosity = d_logging.get_verbosity()
    d_logging.set_verbosity_error()  # its "newly initialized" warning: the one-line error below says it
    try:
        net, info = cls.from_pretrained(
            str(model_dir), local_files_only=True, use_safetensors=True, output_loading_info=True, dtype=torch.float32, variant=variant
        )
    except Exception as e:  # a config that builds another shape than the weights, ...
        detail = one_line(e).split(" If you want")[0].rstrip(". ")  # diffusers' advice to its Python callers follows
        if "expected shape" in detail:
            raise InputError(f"the weights in {weights} do not match {model_dir}/config.json ({detail.split(' because ')[-1]}). {fix}") from None
        raise InputError(f"the {what} in {model_dir} does not load: {detail}. {RESAVE}") from None
    finally:
        d_logging.set_verbosity(verbosity)
    bad = sorted(info["missing_keys"]) + sorted(str(k[0] if isinstance(k, tuple) else k) for k in info["mismatched_keys"])
    if bad:  # left uninitialised (on the meta device): it would fail later, or compute with random weights
        raise InputError(f"the weights in {weights} do not match {model_dir}/config.json ({len(bad)} tensors missing or of another shape, e.g. {bad[0]}). {fix}")
    return net.requires_grad_(False).eval()


def load_text_part(folder: Path, index: dict, tokenizer_part: str, encoder_part: str, variant: str | None, device) -> tuple:
    """A tokenizer and its text encoder of a pipeline folder (frozen, float32; the ``variant`` weights), the classes
    model_index.json names, each file checked as it is read."""
    import transformers
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a bar per small file load: noise in every stage's log
    tok_dir = _check_tokenizer(folder / tokenizer_part)
    enc_dir = _check_part(folder, encoder_part, TEXT_WEIGHTS_FILE, variant)
    tokenizer_cls = _component_class(folder, index, tokenizer_part, transformers.PreTrainedTokenizerBase)
    encoder_cls = _component_class(folder, index, encoder_part, transformers.PreTrainedModel)
    try:
        tokenizer = tokenizer_cls.from_pretrained(str(tok_dir), local_files_only=True)
    except Exception as e:  # transformers raises OSError, ValueError, TypeError, ... for a damaged tokenizer
        raise InputError(f"the tokenizer in {tok_dir} does not load: {one_line(e)}. {RESAVE}") from None
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its multi-line load report: the one-line error below says it
    try:
        encoder, info = encoder_cls.from_pretrained(
            str(enc_dir), local_files_only=True, use_safetensors=True, output_loading_info=True, ignore_mismatched_sizes=True, variant=variant,
            dtype=torch.float32,  # transformers keeps a float16 file's dtype unless told: prompts would be encoded in float16
        )  # fmt: skip
    except Exception as e:
        raise InputError(f"the text encoder in {enc_dir} does not load: {one_line(e)}. {RESAVE}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    # transformers fills missing or mis-shaped tensors with random values and only warns: a silently wrong teacher
    bad = sorted(info["missing_keys"]) + sorted(k[0] for k in info["mismatched_keys"])
    if bad:
        raise InputError(
            f"the weights in {enc_dir / variant_name(TEXT_WEIGHTS_FILE, variant)} do not match {enc_dir}/config.json ({len(bad)} tensors missing or "
            f"of another shape, e.g. {bad[0]}). Fix: save the text encoder and its config together (save_pretrained), or re-download the teacher."
        )
    return tokenizer, encoder.requires_grad_(False).eval().to(device)


def _positive_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def _check_part(folder: Path, part: str, weights_name: str, variant: str | None = None) -> Path:
    """A pipeline component folder: present, its config a JSON object, its safetensors weights (of ``variant``) readable."""
    path = _require_part(folder, part)
    read_json(path / "config.json", f"{part} config")
    if not (path / variant_name(f"{weights_name}.index.json", variant)).is_file():  # sharded weights: from_pretrained reads the index
        check_weights(path / variant_name(weights_name, variant))
    return path


def _require_part(folder: Path, part: str) -> Path:
    if not (folder / part).is_dir():
        raise InputError(f"{folder} is a text-to-image pipeline folder without {part}/. {SAVE_WHOLE}")
    return folder / part


def _check_tokenizer(folder: Path) -> Path:
    """A tokenizer folder: its JSON files objects, merges.txt UTF-8, and a vocabulary present."""
    _require_part(folder.parent, folder.name)
    for name in ("tokenizer_config.json", "special_tokens_map.json", "vocab.json", "tokenizer.json"):
        if (folder / name).is_file():
            read_json(folder / name, "tokenizer file")
    for name in ("merges.txt", "vocab.txt"):
        try:
            if (folder / name).is_file():
                (folder / name).read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            raise InputError(f"tokenizer file {folder / name} is not UTF-8 text ({e.reason} at byte {e.start}). {RESAVE}") from None
    if not any(all((folder / name).is_file() for name in files) for files in VOCABULARIES):
        said = ", ".join(" and ".join(files) for files in VOCABULARIES)
        raise InputError(f"the tokenizer in {folder} has no vocabulary (one of: {said}). {RESAVE}")
    return folder


def _component_class(folder: Path, index: dict, part: str, base: type) -> type:
    """The transformers class model_index.json names for ``part``; only subclasses of ``base`` (no arbitrary code)."""
    entry = index.get(part)
    name = entry[1] if isinstance(entry, list) and len(entry) == 2 and entry[0] == "transformers" else None
    cls = None
    if isinstance(name, str):
        import transformers

        try:
            cls = getattr(transformers, name, None)
        except Exception:  # a class whose optional dependency is missing
            cls = None
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise InputError(
            f"{folder / PIPELINE_INDEX} names {part} {json.dumps(entry)}, not a {base.__name__} of the transformers library. "
            f'Fix: name the class it was saved with, e.g. "{part}": ["transformers", "{"CLIPTokenizer" if part.startswith("tokenizer") else "CLIPTextModel"}"].'
        )
    return cls
