"""Load and save denoisers: a diffusers ``save_pretrained`` directory plus ``denoiser.json``.

Layout of a denoiser directory (teacher, generator, fake score alike)::

    config.json                            # diffusers UNet config
    diffusion_pytorch_model.safetensors    # weights
    denoiser.json                          # Parametrization: edm | vp, sigmas, classes, null class
    scheduler/scheduler_config.json        # VP only: the diffusers scheduler (alphas_cumprod)

so ``UNet2DModel.from_pretrained(dir)`` loads the network and ``load_denoiser(dir)`` the denoiser.

A teacher may also be a diffusers pipeline folder (``DDPMPipeline(unet, scheduler).save_pretrained``:
``model_index.json``, ``unet/``, ``scheduler/``), as a user or the Hugging Face cache has it. It is a VP
denoiser whose parametrisation comes from the scheduler (prediction type) and the UNet config (image
shape; ``num_class_embeds`` = classes + 1, the last one the null class); an optional ``denoiser.json``
beside ``model_index.json`` overrides it and is checked against the scheduler.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel, UNet2DModel
from safetensors.torch import load_file

from .denoisers import Denoiser, EDMDenoiser, Parametrization, VPDenoiser
from .errors import InputError

PARAM_FILE = "denoiser.json"
PIPELINE_INDEX = "model_index.json"
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
# The UNet classes a denoiser directory may name in config.json's "_class_name" (an explicit whitelist).
UNET_CLASSES = {"UNet2DModel": UNet2DModel, "UNet2DConditionModel": UNet2DConditionModel}


LAYOUTS = (
    "a diffusers pipeline folder (model_index.json, unet/, scheduler/: what DDPMPipeline.save_pretrained writes) "
    "or a denoiser directory (config.json, diffusion_pytorch_model.safetensors and denoiser.json, "
    'e.g. {"kind": "edm", "num_classes": 10, "null_class": 10, "image_shape": [1, 8, 8]}; `dmd toy teacher` makes one)'
)


def resolve_model_dir(path: str | os.PathLike) -> Path:
    """A local directory, or a Hugging Face repo id already in the local HF cache (never downloads)."""
    p = Path(path).expanduser()
    if p.is_dir():
        return p
    looks_like_repo = isinstance(path, str) and path.count("/") == 1 and not p.exists() and not path.startswith((".", "/"))
    if looks_like_repo:
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(path, local_files_only=True))
        except Exception:
            pass
    raise InputError(
        f"model directory not found: {path}. "
        f"Fix: point teacher.path at {LAYOUTS}, or at a Hugging Face repo id of one already downloaded into "
        "the local cache (HF_HOME)."
    )


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise InputError(f"{what} missing: expected {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"{what} at {path} is not valid JSON: {e}") from None


def load_unet(model_dir: str | os.PathLike) -> torch.nn.Module:
    """Build the UNet from config.json and load its safetensors weights strictly (shapes must match)."""
    model_dir = Path(model_dir)
    cfg = _read_json(model_dir / "config.json", "UNet config")
    cls = UNET_CLASSES.get(cfg.get("_class_name", "UNet2DModel"))
    if cls is None:
        raise InputError(f"{model_dir}/config.json names {cfg.get('_class_name')!r}; supported: {sorted(UNET_CLASSES)}")
    weights = model_dir / WEIGHTS_FILE
    if not weights.is_file():
        raise InputError(f"weights missing: expected {weights} (safetensors, as written by save_pretrained)")
    try:
        unet = cls.from_config({k: v for k, v in cfg.items() if not k.startswith("_")})
    except Exception as e:
        raise InputError(f"{model_dir}/config.json does not build a {cls.__name__}: {e}") from None
    state = load_file(str(weights))
    try:
        unet.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        detail = "; ".join(line.strip() for line in first[1:4]) or first[0]
        raise InputError(
            f"the weights in {weights} do not match {model_dir}/config.json ({detail}). "
            "Fix: save the model and its config together with save_pretrained, or retrain it."
        ) from None
    return unet.eval()


def image_shape_from_config(cfg, where: Path) -> tuple[int, int, int]:
    """(C, H, W) of model space from a UNet config: in_channels and sample_size (an int or [h, w])."""
    size = cfg.get("sample_size")
    if isinstance(size, int):
        size = (size, size)
    if not (isinstance(size, (list, tuple)) and len(size) == 2 and cfg.get("in_channels")):
        raise InputError(
            f"{where / PARAM_FILE} has no image_shape and {where}/config.json has no usable in_channels / sample_size "
            f"(sample_size={cfg.get('sample_size')!r}). Fix: add \"image_shape\": [C, H, W] to {PARAM_FILE}."
        )
    return int(cfg["in_channels"]), int(size[0]), int(size[1])


def is_pipeline_folder(model_dir: Path) -> bool:
    return (Path(model_dir) / PIPELINE_INDEX).is_file()


TEXT_PARTS = ("text_encoder", "tokenizer", "vae")


def is_text_pipeline(root: Path, index: dict) -> bool:
    """A Stable-Diffusion-style folder: a text encoder, its tokenizer and a VAE beside unet/ and scheduler/."""
    named = [part for part in TEXT_PARTS if index.get(part) and index[part][0] is not None]
    if not named:
        return False
    missing = [part for part in TEXT_PARTS if part not in named or not (root / part).is_dir()]
    if missing:
        raise InputError(
            f"{root} is a text-to-image pipeline folder without {', '.join(p + '/' for p in missing)}. Fix: save the whole "
            "pipeline (StableDiffusionPipeline.save_pretrained writes unet/, vae/, text_encoder/, tokenizer/, scheduler/)."
        )
    return True


def load_prompt_encoder(path: str | os.PathLike, device: str | torch.device = "cpu"):
    """The pipeline's own tokenizer and text encoder (frozen) as a ``dmd_core.text.PromptEncoder``."""
    from transformers import CLIPTextModel, CLIPTokenizer
    from transformers.utils import logging as hf_logging

    from .text import PromptEncoder

    hf_logging.disable_progress_bar()  # a bar per small file load: noise in every stage's log

    root = resolve_model_dir(path)
    try:
        tokenizer = CLIPTokenizer.from_pretrained(str(root / "tokenizer"), local_files_only=True)
        encoder = CLIPTextModel.from_pretrained(str(root / "text_encoder"), local_files_only=True, use_safetensors=True)
    except (OSError, ValueError) as e:
        raise InputError(f"the text encoder or tokenizer in {root} does not load: {str(e).splitlines()[0]}") from None
    return PromptEncoder(tokenizer, encoder.requires_grad_(False).eval().to(device))


def latent_decoder(path: str | os.PathLike, device: str | torch.device = "cpu", gradient_checkpointing: bool = False, dtype: torch.dtype | None = None):
    """latents in model space -> images: ``vae.decode(latents / scaling_factor)`` (differentiable; with
    ``gradient_checkpointing`` its backward recomputes the decoder's activations: less memory for LPIPS;
    ``dtype``: the VAE's weights, e.g. bfloat16 on a GPU; images come back as float32)."""
    vae = load_vae(path, device)
    if dtype is not None:
        vae.to(dtype)
    if gradient_checkpointing:
        vae.enable_gradient_checkpointing()
    scale = vae.config.scaling_factor

    def decode(latents: torch.Tensor) -> torch.Tensor:
        return vae.decode((latents / scale).to(vae.dtype)).sample.float()

    return decode


@torch.no_grad()
def encode_latents(path: str | os.PathLike, images: torch.Tensor, device: str | torch.device = "cpu", batch_size: int = 64) -> torch.Tensor:
    """images in [-1, 1] -> latents in model space: the mean of ``vae.encode`` times scaling_factor (deterministic)."""
    vae = load_vae(path, device)
    scale = vae.config.scaling_factor
    parts = [vae.encode(images[s : s + batch_size].to(device)).latent_dist.mean * scale for s in range(0, len(images), batch_size)]
    return torch.cat(parts).float()


def load_vae(path: str | os.PathLike, device: str | torch.device = "cpu"):
    """The pipeline's AutoencoderKL (frozen); ``vae.config.scaling_factor`` maps its latents to model space."""
    from diffusers import AutoencoderKL

    root = resolve_model_dir(path)
    try:
        vae = AutoencoderKL.from_pretrained(str(root / "vae"), local_files_only=True, use_safetensors=True)
    except (OSError, ValueError) as e:
        raise InputError(f"the VAE in {root}/vae does not load: {str(e).splitlines()[0]}") from None
    return vae.requires_grad_(False).eval().to(device)


def _parametrization(raw: dict, where: Path) -> Parametrization:
    try:
        return Parametrization.from_dict(raw)
    except (TypeError, ValueError) as e:
        raise InputError(f"{where}: {e}") from None


def _pipeline_parametrization(root: Path) -> Parametrization:
    """A pipeline folder's parametrisation: scheduler + UNet config, then the optional denoiser.json override."""
    index = _read_json(root / PIPELINE_INDEX, "pipeline index (model_index.json)")
    for part in ("unet", "scheduler"):
        if not isinstance(index, dict) or part not in index or not (root / part).is_dir():
            raise InputError(
                f"{root} is a diffusers pipeline folder without {part}/. Fix: save the pipeline with its UNet and "
                "scheduler, e.g. DDPMPipeline(unet, scheduler).save_pretrained(dir)."
            )
    unet_cfg = _read_json(root / "unet" / "config.json", "UNet config")
    sched_path = root / "scheduler" / "scheduler_config.json"
    prediction = _read_json(sched_path, "scheduler config").get("prediction_type", "epsilon")
    embeds = unet_cfg.get("num_class_embeds")
    text = is_text_pipeline(root, index)
    derived = {
        "kind": "vp",
        "prediction_type": prediction,
        "num_classes": embeds - 1 if embeds and not text else 0,  # the last embedding is the null class (label dropout)
        "null_class": embeds - 1 if embeds and not text else None,
        "text_conditioned": text,
    }
    override = root / PARAM_FILE
    if override.is_file():
        raw = _read_json(override, "denoiser parametrisation (denoiser.json)")
        if not isinstance(raw, dict):
            raise InputError(f"{override} must be a JSON object")
        if raw.get("prediction_type", prediction) != prediction:
            raise InputError(
                f"{override} says prediction_type {raw['prediction_type']!r} but {sched_path} says {prediction!r}. "
                "Fix: make them agree (the scheduler's is what the UNet was trained with) or drop it from denoiser.json."
            )
        if raw.get("kind", "vp") != "vp":
            raise InputError(f"{override}: a pipeline folder's teacher is VP (its scheduler defines alpha_t, sigma_t), got kind {raw['kind']!r}")
        derived.update(raw)
    elif unet_cfg.get("class_embed_type") and not embeds:
        raise InputError(
            f"{root}/unet is class-conditional ({unet_cfg['class_embed_type']!r} embedding) but the number of classes "
            f'cannot be read from its config. Fix: add {override} with {{"num_classes": N, "null_class": K}}.'
        )
    param = _parametrization(derived, override if override.is_file() else root)
    if param.image_shape is None:
        param = dataclasses.replace(param, image_shape=image_shape_from_config(unet_cfg, root / "unet"))
    return param


def read_parametrization(path: str | os.PathLike) -> Parametrization:
    """A teacher's parametrisation without loading weights (image_shape from the UNet config if absent)."""
    model_dir = Path(path)
    if is_pipeline_folder(model_dir):
        return _pipeline_parametrization(model_dir)
    if not (model_dir / PARAM_FILE).is_file():
        raise InputError(f"{model_dir} is not a teacher: no {PARAM_FILE} and no {PIPELINE_INDEX}. Fix: point teacher.path at {LAYOUTS}.")
    param = _parametrization(_read_json(model_dir / PARAM_FILE, "denoiser parametrisation (denoiser.json)"), model_dir / PARAM_FILE)
    if param.image_shape is None:  # older denoiser.json files: the UNet config knows it
        param = dataclasses.replace(param, image_shape=image_shape_from_config(_read_json(model_dir / "config.json", "UNet config"), model_dir))
    return param


def load_denoiser(path: str | os.PathLike, device: str | torch.device = "cpu") -> Denoiser:
    """Load a denoiser directory (see module doc) as an EDM or VP x0-predictor, frozen, in eval mode."""
    model_dir = resolve_model_dir(path)
    param = read_parametrization(model_dir)
    unet = load_unet(model_dir / "unet" if is_pipeline_folder(model_dir) else model_dir)
    if param.kind == "edm":
        den: Denoiser = EDMDenoiser(unet, param)
    else:
        sched_dir = model_dir / "scheduler"
        _read_json(sched_dir / "scheduler_config.json", "VP scheduler config")
        scheduler = DDPMScheduler.from_pretrained(str(sched_dir))
        if scheduler.config.prediction_type != param.prediction_type:
            raise InputError(
                f"{model_dir / PARAM_FILE} says prediction_type {param.prediction_type!r} but {sched_dir}/scheduler_config.json "
                f"says {scheduler.config.prediction_type!r}. Fix: make them agree (the scheduler's is what the UNet was trained with)."
            )
        den = VPDenoiser(unet, param, scheduler.alphas_cumprod, dict(scheduler.config))
    den.requires_grad_(False)
    return den.to(device)


def save_denoiser(den: Denoiser, path: str | os.PathLike) -> Path:
    """Write ``den`` as a denoiser directory: save_pretrained (safetensors) + denoiser.json (+ scheduler)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    den.unet.save_pretrained(str(path), safe_serialization=True)
    (path / PARAM_FILE).write_text(json.dumps(den.param.to_dict(), indent=2) + "\n")
    if isinstance(den, VPDenoiser):
        DDPMScheduler.from_config(den.scheduler_config).save_pretrained(str(path / "scheduler"))
    return path
