"""Run the pipeline against a real Prefect server and screenshot its dashboards with headless Chromium.

Starts ``prefect server start`` on a free port (throwaway PREFECT_HOME), runs ``dmd run`` against it with
a fresh store, finds the flow run and its artifacts, and saves PNGs of the flow run page and of every
artifact page plus ``index.json`` (url -> png) in the output folder. The server is always stopped.

Example (quick, ~1-2 min on 2 cores):
    python scripts/screenshot_dashboards.py --set distill.steps=100 \\
        --set generate.num_samples=512 --set evaluate.num_samples=512
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / ".venv"
BIN = VENV / "bin" if (VENV / "bin" / "dmd").is_file() else Path(sys.executable).parent
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


class Failure(Exception):
    """A short, user-facing reason to exit non-zero."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    """Poll ``url`` until it answers 200; fail early if the server process dies."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise Failure(f"prefect server exited with code {proc.returncode}; see {log}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise Failure(f"prefect server did not answer {url} within {timeout:.0f} s; see {log}")


def run_pipeline(args: argparse.Namespace, env: dict[str, str], log: Path) -> int:
    """``dmd run`` with the server's API; its output goes to the console and to ``log``."""
    cmd = [str(BIN / "dmd"), "run", "--set", f"store={args.store}"]
    cmd += ["--config", args.config] if args.config else []
    for s in args.set:
        cmd += ["--set", s]
    print("+", " ".join(cmd), flush=True)
    with log.open("w") as f, subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1) as p:
        for line in p.stdout:
            sys.stdout.write(line)
            f.write(line)
    return p.returncode


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
    ap.add_argument("--store", type=Path, help="pipeline store, i.e. --set store=... (default: OUT/store, reused by reruns into the same OUT)")
    ap.add_argument("--port", type=int, default=0, help="Prefect server port (default: a free one)")
    ap.add_argument("--ui", choices=["v1", "v2"], default="v2",
                    help="Prefect UI to capture: v2 (default, under /v2) or v1 (whose ?tab=Artifacts falls back to Logs)")
    ap.add_argument("--window-size", default="1400,1800", help="browser viewport W,H in pixels (default: 1400,1800)")
    ap.add_argument("--budget-ms", type=int, default=15000, help="Chromium --virtual-time-budget per page (default: 15000)")
    ap.add_argument("--server-timeout", type=float, default=90, help="seconds to wait for the server's /api/health")
    ap.add_argument("--chromium", help="Chromium binary (default: the first of %s on PATH)" % ", ".join(CHROMIUM_NAMES))
    args = ap.parse_args()

    chromium = args.chromium or next(filter(None, map(shutil.which, CHROMIUM_NAMES)), None)
    if not chromium or not shutil.which(chromium):
        raise Failure("Chromium not found. Fix: apt-get update && apt-get install -y chromium (or pass --chromium PATH)")
    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    args.store = (args.store or out / "store").resolve()
    port = args.port or free_port()
    base, api = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{port}/api"
    home = Path(tempfile.mkdtemp(prefix="prefect-home-"))
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_API_URL": api}
    env.pop("PREFECT_API_URL", None)  # the server must not think it is a client of another one
    server_log = out / "server.log"
    print(f"starting prefect server on {base} (PREFECT_HOME={home}, log {server_log})", flush=True)
    with server_log.open("w") as slog:
        server = subprocess.Popen(
            [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=env, stdout=slog, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        wait_healthy(f"{api}/health", server, server_log, args.server_timeout)
        t0 = time.monotonic()
        rc = run_pipeline(args, {**env, "PREFECT_API_URL": api}, out / "dmd-run.log")
        print(f"dmd run exited with {rc} after {time.monotonic() - t0:.0f} s", flush=True)
        run, artifacts = find_run(api)
        ui = base + ("/v2" if args.ui == "v2" else "")
        pages = {"flow-run": f"{ui}/runs/flow-run/{run['id']}", "flow-run-artifacts": f"{ui}/runs/flow-run/{run['id']}?tab=Artifacts"}
        for a in artifacts:
            pages[f"artifact-{a['name']}"] = f"{ui}/artifacts/artifact/{a['id']}"
            if a["type"] == "table":  # the table view scrolls sideways; the Raw tab shows every column
                pages[f"artifact-{a['name']}-raw"] = f"{ui}/artifacts/artifact/{a['id']}?tab=Raw"
        if any(a["key"] == "dmd-metrics" for a in artifacts):
            pages["key-dmd-metrics"] = f"{ui}/artifacts/key/dmd-metrics"
        shots = {url: f"{name}.png" for name, url in pages.items() if screenshot(chromium, url, out / f"{name}.png", args)}
        index = {"flow_run": run, "artifacts": artifacts, "ui": args.ui, "screenshots": shots, "dmd_run_exit_code": rc}
        (out / "index.json").write_text(json.dumps(index, indent=2) + "\n")
        print(f"{len(shots)}/{len(pages)} screenshots in {out} (index.json)", flush=True)
        if rc != 0:
            raise Failure(f"dmd run failed (exit {rc}); see {out / 'dmd-run.log'}")
        if len(shots) < len(pages):
            raise Failure("some screenshots failed (see above)")
        return 0
    finally:
        try:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=20)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        shutil.rmtree(home, ignore_errors=True)


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
