"""A diffusers ``StableDiffusion3Pipeline`` folder (SD3, SD3.5): a latent, prompt-conditioned flow teacher.

``model_index.json``, ``transformer/`` (an SD3Transformer2DModel: the MMDiT, on the VAE's latents), ``scheduler/``
(a FlowMatchEulerDiscreteScheduler: the timestep shift), ``vae/`` (an AutoencoderKL with ``scaling_factor`` and
``shift_factor``), two CLIP text encoders with projection (``text_encoder/``, ``text_encoder_2/`` and their
tokenizers) and an optional T5 (``text_encoder_3/``, ``tokenizer_3/``; saved as null, the pipeline puts zeros in
its place). As ``StableDiffusion3Pipeline.encode_prompt`` computes them: the token embeddings are both CLIP
encoders' penultimate hidden states side by side, zero-padded to T5's width, followed by T5's 256 tokens; the
pooled embedding is the two projected CLIP outputs side by side. CFG's unconditional row is the empty prompt's
(the pipeline's ``negative_prompt=""``), and CFG is on the velocity, which equals CFG on x0.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Callable

import torch

from ..denoisers import Denoiser, Parametrization, flow_fields
from ..errors import InputError, shown
from ..text import PromptEncoder
from .common import PARAM_FILE, PIPELINE_INDEX, RESAVE, SCHEDULER_FILE, TEXT_WEIGHTS_FILE, WEIGHTS_FILE, check_components, is_int, named
from .common import pipeline_index, read_json
from .mmdit import flow_denoiser
from .sd_pipeline import StableDiffusionLayout, _check_part, _positive_number, load_model, load_text_part

Tensor = torch.Tensor
CLIP_PARTS = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
T5_PARTS = ("text_encoder_3", "tokenizer_3")
PARTS = ("transformer", "scheduler", "vae", *CLIP_PARTS, *T5_PARTS)
OPTIONAL_PARTS = ("image_encoder", "feature_extractor")  # IP-Adapter inputs, [null, null] as save_pretrained writes them
MAX_SEQUENCE_LENGTH = 256  # StableDiffusion3Pipeline's max_sequence_length: the T5 tokens of every prompt
FLOW_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler")


class StableDiffusion3Layout(StableDiffusionLayout):
    name = "sd3_pipeline"
    description = (
        "a diffusers StableDiffusion3Pipeline folder (SD3/SD3.5: model_index.json, transformer/, scheduler/, vae/, text_encoder/, "
        "text_encoder_2/, tokenizer/, tokenizer_2/, text_encoder_3/ and tokenizer_3/ or null)"
    )
    pipeline_class = "StableDiffusion3Pipeline"
    transformer_class = "SD3Transformer2DModel"
    text_parts_required = CLIP_PARTS

    @property
    def classes(self) -> tuple[str, str]:
        """The pipeline and its img2img sibling (e.g. FluxImg2ImgPipeline): the same folder, saved through either."""
        return (self.pipeline_class, self.pipeline_class.replace("Pipeline", "Img2ImgPipeline"))

    @property
    def save_hint(self) -> str:
        return f"{self.pipeline_class}.save_pretrained(dir)"

    def matches_unnamed(self, folder: Path, index: dict) -> bool:
        # SD3 without T5 names the parts Flux names, so the transformer's class decides
        return named(index, "transformer") and _config_class(folder / "transformer" / "config.json") == self.transformer_class

    # ------------------------------------------------------------ parametrisation

    def parametrization(self, folder: Path) -> Parametrization:
        index = read_json(folder / PIPELINE_INDEX, "pipeline index")
        self.check_parts(folder, index)
        check_components(folder, index)
        tr_file = folder / "transformer" / "config.json"
        tr = read_json(tr_file, "transformer config")
        if tr.get("_class_name") != self.transformer_class:
            raise InputError(
                f"{tr_file} names {shown(tr.get('_class_name'), 60)}, but a {self.pipeline_class} folder's transformer is a {self.transformer_class}. "
                f"Fix: save the whole pipeline together ({self.save_hint})."
            )
        fields = self.schedule(folder)
        shape = self.image_shape(folder, tr)
        self.check_widths(folder, index, tr)
        return Parametrization(kind="flow", text_conditioned=True, image_shape=shape, **fields, **self.network_fields(folder, tr, shape, fields))

    def schedule(self, folder: Path) -> dict:
        """The flow fields of the folder's FlowMatch scheduler config (the shift), checked."""
        sched_file = folder / "scheduler" / SCHEDULER_FILE
        sched = read_json(sched_file, "scheduler config")
        if sched.get("_class_name", FLOW_SCHEDULERS[0]) not in FLOW_SCHEDULERS:
            raise InputError(
                f"{sched_file} names {shown(sched.get('_class_name'), 60)}: a {self.pipeline_class} is a flow-matching model, sampled with "
                f"{' or '.join(FLOW_SCHEDULERS)}. Fix: save the pipeline with the scheduler it was released with."
            )
        try:
            fields = flow_fields(sched)
        except ValueError as e:
            raise InputError(f"{sched_file}: {e}.") from None
        steps = fields.get("num_train_timesteps", 1000)
        if not (is_int(steps) and steps > 0) or not _positive_number(fields.get("shift", 1.0)):
            raise InputError(f"{sched_file}: num_train_timesteps must be an integer > 0 and shift a number > 0. {RESAVE}")
        return fields

    def network_fields(self, folder: Path, tr: dict, shape: tuple[int, int, int], fields: dict) -> dict:
        """The parametrisation's fields the transformer decides: the image tokens of a dynamic shift, as the pipeline
        counts them ((H / patch) x (W / patch))."""
        if not fields.get("use_dynamic_shifting"):
            return {}
        p = self.patch(tr)
        return {"image_seq_len": (shape[1] // p) * (shape[2] // p)}

    def default_shape(self, folder: Path, tr: dict) -> tuple[int, int, int]:
        """The pipeline's default size: the transformer's sample_size, its in_channels."""
        c, size = tr.get("in_channels", 16), tr.get("sample_size", 128)
        if not (is_int(c) and c > 0 and is_int(size) and size > 0):
            raise InputError(f"{folder / 'transformer' / 'config.json'}: in_channels and sample_size must be integers > 0. {RESAVE}")
        return (c, size, size)

    def patch(self, tr: dict) -> int:
        """Latent sides must be multiples of this."""
        p = tr.get("patch_size", 2)
        return p if is_int(p) and p > 0 else 2

    def max_side(self, tr: dict) -> int | None:
        """The largest latent side the network's position embeddings cover (None: no limit)."""
        m = tr.get("pos_embed_max_size")
        return m * self.patch(tr) if is_int(m) else None

    def image_shape(self, folder: Path, tr: dict) -> tuple[int, int, int]:
        """C x H x W of model space at the pipeline's default size (``configure`` applies ``teacher.image_size``). The
        folder is read as it was saved: a ``denoiser.json`` beside model_index.json is refused, not ignored."""
        path = folder / PARAM_FILE
        if path.is_file():
            _, f = self.vae_geometry(folder)
            _, h, w = self.default_shape(folder, tr)
            raise InputError(
                f"{path} sits beside {folder / PIPELINE_INDEX}: a {self.pipeline_class} folder is read as it was saved, and the size to "
                f"distil at is a setting. Fix: remove {path.name} and set teacher.image_size: [height, width] in pixels (default [{h * f}, {w * f}])."
            )
        return self.default_shape(folder, tr)

    def configure(self, folder: Path, param: Parametrization, sizes: dict) -> Parametrization:
        """``param`` at ``teacher.image_size`` [H, W] (pixels, the pipeline's height and width): latents C x H/f x W/f
        (f the VAE's factor) and the dynamic shift's tokens counted on them; SDXL's size settings are refused."""
        self.refuse_sizes(folder, sizes, ("image_size",))
        if "image_size" not in sizes:
            return param
        tr = read_json(folder / "transformer" / "config.json", "transformer config")
        shape = self.sized_shape(folder, tr, tuple(int(v) for v in sizes["image_size"]))
        return dataclasses.replace(param, image_shape=shape, **self.network_fields(folder, tr, shape, {"use_dynamic_shifting": param.use_dynamic_shifting}))

    def sized_shape(self, folder: Path, tr: dict, size: tuple[int, int]) -> tuple[int, int, int]:
        """The latents of ``size`` (H, W) pixels: each side a multiple of the VAE's factor x the patch (the pipeline's
        own check), within the position embeddings; InputError naming the nearest sizes that fit."""
        c = self.default_shape(folder, tr)[0]
        _, f = self.vae_geometry(folder)
        step, top = f * self.patch(tr), self.max_side(tr)
        biggest = top * f if top is not None else None
        said = f"teacher.image_size {list(size)}"
        if biggest is not None and max(size) > biggest:
            raise InputError(
                f"{said} is larger than {folder / 'transformer' / 'config.json'}'s position embeddings cover: at most {biggest} pixels a side "
                f"(pos_embed_max_size {tr['pos_embed_max_size']} x patch {self.patch(tr)} x the VAE's factor {f}). Fix: set it to at most [{biggest}, {biggest}]."
            )
        if any(v % step for v in size):
            lower = [max(step, v // step * step) for v in size]
            upper = [-(-v // step) * step if biggest is None else min(-(-v // step) * step, biggest) for v in size]
            near = str(lower) if lower == upper else f"{lower} or {upper}"
            raise InputError(
                f"{said}: each side must be a multiple of {step} pixels (the VAE's factor {f} x the latent patch {self.patch(tr)}). "
                f"Fix: use the nearest size that fits, {near}."
            )
        return (c, size[0] // f, size[1] // f)

    def check_parts(self, folder: Path, index: dict) -> None:
        needed = ("transformer", "scheduler", "vae", *self.text_parts_required)
        missing = [part for part in needed if not named(index, part) or not (folder / part).is_dir()]
        if missing:
            raise InputError(f"{folder} is a {self.pipeline_class} folder without {', '.join(p + '/' for p in missing)}. Fix: save the whole pipeline ({self.save_hint}).")
        if named(index, "text_encoder_3") != named(index, "tokenizer_3") or any(named(index, p) and not (folder / p).is_dir() for p in T5_PARTS):
            raise InputError(
                f"{folder / PIPELINE_INDEX}: text_encoder_3 and tokenizer_3 (T5) come together, both folders present, or both null "
                f"(the pipeline then puts zeros in T5's place). Fix: save the whole pipeline ({self.save_hint})."
            )

    def check_widths(self, folder: Path, index: dict, tr: dict) -> None:
        """The transformer reads what the encoders and the VAE give (else a matmul fails mid-sampling): the CLIP states
        (both side by side) no wider than joint_attention_dim, T5's as wide, the pooled embedding the two projections
        side by side, the VAE's latent channels."""
        tr_file = folder / "transformer" / "config.json"
        enc1, enc2 = (read_json(folder / p / "config.json", f"{p} config") for p in ("text_encoder", "text_encoder_2"))
        joint, pooled = tr.get("joint_attention_dim"), tr.get("pooled_projection_dim")
        h1, h2, p1, p2 = enc1.get("hidden_size"), enc2.get("hidden_size"), enc1.get("projection_dim"), enc2.get("projection_dim")
        same = "Fix: use the text encoders the transformer was trained with (save the whole pipeline together)."
        if all(is_int(v) for v in (h1, h2, joint)) and h1 + h2 > joint:
            raise InputError(f"{tr_file} has joint_attention_dim {joint}, narrower than the CLIP encoders' hidden sizes {h1} + {h2} = {h1 + h2} "
                             f"(they are padded to it). {same}")  # fmt: skip
        if all(is_int(v) for v in (p1, p2, pooled)) and p1 + p2 != pooled:
            raise InputError(f"{tr_file} has pooled_projection_dim {pooled} but the CLIP encoders' projection_dim are {p1} + {p2} = {p1 + p2}. {same}")
        if named(index, "text_encoder_3"):
            d = read_json(folder / "text_encoder_3" / "config.json", "text_encoder_3 config").get("d_model")
            if is_int(d) and is_int(joint) and d != joint:
                raise InputError(f"{folder / 'text_encoder_3' / 'config.json'} has d_model {d} but {tr_file} has joint_attention_dim {joint}. {same}")
        self.check_vae(folder, tr, tr_file)

    def check_vae(self, folder: Path, tr: dict, tr_file: Path, per_channel: int = 1) -> None:
        """The VAE's latents are what the transformer denoises (``per_channel`` input channels per latent channel)."""
        vae_file = folder / "vae" / "config.json"
        vae = read_json(vae_file, "vae config")
        latent, channels, out = vae.get("latent_channels"), tr.get("in_channels"), tr.get("out_channels")
        if is_int(latent) and is_int(channels) and latent * per_channel != channels:
            raise InputError(
                f"{vae_file} has latent_channels {latent} but {tr_file} has in_channels {channels}"
                f"{f' ({per_channel} per latent channel)' if per_channel > 1 else ''}. Fix: use the VAE the transformer was trained with (save the whole pipeline together)."
            )
        if is_int(out) and is_int(channels) and out != channels:
            raise InputError(f"{tr_file} has out_channels {out} but in_channels {channels}: a flow model predicts a velocity of its input's shape. {RESAVE}")
        shift = vae.get("shift_factor")
        if shift is not None and not (isinstance(shift, (int, float)) and not isinstance(shift, bool) and math.isfinite(shift)):
            raise InputError(f"{vae_file}: shift_factor must be a finite number or null, got {json.dumps(shift)}. {RESAVE}")

    def weight_parts(self, folder: Path) -> tuple[tuple[str, str], ...]:
        text = ("text_encoder", "text_encoder_2", *(("text_encoder_3",) if named(pipeline_index(folder) or {}, "text_encoder_3") else ()))
        return (("transformer", WEIGHTS_FILE), ("vae", WEIGHTS_FILE), *((p, TEXT_WEIGHTS_FILE) for p in text))

    def load_denoiser(self, folder: Path, device: str | torch.device = "cpu") -> Denoiser:
        """``transformer/`` as the layout's ``transformer_class`` (the class parametrization checked the config names)."""
        import diffusers

        param = self.parametrization(folder)
        variant = self.weights_variant(folder)
        net = load_model(_check_part(folder, "transformer", WEIGHTS_FILE, variant), getattr(diffusers, self.transformer_class), variant)
        return flow_denoiser(net, param).requires_grad_(False).to(device)

    # ------------------------------------------------------------ prompts

    def text_parts(self, folder: Path) -> tuple[str, ...]:
        # without T5 the pipeline's zeros are joint_attention_dim wide: the transformer config then shapes the rows
        t5 = T5_PARTS if named(pipeline_index(folder) or {}, "text_encoder_3") else ("transformer/config.json",)
        return (*CLIP_PARTS, *t5)

    def prompt_encoder(self, folder: Path, device: str | torch.device = "cpu") -> "SD3PromptEncoder":
        """The two CLIP tokenizers and encoders and T5's, when present (frozen, float32), the classes model_index.json names."""
        index = read_json(folder / PIPELINE_INDEX, "pipeline index")
        variant = self.weights_variant(folder)
        clips = [load_text_part(folder, index, tok, enc, variant, device) for tok, enc in (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"))]
        for (_, enc), part in zip(clips, ("text_encoder", "text_encoder_2")):
            if not hasattr(enc, "text_projection"):
                raise InputError(f"{folder / PIPELINE_INDEX} names {part} without a projection: SD3's pooled embedding is both CLIP encoders' "
                                 f'projected outputs. Fix: name it ["transformers", "CLIPTextModelWithProjection"], as SD3 saves it.')  # fmt: skip
        t5 = load_text_part(folder, index, "tokenizer_3", "text_encoder_3", variant, device) if named(index, "text_encoder_3") else (None, None)
        joint = read_json(folder / "transformer" / "config.json", "transformer config").get("joint_attention_dim", 4096)
        return SD3PromptEncoder([tok for tok, _ in clips], [enc for _, enc in clips], *t5, joint_width=joint)

    # ------------------------------------------------------------ the latent codec

    def pixel_decoder(
        self, folder: Path, device: str | torch.device = "cpu", gradient_checkpointing: bool = False, dtype: torch.dtype | None = None
    ) -> Callable[[Tensor], Tensor]:
        """latents -> images as the pipeline decodes them: ``vae.decode(latents / scaling_factor + shift_factor)``."""
        vae = self.decoding_vae(folder, device, gradient_checkpointing, dtype)
        scale, shift = vae.config.scaling_factor, vae.config.get("shift_factor") or 0.0

        def decode(latents: Tensor) -> Tensor:
            return vae.decode((latents / scale + shift).to(vae.dtype)).sample.float()

        return decode

    def pixel_encoder(self, folder: Path, device: str | torch.device = "cpu", batch_size: int = 64) -> Callable[[Tensor], Tensor]:
        """images in [-1, 1] -> latents: ``(mean of vae.encode - shift_factor) * scaling_factor`` (deterministic; SD3's
        img2img map on the mean), the VAE loaded once."""
        vae = self.load_vae(folder, device)
        scale, shift = vae.config.scaling_factor, vae.config.get("shift_factor") or 0.0

        @torch.no_grad()
        def encode(images: Tensor) -> Tensor:
            parts = [(vae.encode(images[s : s + batch_size].to(device)).latent_dist.mean - shift) * scale for s in range(0, len(images), batch_size)]
            return torch.cat(parts).float()

        return encode


def _config_class(path: Path) -> str | None:
    """A config file's _class_name, unchecked (for ``matches``, which never raises); None if unreadable."""
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, ValueError):
        return None
    return data.get("_class_name") if isinstance(data, dict) else None


class SD3PromptEncoder(PromptEncoder):
    """prompts -> {"hidden": (N, L1 + 256, D), "pooled": (N, P1 + P2)} as ``StableDiffusion3Pipeline.encode_prompt``
    computes them (clip_skip None, max_sequence_length 256): each CLIP tokenizer pads to the first one's max length,
    each CLIP encoder gives its penultimate hidden state and its projected output; the states side by side are
    zero-padded to T5's width D (joint_attention_dim) and followed, along the tokens, by T5's last hidden state of
    the prompt padded to 256 tokens (zeros when the pipeline has no T5); pooled: the two projections side by side."""

    def __init__(self, clip_tokenizers: list, clip_encoders: list, t5_tokenizer=None, t5_encoder=None, joint_width: int = 4096,
                 max_sequence_length: int = MAX_SEQUENCE_LENGTH, batch_size: int = 256):  # fmt: skip
        super().__init__(clip_tokenizers[0], clip_encoders[0], batch_size)
        self.clip_tokenizers, self.clip_encoders = clip_tokenizers, clip_encoders
        self.t5_tokenizer, self.t5_encoder = t5_tokenizer, t5_encoder
        self.joint_width, self.max_sequence_length = joint_width, max_sequence_length

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> dict[str, Tensor]:
        hidden, pooled = [], []
        for s in range(0, len(prompts), self.batch_size):
            h, p = self._encode(prompts[s : s + self.batch_size])
            hidden.append(h)
            pooled.append(p)
        return {"hidden": torch.cat(hidden), "pooled": torch.cat(pooled)}

    def _encode(self, batch: list[str]) -> tuple[Tensor, Tensor]:
        dev = next(self.clip_encoders[0].parameters()).device
        length = self.clip_tokenizers[0].model_max_length  # the pipeline's tokenizer_max_length, for both CLIP tokenizers
        states, pools = [], []
        for tokenizer, encoder in zip(self.clip_tokenizers, self.clip_encoders):
            ids = tokenizer(batch, padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids
            out = encoder(ids.to(dev), output_hidden_states=True)
            pools.append(out[0])
            states.append(out.hidden_states[-2])
        if self.t5_encoder is None:
            t5 = torch.zeros(len(batch), self.max_sequence_length, self.joint_width, device=dev, dtype=states[0].dtype)
        else:
            ids = self.t5_tokenizer(batch, padding="max_length", max_length=self.max_sequence_length, truncation=True,
                                    add_special_tokens=True, return_tensors="pt").input_ids  # fmt: skip
            t5 = self.t5_encoder(ids.to(next(self.t5_encoder.parameters()).device))[0].to(dev)
        clip = torch.cat(states, dim=-1)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return torch.cat([clip, t5], dim=-2), torch.cat(pools, dim=-1)
