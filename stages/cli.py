"""The ``dmd`` command line: one subcommand per stage, plus the embedded default's helpers."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated, Callable, Optional

import typer

from dmd_core.errors import InputError
from dmd_core.render import terminal_text

from .config import dump_config, load_config
from .contract import ORDER, STAGES
from .files import write_text_atomic
from .launch import distributed_env, exit_with_parent, finish_distributed, terminate_on_sigterm
from .store import open_store

ConfigOpt = Annotated[
    Optional[Path],
    typer.Option("--config", "-c", help="Pipeline YAML (default: the embedded digits config, data/digits.yaml)."),
]
SetOpt = Annotated[
    Optional[list[str]],
    typer.Option("--set", "-s", help="Override one config value, e.g. --set generate.num_samples=512 (repeatable)."),
]
ProcOpt = Annotated[
    int, typer.Option("--num-processes", "-n", min=1, help="Processes; >1 runs through `accelerate launch` (gloo on CPU).")
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]


class StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record is logged (a test runner or a forked child may swap it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


class TerminalFormatter(logging.Formatter):
    """Log lines carry paths and names: their control characters are shown escaped, never sent to the terminal."""

    def format(self, record: logging.LogRecord) -> str:
        return terminal_text(super().format(record))


def setup_logging() -> None:
    logger = logging.getLogger("dmd")
    if not logger.handlers:
        handler = StderrHandler()
        handler.setFormatter(TerminalFormatter("dmd: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def guarded(body: Callable[[], Optional[str]], kill_children_on_sigterm: bool = True) -> None:
    """Run a command body; InputError -> one line on stderr and exit 2; print the returned path last on stdout.

    Both can hold user text (paths, prompts): control characters reach a terminal escaped. A pipe (the flow,
    ``$(dmd export)``) gets the path itself."""
    setup_logging()
    exit_with_parent()
    terminate_on_sigterm(kill_children_on_sigterm)
    try:
        out = body()
    except InputError as e:
        typer.echo(f"error: {terminal_text(str(e))}", err=True)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        typer.echo("interrupted: finished work is kept; rerun the same command to resume", err=True)
        raise typer.Exit(130) from None
    if out is not None:
        # color=True: click would strip ANSI sequences from a path on a pipe, and the reader needs it whole
        typer.echo(terminal_text(str(out), newlines=False) if sys.stdout.isatty() else out, color=True)


PlanOpt = Annotated[
    Optional[Path], typer.Option("--plan", hidden=True, help="A plan made by the chain or the flow (internal: accelerate workers, flow tasks).")
]


def stage_output(name: str, cfg, num_processes: int, progress: bool, plan_file: Optional[Path]) -> Optional[Path]:
    """Run one stage: from a plan file (already planned by a flow task or the launcher), or through the chain."""
    from dataclasses import replace

    from .chain import local_obtain, plan, run
    from .contract import Plan, spec
    from .registry import module

    store = open_store(cfg.store)
    rank, world = distributed_env()
    if world > 1:  # this process is one rank under accelerate launch
        if plan_file:  # launched by launch_plan: the plan names the partial directory to build in
            p = Plan.load(plan_file)
        else:  # `accelerate launch -m stages.X` by hand: build under the hidden name, rank 0 publishes
            p = plan(cfg, name, world)
            if store.verified(p.out_dir) is not None:
                return p.out_dir if rank == 0 else None
            final, p = p.out_dir, replace(p, out_dir=store.partial_dir(p.out_dir))
        p.out_dir.mkdir(parents=True, exist_ok=True)
        if rank == 0 and not (p.out_dir / "config.yaml").is_file():
            write_text_atomic(p.out_dir / "config.yaml", dump_config(cfg))
        m = module(name).run_distributed(cfg, p, progress)
        finish_distributed()
        if m is not None and not plan_file:
            store.publish(p.out_dir, final)
            return final
        return None if m is None else p.out_dir
    if plan_file is not None:
        p = Plan.load(plan_file)
        return local_obtain(cfg, num_processes, progress)(spec(name), p).out_dir
    return run(cfg, name, num_processes, progress).out_dir


def stage_command(name: str, doc: str) -> Callable[..., None]:
    """The CLI command of a stage: the same options for every stage."""

    def command(config: ConfigOpt = None, set_: SetOpt = None, num_processes: ProcOpt = 1, quiet: QuietOpt = False, plan_file: PlanOpt = None) -> None:
        def body() -> Optional[str]:
            cfg = load_config(config, set_ or [])
            open_store(cfg.store).check_writable()  # a store that is a file or read-only fails now, not after the first stage
            out = stage_output(name, cfg, num_processes, not quiet, plan_file)
            return None if out is None else str(out)

        guarded(body)

    command.__doc__ = doc
    return command


PartitionOpt = Annotated[
    Optional[int],
    typer.Option(
        "--partition", min=0,
        help="Only partition K of generate.partitions, into the output's work directory (printed); an external scheduler runs 0..N-1 anywhere, then `dmd generate` publishes.",
    ),
]  # fmt: skip


def generate_command(doc: str) -> Callable[..., None]:
    """``dmd generate``: the stage command, plus ``--partition K`` (stages/generate/partitions.py)."""
    whole = stage_command("generate", doc)

    def command(config: ConfigOpt = None, set_: SetOpt = None, num_processes: ProcOpt = 1, quiet: QuietOpt = False, plan_file: PlanOpt = None, partition: PartitionOpt = None) -> None:
        if partition is None:
            return whole(config, set_, num_processes, quiet, plan_file)

        def body() -> str:
            from .chain import plan
            from .contract import Plan
            from .generate import build_partition

            cfg = load_config(config, set_ or [])
            open_store(cfg.store).check_writable()
            p = Plan.load(plan_file) if plan_file else plan(cfg, "generate")  # the flow's plan, or planned here
            return str(build_partition(cfg, p, partition, not quiet, num_processes))

        guarded(body)

    command.__doc__ = doc
    return command


STAGE_COMMANDS = {s.name: generate_command(s.help) if s.name == "generate" else stage_command(s.name, s.help) for s in STAGES}

app = typer.Typer(
    name="dmd",
    help=f"Distil a diffusion model into a one-step generator (DMD). Stages: {' -> '.join(ORDER)}.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
for _name, _fn in STAGE_COMMANDS.items():
    app.command(_name)(_fn)

@app.command("verify")
def verify_command(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    deep: Annotated[bool, typer.Option("--deep", help="Re-hash every file, ignoring the verification records.")] = False,
) -> None:
    """Check every output in the store against its manifest's checksums; exit 1 if any fails.

    Normally a file is re-hashed only when its size, mtime or inode changed since it was last checked (the store's .verified.json records); --deep re-hashes everything, which also catches a file changed in place that kept all three.
    """
    def body() -> None:
        store = open_store(load_config(config, set_ or []).store)
        failed = 0
        for name, out in store.outputs():
            m = store.read_manifest(out)
            bad = ["manifest.json unreadable"] if m is None else store.problems(out, m, deep)
            failed += bool(bad)
            line = f"{'FAIL' if bad else 'ok  '}  {name:<12} {out.name}" + (f"  ({', '.join(bad[:5])})" if bad else "")
            typer.echo(terminal_text(line, newlines=False))  # names of directories and files found in the store
        typer.echo(f"{failed} output(s) failed verification" if failed else "all outputs verify", err=True)
        if failed:
            raise typer.Exit(1)

    guarded(body)


@app.command("promoted")
def promoted_command(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the promotion record as JSON.")] = False,
) -> None:
    """Print the promoted export of this config's teacher and pipeline (export.pipeline): where it is, when it was promoted, its metrics and lineage; exit 1 when nothing was promoted yet."""

    def body() -> None:
        import json

        from .chain import resolve_teacher
        from .promotion import current, describe

        cfg = load_config(config, set_ or [])
        teacher = resolve_teacher(cfg)
        record = current(open_store(cfg.store), cfg.export.pipeline, teacher.digest)
        if record is None:
            typer.echo(
                terminal_text(f"no promoted export of the teacher {teacher.path} in pipeline {cfg.export.pipeline!r} in the store {cfg.store}. "
                              "Fix: dmd run (an export passing export.promote_if is promoted; the first always is).", newlines=False),  # fmt: skip
                err=True,
            )
            raise typer.Exit(1)
        typer.echo(json.dumps(record, indent=2, sort_keys=True) if as_json else terminal_text(describe(record)))

    guarded(body)


@app.command("plan")
def plan_command(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    memory: Annotated[bool, typer.Option("--memory", help="distill's memory per device, network by network, against the device's free memory.")] = False,
    num_processes: Annotated[int, typer.Option("--num-processes", "-n", min=1, help="The processes distill would run on (`dmd distill -n`): with distill.sharding=fsdp each holds 1/n of the trained networks; with none, DDP's gradient buckets.")] = 1,
) -> None:
    """Predict what a run needs, before anything runs. --memory: distill's weights, gradients, optimizer states and activations per network and the total per device (activations from a probe of the teacher's network), against the free memory of the device distill would use; exit 2 with the settings that would fit when it does not fit."""

    def body() -> None:
        if not memory:
            raise InputError("dmd plan needs to know what to plan. Fix: dmd plan --memory")
        from dmd_core.memory import dmd_step, free_memory, gib, table

        from .chain import resolve_teacher
        from .memory_plan import candidates, distill_device, distill_memory, refusal
        from .registry import module

        cfg = load_config(config, set_ or [])
        teacher = resolve_teacher(cfg)
        module("distill").check(cfg, teacher)  # settings the teacher refuses fail as distill would fail them
        plan, probes, settings = distill_memory(cfg, teacher, num_processes)
        free = free_memory(distill_device())
        on = f" on {num_processes} processes ({'FSDP' if plan.shards > 1 else 'DDP'})" if num_processes > 1 else ""
        typer.echo(terminal_text(f"distill, per device, at distill.batch_size={settings.batch}{on} (teacher {teacher.path}):", newlines=False))
        typer.echo(table(plan, free))
        others = [(name, dmd_step(probes, s).total) for name, s in candidates(cfg.distill, settings, alone=True)]
        if others:
            typer.echo("each other setting alone, predicted per device: " + "; ".join(f"{name} {gib(total)}" for name, total in others))
        if plan.total > free[0]:
            raise refusal(cfg, plan, probes, settings, free)

    guarded(body)


toy_app = typer.Typer(help="Build the embedded default's assets (digits teacher and classifier) under data/.", no_args_is_help=True)
app.add_typer(toy_app, name="toy")


@toy_app.command("classifier")
def toy_classifier_command(
    out: Annotated[Path, typer.Option(help="Output directory.")] = Path("data/classifier"),
    epochs: Annotated[int, typer.Option(min=1)] = 40,
    seed: Annotated[int, typer.Option()] = 0,
) -> None:
    """Train the digits CNN whose penultimate features define FD-digits (fixed 80/20 split, seed 0)."""
    from . import toy

    guarded(lambda: toy.make_classifier(out, epochs=epochs, seed=seed))


@toy_app.command("teacher")
def toy_teacher_command(
    out: Annotated[Path, typer.Option(help="Output directory.")] = Path("data/teacher"),
    steps: Annotated[Optional[int], typer.Option(min=1, help="Training steps (default: 4000 for edm, vp and flow; for t2i the UNet's, 3500 at batch 256, after 1000 VAE steps).")] = None,
    seed: Annotated[int, typer.Option()] = 0,
    classifier: Annotated[Path, typer.Option(help="Classifier used to report the teacher's quality.")] = Path("data/classifier"),
    kind: Annotated[str, typer.Option(help="edm: a denoiser directory (EDM loss and preconditioning); vp: a DDPMPipeline folder (DDPM epsilon loss, Stable Diffusion's scaled_linear schedule); t2i: a StableDiffusionPipeline folder: AutoencoderKL, CLIPTextModel + its own tokenizer, UNet2DConditionModel, SD's schedule (reports a guidance sweep to <out>-quality.json); flow: a denoiser directory of a DiTTransformer2DModel trained as a class-conditional rectified flow (denoiser.json kind flow, Heun).")] = "edm",
) -> None:
    """Train a digits teacher with CFG dropout: class-conditional EDM, VP (a DDPMPipeline folder) or flow (a DiT), or text-to-image (t2i, a StableDiffusionPipeline folder)."""
    from . import toy

    def body() -> str:
        if kind not in ("edm", "vp", "t2i", "flow"):
            raise InputError(f"--kind {kind!r}: choose edm, vp, flow or t2i")
        if kind == "t2i":
            return toy.make_t2i_teacher(out, steps=steps or toy.T2ITraining.steps, seed=seed, classifier_dir=classifier)
        return toy.make_teacher(out, steps=steps or 4000, seed=seed, classifier_dir=classifier, kind=kind)

    guarded(body)


@toy_app.command("report")
def toy_report_command(
    teacher: Annotated[Path, typer.Option()] = Path("data/teacher"),
    classifier: Annotated[Path, typer.Option()] = Path("data/classifier"),
    steps: Annotated[int, typer.Option(min=1)] = 18,
    num_samples: Annotated[int, typer.Option(min=100)] = 2000,
    guidance_scale: Annotated[float, typer.Option()] = 1.0,
) -> None:
    """Measure a teacher's FD-digits and class accuracy at Heun-N (VP teachers: PLMS-N) against the real digits."""
    from . import toy

    guarded(lambda: toy.report(teacher, classifier, steps, num_samples, guidance_scale))


def stage_app(name: str) -> typer.Typer:
    """A one-command app for ``python -m stages.<name>`` / ``accelerate launch -m stages.<name>``."""
    single = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    single.command(name)(STAGE_COMMANDS[name])
    return single


def main() -> None:
    app()
