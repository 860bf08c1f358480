"""Counter-based random numbers on any device: Philox-4x32-10 (Salmon et al., "Parallel random numbers:
as easy as 1, 2, 3", SC 2011), keyed per purpose and counted per sample.

Written here because PyTorch exposes no counter-based generator whose key and counter a caller sets
per element (its CUDA Philox is seeded per generator): drawing for a batch of samples would need one
torch.Generator per sample on the CPU. Here a whole batch is one sequence of integer tensor ops on
the batch's device, and sample i's numbers depend only on (key, i, draw), never on the batch it is in.
Integers are held in int64 tensors (uint32 values).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

MASK32 = 0xFFFFFFFF
M0, M1 = 0xD2511F53, 0xCD9E8D57  # the round multipliers
W0, W1 = 0x9E3779B9, 0xBB67AE85  # the key schedule's Weyl constants
ROUNDS = 10


def _mulhilo(a: int, b: Tensor) -> tuple[Tensor, Tensor]:
    """(hi, lo) 32-bit words of the 64-bit product a * b (a a constant, b uint32 values in int64).

    The int64 product wraps modulo 2^64 (two's complement, as PyTorch's CPU and CUDA kernels multiply),
    which keeps all 64 bits of the unsigned product: hi is bits 32-63, lo bits 0-31. The known-answer
    tests (tests/test_philox.py) include all-ones words, where it wraps."""
    p = b * a
    return (p >> 32) & MASK32, p & MASK32


def philox4x32(counter: tuple[Tensor, Tensor, Tensor, Tensor], key: tuple[int, int]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Philox-4x32-10 of broadcastable counter words (uint32 values in int64 tensors) under a 2-word key."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for r in range(ROUNDS):
        if r:
            k0, k1 = (k0 + W0) & MASK32, (k1 + W1) & MASK32
        hi0, lo0 = _mulhilo(M0, c0)
        hi1, lo1 = _mulhilo(M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def uint32_words(key: int, indices: Tensor, draw: int, n: int) -> Tensor:
    """(len(indices), n) uint32 words (in int64): block j of sample i is Philox(counter=(j, i_lo, i_hi, draw), key)."""
    blocks = (n + 3) // 4
    j = torch.arange(blocks, device=indices.device, dtype=torch.int64)[None, :]
    i = indices.to(torch.int64)[:, None]
    words = philox4x32((j, i & MASK32, i >> 32, torch.full_like(j, draw & MASK32)), (key & MASK32, (key >> 32) & MASK32))
    return torch.stack(words, dim=-1).reshape(len(indices), blocks * 4)[:, :n]


def uniform(words: Tensor) -> Tensor:
    """Words -> float32 in (0, 1): the top 24 bits, centred in their interval (never 0, never 1)."""
    return ((words >> 8).to(torch.float32) + 0.5) * 2.0**-24


def normal(key: int, indices: Tensor, draw: int, n: int) -> Tensor:
    """(len(indices), n) standard normals by Box-Muller on pairs of uniforms."""
    m = n + (n & 1)
    u = uniform(uint32_words(key, indices, draw, m)).reshape(len(indices), m // 2, 2)
    r = torch.sqrt(-2.0 * torch.log(u[..., 0]))
    theta = (2 * math.pi) * u[..., 1]
    return torch.stack([r * torch.cos(theta), r * torch.sin(theta)], dim=-1).reshape(len(indices), m)[:, :n]


def integers(key: int, indices: Tensor, draw: int, low: int, high: int) -> Tensor:
    """One integer per sample, uniform in [low, high) (Lemire's multiply-shift on one 32-bit word)."""
    words = uint32_words(key, indices, draw, 1)[:, 0]
    return low + ((words * (high - low)) >> 32)
