"""The exported one-step generator as a diffusers pipeline, and as a plain module for ONNX."""

from __future__ import annotations

import numpy as np
import torch
from diffusers import DiffusionPipeline, ModelMixin
from PIL import Image

from .denoisers import EDMDenoiser, FlowDenoiser, Parametrization, VPDenoiser
from .dmd import MultiStep, OneStep, step_noise
from .shards import sample_labels, sample_noise


class OneStepModule(torch.nn.Module):
    """(noise, class_labels) -> image in model space, one network evaluation: what ONNX exports."""

    def __init__(self, denoiser: EDMDenoiser | VPDenoiser):
        super().__init__()
        self.denoiser = denoiser
        self.one_step = OneStep.of(denoiser)

    def forward(self, noise: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.one_step(self.denoiser, noise, class_labels)


class DenoiserCallModule(torch.nn.Module):
    """(x, level, class_labels) -> x0: one network call at any level, what ONNX exports for k-step generators."""

    def __init__(self, denoiser: EDMDenoiser | VPDenoiser):
        super().__init__()
        self.denoiser = denoiser

    def forward(self, x: torch.Tensor, level: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.denoiser(x, level, class_labels)


class OneStepPipeline(DiffusionPipeline):
    """Seed and class labels to images in one call; ``OneStepPipeline.from_pretrained(export_dir)``.

    The component ``generator`` is the distilled network (``<export>/generator/``: a UNet, or the DiT of a flow
    teacher); the parametrisation is this pipeline's config (``model_index.json``), the same numbers as
    ``one_step.json`` (``flow``: a flow model's shift settings, ``Parametrization``'s flow fields).
    """

    def __init__(
        self,
        generator: ModelMixin,  # a UNet2DModel, or the DiTTransformer2DModel of a flow teacher
        kind: str = "edm",
        sigma_max: float = 80.0,
        sigma_data: float = 0.5,
        num_classes: int = 0,
        null_class: int | None = None,
        image_shape: list[int] | None = None,
        prediction_type: str = "epsilon",
        alphas_cumprod: list[float] | None = None,
        one_step_timestep: int | None = None,
        generator_timesteps: list[int] | None = None,
        sigma_min: float = 0.002,
        flow: dict | None = None,
    ):
        super().__init__()
        # Frozen, like every loaded denoiser: on CPU, torch picks another linear kernel for weights that
        # require grad (even under no_grad), which rounds differently (2e-7 on a 220 M-parameter UNet's
        # attention); frozen, the export reproduces the evaluated generator bit for bit.
        generator.requires_grad_(False)
        self.register_modules(generator=generator)
        self.register_to_config(
            kind=kind, sigma_max=sigma_max, sigma_data=sigma_data, num_classes=num_classes, null_class=null_class,
            image_shape=image_shape, prediction_type=prediction_type, alphas_cumprod=alphas_cumprod,
            one_step_timestep=one_step_timestep, generator_timesteps=generator_timesteps, sigma_min=sigma_min, flow=flow,
        )  # fmt: skip

    def denoiser(self) -> EDMDenoiser | VPDenoiser | FlowDenoiser:
        c = self.config
        param = Parametrization(
            kind=c.kind, num_classes=c.num_classes, null_class=c.null_class, sigma_max=c.sigma_max, sigma_data=c.sigma_data,
            prediction_type=c.prediction_type, image_shape=tuple(c.image_shape) if c.image_shape else None,
            one_step_timestep=c.get("one_step_timestep"), sigma_min=c.get("sigma_min", 0.002),
            generator_timesteps=tuple(c["generator_timesteps"]) if c.get("generator_timesteps") else None, **(c.get("flow") or {}),
        )  # fmt: skip
        if c.kind == "flow":
            return FlowDenoiser(self.generator, param)
        if c.kind == "edm":
            return EDMDenoiser(self.generator, param)
        return VPDenoiser(self.generator, param, torch.tensor(c.alphas_cumprod, dtype=torch.float64), {})

    @torch.no_grad()
    def __call__(
        self,
        class_labels: list[int] | torch.Tensor | None = None,
        num_images: int | None = None,
        seed: int = 0,
        noise: torch.Tensor | None = None,
        output_type: str = "pil",
    ):
        """Images for ``class_labels`` (or ``num_images`` unconditional ones), noise of image i seeded by (seed, i)
        (a k-step generator's later noise by (seed, step, i), as the evaluate stage draws it).

        ``output_type``: "pil" (list of PIL images), "np" (uint8 array NHWC) or "pt" (tensor in [-1, 1]).
        """
        den = self.denoiser()
        dev = self.generator.device
        labels = None if class_labels is None else torch.as_tensor(class_labels, dtype=torch.long, device=dev)
        n = len(labels) if labels is not None else (num_images or (len(noise) if noise is not None else 1))
        if self.config.num_classes and labels is None:
            labels = torch.full((n,), self.config.null_class, dtype=torch.long, device=dev)
        if noise is None:
            noise = sample_noise(seed, range(n), tuple(self.config.image_shape))
        later = step_noise(seed, range(n), tuple(self.config.image_shape))
        x = MultiStep.of(den)(den, noise.to(dev), labels, lambda j: later(j).to(dev))
        if output_type == "pt":
            return x
        array = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        if output_type == "np":
            return array
        return [Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a) for a in array]



def sample_to_file(export_dir: str, seed: int, n: int, out_file: str) -> None:
    """Load an export with diffusers and write one-step images of (seed, i), labels i mod C, to ``out_file`` (.npy).

    Run in a fresh process by the export stage's parity check.
    """
    pipe = OneStepPipeline.from_pretrained(export_dir)
    c = pipe.config
    labels = sample_labels(range(n), c.num_classes)
    x = pipe(class_labels=labels, num_images=n, seed=seed, noise=sample_noise(seed, range(n), tuple(c.image_shape)), output_type="pt")
    np.save(out_file, x.cpu().numpy(), allow_pickle=False)


def one_step_scheduler(scheduler_config: dict, timestep: int):
    """A diffusers DDIM scheduler whose single step at ``timestep`` (t*) is the one-step generator's x0 map.

    The schedule is cut after t*: ``trained_betas`` = the teacher's first t* + 1 betas (so alpha_t is
    unchanged up to t*), and ``timestep_spacing="trailing"`` makes t* the only timestep of one inference
    step. ``set_alpha_to_one`` makes the step's target alpha = 1, so DDIM (eta 0) returns its x0
    prediction ``(z - sigma_t* eps) / alpha_t*`` unclipped: exactly G(z) (docs/math.md §5). (Stable
    Diffusion pipelines reset any ``steps_offset`` other than 1, so "leading" spacing cannot do this.)
    """
    from diffusers import DDIMScheduler

    keep = {k: v for k, v in scheduler_config.items() if not k.startswith("_")}
    betas = DDIMScheduler.from_config(keep).betas[: int(timestep) + 1].tolist()
    return DDIMScheduler.from_config({
        **keep, "num_train_timesteps": len(betas), "trained_betas": betas, "rescale_betas_zero_snr": False,
        "timestep_spacing": "trailing", "steps_offset": 1, "set_alpha_to_one": True, "clip_sample": False, "thresholding": False,
    })  # fmt: skip


def multi_step_scheduler(scheduler_config: dict):
    """A diffusers LCMScheduler whose k steps are DMD2's k-step sampler (docs/math.md §13).

    LCM's step is x0 = c_out x0_pred + c_skip x_t, then alpha_prev x0 + sigma_prev eps with fresh eps (none
    after the last step): with ``timestep_scaling`` 1e4, c_out rounds to 1 and c_skip to 0 in float32, so each
    step returns the generator's x0 and re-noises exactly as ``MultiStep`` does. ``original_inference_steps`` =
    T makes every timestep valid, and ``num_inference_steps=k`` gives DMD2's uniform schedule (999, 749, 499,
    249 for k = 4); other schedules go in as ``timesteps=[...]``.
    """
    import inspect

    from diffusers import LCMScheduler

    accepted = inspect.signature(LCMScheduler.__init__).parameters
    keep = {k: v for k, v in scheduler_config.items() if k in accepted}  # the teacher's betas and prediction type
    return LCMScheduler.from_config({
        **keep, "original_inference_steps": keep.get("num_train_timesteps", 1000), "timestep_scaling": 1e4, "clip_sample": False,
        "thresholding": False, "rescale_betas_zero_snr": False, "steps_offset": 1, "timestep_spacing": "leading",  # LCM ignores the offset; SD pipelines want 1
    })  # fmt: skip


TEXT_TO_IMAGE_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline", "StableDiffusion3Pipeline", "FluxPipeline")  # what a text-to-image export is written as
FLOW_PIPELINES = ("StableDiffusion3Pipeline", "FluxPipeline")  # their generator is transformer/, on the flow parametrisation


def flow_export_scheduler(scheduler_config: dict, num_steps: int):
    """A diffusers FlowMatchEulerDiscreteScheduler whose steps at the generator's levels are its sampler (docs/math.md §14).

    The teacher's config without its shift (shift 1, no dynamic shifting), so the levels a call passes as
    ``sigmas=[...]`` are used as they are, and one inference step runs at s = 1: the step x + (0 - s) v = z - v(z, 1)
    is G(z). A k-step generator's scheduler samples stochastically: each step takes x0 = x - s v and re-noises it,
    (1 - s') x0 + s' eps, as DMD2's k-step sampler does; the last returns x0. The SD3 and Flux pipelines pass no
    generator to the scheduler's step, so eps comes from torch's global generator (``torch.manual_seed``)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    keep = {k: v for k, v in scheduler_config.items() if not k.startswith("_")}
    return FlowMatchEulerDiscreteScheduler.from_config({**keep, "shift": 1.0, "use_dynamic_shifting": False, "stochastic_sampling": num_steps > 1})


def null_components(folder: str) -> dict:
    """The components model_index.json saves as [null, null] (SD3 without T5: text_encoder_3, tokenizer_3), as None
    for ``from_pretrained``: diffusers loads such a folder only when told so."""
    import json

    index = json.loads(open(f"{folder}/model_index.json").read())
    return {k: None for k, v in index.items() if not k.startswith("_") and v == [None, None]}


def text_to_image_pipeline(folder: str, **kwargs):
    """The diffusers pipeline class model_index.json names (one of TEXT_TO_IMAGE_PIPELINES), loaded from ``folder``."""
    import json

    import diffusers

    name = json.loads(open(f"{folder}/model_index.json").read()).get("_class_name")
    if name not in TEXT_TO_IMAGE_PIPELINES:
        raise ValueError(f"{folder}/model_index.json names {name!r}, not one of {TEXT_TO_IMAGE_PIPELINES}")
    return getattr(diffusers, name).from_pretrained(folder, **null_components(folder), **kwargs)


def stable_diffusion_latents_to_file(
    export_dir: str, prompts_json: str, seed: int, out_file: str, timesteps: list[int] | None = None, extra: dict | None = None
) -> None:
    """Plain diffusers: ``StableDiffusionPipeline.from_pretrained(export)(prompts, num_inference_steps=1,
    guidance_scale=1, latents=z)`` latents for noise (seed, i), written to ``out_file`` (.npy). A k-step
    export runs ``timesteps=...`` with ``generator=torch.Generator().manual_seed(seed)`` for the later noise (a flow
    one ``sigmas=...`` after ``torch.manual_seed(seed)``).
    The pipeline class is the one the export's model_index.json names (SD, SDXL, SD3, Flux); ``extra``: more call
    arguments (SDXL's original_size, crops_coords_top_left, target_size when not the defaults; SD3's and Flux's
    height, width and, for a k-step or s* < 1 generator, sigmas). Flux's latents go in packed and come out
    unpacked by the pipeline's own static methods.

    Run in a fresh process by the export stage's parity check.
    """
    import json

    pipe = text_to_image_pipeline(export_dir)
    pipe.set_progress_bar_config(disable=True)
    prompts = json.loads(open(prompts_json).read())
    extra = dict(extra or {})
    name = type(pipe).__name__
    if name in FLOW_PIPELINES:  # the model space the generator was distilled in (denoiser.json beside it)
        shape = tuple(json.loads(open(f"{export_dir}/transformer/denoiser.json").read())["image_shape"])
    else:
        u = pipe.unet.config
        shape = (u.in_channels, u.sample_size, u.sample_size)
    z = sample_noise(seed, range(len(prompts)), shape)
    latents = pipe._pack_latents(z, len(z), *shape) if name == "FluxPipeline" else z
    if timesteps:
        steps = {"timesteps": timesteps, "generator": torch.Generator().manual_seed(seed)}
    elif "sigmas" in extra:  # the pipelines pass no generator to FlowMatchEuler's stochastic steps: they draw from torch's global one
        steps = {}
        torch.manual_seed(seed)
    else:
        steps = {"num_inference_steps": 1}
    with torch.no_grad():
        out = pipe(prompts, latents=latents, guidance_scale=1.0, output_type="latent", **steps, **extra).images
    if name == "FluxPipeline":
        out = pipe._unpack_latents(out, extra["height"], extra["width"], pipe.vae_scale_factor)
    np.save(out_file, out.cpu().numpy(), allow_pickle=False)
