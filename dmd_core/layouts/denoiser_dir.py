"""The project's own layout: a UNet's ``save_pretrained`` files plus ``denoiser.json``.

    config.json                            # diffusers UNet config
    diffusion_pytorch_model.safetensors    # weights
    denoiser.json                          # Parametrization: edm | vp, sigmas, classes, null class
    scheduler/scheduler_config.json        # VP only: the diffusers scheduler (alphas_cumprod)

Teachers, generators and fake scores alike (``dmd_core.loading.save_denoiser`` writes it), so
``UNet2DModel.from_pretrained(dir)`` loads the network and ``load_denoiser(dir)`` the denoiser.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..denoisers import Denoiser, Parametrization
from ..errors import InputError
from .base import Layout
from . import common  # common.load_unet: one name to patch where a test asserts nothing loads
from .common import PARAM_FILE, PIPELINE_INDEX, SCHEDULER_FILE, WEIGHTS_FILE, check_against_unet, check_prediction, make_denoiser
from .common import parametrization_from, read_json, read_param_file, read_scheduler_config, with_image_shape


class DenoiserDirLayout(Layout):
    name = "denoiser_dir"
    description = (
        "a denoiser directory (config.json, diffusion_pytorch_model.safetensors and denoiser.json, "
        'e.g. {"kind": "edm", "num_classes": 10, "null_class": 10, "image_shape": [1, 8, 8]}; `dmd toy teacher` makes one)'
    )

    def matches(self, folder: Path) -> bool:
        return (folder / PARAM_FILE).is_file() and not (folder / PIPELINE_INDEX).is_file()

    def parametrization(self, folder: Path) -> Parametrization:
        param = parametrization_from(read_param_file(folder / PARAM_FILE), folder / PARAM_FILE)
        unet_cfg = read_json(folder / "config.json", "UNet config")
        param = with_image_shape(param, unet_cfg, folder)
        check_against_unet(param, unet_cfg, folder / PARAM_FILE, folder / "config.json")
        if param.kind == "vp":
            sched = folder / "scheduler"
            check_prediction(param, folder / PARAM_FILE, read_scheduler_config(sched), sched / SCHEDULER_FILE)
        return param

    def weight_parts(self, folder: Path) -> tuple[tuple[str, str], ...]:
        return (("", WEIGHTS_FILE),)

    def load_denoiser(self, folder: Path, device: str | torch.device = "cpu") -> Denoiser:
        param = self.parametrization(folder)
        unet = common.load_unet(folder, self.weights_variant(folder))
        return make_denoiser(unet, param, folder / "scheduler", folder / PARAM_FILE).to(device)

    def prompt_encoder(self, folder: Path, device: str | torch.device = "cpu"):
        if self.parametrization(folder).text_conditioned:
            raise _no_text_encoder(folder)
        return super().prompt_encoder(folder, device)

    def check_loads(self, folder: Path) -> None:
        if self.load_denoiser(folder).param.text_conditioned:
            raise _no_text_encoder(folder)


def _no_text_encoder(folder: Path) -> InputError:
    # a generator distilled from a prompt teacher: the encoder of its prompts stayed in the teacher's folder
    return InputError(
        f"{folder} is a text-conditioned denoiser directory (a distilled generator): it holds no text encoder to teach with. "
        "Fix: point teacher.path at the StableDiffusionPipeline folder it was distilled from."
    )
