"""distill.compile: the compiled training step (inductor, on CPU here) against the eager one."""

from __future__ import annotations

import shutil

import pytest
import torch
from conftest import write_config

from stages import chain, distill
from stages.config import load_config

# Measured on this project's 2-core CPU machine (3 steps, tiny EDM teacher, guidance 2): the compiled
# step's losses and gradient norms differ from eager ones by at most 3.7e-7 relative (fused kernels
# reorder float32 sums), 8.9e-7 with DMD2's GAN term (its losses and the head's P(real) too); the bound
# leaves a margin of about 13x and 5.6x. Guidance 2, because at guidance 1 the
# real and fake scores are identical copies at step 0: the DM gradient is exactly 0 in eager and ~1e-13
# compiled, and Adam's normalised update turns either into a full step of a different direction.
TOLERANCE = 5e-6
COMPARED = ("loss_dm", "loss_fake", "loss_g", "grad_norm_g", "grad_norm_fake")


def _logs(cfg, steps: int) -> list[dict]:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    tr = distill.Trainer(cfg, chain.plan(cfg, "distill"), Accelerator(cpu=True))
    return [tr.step(step) for step in range(steps)]


@pytest.mark.slow  # inductor compiles the UNet's forward and backward: about 100 s on 2 cores
@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="inductor on CPU needs a C compiler")
@pytest.mark.parametrize("gan", [False, True], ids=["dmd", "gan"])
def test_compiled_step_equals_eager(tmp_path, edm_teacher, gan):
    path = write_config(tmp_path / "c.yaml", edm_teacher, tmp_path / "store", distill={"regression_weight": 0.0, "guidance_scale": 2.0, "gan": gan})
    eager = _logs(load_config(path), 3)
    compiled = _logs(load_config(path, ["distill.compile=true"]), 3)
    compared = COMPARED + (("loss_gan_g", "loss_gan_d", "d_real", "d_fake") if gan else ())
    assert all(k in e for e in eager for k in compared)
    worst = max(abs(c[k] - e[k]) / max(abs(e[k]), 1e-12) for e, c in zip(eager, compiled) for k in compared)
    print(f"compiled vs eager, largest relative difference: {worst:.2e}")
    assert worst <= TOLERANCE, worst


RECIPES = {
    "dmd": ("edm_teacher", []),
    "bf16": ("edm_teacher", ["distill.mixed_precision=bf16"]),
    "4-step": ("edm_teacher", ["distill.generator_timesteps=[999,749,499,249]"]),
    "vp-teacher": ("vp_teacher", ["generate.solver=pndm"]),
    # no regression batch: the generator runs at B, like the fake score, and only the tap tells them apart
    "gan": ("edm_teacher", ["distill.gan=true", "distill.regression_weight=0"]),
}


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_compiled_networks_get_one_static_graph_per_batch_size_and_keep_it(tmp_path, request, monkeypatch, recipe):
    """The generator runs UNet.forward at 2B (DM + regression batches), the fake score at B: by default the
    second size seen turns the batch into a symbol and the fake score's graphs become size-generic. Here a
    recording backend stands in for inductor (the same graphs, traced in seconds) and counts symbols."""
    from torch.fx.experimental.symbolic_shapes import free_symbols

    graphs = []

    def recording_backend(gm, example_inputs):
        inputs = {n.name: n.meta.get("example_value") for n in gm.graph.nodes if n.op == "placeholder"}
        symbolic = any(free_symbols(v) if isinstance(v, torch.SymInt) else free_symbols(v.shape) for v in inputs.values() if v is not None)
        sample = inputs["l_sample_"]
        graphs.append((sample.shape[0], symbolic, torch.is_grad_enabled(), sample.requires_grad))
        return gm.forward

    compile_fn = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compile_fn(fn, **{**kw, "backend": recording_backend}))
    torch._dynamo.reset()
    try:
        teacher, overrides = RECIPES[recipe]
        path = write_config(tmp_path / "c.yaml", request.getfixturevalue(teacher), tmp_path / "store", distill={"regression_weight": 0.25})
        cfg = load_config(path, ["distill.compile=true", *overrides])
        chain.run(cfg, "generate", progress=False).manifest
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state()
        tr = distill.Trainer(cfg, chain.plan(cfg, "distill"), Accelerator(cpu=True, mixed_precision=cfg.distill.mixed_precision))
        tr.restart_data(0)
        for step in range(2):
            tr.step(step)
        distill.outputs.save_networks(tr.whole_networks(), tr.best, tmp_path / "checkpoint")  # saving must not change what the graphs were traced under
        tr.step(2)
    finally:
        torch._dynamo.reset()
    B = cfg.distill.batch_size
    # the generator's forward+backward at 2B, the fake score's no-grad forward and forward+backward at B
    # (the 4-step generator's no-grad simulation shares the latter's shape), each compiled once (steps 1
    # and 2 reuse them, also after a checkpoint; autocast is part of the graph) and none with a symbol.
    # DMD2's GAN term adds one: the generator's turn runs the frozen fake score on G(z), which needs a
    # gradient; the head's own turn (real and generated images, detached) reuses the fake score's graph.
    # With it and no regression batch, the generator's and the fake score's forward+backward are both at B
    # and still two graphs: one carries the GAN tap's hook, the other does not.
    if recipe == "gan":
        expected = [(B, False, False, False), (B, False, True, False), (B, False, True, False), (B, False, True, True)]
    else:
        expected = [(B, False, False, False), (B, False, True, False), (2 * B, False, True, False)]
    assert sorted(graphs) == sorted(expected), graphs


def test_compile_is_keyed_only_when_set(tmp_path, edm_teacher):
    path = write_config(tmp_path / "c.yaml", edm_teacher, tmp_path / "store", distill={"regression_weight": 0.0})
    plain, compiled = chain.plan(load_config(path), "distill"), chain.plan(load_config(path, ["distill.compile=true"]), "distill")
    assert "compile" not in plain.upstream and compiled.upstream["compile"] == "inductor" and plain.key != compiled.key


def test_compile_cost_warns_when_compiling_dominates(monkeypatch, caplog):
    """First step 30 s (compiling), then 0.1 s a step: on a 20-step run compiling is ~94% of it; on 100,000 steps 0.3%."""
    import logging

    clock = iter([0.0, 30.0, 30.1, 30.2, 30.3, 30.4, 30.5] * 2)
    monkeypatch.setattr(distill.time, "perf_counter", lambda: next(clock))
    with caplog.at_level(logging.INFO, logger="dmd"):
        for steps, warned in ((20, True), (100_000, False)):
            caplog.clear()
            cost = distill.CompileCost(0, steps)
            for _ in range(distill.CompileCost.SAMPLE + 1):
                cost.record()
            assert any("compiling took about 29.9 s" in r.message for r in caplog.records)
            assert any(r.levelname == "WARNING" and "distill.compile=false" in r.message for r in caplog.records) == warned
