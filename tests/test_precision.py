"""Compute precision of generate and evaluate: the switches, the key, and the recorded cost in the data."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import ROOT, write_config

from dmd_core.precision import compute_precision
from dmd_core.shards import sample_labels
from dmd_core.solvers import teacher_sampler
from stages import chain, generate
from stages.config import load_config


def test_switches_inside_and_restored_after():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    with compute_precision("tf32", "cpu"):
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    with compute_precision("fp32", "cpu"):
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        assert torch.nn.functional.linear(torch.ones(2, 3), torch.ones(4, 3)).dtype == torch.float32
    with compute_precision("bf16", "cpu"):
        assert torch.is_autocast_enabled("cpu")
        assert torch.nn.functional.linear(torch.ones(2, 3), torch.ones(4, 3)).dtype == torch.bfloat16
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == saved and not torch.is_autocast_enabled("cpu")


def test_bf16_generate_is_keyed_and_records_its_error_against_fp32(tmp_path, edm_teacher):
    cfg = write_config(tmp_path / "c.yaml", edm_teacher, tmp_path / "store", num_samples=24, shard_size=16)
    fp32 = chain.run(load_config(cfg), "generate", progress=False).manifest
    bf16_cfg = load_config(cfg, ["generate.precision=bf16"])
    bf16 = chain.run(bf16_cfg, "generate", progress=False).manifest
    assert "precision" not in fp32.upstream and bf16.upstream["precision"] == "bf16" and fp32.key != bf16.key
    assert fp32.info["precision"] == "fp32" and fp32.info["precision_error"]["max_abs"] == 0.0  # fp32 stored as float32: exact
    err = bf16.info["precision_error"]
    assert err["samples"] == 8 and 0 < err["mean_abs"] <= err["max_abs"] < 0.5
    # the same numbers, computed here: the stored first batch against an fp32 solve of its noise
    den = chain.resolve_teacher(bf16_cfg).load()
    from dmd_core.shards import read_pairs

    z, got, labels = read_pairs(tmp_path / "store" / "generate" / bf16.key / "pairs-000000.tar", 8)
    assert labels.tolist() == sample_labels(range(8), 10).tolist()
    want = teacher_sampler(den, "heun", 3)[0](z, labels).float()
    assert float((got - want).abs().max()) == err["max_abs"]


@pytest.mark.parametrize("sets", [["generate.dtype=float16"], ["generate.precision=bf16"]], ids=["fp32-float16", "bf16"])
def test_a_resumed_run_records_the_same_precision_error(tmp_path, edm_teacher, sets):
    """The error is measured against the fp32 solve made while generating (an fp32 run's own images); when
    shard 0 comes from an earlier run it is solved again here, as that run did, giving the same numbers."""
    cfg = load_config(write_config(tmp_path / "c.yaml", edm_teacher, tmp_path / "store", num_samples=24, shard_size=16), [*sets, "generate.batch_size=16"])
    m = chain.run(cfg, "generate", progress=False).manifest
    assert m.info["precision_error"]["max_abs"] > 0  # float16 storage or bf16 compute: not trivially zero
    again = generate.precision_error(cfg, chain.plan(cfg, "generate"), torch.device("cpu"))  # no solve from the run
    assert again == m.info["precision_error"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 is allowed where a GPU is")
def test_fp16_needs_a_gpu(tmp_path, edm_teacher):
    import sys

    sys.path.insert(0, str(ROOT / "tests" / "bad_input"))
    from refusal import assert_refused  # the bad-input suite's check

    cfg = write_config(tmp_path / "c.yaml", edm_teacher, tmp_path / "store")
    assert_refused(["generate", "--config", str(cfg), "--set", "generate.precision=fp16"], tmp_path / "store", "generate.precision=fp16", "GPU")
