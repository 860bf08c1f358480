"""Stage evaluate: Fréchet distance against closed forms, multi-process equality, stats files, errors."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn

from conftest import ROOT, run_cli, write_config
from dmd_core.errors import InputError
from dmd_core.metrics import load_stats, make_fid, save_stats, set_reference, side_stats
from stages import chain, evaluate
from stages.config import load_config

CLASSIFIER = str(ROOT / "data" / "classifier")


class Projection(nn.Module):
    """A fixed linear feature map, float64."""

    def __init__(self, d_in: int, d_out: int, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = nn.Parameter(torch.randn(d_in, d_out, generator=g, dtype=torch.float64) / d_in**0.5, requires_grad=False)
        self.num_features = d_out

    def forward(self, x):
        return x.flatten(1).to(torch.float64) @ self.w


def closed_form_fd(a: np.ndarray, b: np.ndarray) -> float:
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def test_fd_equals_scipy_closed_form():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(400, 1, 4, 4, generator=g, dtype=torch.float64)
    fake = 0.8 * torch.randn(300, 1, 4, 4, generator=g, dtype=torch.float64) + 0.3
    net = Projection(16, 8)
    fid = make_fid(net)
    fid.update(real, real=True)
    fid.update(fake[:150], real=False)
    fid.update(fake[150:], real=False)
    ours = float(fid.compute())
    ref = closed_form_fd(net(real).numpy(), net(fake).numpy())
    assert ours == pytest.approx(ref, rel=1e-6)
    same = make_fid(net)
    same.update(real, real=True)
    same.update(real, real=False)
    assert abs(float(same.compute())) < 1e-8


def test_fd_of_two_known_gaussians_via_stats():
    """Reference stats loaded into the metric: FD = |mu1 - mu2|^2 + sum(s1 + s2 - 2 sqrt(s1 s2)) for diagonal covariances."""
    d = 6
    mu1, mu2 = np.arange(d, dtype=np.float64), np.arange(d, dtype=np.float64) + 0.5
    s1, s2 = np.linspace(0.5, 2, d), np.linspace(1, 3, d)
    fid = make_fid(Projection(d, d))
    set_reference(fid, mu1, np.diag(s1), 1000)
    fid.fake_features_sum = torch.as_tensor(mu2 * 500)
    fid.fake_features_cov_sum = torch.as_tensor(np.diag(s2) * 499 + 500 * np.outer(mu2, mu2))
    fid.fake_features_num_samples = torch.tensor(500)
    fid.orig_dtype = torch.float64
    expected = ((mu1 - mu2) ** 2).sum() + (s1 + s2 - 2 * np.sqrt(s1 * s2)).sum()
    assert float(fid.compute()) == pytest.approx(expected, rel=1e-9)
    mu, sigma, n = side_stats(fid.real_features_sum, fid.real_features_cov_sum, fid.real_features_num_samples)
    np.testing.assert_allclose(mu, mu1, rtol=1e-12)
    np.testing.assert_allclose(sigma, np.diag(s1), atol=1e-12)


def test_npz_roundtrip_and_pytorch_fid_format(tmp_path):
    mu, sigma = np.random.default_rng(0).normal(size=5), np.eye(5) * 2
    save_stats(tmp_path / "ours.npz", mu, sigma, 123)
    m2, s2, n2 = load_stats(tmp_path / "ours.npz")
    np.testing.assert_array_equal(m2, mu)
    np.testing.assert_array_equal(s2, sigma)
    assert n2 == 123
    np.savez(tmp_path / "pytorch_fid.npz", mu=mu.astype(np.float32), sigma=sigma.astype(np.float32))  # as pytorch-fid writes them
    m3, s3, n3 = load_stats(tmp_path / "pytorch_fid.npz")
    np.testing.assert_allclose(m3, mu, rtol=1e-6)
    assert s3.dtype == np.float64 and n3 == 50_000
    np.savez(tmp_path / "bad.npz", mu=mu, sigma=np.eye(4))
    with pytest.raises(InputError, match="do not fit"):
        load_stats(tmp_path / "bad.npz")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, edm_teacher):
    tmp = tmp_path_factory.mktemp("evaluate")
    cfg = write_config(tmp / "c.yaml", edm_teacher, tmp / "store", distill={})
    text = cfg.read_text() + (
        "evaluate:\n  num_samples: 100\n  batch_size: 25\n  features: digits\n"
        f"  classifier: {CLASSIFIER}\n  speed_batch_size: 8\n  speed_repeats: 1\n  num_threads: 1\n"
    )
    cfg.write_text(text)
    m = chain.run(load_config(cfg), "evaluate", progress=False).manifest
    return tmp, cfg, m


def test_metrics_json_has_the_headline_keys(tiny):
    tmp, cfg, m = tiny
    out = Path(load_config(cfg).store) / "evaluate" / m.key
    r = json.loads((out / "metrics.json").read_text())
    assert r["teacher_nfe"] == 5 and r["fd_ratio"] == pytest.approx(r["student_fd"] / r["teacher_fd"], rel=1e-12)
    assert r["student_nfe"] == 1  # speed: measured, not compared (a loaded machine times anything); benchmarks/ holds the speed numbers
    speeds = [r["teacher_images_per_s"], r["student_images_per_s"]]
    assert all(math.isfinite(v) and v > 0 for v in speeds) and r["speedup"] == pytest.approx(speeds[1] / speeds[0], rel=1e-12)
    assert (out / "grid.png").is_file() and (out / "metrics.parquet").is_file()
    assert "FD-digits" in evaluate.results_table(m)


def test_student_numbers_equal_an_independent_computation(tiny):
    """FD against scipy on separately extracted float64 features; accuracy counted by hand; same batches."""
    from dmd_core.digits import DigitsClassifier, load_digits_data
    from dmd_core.loading import load_denoiser
    from dmd_core.shards import sample_labels, sample_noise

    tmp, cfg, m = tiny
    r, e = m.info["metrics"], load_config(cfg).evaluate
    gen = load_denoiser(m.info["generator_dir"])
    clf = DigitsClassifier.load(CLASSIFIER)
    clf64 = DigitsClassifier.load(CLASSIFIER).double()
    fake, correct = [], 0
    with torch.no_grad():
        for s in range(0, e.num_samples, e.batch_size):
            idx = range(s, s + e.batch_size)
            labels = sample_labels(idx, 10)
            s_max = gen.param.sigma_max  # EDM: G(z) = D(sigma_max z; sigma_max)
            x = gen(s_max * sample_noise(e.seed, idx, (1, 8, 8)), s_max, labels).float().clamp(-1, 1)
            correct += int((clf(x).argmax(1) == labels).sum())
            fake.append(clf64.features(x.double()).numpy())
        real = clf64.features(load_digits_data()[0].double()).numpy()
    assert r["student_class_accuracy"] == correct / e.num_samples
    assert r["student_fd"] == pytest.approx(closed_form_fd(real, np.concatenate(fake)), rel=1e-6)


def test_teacher_numbers_are_cached(tiny):
    tmp, cfg, m = tiny
    proc = run_cli("evaluate", "--config", str(cfg), "-q", "--set", "evaluate.speed_repeats=2")
    assert "teacher numbers from cache" in proc.stderr
    r = json.loads((Path(proc.stdout.strip().splitlines()[-1]) / "metrics.json").read_text())
    assert r["teacher_fd"] == m.info["metrics"]["teacher_fd"]


def test_two_processes_equal_one(tiny):
    tmp, cfg, m = tiny
    proc = run_cli("evaluate", "--config", str(cfg), "-q", "-n", "2", "--set", f"store={tmp / 'two'}",
                   "--set", f"evaluate.distill={Path(load_config(cfg).store).resolve() / 'distill' / m.info['distill_dir'].split('/')[-1]}")  # fmt: skip
    two = json.loads((Path(proc.stdout.strip().splitlines()[-1]) / "metrics.json").read_text())
    one = m.info["metrics"]
    for k in ("teacher_fd", "student_fd"):
        assert two[k] == pytest.approx(one[k], rel=1e-6)
    assert two["student_class_accuracy"] == one["student_class_accuracy"]
    assert two["teacher_class_accuracy"] == one["teacher_class_accuracy"]


def test_too_few_samples_is_refused(tiny):
    tmp, cfg, m = tiny
    with pytest.raises(InputError, match="feature dimension"):
        chain.run(load_config(cfg, ["evaluate.num_samples=50"]), "evaluate", progress=False).manifest


def test_broken_generator_is_named(tiny, tmp_path):
    """A distill output whose manifest verifies but whose generator does not load: dir and reason named."""
    from stages.contract import file_entry
    from stages.store import LocalStore

    tmp, cfg, m = tiny
    broken = tmp_path / "distill"
    shutil.copytree(m.info["distill_dir"], broken)
    config = broken / "generator" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "block_out_channels": [16, 32]}))
    store = LocalStore(broken.parent.parent)
    dm = store.read_manifest(broken)
    dm.files = [file_entry(broken / f.name, name=f.name) for f in dm.files]
    store.save_manifest(dm, broken)
    with pytest.raises(InputError) as e:
        chain.run(load_config(cfg, [f"evaluate.distill={broken}", f"store={tmp_path / 'store'}"]), "evaluate", progress=False).manifest
    assert str(broken / "generator") in str(e.value) and "do not match" in str(e.value)
    shutil.rmtree(broken / "generator")
    with pytest.raises(InputError, match="not a complete distill output"):
        chain.plan(load_config(cfg, [f"evaluate.distill={broken}"]), "evaluate")
