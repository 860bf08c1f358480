"""kill -9 at named points of every stage (``write/<file>``: between writing a file's temporary copy and its rename), then rerun: the output equals an uninterrupted run's, byte
for byte, nothing temporary is left, and no final name ever held an incomplete output.

``make test`` kills at one mid-work point per stage plus mid-checkpoint and mid-manifest; ``make faults``
at every point below.
"""

from __future__ import annotations

import pytest

from common import KILLED, Pipeline, dmd_forked, leftovers, max_weight_diff, product_files
from stages.store import LocalStore

full = pytest.mark.faults_full

POINTS = [
    ("generate", "generate.shard-written:2"),  # a shard written under its temporary name, no checksum yet
    pytest.param("generate", "generate.checksum-written:1", marks=full),  # checksum written, shard not renamed
    pytest.param("generate", "write/pairs-000001.tar.sha256:1", marks=full),  # mid-checksum
    pytest.param("generate", "generate.before-manifest", marks=full),
    ("generate", "write/manifest.json"),  # mid-manifest
    pytest.param("generate", "publish", marks=full),  # complete, not yet under its final name
    pytest.param("distill", "distill.step:1", marks=full),
    ("distill", "distill.step:3"),  # mid-training, between checkpoints
    pytest.param("distill", "distill.checkpoint-state:1", marks=full),
    ("distill", "distill.checkpoint-networks:2"),  # mid-checkpoint
    pytest.param("distill", "distill.checkpoint-renamed:1", marks=full),
    pytest.param("distill", "write/trainer.json:2", marks=full),
    pytest.param("distill", "distill.before-manifest", marks=full),
    pytest.param("distill", "write/manifest.json", marks=full),
    pytest.param("distill", "publish", marks=full),
    ("evaluate", "evaluate.measured"),
    pytest.param("evaluate", "evaluate.before-manifest", marks=full),
    pytest.param("evaluate", "write/manifest.json", marks=full),
    pytest.param("evaluate", "publish", marks=full),
    ("export", "export.onnx-written"),
    pytest.param("export", "export.before-manifest", marks=full),
    pytest.param("export", "write/manifest.json", marks=full),
    pytest.param("export", "publish", marks=full),
]


@pytest.fixture(scope="session")
def pipeline(tmp_path_factory) -> Pipeline:
    return Pipeline(tmp_path_factory.mktemp("faults"))


@pytest.mark.parametrize("stage, fault", POINTS)
def test_killed_run_resumes_to_the_uninterrupted_output(pipeline, tmp_path, stage, fault):
    store = pipeline.store_before(stage, tmp_path / "store")
    code = dmd_forked(pipeline.args(stage, store), tmp_path / "killed.log", fault=fault)
    assert code == KILLED, f"the fault point {fault} was never reached (exit {code}):\n{(tmp_path / 'killed.log').read_text()[-2000:]}"
    assert not [p for p in (store / stage).iterdir() if not p.name.startswith(".")], "an incomplete output is under its final name"

    code = dmd_forked(pipeline.args(stage, store), tmp_path / "rerun.log")
    assert code == 0, (tmp_path / "rerun.log").read_text()[-3000:]
    out, ref = pipeline.output(stage, store), pipeline.output(stage)
    assert out.name == ref.name
    assert LocalStore(out.parent.parent).verified(out) is not None
    assert product_files(out) == product_files(ref)
    weights = {"distill": "generator/diffusion_pytorch_model.safetensors", "export": "generator/diffusion_pytorch_model.safetensors"}
    if stage in weights:
        assert max_weight_diff(out / weights[stage], ref / weights[stage]) == 0.0
    assert leftovers(store) == []
