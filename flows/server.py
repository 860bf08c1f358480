"""A local Prefect server for commands run without ``PREFECT_API_URL``.

Why not Prefect's own temporary server: it runs in the terminal's process group, so Ctrl-C stops it at
the same moment as the flow, and the flow then spends minutes retrying to report its end to a dead
server. This one runs in a session of its own, outlives the flow's clean-up, and is stopped last.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import httpx

from stages.launch import free_port, kill_process_tree, signals_ignored

STARTUP_TIMEOUT_S = 90


@contextmanager
def local_server(port: int | None = None, ui: bool = False, log: Path | None = None, home: Path | None = None) -> Iterator[str]:
    """``prefect server start`` on 127.0.0.1 in its own session; yields the API URL, stops it after.

    ``home``: its PREFECT_HOME (database), default the user's; ``log``: where its output goes.
    """
    port = port or free_port()
    api = f"http://127.0.0.1:{port}/api"
    cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port), "--analytics-off", "--no-scheduler", "--no-late-runs"]
    cmd.append("--ui" if ui else "--no-ui")
    env = {**os.environ, "PREFECT_UI_API_URL": api}  # the UI must call this port, not 4200
    env.pop("PREFECT_API_URL", None)
    if home is not None:
        env["PREFECT_HOME"] = str(home)
    with open(log, "w+") if log else tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            _wait_healthy(api, proc, out)
            yield api
        finally:
            kill_process_tree(proc.pid)  # the CLI and its uvicorn child
            proc.wait()


def _wait_healthy(api: str, proc: subprocess.Popen, out) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        try:
            if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    out.flush()
    out.seek(0)
    tail = out.read()[-2000:]
    raise RuntimeError(f"the local Prefect server at {api} did not start within {STARTUP_TIMEOUT_S} s:\n{tail}")


def _drain_prefect_clients() -> None:
    """Send queued run logs and events while the server is still up (as prefect_test_harness does)."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        worker.drain_all(timeout=10)


@contextmanager
def prefect_api() -> Iterator[bool]:
    """Where flows run: ``PREFECT_API_URL`` when set (yields False), else a :func:`local_server` (yields True)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if PREFECT_API_URL.value():
        yield False
        return
    with local_server() as api, temporary_settings(updates={PREFECT_API_URL: api}):
        try:
            yield True
        finally:
            # Still inside these settings: drained outside them, the queued logs and events would
            # make Prefect start its own temporary server (seconds) just to receive them.
            with signals_ignored(signal.SIGINT, signal.SIGTERM):
                _drain_prefect_clients()
