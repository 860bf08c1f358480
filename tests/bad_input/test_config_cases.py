"""Bad configuration and command-line input: one table per way of giving it, each case refused with exit 2
and one ``error: ... Fix: ...`` line before anything runs (``refusal.assert_refused``).

Argument lists name ``{cfg}`` (a valid config: the tiny EDM teacher, store ``{store}``), ``{store}`` and ``{tmp}``.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
from conftest import add_tiny_evaluate, write_config
from refusal import assert_refused, nothing_started, read_only_dir

importlib.import_module("flows.cli")  # imported at collection: each case then runs its command only

GEN = ["generate", "--config", "{cfg}", "--set"]

# --set values on a valid config: unknown keys, ranges, types, literals, booleans, non-finite numbers, bounds.
SET_CASES = [
    # unknown keys, in several sections
    pytest.param("generate.num_sampels=10", ("generate.num_sampels", "unknown key"), id="unknown-key-generate"),
    pytest.param("genrate.steps=3", ("genrate", "unknown key"), id="unknown-top-level-key"),
    pytest.param("distill.generator_optimizer.momentum=0.9", ("distill.generator_optimizer.momentum", "unknown key"), id="unknown-key-optimizer"),
    pytest.param("export.opset_version=17", ("export.opset_version", "unknown key"), id="unknown-key-export"),
    pytest.param("teacher.revision=main", ("teacher.revision", "unknown key"), id="unknown-key-teacher"),
    # out-of-range values
    pytest.param("generate.num_samples=0", ("generate.num_samples", "greater than 0"), id="range-num-samples-zero"),
    pytest.param("generate.seed=-1", ("generate.seed", "greater than or equal to 0"), id="range-negative-seed"),
    pytest.param("distill.ema_decay=1", ("distill.ema_decay", "less than 1"), id="range-ema-decay"),
    pytest.param("distill.t_min=1.5", ("distill.t_min", "less than or equal to 1"), id="range-t-min"),
    pytest.param("distill.generator_timestep=1000", ("distill.generator_timestep", "999"), id="range-generator-timestep"),
    pytest.param("evaluate.num_samples=1", ("evaluate.num_samples", "greater than 1"), id="range-evaluate-num-samples"),
    pytest.param("export.opset=11", ("export.opset", "greater than or equal to 13"), id="range-opset"),
    # wrong types
    pytest.param("generate.steps=many", ("generate.steps", "valid integer", "many"), id="type-string-for-int"),
    pytest.param("generate.batch_size=[8,16]", ("generate.batch_size", "valid integer"), id="type-list-for-int"),
    pytest.param("export.onnx=maybe", ("export.onnx", "valid boolean"), id="type-string-for-bool"),
    pytest.param("distill.generator_optimizer=5", ("distill.generator_optimizer", "dictionary"), id="type-scalar-for-section"),
    pytest.param("teacher=foo", ("teacher", "dictionary"), id="type-scalar-for-teacher"),
    # bad literals
    pytest.param("generate.solver=rk4", ("generate.solver", "heun", "pndm", "euler"), id="literal-solver"),
    pytest.param("generate.dtype=float64", ("generate.dtype", "float16"), id="literal-dtype"),
    pytest.param("distill.regression_loss=l1", ("distill.regression_loss", "pseudo_huber"), id="literal-regression-loss"),
    pytest.param("distill.mixed_precision=fp8", ("distill.mixed_precision", "bf16"), id="literal-mixed-precision"),
    pytest.param("evaluate.features=clip", ("evaluate.features", "inception"), id="literal-features"),
    pytest.param("evaluate.generator=latest", ("evaluate.generator", "best"), id="literal-generator"),
    # booleans for numbers (pydantic's lax mode reads true as 1)
    pytest.param("generate.num_samples=true", ("generate.num_samples", "true/false"), id="bool-for-int"),
    pytest.param("distill.steps=false", ("distill.steps", "true/false"), id="bool-for-int-distill"),
    pytest.param("evaluate.teacher_steps=true", ("evaluate.teacher_steps", "true/false"), id="bool-for-optional-int"),
    pytest.param("generate.guidance_scale=true", ("generate.guidance_scale", "true/false"), id="bool-for-float"),
    pytest.param("distill.max_grad_norm=false", ("distill.max_grad_norm", "true/false"), id="bool-for-optional-float"),
    pytest.param("distill.generator_optimizer.betas=[true,0.9]", ("distill.generator_optimizer.betas", "true/false"), id="bool-in-betas"),
    pytest.param("distill.generator_timesteps=[999,true]", ("distill.generator_timesteps", "true/false"), id="bool-in-int-list"),
    # non-finite numbers
    pytest.param("generate.guidance_scale=.inf", ("generate.guidance_scale", "finite", "got inf"), id="inf-float"),
    pytest.param("distill.regression_weight=-.inf", ("distill.regression_weight", "finite", "got -inf"), id="minus-inf-float"),
    pytest.param("distill.generator_optimizer.lr=.nan", ("distill.generator_optimizer.lr", "finite", "got nan"), id="nan-lr"),
    pytest.param("generate.num_samples=.inf", ("generate.num_samples", "finite"), id="inf-for-int"),
    pytest.param("export.onnx_tolerance=inf", ("export.onnx_tolerance", "finite", "'inf'"), id="inf-as-text"),
    pytest.param("distill.t_max=.nan", ("distill.t_max", "finite"), id="nan-t-max"),
    # optimizer betas in [0, 1), lr finite > 0
    pytest.param("distill.generator_optimizer.betas=[2,3]", ("generator_optimizer.betas.0", "less than 1", "betas.1"), id="betas-above-one"),
    pytest.param("distill.fake_optimizer.betas=[0.9,1.0]", ("distill.fake_optimizer.betas.1", "less than 1"), id="beta-equal-one"),
    pytest.param("distill.fake_optimizer.betas=[-0.1,0.9]", ("distill.fake_optimizer.betas.0", "greater than or equal to 0"), id="beta-negative"),
    pytest.param("distill.generator_optimizer.betas=[.nan,0.9]", ("distill.generator_optimizer.betas.0", "finite"), id="beta-nan"),
    pytest.param("distill.generator_optimizer.betas=[0.9,0.99,0.999]", ("distill.generator_optimizer.betas",), id="betas-three"),
    pytest.param("distill.fake_optimizer.lr=0", ("distill.fake_optimizer.lr", "greater than 0"), id="lr-zero"),
    pytest.param("distill.fake_optimizer.lr=.inf", ("distill.fake_optimizer.lr", "finite"), id="lr-inf"),
    # absurd sizes: refused here instead of a MemoryError mid-stage
    pytest.param("generate.num_samples=100000000000", ("generate.num_samples", "less than or equal to 1000000000"), id="huge-num-samples"),
    pytest.param("distill.steps=10000000000", ("distill.steps", "less than or equal to 1000000000"), id="huge-distill-steps"),
    pytest.param("evaluate.num_samples=10000000000", ("evaluate.num_samples", "less than or equal"), id="huge-evaluate-num-samples"),
    # empty paths (an empty path is the current directory)
    pytest.param("teacher.path=", ("teacher.path", "must not be empty"), id="empty-teacher-path"),
    pytest.param("distill.pairs=", ("distill.pairs", "must not be empty", "null"), id="empty-optional-path"),
    pytest.param("evaluate.reference=", ("evaluate.reference", "must not be empty"), id="empty-reference"),
    # the --set syntax itself
    pytest.param("generate.num_samples", ("section.key=value",), id="set-without-equals"),
    pytest.param("generate..steps=1", ("empty key part",), id="set-empty-key-part"),
    pytest.param("generate.num_samples.x=1", ("num_samples is not a section",), id="set-into-a-value"),
    pytest.param("distill.generator_optimizer={lr: 1, lr: 2}", ("duplicate key 'lr'",), id="set-duplicate-key-in-value"),
    # cross-field rule
    pytest.param("evaluate.clip_model=/nonexistent/clip", ("evaluate.clip_model", "evaluate.prompts"), id="clip-model-without-prompts"),
]


def fill(args: list[str], **where: Path) -> list[str]:
    return [a.format(**{k: str(v) for k, v in where.items()}) for a in args]


@pytest.fixture
def cfg(tmp_path, edm_teacher) -> Path:
    # every stage plannable offline: pseudo-Huber (no LPIPS weights), FD-digits (no Inception weights)
    return add_tiny_evaluate(write_config(tmp_path / "c.yaml", edm_teacher, tmp_path / "store", distill={}))


@pytest.mark.parametrize("override, needles", SET_CASES)
def test_bad_set_value(tmp_path, cfg, override, needles):
    assert_refused([*fill(GEN, cfg=cfg), override], tmp_path / "store", *needles)


HEAD = "store: {store}\nteacher:\n  path: {teacher}\n"

# Whole config files: encodings, duplicate keys, shapes, and the same value rules written as YAML.
FILE_CASES = [
    pytest.param(b"\xff\xfe" + "generate:\n  num_samples: 4\n".encode("utf-16-le"), ("c.yaml", "not UTF-8"), id="utf16-file"),
    pytest.param(HEAD.encode() + "# caf\xe9 au lait\n".encode("latin-1"), ("c.yaml", "not UTF-8", "offset"), id="latin1-comment"),
    pytest.param(HEAD + "generate:\n  steps: 3\ngenerate:\n  seed: 1\n", ("duplicate key 'generate'", "line 6", "line 4"), id="duplicate-section"),
    pytest.param(HEAD + "generate:\n  num_samples: 8\n  num_samples: 80\n", ("duplicate key 'num_samples'", "line 6"), id="duplicate-key"),
    pytest.param(HEAD + "distill:\n  generator_optimizer: {lr: 1.0e-4, lr: 2.0e-4}\n", ("duplicate key 'lr'", "line 5, column", "first given at column"), id="duplicate-in-flow-mapping"),
    pytest.param(HEAD + "store: elsewhere\n", ("duplicate key 'store'", "line 4", "line 1"), id="duplicate-top-level-key"),
    pytest.param("- generate\n- distill\n", ("c.yaml", "mapping of sections"), id="not-a-mapping"),
    pytest.param(HEAD + "generate:\n  num_samples: [1, 2\n", ("c.yaml", "not valid YAML", "line"), id="malformed-yaml"),
    pytest.param(HEAD + "genrate:\n  steps: 3\n", ("genrate", "unknown key"), id="file-unknown-section"),
    pytest.param(HEAD + "evaluate:\n  num_sampels: 3\n", ("evaluate.num_sampels", "unknown key"), id="file-unknown-key"),
    pytest.param(HEAD + "generate:\n  num_samples: yes\n", ("generate.num_samples", "true/false"), id="file-yes-for-int"),
    pytest.param(HEAD + "generate:\n  guidance_scale: .inf\n", ("generate.guidance_scale", "finite"), id="file-inf"),
    pytest.param(HEAD + "distill:\n  t_min: .nan\n", ("distill.t_min", "finite"), id="file-nan"),
    pytest.param(HEAD + "distill:\n  fake_optimizer: {lr: 1.0e-4, betas: [2, 3]}\n", ("distill.fake_optimizer.betas.0", "less than 1"), id="file-betas"),
    pytest.param(HEAD + "generate:\n  num_samples: 100000000000\n", ("generate.num_samples", "less than or equal"), id="file-huge-num-samples"),
    pytest.param("store: ''\nteacher:\n  path: {teacher}\n", ("store", "must not be empty"), id="file-empty-store"),
    pytest.param("store: {store}\nteacher:\n  path: ''\n", ("teacher.path", "must not be empty"), id="file-empty-teacher-path"),
    pytest.param(HEAD + "export:\n  opset: 17.5\n", ("export.opset", "integer"), id="file-fraction-for-int"),
]


@pytest.mark.parametrize("content, needles", FILE_CASES)
def test_bad_config_file(tmp_path, edm_teacher, content, needles):
    path, store = tmp_path / "c.yaml", tmp_path / "store"
    if isinstance(content, str):
        content = content.encode()
    path.write_bytes(content.replace(b"{store}", str(store).encode()).replace(b"{teacher}", str(edm_teacher).encode()))
    assert_refused(["generate", "--config", str(path)], store, *needles)


# `--set store=` would write into the current directory: refused, and nothing appears there.
EMPTY_STORE_CASES = [
    pytest.param(["generate", "--config", "{cfg}", "--set", "store="], id="generate"),
    pytest.param(["run", "--config", "{cfg}", "--set", "store="], id="run"),
    pytest.param(["distill", "--config", "{cfg}", "--set", "store=  "], id="blank"),
]


@pytest.mark.parametrize("args", EMPTY_STORE_CASES)
def test_empty_store_is_refused(tmp_path, cfg, no_server, args):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    assert_refused(fill(args, cfg=cfg), cwd, "store", "must not be empty", cwd=cwd)
    assert os.listdir(cwd) == []


STORE_CASES = [  # (store kind, command)
    *(pytest.param(kind, cmd, needles, id=f"{kind}-{cmd}") for kind, needles in [
        ("file", ("is a file, not a directory", "--set store=DIR")),
        ("under-a-file", ("cannot be created", "is a file")),
        ("read-only", ("is not writable", "--set store=DIR")),
        ("under-read-only", ("its parent", "is not writable")),
    ] for cmd in ("generate", "run")),
]  # fmt: skip


@pytest.mark.parametrize("kind, command, needles", STORE_CASES)
def test_unwritable_store(tmp_path, edm_teacher, no_server, kind, command, needles):
    mounted = None
    if kind == "file":
        store = tmp_path / "store"
        store.write_text("not a directory\n")
    elif kind == "under-a-file":
        (tmp_path / "plain").write_text("x\n")
        store = tmp_path / "plain" / "store"
    else:
        ro = read_only_dir(tmp_path / "ro")
        mounted = ro if os.path.ismount(ro) else None
        store = ro if kind == "read-only" else ro / "new-store"
    try:
        cfg = write_config(tmp_path / "c.yaml", edm_teacher, store)
        line = assert_refused([command, "--config", str(cfg)], store, *needles)
        assert str(store if kind != "under-read-only" else store.parent) in line
        if kind == "under-read-only":
            assert not store.exists()  # the check never creates the store
    finally:
        if mounted is not None:
            subprocess.run(["umount", str(mounted)], check=False)
        elif kind.endswith("read-only"):
            (tmp_path / "ro").chmod(0o755)
    assert not list(tmp_path.glob("**/.write-test-*"))


@pytest.fixture
def no_server(monkeypatch):
    """Fail the case if ``dmd run`` gets as far as starting its Prefect server."""

    def prefect_api(*a, **k):
        raise AssertionError("dmd run started the Prefect server for input it should have refused")

    monkeypatch.setitem(sys.modules, "flows.server", types.SimpleNamespace(prefect_api=prefect_api))


# `dmd run` refuses before its Prefect server starts: stage names, the config, and --only's upstream outputs.
RUN_CASES = [
    pytest.param(["run", "--config", "{cfg}", "--only", "distil"], ("--only", "'distil'", "generate, distill"), id="unknown-only"),
    pytest.param(["run", "--config", "{cfg}", "--refresh", "export", "--refresh", "gen"], ("--refresh", "'gen'"), id="unknown-refresh"),
    pytest.param(["run", "--config", "{cfg}", "--set", "generate.num_samples=true"], ("generate.num_samples", "true/false"), id="bad-value"),
    pytest.param(["run", "--config", "{cfg}", "--set", "distill.generator_optimizer.betas=[2,3]"], ("betas.0",), id="bad-betas"),
    pytest.param(["run", "--config", "{tmp}/missing.yaml"], ("config file not found",), id="missing-config"),
    pytest.param(["run", "--config", "{cfg}", "--only", "distill"], ("generate output is missing", "{store}"), id="only-distill-empty-store"),
    pytest.param(["run", "--config", "{cfg}", "--only", "evaluate"], ("output is missing",), id="only-evaluate-empty-store"),
    pytest.param(["run", "--config", "{cfg}", "--only", "export"], ("output is missing",), id="only-export-empty-store"),
    pytest.param(["run", "--config", "{cfg}", "--set", "teacher.path={tmp}/no-teacher", "--only", "distill"], ("no-teacher",), id="only-bad-teacher"),
]


@pytest.mark.parametrize("args, needles", RUN_CASES)
def test_run_refuses_before_the_server(tmp_path, cfg, no_server, args, needles):
    where = dict(cfg=cfg, store=tmp_path / "store", tmp=tmp_path)
    with nothing_started(tmp_path / "store"):  # no stage, no server (no_server fails the case if it starts in process)
        assert_refused(fill(args, **where), tmp_path / "store", *fill(list(needles), **where))
