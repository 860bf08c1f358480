"""The one resolver: teacher -> generate -> distill -> evaluate -> export, walked once.

``walk`` resolves the teacher and its digest once, plans each stage from the previous stage's output
(a plan is a pure function of the config and that output) and asks ``obtain`` for each output: the
command line reuses or builds it here, the flow runs a Prefect task, ``--only`` requires it to exist.
A stage whose explicit input is set (``distill.pairs``, ``evaluate.distill``) starts the chain there.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Callable

from dmd_core.errors import InputError
from dmd_core.loading import resolve_model_dir

from .checks import check_limits, check_memory
from .config import PipelineConfig, dump_config
from .contract import STAGES, Plan, StageOutput, StageSpec, Teacher, spec, teacher_settings
from .registry import module
from .store import open_store

Obtain = Callable[[StageSpec, Plan], StageOutput]


def resolve_teacher(cfg: PipelineConfig) -> Teacher:
    """Resolve ``teacher.path`` and its digest (remembered in the store); load its weights only when the
    digest is new here, so a bad teacher fails before anything is written and a cached run loads nothing."""
    store = open_store(cfg.store)
    path = resolve_model_dir(cfg.teacher.path)
    teacher = Teacher.resolve(path, store.digest(path), cfg.teacher.variant, teacher_settings(cfg.teacher))
    marker = f"loads-{teacher.digest}"
    if not store.noted(marker):
        teacher.check_loads()  # raises an InputError naming the file and the fix
        store.note(marker)
    return teacher


def explicit_input(cfg: PipelineConfig, s: StageSpec) -> str | None:
    """The upstream output directory the config names for ``s`` (e.g. distill.pairs), if any."""
    return getattr(getattr(cfg, s.section), s.input_key) if s.input_key else None


def stages_for(cfg: PipelineConfig, target: str) -> list[StageSpec]:
    """The stages to walk for ``target``: back through its upstreams until one is given explicitly or not
    needed (distill without a regression loss reads no pairs, so generate is not in the graph)."""
    chain = [spec(target)]
    while chain[0].upstream is not None and explicit_input(cfg, chain[0]) is None and chain[0].needs_upstream(cfg):
        chain.insert(0, spec(chain[0].upstream))
    return chain


def given_output(cfg: PipelineConfig, s: StageSpec, path: str) -> StageOutput:
    """An explicitly configured upstream output (e.g. distill.pairs): complete and verified, or an error."""
    up = spec(s.upstream)
    store = open_store(cfg.store)
    where = f"{s.section}.{s.input_key}"
    d = store.input_dir(path)
    listed = store.read_manifest(d)
    if listed is None and not d.is_dir():
        raise InputError(f"{where}: no such directory {d if d == Path(path) else path}. Fix: run `dmd {up.name}` and pass the directory it prints.")
    if listed is not None and listed.stage != up.name:
        raise InputError(f"{where}: {d} is a {listed.stage} output, not a {up.name} output. Fix: point it at a `dmd {up.name}` output directory.")
    m = store.verified(d)
    if m is None:
        detail = getattr(module(up.name), "incomplete_detail", lambda _: "")(d)
        raise InputError(
            f"{where}: {d} is not a complete {up.name} output (no verified manifest.json{detail}). "
            f"Fix: rerun `dmd {up.name}` with its config to finish it."
        )
    return StageOutput(d, m)


def check(cfg: PipelineConfig, target: str, num_processes: int = 1) -> tuple[Teacher, list[StageSpec]]:
    """Resolve the teacher and check every stage's settings up to ``target`` (a multi-process stage's memory on
    ``num_processes``): all that can be refused is, before any stage computes (or writes, or a Prefect server starts)."""
    teacher = resolve_teacher(cfg)
    stages = stages_for(cfg, target)
    for s in stages:
        check_limits(cfg, teacher, s.name)
        getattr(module(s.name), "check", lambda cfg, teacher: None)(cfg, teacher)
        if s.multi_process:  # what the stage needs of its processes (distill.sharding=fsdp: several)
            getattr(module(s.name), "check_processes", lambda cfg, n: None)(cfg, num_processes)
    for s in stages:  # last: the memory plan loads the teacher, once every stage's settings are known to be valid
        check_memory(cfg, teacher, s.name, num_processes if s.multi_process else 1)
    return teacher, stages


def walk(cfg: PipelineConfig, target: str, obtain: Obtain, obtain_upstream: Obtain | None = None, num_processes: int = 1) -> dict[str, StageOutput]:
    """Plan each stage up to ``target`` once and obtain its output (``num_processes``: what ``obtain`` runs a
    multi-process stage on, for the checks); returns the outputs by stage."""
    teacher, stages = check(cfg, target, num_processes)
    given = explicit_input(cfg, stages[0]) if stages[0].needs_upstream(cfg) else None
    up = given_output(cfg, stages[0], given) if given is not None else None
    outputs: dict[str, StageOutput] = {}
    for s in stages:
        p = module(s.name).plan(cfg, teacher, up)
        get = obtain if s.name == target or obtain_upstream is None else obtain_upstream
        up = outputs[s.name] = get(s, p)
    return outputs


def local_obtain(cfg: PipelineConfig, num_processes: int = 1, progress: bool = True) -> Obtain:
    """Reuse a verified output in the store, else build it here (or on ``num_processes`` processes)."""
    text = dump_config(cfg)
    store = open_store(cfg.store)

    def obtain(s: StageSpec, p: Plan) -> StageOutput:
        n = num_processes if s.multi_process else 1
        m = store.reuse_or_build(s.name, p.out_dir, text, lambda work: module(s.name).build(cfg, replace(p, out_dir=work), n, progress))
        return StageOutput(p.out_dir, m)

    return obtain


def require_existing(cfg: PipelineConfig) -> Obtain:
    """The stage's verified output in the store, or an error naming the stage to run first."""
    store = open_store(cfg.store)

    def obtain(s: StageSpec, p: Plan) -> StageOutput:
        m = store.verified(p.out_dir)
        if m is None:
            raise InputError(f"the {s.name} output is missing from the store ({p.out_dir}). Fix: run the pipeline (or --only {s.name}) first.")
        return StageOutput(p.out_dir, m)

    return obtain


def run(cfg: PipelineConfig, target: str, num_processes: int = 1, progress: bool = True) -> StageOutput:
    """``target``'s output for ``cfg``, running whatever upstream stage is missing first."""
    return walk(cfg, target, local_obtain(cfg, num_processes, progress), num_processes=num_processes)[target]


def plan(cfg: PipelineConfig, target: str, num_processes: int = 1) -> Plan:
    """``target``'s plan (checked for ``num_processes``); its upstream outputs must already be in the store."""
    found: list[Plan] = []

    def capture(s: StageSpec, p: Plan) -> StageOutput:
        found.append(p)
        return StageOutput(p.out_dir, None)  # type: ignore[arg-type]

    walk(cfg, target, capture, require_existing(cfg), num_processes)
    return found[-1]


__all__ = ["Plan", "Teacher", "STAGES", "walk", "check", "run", "plan", "resolve_teacher", "local_obtain", "require_existing", "given_output"]
