"""Teacher layouts: one module per family of model folder, behind one interface (``Layout``, docs/layouts.md).

``detect(folder)`` asks each registered layout whether the folder is its own; the first that says yes
answers for it: parametrisation, denoiser, prompt encoder, latent codec, load checks, export class.
A folder of a family the project knows but does not load is refused by name; any other one is told the
layouts there are. Adding a layout is one module and one ``register`` line below.
"""

from __future__ import annotations

import os

from ..errors import InputError
from .base import Layout
from .common import PARAM_FILE, PIPELINE_INDEX, read_json, resolve_model_dir
from .ddpm_pipeline import DDPMPipelineLayout
from .denoiser_dir import DenoiserDirLayout
from .dit_pipeline import DiTPipelineLayout
from .flux_pipeline import FluxLayout
from .sd3_pipeline import StableDiffusion3Layout
from .sd_pipeline import StableDiffusionLayout
from .sdxl_pipeline import StableDiffusionXLLayout
from .unsupported import refuse_known_family

_REGISTRY: list[Layout] = []


def register(layout: Layout) -> Layout:
    """Add ``layout`` (an instance) to those ``detect`` asks, after the ones registered before it."""
    if not isinstance(layout, Layout) or not layout.name:
        raise TypeError(f"register: expected a named Layout instance, got {layout!r}")
    if any(known.name == layout.name for known in _REGISTRY):
        raise ValueError(f"register: a layout named {layout.name!r} is registered already")
    _REGISTRY.append(layout)
    return layout


def registered() -> tuple[Layout, ...]:
    """The registered layouts, in the order ``detect`` asks them."""
    return tuple(_REGISTRY)


def known_layouts() -> str:
    """The registered layouts in words, for an error that says what a teacher folder may be."""
    return "; or ".join(layout.description for layout in _REGISTRY)


def detect(folder: str | os.PathLike) -> Layout:
    """The layout of ``folder`` (a directory, or a Hugging Face repo id in the local cache); InputError if none."""
    folder = resolve_model_dir(folder)
    index = None
    if (folder / PIPELINE_INDEX).is_file():
        index = read_json(folder / PIPELINE_INDEX, "pipeline index")  # damaged: fails here, named, whoever would match
    for layout in _REGISTRY:
        if layout.matches(folder):
            return layout
    if index is not None:
        refuse_known_family(folder, index)
        raise InputError(
            f"{folder / PIPELINE_INDEX} names {index.get('_class_name', 'no _class_name')}, a pipeline no layout here loads. "
            f"Fix: point teacher.path at {known_layouts()}."
        )
    raise InputError(f"{folder} is not a teacher: no {PARAM_FILE} and no {PIPELINE_INDEX}. Fix: point teacher.path at {known_layouts()}.")


register(StableDiffusionLayout())
register(StableDiffusionXLLayout())
register(StableDiffusion3Layout())
register(FluxLayout())
register(DDPMPipelineLayout())
register(DiTPipelineLayout())
register(DenoiserDirLayout())

__all__ = ["Layout", "register", "registered", "detect", "known_layouts", "DDPMPipelineLayout", "DenoiserDirLayout", "DiTPipelineLayout", "StableDiffusionLayout", "StableDiffusionXLLayout", "StableDiffusion3Layout", "FluxLayout"]
