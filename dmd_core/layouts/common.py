"""What every teacher layout reads the same way: checked JSON and safetensors files, the UNet, the VP schedule.

Every file is checked as it is read, so a damaged or inconsistent teacher fails with one InputError naming
the file and the fix, before anything is built from it. Pickle checkpoints (.bin, .pt) are never loaded.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import json
import os
from pathlib import Path

import torch
from diffusers import DDPMScheduler, DiTTransformer2DModel, FluxTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel, UNet2DModel
from safetensors import safe_open
from safetensors.torch import load_file

from ..denoisers import PREDICTION_TYPES, Denoiser, EDMDenoiser, Parametrization, VPDenoiser
from ..errors import InputError, shown
from .mmdit import flow_denoiser

PARAM_FILE = "denoiser.json"
PIPELINE_INDEX = "model_index.json"
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
TEXT_WEIGHTS_FILE = "model.safetensors"  # transformers' name (text_encoder/)
SCHEDULER_FILE = "scheduler_config.json"
# Checkpoints that only unpickling reads: never loaded here (a pickle can run code), named in the error instead.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
SINGLE_FILE_SUFFIXES = (".safetensors", ".sft", ".ckpt", ".pt", ".pth", ".bin")
RESAVE = "Fix: re-save or re-download the teacher (save_pretrained writes every file of it)."
PARAM_EXAMPLE = '{"kind": "edm", "num_classes": 10, "null_class": 10, "image_shape": [1, 8, 8]}'
# The networks a denoiser directory may name in config.json's "_class_name" (an explicit whitelist): UNets and DiT's
# transformer. DiT-XL-2's published config names Transformer2DModel, which diffusers builds as DiTTransformer2DModel.
UNET_CLASSES = {"UNet2DModel": UNet2DModel, "UNet2DConditionModel": UNet2DConditionModel, "DiTTransformer2DModel": DiTTransformer2DModel,
                "SD3Transformer2DModel": SD3Transformer2DModel, "FluxTransformer2DModel": FluxTransformer2DModel}  # fmt: skip
# The networks that read prompt embeddings (the others: class labels or nothing), and how many input channels each
# model-space channel feeds (Flux: 2 x 2 patches packed into 4 channels; dmd_core.layouts.mmdit).
TEXT_NETWORKS = ("UNet2DConditionModel", "SD3Transformer2DModel", "FluxTransformer2DModel")
PACKED_CHANNELS = {"FluxTransformer2DModel": 4}
JSON_TYPES = {list: "an array", str: "a string", int: "a number", float: "a number", bool: "true/false", type(None): "null"}


def resolve_model_dir(path: str | os.PathLike) -> Path:
    """A local directory, or a Hugging Face repo id already in the local HF cache (never downloads)."""
    p = Path(path).expanduser()
    if p.is_dir():
        return p
    if p.is_file():
        refuse_single_file(p)
    looks_like_repo = isinstance(path, str) and path.count("/") == 1 and not p.exists() and not path.startswith((".", "/"))
    if looks_like_repo:
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(path, local_files_only=True))
        except Exception:
            pass
    raise InputError(
        f"model directory not found: {path}. Fix: point teacher.path at a teacher folder (a diffusers pipeline folder "
        "or a denoiser directory; docs/layouts.md lists them), or at a Hugging Face repo id of one already downloaded "
        "into the local cache (HF_HOME)."
    )


def refuse_single_file(p: Path) -> None:
    """A file given where a model folder belongs: say what it is and how to make the folder."""
    if p.suffix not in SINGLE_FILE_SUFFIXES:
        raise InputError(f"{p} is a file, not a model folder. Fix: point teacher.path at the folder save_pretrained writes.")
    trust = " (a pickle: convert it only where you trust it)" if p.suffix in PICKLE_SUFFIXES else ""
    raise InputError(
        f"{p} is a single-file checkpoint{trust}; teachers are the folders diffusers' save_pretrained writes. "
        f'Fix: convert it once, e.g. StableDiffusionPipeline.from_single_file("{p}").save_pretrained(dir) '
        "(the pipeline class of its family), and point teacher.path at dir."
    )


def one_line(e: BaseException, limit: int = 240) -> str:
    """The first line of an exception's message, shortened: the error stays one line."""
    lines = str(e).strip().splitlines()
    text = lines[0].strip() if lines else type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def read_json(path: Path, what: str, fix: str = RESAVE) -> dict:
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


def read_param_file(path: Path) -> dict:
    return read_json(path, "denoiser parametrisation", f"Fix: write it as one JSON object, e.g. {PARAM_EXAMPLE}.")


def pipeline_index(folder: Path) -> dict | None:
    """model_index.json of a pipeline folder, unchecked (``matches`` must stay cheap and never raise); None if absent or unreadable."""
    try:
        data = json.loads((folder / PIPELINE_INDEX).read_bytes().decode("utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def check_components(folder: Path, index: dict) -> None:
    """Every component model_index.json names is a class diffusers' from_pretrained can load here: [library, class]
    of diffusers, transformers or one of diffusers' pipeline modules, or [null, null] for none. An export loads
    them all; a name nothing provides would otherwise pass every stage and fail there."""
    for part, entry in index.items():
        if part.startswith("_") or not isinstance(entry, list) or entry == [None, None]:
            continue  # _class_name and other settings (requires_safety_checker), or no component
        if len(entry) == 2 and all(isinstance(v, str) for v in entry) and _loadable(*entry):
            continue
        raise InputError(
            f"{folder / PIPELINE_INDEX} names {shown(part, 60)} {shown(entry, 100)}: not a class of diffusers or transformers, "
            'so diffusers cannot load the pipeline. Fix: name the library and class it was saved with (e.g. ["diffusers", '
            '"UNet2DConditionModel"]), or re-save the pipeline with save_pretrained.'
        )


def _loadable(library: str, name: str) -> bool:
    """diffusers, transformers or a pipeline module of diffusers (e.g. stable_diffusion's safety checker) has ``name``;
    no other module is imported (importing one runs its code)."""
    if library in ("diffusers", "transformers"):
        module_name = library
    elif library.isidentifier() and importlib.util.find_spec(f"diffusers.pipelines.{library}") is not None:
        module_name = f"diffusers.pipelines.{library}"
    else:
        return False
    try:
        return isinstance(getattr(importlib.import_module(module_name), name, None), type)
    except Exception:  # a class whose optional dependency is missing
        return False


def named(index: dict, part: str) -> bool:
    """model_index.json lists ``part`` as a component (diffusers writes [library, class], or [null, null] for none)."""
    entry = index.get(part)
    return isinstance(entry, list) and bool(entry) and entry[0] is not None


def parametrization_from(raw: dict, where: Path) -> Parametrization:
    try:
        return Parametrization.from_dict(raw)
    except (TypeError, ValueError) as e:
        msg = str(e) if "Fix" in str(e) else f"{e}. Fix: correct it in {PARAM_FILE}, or remove it for its default."
        raise InputError(f"{where}: {msg}") from None


# ---------------------------------------------------------------- weights and their variants


def variant_name(name: str, variant: str | None) -> str:
    """The file ``save_pretrained(..., variant=...)`` writes for weights ``name``, as diffusers and transformers
    name it: model.safetensors -> model.fp16.safetensors, model.safetensors.index.json -> model.safetensors.index.fp16.json."""
    if not variant:
        return name
    stem, _, suffix = name.rpartition(".")
    return f"{stem}.{variant}.{suffix}"


def weights_variants(part: Path, name: str) -> dict[str | None, str]:
    """The kinds of weights ``name`` in the folder ``part``: None (the plain file) and each variant, each with the
    file that holds it (a single file, or the index of sharded weights). Never raises."""
    stem, _, suffix = name.partition(".")  # "model", "safetensors"
    index = f"{name}.index."
    try:
        names = sorted(p.name for p in part.iterdir() if p.is_file())
    except OSError:
        return {}
    found: dict[str | None, str] = {}
    for n in names:
        if n in (name, f"{name}.index.json"):
            found.setdefault(None, n)
            continue
        if n.startswith(f"{stem}.") and n.endswith(f".{suffix}"):
            variant = n[len(stem) + 1 : -len(suffix) - 1]  # a shard (fp16-00001-of-00002) counts through its index
        elif n.startswith(index) and n.endswith(".json"):
            variant = n[len(index) : -len(".json")]
        else:
            continue
        if variant and "." not in variant and "-" not in variant:
            found.setdefault(variant, n)
    return found


def _setting(variant: str | None) -> str:
    return "null (the plain weights)" if variant is None else str(variant)


def choose_variant(folder: Path, parts: tuple[tuple[str, str], ...], asked: str | None) -> str | None:
    """The weights variant every load of the teacher in ``folder`` reads (None: the plain files).

    ``parts``: (subfolder, plain weights name) of each weights file the layout loads. ``asked`` (teacher.variant)
    must be present in every part; None takes the plain weights when every part has them, else the one variant
    every part has. A part without any weights is left to its load, which names the file it expected.
    """
    found = {sub: weights_variants(folder / sub, name) for sub, name in parts}
    found = {sub: kinds for sub, kinds in found.items() if kinds}
    if not found:
        return asked
    common = sorted(set.intersection(*(set(kinds) for kinds in found.values())), key=lambda v: (v is not None, str(v)))
    present = "; ".join(f"{sub or '.'}/: {', '.join(kinds.values())}" for sub, kinds in found.items())
    save = 'save every part with one kind of weights (save_pretrained(dir), or save_pretrained(dir, variant="fp16"), of the whole model)'
    if asked is not None and asked not in common:
        lacking = next(sub for sub, kinds in found.items() if asked not in kinds)
        fix = f"set teacher.variant to {' or '.join(map(_setting, common))}" if common else save
        raise InputError(
            f"teacher.variant is {shown(asked, 40)} but {folder / lacking} has no {shown(asked, 40)} weights (the teacher's weights: {present}). Fix: {fix}."
        )
    if asked is not None or None in common or len(common) == 1:
        return asked if asked is not None else common[0]
    if common:
        raise InputError(f"{folder} holds the {' and '.join(common)} variants of its weights and no plain ones ({present}). Fix: set teacher.variant to one of them.")
    raise InputError(f"{folder} holds different kinds of weights in its parts, no one kind in all ({present}). Fix: {save}.")


def check_weights(path: Path) -> Path:
    """``path`` is a safetensors file whose header covers the whole file (cheap: no tensor is read).

    Catches a file cut short, empty or not safetensors at all before anything is built from it.
    """
    if not path.is_file():
        folder = path.parent
        present = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
        stem, suffix = path.name.split(".", 1)
        variants = [n for n in present if n.startswith(stem + ".") and n.endswith("." + suffix) and n != path.name]
        if variants:
            variant = variants[0][len(stem) + 1 : -len(suffix) - 1].split("-")[0]  # fp16, or fp16-00001-of-00002 when sharded
            raise InputError(
                f"weights missing: expected {path}, found only {', '.join(str(folder / n) for n in variants)}: the {variant!r} variant. "
                f'Fix: set teacher.variant: {variant} (in Python: load with variant="{variant}"), or save the model with its plain weights.'
            )
        pickles = [n for n in present if Path(n).suffix in PICKLE_SUFFIXES]
        if pickles:
            raise InputError(
                f"weights missing: expected {path}; {folder} has only {', '.join(pickles)}, a pickle checkpoint, which is "
                "never loaded here (unpickling can run code). Fix: convert it once where you trust it (from_pretrained, then "
                "save_pretrained(dir, safe_serialization=True)), or download the model's .safetensors weights."
            )
        raise InputError(f"weights missing: expected {path} (safetensors, as save_pretrained writes it). {RESAVE}")
    try:
        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except Exception as e:  # SafetensorError: "header too small", "incomplete metadata, file not fully covered", ...
        raise InputError(f"{path} is not a readable safetensors file ({one_line(e)}). Fix: re-save or re-download the teacher.") from None
    return path


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


def load_unet(model_dir: str | os.PathLike, variant: str | None = None) -> torch.nn.Module:
    """Build the UNet from config.json and load its safetensors weights strictly (shapes must match), in float32;
    ``variant``: the weights ``save_pretrained(..., variant=variant)`` wrote (e.g. fp16), upcast."""
    model_dir = Path(model_dir)
    cfg = read_json(model_dir / "config.json", "UNet config")
    cls = DiTTransformer2DModel if is_dit(cfg) else UNET_CLASSES.get(cfg.get("_class_name", "UNet2DModel"))
    if cls is None:
        raise InputError(
            f"{model_dir}/config.json names _class_name {cfg.get('_class_name')!r}; supported: {', '.join(sorted(UNET_CLASSES))}. "
            "Fix: point teacher.path at a diffusers UNet or one of those transformers."
        )
    weights = check_weights(model_dir / variant_name(WEIGHTS_FILE, variant))
    try:
        unet = _empty_unet(cls, {k: v for k, v in cfg.items() if not k.startswith("_")})
    except Exception as e:
        raise InputError(f"{model_dir}/config.json does not build a {cls.__name__}: {one_line(e)}. {RESAVE}") from None
    try:
        state = load_file(str(weights))
    except Exception as e:  # passed the header check: its tensors' bytes are what is wrong
        raise InputError(f"{weights} is not a readable safetensors file ({one_line(e)}). Fix: re-save or re-download the teacher.") from None
    try:
        unet.load_state_dict(state, strict=True)  # copies into the float32 parameters: a float16 file is upcast
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
    return without_label_dropout(unet).eval()


def is_dit(cfg: dict) -> bool:
    """A DiT transformer config: DiTTransformer2DModel, or the Transformer2DModel name DiT-XL-2 was published with
    (patches and adaLN-Zero: diffusers builds it as a DiTTransformer2DModel)."""
    name = cfg.get("_class_name")
    return name == "DiTTransformer2DModel" or name == "Transformer2DModel" and cfg.get("norm_type") == "ada_norm_zero" and cfg.get("patch_size") is not None


def without_label_dropout(net: torch.nn.Module) -> torch.nn.Module:
    """``net`` with its label embeddings' own random dropout off (DiT's LabelEmbedding replaces labels by the null
    class with probability 0.1 in train mode, from the global RNG): a generator or fake score in training sees the
    labels it is given. The null-class row stays, so guidance is unchanged."""
    from diffusers.models.embeddings import LabelEmbedding

    for m in net.modules():
        if isinstance(m, LabelEmbedding):
            m.dropout_prob = 0.0
    return net


# ---------------------------------------------------------------- the UNet config against the parametrisation


def config_size(cfg: dict) -> tuple[int, int] | None:
    """(H, W) of a UNet config's sample_size (an int or [h, w]); None when absent or malformed."""
    size = cfg.get("sample_size")
    if is_int(size):
        size = (size, size)
    if isinstance(size, (list, tuple)) and len(size) == 2 and all(is_int(v) and v > 0 for v in size):
        return int(size[0]), int(size[1])
    return None


def image_shape_from_config(cfg, where: Path) -> tuple[int, int, int]:
    """(C, H, W) of model space from a UNet config: in_channels and sample_size (an int or [h, w])."""
    size = config_size(cfg)
    channels = cfg.get("in_channels")
    if size is None or not (is_int(channels) and channels > 0):
        raise InputError(
            f"{where / PARAM_FILE} has no image_shape and {where}/config.json has no usable in_channels / sample_size "
            f"(in_channels={channels!r}, sample_size={cfg.get('sample_size')!r}). Fix: add \"image_shape\": [C, H, W] to {PARAM_FILE}."
        )
    return channels, size[0], size[1]


def with_image_shape(param: Parametrization, cfg: dict, where: Path) -> Parametrization:
    """``param`` with image_shape read from the UNet config when it has none (older denoiser.json files)."""
    return param if param.image_shape is not None else dataclasses.replace(param, image_shape=image_shape_from_config(cfg, where))


# Extra inputs a UNet2DConditionModel may demand beside prompt embeddings (added_cond_kwargs): SDXL's sizes,
# image embeddings, control hints. None of them is passed here, so diffusers would fail mid-sampling.
ADDED_CONDITIONS = ("text_time", "text_image", "image", "image_hint")


def check_conditioning(cfg: dict, cfg_file: Path, size_conditioned: bool = False) -> None:
    """The UNet is conditioned only in ways the denoisers feed: a learned label table, prompt embeddings and,
    when ``size_conditioned`` (SDXL's add_time_ids are known), SDXL's pooled embedding and sizes."""
    kind = cfg.get("class_embed_type")
    if kind is not None:
        raise InputError(
            f"{cfg_file} has class_embed_type {kind!r}: its class embedding takes vectors or levels, not the integer labels "
            "a teacher is given (they would be added into the time embedding as numbers). Fix: use a UNet with a learned label "
            "table (class_embed_type null, num_class_embeds = classes + 1, the last one the null class) or an unconditional one."
        )
    extra = cfg.get("addition_embed_type")
    if extra == "text_time" and not size_conditioned:
        raise InputError(
            f"{cfg_file} has addition_embed_type 'text_time': SDXL's UNet, which needs a pooled prompt embedding and sizes (added_cond_kwargs) "
            "beside the prompt. Fix: point teacher.path at the StableDiffusionXLPipeline folder it belongs to (two text encoders)."
        )
    if extra in ADDED_CONDITIONS and extra != "text_time":
        raise InputError(
            f"{cfg_file} has addition_embed_type {extra!r}: the UNet needs inputs beside the prompt (added_cond_kwargs, e.g. image "
            "embeddings) that no supported layout provides. Fix: point teacher.path at a model conditioned on prompts or class labels only."
        )
    if size_conditioned and extra != "text_time":
        raise InputError(
            f"add_time_ids (SDXL's size conditioning) are set but {cfg_file} has addition_embed_type {extra!r}, not 'text_time'. "
            "Fix: drop add_time_ids from denoiser.json, or use the SDXL UNet they belong to."
        )
    hid = cfg.get("encoder_hid_dim_type")
    if hid not in (None, "text_proj"):
        raise InputError(
            f"{cfg_file} has encoder_hid_dim_type {hid!r}: the UNet needs image embeddings beside the prompt. "
            "Fix: point teacher.path at a model conditioned on prompts or class labels only."
        )


def check_channels(cfg: dict, cfg_file: Path) -> None:
    """A denoiser predicts a tensor of its input's shape."""
    c, o = cfg.get("in_channels"), cfg.get("out_channels")
    if not (is_int(c) and is_int(o)) or c == o:
        return
    if c == 2 * o + 1:  # noisy latents, the masked image's latents, the mask
        raise InputError(
            f"{cfg_file} has in_channels {c} and out_channels {o}: an inpainting UNet (it reads the noisy latents, the masked image's "
            f"latents and the mask: 2 x {o} + 1 channels), which this project does not distil. Fix: point teacher.path at the base "
            "(non-inpainting) model of its family."
        )
    if o == 2 * c and is_dit(cfg):
        return  # DiT's learned variance: the denoisers read the first in_channels, the mean (Denoiser._unet)
    what = " (learned-variance UNets are not supported)" if o == 2 * c else ""
    raise InputError(
        f"{cfg_file} has out_channels {o} but in_channels {c}: a denoiser predicts a tensor of its input's shape{what}. "
        "Fix: point teacher.path at a UNet with out_channels = in_channels."
    )


def check_against_unet(param: Parametrization, cfg: dict, param_file: Path, cfg_file: Path) -> None:
    """denoiser.json must describe the UNet config.json builds: channels, size, conditioning, class embeddings.

    Read from the configs alone (no weights), so a mismatch fails before any sampling, named, not as a shape
    error deep in the UNet or an embedding index out of range.
    """
    c, h, w = param.image_shape
    channels, size = cfg.get("in_channels"), config_size(cfg)
    c *= PACKED_CHANNELS.get(cfg.get("_class_name"), 1)
    if is_int(channels) and channels != c:
        raise InputError(
            f"{param_file} says image_shape {list(param.image_shape)} ({c} channels) but {cfg_file} has in_channels {channels}. "
            f"Fix: make them agree (image_shape is [in_channels, height, width]), or drop image_shape from {PARAM_FILE} to read it from config.json."
        )
    if size is not None and size != (h, w) and not (cfg.get("_class_name") == "SD3Transformer2DModel" and is_int(cfg.get("pos_embed_max_size"))):
        # (SD3's position embeddings are cropped to the latents' size: it runs at sizes other than its sample_size)
        raise InputError(
            f"{param_file} says image_shape {list(param.image_shape)} ({h}x{w}) but {cfg_file} has sample_size {cfg.get('sample_size')} "
            f"({size[0]}x{size[1]}). Fix: make them agree (the size the UNet was trained at), or drop image_shape from {PARAM_FILE}."
        )
    check_channels(cfg, cfg_file)
    conditional = cfg.get("_class_name") in TEXT_NETWORKS
    if param.text_conditioned != conditional:
        raise InputError(
            f"{param_file} says text_conditioned {str(param.text_conditioned).lower()} but {cfg_file} is a {cfg.get('_class_name', 'UNet2DModel')} "
            f"(text-conditioned models are {', '.join(TEXT_NETWORKS)}). Fix: set text_conditioned to {str(conditional).lower()} in {PARAM_FILE}."
        )
    embeds = check_class_embeds(cfg, cfg_file)
    check_conditioning(cfg, cfg_file, param.add_time_ids is not None)
    if param.text_conditioned:
        return  # prompt embeddings: no count to check
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


def check_class_embeds(cfg: dict, cfg_file: Path) -> int | None:
    """num_class_embeds of a UNet config: a positive integer or null. A DiT's label tables: num_embeds_ada_norm
    classes and the label-dropout row, the null class of guidance."""
    if is_dit(cfg):
        n = cfg.get("num_embeds_ada_norm")
        if not (is_int(n) and n > 0):
            raise InputError(f"{cfg_file}: num_embeds_ada_norm (DiT's number of classes) must be a positive integer, got {n!r}. {RESAVE}")
        return n + 1
    embeds = cfg.get("num_class_embeds")
    if embeds is not None and not (is_int(embeds) and embeds > 0):
        raise InputError(f"{cfg_file}: num_class_embeds must be a positive integer or null, got {embeds!r}. {RESAVE}")
    return embeds


# ---------------------------------------------------------------- the VP schedule

ZERO_SNR = (
    "a zero-terminal-SNR schedule (alphas_cumprod[-1] = 0: pure noise at the last timestep, where x0 = (x - sigma eps) / alpha "
    "divides by 0), which this project does not support yet. Fix: use a teacher trained on a schedule with alphas_cumprod > 0 "
    "(rescale_betas_zero_snr false), e.g. Stable Diffusion 1.x/2.x's scaled_linear"
)


def read_scheduler_config(sched_dir: Path) -> dict:
    """A VP teacher's scheduler config, checked for what the denoiser reads: the timestep count and prediction type."""
    path = sched_dir / SCHEDULER_FILE
    cfg = read_json(path, "scheduler config")
    steps = cfg.get("num_train_timesteps", 1000)
    if not (is_int(steps) and steps > 0):
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
    if cfg.get("rescale_betas_zero_snr") is True:
        raise InputError(f"{path} sets rescale_betas_zero_snr: {ZERO_SNR}.")
    return cfg


def check_prediction(param: Parametrization, param_file: Path, sched_cfg: dict, sched_file: Path) -> None:
    prediction = sched_cfg.get("prediction_type", "epsilon")
    if param.prediction_type != prediction:
        raise InputError(
            f"{param_file} says prediction_type {param.prediction_type!r} but {sched_file} says {prediction!r}. "
            "Fix: make them agree (the scheduler's is what the UNet was trained with)."
        )


def make_denoiser(unet: torch.nn.Module, param: Parametrization, sched_dir: Path, param_file: Path) -> Denoiser:
    """The EDM, VP or flow denoiser of ``unet`` (VP: its schedule from ``sched_dir``), frozen, in eval mode."""
    if param.kind == "edm":
        return EDMDenoiser(unet, param).requires_grad_(False)
    if param.kind == "flow":  # denoiser.json holds its whole schedule (the shift settings); SD3 and Flux are called their way
        return flow_denoiser(unet, param).requires_grad_(False)
    sched_file = sched_dir / SCHEDULER_FILE
    check_prediction(param, param_file, read_scheduler_config(sched_dir), sched_file)
    try:
        scheduler = DDPMScheduler.from_pretrained(str(sched_dir))
    except Exception as e:  # e.g. NotImplementedError for an unknown beta_schedule
        raise InputError(f"{sched_file} does not build a DDPM noise schedule: {one_line(e)}. {RESAVE}") from None
    abar = scheduler.alphas_cumprod
    if torch.isfinite(abar).all() and (abar[:-1] > 0).all() and (abar <= 1).all() and abar[-1] == 0:
        raise InputError(f"{sched_file} gives {ZERO_SNR}.")
    if not (torch.isfinite(abar).all() and (abar > 0).all() and (abar <= 1).all()):
        raise InputError(
            f"{sched_file} gives alphas_cumprod outside (0, 1] (beta_start {scheduler.config.beta_start}, beta_end "
            f"{scheduler.config.beta_end}): no noise schedule. Fix: set betas in (0, 1), as the model was trained with."
        )
    return VPDenoiser(unet, param, abar, dict(scheduler.config)).requires_grad_(False)
