"""A local Prefect server for commands run without ``PREFECT_API_URL``.

Why not Prefect's own temporary server: it runs in the terminal's process group, so Ctrl-C stops it at
the same moment as the flow, and the flow then spends minutes retrying to report its end to a dead
server. This one runs in a session of its own, outlives the flow's clean-up, and is stopped last.

Starting: a PREFECT_HOME Prefect cannot use (a file, read-only, a database that is no SQLite file) is
refused before the server starts. The start is waited for as long as the server progresses (uses CPU
or writes output: a loaded machine can take minutes); it fails with one line naming the server's log
when the server exits, makes no progress for ``DMD_SERVER_START_STALL_S`` (120), or has not answered
after ``DMD_SERVER_START_LIMIT_S`` (1800). A port taken between choosing it and binding it is replaced.
Running: a watchdog notices the server exiting or not answering for ``DMD_SERVER_UNANSWERED_S`` (30);
`dmd run` then stops its stages and exits at once with one error line (:func:`end_run_without_server`).
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import httpx

from dmd_core.errors import InputError, shown
from stages.launch import free_port, kill_process_tree, signals_ignored

SERVER_COMMAND = [sys.executable, "-m", "prefect", "server", "start"]  # tests put a wrapper in front
START_STALL = ("DMD_SERVER_START_STALL_S", 120.0)  # no CPU used, no output written: a start that hangs
START_LIMIT = ("DMD_SERVER_START_LIMIT_S", 1800.0)  # however busy: a start that never ends
UNANSWERED = ("DMD_SERVER_UNANSWERED_S", 30.0)  # a running server whose health endpoint stays silent
EXIT_SERVER_LOST = 75  # sysexits' EX_TEMPFAIL: the run can be retried, and the rerun resumes
SQLITE_HEADER = b"SQLite format 3\x00"
PORT_ATTEMPTS = 3


class ServerDidNotStart(InputError, RuntimeError):
    """The local server exited, stalled or never answered; the message names its log.

    Also a RuntimeError: callers that run a server themselves (scripts/screenshot_dashboards.py) catch that."""


def seconds_setting(name: str, default: float) -> float:
    """A positive number of seconds from the environment variable ``name``; ``default`` when unset."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise InputError(f"{name}={shown(raw, 40)} is not a positive number of seconds. Fix: set it to one (default {default:g}), or unset it.")
    return value


def prefect_paths() -> tuple[Path, Path | None]:
    """(PREFECT_HOME, the SQLite database a local server would open, or None for another database), read
    from the environment and the profile now, as the server process will read them."""
    from prefect.settings import Settings
    from sqlalchemy.engine import make_url

    settings = Settings()
    home = Path(settings.home).expanduser()
    url = settings.server.database.connection_url
    if url is None:
        return home, None
    parsed = make_url(url.get_secret_value())
    if not parsed.drivername.startswith("sqlite") or parsed.database in (None, "", ":memory:"):
        return home, None
    return home, Path(parsed.database).expanduser()


def check_prefect_home(local: bool) -> None:
    """Refuse a PREFECT_HOME Prefect cannot use, before anything starts: the run's task results go there,
    and for a ``local`` server its database. Writability is probed by a temporary file: permission bits
    say nothing for root, nor for a read-only mount."""
    home, database = prefect_paths()
    name = f"PREFECT_HOME {shown(str(home))}"
    fix = "Fix: point PREFECT_HOME at a writable directory (export PREFECT_HOME=DIR), or unset it for ~/.prefect."
    if home.exists() and not home.is_dir():
        raise InputError(f"{name} is a file, not a directory. {fix}")
    try:
        home.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=home):
            pass
    except OSError as e:
        what = "cannot be created" if not home.is_dir() else "is not writable"
        raise InputError(f"{name} {what} ({e.strerror}). {fix}") from None
    if local and database is not None:
        check_database(database)


def check_database(database: Path) -> None:
    """The local server's SQLite file: a directory, a read-only file, or a file that is no SQLite database
    (its first 16 bytes) would fail the server's start. Only the header is read: the file can be large,
    and a running server may be using it."""
    name = f"the Prefect database {shown(str(database))} (under PREFECT_HOME)"
    fix = "Fix: move it away (Prefect makes a new one; past runs' history stays in the moved file), or point PREFECT_HOME at another directory."
    if database.is_dir():
        raise InputError(f"{name} is a directory. {fix}")
    if not database.exists():
        return
    try:
        with open(database, "rb") as f:
            header = f.read(len(SQLITE_HEADER))
    except OSError as e:
        raise InputError(f"{name} cannot be read ({e.strerror}). {fix}") from None
    if header and header != SQLITE_HEADER:  # an empty file is a new database to SQLite
        raise InputError(f"{name} is not a SQLite database (it starts {shown(header, 40)}). {fix}")
    if not os.access(database, os.W_OK):
        raise InputError(f"{name} is not writable. Fix: make it writable (chmod u+w), or point PREFECT_HOME at another directory.")


@contextmanager
def local_server(
    port: int | None = None,
    ui: bool = False,
    log: Path | None = None,
    home: Path | None = None,
    on_lost: Callable[[int, str, Path], None] | None = None,
) -> Iterator[str]:
    """``prefect server start`` on 127.0.0.1 in its own session; yields the API URL, stops it after.

    ``home``: its PREFECT_HOME (database), default the user's; ``log``: where its output goes, default a
    temporary file, removed after a clean stop and named in the error when the server fails.
    ``on_lost(pid, why, log)``: called once, from a watchdog thread, if the server exits or stops
    answering while the block runs. Raises :class:`ServerDidNotStart` when it does not start.
    """
    stall_s, limit_s, unanswered_s = (seconds_setting(*s) for s in (START_STALL, START_LIMIT, UNANSWERED))
    env = {**os.environ}
    env.pop("PREFECT_API_URL", None)
    if home is not None:
        env["PREFECT_HOME"] = str(home)
    if log is None:
        try:
            fd, name = tempfile.mkstemp(prefix="dmd-prefect-server-", suffix=".log")
        except OSError as e:
            raise InputError(f"no writable temporary directory for the Prefect server's log ({e}). Fix: export TMPDIR=DIR, a writable directory.") from None
        os.close(fd)
        log_path, keep_log = Path(name), False
    else:
        log_path, keep_log = Path(log), True
    proc = None
    try:
        for attempt in range(1, PORT_ATTEMPTS + 1):
            chosen = port or free_port()
            api = f"http://127.0.0.1:{chosen}/api"
            cmd = [*SERVER_COMMAND, "--host", "127.0.0.1", "--port", str(chosen), "--analytics-off", "--no-scheduler", "--no-late-runs"]
            cmd.append("--ui" if ui else "--no-ui")
            with open(log_path, "w") as out:  # the server holds its own copy of the descriptor
                # PREFECT_UI_API_URL: the UI must call this port, not 4200
                proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**env, "PREFECT_UI_API_URL": api}, start_new_session=True)
            failure = _wait_healthy(api, proc, log_path, stall_s, limit_s)
            if failure is None:
                break
            _stop(proc)
            proc = None
            if port is None and attempt < PORT_ATTEMPTS and "already in use" in _tail(log_path):
                continue  # taken since free_port() saw it free
            keep_log = True
            raise ServerDidNotStart(
                f"the local Prefect server did not start: {failure}. Fix: see its log {shown(str(log_path))} for the cause, "
                "or run against a Prefect server of your own (export PREFECT_API_URL=http://HOST:PORT/api)."
            )
        watchdog = _Watchdog(proc, api, unanswered_s, lambda why: on_lost(proc.pid, why, log_path)) if on_lost else None
        try:
            yield api
        finally:
            if watchdog is not None:
                watchdog.stop()
    finally:
        if proc is not None:
            _stop(proc)
        if not keep_log:
            log_path.unlink(missing_ok=True)


def _stop(proc: subprocess.Popen) -> None:
    kill_process_tree(proc.pid)  # the CLI and any children it started
    proc.wait()


def _exit_status(rc: int) -> str:
    return f"killed by signal {-rc}" if rc < 0 else f"exit status {rc}"


def _tail(log_path: Path, size: int = 65536) -> str:
    try:
        with open(log_path, "rb") as f:
            f.seek(max(0, os.path.getsize(log_path) - size))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def _last_error(log_path: Path) -> str:
    """The line of the server's output most likely to say why it failed: its last one naming an error."""
    lines = [line.strip() for line in _tail(log_path).splitlines() if line.strip()]
    named = [line for line in lines if "rror" in line or "in use" in line or "denied" in line.lower()]
    return shown((named or lines or [""])[-1], 160)


def _progress(proc: subprocess.Popen, log_path: Path) -> tuple[float, int]:
    """What a starting server has done so far: CPU seconds of its process tree, bytes of output."""
    import psutil

    cpu = 0.0
    try:
        root = psutil.Process(proc.pid)
        for p in [root, *root.children(recursive=True)]:
            try:
                t = p.cpu_times()
                cpu += t.user + t.system
            except psutil.NoSuchProcess:
                pass
    except psutil.NoSuchProcess:
        pass
    try:
        size = log_path.stat().st_size
    except OSError:
        size = 0
    return round(cpu, 2), size


def _wait_healthy(api: str, proc: subprocess.Popen, log_path: Path, stall_s: float, limit_s: float) -> str | None:
    """Poll the health endpoint while the server starts: None once it answers, else why it never will."""
    started = last_progress = time.monotonic()
    seen = _progress(proc, log_path)
    while True:
        rc = proc.poll()
        if rc is not None:
            return f"it exited during its start ({_exit_status(rc)}; its last error: {_last_error(log_path)})"
        try:  # trust_env=False: no proxy from the environment between this process and 127.0.0.1
            if httpx.get(f"{api}/health", timeout=2, trust_env=False).status_code == 200:
                return None
        except httpx.HTTPError:
            pass
        now = time.monotonic()
        mark = _progress(proc, log_path)
        if mark != seen:
            seen, last_progress = mark, now
        elif now - last_progress > stall_s:
            return f"it made no progress for {stall_s:g} s (neither CPU time nor output; {START_STALL[0]})"
        if now - started > limit_s:
            return f"it did not answer within {limit_s:g} s ({START_LIMIT[0]})"
        time.sleep(0.2)


class _Watchdog:
    """Calls ``on_lost(why)`` once, from its thread, when the server process exits or its health endpoint
    stays unanswered for ``unanswered_s``; :meth:`stop` ends the watch (before the server is stopped)."""

    POLL_S = 0.5  # how soon an exited server is noticed
    PROBE_EVERY_S = 2.0

    def __init__(self, proc: subprocess.Popen, api: str, unanswered_s: float, on_lost: Callable[[str], None]):
        self.proc, self.health, self.unanswered_s, self.on_lost = proc, f"{api}/health", unanswered_s, on_lost
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._watch, name="dmd-server-watchdog", daemon=True)
        self.thread.start()

    def _watch(self) -> None:
        last_answer = next_probe = time.monotonic()
        with httpx.Client(timeout=min(5.0, self.unanswered_s), trust_env=False) as client:
            while not self.stopped.wait(self.POLL_S):
                rc = self.proc.poll()
                if rc is not None:
                    return self._lost(_exit_status(rc))
                if time.monotonic() < next_probe:
                    continue
                try:
                    if client.get(self.health).status_code == 200:
                        last_answer = time.monotonic()
                except httpx.HTTPError:
                    pass
                next_probe = time.monotonic() + self.PROBE_EVERY_S
                if time.monotonic() - last_answer > self.unanswered_s and self.proc.poll() is None:
                    return self._lost(f"it did not answer for {self.unanswered_s:g} s")

    def _lost(self, why: str) -> None:
        if not self.stopped.is_set():
            self.on_lost(why)

    def stop(self) -> None:
        self.stopped.set()
        if self.thread is not threading.current_thread():
            self.thread.join()


def _drain_prefect_clients() -> None:
    """Send queued run logs and events while the server is still up (as prefect_test_harness does)."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        worker.drain_all(timeout=10)


def end_run_without_server(command: str, finished: threading.Event) -> Callable[[int, str, Path], None]:
    """The CLI's answer to a server lost before ``finished`` is set: stop this process's stages, print one
    line, exit now.

    Exiting from here rather than raising into the flow: Prefect would spend minutes retrying to report
    each state to a server that is gone, then print its tracebacks. Nothing in this process holds store
    work in progress (stages run in subprocesses; SIGTERM makes them keep what they finished, and the
    store's own writes are atomic), so the rerun resumes where the run stopped.
    """

    def lost(pid: int, why: str, log_path: Path) -> None:
        import psutil

        if finished.is_set():  # the flow has its result: only the queued logs are lost (drained with a timeout)
            return
        terminal = os.dup(2)
        sys.stdout.flush(), sys.stderr.flush()
        # From here on the flow's threads report their failures to nobody: its one line is this one.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1), os.dup2(devnull, 2)
        try:
            psutil.Process(pid).kill()  # a server that stopped answering; it serves no one now
        except psutil.NoSuchProcess:
            pass
        kill_process_tree(os.getpid(), include_root=False)  # the stages: SIGTERM, SIGKILL after 10 s
        clear = "\r\x1b[K" if os.isatty(terminal) else ""  # an in-place status line would hold the cursor
        line = (
            f"error: the local Prefect server (pid {pid}) stopped during the run ({why}); finished work is kept in the store. "
            f"Fix: rerun the same `{command}` command (it resumes); the server's output is in {shown(str(log_path))}"
        )
        os.write(terminal, f"{clear}{line}\n".encode())
        os._exit(EXIT_SERVER_LOST)

    return lost


@contextmanager
def prefect_api(command: str = "dmd run") -> Iterator[bool]:
    """Where flows run: ``PREFECT_API_URL`` when set (yields False), else a :func:`local_server` (yields True)
    that ends the ``command`` with one error line if it is lost mid-run (:func:`end_run_without_server`)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    local = not PREFECT_API_URL.value()
    check_prefect_home(local)
    if not local:
        yield False
        return
    finished = threading.Event()
    with local_server(on_lost=end_run_without_server(command, finished)) as api, temporary_settings(updates={PREFECT_API_URL: api}):
        try:
            yield True
        finally:
            finished.set()
            # Still inside these settings: drained outside them, the queued logs and events would
            # make Prefect start its own temporary server (seconds) just to receive them.
            with signals_ignored(signal.SIGINT, signal.SIGTERM):
                _drain_prefect_clients()
