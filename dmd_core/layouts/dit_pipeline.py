"""A diffusers ``DiTPipeline`` folder: a class-conditional transformer on VAE latents (DiT, Peebles & Xie 2023).

``model_index.json`` naming ``DiTPipeline``, ``transformer/`` (a ``DiTTransformer2DModel``; the published
facebook/DiT-XL-2-* configs name ``Transformer2DModel``, which diffusers builds as the same class), ``vae/`` (an
``AutoencoderKL``: the latent codec, read as Stable Diffusion's) and ``scheduler/`` (a VP scheduler; DDIM for the
published models). What ``DiTPipeline(transformer, vae, scheduler).save_pretrained(dir)`` writes. A FlowMatch
scheduler there is refused: ``DiTPipeline`` cannot run one (it calls ``scale_model_input``, which the FlowMatch
schedulers lack). A class-conditional DiT on the flow parametrisation is a denoiser directory instead
(``config.json`` of the ``DiTTransformer2DModel``, its weights, ``denoiser.json`` of kind "flow", as
``save_denoiser`` writes it and data/teacher-flow is), read by ``denoiser_dir.py``.

- **VP with learned variance.** DiT predicts epsilon and, in ``out_channels = 2 x in_channels``, the variance of
  each step. The ODE solvers read the mean only: the denoisers take the first ``in_channels`` of the output
  (``Denoiser._unet``), as ``DiTPipeline`` hands its scheduler ``noise_pred[:, :latent_channels]``.
- **Classes.** ``num_embeds_ada_norm`` classes; each block's label table has one more row, the label-dropout
  embedding DiT was trained with for guidance: the null class is ``num_embeds_ada_norm``. The network's own
  random label dropout (``LabelEmbedding.dropout_prob``, which fires in train mode) is switched off at load
  (``common.without_label_dropout``): the project decides which labels a network sees.
- **CFG** is the project's, on x0: ``x0_u + g (x0_c - x0_u)``. ``DiTPipeline`` guides epsilon (its first
  ``in_channels``); x0 = (x - sigma eps) / alpha is affine in epsilon with coefficients that do not depend on the
  label, so the two are the same map (tests/test_dit.py checks the pairs against the pipeline). Where they differ:
  ``DiTPipeline`` guides only when ``guidance_scale > 1`` (a scale in (0, 1) gives the conditional prediction there,
  an interpolation here), and its unconditional label is the literal 1000, ImageNet's null class: a DiT with another
  ``num_embeds_ada_norm`` cannot be guided by ``DiTPipeline`` at all (an index error), while here the null class is
  always the model's own.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..denoisers import Denoiser, Parametrization
from ..errors import InputError
from . import common  # common.load_unet: one name to patch where a test asserts nothing loads
from .base import Layout
from .common import PARAM_FILE, PIPELINE_INDEX, SCHEDULER_FILE, WEIGHTS_FILE, check_components, is_int, make_denoiser, named
from .common import parametrization_from, pipeline_index, read_json, read_scheduler_config
from .sd_pipeline import StableDiffusionLayout

PARTS = ("transformer", "vae", "scheduler")
SAVE_WHOLE = "Fix: save the whole pipeline (DiTPipeline(transformer, vae, scheduler).save_pretrained(dir) writes transformer/, vae/, scheduler/)."


class DiTPipelineLayout(Layout):
    name = "dit_pipeline"
    description = "a diffusers DiTPipeline folder (class-conditional DiT on VAE latents: model_index.json, transformer/, vae/, scheduler/)"
    pipeline_class = "DiTPipeline"

    # The latent codec is Stable Diffusion's: vae.encode(x).mean * scaling_factor, vae.decode(z / scaling_factor).
    load_vae = StableDiffusionLayout.load_vae
    pixel_shape = StableDiffusionLayout.pixel_shape
    vae_geometry = StableDiffusionLayout.vae_geometry
    decoding_vae = StableDiffusionLayout.decoding_vae
    vae_dtype = StableDiffusionLayout.vae_dtype
    pixel_decoder = StableDiffusionLayout.pixel_decoder
    pixel_encoder = StableDiffusionLayout.pixel_encoder

    def matches(self, folder: Path) -> bool:
        index = pipeline_index(folder)
        if index is None:
            return False
        if "_class_name" in index:
            return index["_class_name"] == "DiTPipeline"
        parts = {k for k in index if not k.startswith("_") and named(index, k)}
        return "transformer" in parts and parts <= set(PARTS)  # a hand-written index

    def parametrization(self, folder: Path) -> Parametrization:
        index = read_json(folder / PIPELINE_INDEX, "pipeline index")
        for part in PARTS:
            if not named(index, part) or not (folder / part).is_dir():
                raise InputError(f"{folder} is a DiTPipeline folder without {part}/. {SAVE_WHOLE}")
        check_components(folder, index)
        cfg_file = folder / "transformer" / "config.json"
        cfg = read_json(cfg_file, "DiT transformer config")
        classes = check_dit_config(cfg, cfg_file)
        sched_file = folder / "scheduler" / SCHEDULER_FILE
        sched = read_scheduler_config(folder / "scheduler")
        if str(sched.get("_class_name", "")).startswith("FlowMatch"):
            raise InputError(
                f"{sched_file} names {sched['_class_name']}: DiTPipeline cannot run a flow-matching scheduler (it calls scale_model_input, "
                "which they lack), so this folder is no DiTPipeline. Fix: save a class-conditional flow DiT as a denoiser directory "
                '(transformer.save_pretrained(dir) and denoiser.json {"kind": "flow", "num_classes": N, "null_class": N, "shift": ...}; '
                "data/teacher-flow is one) and point teacher.path at it."
            )
        raw = {
            "kind": "vp",
            "prediction_type": sched.get("prediction_type", "epsilon"),
            "num_classes": classes,
            "null_class": classes,  # the label-dropout row of DiT's label tables
            "image_shape": [cfg["in_channels"], cfg["sample_size"], cfg["sample_size"]],
        }
        param = parametrization_from(raw, sched_file)
        vae_file = folder / "vae" / "config.json"
        latent = read_json(vae_file, "vae config").get("latent_channels")
        if is_int(latent) and latent != cfg["in_channels"]:
            raise InputError(
                f"{vae_file} has latent_channels {latent} but {cfg_file} has in_channels {cfg['in_channels']}. "
                "Fix: use the VAE the transformer was trained with (save the whole pipeline together)."
            )
        return param

    def weight_parts(self, folder: Path) -> tuple[tuple[str, str], ...]:
        return (("transformer", WEIGHTS_FILE), ("vae", WEIGHTS_FILE))

    def load_denoiser(self, folder: Path, device: str | torch.device = "cpu") -> Denoiser:
        param = self.parametrization(folder)
        transformer = common.load_unet(folder / "transformer", self.weights_variant(folder))
        return make_denoiser(transformer, param, folder / "scheduler", folder / PARAM_FILE).to(device)

    def check_loads(self, folder: Path) -> None:
        self.load_denoiser(folder)
        self.load_vae(folder)


def check_dit_config(cfg: dict, cfg_file: Path) -> int:
    """A DiT transformer config the denoisers can drive: square latents of whole patches, adaLN-Zero with a label
    table, an output of the input's channels or twice them (learned variance). Returns the number of classes."""
    if not common.is_dit(cfg):
        raise InputError(
            f"{cfg_file} names {cfg.get('_class_name')!r} (norm_type {cfg.get('norm_type')!r}): not DiT's class-conditional transformer. "
            'Fix: point teacher.path at a DiTPipeline whose transformer is a DiTTransformer2DModel (norm_type "ada_norm_zero").'
        )
    c, size, patch, out = cfg.get("in_channels"), cfg.get("sample_size"), cfg.get("patch_size", 2), cfg.get("out_channels")
    if not (is_int(c) and c > 0 and is_int(size) and size > 0 and is_int(patch) and patch > 0 and size % patch == 0):
        raise InputError(
            f"{cfg_file}: in_channels, sample_size and patch_size must be positive integers with sample_size a multiple of patch_size, "
            f"got {c!r}, {size!r}, {patch!r}. {common.RESAVE}"
        )
    if out is not None and out not in (c, 2 * c):
        raise InputError(
            f"{cfg_file} has out_channels {out} but in_channels {c}: a DiT predicts the input's channels (epsilon), or twice them with "
            "the learned variance. Fix: point teacher.path at the DiTPipeline the transformer was trained in."
        )
    return common.check_class_embeds(cfg, cfg_file) - 1
