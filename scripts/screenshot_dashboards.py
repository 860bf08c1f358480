"""Run the pipeline against a real Prefect server and screenshot its dashboards with headless Chromium.

Starts ``prefect server start`` with its UI on a free port (``flows.server.local_server``, throwaway
PREFECT_HOME), runs ``dmd run`` against it with a fresh store, finds the flow run and its artifacts, and saves PNGs of the flow run page and of every
artifact page plus ``index.json`` (url -> png) in the output folder. The server is always stopped.

Example (quick, ~1-2 min on 2 cores):
    python scripts/screenshot_dashboards.py --set distill.steps=100 \\
        --set generate.num_samples=512 --set evaluate.num_samples=512

A pair of runs, the second worse (fewer distill steps), as a nightly schedule would make them: the pages of the
second run show it Not promoted, its dmd-promotion artifact why, and dmd-trends both runs:
    python scripts/screenshot_dashboards.py --set distill.steps=200 --set export.promote_if='fd_ratio <= 1.1 * promoted' \\
        --then-set distill.steps=20
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
VENV = ROOT / ".venv"
BIN = VENV / "bin" if (VENV / "bin" / "dmd").is_file() else Path(sys.executable).parent
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


class Failure(Exception):
    """A short, user-facing reason to exit non-zero."""








def start_pipeline(args: argparse.Namespace, env: dict[str, str], sets: list[str]) -> subprocess.Popen:
    """``dmd run`` against the server, in its own process group so that we decide when it stops."""
    cmd = [str(BIN / "dmd"), "run", "--set", f"store={args.store}"]
    cmd += ["--config", args.config] if args.config else []
    for s in sets:
        cmd += ["--set", s]
    print("+", " ".join(cmd), flush=True)
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, start_new_session=True)


def stream(proc: subprocess.Popen, log: Path) -> int:
    """Copy the output of ``proc`` to the console and to ``log``; its exit code."""
    with log.open("w") as f:
        for line in proc.stdout:
            sys.stdout.write(line)
            f.write(line)
    return proc.wait()


def find_run(api: str) -> tuple[dict, list[dict]]:
    """The newest ``dmd-pipeline`` flow run and its artifacts (latest version per key)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, FlowFilter, FlowFilterName
    from prefect.client.schemas.sorting import ArtifactSort, FlowRunSort
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=["dmd-pipeline"])), sort=FlowRunSort.START_TIME_DESC, limit=1
        )
        if not runs:
            raise Failure("no dmd-pipeline flow run found on the server")
        run = runs[0]
        arts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run.id])), sort=ArtifactSort.CREATED_DESC
        )
    latest: dict[str, dict] = {}
    for a in arts:
        name = a.key or str(a.id)[:8]  # keyless artifacts (none expected) are named by id
        latest.setdefault(name, {"name": name, "id": str(a.id), "key": a.key, "type": a.type})
    info = {"id": str(run.id), "name": run.name, "state": run.state.type.value if run.state else None}
    return info, sorted(latest.values(), key=lambda a: a["name"])


def screenshot(chromium: str, url: str, png: Path, args: argparse.Namespace) -> bool:
    """One page -> PNG in a fresh profile; virtual time lets the single-page app fetch and render first."""
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        cmd = [
            chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
            f"--user-data-dir={profile}", f"--virtual-time-budget={args.budget_ms}",
            f"--window-size={args.window_size}", f"--screenshot={png}", url,
        ]  # fmt: skip
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=args.budget_ms / 1000 + 90)
        except subprocess.TimeoutExpired:
            r = None
    ok = r is not None and r.returncode == 0 and png.is_file() and png.stat().st_size > 0
    print(f"{'ok' if ok else 'FAILED'}: {url} -> {png}", flush=True)
    if not ok and r is not None:
        print(r.stderr[-2000:], file=sys.stderr)
    return ok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "dashboards", help="output folder (default: runs/dashboards)")
    ap.add_argument("--config", "-c", help="pipeline YAML passed to `dmd run --config` (default: the embedded data/digits.yaml)")
    ap.add_argument("--set", "-s", action="append", default=[], metavar="KEY=VALUE", help="passed to `dmd run --set` (repeatable)")
    ap.add_argument("--then-set", action="append", default=[], metavar="KEY=VALUE",
                    help="run again with these overrides on top of --set (repeatable); the pages are the second run's")
    ap.add_argument("--store", type=Path, help="pipeline store, i.e. --set store=... (default: OUT/store, reused by reruns into the same OUT)")
    ap.add_argument("--port", type=int, default=0, help="Prefect server port (default: a free one)")
    ap.add_argument("--ui", choices=["v1", "v2"], default="v2",
                    help="Prefect UI to capture: v2 (default, under /v2) or v1 (whose ?tab=Artifacts falls back to Logs)")
    ap.add_argument("--window-size", default="1400,1800", help="browser viewport W,H in pixels (default: 1400,1800)")
    ap.add_argument("--budget-ms", type=int, default=15000, help="Chromium --virtual-time-budget per page (default: 15000)")
    ap.add_argument("--chromium", help="Chromium binary (default: the first of %s on PATH)" % ", ".join(CHROMIUM_NAMES))
    args = ap.parse_args()

    chromium = args.chromium or next(filter(None, map(shutil.which, CHROMIUM_NAMES)), None)
    if not chromium or not shutil.which(chromium):
        raise Failure("Chromium not found. Fix: apt-get update && apt-get install -y chromium (or pass --chromium PATH)")
    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    args.store = (args.store or out / "store").resolve()
    from flows.server import local_server

    server_log = out / "server.log"
    with tempfile.TemporaryDirectory(prefix="prefect-home-") as home:
        print(f"starting prefect server (PREFECT_HOME={home}, log {server_log})", flush=True)
        try:
            with local_server(args.port or None, ui=True, log=server_log, home=Path(home)) as api:
                return run_and_shoot(args, chromium, out, api, home)
        except RuntimeError as e:  # the server did not start
            raise Failure(str(e)) from None


def run_and_shoot(args: argparse.Namespace, chromium: str, out: Path, api: str, home: str) -> int:
    """``dmd run`` against ``api``, then one screenshot per page of its flow run and artifacts."""
    import httpx

    from stages.launch import kill_process_tree

    base = api.removesuffix("/api")
    env = {**os.environ, "PREFECT_HOME": home, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_API_URL": api}
    runs = [(args.set, out / "dmd-run.log")] + ([(args.set + args.then_set, out / "dmd-run-2.log")] if args.then_set else [])
    for sets, log in runs:
        dmd: subprocess.Popen | None = None
        try:
            t0 = time.monotonic()
            dmd = start_pipeline(args, env, sets)
            rc = stream(dmd, log)
            print(f"dmd run exited with {rc} after {time.monotonic() - t0:.0f} s", flush=True)
        finally:
            # An interrupted run is stopped while the server is still up, so it can report its end.
            if dmd is not None and dmd.poll() is None:
                kill_process_tree(dmd.pid, grace_s=60)
                dmd.wait()
        if rc == 1 and "not promoted:" in log.read_text():
            rc = 0  # export.on_not_promoted=fail: the run ended Failed "Not promoted", as asked
        if rc != 0:
            break
    try:
        httpx.get(f"{api}/health", timeout=5).raise_for_status()
    except httpx.HTTPError:
        raise Failure(f"the prefect server died during the run; see {out / 'server.log'}") from None
    run, artifacts = find_run(api)
    ui = base + ("/v2" if args.ui == "v2" else "")
    pages = {"flow-run": f"{ui}/runs/flow-run/{run['id']}", "flow-run-artifacts": f"{ui}/runs/flow-run/{run['id']}?tab=Artifacts"}
    for a in artifacts:
        pages[f"artifact-{a['name']}"] = f"{ui}/artifacts/artifact/{a['id']}"
        if a["type"] == "table":  # the table view scrolls sideways; the Raw tab shows every column
            pages[f"artifact-{a['name']}-raw"] = f"{ui}/artifacts/artifact/{a['id']}?tab=Raw"
    for key in ("dmd-metrics", "dmd-trends"):  # a key's page: its versions across runs
        if any(a["key"] == key for a in artifacts):
            pages[f"key-{key}"] = f"{ui}/artifacts/key/{key}"
    shots = {url: f"{name}.png" for name, url in pages.items() if screenshot(chromium, url, out / f"{name}.png", args)}
    index = {"flow_run": run, "artifacts": artifacts, "ui": args.ui, "screenshots": shots, "dmd_run_exit_code": rc}
    (out / "index.json").write_text(json.dumps(index, indent=2) + "\n")
    print(f"{len(shots)}/{len(pages)} screenshots in {out} (index.json)", flush=True)
    if rc != 0:
        raise Failure(f"dmd run failed (exit {rc}); see {log}")
    if len(shots) < len(pages):
        raise Failure("some screenshots failed (see above)")
    return 0


if __name__ == "__main__":
    if (VENV / "bin" / "python").is_file() and Path(sys.prefix).resolve() != VENV.resolve():
        os.execv(VENV / "bin" / "python", [str(VENV / "bin" / "python"), *sys.argv])  # prefect is imported from the venv
    try:
        sys.exit(main())
    except Failure as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
