"""The ``dmd`` command: the stage commands plus ``dmd run``, the Prefect flow."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from stages.cli import ConfigOpt, ProcOpt, SetOpt, app, guarded

from stages.contract import ORDER as STAGE_NAMES


@app.command("run")
def run_command(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    only: Annotated[Optional[str], typer.Option("--only", help=f"Run one stage ({', '.join(STAGE_NAMES)}) from the store's upstream outputs.")] = None,
    refresh: Annotated[Optional[list[str]], typer.Option("--refresh", help="Force this stage (and every later one) to recompute; repeatable.")] = None,
    num_processes: ProcOpt = 1,
) -> None:
    """Run the pipeline as the Prefect flow `dmd-pipeline` (on its own local Prefect server unless PREFECT_API_URL is set).

    Stages whose outputs are complete in the store are Cached; prints the export directory (with --only,
    that stage's output) as the last line on stdout.
    """
    from dmd_core.errors import InputError

    def body() -> str:
        # Everything that can be refused is checked before the Prefect server starts (seconds, and its logs).
        for name in [only, *(refresh or [])]:
            if name is not None and name not in STAGE_NAMES:
                flag = "--only" if name == only else "--refresh"
                raise InputError(f"{flag}: unknown stage {name!r}. Fix: choose from {', '.join(STAGE_NAMES)}")
        from stages import chain
        from stages.config import load_config
        from stages.store import open_store

        cfg = load_config(config, set_ or [])
        open_store(cfg.store).check_writable()
        if only is not None:  # one stage from the store: its upstream outputs must be there
            chain.plan(cfg, only, num_processes)
        else:  # the teacher and every stage's settings
            chain.check(cfg, STAGE_NAMES[-1], num_processes)
        from prefect.exceptions import FailedRun

        from .pipeline import dmd_pipeline, where_dashboards_are
        from .server import prefect_api

        try:
            with prefect_api("dmd run") as local:
                result = dmd_pipeline(config=str(config) if config else None, overrides=set_ or [], only=only, refresh=refresh or [], num_processes=num_processes)
        except RuntimeError as e:
            raise InputError(str(e)) from None
        except FailedRun as e:  # export.on_not_promoted=fail: the export is kept, the run is Failed "Not promoted"
            print(f"not promoted: {e}", file=sys.stderr)
            raise typer.Exit(1) from None
        if "promotion" in result:
            print(f"{'promoted' if result['promotion']['promoted'] else 'not promoted'}: {result['promotion']['reason']}", file=sys.stderr)
        print(where_dashboards_are(result["flow_run_id"], local), file=sys.stderr)
        return result["outputs"][only or "export"]

    guarded(body, kill_children_on_sigterm=False)  # the flow stops its stages; server.py its server


@app.command("schedule")
def schedule_command(
    cron: Annotated[str, typer.Option("--cron", help='Cron expression, e.g. "0 3 * * *" (03:00 every day, UTC).')],
    config: ConfigOpt = None,
    set_: SetOpt = None,
    name: Annotated[str, typer.Option(help="Deployment name.")] = "dmd-pipeline-scheduled",
) -> None:
    """Serve the pipeline as a scheduled deployment (`flow.serve`): this process runs each scheduled run.

    Needs a Prefect server (PREFECT_API_URL); for work pools use `prefect deploy --all` with prefect.yaml.
    """
    from prefect import serve
    from prefect.settings import PREFECT_API_URL

    from dmd_core.errors import InputError
    from stages.config import load_config

    from .pipeline import scheduled_deployment

    def body() -> None:
        if not PREFECT_API_URL.value():
            raise InputError(
                "dmd schedule needs a Prefect server that outlives it. Fix: run `prefect server start` and "
                "export PREFECT_API_URL=http://127.0.0.1:4200/api (README: Dashboards)"
            )
        load_config(config, set_ or [])  # a bad config fails now, not at the first scheduled run
        try:
            deployment = scheduled_deployment(cron, str(config) if config else None, set_ or [], name)
        except ValueError:
            raise InputError(f'invalid --cron {cron!r}. Fix: five fields "minute hour day month weekday", e.g. "0 3 * * *"') from None
        serve(deployment)

    guarded(body, kill_children_on_sigterm=False)  # the flow stops its stages; server.py its server


@app.command("demo")
def demo_command() -> None:
    """The pipeline on the embedded default (digits) through the Prefect flow, then the results table."""

    def body() -> str:
        from stages.config import load_config
        from stages.evaluate import results_table
        from stages.store import open_store

        from .pipeline import dmd_pipeline, where_dashboards_are
        from .server import prefect_api

        with prefect_api("dmd demo") as local:
            result = dmd_pipeline()
        out = result["outputs"]
        table = results_table(open_store(load_config(None).store).read_manifest(Path(out["evaluate"])))
        print(
            f"\n{table}\n\nsample grid: {out['evaluate']}/grid.png\nexport:      {out['export']}\n"
            f"model card:  {out['export']}/README.md\n{where_dashboards_are(result['flow_run_id'], local)}",
            file=sys.stderr,
        )
        return out["export"]

    guarded(body, kill_children_on_sigterm=False)  # the flow stops its stages; server.py its server


def main() -> None:
    import os

    # Prefect's temporary server: no telemetry writes (they can log a harmless SQLite "database is locked").
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    app()


if __name__ == "__main__":  # `python -m flows.cli ...` is `dmd ...`
    main()
