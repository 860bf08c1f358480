"""Deployment files: the Prefect API stays on loopback unless asked, secrets stay out of the image,
and ``python -m flows.cli`` is the ``dmd`` command."""

from __future__ import annotations

import fnmatch
import os
import re
import shutil
import subprocess
import sys

import pytest
import yaml
from conftest import ROOT


def compose_defaults(text: str) -> str:
    """The compose file as docker-compose reads it with no variables set: ``${VAR:-default}`` -> default."""
    return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", text)


def test_prefect_api_is_published_on_loopback_only():
    spec = yaml.safe_load(compose_defaults((ROOT / "docker-compose.yml").read_text()))
    for name, service in spec["services"].items():
        for port in service.get("ports", []):
            host_ip = str(port).rsplit(":", 2)[0] if str(port).count(":") >= 2 else "0.0.0.0"
            assert host_ip == "127.0.0.1", f"{name} publishes {port} on every interface"


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="Debian's docker-compose is not installed (.ci/run installs it)")
def test_docker_compose_resolves_the_loopback_binding(tmp_path):
    env = tmp_path / ".env"
    env.write_text("POSTGRES_PASSWORD=secret\nPREFECT_SERVER_API_AUTH_STRING=admin:pass\n")
    clean = {k: v for k, v in os.environ.items() if k != "PREFECT_BIND"}
    out = subprocess.run(["docker-compose", "--env-file", str(env), "-f", str(ROOT / "docker-compose.yml"), "config"],
                         capture_output=True, text=True, env=clean, check=True).stdout  # fmt: skip
    ports = yaml.safe_load(out)["services"]["server"]["ports"]
    assert [str(p).split(":")[0] if isinstance(p, str) else p.get("host_ip") for p in ports] == ["127.0.0.1"], ports


def test_dockerignore_keeps_secrets_and_local_state_out():
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines() if line.strip() and not line.startswith("#")]

    def ignored(name: str) -> bool:
        last = None
        for p in patterns:  # docker: the last matching pattern wins, `!` re-includes
            if fnmatch.fnmatch(name, p.lstrip("!")):
                last = not p.startswith("!")
        return bool(last)

    for name in [".env", ".env.local", ".env.production", ".env.example", ".venv", "runs", ".git", ".whl"]:
        assert ignored(name), f"{name} would be copied into the image"
    for name in ["stages", "flows", "dmd_core", "pyproject.toml", "data"]:
        assert not ignored(name), f"{name} is needed in the image"


def test_python_m_flows_cli_prints_help():
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "--help"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Usage" in proc.stdout and "run" in proc.stdout
