"""The interface every teacher layout answers (docs/layouts.md)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Callable

import torch

from ..denoisers import Denoiser, Parametrization
from ..dmd import NUM_LEVELS
from ..errors import InputError
from ..text import PromptEncoder
from .common import choose_variant, read_scheduler_config

Tensor = torch.Tensor


class Layout:
    """One family of teacher folders: how to recognise one, read its parametrisation, load its parts.

    Layouts hold one setting, the weights variant to read (``reading``), and no other state: every method
    takes the folder. Defaults are those of a pixel-space, class-conditioned (or unconditional) teacher; a
    latent or prompt-conditioned layout overrides them.
    """

    name: str = ""  # the module's name, e.g. "ddpm_pipeline"
    description: str = ""  # what such a folder holds, for the error that lists the known layouts
    takes_prompts: bool = False  # conditioned on prompts (a prompt table) rather than class labels
    pipeline_class: str | None = None  # the diffusers pipeline an export is written as; None: the project's OneStepPipeline
    variant: str | None = None  # the weights variant asked for (teacher.variant, e.g. "fp16"); None: plain if present

    def reading(self, variant: str | None) -> "Layout":
        """This layout reading the ``variant`` weights (``save_pretrained(..., variant=...)``'s files); a copy, the
        registered layout stays as it is."""
        if variant == self.variant:
            return self
        other = copy.copy(self)
        other.variant = variant
        return other

    def weight_parts(self, folder: Path) -> tuple[tuple[str, str], ...]:
        """(subfolder, plain weights file name) of every weights file the loads read; () reads no variant."""
        return ()

    def weights_variant(self, folder: Path) -> str | None:
        """The variant every load reads (None: the plain files): ``variant`` when every part has it; unset, the
        plain weights when every part has them, else the one variant they all have (InputError otherwise)."""
        return choose_variant(folder, self.weight_parts(folder), self.variant)

    def matches(self, folder: Path) -> bool:
        """Whether ``folder`` is of this layout, from file names and model_index.json alone (never raises)."""
        raise NotImplementedError

    def parametrization(self, folder: Path) -> Parametrization:
        """The teacher's parametrisation, read and checked without loading weights (InputError naming the file)."""
        raise NotImplementedError

    def load_denoiser(self, folder: Path, device: str | torch.device = "cpu") -> Denoiser:
        """The network as an x0-predictor, frozen, in eval mode, float32."""
        raise NotImplementedError

    def configure(self, folder: Path, param: Parametrization, sizes: dict) -> Parametrization:
        """``param`` with the teacher's size settings applied (only those set): SDXL's size conditioning
        (``teacher.original_size``, ``target_size``, ``crop_top_left``), SD3's and Flux's ``teacher.image_size``. A
        layout refuses those it has no use for (``refuse_sizes``); here, all of them."""
        self.refuse_sizes(folder, sizes, ())
        return param

    def refuse_sizes(self, folder: Path, sizes: dict, used: tuple[str, ...]) -> None:
        """InputError for the first size setting of ``sizes`` not in ``used`` (the ones this layout applies)."""
        name = next((k for k in sizes if k not in used), None)
        if name == "image_size":
            raise InputError(
                f"teacher.image_size sets the size an SD3 or Flux teacher is distilled at, but {folder} is a {self.name} teacher, "
                "which runs at its network's own size. Fix: drop teacher.image_size."
            )
        if name is not None:
            raise InputError(
                f"teacher.{name} sets SDXL's size conditioning, but {folder} is a {self.name} teacher, which has none. Fix: drop teacher.{name}."
            )

    def num_timesteps(self, folder: Path, param: Parametrization) -> int:
        """T: a VP teacher's training timesteps (its scheduler's num_train_timesteps), an EDM teacher's level grid."""
        if param.kind != "vp":
            return NUM_LEVELS
        return read_scheduler_config(folder / "scheduler").get("num_train_timesteps", 1000)

    def prompt_encoder(self, folder: Path, device: str | torch.device = "cpu") -> PromptEncoder:
        """prompts -> embeddings through the teacher's own tokenizer and text encoder (prompt layouts only)."""
        raise InputError(f"{folder} is a {self.name} teacher, conditioned on class labels: it has no text encoder. Fix: drop the prompts setting.")

    def text_parts(self, folder: Path) -> tuple[str, ...]:
        """The files and subfolders of ``folder`` the prompt encoder reads (their digest keys the prompt embeddings)."""
        return ()

    def pixel_shape(self, folder: Path, param: Parametrization) -> tuple[int, int, int]:
        """C x H x W of the images the teacher makes (its model space, or the decoder's image side)."""
        return tuple(param.image_shape)

    def pixel_decoder(
        self, folder: Path, device: str | torch.device = "cpu", gradient_checkpointing: bool = False, dtype: torch.dtype | None = None
    ) -> Callable[[Tensor], Tensor]:
        """Model space -> pixels in [-1, 1] (differentiable); identity for pixel-space teachers."""
        return lambda x: x

    def encode_pixels(self, folder: Path, images: Tensor, device: str | torch.device = "cpu", batch_size: int = 64) -> Tensor:
        """Pixels in [-1, 1] -> model space (deterministic); identity for pixel-space teachers."""
        return self.pixel_encoder(folder, device, batch_size)(images)

    def pixel_encoder(self, folder: Path, device: str | torch.device = "cpu", batch_size: int = 64) -> Callable[[Tensor], Tensor]:
        """``encode_pixels`` with its codec loaded once, for encoding a set batch by batch."""
        return lambda images: images.to(device)

    def check_loads(self, folder: Path) -> None:
        """Load every part once, so that a damaged file fails before anything is written (InputError)."""
        self.load_denoiser(folder)

    def __repr__(self) -> str:
        return f"<layout {self.name}{f' reading {self.variant}' if self.variant else ''}>"
