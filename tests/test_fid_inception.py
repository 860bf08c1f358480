"""FID with Inception-v3 features through ``make_fid`` (random weights in torch-fidelity's layout)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from dmd_core.errors import InputError
from dmd_core.metrics import INCEPTION_FILE, InceptionFeatures, make_fid


@pytest.fixture(scope="module")
def random_inception(tmp_path_factory):
    """RANDOM WEIGHTS: an Inception-v3 state dict in torch-fidelity's layout, saved where a real one would be."""
    import torch_fidelity.feature_extractor_inceptionv3 as tfi

    mp = pytest.MonkeyPatch()
    mp.setattr(tfi.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd, *a, **k: None)
    mp.setattr(tfi, "load_state_dict_from_url", lambda *a, **k: None)
    torch.manual_seed(0)
    net = tfi.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    mp.undo()
    path = tmp_path_factory.mktemp("inception") / INCEPTION_FILE
    torch.save(net.state_dict(), path)
    return path


def scipy_fd(a: np.ndarray, b: np.ndarray) -> float:
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


@pytest.mark.slow
def test_inception_fid_through_make_fid_equals_scipy(random_inception):
    """make_fid keeps Inception's weights float32 (float64 weights meet float32 input and fail on the first batch)."""
    torch.set_num_threads(2)
    g = torch.Generator().manual_seed(1)
    real = torch.rand(24, 1, 8, 8, generator=g) * 2 - 1
    fake = (torch.rand(24, 1, 8, 8, generator=g) * 2 - 1) * 0.5
    fid = make_fid(InceptionFeatures(random_inception))
    for s in range(0, 24, 12):  # in batches, as evaluate feeds it
        fid.update(real[s : s + 12], real=True)
        fid.update(fake[s : s + 12], real=False)
    ours = fid.compute()
    assert ours.dtype == torch.float64
    feats = InceptionFeatures(random_inception)  # features extracted separately
    with torch.no_grad():
        fr, ff = feats(real).numpy(), feats(fake).numpy()
    ref = scipy_fd(fr, ff)
    assert ref > 0
    assert abs(float(ours) - ref) / ref <= 1e-6


def test_missing_inception_weights_name_the_file(tmp_path):
    with pytest.raises(InputError, match=INCEPTION_FILE):
        InceptionFeatures(tmp_path / "missing" / INCEPTION_FILE)
