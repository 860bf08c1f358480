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

Every file is checked as it is read (JSON objects, safetensors headers, denoiser.json against the UNet config,
the scheduler's timesteps), so a damaged or inconsistent teacher fails with one InputError naming the file and
the fix, before anything is built from it. Pickle checkpoints (.bin, .pt) are never loaded.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel, UNet2DModel
from safetensors import safe_open
from safetensors.torch import load_file

from .denoisers import PREDICTION_TYPES, Denoiser, EDMDenoiser, Parametrization, VPDenoiser
from .errors import InputError

PARAM_FILE = "denoiser.json"
PIPELINE_INDEX = "model_index.json"
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
TEXT_WEIGHTS_FILE = "model.safetensors"  # transformers' name (text_encoder/)
SCHEDULER_FILE = "scheduler_config.json"
# Checkpoints that only unpickling reads: never loaded here (a pickle can run code), named in the error instead.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
RESAVE = "Fix: re-save or re-download the teacher (save_pretrained writes every file of it)."
PARAM_EXAMPLE = '{"kind": "edm", "num_classes": 10, "null_class": 10, "image_shape": [1, 8, 8]}'
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


def _one_line(e: BaseException, limit: int = 240) -> str:
    """The first line of an exception's message, shortened: the error stays one line."""
    lines = str(e).strip().splitlines()
    text = lines[0].strip() if lines else type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


JSON_TYPES = {list: "an array", str: "a string", int: "a number", float: "a number", bool: "true/false", type(None): "null"}


def _read_json(path: Path, what: str, fix: str = RESAVE) -> dict:
    """The JSON object in ``path``; missing, not UTF-8, not JSON or not an object -> InputError naming the file."""
    if not path.is_file():
        raise InputError(f"{what} missing: expected {path}. {fix}")
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise InputError(f"{what} {path} is not UTF-8 text ({e.reason} at byte {e.start}). {fix}") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{what} {path} is not valid JSON: {e}. {fix}") from None
    if not isinstance(data, dict):
        raise InputError(f"{what} {path} must be a JSON object, not {JSON_TYPES.get(type(data), type(data).__name__)}. {fix}")
    return data


def _read_param_file(path: Path) -> dict:
    return _read_json(path, "denoiser parametrisation", f"Fix: write it as one JSON object, e.g. {PARAM_EXAMPLE}.")


def check_weights(path: Path) -> Path:
    """``path`` is a safetensors file whose header covers the whole file (cheap: no tensor is read).

    Catches a file cut short, empty or not safetensors at all before anything is built from it.
    """
    if not path.is_file():
        pickles = sorted(p.name for p in path.parent.iterdir() if p.suffix in PICKLE_SUFFIXES) if path.parent.is_dir() else []
        if pickles:
            raise InputError(
                f"weights missing: expected {path}; {path.parent} has only {', '.join(pickles)}, a pickle checkpoint, which is "
                "never loaded here (unpickling can run code). Fix: convert it once where you trust it (from_pretrained, then "
                "save_pretrained(dir, safe_serialization=True)), or download the model's .safetensors weights."
            )
        raise InputError(f"weights missing: expected {path} (safetensors, as save_pretrained writes it). {RESAVE}")
    try:
        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except Exception as e:  # SafetensorError: "header too small", "incomplete metadata, file not fully covered", ...
        raise InputError(f"{path} is not a readable safetensors file ({_one_line(e)}). Fix: re-save or re-download the teacher.") from None
    return path


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _empty_unet(cls, cfg: dict) -> torch.nn.Module:
    """The UNet of ``cfg`` with uninitialised weights, for a strict load to fill: built on the meta device,
    then given memory. Its random initialisation would be thrown away (5.1 s for an SD-size UNet, 0.23 s
    for a CIFAR-size one, on 2 cores). A module holding tensors that __init__ computes and no load fills
    (non-persistent buffers, plain tensor attributes) is built the ordinary way."""
    with torch.device("meta"):
        unet = cls.from_config(cfg)
    loaded = set(unet.state_dict())
    computed = any(name not in loaded for name, _ in unet.named_buffers()) or any(
        isinstance(v, torch.Tensor) for m in unet.modules() for v in vars(m).values()
    )
    return cls.from_config(cfg) if computed else unet.to_empty(device="cpu")


def load_unet(model_dir: str | os.PathLike) -> torch.nn.Module:
    """Build the UNet from config.json and load its safetensors weights strictly (shapes must match)."""
    model_dir = Path(model_dir)
    cfg = _read_json(model_dir / "config.json", "UNet config")
    cls = UNET_CLASSES.get(cfg.get("_class_name", "UNet2DModel"))
    if cls is None:
        raise InputError(
            f"{model_dir}/config.json names _class_name {cfg.get('_class_name')!r}; supported: {', '.join(sorted(UNET_CLASSES))}. "
            "Fix: point teacher.path at a diffusers UNet2DModel or UNet2DConditionModel."
        )
    weights = check_weights(model_dir / WEIGHTS_FILE)
    try:
        unet = _empty_unet(cls, {k: v for k, v in cfg.items() if not k.startswith("_")})
    except Exception as e:
        raise InputError(f"{model_dir}/config.json does not build a {cls.__name__}: {_one_line(e)}. {RESAVE}") from None
    try:
        state = load_file(str(weights))
    except Exception as e:  # passed the header check: its tensors' bytes are what is wrong
        raise InputError(f"{weights} is not a readable safetensors file ({_one_line(e)}). Fix: re-save or re-download the teacher.") from None
    try:
        unet.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        detail = "; ".join(line.strip() for line in first[1:4]) or first[0]
        raise InputError(
            f"the weights in {weights} do not match {model_dir}/config.json ({detail}). "
            "Fix: save the model and its config together with save_pretrained, or retrain it."
        ) from None
    # diffusers' first save_pretrained writes _class_name and _diffusers_version into the live config
    # (to_json_string); serialising once here leaves a loaded UNet's config as any later save does. A
    # compiled forward guards on the config: a change would recompile every graph at the first checkpoint.
    unet.to_json_string()
    return unet.eval()


def image_shape_from_config(cfg, where: Path) -> tuple[int, int, int]:
    """(C, H, W) of model space from a UNet config: in_channels and sample_size (an int or [h, w])."""
    size = _config_size(cfg)
    channels = cfg.get("in_channels")
    if size is None or not (_is_int(channels) and channels > 0):
        raise InputError(
            f"{where / PARAM_FILE} has no image_shape and {where}/config.json has no usable in_channels / sample_size "
            f"(in_channels={channels!r}, sample_size={cfg.get('sample_size')!r}). Fix: add \"image_shape\": [C, H, W] to {PARAM_FILE}."
        )
    return channels, size[0], size[1]


def _config_size(cfg: dict) -> tuple[int, int] | None:
    """(H, W) of a UNet config's sample_size (an int or [h, w]); None when absent or malformed."""
    size = cfg.get("sample_size")
    if _is_int(size):
        size = (size, size)
    if isinstance(size, (list, tuple)) and len(size) == 2 and all(_is_int(v) and v > 0 for v in size):
        return int(size[0]), int(size[1])
    return None


def check_against_unet(param: Parametrization, cfg: dict, param_file: Path, cfg_file: Path) -> None:
    """denoiser.json must describe the UNet config.json builds: channels, size, conditioning, class embeddings.

    Read from the configs alone (no weights), so a mismatch fails before any sampling, named, not as a shape
    error deep in the UNet or an embedding index out of range.
    """
    c, h, w = param.image_shape
    channels, out_channels, size = cfg.get("in_channels"), cfg.get("out_channels"), _config_size(cfg)
    if _is_int(channels) and channels != c:
        raise InputError(
            f"{param_file} says image_shape {list(param.image_shape)} ({c} channels) but {cfg_file} has in_channels {channels}. "
            f"Fix: make them agree (image_shape is [in_channels, height, width]), or drop image_shape from {PARAM_FILE} to read it from config.json."
        )
    if size is not None and size != (h, w):
        raise InputError(
            f"{param_file} says image_shape {list(param.image_shape)} ({h}x{w}) but {cfg_file} has sample_size {cfg.get('sample_size')} "
            f"({size[0]}x{size[1]}). Fix: make them agree (the size the UNet was trained at), or drop image_shape from {PARAM_FILE}."
        )
    if _is_int(channels) and _is_int(out_channels) and out_channels != channels:
        raise InputError(
            f"{cfg_file} has out_channels {out_channels} but in_channels {channels}: a denoiser predicts a tensor of its input's shape "
            "(learned-variance UNets are not supported). Fix: point teacher.path at a UNet with out_channels = in_channels."
        )
    conditional = cfg.get("_class_name") == "UNet2DConditionModel"
    if param.text_conditioned != conditional:
        raise InputError(
            f"{param_file} says text_conditioned {str(param.text_conditioned).lower()} but {cfg_file} is a {cfg.get('_class_name', 'UNet2DModel')} "
            f"(text-conditioned models are UNet2DConditionModel). Fix: set text_conditioned to {str(conditional).lower()} in {PARAM_FILE}."
        )
    embeds = cfg.get("num_class_embeds")
    if embeds is not None and not (_is_int(embeds) and embeds > 0):
        raise InputError(f"{cfg_file}: num_class_embeds must be a positive integer or null, got {embeds!r}. {RESAVE}")
    if param.text_conditioned or cfg.get("class_embed_type") is not None:
        return  # prompt embeddings, or a class embedding of its own kind: no count to check
    n, null = param.num_classes, param.null_class
    need = 0 if n == 0 else max(n, null + 1 if null is not None else 0)  # labels 0..n-1 and the null class
    # Every label must index an embedding (else an index error mid-sampling); fewer classes than embeddings is
    # allowed (a pipeline folder's denoiser.json may use a subset); a class-conditional UNet demands labels.
    if need == 0 and not embeds or need and embeds and need <= embeds:
        return
    said = f"num_classes {n}" + (f" and null_class {null}" if null is not None else "") + (f" ({need} class embeddings)" if need else " (unconditional)")
    if embeds:
        fix = (
            f"a UNet with {embeds} class embeddings takes num_classes {embeds - 1} and null_class {embeds - 1} "
            f"(its last embedding the null class of guidance), or num_classes {embeds} with no null class"
        )
    else:
        fix = "an unconditional UNet takes num_classes 0 and null_class null"
    raise InputError(f"{param_file} says {said} but {cfg_file} has num_class_embeds {embeds}. Fix: make them agree: {fix}.")


def read_scheduler_config(sched_dir: Path) -> dict:
    """A VP teacher's scheduler config, checked for what the denoiser reads: the timestep count and prediction type."""
    path = sched_dir / SCHEDULER_FILE
    cfg = _read_json(path, "scheduler config")
    steps = cfg.get("num_train_timesteps", 1000)
    if not (_is_int(steps) and steps > 0):
        raise InputError(
            f"{path}: num_train_timesteps must be an integer > 0, got {json.dumps(steps)}. "
            "Fix: set it to the number of timesteps the model was trained with (1000 for DDPM and Stable Diffusion)."
        )
    prediction = cfg.get("prediction_type", "epsilon")
    if prediction not in PREDICTION_TYPES:
        raise InputError(
            f"{path}: prediction_type must be one of {', '.join(PREDICTION_TYPES)} (diffusers' names), got {prediction!r}. "
            "Fix: set it to what the UNet was trained to predict (epsilon for DDPM and Stable Diffusion 1.x)."
        )
    return cfg


def is_pipeline_folder(model_dir: Path) -> bool:
    return (Path(model_dir) / PIPELINE_INDEX).is_file()


TEXT_PARTS = ("text_encoder", "tokenizer", "vae")


def is_text_pipeline(root: Path, index: dict) -> bool:
    """A Stable-Diffusion-style folder: a text encoder, its tokenizer and a VAE beside unet/ and scheduler/."""
    named = [part for part in TEXT_PARTS if isinstance(index.get(part), list) and index[part] and index[part][0] is not None]
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
    tok_dir = _check_tokenizer(root / "tokenizer")
    enc_dir, _ = _check_part(root, "text_encoder", TEXT_WEIGHTS_FILE)
    try:
        tokenizer = CLIPTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
    except Exception as e:  # transformers raises OSError, ValueError, TypeError, ... for a damaged tokenizer
        raise InputError(f"the tokenizer in {tok_dir} does not load: {_one_line(e)}. {RESAVE}") from None
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its multi-line load report: the one-line error below says it
    try:
        encoder, info = CLIPTextModel.from_pretrained(
            str(enc_dir), local_files_only=True, use_safetensors=True, output_loading_info=True, ignore_mismatched_sizes=True
        )
    except Exception as e:
        raise InputError(f"the text encoder in {enc_dir} does not load: {_one_line(e)}. {RESAVE}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    # transformers fills missing or mis-shaped tensors with random values and only warns: a silently wrong teacher
    bad = sorted(info["missing_keys"]) + sorted(k[0] for k in info["mismatched_keys"])
    if bad:
        raise InputError(
            f"the weights in {enc_dir / TEXT_WEIGHTS_FILE} do not match {enc_dir}/config.json ({len(bad)} tensors missing or "
            f"of another shape, e.g. {bad[0]}). Fix: save the text encoder and its config together (save_pretrained), or re-download the teacher."
        )
    return PromptEncoder(tokenizer, encoder.requires_grad_(False).eval().to(device))


def _check_part(root: Path, part: str, weights_name: str) -> tuple[Path, dict]:
    """A pipeline component folder and its config: present, the config a JSON object, the safetensors weights readable."""
    folder = _require_part(root, part)
    cfg = _read_json(folder / "config.json", f"{part} config")
    if not (folder / f"{weights_name}.index.json").is_file():  # sharded weights: from_pretrained reads the index
        check_weights(folder / weights_name)
    return folder, cfg


def _require_part(root: Path, part: str) -> Path:
    if not (root / part).is_dir():
        raise InputError(
            f"{root} is a text-to-image pipeline folder without {part}/. Fix: save the whole pipeline "
            "(StableDiffusionPipeline.save_pretrained writes unet/, vae/, text_encoder/, tokenizer/, scheduler/)."
        )
    return root / part


def _check_tokenizer(folder: Path) -> Path:
    """A CLIP tokenizer folder: its JSON files objects, merges.txt UTF-8, and a vocabulary present."""
    _require_part(folder.parent, folder.name)
    for name in ("tokenizer_config.json", "special_tokens_map.json", "vocab.json", "tokenizer.json"):
        if (folder / name).is_file():
            _read_json(folder / name, "tokenizer file")
    if (folder / "merges.txt").is_file():
        try:
            (folder / "merges.txt").read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            raise InputError(f"tokenizer file {folder / 'merges.txt'} is not UTF-8 text ({e.reason} at byte {e.start}). {RESAVE}") from None
    if not (folder / "tokenizer.json").is_file() and not ((folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()):
        raise InputError(f"the tokenizer in {folder} has no vocabulary (tokenizer.json, or vocab.json and merges.txt). {RESAVE}")
    return folder


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
    from diffusers.utils import logging as d_logging

    root = resolve_model_dir(path)
    folder, cfg = _check_part(root, "vae", WEIGHTS_FILE)
    scale = cfg.get("scaling_factor", 0.18215)
    if not (isinstance(scale, (int, float)) and not isinstance(scale, bool) and math.isfinite(scale) and scale > 0):
        raise InputError(f"{folder}/config.json: scaling_factor must be a finite number > 0, got {json.dumps(scale)}. {RESAVE}")
    verbosity = d_logging.get_verbosity()
    d_logging.set_verbosity_error()  # its "newly initialized" warning: the one-line error below says it
    try:
        vae, info = AutoencoderKL.from_pretrained(str(folder), local_files_only=True, use_safetensors=True, output_loading_info=True)
    except Exception as e:  # a config that builds another shape than the weights, ...
        # first sentence only: diffusers goes on with advice for its Python callers (low_cpu_mem_usage=False, ...)
        detail = _one_line(e).split(" If you want")[0].rstrip(". ")
        if "expected shape" in detail:
            raise InputError(
                f"the weights in {folder / WEIGHTS_FILE} do not match {folder}/config.json ({detail.split(' because ')[-1]}). "
                "Fix: save the VAE and its config together (save_pretrained), or re-download the teacher."
            ) from None
        raise InputError(f"the VAE in {folder} does not load: {detail}. {RESAVE}") from None
    finally:
        d_logging.set_verbosity(verbosity)
    bad = sorted(info["missing_keys"]) + sorted(str(k[0] if isinstance(k, tuple) else k) for k in info["mismatched_keys"])
    if bad:  # left uninitialised (on the meta device): it would fail later, or decode noise
        raise InputError(
            f"the weights in {folder / WEIGHTS_FILE} do not match {folder}/config.json ({len(bad)} tensors missing or of another "
            f"shape, e.g. {bad[0]}). Fix: save the VAE and its config together (save_pretrained), or re-download the teacher."
        )
    return vae.requires_grad_(False).eval().to(device)


def _parametrization(raw: dict, where: Path) -> Parametrization:
    try:
        return Parametrization.from_dict(raw)
    except (TypeError, ValueError) as e:
        msg = str(e) if "Fix" in str(e) else f"{e}. Fix: correct it in {PARAM_FILE}, or remove it for its default."
        raise InputError(f"{where}: {msg}") from None


def _pipeline_parametrization(root: Path) -> Parametrization:
    """A pipeline folder's parametrisation: scheduler + UNet config, then the optional denoiser.json override."""
    index = _read_json(root / PIPELINE_INDEX, "pipeline index")
    for part in ("unet", "scheduler"):
        if part not in index or not (root / part).is_dir():
            raise InputError(
                f"{root} is a diffusers pipeline folder without {part}/. Fix: save the pipeline with its UNet and "
                "scheduler, e.g. DDPMPipeline(unet, scheduler).save_pretrained(dir)."
            )
    unet_cfg = _read_json(root / "unet" / "config.json", "UNet config")
    sched_path = root / "scheduler" / SCHEDULER_FILE
    prediction = read_scheduler_config(root / "scheduler").get("prediction_type", "epsilon")
    embeds = unet_cfg.get("num_class_embeds")
    if embeds is not None and not (_is_int(embeds) and embeds > 0):
        raise InputError(f"{root}/unet/config.json: num_class_embeds must be a positive integer or null, got {embeds!r}. {RESAVE}")
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
        raw = _read_param_file(override)
        if raw.get("prediction_type", prediction) != prediction:
            raise InputError(
                f"{override} says prediction_type {raw['prediction_type']!r} but {sched_path} says {prediction!r}. "
                "Fix: make them agree (the scheduler's is what the UNet was trained with) or drop it from denoiser.json."
            )
        if raw.get("kind", "vp") != "vp":
            raise InputError(
                f"{override}: a pipeline folder's teacher is VP (its scheduler defines alpha_t, sigma_t), got kind {raw['kind']!r}. "
                f'Fix: set "kind" to "vp" or drop it from {PARAM_FILE}.'
            )
        derived.update(raw)
    elif unet_cfg.get("class_embed_type") and not embeds:
        raise InputError(
            f"{root}/unet is class-conditional ({unet_cfg['class_embed_type']!r} embedding) but the number of classes "
            f'cannot be read from its config. Fix: add {override} with {{"num_classes": N, "null_class": K}}.'
        )
    param = _parametrization(derived, override if override.is_file() else root)
    if param.image_shape is None:
        param = dataclasses.replace(param, image_shape=image_shape_from_config(unet_cfg, root / "unet"))
    check_against_unet(param, unet_cfg, override if override.is_file() else root / PIPELINE_INDEX, root / "unet" / "config.json")
    if text:
        _check_text_parts(root, unet_cfg)
    return param


def _check_text_parts(root: Path, unet_cfg: dict) -> None:
    """The text encoder's width is what the UNet's cross-attention reads, the VAE's latents what it denoises
    (else a matmul or a convolution fails mid-sampling)."""
    enc_file, vae_file, unet_file = root / "text_encoder" / "config.json", root / "vae" / "config.json", root / "unet" / "config.json"
    hidden, width = _read_json(enc_file, "text_encoder config").get("hidden_size"), unet_cfg.get("cross_attention_dim")
    if _is_int(hidden) and _is_int(width) and hidden != width:
        raise InputError(
            f"{enc_file} has hidden_size {hidden} but {unet_file} has cross_attention_dim {width}. "
            "Fix: use the text encoder the UNet was trained with (save the whole pipeline together)."
        )
    latent, channels = _read_json(vae_file, "vae config").get("latent_channels"), unet_cfg.get("in_channels")
    if _is_int(latent) and _is_int(channels) and latent != channels:
        raise InputError(
            f"{vae_file} has latent_channels {latent} but {unet_file} has in_channels {channels}. "
            "Fix: use the VAE the UNet was trained with (save the whole pipeline together)."
        )


def read_parametrization(path: str | os.PathLike) -> Parametrization:
    """A teacher's parametrisation without loading weights (image_shape from the UNet config if absent)."""
    model_dir = Path(path)
    if is_pipeline_folder(model_dir):
        return _pipeline_parametrization(model_dir)
    if not (model_dir / PARAM_FILE).is_file():
        raise InputError(f"{model_dir} is not a teacher: no {PARAM_FILE} and no {PIPELINE_INDEX}. Fix: point teacher.path at {LAYOUTS}.")
    param = _parametrization(_read_param_file(model_dir / PARAM_FILE), model_dir / PARAM_FILE)
    unet_cfg = _read_json(model_dir / "config.json", "UNet config")
    if param.image_shape is None:  # older denoiser.json files: the UNet config knows it
        param = dataclasses.replace(param, image_shape=image_shape_from_config(unet_cfg, model_dir))
    check_against_unet(param, unet_cfg, model_dir / PARAM_FILE, model_dir / "config.json")
    if param.kind == "vp":
        _check_prediction(param, model_dir / PARAM_FILE, read_scheduler_config(model_dir / "scheduler"), model_dir / "scheduler" / SCHEDULER_FILE)
    return param


def _check_prediction(param: Parametrization, param_file: Path, sched_cfg: dict, sched_file: Path) -> None:
    prediction = sched_cfg.get("prediction_type", "epsilon")
    if param.prediction_type != prediction:
        raise InputError(
            f"{param_file} says prediction_type {param.prediction_type!r} but {sched_file} says {prediction!r}. "
            "Fix: make them agree (the scheduler's is what the UNet was trained with)."
        )


def load_denoiser(path: str | os.PathLike, device: str | torch.device = "cpu") -> Denoiser:
    """Load a denoiser directory (see module doc) as an EDM or VP x0-predictor, frozen, in eval mode."""
    model_dir = resolve_model_dir(path)
    param = read_parametrization(model_dir)
    unet = load_unet(model_dir / "unet" if is_pipeline_folder(model_dir) else model_dir)
    if param.kind == "edm":
        den: Denoiser = EDMDenoiser(unet, param)
    else:
        sched_dir = model_dir / "scheduler"
        sched_file = sched_dir / SCHEDULER_FILE
        _check_prediction(param, model_dir / PARAM_FILE, read_scheduler_config(sched_dir), sched_file)
        try:
            scheduler = DDPMScheduler.from_pretrained(str(sched_dir))
        except Exception as e:  # e.g. NotImplementedError for an unknown beta_schedule
            raise InputError(f"{sched_file} does not build a DDPM noise schedule: {_one_line(e)}. {RESAVE}") from None
        abar = scheduler.alphas_cumprod
        if not (torch.isfinite(abar).all() and (abar > 0).all() and (abar <= 1).all()):
            raise InputError(
                f"{sched_file} gives alphas_cumprod outside (0, 1] (beta_start {scheduler.config.beta_start}, beta_end "
                f"{scheduler.config.beta_end}): no noise schedule. Fix: set betas in (0, 1), as the model was trained with."
            )
        den = VPDenoiser(unet, param, abar, dict(scheduler.config))
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
