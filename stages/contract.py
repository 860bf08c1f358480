"""The stage contract: what each stage is (``StageSpec``), what it is asked to make (``Plan``), from which
teacher (``Teacher``), and what a finished output says about itself (``Manifest``, ``required_files``).

Every stage module, the store, the chain and the flow build on this module; it imports no stage.
A stage's output directory holds its files and, written last, ``manifest.json`` (docs/formats.md).
"""

from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple

import torch
from pydantic import BaseModel

from dmd_core.denoisers import Denoiser, Parametrization
from dmd_core.errors import InputError
from dmd_core.layouts import Layout, detect
from dmd_core.loading import PARAM_FILE, WEIGHTS_FILE
from dmd_core.shards import shard_name, shard_ranges
from dmd_core.rows import PromptRows, PromptTexts
from dmd_core.text import PromptEncoder

from .config import DistillConfig, GenerateConfig, PipelineConfig
from .files import digest_json, sha256_file, write_text_atomic

DENOISER_FILES = ("config.json", WEIGHTS_FILE, PARAM_FILE)  # what save_denoiser writes: every saved network has them
# a text-to-image generate output: the prompts that the pairs' cls.txt index (dmd_core.rows.PromptTexts)
PROMPT_TEXTS = ("prompts.bin", "prompt_offsets.npy")
MANIFEST = "manifest.json"


# ---------------------------------------------------------------- the stages


@dataclass(frozen=True)
class StageSpec:
    """What the CLI, the chain, the flow and the docs know of a stage without importing its module."""

    name: str
    code_version: str  # bump when the bytes a stage writes change for the same inputs
    upstream: str | None  # the stage whose output this one reads (None: only the teacher)
    summary: str  # one line: the README's stage table, the CLI's list
    help: str  # the CLI command's help
    not_in_key: frozenset[str] = frozenset()  # fields of the config section that never change the output
    input_key: str | None = None  # section key naming an explicit upstream output dir (e.g. distill.pairs)
    needs_upstream: Callable[[PipelineConfig], bool] = lambda cfg: True  # False: the upstream stage is skipped
    progress: bool = True  # reports progress (bar; artifact under the flow)
    multi_process: bool = True  # may run under accelerate launch
    streamed: tuple[str, ...] = ()  # file patterns downstream stages read where they lie (an object store leaves them in the bucket)

    @property
    def section(self) -> str:
        return self.name  # each stage's settings live in the config section of its name

    def key_config(self, cfg: PipelineConfig) -> dict:
        """The stage's settings that determine its output."""
        return getattr(cfg, self.section).model_dump(mode="json", exclude=set(self.not_in_key))

    def key(self, cfg: PipelineConfig, upstream: dict[str, str], extra: dict | None = None) -> str:
        return content_key(self.name, {**self.key_config(cfg), **(extra or {})}, upstream, self.code_version)


def content_key(stage: str, config: dict, upstream: dict[str, str], code_version: str) -> str:
    """The cache key of a stage output: 20 hex digits of sha256 over everything that determines it."""
    return digest_json({"stage": stage, "config": config, "upstream": upstream, "code": code_version})[:20]


STAGES: tuple[StageSpec, ...] = (
    StageSpec(
        name="generate",
        code_version="generate/1",
        upstream=None,
        summary="the teacher's ODE solver (Heun / PNDM) writes (noise, image, class) WebDataset shards",
        help="""Solve the teacher's ODE from seeded noise and write (noise, image, class) WebDataset shards.

        The output directory is content-addressed in the store and printed as the last line on stdout;
        a rerun reuses a complete output and resumes an interrupted one.""",
        # the prompt file (digest and column) and a precision other than fp32 enter the key as upstream
        # entries, only when used, so that a key without them is the key of the same run without the option
        not_in_key=frozenset({"num_threads", "partitions", "prompts", "prompt_column", "precision", "prompt_dtype"}),  # partitions: the same bytes
        streamed=("pairs-*.tar",),  # distill streams the shards (and checks each one's sha256 as it reads)
    ),
    StageSpec(
        name="distill",
        code_version="distill/3",  # /3: counter-based (Philox) per-sample draws
        upstream="generate",
        summary="DMD training on Accelerate (distribution matching + regression), checkpoints, metrics",
        help="""Train the one-step generator with DMD (distribution matching + regression), on Accelerate.

        Uses the pairs for this config from the store (running generate first when they are missing),
        trains, and prints the output directory (generator/, metrics.parquet, samples.png) as the last
        line on stdout. An interrupted run resumes from its last checkpoint when rerun.""",
        # logging, housekeeping, where the pairs are (their digest is in the key) and gradient checkpointing
        # (it recomputes the same activations: memory, not results), sharding (where the weights live, not what they
        # compute, as with the number of processes). The probe, GAN, DM-weight, k-step,
        # compile and LoRA settings enter the key as upstream entries, only when used (distill.KEYED_WHEN_SET).
        not_in_key=frozenset({"log_every", "sample_every", "keep_checkpoints", "num_threads", "pairs", "gradient_checkpointing", "eval_every", "eval_samples",
                              "gan", "gan_weight_generator", "gan_weight_discriminator", "real_data", "real_samples", "dm_weight", "generator_timesteps",
                              "compile", "generator_lora_rank", "fake_lora_rank", "lora_alpha", "lora_dropout", "lora_target_modules",
                              "sharding", "optimizer"}),  # fmt: skip
        input_key="pairs",
        needs_upstream=lambda cfg: cfg.distill.regression_weight > 0,  # the pairs feed only the regression loss
    ),
    StageSpec(
        name="evaluate",
        code_version="evaluate/1",
        upstream="distill",
        summary="Fréchet distance (FD-digits / FID via torchmetrics), class accuracy, speed vs the teacher",
        help="""Measure the one-step generator against its teacher: Fréchet distance, class accuracy, speed.

        Writes metrics.json (teacher_fd, student_fd, fd_ratio, class accuracies, teacher_nfe, speedup),
        metrics.parquet and grid.png (teacher | student); prints the output directory last on stdout.
        The teacher's numbers and the reference statistics are computed once and cached in the store.""",
        # paths: the digests of what they point to are in the key
        not_in_key=frozenset({"num_threads", "distill", "classifier", "inception_weights", "reference", "prompts", "prompt_column", "prompt_labels", "clip_model", "generator",
                              "precision"}),  # fmt: skip
        input_key="distill",
    ),
    StageSpec(
        name="export",
        code_version="export/2",
        upstream="evaluate",
        summary="diffusers layout, `OneStepPipeline`, ONNX with parity check, model card",
        help="""Write the one-step generator for others: diffusers layout, OneStepPipeline, ONNX, model card.

        Evaluates first if needed; checks ONNX against PyTorch and a fresh-process reload bit for bit;
        prints the export directory (with README.md, the model card) as the last line on stdout.""",
        not_in_key=frozenset({"promote_if", "pipeline", "on_not_promoted"}),  # what happens after the export, not what it is
        progress=False,
        multi_process=False,
    ),
)

ORDER: list[str] = [s.name for s in STAGES]


def spec(name: str) -> StageSpec:
    for s in STAGES:
        if s.name == name:
            return s
    raise KeyError(name)


# ---------------------------------------------------------------- the teacher


@dataclass(frozen=True)
class Teacher:
    """The resolved teacher: where it is, its digest and its parametrisation (no weights loaded).

    Stages ask it, never the folder; it asks the folder's layout (``dmd_core.layouts``): how the teacher is
    conditioned, how its model space maps to pixels, what an export of it is written as.

    The digest is the folder's, followed by ``:<variant>`` when the loads read a weights variant (teacher.variant,
    e.g. ``<sha256>:fp16``): every key that holds the teacher tells plain and fp16 runs apart, and a plan's digest
    alone brings the variant to every stage that loads the teacher (``Plan.teacher``)."""

    path: Path
    digest: str
    param: Parametrization
    layout: Layout

    @staticmethod
    @functools.lru_cache(maxsize=8)
    def at(path: str | Path, digest: str) -> "Teacher":
        """The teacher in ``path`` whose digest is known (its folder read once per process)."""
        _, variant, settings = parse_teacher_digest(digest)
        layout = detect(path).reading(variant)
        param = layout.configure(Path(path), layout.parametrization(Path(path)), {k: v for k, v in settings.items() if k in SIZE_SETTINGS})
        if settings.get("guidance_rescale") and param.kind != "vp":
            raise InputError(
                f"teacher.guidance_rescale rescales a VP teacher's epsilon or v prediction; {path} is an EDM teacher. Fix: drop teacher.guidance_rescale."
            )
        return Teacher(Path(path), digest, param, layout)

    @staticmethod
    def resolve(path: str | Path, folder_digest: str, variant: str | None = None, settings: dict | None = None) -> "Teacher":
        """The teacher in ``path`` (digest ``folder_digest``) reading the weights ``variant`` asks for (None: the
        plain weights if every part has them, else the one variant they have; InputError if absent), with the
        teacher ``settings`` that change its outputs (``teacher_settings``: sizes, guidance_rescale)."""
        read = detect(path).reading(variant).weights_variant(Path(path))
        return Teacher.at(path, (f"{folder_digest}:{read}" if read else folder_digest) + settings_suffix(settings or {}))

    @property
    def guidance_rescale(self) -> float:
        """diffusers' guidance_rescale of every guided call of the teacher (teacher.guidance_rescale; 0: plain CFG)."""
        return float(parse_teacher_digest(self.digest)[2].get("guidance_rescale", 0.0))

    @property
    def variant(self) -> str | None:
        """The weights variant every load reads (e.g. "fp16"; None: the plain files)."""
        return self.layout.variant

    @property
    def takes_prompts(self) -> bool:
        """Conditioned on prompts (a prompt table) rather than class labels."""
        return self.layout.takes_prompts

    @property
    def guidable(self) -> bool:
        """Has a condition that classifier-free guidance can drop (classes or prompts)."""
        return self.param.num_classes > 0 or self.takes_prompts

    @property
    def num_timesteps(self) -> int:
        """T: the integer timesteps of the teacher's noise levels (a VP teacher's training timesteps)."""
        return self.layout.num_timesteps(self.path, self.param)

    @property
    def image_shape(self) -> tuple[int, ...]:
        """C x H x W of the teacher's model space (pixels, or latents)."""
        return tuple(self.param.image_shape)

    @property
    def latent(self) -> bool:
        """Model space is a codec's latents, not pixels."""
        return self.pixel_shape() != self.image_shape

    @property
    def pipeline_class(self) -> str | None:
        """The diffusers pipeline an export of this teacher's family is written as (None: the project's OneStepPipeline)."""
        return self.layout.pipeline_class

    def load(self, device="cpu", prompts: PromptRows | list[str] | None = None) -> Denoiser:
        """The weights, loaded when a stage is about to use them (a bad file fails here, named).

        A teacher that takes prompts gets their rows (a list of prompts: encoded here, in memory).
        """
        den = self.layout.load_denoiser(self.path, device)
        if den.param != self.param:  # the configured size conditioning (teacher.original_size, ...)
            den.set_param(self.param)
        den.guidance_rescale = self.guidance_rescale
        if self.takes_prompts and prompts is not None:
            den.set_prompts(prompts if isinstance(prompts, PromptRows) else self.prompt_encoder(device).table(prompts))
        return den

    def prompt_encoder(self, device="cpu") -> PromptEncoder:
        return self.layout.prompt_encoder(self.path, device)

    def check_loads(self) -> None:
        """Load every part once, so that a damaged file fails before anything is written (InputError)."""
        self.layout.check_loads(self.path)

    def pixel_shape(self) -> tuple[int, ...]:
        """C x H x W of the images the teacher makes: its model space, or its decoder's image side."""
        return tuple(self.layout.pixel_shape(self.path, self.param))

    def pixel_decoder(self, device="cpu", gradient_checkpointing: bool = False, dtype: torch.dtype | None = None) -> Callable:
        """Model space -> pixels (a latent teacher's VAE decoder; identity for pixel-space teachers)."""
        return self.layout.pixel_decoder(self.path, device, gradient_checkpointing, dtype)

    def encode_pixels(self, images: torch.Tensor, device="cpu") -> torch.Tensor:
        """Pixels in [-1, 1] -> model space (a latent teacher's VAE latents)."""
        return self.layout.encode_pixels(self.path, images, device)

    def pixel_encoder(self, device="cpu") -> Callable[[torch.Tensor], torch.Tensor]:
        """``encode_pixels`` with the codec loaded once (encoding a set batch by batch)."""
        return self.layout.pixel_encoder(self.path, device)


# Layout.configure applies them: SDXL's add_time_ids, SD3's and Flux's image size. Only those set join the digest,
# so a run that sets none keeps its digest.
SIZE_SETTINGS = ("original_size", "crop_top_left", "target_size", "image_size")


def teacher_settings(t) -> dict:
    """The ``teacher`` config's settings that change what the teacher computes, those not at their default:
    SDXL's sizes, SD3's and Flux's image_size, guidance_rescale. They join the teacher's digest, so every key holding
    it tells them apart."""
    out = {k: tuple(getattr(t, k)) for k in SIZE_SETTINGS if getattr(t, k) is not None and not (k == "crop_top_left" and tuple(t.crop_top_left) == (0, 0))}
    if t.guidance_rescale:
        out["guidance_rescale"] = float(t.guidance_rescale)
    return out


def settings_suffix(settings: dict) -> str:
    """``:name=value`` per setting (sizes as HxW), in a fixed order: the digest's tail (``parse_teacher_digest``)."""
    def value(v) -> str:
        return "x".join(str(int(n)) for n in v) if isinstance(v, (tuple, list)) else repr(float(v))

    return "".join(f":{k}={value(settings[k])}" for k in (*SIZE_SETTINGS, "guidance_rescale") if k in settings)


def parse_teacher_digest(digest: str) -> tuple[str, str | None, dict]:
    """(folder digest, weights variant or None, settings) of a teacher digest ``<sha256>[:<variant>][:name=value...]``."""
    folder, *tail = digest.split(":")
    variant = next((t for t in tail if "=" not in t), None)
    settings: dict = {}
    for item in (t for t in tail if "=" in t):
        name, _, v = item.partition("=")
        settings[name] = tuple(int(n) for n in v.split("x")) if name in SIZE_SETTINGS else float(v)
    return folder, variant, settings


# ---------------------------------------------------------------- plans


@dataclass
class Plan:
    """What a stage will make: its content key and output directory, and the inputs it reads."""

    stage: str
    key: str
    out_dir: Path
    upstream: dict[str, str]  # name -> digest of each input (they are in the key)
    inputs: dict[str, str]  # name -> path of each input directory
    info: dict = field(default_factory=dict)  # stage-specific facts decided at planning time

    def save(self, path: str | Path) -> Path:
        # absolute paths: the reader (an accelerate worker, a flow task) may run elsewhere in the tree
        data = {**asdict(self), "out_dir": str(self.out_dir.resolve()), "inputs": {k: str(Path(v).resolve()) for k, v in self.inputs.items()}}
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, json.dumps(data, indent=2) + "\n")
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        data = json.loads(Path(path).read_text())
        return cls(**{**data, "out_dir": Path(data["out_dir"])})

    def teacher(self) -> Teacher:
        """The teacher this plan was made for (digest as planned: no re-hash). A stage whose key holds the
        teacher only through its upstream output (export) keeps the digest in ``info``."""
        return Teacher.at(self.inputs["teacher"], self.upstream.get("teacher") or self.info["teacher_digest"])


def pair_prompts(pairs_dir: str | Path) -> PromptTexts | None:
    """The prompts a generate output's ``cls.txt`` index, read by index (None for class-conditional pairs)."""
    blob, offsets = (Path(pairs_dir) / name for name in PROMPT_TEXTS)
    return PromptTexts(blob, offsets) if blob.is_file() or offsets.is_file() else None


# ---------------------------------------------------------------- manifests


class FileEntry(BaseModel):
    name: str
    size: int
    sha256: str
    samples: int | None = None
    record: bool = False  # kept for people (resolved config, timings): not part of the output's digest


class Manifest(BaseModel):
    stage: str
    key: str
    code_version: str
    config: dict  # the stage's own section
    pipeline_config: dict  # the whole resolved config
    upstream: dict[str, str]  # name -> digest of each input
    files: list[FileEntry]
    info: dict = {}  # stage-specific facts (solver, nfe, ...)
    wall_time_s: float
    created_unix: float = 0.0

    @property
    def digest(self) -> str:
        """Digest of what the stage made (file checksums), which downstream keys use.

        Leaves out record files (``config.yaml`` with its absolute paths, logs with timings): they must
        not change the identity of identical products (same shards on another machine = same digest).
        """
        made = sorted((f for f in self.files if not f.record), key=lambda f: f.name)
        return digest_json([[f.name, f.sha256] for f in made])


def file_entry(path: Path, samples: int | None = None, sha256: str | None = None, record: bool | None = None, name: str | None = None) -> FileEntry:
    """Size and checksum of ``path`` (listed as ``name``, default its file name); pass ``sha256`` when it
    was just computed (saves a re-read). ``config.yaml`` is a record file unless told otherwise."""
    record = path.name == "config.yaml" if record is None else record
    return FileEntry(name=name or path.name, size=path.stat().st_size, sha256=sha256 or sha256_file(path), samples=samples, record=record)


def tree_entries(out: Path, sub: str) -> list[FileEntry]:
    """Entries of every file below ``out/sub``, named relative to ``out``, sorted."""
    root = out / sub
    return [file_entry(f, name=str(f.relative_to(out))) for f in sorted(root.rglob("*")) if f.is_file()] if root.is_dir() else []


def stage_manifest(cfg: PipelineConfig, p: Plan, files: list[FileEntry], info: dict, wall_time_s: float) -> Manifest:
    """The manifest of a stage output: the one way every stage describes what it made."""
    return Manifest(
        stage=p.stage,
        key=p.key,
        code_version=spec(p.stage).code_version,
        config=getattr(cfg, spec(p.stage).section).model_dump(mode="json"),
        pipeline_config=cfg.model_dump(mode="json"),
        upstream=p.upstream,
        files=files,
        info=info,
        wall_time_s=round(wall_time_s, 3),
    )


class StageOutput(NamedTuple):
    """A complete, verified stage output: where it is and what its manifest says."""

    out_dir: Path
    manifest: Manifest


# ---------------------------------------------------------------- what an output must hold


def _generate_files(m: Manifest) -> list[str]:
    """Every shard of ``num_samples`` (whatever the manifest lists), the config and, for text-to-image, the prompts."""
    g = GenerateConfig.model_validate(m.config)
    names = [shard_name(i) for i in range(len(shard_ranges(g.num_samples, g.shard_size)))] + ["config.yaml"]
    return names + list(PROMPT_TEXTS) if "prompts" in m.upstream else names


def _distill_files(m: Manifest) -> list[str]:
    """The networks, the final grid and every scheduled grid (when the run did not continue another), the records."""
    d = DistillConfig.model_validate(m.config)
    nets = ["generator", "fake_score"] + (["generator_ema"] if d.ema_decay else []) + (["generator_best"] if d.eval_every else [])
    names = [f"{net}/{f}" for net in nets for f in DENOISER_FILES]
    grid_steps = {d.steps} | (set() if d.resume_from else set(range(d.sample_every, d.steps + 1, d.sample_every)))
    names += [f"samples/step-{k:07d}.png" for k in sorted(grid_steps)]
    names += ["metrics.parquet", "curves.png", "samples.png", "config.yaml"] + (["best.json"] if d.eval_every else [])
    return names + (["fake_score/gan_head.safetensors"] if d.gan else [])


EVALUATE_FILES = ("metrics.json", "metrics.parquet", "grid.png", "student_stats.npz", "config.yaml")


def _export_files(m: Manifest) -> list[str]:
    """The card, the recipe, the grid and the network (a diffusers pipeline's unet/; else generator/ and ONNX)."""
    net = "unet" if m.info.get("layout") else "generator"
    names = ["README.md", "one_step.json", "grid.png", "model_index.json", *(f"{net}/{n}" for n in DENOISER_FILES)]
    return names + ["generator.onnx"] if net == "generator" and m.config.get("onnx") else names


REQUIRED_FILES: dict[str, Callable[[Manifest], list[str]]] = {
    "generate": _generate_files,
    "distill": _distill_files,
    "evaluate": lambda m: list(EVALUATE_FILES),
    "export": _export_files,
}


def required_files(m: Manifest) -> list[str]:
    """The files an output of ``m.stage`` must have, whatever its manifest lists (a side cache: none)."""
    return REQUIRED_FILES.get(m.stage, lambda m: [])(m)
