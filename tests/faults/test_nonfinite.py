"""NaN and Inf never reach a finished output: not from the teacher, not from training."""

from __future__ import annotations

import shutil

import numpy as np
import torch
from safetensors.numpy import load_file, save_file

from common import dmd_forked
from test_kill import pipeline  # noqa: F401


def _error(log: str) -> str:
    assert "Traceback" not in log, log[-3000:]
    lines = [line for line in log.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, log[-2000:]
    return lines[0]


def test_a_teacher_that_outputs_inf_writes_no_pairs(pipeline, tmp_path):  # noqa: F811
    teacher = tmp_path / "teacher"
    shutil.copytree(pipeline.teacher, teacher)
    weights = teacher / "diffusion_pytorch_model.safetensors"
    tensors = load_file(str(weights))
    name = next(k for k in tensors if k.startswith("conv_out") and k.endswith("bias"))
    tensors[name] = np.full_like(tensors[name], np.inf)
    save_file(tensors, str(weights))
    store = tmp_path / "store"
    code = dmd_forked(pipeline.args("generate", store, "--set", f"teacher.path={teacher}"), tmp_path / "log")
    line = _error((tmp_path / "log").read_text())
    assert code == 2 and "NaN/Inf" in line and "Fix:" in line
    assert not [p for p in (store / "generate").iterdir() if not p.name.startswith(".")]
    assert not list((store / "generate").glob(".*.partial/pairs-*.tar"))


def test_weights_that_overflow_are_never_checkpointed(pipeline, tmp_path, monkeypatch):  # noqa: F811
    """The generator's update writes Inf into its weights at step 2, as an overflowing optimizer would (settings
    that overflow for real are refused by the config's bounds); the forked child inherits the patch."""
    import stages.distill.trainer as trainer

    real_update, calls = trainer.generator_update, []

    def overflowing_update(acc, gen, *args, **kwargs):
        out = real_update(acc, gen, *args, **kwargs)
        calls.append(1)
        if len(calls) == 2:
            with torch.no_grad():
                for w in gen.parameters():
                    w.fill_(float("inf"))
        return out

    monkeypatch.setattr(trainer, "generator_update", overflowing_update)
    store = pipeline.store_before("distill", tmp_path / "store")
    sets = ["--set", "distill.checkpoint_every=1"]
    code = dmd_forked(pipeline.args("distill", store, *sets), tmp_path / "log")
    line = _error((tmp_path / "log").read_text())
    assert code == 2 and "NaN or Inf" in line and "learning rate" in line
    assert not [p for p in (store / "distill").iterdir() if not p.name.startswith(".")]
    from stages.distill.checkpoints import checkpoint_problem

    for ckpt in (store / "distill").glob(".*.partial/checkpoints/step-*"):
        assert checkpoint_problem(ckpt) is None  # every checkpoint written verifies: finite weights only
    # and a rerun does not resume into the same failure silently: it stops again, with the same message
    code = dmd_forked(pipeline.args("distill", store, *sets), tmp_path / "log2")
    assert code == 2 and "NaN or Inf" in _error((tmp_path / "log2").read_text())
