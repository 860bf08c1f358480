"""Teacher denoisers: x0 ("mean") predictors around any diffusers UNet.

Three parametrisations share one calling convention, ``den(x_t, level, class_labels, guidance_scale)``
returning x0 (docs/math.md §2, §3, §14):
- ``EDMDenoiser``: VE, alpha = 1, ``level`` is sigma; EDM preconditioning (Karras et al. 2022, Table 1).
- ``VPDenoiser``: DDPM / Stable Diffusion, ``level`` is the integer timestep t; alpha_t, sigma_t from
  the scheduler's alphas_cumprod; epsilon / v / sample predictions converted to x0.
- ``FlowDenoiser``: rectified flow (SD3, Flux), ``level`` is s in [0, 1], x_s = (1 - s) x0 + s eps; the
  network predicts v = eps - x0 at timestep s * num_train_timesteps; x0 = x_s - s v.
Classifier-free guidance is applied on the x0 prediction: mu_uncond + g * (mu_cond - mu_uncond).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .rows import PromptRows

Tensor = torch.Tensor


def edm_precond(sigma: Tensor, sigma_data: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """EDM preconditioning (Karras et al. 2022, Table 1; docs/math.md §2): c_skip, c_out, c_in, c_noise."""
    sd2 = sigma_data**2
    c_skip = sd2 / (sigma**2 + sd2)
    c_out = sigma * sigma_data / (sigma**2 + sd2).sqrt()
    c_in = 1 / (sigma**2 + sd2).sqrt()
    c_noise = sigma.log() / 4
    return c_skip, c_out, c_in, c_noise


def cfg_combine(uncond: Tensor, cond: Tensor, guidance_scale: float) -> Tensor:
    """Classifier-free guidance: mu_uncond + g * (mu_cond - mu_uncond) (docs/math.md §3)."""
    return uncond + guidance_scale * (cond - uncond)


def _per_sample(value: float | Tensor, batch: int, device: torch.device) -> Tensor:
    """A float or (batch,) tensor as a float64 (batch,) tensor on ``device``. A Python number is filled on
    the device: ``as_tensor`` would copy it from host memory, and that copy makes the host wait for the GPU."""
    if not isinstance(value, Tensor):
        return torch.full((batch,), value, dtype=torch.float64, device=device)
    v = value.to(device, torch.float64)
    return v.expand(batch) if v.ndim == 0 else v.reshape(batch)


PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


@dataclass(frozen=True)
class Parametrization:
    """The small JSON (``denoiser.json``) saved beside a model's ``save_pretrained`` files."""

    kind: str  # "edm" | "vp" | "flow"
    num_classes: int = 0  # 0 = unconditional
    null_class: int | None = None  # label of the "no class" embedding used for CFG
    sigma_min: float = 0.002  # EDM
    sigma_max: float = 80.0  # EDM
    sigma_data: float = 0.5  # EDM
    prediction_type: str = "epsilon"  # VP: epsilon | v_prediction | sample
    image_shape: tuple[int, int, int] | None = None  # (C, H, W) of model space
    data_range: tuple[float, float] = (-1.0, 1.0)
    text_conditioned: bool = False  # UNet2DConditionModel on prompt embeddings (Stable Diffusion layout)
    one_step_timestep: int | None = None  # VP and flow one-step generators: t* of G(z) = x0(z, t*); None = T - 1
    generator_timesteps: tuple[int, ...] | None = None  # k-step generators (DMD2): t_0 > t_1 > ... in [1, 999]
    # SDXL's micro-conditioning (added_cond_kwargs["time_ids"]): original (h, w), crop top-left (y, x), target (h, w)
    add_time_ids: tuple[int, ...] | None = None
    # flow (kind "flow", docs/math.md §14): the timestep shift of the scheduler config, under diffusers'
    # FlowMatchEulerDiscreteScheduler names; written to denoiser.json for flow models only (FLOW_FIELDS)
    shift: float = 1.0  # static: s' = shift s / (1 + (shift - 1) s)
    use_dynamic_shifting: bool = False  # Flux: s' = exp(mu) / (exp(mu) + 1/s - 1), mu from the image sequence length
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096
    image_seq_len: int | None = None  # tokens mu is computed for; None: (H/2)(W/2) of image_shape (Flux's 2x2 packing)
    num_train_timesteps: int = 1000  # the network's timestep input is s * num_train_timesteps
    guidance_embeds: bool = False  # guidance is an input of the network (Flux-dev), not CFG

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d["image_shape"] = list(self.image_shape) if self.image_shape else None
        d["data_range"] = list(self.data_range)
        if self.kind != "flow":  # denoiser.json of EDM and VP models stays as it was
            for key in FLOW_FIELDS:
                del d[key]
        if self.generator_timesteps is None:
            del d["generator_timesteps"]  # denoiser.json of one-step generators stays as it was
        else:
            d["generator_timesteps"] = list(self.generator_timesteps)
        if self.add_time_ids is None:
            del d["add_time_ids"]  # only networks with SDXL's size conditioning write it
        else:
            d["add_time_ids"] = list(self.add_time_ids)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Parametrization":
        """Validate a parsed ``denoiser.json`` (types and ranges; ValueError naming the field and the fix)."""
        if not isinstance(d, dict):
            raise ValueError(f'must be a JSON object, got {type(d).__name__}. Fix: write it as e.g. {{"kind": "edm", "num_classes": 10, "null_class": 10}}')
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown keys {sorted(unknown)}; expected a subset of {sorted(known)}. Fix: remove or correct them")
        d = dict(d)
        if d.get("kind") not in KINDS:
            raise ValueError(
                f'kind must be \'edm\' or \'vp\' (diffusion) or \'flow\' (rectified flow), got {d.get("kind")!r}. '
                'Fix: set "kind" to "edm" (VE, sigma levels), "vp" (DDPM timesteps) or "flow" (x_s = (1 - s) x0 + s eps, v prediction)'
            )
        stray = sorted(k for k in FLOW_FIELDS if k in d) if d["kind"] != "flow" else []
        if stray:
            raise ValueError(f"{', '.join(stray)} set a flow model's timestep shift; this model is {d['kind']!r}. Fix: remove them")
        if d.get("prediction_type", "epsilon") not in PREDICTION_TYPES:
            raise ValueError(
                f"prediction_type must be one of {', '.join(PREDICTION_TYPES)} (diffusers' names), got {d['prediction_type']!r}. "
                "Fix: use the one the model was trained with (the scheduler config's)"
            )
        _validate_fields(d)
        if d.get("image_shape") is not None:
            d["image_shape"] = tuple(d["image_shape"])
        if d.get("add_time_ids") is not None:
            d["add_time_ids"] = tuple(d["add_time_ids"])
        if "data_range" in d:
            d["data_range"] = tuple(d["data_range"])
        t = d.get("one_step_timestep")
        if t is not None and (d["kind"] == "edm" or not isinstance(t, int) or not 0 < t < 1000):
            raise ValueError(f"one_step_timestep must be an integer in [1, 999] of a VP or flow model, got {t!r} (kind {d['kind']!r})")
        ts = d.get("generator_timesteps")
        if ts is not None:
            if not isinstance(ts, (list, tuple)):
                raise ValueError(f"generator_timesteps must be a list of integers, got {ts!r}")
            d["generator_timesteps"] = ts = tuple(ts)
            # EDM starts at sigma_max (999), VP at its t*, flow at its one_step_timestep (default 999: s = 1)
            first = 999 if d["kind"] == "edm" else t if t is not None or d["kind"] == "vp" else 999
            if not ts or any(not isinstance(v, int) or not 0 < v < 1000 for v in ts) or list(ts) != sorted(set(ts), reverse=True) or ts[0] != first:
                raise ValueError(
                    f"generator_timesteps must be decreasing integers in [1, 999] starting at {first} "
                    f"({'sigma_max' if d['kind'] == 'edm' else 'one_step_timestep'}), got {list(ts)}"
                )
        return cls(**d)


KINDS = ("edm", "vp", "flow")
# The flow-only fields of Parametrization, in denoiser.json of flow models only.
FLOW_FIELDS = (
    "shift", "use_dynamic_shifting", "base_shift", "max_shift", "base_image_seq_len", "max_image_seq_len", "image_seq_len",
    "num_train_timesteps", "guidance_embeds",
)  # fmt: skip


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)  # JSON true is not a count


def _is_number(v) -> bool:
    # json.loads accepts NaN and Infinity: a finite value is what the preconditioning needs
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _bad(key: str, want: str, got, fix: str | None = None) -> ValueError:
    default = Parametrization.__dataclass_fields__[key].default
    fix = fix or f'set "{key}" to {want}' + (f", or remove it for the default {json.dumps(default)}" if default is not None else "")
    return ValueError(f"{key} must be {want}, got {json.dumps(got, default=repr)}. Fix: {fix}")


def _validate_fields(d: dict) -> None:
    """Types and ranges of the fields a hand-written denoiser.json may get wrong (the rest: from_dict)."""
    for key in ("sigma_min", "sigma_max", "sigma_data"):
        if key in d and not (_is_number(d[key]) and d[key] > 0):
            raise _bad(key, "a finite number > 0", d[key])
    lo, hi = d.get("sigma_min", 0.002), d.get("sigma_max", 80.0)
    if not lo < hi:
        raise ValueError(f"sigma_max ({hi}) must be greater than sigma_min ({lo}). Fix: set them to the model's noise range, e.g. 0.002 and 80 (EDM)")
    num_classes = d.get("num_classes", 0)
    if not (_is_int(num_classes) and num_classes >= 0):
        raise _bad("num_classes", "an integer >= 0", num_classes, 'set "num_classes" to the number of classes the model was trained on (0: unconditional)')
    null = d.get("null_class")
    if null is not None and not (_is_int(null) and 0 <= null <= num_classes):
        raise _bad("null_class", f"null or an integer in [0, num_classes={num_classes}]", null,
                   f'set "null_class" to the label of the "no class" embedding (usually num_classes, {num_classes}), or null')  # fmt: skip
    shape = d.get("image_shape")
    if shape is not None and not (isinstance(shape, (list, tuple)) and len(shape) == 3 and all(_is_int(v) and v > 0 for v in shape)):
        fix = 'set "image_shape" to the model space, e.g. [1, 8, 8], or null to read it from config.json'
        raise _bad("image_shape", "[C, H, W]: 3 positive integers", shape, fix)
    rng = d.get("data_range", (-1.0, 1.0))
    if not (isinstance(rng, (list, tuple)) and len(rng) == 2 and all(_is_number(v) for v in rng) and rng[0] < rng[1]):
        raise _bad("data_range", "[low, high] with low < high", rng)
    if not isinstance(d.get("text_conditioned", False), bool):
        raise _bad("text_conditioned", "true or false", d["text_conditioned"])
    ids = d.get("add_time_ids")
    if ids is not None and not (isinstance(ids, (list, tuple)) and len(ids) == 6 and all(_is_int(v) and v >= 0 for v in ids)):
        fix = 'set "add_time_ids" to [original_h, original_w, crop_top, crop_left, target_h, target_w] (SDXL), or remove it'
        raise _bad("add_time_ids", "6 integers >= 0", ids, fix)
    _validate_flow_fields(d)


def _validate_flow_fields(d: dict) -> None:
    """The flow shift settings: positive numbers and counts, flags as booleans."""
    for key in ("shift", "base_shift", "max_shift"):
        if key in d and not (_is_number(d[key]) and (d[key] > 0 or key != "shift")):
            raise _bad(key, "a finite number" + (" > 0" if key == "shift" else ""), d[key])
    for key in ("base_image_seq_len", "max_image_seq_len", "num_train_timesteps"):
        if key in d and not (_is_int(d[key]) and d[key] > 0):
            raise _bad(key, "an integer > 0", d[key])
    if d.get("image_seq_len") is not None and not (_is_int(d["image_seq_len"]) and d["image_seq_len"] > 0):
        raise _bad("image_seq_len", "null or an integer > 0", d["image_seq_len"])
    if d.get("base_image_seq_len", 256) >= d.get("max_image_seq_len", 4096):
        raise ValueError("base_image_seq_len must be below max_image_seq_len (the dynamic shift interpolates between them). Fix: use the scheduler config's values")
    for key in ("use_dynamic_shifting", "guidance_embeds"):
        if not isinstance(d.get(key, False), bool):
            raise _bad(key, "true or false", d[key])


class Denoiser(nn.Module):
    """Shared CFG logic; subclasses implement ``_x0(x, level, class_labels, **cond)``.

    Text-conditioned models take prompt indices as their labels: index i is row i of their prompt rows
    (``set_prompts``: a ``PromptRows``, read by index from disk or held in memory), whose last row, the
    empty prompt, is the "null class" of CFG (dmd_core.text). ``text_kwargs`` turns a batch of rows into
    the UNet's keyword arguments (a layout with pooled embeddings or micro-conditioning sets its own).
    """

    def __init__(self, unet: nn.Module, param: Parametrization):
        super().__init__()
        self.unet = unet
        self.param = param
        self.prompts: PromptRows | None = None
        self.text_kwargs: Callable[[dict[str, Tensor]], dict] = text_kwargs_for(param)
        # diffusers' guidance_rescale (Lin et al. 2023, §3.4): guided predictions rescaled towards the
        # conditional one's spread; 0 = plain CFG. A teacher setting (teacher.guidance_rescale).
        self.guidance_rescale = 0.0

    def set_param(self, param: Parametrization) -> None:
        """Another parametrisation of the same network (e.g. the configured SDXL size conditioning)."""
        self.param, self.text_kwargs = param, text_kwargs_for(param)

    def set_prompts(self, rows: PromptRows | Tensor) -> None:
        """Prompt rows (or an (N + 1, L, D) table of embeddings, the empty prompt's last); labels then index them."""
        if not self.param.text_conditioned:
            raise ValueError("set_prompts: this denoiser is not text-conditioned")
        self.prompts = rows if isinstance(rows, PromptRows) else PromptRows({"hidden": rows})

    @property
    def num_classes(self) -> int:
        if self.param.text_conditioned:
            if self.prompts is None:
                raise ValueError("a text-conditioned denoiser needs its prompts first (set_prompts)")
            return len(self.prompts) - 1
        return self.param.num_classes

    @property
    def null_class(self) -> int | None:
        return self.num_classes if self.param.text_conditioned else self.param.null_class

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    def _labels(self, class_labels: Tensor | None, batch: int, device: torch.device) -> Tensor | None:
        if self.num_classes == 0:
            return None
        if class_labels is None:  # unconditional prediction of a conditional model
            return torch.full((batch,), self.null_class, dtype=torch.long, device=device)
        return class_labels.to(device=device, dtype=torch.long).reshape(batch)

    def forward(
        self,
        x: Tensor,
        level: float | Tensor,
        class_labels: Tensor | None = None,
        guidance_scale: float = 1.0,
        **cond,
    ) -> Tensor:
        """x0 prediction for noisy ``x`` at noise ``level`` (sigma for EDM, timestep for VP, s for flow)."""
        n = x.shape[0]
        level = _per_sample(level, n, x.device)
        labels = self._labels(class_labels, n, x.device)
        if guidance_scale == 1.0 or labels is None:
            return self._x0(x, level, labels, **cond)
        if self.guidance_rescale:
            return self._rescaled_cfg(x, level, labels, guidance_scale, **cond)
        # Both branches in one batched call, as the reference implementations do.
        null = self._labels(None, n, x.device)
        both = self._x0(
            torch.cat([x, x]),
            torch.cat([level, level]),
            torch.cat([null, labels]),
            **{k: torch.cat([v, v]) for k, v in cond.items()},
        )
        uncond, conditional = both.chunk(2)
        return cfg_combine(uncond, conditional, guidance_scale)

    def _rescaled_cfg(self, x: Tensor, level: Tensor, labels: Tensor, guidance_scale: float, **cond) -> Tensor:
        raise ValueError("guidance_rescale works on a VP model's prediction (epsilon or v); this is an EDM denoiser")

    def prompt_kwargs(self, labels: Tensor) -> dict:
        """The UNet's text inputs for prompt indices ``labels``, on their device in the UNet's dtype."""
        rows = {k: v.to(device=labels.device, dtype=self.dtype) for k, v in self.prompts.rows(labels).items()}
        return self.text_kwargs(rows)

    def _unet(self, x: Tensor, t: Tensor, labels: Tensor | None, **cond) -> Tensor:
        kwargs = dict(cond)
        if self.param.text_conditioned:
            kwargs.update(self.prompt_kwargs(labels))
        elif labels is not None:
            kwargs["class_labels"] = labels
        out = self.unet(x.to(self.dtype), t, **kwargs, return_dict=False)[0]
        # A learned-variance network (DiT) gives the mean and the variance channels; the ODE reads the mean, the first half.
        return out[:, : x.shape[1]] if out.shape[1] == 2 * x.shape[1] else out


def hidden_states_kwargs(rows: dict[str, Tensor]) -> dict:
    """SD 1.x/2.x: the token embeddings are the cross-attention's ``encoder_hidden_states``."""
    return {"encoder_hidden_states": rows["hidden"]}


class TextTimeKwargs:
    """SDXL: the token embeddings, and ``added_cond_kwargs`` of the pooled embedding and the size conditioning
    (``time_ids``: original size, crop top-left, target size), as ``StableDiffusionXLPipeline`` passes them.
    A small class rather than a closure: networks holding it are deep-copied and pickled."""

    def __init__(self, add_time_ids: tuple[int, ...]):
        self.add_time_ids = tuple(int(v) for v in add_time_ids)

    def __call__(self, rows: dict[str, Tensor]) -> dict:
        hidden = rows["hidden"]
        if "pooled" not in rows:
            raise ValueError("an SDXL UNet needs the pooled prompt embeddings: these prompt rows have none (encode them with the SDXL layout's encoder)")
        ids = torch.tensor(self.add_time_ids, dtype=hidden.dtype, device=hidden.device).expand(len(hidden), -1)
        return {"encoder_hidden_states": hidden, "added_cond_kwargs": {"text_embeds": rows["pooled"], "time_ids": ids}}

    def __repr__(self) -> str:
        return f"TextTimeKwargs({self.add_time_ids})"


def text_kwargs_for(param: Parametrization) -> Callable[[dict[str, Tensor]], dict]:
    """The prompt rows -> UNet keywords of a parametrisation: SDXL's when it has size conditioning."""
    return hidden_states_kwargs if param.add_time_ids is None else TextTimeKwargs(param.add_time_ids)


def rescale_cfg(guided: Tensor, conditional: Tensor, rescale: float) -> Tensor:
    """diffusers' ``rescale_noise_cfg``: the guided prediction scaled to the conditional one's per-sample std,
    mixed with itself by ``rescale`` (Lin et al. 2023, §3.4)."""
    dims = list(range(1, guided.ndim))
    scaled = guided * (conditional.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return rescale * scaled + (1 - rescale) * guided


class EDMDenoiser(Denoiser):
    """D(x; sigma) = c_skip x + c_out F(c_in x, c_noise) (EDM, Eq. 7); alpha = 1."""

    @property
    def sigma_min(self) -> float:
        return self.param.sigma_min

    @property
    def sigma_max(self) -> float:
        return self.param.sigma_max

    @property
    def sigma_data(self) -> float:
        return self.param.sigma_data

    def _x0(self, x: Tensor, sigma: Tensor, labels: Tensor | None, **cond) -> Tensor:
        c_skip, c_out, c_in, c_noise = (c.reshape(-1, 1, 1, 1) for c in edm_precond(sigma, self.sigma_data))
        f = self._unet(c_in * x, c_noise.flatten().to(torch.float32), labels, **cond)
        return (c_skip * x + c_out * f.to(torch.float64)).to(x.dtype)


class VPDenoiser(Denoiser):
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps; the network predicts eps, v or x0."""

    def __init__(self, unet: nn.Module, param: Parametrization, alphas_cumprod: Tensor, scheduler_config: dict):
        super().__init__(unet, param)
        self.register_buffer("alphas_cumprod", alphas_cumprod.to(torch.float64), persistent=False)
        self.scheduler_config = dict(scheduler_config)

    @property
    def num_train_timesteps(self) -> int:
        return self.alphas_cumprod.shape[0]

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t) at integer timesteps t."""
        abar = self.alphas_cumprod.to(t.device)[t.long()]
        return abar.sqrt(), (1 - abar).sqrt()

    def model_output(
        self,
        x: Tensor,
        t: float | Tensor,
        class_labels: Tensor | None = None,
        guidance_scale: float = 1.0,
        *,
        prediction_type: str | None = None,
        **cond,
    ) -> Tensor:
        """The guided prediction as ``prediction_type`` (default: the network's own) says: epsilon, v or x0.

        CFG on the raw output equals CFG on x0: the map between them is affine in the output with
        coefficients that do not depend on the condition.
        """
        t = _per_sample(t, x.shape[0], x.device)
        alpha, sigma = self.alpha_sigma(t)
        x0 = self.forward(x, t, class_labels, guidance_scale, **cond)
        a, s = alpha.reshape(-1, 1, 1, 1), sigma.reshape(-1, 1, 1, 1)
        xd = x.to(torch.float64)
        x0 = x0.to(torch.float64)
        kind = prediction_type or self.param.prediction_type
        if kind == "epsilon":
            out = (xd - a * x0) / s
        elif kind == "v_prediction":  # v = alpha eps - sigma x0, eps = (x - alpha x0) / sigma
            out = a * (xd - a * x0) / s - s * x0
        elif kind == "sample":
            out = x0
        else:
            raise ValueError(f"unknown prediction_type {kind!r}")
        return out.to(x.dtype)

    def _x0(self, x: Tensor, t: Tensor, labels: Tensor | None, **cond) -> Tensor:
        return self._out_to_x0(x, t, self._unet(x, t.long(), labels, **cond))

    def _rescaled_cfg(self, x: Tensor, t: Tensor, labels: Tensor, guidance_scale: float, **cond) -> Tensor:
        """CFG with guidance_rescale as diffusers' pipelines do it: on the network's own output (epsilon or v),
        where the std is taken; the rescale is not affine, so it does not commute with the map to x0."""
        null = self._labels(None, len(x), x.device)
        both = self._unet(torch.cat([x, x]), torch.cat([t, t]).long(), torch.cat([null, labels]), **{k: torch.cat([v, v]) for k, v in cond.items()})
        uncond, conditional = both.to(torch.float64).chunk(2)
        guided = rescale_cfg(cfg_combine(uncond, conditional, guidance_scale), conditional, self.guidance_rescale)
        return self._out_to_x0(x, t, guided)

    def _out_to_x0(self, x: Tensor, t: Tensor, out: Tensor) -> Tensor:
        """x0 from the network's output (epsilon, v or x0) at timesteps ``t``."""
        alpha, sigma = (v.reshape(-1, 1, 1, 1) for v in self.alpha_sigma(t))
        out = out.to(torch.float64)
        xd = x.to(torch.float64)
        kind = self.param.prediction_type
        if kind == "epsilon":  # x0 = (x - sigma eps) / alpha
            x0 = (xd - sigma * out) / alpha
        elif kind == "v_prediction":  # x0 = alpha x - sigma v
            x0 = alpha * xd - sigma * out
        elif kind == "sample":
            x0 = out
        else:
            raise ValueError(f"unknown prediction_type {kind!r}")
        return x0.to(x.dtype)


class FlowDenoiser(Denoiser):
    """Rectified flow (SD3, Flux; docs/math.md §14): x_s = (1 - s) x0 + s eps with s in [0, 1]; the network
    predicts v = eps - x0 at timestep s * num_train_timesteps (diffusers' FlowMatch schedulers' convention),
    so x0 = x_s - s v.

    CFG is applied on x0 as for the others; it equals CFG on v (what the diffusers pipelines guide), since
    v = (x_s - x0) / s is affine in x0 with coefficients that do not depend on the condition. A model with
    ``guidance_embeds`` (Flux-dev) takes the guidance scale as an input instead: one call, the scale passed
    as the keyword ``guidance`` (a (batch,) float32 tensor) that its layout's ``_unet`` hands to the network.
    """

    def forward(self, x: Tensor, level: float | Tensor, class_labels: Tensor | None = None, guidance_scale: float = 1.0, **cond) -> Tensor:
        if self.param.guidance_embeds:
            guidance = torch.full((x.shape[0],), float(guidance_scale), dtype=torch.float32, device=x.device)
            return super().forward(x, level, class_labels, 1.0, guidance=guidance, **cond)
        return super().forward(x, level, class_labels, guidance_scale, **cond)

    def velocity(self, x: Tensor, s: float | Tensor, class_labels: Tensor | None = None, guidance_scale: float = 1.0, **cond) -> Tensor:
        """The guided v = (x - x0) / s (float64 arithmetic, returned in x's dtype): what the flow ODE dx/ds = v steps on."""
        s = _per_sample(s, x.shape[0], x.device)
        x0 = self.forward(x, s, class_labels, guidance_scale, **cond)
        return ((x.to(torch.float64) - x0.to(torch.float64)) / s.reshape(-1, 1, 1, 1)).to(x.dtype)

    def sigmas(self, steps: int) -> Tensor:
        """The solvers' levels s_0 = 1 > ... > s_{N-1} and a final 0, float64: the scheduler's ``set_timesteps(steps)``
        (SD3's pipeline); a layout whose pipeline passes its own sigmas (Flux) overrides this."""
        return flow_sampling_sigmas(self.param, steps)

    def _x0(self, x: Tensor, s: Tensor, labels: Tensor | None, **cond) -> Tensor:
        # float32 timesteps, as the scheduler's sigmas * num_train_timesteps are
        v = self._unet(x, (s * self.param.num_train_timesteps).to(torch.float32), labels, **cond)
        return (x.to(torch.float64) - s.reshape(-1, 1, 1, 1) * v.to(torch.float64)).to(x.dtype)


# ---------------------------------------------------------------- the flow timestep shift (diffusers' functions)

# Scheduler settings this project does not follow: a model that uses them is refused, not sampled otherwise.
FLOW_UNSUPPORTED = {
    "shift_terminal": None, "invert_sigmas": False, "use_karras_sigmas": False, "use_exponential_sigmas": False,
    "use_beta_sigmas": False, "stochastic_sampling": False, "time_shift_type": "exponential",
}  # fmt: skip


def flow_fields(scheduler_config: dict) -> dict:
    """The Parametrization fields of a FlowMatchEulerDiscreteScheduler (or Heun) config (for ``Parametrization(kind=
    "flow", **flow_fields(cfg), ...)``); ValueError naming a setting the project does not follow."""
    for key, plain in FLOW_UNSUPPORTED.items():
        if scheduler_config.get(key) not in (None, plain, 0):  # absent, the default, or 0 (no terminal stretch)
            raise ValueError(
                f"the scheduler config sets {key}={scheduler_config[key]!r}; the project samples and distils flow models with "
                f"{key}={plain!r} only. Fix: use a model whose scheduler does not set it"
            )
    names = ("shift", "use_dynamic_shifting", "base_shift", "max_shift", "base_image_seq_len", "max_image_seq_len", "num_train_timesteps")
    fields = {k: scheduler_config[k] for k in names if scheduler_config.get(k) is not None}
    if "shift" in fields:
        fields["shift"] = float(fields["shift"])
    return fields


def flow_image_seq_len(param: Parametrization) -> int:
    """The image tokens the dynamic shift is computed for: ``image_seq_len``, else (H/2)(W/2), Flux's 2x2 packing."""
    if param.image_seq_len is not None:
        return param.image_seq_len
    if param.image_shape is None:
        raise ValueError("a dynamically shifted flow model needs image_shape or image_seq_len to compute its shift")
    _, h, w = param.image_shape
    return (h // 2) * (w // 2)


def flow_mu(param: Parametrization) -> float | None:
    """mu of the dynamic shift (diffusers' ``calculate_shift``, as FluxPipeline calls it); None for a static shift."""
    if not param.use_dynamic_shifting:
        return None
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    return calculate_shift(flow_image_seq_len(param), param.base_image_seq_len, param.max_image_seq_len, param.base_shift, param.max_shift)


def flow_scheduler(param: Parametrization):
    """diffusers' FlowMatchEulerDiscreteScheduler of a flow parametrisation."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    keys = ("num_train_timesteps", "shift", "use_dynamic_shifting", "base_shift", "max_shift", "base_image_seq_len", "max_image_seq_len")
    return FlowMatchEulerDiscreteScheduler(**{k: getattr(param, k) for k in keys})


def shift_sigmas(param: Parametrization, s: Tensor) -> Tensor:
    """The shifted levels of unshifted ``s`` in (0, 1], float64: static s' = shift s / (1 + (shift - 1) s), the formula
    the scheduler applies inline; dynamic: the scheduler's own ``time_shift(mu, 1, s)`` = e^mu / (e^mu + 1/s - 1)."""
    s = s.to(torch.float64)
    mu = flow_mu(param)
    if mu is None:
        return param.shift * s / (1 + (param.shift - 1) * s)
    return flow_scheduler(param).time_shift(mu, 1.0, s)


def flow_training_sigmas(param: Parametrization, n: int) -> Tensor:
    """n levels shift(i / n), i = 1..n, smallest first, float64: the scheduler's training sigmas when n is its
    num_train_timesteps (its ``sigmas`` at construction, largest first, under the static shift)."""
    return shift_sigmas(param, torch.arange(1, n + 1, dtype=torch.float64) / n)


def flow_sampling_sigmas(param: Parametrization, steps: int, base: list[float] | None = None) -> Tensor:
    """A flow sampler's levels (``steps`` of them, then 0), float64: the scheduler's ``set_timesteps(steps)``, or
    ``set_timesteps(sigmas=base)`` for a pipeline that passes unshifted sigmas of its own (Flux: linspace(1, 1/N, N))."""
    sched = flow_scheduler(param)
    sched.set_timesteps(None if base is not None else steps, sigmas=base, mu=flow_mu(param))
    return sched.sigmas.to(torch.float64)


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """EDM's noise levels, largest first (Karras et al. 2022, Eq. 5), float64, length n."""
    i = torch.arange(n, dtype=torch.float64)
    inv = 1.0 / rho
    if n == 1:
        return torch.tensor([sigma_max], dtype=torch.float64)
    return (sigma_max**inv + i / (n - 1) * (sigma_min**inv - sigma_max**inv)) ** rho

