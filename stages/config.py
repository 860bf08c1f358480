"""The pipeline config: one YAML file, a section per stage, validated by pydantic (unknown keys rejected).

Relative paths inside a config file (``teacher.path``) are resolved against that file's directory;
``store`` and values given with ``--set`` are taken relative to the current directory.
"""

from __future__ import annotations

import types
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from dmd_core.dmd import VP_GENERATOR_TIMESTEP, DMDSettings
from dmd_core.errors import InputError
from dmd_core.gan import GAN_WEIGHT_DISCRIMINATOR, GAN_WEIGHT_GENERATOR
from dmd_core.precision import Precision

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = PROJECT_ROOT / "data" / "digits.yaml"


# Far above any real run, low enough that a typo (an extra 0 or two) fails here, not as a MemoryError mid-stage.
MAX_COUNT = 10**9


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


def _not_empty(hint: str):
    def check(v: str) -> str:
        if not v.strip():
            raise ValueError(f"must not be empty (an empty path is the current directory{hint})")
        return v

    return AfterValidator(check)


PathStr = Annotated[str, _not_empty("")]
OptionalPathStr = Annotated[str, _not_empty("; null leaves it unset")]
Beta = Annotated[float, Field(ge=0, lt=1)]


class TeacherConfig(Section):
    path: PathStr = Field("teacher", description="denoiser directory (save_pretrained + denoiser.json) or cached HF repo id")


class GenerateConfig(Section):
    num_samples: int = Field(2048, gt=0, le=MAX_COUNT, description="number of (noise, image) pairs")
    steps: int = Field(18, gt=0, description="solver steps (Heun: 18 = 35 network evaluations; PNDM: 50)")
    solver: Literal["heun", "pndm"] = Field("heun", description="heun for EDM teachers, pndm for VP teachers")
    shard_size: int = Field(256, gt=0, description="samples per WebDataset shard")
    batch_size: int = Field(128, gt=0, description="samples per solver call (never crosses a shard)")
    seed: int = Field(0, ge=0, description="noise of sample i is seeded by (seed, i)")
    dtype: Literal["float16", "float32"] = Field("float32", description="storage dtype of noise.npy and image.npy")
    guidance_scale: float = Field(1.0, ge=0, description="classifier-free guidance of the teacher (1 = none)")
    precision: Precision = Field(
        "fp32", description="compute precision of the teacher's network calls (fp32: TF32 off; fp16 needs a GPU); the ODE state stays float64"
    )
    prompts: OptionalPathStr | None = Field(None, description="text-to-image teachers: a .parquet or text file of prompts; pair i uses prompt i mod N")
    prompt_column: str = Field("prompt", description="the prompt column of a Parquet prompt file")
    num_threads: int | None = Field(
        None, gt=0, description="torch threads per process (default: cores / processes); not part of the cache key"
    )


class OptimizerConfig(Section):
    lr: float = Field(5e-5, gt=0, description="AdamW learning rate")
    betas: tuple[Beta, Beta] = Field((0.9, 0.999), description="AdamW betas, each in [0, 1)")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay")


class DistillConfig(Section):
    steps: int = Field(1000, gt=0, le=MAX_COUNT, description="generator updates")
    batch_size: int = Field(64, gt=0, description="samples per process per step, for both loss terms")
    regression_loss: Literal["lpips", "pseudo_huber", "l2"] = Field("lpips", description="l in loss_reg = l(G(z_ref), y_ref)")
    regression_weight: float = Field(DMDSettings.regression_weight, ge=0, description="lambda_reg")
    dm_weight: float = Field(DMDSettings.dm_weight, ge=0, description="weight of the distribution matching loss (0: regression only, for ablations)")
    lpips_net: Literal["vgg", "alex"] = Field("vgg", description="LPIPS backbone (weights from the torch hub cache)")
    lpips_resolution: int | None = Field(
        None, gt=0, description="latent teachers: resize the VAE-decoded images to this size before LPIPS (less memory)"
    )
    guidance_scale: float = Field(DMDSettings.guidance_scale, ge=0, description="classifier-free guidance of the real score")
    fake_updates_per_generator_update: int = Field(1, ge=1, description="fake-score steps per generator step (DMD2: 5)")
    gan: bool = Field(False, description="DMD2's GAN term: a classifier head on the fake score's bottleneck, real vs generated")
    gan_weight_generator: float = Field(GAN_WEIGHT_GENERATOR, ge=0, description="w_G of softplus(-D(G(z))) in the generator loss (DMD2: 3e-3)")
    gan_weight_discriminator: float = Field(GAN_WEIGHT_DISCRIMINATOR, ge=0, description="w_D of the head's loss in the fake-score loss (DMD2: 1e-2)")
    real_data: PathStr = Field(
        "digits", description="real images for the GAN term: 'digits' (embedded, with classes) or a WebDataset (.tar or dir) of images with cls / prompt.txt"
    )
    real_samples: int = Field(50_000, gt=0, description="at most this many real images are read (into memory) from a WebDataset real_data")
    generator_optimizer: OptimizerConfig = OptimizerConfig()
    fake_optimizer: OptimizerConfig = OptimizerConfig()
    warmup_steps: int = Field(0, ge=0, description="linear learning-rate warm-up, both networks")
    max_grad_norm: float | None = Field(10.0, gt=0, description="gradient clipping (None = off)")
    mixed_precision: Literal["no", "bf16", "fp16"] = Field("no", description="autocast precision (fp16 needs a GPU)")

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_no(cls, v):
        return "no" if v is False else v  # YAML 1.1 reads an unquoted `no` as false
    gradient_accumulation_steps: int = Field(1, ge=1, description="micro-batches per optimizer step")
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
        None, ge=1, le=999, description=f"VP teachers: t* of G(z) = x0(z, t*) (default {VP_GENERATOR_TIMESTEP}; DMD's is 999)"
    )
    seed: int = Field(0, ge=0)
    checkpoint_every: int = Field(500, gt=0, description="steps between checkpoints (the data stream restarts there)")
    keep_checkpoints: int = Field(2, ge=1, description="checkpoints kept on disk")
    sample_every: int = Field(500, gt=0, description="steps between sample grids")
    log_every: int = Field(10, gt=0, description="steps between metrics rows")
    shuffle_buffer: int = Field(1000, ge=1, description="WebDataset shuffle buffer (samples)")
    num_workers: int = Field(0, ge=0, description="data loader worker processes")
    pairs: OptionalPathStr | None = Field(None, description="a generate output dir; default: the one this config's generate section makes")
    resume_from: OptionalPathStr | None = Field(None, description="checkpoint dir to continue from (e.g. to train longer)")
    eval_every: int | None = Field(
        None, gt=0, description="steps between quality probes (FD and class accuracy of a fixed sample, evaluate's features); keeps generator_best/"
    )
    eval_samples: int = Field(1000, gt=1, description="samples of each quality probe (more than the feature dimension)")
    num_threads: int | None = Field(None, gt=0, description="torch threads per process; not part of the cache key")

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
        return self


class EvaluateConfig(Section):
    num_samples: int = Field(50_000, gt=1, le=MAX_COUNT, description="one-step samples (class-balanced labels)")
    batch_size: int = Field(500, gt=0, description="samples per generator / feature batch")
    seed: int = Field(1234, ge=0, description="noise of evaluation sample i is seeded by (seed, i)")
    features: Literal["inception", "digits"] = Field("inception", description="FID (Inception-v3) or FD-digits")
    classifier: OptionalPathStr | None = Field(None, description="digits classifier dir: FD-digits features and class accuracy")
    inception_weights: OptionalPathStr | None = Field(None, description="torch-fidelity Inception weights (default: torch hub cache)")
    reference: PathStr = Field("digits", description="'digits' (the real digits) or a .npz with mu and sigma")
    use_ema: bool = Field(True, description="evaluate generator_ema/ when the distill output has it")
    generator: Literal["final", "ema", "best"] | None = Field(
        None, description="which generator of the distill output: final, ema or best (distill.eval_every's best by FD); default: use_ema decides"
    )
    teacher_steps: int | None = Field(None, gt=0, description="teacher solver steps (default: generate.steps)")
    precision: Precision = Field(
        "fp32", description="compute precision of the student's and the teacher's network calls (features stay fp32; fp16 needs a GPU)"
    )
    speed_batch_size: int = Field(256, gt=0, description="batch for the images/s comparison")
    speed_repeats: int = Field(3, gt=0, description="timed repeats per sampler (after one warm-up)")
    distill: OptionalPathStr | None = Field(None, description="a distill output dir; default: the one this config makes")
    prompts: OptionalPathStr | None = Field(None, description="text-to-image teachers: held-out prompts (.parquet or text); sample i uses prompt i mod N")
    prompt_column: str = Field("prompt", description="the prompt column of a Parquet prompt file")
    prompt_labels: str | None = Field(None, description="a Parquet column with each prompt's class (e.g. the digit it names), for the accuracy")
    clip_model: OptionalPathStr | None = Field(None, description="text-to-image: a local CLIP model directory (CLIPModel + CLIPProcessor) for the CLIP score; nothing is downloaded")
    num_threads: int | None = Field(None, gt=0, description="torch threads per process; not part of the cache key")

    @model_validator(mode="after")
    def _clip_needs_prompts(self) -> "EvaluateConfig":
        if self.clip_model and not self.prompts:
            raise ValueError("evaluate.clip_model scores images against their prompts: set evaluate.prompts (text-to-image teachers)")
        return self


class ExportConfig(Section):
    onnx: bool = Field(True, description="also write generator.onnx (checked against PyTorch with onnxruntime)")
    opset: int = Field(17, ge=13, description="ONNX opset of generator.onnx")
    parity_samples: int = Field(16, gt=0, description="fixed inputs of the ONNX and fresh-process parity checks")
    onnx_tolerance: float = Field(1e-4, gt=0, description="largest accepted max|ONNX - PyTorch| / max|PyTorch| on the fixed inputs")


class PipelineConfig(Section):
    store: PathStr = Field("runs/store", description="where stage outputs live")
    teacher: TeacherConfig = TeacherConfig()
    generate: GenerateConfig = GenerateConfig()
    distill: DistillConfig = DistillConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    export: ExportConfig = ExportConfig()


def _format_validation(e: ValidationError) -> str:
    lines = []
    for err in e.errors():
        field = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"].removeprefix("Value error, ")
        got = repr(err.get("input"))
        if err["type"] == "missing" or (err["type"] == "value_error" and isinstance(err.get("input"), dict)):
            lines.append(f"{field}: {msg}")  # a whole section's rule: its values would not fit on the one line
        else:
            lines.append(f"{field}: {msg} (got {got if len(got) <= 80 else got[:77] + '...'})")
    return "; ".join(lines)


# (section, key) of config values that are paths, resolved against the config file's directory.
RELATIVE_PATHS = [
    ("teacher", "path"), ("generate", "prompts"), ("evaluate", "prompts"),
    ("evaluate", "classifier"), ("evaluate", "inception_weights"), ("evaluate", "reference"), ("evaluate", "clip_model"),
]  # fmt: skip
YAML11_BOOL_WORDS = {"yes", "no", "on", "off", "y", "n"}


class _DuplicateKey(yaml.constructor.ConstructorError):
    pass


class UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping.

    PyYAML has no option for it: SafeLoader silently keeps the last value, so a second ``generate:``
    section would quietly replace the first.
    """

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
                    raise _DuplicateKey("first given", first, f"duplicate key {key!r}", key_node.start_mark)
        return super().construct_mapping(node, deep)


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=UniqueKeyLoader)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``section.key=value`` -> (["section", "key"], value parsed as YAML scalar)."""
    if "=" not in text:
        raise InputError(f"--set {text!r}: expected section.key=value. Fix: e.g. --set generate.num_samples=512")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise InputError(f"--set {text!r}: empty key part. Fix: write section.key=value, e.g. --set generate.num_samples=512")
    if raw.strip().lower() in YAML11_BOOL_WORDS:  # `--set distill.mixed_precision=no` means the string "no"
        return parts, raw.strip()
    try:
        value = _load_yaml(raw) if raw.strip() else ""
    except _DuplicateKey as e:
        raise InputError(f"--set {text!r}: {e.problem} in the value. Fix: give each key once") from None
    except yaml.YAMLError:
        value = raw
    return parts, value


def _where(second, first) -> str:
    """``line 6 (first given at line 4)``; with columns when both are on one line (a flow mapping)."""
    if second.line == first.line:
        return f"line {second.line + 1}, column {second.column + 1} (first given at column {first.column + 1})"
    return f"line {second.line + 1} (first given at line {first.line + 1})"


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise InputError(f"config file not found: {path}. Fix: pass an existing YAML file to --config (or omit it for the embedded default).")
    try:
        data = _load_yaml(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise InputError(
            f"config file {path} is not UTF-8 text (byte {e.object[e.start:e.start + 1]!r} at offset {e.start}). "
            "Fix: save it as UTF-8 (or pass the YAML file, not a binary one, to --config)."
        ) from None
    except OSError as e:
        raise InputError(f"config file {path} cannot be read ({e.strerror}). Fix: check its permissions.") from None
    except _DuplicateKey as e:
        raise InputError(
            f"config file {path}: {e.problem} at {_where(e.problem_mark, e.context_mark)}; "
            "YAML would silently keep only the last. Fix: keep one of them."
        ) from None
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        raise InputError(f"config file {path} is not valid YAML{at}: {getattr(e, 'problem', e)}. Fix the syntax and retry.") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise InputError(
            f"config file {path} must be a mapping of sections (store, teacher, generate, ...), got {type(data).__name__}. "
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
                raise InputError(f"--set {text!r}: {part} is not a section. Fix: set {part} itself, or a key of a section (README lists every key)")
        node[parts[-1]] = value
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as e:
        problems = _format_validation(e)
        # a rule between settings names its own fix
        fix = "" if "Fix:" in problems else " Fix: correct it in the YAML or with --set section.key=value (README lists every key)."
        raise InputError(f"invalid config ({path}): {problems}.{fix}") from None


def dump_config(cfg: PipelineConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
