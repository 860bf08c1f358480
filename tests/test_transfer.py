"""Host <-> device copies that do not wait (dmd_core/transfer.py)."""

from __future__ import annotations

import pytest
import torch

from dmd_core.transfer import HostCopy, to_device


def test_on_a_cpu_they_are_plain_copies_of_the_same_values():
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    assert torch.equal(to_device(t, "cpu"), t)
    copy = HostCopy(t * 2)
    assert copy.event is None and torch.equal(copy.get(), t * 2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the pinned, asynchronous path needs a CUDA GPU")
def test_on_a_gpu_the_copies_are_pinned_and_land_exactly():
    t = torch.randn(64, 3, 32, 32)
    on_gpu = to_device(t, "cuda")
    assert on_gpu.is_cuda and torch.equal(on_gpu.cpu(), t)
    copy = HostCopy(on_gpu * 3)
    assert copy.host.is_pinned() and copy.event is not None
    assert torch.equal(copy.get(), t * 3)
