"""The stage modules, by name: the only place that imports them (on first use, so ``dmd --help`` stays fast).

What a stage is (its name, code version, upstream, help) is in ``contract.STAGES``; what it does is its
module, which provides the functions of ``Stage``. Adding a stage: one ``StageSpec`` in the contract, one
module, one line in ``MODULES``.
"""

from __future__ import annotations

from typing import Protocol

from .config import PipelineConfig
from .contract import ORDER, STAGES, Manifest, Plan, StageOutput, StageSpec, Teacher, spec


class Stage(Protocol):
    """What a stage module provides (``check`` and ``incomplete_detail`` are optional)."""

    def check(self, cfg: PipelineConfig, teacher: Teacher) -> None:
        """Raise an InputError for any setting that cannot work; runs for every stage of a run before any computes."""

    def incomplete_detail(self, out_dir) -> str:
        """What an unfinished output lacks, for the error that names it."""

    def plan(self, cfg: PipelineConfig, teacher: Teacher, upstream: StageOutput | None) -> Plan:
        """Pure: the key and output directory from the config and the upstream output; never runs anything."""

    def build(self, cfg: PipelineConfig, plan: Plan, num_processes: int, progress: bool) -> Manifest:
        """Make the output the plan names (in this process or through ``accelerate launch``)."""

    def run_distributed(self, cfg: PipelineConfig, plan: Plan, progress: bool) -> Manifest | None:
        """One process under ``accelerate launch``; rank 0 returns the manifest."""


def module(name: str) -> Stage:
    """The stage module of ``name`` (imported on first use)."""
    if name == "generate":
        from . import generate as m
    elif name == "distill":
        from . import distill as m
    elif name == "evaluate":
        from . import evaluate as m
    elif name == "export":
        from . import export as m
    else:
        raise KeyError(name)
    return m  # type: ignore[return-value]


__all__ = ["ORDER", "STAGES", "Stage", "StageSpec", "module", "spec"]
