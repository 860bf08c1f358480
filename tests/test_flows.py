"""The Prefect flow against a real (temporary, local) Prefect server: caching across runs, artifacts, failures."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from conftest import ROOT, write_config

CLASSIFIER = str(ROOT / "data" / "classifier")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


@pytest.fixture(scope="module")
def harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=60):
        yield


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, edm_teacher):
    tmp = tmp_path_factory.mktemp("flow")
    cfg = write_config(tmp / "c.yaml", edm_teacher, tmp / "store", distill={})
    cfg.write_text(cfg.read_text() + (
        "evaluate:\n  num_samples: 100\n  batch_size: 50\n  features: digits\n"
        f"  classifier: {CLASSIFIER}\n  speed_batch_size: 8\n  speed_repeats: 1\n  num_threads: 1\n"
    ))  # fmt: skip
    return cfg


@pytest.fixture(scope="module")
def first(harness, tiny):
    from flows.pipeline import dmd_pipeline

    return dmd_pipeline(config=str(tiny))


def test_first_run_completes_and_publishes(first):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    assert set(first["outputs"]) == {"generate", "distill", "evaluate", "export"}
    assert not any(first["cached"].values())
    assert (Path(first["outputs"]["export"]) / "README.md").is_file()
    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["dmd-metrics"])))
    assert arts, "the metrics table artifact is missing"
    table = arts[0].data if isinstance(arts[0].data, list) else __import__("json").loads(arts[0].data)
    assert table[0]["training_steps"] == 4 and "one_step_fd" in table[0] and table[0]["export_cache"] == "miss"


def test_second_run_is_all_cached(first, tiny):
    from flows.pipeline import dmd_pipeline

    again = dmd_pipeline(config=str(tiny))
    assert again["cached"] == {"generate": True, "distill": True, "evaluate": True, "export": True}
    assert again["outputs"] == first["outputs"]


def test_evaluate_change_reruns_only_evaluate_and_export(first, tiny):
    from flows.pipeline import dmd_pipeline

    r = dmd_pipeline(config=str(tiny), overrides=["evaluate.num_samples=120"])
    assert r["cached"] == {"generate": True, "distill": True, "evaluate": False, "export": False}


def test_deleted_distill_output_is_recomputed(first, tiny):
    from flows.pipeline import dmd_pipeline

    shutil.rmtree(first["outputs"]["distill"])
    r = dmd_pipeline(config=str(tiny))
    assert r["cached"]["generate"] and not r["cached"]["distill"]
    assert (Path(first["outputs"]["distill"]) / "manifest.json").is_file()
    assert r["cached"]["evaluate"]  # training is deterministic: the same generator, the same evaluation


def test_failing_stage_fails_the_flow_with_its_stderr(first, tiny):
    from flows.pipeline import dmd_pipeline

    with pytest.raises(Exception) as e:
        dmd_pipeline(config=str(tiny), overrides=["evaluate.num_samples=10"])
    assert "feature dimension" in str(e.value) and "stderr" in str(e.value)


def test_only_evaluate_uses_the_store(first, tiny):
    from flows.pipeline import dmd_pipeline

    r = dmd_pipeline(config=str(tiny), only="evaluate")
    assert list(r["outputs"]) == ["evaluate"] and r["cached"]["evaluate"]


def test_scheduled_deployment_has_its_cron(harness):
    from prefect.client.orchestration import get_client

    from flows.pipeline import scheduled_deployment

    dep_id = scheduled_deployment("0 3 * * *", overrides=["store=/store"], name="nightly-test").apply()
    with get_client(sync_client=True) as client:
        dep = client.read_deployment(dep_id)
    assert dep.name == "nightly-test" and dep.flow_id
    assert [s.schedule.cron for s in dep.schedules] == ["0 3 * * *"]
    assert dep.parameters["overrides"] == ["store=/store"]


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="Debian's docker-compose is not installed (.ci/run installs it)")
def test_docker_compose_file_is_valid(tmp_path):
    import subprocess

    env = tmp_path / ".env"
    env.write_text("POSTGRES_PASSWORD=secret\nPREFECT_SERVER_API_AUTH_STRING=admin:pass\n")
    ok = subprocess.run(["docker-compose", "--env-file", str(env), "-f", str(ROOT / "docker-compose.yml"), "config", "-q"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    # no defaults for secrets: an empty .env is refused
    empty = tmp_path / "empty.env"
    empty.write_text("")
    bad = subprocess.run(["docker-compose", "--env-file", str(empty), "-f", str(ROOT / "docker-compose.yml"), "config", "-q"], capture_output=True, text=True)
    assert bad.returncode != 0 and "POSTGRES_PASSWORD" in bad.stderr
    import yaml

    spec = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert "ports" not in spec["services"]["postgres"]
    assert spec["services"]["worker"]["deploy"]["resources"]["reservations"]["devices"][0]["driver"] == "nvidia"
