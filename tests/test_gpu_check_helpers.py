"""Helpers of benchmarks/gpu_cifar.py that run on a CPU too."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import gpu_cifar  # noqa: E402


def _softmax_without_dim():
    return torch.nn.functional.softmax(torch.zeros(2, 3))  # torch warns from inside torch/nn/functional.py


def test_warning_sites_name_the_project_line_and_the_torch_frame_that_warned():
    sites = gpu_cifar.warning_sites(lambda: [_softmax_without_dim() for _ in range(2)], "Implicit dimension")
    line = _softmax_without_dim.__code__.co_firstlineno + 1
    assert len(sites) == 2
    own, via = sites[0].split(" via ")
    assert own == f"tests/test_gpu_check_helpers.py:{line} (_softmax_without_dim)", sites
    assert via.startswith("nn/functional.py:") and via.endswith("(_get_softmax_dim)"), sites
    assert gpu_cifar.warning_sites(_softmax_without_dim, "no such warning") == []
