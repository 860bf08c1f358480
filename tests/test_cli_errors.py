"""Bad input: a short message naming the problem and the fix, exit 2, no traceback, nothing written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import run_cli, write_config

# Each case here starts a fresh interpreter (~7 s); tests/bad_input/ checks the same refusals (and 190 more)
# in process, plus one subprocess case per table, in make test.
pytestmark = pytest.mark.slow


def assert_clean_failure(proc, store: Path, *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    err = proc.stderr.strip()
    assert err.startswith("error: ") and len(err.splitlines()) <= 2, err
    for needle in needles:
        assert needle in err, err
    assert proc.stdout.strip() == ""
    assert not (store / "generate").exists() or not any((store / "generate").iterdir())


def test_missing_teacher_directory(tmp_path):
    cfg = write_config(tmp_path / "c.yaml", tmp_path / "no-such-teacher", tmp_path / "store")
    proc = run_cli("generate", "--config", str(cfg), check=False)
    assert_clean_failure(proc, tmp_path / "store", "model directory not found", "no-such-teacher", "Fix:")


def test_teacher_config_does_not_match_weights(tmp_path, edm_teacher):
    teacher = tmp_path / "teacher"
    shutil.copytree(edm_teacher, teacher)
    cfg = json.loads((teacher / "config.json").read_text())
    cfg["block_out_channels"] = [16, 32]
    (teacher / "config.json").write_text(json.dumps(cfg))
    proc = run_cli("generate", "--config", str(write_config(tmp_path / "c.yaml", teacher, tmp_path / "store")), check=False)
    assert_clean_failure(proc, tmp_path / "store", "do not match", "config.json", "Fix:")


def test_malformed_yaml(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("generate:\n  num_samples: [1, 2\n")
    proc = run_cli("generate", "--config", str(bad), "--set", f"store={tmp_path / 'store'}", check=False)
    assert_clean_failure(proc, tmp_path / "store", "not valid YAML", "line")


@pytest.mark.parametrize(
    "override, needles",
    [
        ("generate.num_sampels=10", ("generate.num_sampels", "unknown key")),
        ("generate.num_samples=-5", ("generate.num_samples", "greater than 0")),
        ("generate.solver=rk4", ("generate.solver", "heun", "pndm", "euler")),
    ],
)
def test_bad_values_name_the_field(tmp_path, edm_teacher, override, needles):
    cfg = write_config(tmp_path / "c.yaml", edm_teacher, tmp_path / "store")
    proc = run_cli("generate", "--config", str(cfg), "--set", override, check=False)
    assert_clean_failure(proc, tmp_path / "store", *needles, "Fix:")


def test_unknown_key_in_file(tmp_path, edm_teacher):
    cfg = write_config(tmp_path / "c.yaml", edm_teacher, tmp_path / "store")
    cfg.write_text(cfg.read_text() + "genrate:\n  steps: 3\n")
    proc = run_cli("generate", "--config", str(cfg), check=False)
    assert_clean_failure(proc, tmp_path / "store", "genrate", "unknown key")


def test_solver_must_fit_the_teacher(tmp_path, vp_teacher):
    cfg = write_config(tmp_path / "c.yaml", vp_teacher, tmp_path / "store")
    proc = run_cli("generate", "--config", str(cfg), check=False)
    assert_clean_failure(proc, tmp_path / "store", "generate.solver=pndm")
