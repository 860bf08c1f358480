"""The ``dmd`` command line: one subcommand per stage, plus the embedded default's helpers."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from types import ModuleType
from typing import Annotated, Callable, Optional

import typer

from dmd_core.errors import InputError

from .config import load_config
from .launch import distributed_env, exit_with_parent, finish_distributed, terminate_on_sigterm

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


def setup_logging() -> None:
    logger = logging.getLogger("dmd")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("dmd: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def guarded(body: Callable[[], Optional[str]], kill_children_on_sigterm: bool = True) -> None:
    """Run a command body; InputError -> one line on stderr and exit 2; print the returned path last on stdout."""
    setup_logging()
    exit_with_parent()
    terminate_on_sigterm(kill_children_on_sigterm)
    try:
        out = body()
    except InputError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        typer.echo("interrupted: finished work is kept; rerun the same command to resume", err=True)
        raise typer.Exit(130) from None
    if out is not None:
        typer.echo(out)


def stage_command(load: Callable[[], ModuleType], doc: str) -> Callable[..., None]:
    """A CLI command for a stage module (``STAGE``, ``run``, ``run_distributed``): same options for every stage."""

    def command(config: ConfigOpt = None, set_: SetOpt = None, num_processes: ProcOpt = 1, quiet: QuietOpt = False) -> None:
        def body() -> Optional[str]:
            stage = load()
            cfg = load_config(config, set_ or [])
            if distributed_env()[1] > 1:  # this process is one rank under accelerate launch
                m = stage.run_distributed(cfg, progress=not quiet)
                finish_distributed()
            else:
                m = stage.run(cfg, num_processes, progress=not quiet)
            return None if m is None else str(Path(cfg.store) / stage.STAGE / m.key)

        guarded(body)

    command.__doc__ = doc
    return command


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


STAGE_COMMANDS = {
    "generate": stage_command(
        _generate,
        """Solve the teacher's ODE from seeded noise and write (noise, image, class) WebDataset shards.

        The output directory is content-addressed in the store and printed as the last line on stdout;
        a rerun reuses a complete output and resumes an interrupted one.""",
    ),
    "distill": stage_command(
        _distill,
        """Train the one-step generator with DMD (distribution matching + regression), on Accelerate.

        Finds the pairs for this config in the store (or makes them with generate), trains, and prints
        the output directory (generator/, metrics.parquet, samples.png) as the last line on stdout.
        An interrupted run resumes from its last checkpoint when rerun.""",
    ),
    "evaluate": stage_command(
        _evaluate,
        """Measure the one-step generator against its teacher: Fréchet distance, class accuracy, speed.

        Writes metrics.json (teacher_fd, student_fd, fd_ratio, class accuracies, teacher_nfe, speedup),
        metrics.parquet and grid.png (teacher | student); prints the output directory last on stdout.
        The teacher's numbers and the reference statistics are computed once and cached in the store.""",
    ),
    "export": stage_command(
        _export,
        """Write the one-step generator for others: diffusers layout, OneStepPipeline, ONNX, model card.

        Evaluates first if needed; checks ONNX against PyTorch and a fresh-process reload bit for bit;
        prints the export directory (with README.md, the model card) as the last line on stdout.""",
    ),
}

app = typer.Typer(
    name="dmd",
    help="Distil a diffusion model into a one-step generator (DMD). Stages: generate -> distill -> evaluate -> export.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
for _name, _fn in STAGE_COMMANDS.items():
    app.command(_name)(_fn)

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
    steps: Annotated[int, typer.Option(min=1)] = 4000,
    seed: Annotated[int, typer.Option()] = 0,
    classifier: Annotated[Path, typer.Option(help="Classifier used to report the teacher's quality.")] = Path("data/classifier"),
) -> None:
    """Train the class-conditional digits teacher (EDM loss and preconditioning, label dropout for CFG)."""
    from . import toy

    guarded(lambda: toy.make_teacher(out, steps=steps, seed=seed, classifier_dir=classifier))


@toy_app.command("report")
def toy_report_command(
    teacher: Annotated[Path, typer.Option()] = Path("data/teacher"),
    classifier: Annotated[Path, typer.Option()] = Path("data/classifier"),
    steps: Annotated[int, typer.Option(min=1)] = 18,
    num_samples: Annotated[int, typer.Option(min=100)] = 2000,
    guidance_scale: Annotated[float, typer.Option()] = 1.0,
) -> None:
    """Measure a teacher's FD-digits and class accuracy at Heun-N against the real digits."""
    from . import toy

    guarded(lambda: toy.report(teacher, classifier, steps, num_samples, guidance_scale))


def stage_app(name: str) -> typer.Typer:
    """A one-command app for ``python -m stages.<name>`` / ``accelerate launch -m stages.<name>``."""
    single = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    single.command(name)(STAGE_COMMANDS[name])
    return single


def main() -> None:
    app()
