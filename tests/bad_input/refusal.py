"""The one check every bad-input case makes: exit 2, one ``error:`` line naming the problem and the fix,
no traceback, nothing printed on stdout, and nothing new under a final name in the store.

Cases run the ``dmd`` command in this process (typer's CliRunner), so a table of 60+ cases costs
seconds, not an interpreter start each; ``subprocess=True`` runs the real entry point instead.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parents[2]


def final_names(store: Path) -> set[str]:
    """Every path below ``store`` without a hidden component, except the bare stage directories that
    hold outputs (``<store>/distill/`` may appear for a hidden partial build): what a reader may take as finished."""
    if not store.is_dir():
        return set()
    out = set()
    for p in store.rglob("*"):
        rel = p.relative_to(store)
        if not any(part.startswith(".") for part in rel.parts) and (len(rel.parts) > 1 or p.is_file()):
            out.add(str(rel))
    return out


def every_path(store: Path) -> set[str]:
    """Every path below ``store``, hidden ones included (a stage that starts builds its partial directory here),
    except the digests of inputs outside the store (``.digests/``), which the checks before any stage hash."""
    if not store.is_dir():
        return set()
    return {str(rel) for rel in (p.relative_to(store) for p in store.rglob("*")) if rel.parts[0] != ".digests"}


@contextmanager
def nothing_started(store: Path) -> Iterator[None]:
    """Fails unless the block starts no process (a stage under accelerate, a Prefect server, a stage task) and
    leaves ``store`` as it was, hidden paths included (an in-process stage writes its partial build first):
    a refusal comes before any work, checked without a clock."""
    before = every_path(store)
    started: list = []
    real = subprocess.Popen

    class Recording(real):  # subprocess.run starts its process through subprocess.Popen too
        def __init__(self, args, *a, **k):
            started.append(args)
            super().__init__(args, *a, **k)

    subprocess.Popen = Recording
    try:
        yield
    finally:
        subprocess.Popen = real
    assert not started, f"refused, yet processes were started: {started}"
    new = every_path(store) - before
    assert not new, f"refused, yet paths were written under the store: {sorted(new)[:10]}"


def invoke(args: list[str], env: dict | None = None, subprocess_: bool = False, cwd: Path | None = None) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``dmd <args>``; an exception escaping the command counts as a traceback."""
    if subprocess_:
        proc = subprocess.run([sys.executable, "-m", "flows", *args], capture_output=True, text=True, cwd=cwd or ROOT,
                              env={**os.environ, **(env or {})}, timeout=300)  # fmt: skip
        return proc.returncode, proc.stdout, proc.stderr
    from flows.cli import app

    old = Path.cwd()
    if cwd is not None:
        os.chdir(cwd)
    try:
        res = CliRunner().invoke(app, args, env=env, catch_exceptions=True)
    finally:
        os.chdir(old)
    err = res.stderr
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        import traceback

        err += "Traceback (escaped the command):\n" + "".join(traceback.format_exception(res.exception))
    return res.exit_code, res.stdout, err


def assert_refused(args: list[str], store: Path, *needles: str, env: dict | None = None, subprocess_: bool = False, cwd: Path | None = None) -> str:
    """Run ``dmd <args>`` and check the refusal; returns the error line."""
    before = final_names(store)
    code, out, err = invoke(args, env, subprocess_, cwd)
    assert "Traceback" not in err, err[-4000:]
    assert code == 2, f"exit {code}, expected 2:\n{err[-3000:]}"
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, f"expected one error: line, got {len(errors)}:\n{err}"
    line = errors[0]
    assert "Fix" in line or "fix" in line, f"the error names no fix: {line}"
    for needle in needles:
        assert needle in line, f"{needle!r} not in: {line}"
    assert out.strip() == "", f"stdout should be empty on refusal: {out!r}"
    new = final_names(store) - before
    assert not new, f"refused, yet new paths under final names in the store: {sorted(new)[:10]}"
    return line


def read_only_dir(path: Path) -> Path:
    """A directory this process cannot write into: chmod 0o555, or (root ignores it) a read-only tmpfs mount."""
    path.mkdir()
    path.chmod(0o555)
    try:
        (path / ".probe").touch()
    except OSError:
        return path
    (path / ".probe").unlink()
    path.chmod(0o755)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(path)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"root ignores chmod and a read-only mount failed: {r.stderr.strip()}")
    return path


def snapshot(root: Path) -> dict[str, str]:
    """Every path below ``root``, links not followed: a file's sha256, a link's target, or 'dir'."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            rel = str(p.relative_to(root))
            found[rel] = f"-> {os.readlink(p)}" if p.is_symlink() else "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return found
