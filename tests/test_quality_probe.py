"""Quality during training: distill.eval_every probes, generator_best/, evaluate.generator, exact resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, write_config
from dmd_core import load_denoiser
from dmd_core.digits import DigitsClassifier, load_digits_data
from dmd_core.dmd import OneStep
from dmd_core.errors import InputError
from dmd_core.metrics import PenultimateFeatures, channel_stats, class_accuracy, frechet_distance
from stages import chain
from stages.config import load_config

CLASSIFIER = ROOT / "data" / "classifier"
PROBE = {"eval_every": 2, "eval_samples": 80, "steps": 6, "checkpoint_every": 2, "keep_checkpoints": 3, "ema_decay": 0.9}
EVAL = ["evaluate.features=digits", f"evaluate.classifier={CLASSIFIER}", "evaluate.batch_size=40"]


@pytest.fixture(scope="module")
def probed(tmp_path_factory, edm_teacher):
    tmp = tmp_path_factory.mktemp("probe")
    cfg = load_config(write_config(tmp / "c.yaml", edm_teacher, tmp / "store", distill=PROBE), EVAL)
    chain.run(cfg, "generate", progress=False).manifest
    m = chain.run(cfg, "distill", progress=False).manifest
    return cfg, Path(cfg.store) / "distill" / m.key, m


def probe_rows(out: Path) -> list[dict]:
    return [r for r in pq.read_table(out / "metrics.parquet").to_pylist() if r["probe_fd"] is not None]


@torch.no_grad()
def fd_by_hand(gen_dir: Path, cfg) -> tuple[float, float, torch.Tensor]:
    """The probe's sample drawn again (evaluate.seed's noise, balanced labels) and scored with dmd_core.metrics."""
    from dmd_core.shards import sample_labels, sample_noise

    gen = load_denoiser(gen_dir)
    n = cfg.distill.eval_samples
    z, labels = sample_noise(cfg.evaluate.seed, range(n), (1, 8, 8)), sample_labels(range(n), 10)
    x = OneStep.of(gen)(gen, z, labels).float()
    clf = DigitsClassifier.load(CLASSIFIER)
    real, _ = load_digits_data()
    pixels = x.clamp(-1, 1)
    return frechet_distance(PenultimateFeatures(clf), real, pixels), class_accuracy(clf, pixels, labels), x


def test_probe_rows_and_the_best_generator(probed):
    cfg, out, m = probed
    rows = probe_rows(out)
    assert [r["step"] for r in rows] == [2, 4, 6]
    best = min(rows, key=lambda r: r["probe_fd"])
    assert json.loads((out / "best.json").read_text()) == {"step": best["step"], "probe_fd": best["probe_fd"]}
    assert m.info["best"] == {"step": best["step"], "probe_fd": best["probe_fd"]}
    assert [r["best_probe_fd"] for r in rows] == [min(r["probe_fd"] for r in rows[: i + 1]) for i in range(3)]
    # generator_best/ is the EMA generator of the best step: its sample scores exactly the best row
    fd, acc, x = fd_by_hand(out / "generator_best", cfg)
    assert fd == pytest.approx(best["probe_fd"], rel=1e-6) and acc == pytest.approx(best["probe_class_accuracy"])
    assert float(x[:, 0].std()) == pytest.approx(best["probe_std_c0"], rel=1e-5)
    # the last probe measured the final EMA generator
    fd, _, x = fd_by_hand(out / "generator_ema", cfg)
    assert fd == pytest.approx(rows[-1]["probe_fd"], rel=1e-6)
    assert float(x[:, 0].mean()) == pytest.approx(rows[-1]["probe_mean_c0"], rel=1e-5, abs=1e-7)
    assert rows[0]["teacher_std_c0"] > 0 and all(r["teacher_std_c0"] == rows[0]["teacher_std_c0"] for r in rows)
    assert (out / "curves.png").stat().st_size > 10_000


def test_resume_restores_the_best(probed):
    """A run stopped after its step-4 checkpoint and resumed ends with the same best generator and probes."""
    cfg, out, m = probed
    want_rows, want_best = probe_rows(out), load_file(str(out / "generator_best" / "diffusion_pytorch_model.safetensors"))
    want_best = {k: v.clone() for k, v in want_best.items()}
    for name in ("manifest.json", "generator_best", "best.json", "metrics.parquet", "checkpoints/step-0000006"):
        target = out / name
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    m2 = chain.run(cfg, "distill", progress=False).manifest
    assert m2.key == m.key and m2.info["best"] == m.info["best"]
    got = load_file(str(out / "generator_best" / "diffusion_pytorch_model.safetensors"))
    assert max(float((got[k] - want_best[k]).abs().max()) for k in got) <= 1e-6
    assert [(r["step"], r["probe_fd"]) for r in probe_rows(out)] == [(r["step"], r["probe_fd"]) for r in want_rows]


def with_generator(cfg, generator: str | None):
    return cfg.model_copy(update={"evaluate": cfg.evaluate.model_copy(update={"generator": generator})})


def test_evaluate_generator_choice(probed, edm_teacher, tmp_path):
    cfg, out, _ = probed
    plans = {g: chain.plan(with_generator(cfg, g), "evaluate") for g in ("final", "ema", "best")}
    assert {g: Path(p.info["generator_dir"]).name for g, p in plans.items()} == {"final": "generator", "ema": "generator_ema", "best": "generator_best"}
    assert len({p.key for p in plans.values()}) == 3
    assert Path(chain.plan(cfg, "evaluate").info["generator_dir"]).name == "generator_ema"  # default: use_ema
    # a run without probes has no generator_best/
    pairs = chain.plan(cfg, "generate").out_dir
    plain = load_config(write_config(tmp_path / "p.yaml", edm_teacher, Path(cfg.store), distill={}), [*EVAL, "evaluate.generator=best", f"distill.pairs={pairs}"])
    chain.run(plain, "distill", progress=False).manifest
    with pytest.raises(InputError, match="no generator_best/.*distill.eval_every"):
        chain.plan(plain, "evaluate")


def test_probe_keys_only_when_set(tmp_path, edm_teacher):
    """Runs without probes keep their keys; eval_every and eval_samples change the key when set."""
    base = write_config(tmp_path / "c.yaml", edm_teacher, tmp_path / "store", distill={})
    chain.run(load_config(base), "generate", progress=False).manifest
    keys = {s: chain.plan(load_config(base, [*EVAL, *s]), "distill").key for s in [(), ("distill.eval_every=2",), ("distill.eval_every=4",)]}
    assert len(set(keys.values())) == 3
    assert chain.plan(load_config(base), "distill").key == keys[()]  # the evaluate settings alone change nothing


def test_channel_stats_closed_form():
    """Channel c of x holds the values c, c+1 (half each) for 6 channels: mean c + 1/2, unbiased std sqrt(n / (4 (n - 1)))."""
    x = torch.arange(6.0).view(1, 6, 1, 1).repeat(4, 1, 2, 2)
    x[:, :, 0] += 1  # half of each channel's 16 values are one higher
    out = channel_stats(x, "probe")
    assert sorted(out) == sorted(f"probe_{s}_c{c}" for c in range(4) for s in ("mean", "std"))  # the first 4 channels only
    for c in range(4):
        assert out[f"probe_mean_c{c}"] == pytest.approx(c + 0.5)
        assert out[f"probe_std_c{c}"] == pytest.approx((16 / (4 * 15)) ** 0.5)
