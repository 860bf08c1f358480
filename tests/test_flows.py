"""The Prefect flow against a real (temporary, local) Prefect server: caching across runs, artifacts, failures."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from conftest import ROOT, write_config
from stages.registry import ORDER

CLASSIFIER = str(ROOT / "data" / "classifier")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


@pytest.fixture(scope="module")
def harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=600):  # a bound for a server that never starts, not a speed check
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
    rows = arts[0].data if isinstance(arts[0].data, list) else __import__("json").loads(arts[0].data)
    table = {r["metric"]: r["value"] for r in rows}
    assert table["training_steps"] == 4 and table["export_cache"] == "miss" and table["distill_wall_time_s"] > 0
    ev = json.loads((Path(first["outputs"]["evaluate"]) / "metrics.json").read_text())
    assert table["one_step_fd"] == round(ev["student_fd"], 4) and table["teacher_fd"] == round(ev["teacher_fd"], 4)
    assert str(arts[0].flow_run_id) == first["flow_run_id"]


def test_run_graph_shows_the_stage_dependencies(first):
    """Each task takes the previous task's result as its input: the UI draws generate -> distill -> evaluate -> export."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[first["flow_run_id"]])))
    by_name = {r.name: r for r in runs}
    assert sorted(by_name) == sorted([*ORDER, "promote"])  # promote: export.promote_if, after export (flows/promotion.py)
    assert by_name["generate"].task_inputs["upstream"] == []
    for up, down in zip(ORDER, ORDER[1:]):
        assert [i.id for i in by_name[down].task_inputs["upstream"]] == [by_name[up].id], down


def test_progress_artifacts_reach_100_percent(first):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    keys = ["dmd-generate-progress", "dmd-distill-progress", "dmd-evaluate-progress"]
    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=keys)))
    assert sorted(a.key for a in arts) == sorted(keys)
    assert all(a.type == "progress" and float(a.data) == 100.0 for a in arts)
    assert all(a.description.endswith(": finished") for a in arts)


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


@pytest.mark.slow
def test_same_config_in_another_store_is_not_served_from_the_first(first, tiny, tmp_path):
    """One Prefect database, two stores (e.g. two checkouts): each store gets its own outputs."""
    from flows.pipeline import dmd_pipeline

    other = tmp_path / "other-store"
    r = dmd_pipeline(config=str(tiny), overrides=[f"store={other}"])
    assert not any(r["cached"].values())
    assert all(Path(d).is_relative_to(other) and (Path(d) / "manifest.json").is_file() for d in r["outputs"].values())
    assert [Path(d).name for d in r["outputs"].values()] == [Path(d).name for d in first["outputs"].values()]  # same content keys


def test_failing_stage_fails_the_flow_with_its_stderr(first, tiny):
    from flows.pipeline import dmd_pipeline

    with pytest.raises(Exception) as e:  # a failure only the running stage finds (settings are checked before any task)
        dmd_pipeline(config=str(tiny), overrides=["export.onnx_tolerance=1e-30"])
    assert "ONNX parity failed" in str(e.value) and "stderr" in str(e.value)


def test_only_evaluate_uses_the_store(first, tiny):
    from flows.pipeline import dmd_pipeline

    r = dmd_pipeline(config=str(tiny), only="evaluate")
    assert list(r["outputs"]) == ["evaluate"] and r["cached"]["evaluate"]


def dmd(*args: str):
    """``dmd <args>`` in a subprocess, against the test server."""
    import subprocess
    import sys

    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    return subprocess.run([sys.executable, "-c", "from flows.cli import main; main()", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_dmd_run_only_prints_the_stage_output_last(first, tiny):
    r = dmd("run", "--config", str(tiny), "--only", "evaluate")
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.splitlines()[-1] == first["outputs"]["evaluate"]
    assert "/runs/flow-run/" in r.stderr  # where the dashboards are


@pytest.mark.slow  # a process-level check (a second Prefect server start); the flow's own tests stay fast
def test_dmd_run_on_its_own_server_starts_no_other(first, tiny, tmp_path):
    """Without PREFECT_API_URL, dmd run starts one local server; every log line of the run goes there
    (the stage-output threads too), so Prefect never starts a temporary server of its own."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    r = subprocess.run([sys.executable, "-c", "from flows.cli import main; main()", "run", "--config", str(tiny), "--only", "evaluate"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert "temporary server" not in (r.stdout + r.stderr).lower()
    assert f"kept in the local Prefect database under {tmp_path / 'prefect-home'}" in r.stderr


def test_dmd_run_only_names_the_missing_upstream_stage(harness, tmp_path, edm_teacher):
    cfg = write_config(tmp_path / "c.yaml", edm_teacher, tmp_path / "empty-store", distill={})
    r = dmd("run", "--config", str(cfg), "--only", "distill")
    assert r.returncode == 2 and r.stdout == ""
    assert "the generate output is missing from the store" in r.stderr and "--only generate" in r.stderr


def test_scheduled_deployment_has_its_cron(harness):
    from prefect.client.orchestration import get_client

    from flows.pipeline import scheduled_deployment

    dep_id = scheduled_deployment("0 3 * * *", overrides=["store=/store"], name="nightly-test").apply()
    with get_client(sync_client=True) as client:
        dep = client.read_deployment(dep_id)
    assert dep.name == "nightly-test" and dep.flow_id
    assert [s.schedule.cron for s in dep.schedules] == ["0 3 * * *"]
    assert dep.parameters["overrides"] == ["store=/store"]


@pytest.mark.slow  # a cancellation fault point on a served deployment
def test_cancelling_a_served_run_stops_every_stage_process(harness, tmp_path, edm_teacher):
    """The UI's Cancel on a deployment run: the runner SIGTERMs the flow process, which stops the stage tree."""
    import subprocess
    import sys
    import time

    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL
    from prefect.states import Cancelling

    from conftest import add_tiny_evaluate, still_alive, wait_for_processes

    cfg = write_config(tmp_path / "c.yaml", edm_teacher, tmp_path / "store", distill={}, num_samples=100_000, steps=40, shard_size=4096, batch_size=64)
    add_tiny_evaluate(cfg)  # the run checks every stage before it starts: evaluate's features must exist here
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PREFECT_RUNNER_POLL_FREQUENCY": "1"}
    serve = "from flows.pipeline import dmd_pipeline; dmd_pipeline.serve(name='cancel-test', print_starting_message=False)"
    runner = subprocess.Popen([sys.executable, "-c", serve], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        with get_client(sync_client=True) as client:
            deadline = time.time() + 600  # a bound for a runner that never registers, not a speed check
            while True:
                try:
                    dep = client.read_deployment_by_name("dmd-pipeline/cancel-test")
                    break
                except Exception:
                    assert time.time() < deadline, "the runner never registered its deployment"
                    time.sleep(0.5)
            run = client.create_flow_run_from_deployment(dep.id, parameters={"config": str(cfg), "num_processes": 2})
            procs = wait_for_processes(str(tmp_path), "stages.generate", 3)  # stage + launcher + 2 workers
            client.set_flow_run_state(run.id, Cancelling(), force=True)
            assert still_alive(procs, timeout=300) == []
            deadline = time.time() + 300
            while not client.read_flow_run(run.id).state.is_final() and time.time() < deadline:
                time.sleep(0.5)
            assert client.read_flow_run(run.id).state.name == "Cancelled"
    finally:
        os.killpg(runner.pid, 9)
        runner.wait()


@pytest.mark.slow  # ~30 s of Prefect start-up; dmd run's up-front refusals are in tests/bad_input/ (make test)
def test_dmd_schedule_refuses_what_would_fail_later(harness, tmp_path):
    r = dmd("schedule", "--cron", "not a cron")
    assert r.returncode == 2 and "invalid --cron" in r.stderr
    r = dmd("schedule", "--cron", "0 3 * * *", "--set", "distill.stepz=3")
    assert r.returncode == 2 and "stepz" in r.stderr
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    r = subprocess.run([sys.executable, "-c", "from flows.cli import main; main()", "schedule", "--cron", "0 3 * * *"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 2 and "PREFECT_API_URL" in r.stderr and "prefect server start" in r.stderr


def test_prefect_yaml_deploys_the_pipeline_and_one_deployment_per_stage(harness):
    """`prefect deploy --all` with prefect.yaml, as a team does for its work pool."""
    import subprocess
    import sys

    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    prefect = [sys.executable, "-m", "prefect"]
    subprocess.run([*prefect, "work-pool", "create", "gpu-process", "--type", "process"], cwd=ROOT, env=env, check=True, capture_output=True)
    r = subprocess.run([*prefect, "--no-prompt", "deploy", "--all"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    with get_client(sync_client=True) as client:
        deps = {d.name: d for d in client.read_deployments() if d.work_pool_name == "gpu-process"}
    assert set(deps) == {"pipeline", "generate", "distill", "evaluate", "export", "partition"}
    assert deps["partition"].entrypoint == "flows/partitions.py:generate_partition"
    assert [s.schedule.cron for s in deps["pipeline"].schedules] == ["0 3 * * *"]
    assert all(deps[s].parameters["only"] == s for s in ORDER) and "only" not in deps["pipeline"].parameters


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
