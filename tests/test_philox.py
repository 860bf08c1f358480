"""The counter-based generator of distill's draws: Random123's known answers, batch independence, distributions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from dmd_core import philox
from dmd_core.dmd import SampleRNG


@pytest.mark.parametrize(
    "counter, key, expected",
    [  # Random123's kat_vectors for philox4x32_10
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0), (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
    ],
)
def test_known_answers(counter, key, expected):
    out = philox.philox4x32(tuple(torch.tensor([c], dtype=torch.int64) for c in counter), key)
    assert tuple(int(o) for o in out) == expected


def test_a_sample_draws_the_same_in_any_batch():
    whole = SampleRNG(7, 0, 12, range(0, 64))
    z, c, t = whole.randn((3, 4, 4)), whole.randint(0, 10), whole.randint(20, 980)
    for part in (range(0, 32), range(32, 64), [5, 40, 63]):
        rng = SampleRNG(7, 0, 12, part)
        idx = list(part)
        assert torch.equal(rng.randn((3, 4, 4)), z[idx])
        assert torch.equal(rng.randint(0, 10), c[idx]) and torch.equal(rng.randint(20, 980), t[idx])


def test_draws_differ_by_draw_stream_step_and_seed():
    base = SampleRNG(1, 0, 0, range(16))
    first, second = base.randn((8,)), base.randn((8,))
    others = [SampleRNG(1, 1, 0, range(16)).randn((8,)), SampleRNG(1, 0, 1, range(16)).randn((8,)), SampleRNG(2, 0, 0, range(16)).randn((8,))]
    for other in [second, *others]:
        assert not torch.equal(first, other)
    assert torch.equal(SampleRNG(1, 0, 0, range(16)).randn((8,)), first)  # and the same key gives the same draws


def test_normals_are_standard_normal():
    x = SampleRNG(0, 0, 0, range(2000)).randn((500,)).double().flatten().numpy()  # 10^6 values
    assert abs(x.mean()) < 5 / math.sqrt(len(x)) and abs(x.std() - 1) < 5 / math.sqrt(2 * len(x))
    assert stats.kstest(x, "norm").pvalue > 1e-3
    assert abs(stats.skew(x)) < 0.01 and abs(stats.kurtosis(x)) < 0.02


def test_uniform_words_and_integers_are_uniform():
    idx = torch.arange(100_000)
    u = philox.uniform(philox.uint32_words(123, idx, 0, 4)).double().flatten().numpy()
    assert 0 < u.min() and u.max() < 1 and stats.kstest(u, "uniform").pvalue > 1e-3
    counts = np.bincount(philox.integers(123, idx, 1, 0, 10).numpy(), minlength=10)
    assert stats.chisquare(counts).pvalue > 1e-3
    assert philox.integers(123, idx, 2, 5, 6).unique().tolist() == [5]


def test_indices_beyond_32_bits():
    big = [2**32 - 1, 2**32, 2**40 + 3]
    a, b = SampleRNG(0, 0, 0, big).randn((4,)), SampleRNG(0, 0, 0, [i % 2**32 for i in big]).randn((4,))
    assert not torch.equal(a[1], b[1]) and torch.equal(a[0], b[0])
