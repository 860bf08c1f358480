"""LoRA (peft) of a denoiser's network: which modules it adapts, the seeded adapter, its trainable state, the
fused network, and the adapter on disk.

Two formats on disk, both read by libraries alone:
- peft's (``adapter_config.json`` + ``adapter_model.safetensors``, keys ``base_model.model.<module>.lora_A.weight``):
  ``PeftModel.from_pretrained(network, folder)`` on any torch module, the teacher's network included. A distill
  output's ``<generator>/lora/`` and the export of a teacher without a diffusers LoRA loader (UNet2DModel) are it.
- diffusers' (``pytorch_lora_weights.safetensors``, keys ``unet.<module>.lora_A.weight`` with the LoraConfig in its
  header): ``pipe.load_lora_weights(folder)`` on the teacher's own pipeline (``save_pipeline_lora``).

Saved adapters are for inference: their config carries no dropout (a loaded adapter's dropout modules would be in
train mode inside an eval-mode network: diffusers' loader does not switch them).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import load_file, save_file

from .errors import InputError, shown

# Default targets, as patterns on a dotted suffix of a module's name: the attention's q/k/v/out (and the joint
# attention's added ones: SD3, Flux), the transformer blocks' projections and feed-forward, and the ResNet blocks'
# convolutions and time projections. Not the stem and head convolutions (conv_in, conv_out) nor the time and class
# embeddings: the adapter changes how features are computed, not what goes in and comes out.
ATTENTION_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
DEFAULT_TARGETS = (*ATTENTION_TARGETS, "proj_in", "proj_out", "proj_mlp", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                   "ff_context.net.2", "conv1", "conv2", "conv_shortcut", "time_emb_proj")  # fmt: skip
LORA_MODULES = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d)  # what peft's LoRA adapts among a UNet's layers
ADAPTER = "default"  # peft's adapter name; saved keys leave it out
PEFT_CONFIG, PEFT_WEIGHTS, PEFT_PREFIX = "adapter_config.json", "adapter_model.safetensors", "base_model.model."
LORA_DIR = "lora"  # a LoRA-trained network's adapter: inside its denoiser directory, and in an export (docs/formats.md)


@dataclasses.dataclass(frozen=True)
class LoraSettings:
    """One adapter's settings: rank, alpha (None: the rank, scale 1), dropout, target patterns (None: the defaults)."""

    rank: int
    alpha: float | None = None
    dropout: float = 0.0
    targets: tuple[str, ...] | None = None

    def config(self, modules: Sequence[str]):
        """peft's LoraConfig on the modules' full names; B = 0 at the start (``init_lora_weights``), so the adapted
        network is the base network until it trains."""
        from peft import LoraConfig

        return LoraConfig(r=self.rank, lora_alpha=self.alpha or self.rank, lora_dropout=self.dropout, target_modules=list(modules), init_lora_weights=True)


def matches(name: str, pattern: str) -> bool:
    """``pattern`` (a regular expression) matches a dotted suffix of ``name``: ``to_q`` matches
    ``mid_block.attentions.0.to_q`` as peft's names do, ``attentions\\..*`` every module inside an attention."""
    parts = name.split(".")
    return any(re.fullmatch(pattern, ".".join(parts[i:])) for i in range(len(parts)))


def target_modules(net: torch.nn.Module, patterns: Sequence[str] | None, setting: str = "distill.lora_target_modules") -> list[str]:
    """The full names of ``net``'s Linear and Conv modules the patterns match, in ``net``'s order. Each pattern given
    must match one; the defaults must match one between them (a network of other layer names needs its own)."""
    candidates = [n for n, m in net.named_modules() if isinstance(m, LORA_MODULES)]
    hits = {p: {n for n in candidates if matches(n, p)} for p in (patterns or DEFAULT_TARGETS)}
    kind = type(net).__name__
    examples = ", ".join(sorted({n.rsplit(".", 1)[-1] for n in candidates})[:12])
    if patterns:
        missing = [p for p, found in hits.items() if not found]
        if missing:
            raise InputError(f"{setting}: {shown(missing[0], 80)} matches no Linear or Conv module of the {kind}. "
                             f"Fix: use its module names (e.g. {examples}) or null for the default targets.")  # fmt: skip
    chosen = set().union(*hits.values())
    if not chosen:
        raise InputError(f"no module of the {kind} matches the default LoRA targets. Fix: set {setting} to its module names (e.g. {examples}).")
    return [n for n in candidates if n in chosen]


def network_skeleton(folder: Path) -> torch.nn.Module:
    """The network whose ``config.json`` is in ``folder``, built on the meta device (no weights, no memory): its
    module names, to check target patterns before any stage computes."""
    from .layouts.common import UNET_CLASSES, is_dit, read_json

    cfg = read_json(Path(folder) / "config.json", "network config")
    cls = UNET_CLASSES["DiTTransformer2DModel"] if is_dit(cfg) else UNET_CLASSES.get(cfg.get("_class_name", "UNet2DModel"))
    if cls is None:  # the teacher's own load names the problem
        raise InputError(f"{folder}/config.json names _class_name {shown(cfg.get('_class_name'), 60)}. Fix: point teacher.path at a supported network.")
    with torch.device("meta"):
        return cls.from_config({k: v for k, v in cfg.items() if not k.startswith("_")})


def add_lora(net: torch.nn.Module, settings: LoraSettings, seed: int) -> list[str]:
    """Inject the adapter into ``net`` in place (diffusers' ``add_adapter`` where the model has it, peft's
    ``inject_adapter_in_model`` for one that does not, e.g. UNet2DModel); A is drawn from ``seed`` on the CPU
    generator, B = 0. Returns the adapted modules' names."""
    from peft import inject_adapter_in_model

    names = target_modules(net, settings.targets)
    with torch.random.fork_rng(devices=[]):  # peft initialises A on the CPU, then moves it to the layer's device
        torch.manual_seed(seed)
        if hasattr(net, "add_adapter"):
            net.add_adapter(settings.config(names), ADAPTER)
        else:
            inject_adapter_in_model(settings.config(names), net, ADAPTER)
    return names


def has_lora(net: torch.nn.Module) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(m, BaseTunerLayer) for m in net.modules())


def is_lora_key(key: str) -> bool:
    return ".lora_A." in key or ".lora_B." in key


def trainable_state(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What training changes in ``net`` (state_dict names): its adapter when it has one, else everything."""
    state = net.state_dict()
    return {k: v for k, v in state.items() if is_lora_key(k)} if has_lora(net) else state


def load_trainable_state(net: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """The inverse of ``trainable_state``: strict for a whole network; for an adapter, exactly its tensors."""
    if not has_lora(net):
        net.load_state_dict(state)
        return
    result = net.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if is_lora_key(k)]
    if result.unexpected_keys or missing:
        raise RuntimeError(f"adapter state does not fit the network: unexpected {result.unexpected_keys[:3]}, missing {missing[:3]}")


def set_trainable(den: torch.nn.Module, net: torch.nn.Module) -> None:
    """Gradients for all of ``den`` (a denoiser: its network and heads) unless its network ``net`` has an adapter:
    then for the adapter and what lies outside the network (the GAN head)."""
    den.requires_grad_(True)
    if has_lora(net):
        net.requires_grad_(False)
        for name, p in net.named_parameters():
            p.requires_grad_(is_lora_key(name))


def fuse(net: torch.nn.Module) -> torch.nn.Module:
    """``net`` with its adapter merged into the weights and the LoRA layers removed, in place: a plain network of
    its class that ``save_pretrained`` writes in the usual layout (diffusers' ``fuse_lora`` / ``unload_lora``
    where the model has them, peft's merge otherwise)."""
    from diffusers.utils.peft_utils import recurse_remove_peft_layers
    from peft.tuners.tuners_utils import BaseTunerLayer

    if hasattr(net, "fuse_lora"):
        net.fuse_lora()
        net.unload_lora()
        return net
    for m in net.modules():
        if isinstance(m, BaseTunerLayer):
            m.merge()
    recurse_remove_peft_layers(net)
    for attr in ("peft_config", "_hf_peft_config_loaded"):
        if hasattr(net, attr):
            delattr(net, attr)
    return net


def fused_copy(den: torch.nn.Module) -> torch.nn.Module:
    """A copy of the denoiser ``den`` whose network is fused (``fuse``); ``den`` keeps its adapter."""
    out = copy.deepcopy(den)
    fuse(out.unet)
    return out


def inference_config(net: torch.nn.Module) -> dict:
    """The adapter's LoraConfig as a dict for a saved adapter: no dropout, inference mode, sets as lists."""
    cfg = copy.deepcopy(net.peft_config[ADAPTER])
    cfg.lora_dropout, cfg.inference_mode = 0.0, True
    return {k: sorted(v) if isinstance(v, set) else v for k, v in cfg.to_dict().items()}


def adapter_tensors(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors by module name, adapter name left out (``peft.get_peft_model_state_dict``)."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().contiguous() for k, v in get_peft_model_state_dict(net, adapter_name=ADAPTER).items()}


def save_adapter(net: torch.nn.Module, folder: Path) -> Path:
    """``net``'s adapter in peft's format: ``PeftModel.from_pretrained(<the base network>, folder)`` loads it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / PEFT_CONFIG).write_text(json.dumps(inference_config(net), indent=2, sort_keys=True) + "\n")
    save_file({PEFT_PREFIX + k: v for k, v in adapter_tensors(net).items()}, str(folder / PEFT_WEIGHTS), metadata={"format": "pt"})
    return folder


def read_adapter(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """A peft-format adapter folder: (its LoraConfig as a dict, its tensors by module name)."""
    folder = Path(folder)
    config = json.loads((folder / PEFT_CONFIG).read_text())
    tensors = {k.removeprefix(PEFT_PREFIX): v for k, v in load_file(str(folder / PEFT_WEIGHTS)).items()}
    return config, tensors


def load_adapter(net: torch.nn.Module, folder: Path) -> None:
    """Fill ``net``'s adapter (same targets, e.g. a copy of the trained network) from a peft-format folder."""
    from peft import set_peft_model_state_dict

    _, tensors = read_adapter(folder)
    result = set_peft_model_state_dict(net, tensors, adapter_name=ADAPTER)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise RuntimeError(f"the adapter in {folder} does not fit the network: {unexpected[:3]}")


def save_pipeline_lora(pipeline_cls, network: str, adapter_folder: Path, out: Path) -> Path:
    """A peft-format adapter of a pipeline's ``network`` ("unet" or "transformer") in diffusers' LoRA format, with
    its LoraConfig in the header (alpha, targets): ``pipeline_cls.load_lora_weights(out)`` on the teacher's pipeline.

    The tensors keep peft's key names (``lora_A`` / ``lora_B``): diffusers' loader takes them as they are, where the
    older names of ``convert_state_dict_to_diffusers`` (``lora.down``) lose the attention layers on loading
    (diffusers 0.42: 64 of 154 tensors of the tiny SD UNet)."""
    config, tensors = read_adapter(adapter_folder)
    pipeline_cls.save_lora_weights(str(out), **{f"{network}_lora_layers": tensors, f"{network}_lora_adapter_metadata": config})
    return Path(out)


def lora_summary(net: torch.nn.Module, names: Sequence[str]) -> dict:
    """What an adapter adds: rank, alpha, the modules it adapts and its parameters, against the network's."""
    cfg = net.peft_config[ADAPTER]
    adapter = sum(p.numel() for n, p in net.named_parameters() if is_lora_key(n))
    return {"rank": cfg.r, "alpha": cfg.lora_alpha, "dropout": cfg.lora_dropout, "modules": len(names), "adapter_parameters": adapter,
            "network_parameters": sum(p.numel() for n, p in net.named_parameters() if not is_lora_key(n))}  # fmt: skip


def network_folder(layout, folder: Path) -> Path:
    """The folder of a teacher's network (config.json and weights) in its folder: the first part its layout reads."""
    parts = layout.weight_parts(Path(folder))
    return Path(folder) / (parts[0][0] if parts else "")


# ---------------------------------------------------------------- plain-library loads (run in a fresh process)


def lora_pipeline(export_dir: str, teacher: str, variant: str | None):
    """The teacher's own pipeline (the class the export's model_index.json names) with the export's ``lora/`` loaded
    by ``load_lora_weights`` and the export's scheduler: what the model card tells a user to run."""
    import diffusers

    from .pipeline import null_components

    index = json.loads((Path(export_dir) / "model_index.json").read_text())
    pipe = getattr(diffusers, index["_class_name"]).from_pretrained(teacher, variant=variant, dtype=torch.float32, **null_components(teacher))
    pipe.load_lora_weights(str(Path(export_dir) / LORA_DIR))
    pipe.scheduler = getattr(diffusers, index["scheduler"][1]).from_pretrained(export_dir, subfolder="scheduler")
    return pipe


def lora_latents_to_file(export_dir: str, prompts_json: str, seed: int, out_file: str, timesteps: list[int] | None = None, extra: dict | None = None,
                         teacher: str = "", variant: str | None = None) -> None:  # fmt: skip
    """``dmd_core.pipeline.stable_diffusion_latents_to_file`` (the export's own check: the same prompts, noise and
    call) on ``lora_pipeline`` in place of the export's pipeline."""
    from unittest import mock

    from . import pipeline

    pipe = lora_pipeline(export_dir, teacher, variant)
    with mock.patch.object(pipeline, "text_to_image_pipeline", lambda folder, **kwargs: pipe):
        pipeline.stable_diffusion_latents_to_file(export_dir, prompts_json, seed, out_file, timesteps, extra)


def lora_sample_to_file(export_dir: str, network_dir: str, variant: str | None, seed: int, n: int, out_file: str) -> None:
    """The export's OneStepPipeline with the teacher's network plus the export's ``lora/`` (``PeftModel``, unfused) as
    its generator: images of (seed, i), labels i mod C, as ``dmd_core.pipeline.sample_to_file`` writes them."""
    import diffusers
    import numpy as np
    from peft import PeftModel

    from .pipeline import OneStepPipeline
    from .shards import sample_labels, sample_noise

    name = json.loads((Path(export_dir) / "generator" / "config.json").read_text())["_class_name"]
    base = getattr(diffusers, name).from_pretrained(network_dir, variant=variant, torch_dtype=torch.float32)
    net = PeftModel.from_pretrained(base, str(Path(export_dir) / LORA_DIR)).get_base_model().eval()
    pipe = OneStepPipeline.from_pretrained(export_dir, generator=net)
    c = pipe.config
    x = pipe(class_labels=sample_labels(range(n), c.num_classes), num_images=n, seed=seed, noise=sample_noise(seed, range(n), tuple(c.image_shape)), output_type="pt")
    np.save(out_file, x.cpu().numpy(), allow_pickle=False)
