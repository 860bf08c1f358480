"""The stages, in pipeline order: one entry each, read by the CLI, the chain, the flow, its artifacts and the docs.

Adding a stage means one ``StageSpec`` here and one module with ``plan`` and ``build`` (see ``Stage``).
Nothing here imports a stage module until it is used, so ``dmd --help`` stays fast.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Callable, Protocol

from .store import Manifest, content_key

if TYPE_CHECKING:
    from .chain import Plan, Teacher
    from .config import PipelineConfig
    from .store import StageOutput


class Stage(Protocol):
    """What a stage module provides (``check`` and ``required_files`` are optional)."""

    def check(self, cfg: PipelineConfig, teacher: Teacher) -> None:
        """Raise an InputError for any setting that cannot work; runs for every stage of a run before any computes."""

    def required_files(self, manifest: Manifest) -> list[str]:
        """The files an output must have, whatever its manifest lists (verification checks them)."""

    def plan(self, cfg: PipelineConfig, teacher: Teacher, upstream: StageOutput | None) -> Plan:
        """Pure: the key and output directory from the config and the upstream output; never runs anything."""

    def build(self, cfg: PipelineConfig, plan: Plan, num_processes: int, progress: bool) -> Manifest:
        """Make the output the plan names (in this process or through ``accelerate launch``)."""

    def run_distributed(self, cfg: PipelineConfig, plan: Plan, progress: bool) -> Manifest | None:
        """One process under ``accelerate launch``; rank 0 returns the manifest."""


@dataclass(frozen=True)
class StageSpec:
    name: str
    code_version: str  # bump when the bytes a stage writes change for the same inputs
    upstream: str | None  # the stage whose output this one reads (None: only the teacher)
    summary: str  # one line: the README's stage table, the CLI's list
    help: str  # the CLI command's help
    load: Callable[[], ModuleType]  # the stage module (imported on first use)
    not_in_key: frozenset[str] = frozenset()  # fields of the config section that never change the output
    input_key: str | None = None  # section key naming an explicit upstream output dir (e.g. distill.pairs)
    needs_upstream: Callable[[PipelineConfig], bool] = lambda cfg: True  # False: the upstream stage is skipped
    progress: bool = True  # reports progress (bar; artifact under the flow)
    multi_process: bool = True  # may run under accelerate launch

    @property
    def section(self) -> str:
        return self.name  # each stage's settings live in the config section of its name

    @property
    def module(self) -> Stage:
        return self.load()  # type: ignore[return-value]

    def key_config(self, cfg: PipelineConfig) -> dict:
        """The stage's settings that determine its output."""
        return getattr(cfg, self.section).model_dump(mode="json", exclude=set(self.not_in_key))

    def key(self, cfg: PipelineConfig, upstream: dict[str, str], extra: dict | None = None) -> str:
        return content_key(self.name, {**self.key_config(cfg), **(extra or {})}, upstream, self.code_version)

    def out_dir(self, cfg: PipelineConfig, key: str) -> Path:
        return Path(cfg.store) / self.name / key


def _generate() -> ModuleType:
    from . import generate

    return generate


def _distill() -> ModuleType:
    from . import distill

    return distill


def _evaluate() -> ModuleType:
    from . import evaluate

    return evaluate


def _export() -> ModuleType:
    from . import export

    return export


STAGES: tuple[StageSpec, ...] = (
    StageSpec(
        name="generate",
        code_version="generate/1",
        upstream=None,
        summary="the teacher's ODE solver (Heun / PNDM) writes (noise, image, class) WebDataset shards",
        help="""Solve the teacher's ODE from seeded noise and write (noise, image, class) WebDataset shards.

        The output directory is content-addressed in the store and printed as the last line on stdout;
        a rerun reuses a complete output and resumes an interrupted one.""",
        load=_generate,
        # the prompt file's digest and column are in the key when there is one (and keys without stay as they were)
        # ... and the precision, only when not fp32
        not_in_key=frozenset({"num_threads", "prompts", "prompt_column", "precision"}),
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
        load=_distill,
        # logging, housekeeping and where the pairs are (their digest is in the key)
        # (gradient checkpointing recomputes the same activations: memory, not results)
        # eval_every / eval_samples enter the key through the upstream "quality_probe" entry, only when set
        # ... and the GAN settings through "gan", only when distill.gan is on
        not_in_key=frozenset({"log_every", "sample_every", "keep_checkpoints", "num_threads", "pairs", "gradient_checkpointing", "eval_every", "eval_samples",
                              "gan", "gan_weight_generator", "gan_weight_discriminator", "real_data", "real_samples", "dm_weight", "generator_timesteps",
                              "compile"}),
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
        load=_evaluate,
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
        load=_export,
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
