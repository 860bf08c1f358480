"""The pipeline config: one YAML file, a section per stage, validated by pydantic (unknown keys rejected).

Relative paths inside a config file (``teacher.path``) are resolved against that file's directory;
``store`` and values given with ``--set`` are taken relative to the current directory.
"""

from __future__ import annotations

import re
import types
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator
from torch.onnx import _constants as onnx_constants

from dmd_core.dmd import VP_GENERATOR_TIMESTEP, DMDSettings
from dmd_core.errors import InputError, shown
from dmd_core.gan import GAN_WEIGHT_DISCRIMINATOR, GAN_WEIGHT_GENERATOR
from dmd_core.precision import Precision

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = PROJECT_ROOT / "data" / "digits.yaml"


# Far above any real run, low enough that a typo (an extra 0 or two) fails here, not as a MemoryError mid-stage.
MAX_COUNT = 10**9

# What a config file or a --set value may make the loader do (a config is a few KB and about 100 values):
MAX_CONFIG_BYTES = 2**20  # read no further: hundreds of times the largest config
MAX_YAML_NODES = 100_000  # values once aliases and merges are followed (an 8-level alias bomb of 460 bytes is 43 M)
MAX_YAML_DEPTH = 32  # levels, aliases followed; PyYAML's composer recurses per level and fails near 300
MAX_SCALAR_CHARS = 4096  # one value: PATH_MAX, the length of the longest setting (a path)
MAX_PROBLEMS = 5  # validation problems named on the error line; the rest are counted

# Bounds of the numeric settings, each from what the setting drives (README "Bounds" has the table). The ones that
# depend on the teacher or the machine (timesteps, memory of a batch) are stages.checks.check_limits', before any stage runs.
MAX_SOLVER_STEPS = 1000  # time: 2 network calls per Heun step per sample; EDM's schedules use 18-256, PNDM at most T
MAX_BATCH = 2**16  # memory: samples in one network call (DMD: 2048 over all processes); bounded again by the device's memory
MAX_GUIDANCE = 100.0  # uncond + s (cond - uncond) scales the difference s-fold: published scales are 1-15; 1e30 makes NaN
MAX_SEED = 2**63 - 1  # an int64 for every reader of the manifests (numpy, torch, JSON outside Python)
MAX_THREADS = 1024  # threads per process: more than any machine's cores; libgomp aborts the process near 10^5
MAX_WORKERS = 256  # loader processes: each a Python process of its own
MAX_LR = 1.0  # AdamW moves every weight by about lr per step: at 1 the teacher's weights are gone in one step
MAX_LOSS_WEIGHT = 1000.0  # a loss term's weight against the others (DMD: 0.25, 1; DMD2: 3e-3, 1e-2); past it the rest is noise
MAX_UPDATES = 100  # fake-score steps or micro-batches per generator step: each is a forward and backward (DMD2: 5)
MAX_IMAGE_SIDE = 4096  # pixels of a side: SDXL decodes 1024
MAX_GRAD_NORM = 1e6  # real gradient norms are far below: a larger value never clips (null turns clipping off)
MAX_KEPT = 1000  # checkpoints on disk: each holds both networks and their optimizer state
MAX_REPEATS = 100  # timed repeats of a speed batch: a median of more says nothing new
MAX_PARITY = 1024  # fixed inputs of the export checks, run as one batch in PyTorch, ONNX Runtime and a fresh process
MAX_OPSET = getattr(onnx_constants, "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", 20)  # what export's exporter (dynamo=False) writes
MAX_LORA_RANK = 4096  # a rank past a layer's width adds nothing (SD's widest layers are 5120 wide); each rank is r x (in + out) weights per layer
MAX_LORA_ALPHA = 1e4  # scale alpha / rank: published alphas are 1 to 2 x the rank


def _numbers_only(tp: Any) -> bool:
    """Whether an annotation takes only numbers: int / float, optionally None, or a tuple / list of them."""
    if tp in (int, float):
        return True
    origin, args = get_origin(tp), [a for a in get_args(tp) if a is not type(None) and a is not Ellipsis]
    if origin is Annotated:
        return _numbers_only(args[0])
    if origin in (Union, types.UnionType, tuple, list):
        return bool(args) and all(_numbers_only(a) for a in args)
    return False


def _has_bool(v: Any) -> bool:
    return isinstance(v, bool) or (isinstance(v, (list, tuple)) and any(isinstance(x, bool) for x in v))


class Section(BaseModel):
    # allow_inf_nan=False: `.inf` / `.nan` (YAML) or `inf` (--set) would pass every ge/gt bound and fail mid-run.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, v: Any, info: ValidationInfo) -> Any:
        # pydantic's lax mode reads true as 1: `--set generate.num_samples=true` would make one sample.
        if _has_bool(v) and _numbers_only(cls.model_fields[info.field_name].annotation):
            raise ValueError("expects a number, not true/false")
        return v


NAME_MAX, PATH_MAX = 255, 4096  # bytes of one file name and of a whole path (Linux): longer fails in every open()


def _not_empty(hint: str):
    """A path setting: not empty, and a path the file system can open (else an OSError mid-check)."""

    def check(v: str) -> str:
        if not v.strip():
            raise ValueError(f"must not be empty (an empty path is the current directory{hint})")
        if len(v.encode()) >= PATH_MAX or any(len(name.encode()) > NAME_MAX for name in v.split("/")):
            raise ValueError(f"is longer than a file system allows ({NAME_MAX} bytes a name, {PATH_MAX - 1} a path)")
        return v

    return AfterValidator(check)


PathStr = Annotated[str, _not_empty("")]
OptionalPathStr = Annotated[str, _not_empty("; null leaves it unset")]
Beta = Annotated[float, Field(ge=0, lt=1)]
Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]
Threads = Annotated[int, Field(gt=0, le=MAX_THREADS)]
# one bound for generate's and distill's guidance (stages.checks.check_guidance: a teacher with nothing to guide needs 1)
GuidanceScale = Annotated[float, Field(ge=0, le=MAX_GUIDANCE)]
ImageSide = Annotated[int, Field(gt=0, le=MAX_IMAGE_SIDE)]
CropOffset = Annotated[int, Field(ge=0, le=MAX_IMAGE_SIDE)]


class TeacherConfig(Section):
    path: PathStr = Field("teacher", description="denoiser directory (save_pretrained + denoiser.json) or cached HF repo id")
    variant: Literal["fp16", "bf16"] | None = Field(
        None, description="the weights save_pretrained(..., variant=...) wrote to read (upcast to float32); null: the plain ones, else the only variant"
    )
    # SDXL's size conditioning (add_time_ids), as StableDiffusionXLPipeline's call arguments of the same names
    original_size: tuple[ImageSide, ImageSide] | None = Field(None, description="SDXL teachers: original_size (h, w) of the size conditioning; null: the image's")
    crop_top_left: tuple[CropOffset, CropOffset] = Field((0, 0), description="SDXL teachers: crops_coords_top_left (top, left) of the size conditioning")
    target_size: tuple[ImageSide, ImageSide] | None = Field(None, description="SDXL teachers: target_size (h, w) of the size conditioning; null: the image's")
    # the pipelines' height and width; Layout.configure checks them against the VAE's factor and the transformer's patch
    image_size: tuple[ImageSide, ImageSide] | None = Field(
        None, description="SD3 and Flux teachers: (height, width) in pixels to distil at; null: the pipeline's default (SD3: sample_size x the VAE's factor, Flux: 1024)"
    )
    guidance_rescale: float = Field(
        0.0, ge=0, le=1, description="VP teachers: diffusers' guidance_rescale of every guided teacher call (0 = plain CFG), on the network's epsilon or v"
    )


class GenerateConfig(Section):
    num_samples: int = Field(2048, gt=0, le=MAX_COUNT, description="number of (noise, image) pairs")
    steps: int = Field(
        18, gt=0, le=MAX_SOLVER_STEPS, description="solver steps (Heun: 18 = 35 network evaluations; PNDM: 50, at most the teacher's T)"
    )
    solver: Literal["heun", "pndm", "euler"] = Field("heun", description="heun for EDM teachers, pndm for VP teachers, heun or euler for flow teachers")
    shard_size: int = Field(256, gt=0, le=MAX_COUNT, description="samples per WebDataset shard (built in memory: up to 3 at once)")
    batch_size: int = Field(128, gt=0, le=MAX_BATCH, description="samples per solver call (never crosses a shard)")
    seed: Seed = Field(0, description="noise of sample i is seeded by (seed, i)")
    dtype: Literal["float16", "float32"] = Field("float32", description="storage dtype of noise.npy and image.npy")
    guidance_scale: GuidanceScale = Field(1.0, description="classifier-free guidance of the teacher (1 = none)")
    precision: Precision = Field(
        "fp32", description="compute precision of the teacher's network calls (fp32: TF32 off; fp16 needs a GPU); the ODE state stays float64"
    )
    prompts: OptionalPathStr | None = Field(None, description="text-to-image teachers: a .parquet or text file of prompts; pair i uses prompt i mod N")
    prompt_column: str = Field("prompt", description="the prompt column of a Parquet prompt file")
    prompt_dtype: Literal["float32", "float16"] = Field(
        "float32", description="storage dtype of the prompt embeddings every stage reads from the store (float16 halves their size)"
    )
    num_threads: Threads | None = Field(None, description="torch threads per process (default: cores / processes); not part of the cache key")
    partitions: int = Field(
        1, gt=0, le=MAX_COUNT, description="contiguous shard ranges built apart (flow: one work-pool run each) and published once; not part of the cache key"
    )


class OptimizerConfig(Section):
    lr: float = Field(5e-5, gt=0, le=MAX_LR, description="AdamW learning rate")
    betas: tuple[Beta, Beta] = Field((0.9, 0.999), description="AdamW betas, each in [0, 1)")
    weight_decay: float = Field(0.01, ge=0, le=1, description="AdamW weight decay (each step multiplies the weights by 1 - lr x weight_decay)")

    @model_validator(mode="after")
    def _decay_below_one(self) -> "OptimizerConfig":
        if self.lr * self.weight_decay >= 1:
            decay = self.lr * self.weight_decay
            raise ValueError(f"lr x weight_decay = {decay:g} >= 1 zeroes (or flips) every weight each step. Fix: lower weight_decay")
        return self


class DistillConfig(Section):
    steps: int = Field(1000, gt=0, le=MAX_COUNT, description="generator updates")
    batch_size: int = Field(64, gt=0, le=MAX_BATCH, description="samples per process per step, for both loss terms")
    regression_loss: Literal["lpips", "pseudo_huber", "l2"] = Field("lpips", description="l in loss_reg = l(G(z_ref), y_ref)")
    regression_weight: float = Field(DMDSettings.regression_weight, ge=0, le=MAX_LOSS_WEIGHT, description="lambda_reg")
    dm_weight: float = Field(
        DMDSettings.dm_weight, ge=0, le=MAX_LOSS_WEIGHT, description="weight of the distribution matching loss (0: regression only, for ablations)"
    )
    lpips_net: Literal["vgg", "alex"] = Field("vgg", description="LPIPS backbone (weights from the torch hub cache)")
    lpips_resolution: int | None = Field(
        None, gt=0, le=MAX_IMAGE_SIDE, description="latent teachers: resize the VAE-decoded images to this size before LPIPS (less memory)"
    )
    guidance_scale: GuidanceScale = Field(DMDSettings.guidance_scale, description="classifier-free guidance of the real score")
    fake_updates_per_generator_update: int = Field(1, ge=1, le=MAX_UPDATES, description="fake-score steps per generator step (DMD2: 5)")
    gan: bool = Field(False, description="DMD2's GAN term: a classifier head on the fake score's bottleneck, real vs generated")
    gan_weight_generator: float = Field(
        GAN_WEIGHT_GENERATOR, ge=0, le=MAX_LOSS_WEIGHT, description="w_G of softplus(-D(G(z))) in the generator loss (DMD2: 3e-3)"
    )
    gan_weight_discriminator: float = Field(
        GAN_WEIGHT_DISCRIMINATOR, ge=0, le=MAX_LOSS_WEIGHT, description="w_D of the head's loss in the fake-score loss (DMD2: 1e-2)"
    )
    real_data: PathStr = Field(
        "digits", description="real images for the GAN term: 'digits' (embedded, with classes) or a WebDataset (.tar or dir) of images with cls / prompt.txt"
    )
    real_samples: int = Field(
        50_000, gt=0, le=MAX_COUNT, description="at most this many real images are used from a WebDataset real_data (encoded once into the store, read by index)"
    )
    generator_optimizer: OptimizerConfig = OptimizerConfig()
    fake_optimizer: OptimizerConfig = OptimizerConfig()
    warmup_steps: int = Field(0, ge=0, le=MAX_COUNT, description="linear learning-rate warm-up, both networks")
    max_grad_norm: float | None = Field(10.0, gt=0, le=MAX_GRAD_NORM, description="gradient clipping (None = off)")
    mixed_precision: Literal["no", "bf16", "fp16"] = Field("no", description="autocast precision (fp16 needs a GPU)")

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_no(cls, v):
        return "no" if v is False else v  # YAML 1.1 reads an unquoted `no` as false
    gradient_accumulation_steps: int = Field(1, ge=1, le=MAX_UPDATES, description="micro-batches per optimizer step")
    gradient_checkpointing: bool = Field(False, description="recompute activations in backward: generator, fake score and (LPIPS on decoded images) the VAE decoder")
    compile: bool = Field(False, description="torch.compile the generator's and the fake score's UNets (a GPU speed-up; minutes of compiling first)")
    frozen_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="dtype of the frozen networks' weights: real score and (latent teachers) VAE; float16 needs a GPU"
    )
    ema_decay: float = Field(0.0, ge=0, lt=1, description="EMA of the generator (0 = off)")
    t_min: float = Field(DMDSettings.t_min, ge=0, le=1, description="DM timesteps t ~ U[t_min T, t_max T]")
    t_max: float = Field(DMDSettings.t_max, ge=0, le=1, description="t_max = 1 reaches the noisiest level, T - 1")
    generator_timesteps: list[int] | None = Field(
        None, description="DMD2's k-step generator: decreasing timesteps in the teacher's T (e.g. [999, 749, 499, 249]); EDM starts at 999"
    )
    generator_timestep: int | None = Field(
        None, ge=1, le=999,  # denoiser.json's range; the teacher's own T - 1 is checked before any stage runs
        description=f"VP teachers: t* of G(z) = x0(z, t*), in [1, T - 1] of the teacher's T (default T/2: {VP_GENERATOR_TIMESTEP} of 1000); "
        "flow teachers: s* is the t*-th of the 1000 shifted levels (default 999: s* = 1)",
    )
    seed: Seed = Field(0)
    checkpoint_every: int = Field(500, gt=0, le=MAX_COUNT, description="steps between checkpoints (the data stream restarts there)")
    keep_checkpoints: int = Field(2, ge=1, le=MAX_KEPT, description="checkpoints kept on disk")
    sample_every: int = Field(500, gt=0, le=MAX_COUNT, description="steps between sample grids")
    log_every: int = Field(10, gt=0, le=MAX_COUNT, description="steps between metrics rows")
    shuffle_buffer: int = Field(1000, ge=1, le=MAX_COUNT, description="WebDataset shuffle buffer (samples, in memory)")
    num_workers: int = Field(0, ge=0, le=MAX_WORKERS, description="data loader worker processes")
    pairs: OptionalPathStr | None = Field(None, description="a generate output dir; default: the one this config's generate section makes")
    resume_from: OptionalPathStr | None = Field(None, description="checkpoint dir to continue from (e.g. to train longer); on an object store also by URL, <store>/distill/<key>/checkpoints/step-N")
    eval_every: int | None = Field(
        None, gt=0, le=MAX_COUNT,
        description="steps between quality probes (FD and class accuracy of a fixed sample, evaluate's features); keeps generator_best/",
    )
    eval_samples: int = Field(1000, gt=1, le=MAX_COUNT, description="samples of each quality probe (more than the feature dimension)")
    num_threads: Threads | None = Field(None, description="torch threads per process; not part of the cache key")
    # LoRA (peft): only the adapters train; both start from the teacher (B = 0). Keyed only when a rank is set.
    generator_lora_rank: int | None = Field(
        None, gt=0, le=MAX_LORA_RANK, description="LoRA rank of the generator's adapter (only the adapter trains); null: full fine-tune"
    )
    fake_lora_rank: int | None = Field(
        None, gt=0, le=MAX_LORA_RANK, description="LoRA rank of the fake score's adapter (B = 0: it starts as the teacher); null: full fine-tune"
    )
    lora_alpha: float | None = Field(None, gt=0, le=MAX_LORA_ALPHA, description="LoRA alpha of both adapters (the update is scaled by alpha / rank); null: the rank")
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the LoRA path in training (masks seeded by (seed, step, process): exact on resume)")
    lora_target_modules: list[str] | None = Field(
        None, description="regular expressions, each matching a dotted suffix of a Linear or Conv module's name (e.g. to_q, attentions\\..*); "
        "null: attention q/k/v/out, the transformer projections and feed-forward, the ResNet convs and time projections",
    )

    sharding: Literal["none", "fsdp"] = Field(
        "none", description="fsdp: the generator's and the fake score's weights, gradients and optimizer states split over the processes "
        "(torch FSDP2; the real score stays whole on each); none: each process holds them all (DDP). Not part of the cache key"
    )
    optimizer: Literal["adamw", "adamw8bit"] = Field(
        "adamw", description="adamw8bit: AdamW with 8-bit moments (bitsandbytes, CUDA only): 2 bytes of state per trained parameter instead of 8"
    )

    @model_validator(mode="after")
    def _rules_between_settings(self) -> "DistillConfig":
        # The rules that need no teacher; the ones that do (and the machine's) are the distill stage's check.
        if self.t_min >= self.t_max:
            raise ValueError(f"distill.t_min ({self.t_min}) must be below distill.t_max ({self.t_max}). Fix: lower t_min or raise t_max")
        if self.dm_weight == 0 and self.regression_weight == 0:
            raise ValueError("distill.dm_weight and distill.regression_weight are both 0: the generator would have no loss. Fix: set one above 0")
        ts, t = self.generator_timesteps, self.generator_timestep
        if ts and t is not None and ts[0] != t:
            raise ValueError(f"distill.generator_timesteps starts at {ts[0]} but distill.generator_timestep is {t}. Fix: drop one of them")
        self._lora_rules()
        self._sharding_rules()
        return self

    def _sharding_rules(self) -> None:
        """FSDP shards the generator and the fake score: not the networks outside them (the GAN head, the probe's
        copy), nor with compiling or fp16's loss scaling, which wrap them otherwise, nor under bitsandbytes' 8-bit
        AdamW, whose kernels take plain tensors, not FSDP's sharded ones."""
        if self.sharding != "fsdp":
            return
        for on, name in [(self.gan, "distill.gan"), (self.eval_every, "distill.eval_every"), (self.compile, "distill.compile"),
                         (self.mixed_precision == "fp16", "distill.mixed_precision=fp16"), (self.optimizer == "adamw8bit", "distill.optimizer=adamw8bit")]:  # fmt: skip
            if on:
                fix = {"fp16": "use distill.mixed_precision=bf16", "adamw8bit": "use distill.optimizer=adamw"}.get(name.split("=")[-1], f"drop {name}")
                raise ValueError(f"{name} does not run with distill.sharding=fsdp. Fix: {fix}, or distill.sharding=none")

    def _lora_rules(self) -> None:
        """The adapter's settings need a rank to apply to; target patterns must be regular expressions."""
        lora_only = [k for k in ("lora_alpha", "lora_target_modules") if getattr(self, k) is not None] + (["lora_dropout"] if self.lora_dropout else [])
        if lora_only and self.generator_lora_rank is None and self.fake_lora_rank is None:
            raise ValueError(f"distill.{lora_only[0]} is set but no LoRA rank is. Fix: set distill.generator_lora_rank or distill.fake_lora_rank, or drop distill.{lora_only[0]}")
        targets = self.lora_target_modules
        if targets is not None and not targets:
            raise ValueError("distill.lora_target_modules is empty. Fix: name the modules (e.g. [to_q, to_k, to_v, to_out.0]) or set null for the default")
        for pattern in targets or ():
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"distill.lora_target_modules: {shown(pattern, 80)} is not a regular expression ({e}). Fix: escape it or name the module plainly (e.g. to_q)") from None


class EvaluateConfig(Section):
    num_samples: int = Field(50_000, gt=1, le=MAX_COUNT, description="one-step samples (class-balanced labels)")
    batch_size: int = Field(500, gt=0, le=MAX_BATCH, description="samples per generator / feature batch")
    seed: Seed = Field(1234, description="noise of evaluation sample i is seeded by (seed, i)")
    features: Literal["inception", "digits"] = Field("inception", description="FID (Inception-v3) or FD-digits")
    classifier: OptionalPathStr | None = Field(None, description="digits classifier dir: FD-digits features and class accuracy")
    inception_weights: OptionalPathStr | None = Field(None, description="torch-fidelity Inception weights (default: torch hub cache)")
    reference: PathStr = Field("digits", description="'digits' (the real digits) or a .npz with mu and sigma")
    use_ema: bool = Field(True, description="evaluate generator_ema/ when the distill output has it")
    generator: Literal["final", "ema", "best"] | None = Field(
        None, description="which generator of the distill output: final, ema or best (distill.eval_every's best by FD); default: use_ema decides"
    )
    teacher_steps: int | None = Field(None, gt=0, le=MAX_SOLVER_STEPS, description="teacher solver steps (default: generate.steps)")
    precision: Precision = Field(
        "fp32", description="compute precision of the student's and the teacher's network calls (features stay fp32; fp16 needs a GPU)"
    )
    speed_batch_size: int = Field(256, gt=0, le=MAX_BATCH, description="batch for the images/s comparison")
    speed_repeats: int = Field(3, gt=0, le=MAX_REPEATS, description="timed repeats per sampler (after one warm-up)")
    distill: OptionalPathStr | None = Field(None, description="a distill output dir; default: the one this config makes")
    prompts: OptionalPathStr | None = Field(None, description="text-to-image teachers: held-out prompts (.parquet or text); sample i uses prompt i mod N")
    prompt_column: str = Field("prompt", description="the prompt column of a Parquet prompt file")
    prompt_labels: str | None = Field(None, description="a Parquet column with each prompt's class (e.g. the digit it names), for the accuracy")
    clip_model: OptionalPathStr | None = Field(None, description="text-to-image: a local CLIP model directory (CLIPModel + CLIPProcessor) for the CLIP score; nothing is downloaded")
    num_threads: Threads | None = Field(None, description="torch threads per process; not part of the cache key")

    @model_validator(mode="after")
    def _clip_needs_prompts(self) -> "EvaluateConfig":
        if self.clip_model and not self.prompts:
            raise ValueError("evaluate.clip_model scores images against their prompts: set evaluate.prompts (text-to-image teachers)")
        return self


class ExportConfig(Section):
    onnx: bool = Field(True, description="also write generator.onnx (checked against PyTorch with onnxruntime)")
    opset: int = Field(17, ge=13, le=MAX_OPSET, description="ONNX opset of generator.onnx (the highest torch.onnx's TorchScript exporter writes)")
    parity_samples: int = Field(16, gt=0, le=MAX_PARITY, description="fixed inputs of the ONNX and fresh-process parity checks")
    onnx_tolerance: float = Field(1e-4, gt=0, lt=1, description="largest accepted max|ONNX - PyTorch| / max|PyTorch| on the fixed inputs")
    # the promotion gate (stages/promotion.py): not in export's key, an export is the same whatever gates it
    promote_if: str | None = Field(None, description="quality gate against the last promoted export of this teacher and pipeline, "
                                   "e.g. 'fd_ratio <= 1.1 * promoted' (evaluate metrics, promoted, + - * /, comparisons, and/or/not); null: always promote")
    pipeline: str = Field("default", description="the pipeline's name for promotion and run history: exports are compared with the promoted export of the same teacher and pipeline")
    on_not_promoted: Literal["complete", "fail"] = Field("complete", description="a flow run whose export is not promoted ends Completed with a "
                                                         "'not promoted' artifact (complete) or Failed, named 'Not promoted' (fail)")

    @field_validator("promote_if")
    @classmethod
    def _gate_parses(cls, v: str | None) -> str | None:
        from .gate import parse

        if v is not None:
            try:
                parse(v)
            except InputError as e:
                raise ValueError(e.detail) from None
        return v

    @field_validator("pipeline")
    @classmethod
    def _plain_pipeline(cls, v: str) -> str:
        from .gate import PIPELINE_NAME

        if not PIPELINE_NAME.match(v):
            raise ValueError("must be 1-64 letters, digits, '.', '_' or '-', not starting with '.' or '-' (it names folders of records)")
        return v


class PipelineConfig(Section):
    store: PathStr = Field("runs/store", description="where stage outputs live")
    teacher: TeacherConfig = TeacherConfig()
    generate: GenerateConfig = GenerateConfig()
    distill: DistillConfig = DistillConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    export: ExportConfig = ExportConfig()


def _format_validation(e: ValidationError) -> str:
    """The first MAX_PROBLEMS problems, each value shown bounded, then how many more: one readable line."""
    errors = e.errors()
    lines = []
    for err in errors[:MAX_PROBLEMS]:
        field = shown(".".join(str(p) for p in err["loc"]), 100).strip("'\"") or "(top level)"
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"].removeprefix("Value error, ")
        if err["type"] == "missing" or (err["type"] == "value_error" and isinstance(err.get("input"), dict)):
            lines.append(f"{field}: {msg}")  # a whole section's rule: its values would not fit on the one line
        else:
            lines.append(f"{field}: {msg} (got {shown(err.get('input'), 80)})")
    if len(errors) > MAX_PROBLEMS:
        lines.append(f"... and {len(errors) - MAX_PROBLEMS} more")
    return "; ".join(lines)


# (section, key) of config values that are paths, resolved against the config file's directory.
RELATIVE_PATHS = [
    ("teacher", "path"), ("generate", "prompts"), ("evaluate", "prompts"),
    ("evaluate", "classifier"), ("evaluate", "inception_weights"), ("evaluate", "reference"), ("evaluate", "clip_model"),
]  # fmt: skip
YAML11_BOOL_WORDS = {"yes", "no", "on", "off", "y", "n"}


class _DuplicateKey(yaml.constructor.ConstructorError):
    pass


class _Unbounded(Exception):
    """A YAML document past the loader's bounds: what is wrong, where (a mark), and the fix."""

    def __init__(self, problem: str, mark, fix: str):
        super().__init__(problem)
        self.problem, self.mark, self.fix = problem, mark, fix


PLAIN_TAGS = {f"tag:yaml.org,2002:{t}" for t in ("str", "int", "float", "bool", "null", "timestamp", "seq", "map", "merge")}
EXPANDS = f"expands (through aliases and merges) to more than {MAX_YAML_NODES} values"
TOO_DEEP = f"is nested deeper than {MAX_YAML_DEPTH} levels"
FLATTEN = "Fix: write the values out; an anchor may share a few settings (e.g. an optimizer section), not multiply them."
UNNEST = "Fix: remove the extra nesting (a setting sits at most 4 levels down, e.g. distill.generator_optimizer.betas)."


def _tag(tag: str) -> str:
    return shown(tag.replace("tag:yaml.org,2002:", "!!"), 80)


def _check_graph(root) -> None:
    """Refuse a composed document that expands past MAX_YAML_NODES values or MAX_YAML_DEPTH levels once its
    aliases and merges are followed, refers to itself, holds a value over MAX_SCALAR_CHARS, or carries a tag that
    is not a plain value (``!!python/...``, ``!!binary``, ``!!set``). Each node is walked once (its expanded size
    remembered), so the check costs what the text costs, never what it would expand to."""
    seen: dict[int, tuple[int, int]] = {}  # id(node) -> (values once expanded, levels below it)
    open_nodes: set[int] = set()

    def walk(node, depth: int) -> tuple[int, int]:
        if depth > MAX_YAML_DEPTH:
            raise _Unbounded(f"a value {TOO_DEEP} (aliases followed)", node.start_mark, UNNEST)
        if id(node) in seen:
            size, height = seen[id(node)]
            if depth + height > MAX_YAML_DEPTH:
                raise _Unbounded(f"a value {TOO_DEEP} (aliases followed)", node.start_mark, UNNEST)
            return size, height
        if id(node) in open_nodes:
            raise _Unbounded("an alias refers to itself: the value that holds it (an endless value)", node.start_mark,
                             "Fix: point the alias at an anchor defined outside the value.")  # fmt: skip
        if node.tag not in PLAIN_TAGS:
            raise _Unbounded(f"the tag {_tag(node.tag)} is not allowed (a config holds plain strings, numbers, booleans, lists "
                             "and mappings)", node.start_mark, "Fix: remove the tag (quote the value if it is text).")  # fmt: skip
        if isinstance(node, yaml.ScalarNode):
            if len(node.value) > MAX_SCALAR_CHARS:
                raise _Unbounded(f"a value of {len(node.value)} characters (the longest a setting takes is a path: {MAX_SCALAR_CHARS})",
                                 node.start_mark, "Fix: shorten it (a long list of prompts belongs in a prompt file).")  # fmt: skip
            seen[id(node)] = (1, 0)
            return 1, 0
        children = node.value if isinstance(node, yaml.SequenceNode) else [n for pair in node.value for n in pair]
        open_nodes.add(id(node))
        size, height = 1, 0
        for child in children:
            s, h = walk(child, depth + 1)
            size, height = size + s, max(height, h + 1)
            if size > MAX_YAML_NODES:
                raise _Unbounded(f"a value {EXPANDS}", node.start_mark, FLATTEN)
        open_nodes.discard(id(node))
        seen[id(node)] = (size, height)
        return size, height

    walk(root, 1)


class UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping, and any document past the bounds above.

    PyYAML has no option for either: SafeLoader silently keeps the last value, so a second ``generate:``
    section would quietly replace the first; and it builds whatever aliases expand to.
    """

    depth = 0

    def compose_node(self, parent, index):
        # Counted before recursing: PyYAML's composer recurses per level (a RecursionError near 300 levels).
        self.depth += 1
        try:
            if self.depth > MAX_YAML_DEPTH:
                raise _Unbounded(f"a value {TOO_DEEP}", self.peek_event().start_mark, UNNEST)
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def construct_document(self, node):
        _check_graph(node)  # composed, not yet built: the bounds hold before anything expands
        return super().construct_document(node)

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` merges; later keys may override it
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.setdefault(key, key_node.start_mark)
                except TypeError:  # unhashable key: SafeLoader's own error follows
                    continue
                if first is not key_node.start_mark:
                    raise _DuplicateKey("first given", first, f"duplicate key {shown(key, 60)}", key_node.start_mark)
        return super().construct_mapping(node, deep)


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=UniqueKeyLoader)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``section.key=value`` -> (["section", "key"], value parsed as YAML scalar), within the config file's bounds."""
    said = f"--set {shown(text, 80)}"
    if len(text) > MAX_CONFIG_BYTES:
        raise InputError(f"{said}: {len(text)} characters, over the {MAX_CONFIG_BYTES} bytes a whole config may have. Fix: shorten the value.")
    if "=" not in text:
        raise InputError(f"{said}: expected section.key=value. Fix: e.g. --set generate.num_samples=512")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise InputError(f"{said}: empty key part. Fix: write section.key=value, e.g. --set generate.num_samples=512")
    if len(parts) > MAX_YAML_DEPTH:
        raise InputError(f"{said}: the key {TOO_DEEP}. {UNNEST}")
    if raw.strip().lower() in YAML11_BOOL_WORDS:  # `--set distill.mixed_precision=no` means the string "no"
        return parts, raw.strip()
    try:
        value = _load_yaml(raw) if raw.strip() else ""
    except _DuplicateKey as e:
        raise InputError(f"{said}: {e.problem} in the value. Fix: give each key once") from None
    except _Unbounded as e:
        raise InputError(f"{said}: {e.problem}. {e.fix}") from None
    except yaml.YAMLError:
        value = raw  # not YAML: the text itself, bounded as a YAML value is
        if len(raw) > MAX_SCALAR_CHARS:
            longest = f"the longest a setting takes is a path: {MAX_SCALAR_CHARS}"
            raise InputError(f"{said}: a value of {len(raw)} characters ({longest}). Fix: shorten it.")
    return parts, value


def _where(second, first) -> str:
    """``line 6 (first given at line 4)``; with columns when both are on one line (a flow mapping)."""
    if second.line == first.line:
        return f"line {second.line + 1}, column {second.column + 1} (first given at column {first.column + 1})"
    return f"line {second.line + 1} (first given at line {first.line + 1})"


def _shown_path(path: Path) -> str:
    """A path for an error line: as it is, or cut when it is longer than any path a user types."""
    return str(path) if len(str(path)) <= 200 else shown(str(path), 200)


def _read_yaml(path: Path) -> dict:
    where = _shown_path(path)
    try:
        found = path.is_file()
    except OSError as e:  # e.g. a name longer than the file system allows
        raise InputError(f"config file {where} cannot be opened ({e.strerror}). Fix: pass an existing YAML file to --config.") from None
    if not found:
        raise InputError(f"config file not found: {where}. Fix: pass an existing YAML file to --config (or omit it for the embedded default).")
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)  # never more: the file may be anything, of any size
        if len(raw) > MAX_CONFIG_BYTES:
            raise InputError(
                f"config file {where} is larger than {MAX_CONFIG_BYTES} bytes; a pipeline config is a few KB. "
                "Fix: pass the pipeline's YAML config to --config (data/digits.yaml is an example)."
            )
        data = _load_yaml(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise InputError(
            f"config file {where} is not UTF-8 text (byte {e.object[e.start:e.start + 1]!r} at offset {e.start}). "
            "Fix: save it as UTF-8 (or pass the YAML file, not a binary one, to --config)."
        ) from None
    except OSError as e:
        raise InputError(f"config file {where} cannot be read ({e.strerror}). Fix: check its permissions.") from None
    except _DuplicateKey as e:
        raise InputError(
            f"config file {where}: {e.problem} at {_where(e.problem_mark, e.context_mark)}; "
            "YAML would silently keep only the last. Fix: keep one of them."
        ) from None
    except _Unbounded as e:
        raise InputError(f"config file {where}: {e.problem}, at line {e.mark.line + 1}. {e.fix}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = str(getattr(e, "problem", None) or e).splitlines()[0][:200]
        raise InputError(f"config file {where} is not valid YAML{at}: {problem}. Fix the syntax and retry.") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise InputError(
            f"config file {where} must be a mapping of sections (store, teacher, generate, ...), got {type(data).__name__}. "
            "Fix: start from data/digits.yaml."
        )
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> PipelineConfig:
    """Read the YAML (the embedded default when ``path`` is None), apply ``--set`` overrides, validate."""
    path = Path(path) if path is not None else DEFAULT_CONFIG
    data = _read_yaml(path)
    for section, key in RELATIVE_PATHS:
        node = data.get(section)
        if isinstance(node, dict) and isinstance(node.get(key), str) and node[key].strip():  # "" is refused below
            p = Path(node[key]).expanduser()
            if not p.is_absolute() and (path.parent / p).exists():
                node[key] = str((path.parent / p).resolve())
    for text in overrides:
        parts, value = parse_override(text)
        node = data
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                part = part if len(part) <= 60 else shown(part, 60)
                raise InputError(f"--set {shown(text, 80)}: {part} is not a section. Fix: set {part} itself, or a key of a section (README lists every key)")
        node[parts[-1]] = value
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as e:
        problems = _format_validation(e)
        # a rule between settings names its own fix
        fix = "" if "Fix:" in problems else " Fix: correct it in the YAML or with --set section.key=value (README lists every key)."
        raise InputError(f"invalid config ({_shown_path(path)}): {problems}.{fix}") from None


def dump_config(cfg: PipelineConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
