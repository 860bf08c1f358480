"""A diffusers ``DDPMPipeline`` folder: ``model_index.json``, ``unet/`` (a UNet2DModel), ``scheduler/``.

What ``DDPMPipeline(unet, scheduler).save_pretrained(dir)`` writes, as a user or the Hugging Face cache has
it. A VP denoiser in pixel space whose parametrisation comes from the scheduler (prediction type) and the
UNet config (image shape; ``num_class_embeds`` = classes + 1, the last one the null class); an optional
``denoiser.json`` beside ``model_index.json`` overrides it and is checked against the scheduler.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..denoisers import Denoiser, Parametrization
from ..errors import InputError
from .base import Layout
from . import common  # common.load_unet: one name to patch where a test asserts nothing loads
from .common import PARAM_FILE, PIPELINE_INDEX, SCHEDULER_FILE, WEIGHTS_FILE, check_against_unet, check_class_embeds, check_components, check_conditioning
from .common import make_denoiser, named, parametrization_from, pipeline_index, read_json, read_param_file, read_scheduler_config
from .common import with_image_shape


class DDPMPipelineLayout(Layout):
    name = "ddpm_pipeline"
    description = "a diffusers DDPMPipeline folder (model_index.json, unet/, scheduler/: what DDPMPipeline(unet, scheduler).save_pretrained writes)"
    # Pipelines whose folder is this one (a UNet2DModel and a VP scheduler); the sampler they name is not used.
    classes = ("DDPMPipeline", "DDIMPipeline", "PNDMPipeline")
    components = {"unet", "scheduler"}
    size_conditioned = False  # the UNet takes SDXL's pooled embedding and sizes (addition_embed_type "text_time")
    save_hint = "DDPMPipeline(unet, scheduler).save_pretrained(dir)"

    def matches(self, folder: Path) -> bool:
        index = pipeline_index(folder)
        if index is None:
            return False
        if "_class_name" in index:
            return index["_class_name"] in self.classes
        return self.matches_unnamed(folder, index)

    def matches_unnamed(self, folder: Path, index: dict) -> bool:
        """Whether a model_index.json without ``_class_name`` (written by hand) is this layout's: by the parts it names."""
        return self.matches_parts({k for k in index if not k.startswith("_") and named(index, k)})

    def matches_parts(self, parts: set[str]) -> bool:
        """Whether a model_index.json without ``_class_name`` naming ``parts`` is this layout's."""
        return parts <= self.components

    def parametrization(self, folder: Path) -> Parametrization:
        index = read_json(folder / PIPELINE_INDEX, "pipeline index")
        for part in ("unet", "scheduler"):
            if part not in index or not (folder / part).is_dir():
                raise InputError(
                    f"{folder} is a diffusers pipeline folder without {part}/. Fix: save the pipeline with its UNet and "
                    f"scheduler, e.g. {self.save_hint}."
                )
        check_components(folder, index)
        self.check_parts(folder, index)
        cfg_file, sched_file = folder / "unet" / "config.json", folder / "scheduler" / SCHEDULER_FILE
        unet_cfg = read_json(cfg_file, "UNet config")
        prediction = read_scheduler_config(folder / "scheduler").get("prediction_type", "epsilon")
        embeds = check_class_embeds(unet_cfg, cfg_file)
        check_conditioning(unet_cfg, cfg_file, self.size_conditioned)
        derived = {"kind": "vp", "prediction_type": prediction, **self.conditioning(embeds)}
        override = folder / PARAM_FILE
        if override.is_file():
            raw = read_param_file(override)
            if raw.get("prediction_type", prediction) != prediction:
                raise InputError(
                    f"{override} says prediction_type {raw['prediction_type']!r} but {sched_file} says {prediction!r}. "
                    "Fix: make them agree (the scheduler's is what the UNet was trained with) or drop it from denoiser.json."
                )
            if raw.get("kind", "vp") != "vp":
                raise InputError(
                    f"{override}: a pipeline folder's teacher is VP (its scheduler defines alpha_t, sigma_t), got kind {raw['kind']!r}. "
                    f'Fix: set "kind" to "vp" or drop it from {PARAM_FILE}.'
                )
            derived.update(raw)
        param = parametrization_from(derived, override if override.is_file() else folder)
        param = self.with_defaults(folder, with_image_shape(param, unet_cfg, folder / "unet"))
        check_against_unet(param, unet_cfg, override if override.is_file() else folder / PIPELINE_INDEX, cfg_file)
        self.check_against_parts(folder, unet_cfg)
        return param

    def conditioning(self, embeds: int | None) -> dict:
        """The conditioning fields of the parametrisation, from the UNet's class embedding count."""
        n = embeds - 1 if embeds else 0  # the last embedding is the null class (label dropout)
        return {"num_classes": n, "null_class": n if embeds else None, "text_conditioned": False}

    def with_defaults(self, folder: Path, param: Parametrization) -> Parametrization:
        """The parametrisation with what the layout derives once the image shape is known (nothing here)."""
        return param

    def check_parts(self, folder: Path, index: dict) -> None:
        """The components beside unet/ and scheduler/ are present (none here)."""

    def check_against_parts(self, folder: Path, unet_cfg: dict) -> None:
        """The other components fit the UNet (none here)."""

    def weight_parts(self, folder: Path) -> tuple[tuple[str, str], ...]:
        return (("unet", WEIGHTS_FILE),)

    def load_denoiser(self, folder: Path, device: str | torch.device = "cpu") -> Denoiser:
        param = self.parametrization(folder)
        unet = common.load_unet(folder / "unet", self.weights_variant(folder))
        return make_denoiser(unet, param, folder / "scheduler", folder / PARAM_FILE).to(device)
