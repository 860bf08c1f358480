"""The Kubernetes work pool without a cluster: deploy/k8s/base-job-template.json rendered by prefect-kubernetes'
own job configuration (as its worker does for a flow run), the Job it makes checked field by field against
the Kubernetes API's types, the template's variables checked as Prefect's server checks them, and
prefect-k8s.yaml's deployments against that pool."""

from __future__ import annotations

import asyncio
import copy
import fnmatch
import json
import os
import subprocess
import sys
import uuid
from types import SimpleNamespace

import pytest
import yaml
from conftest import ROOT
from kubernetes_asyncio.client import ApiClient
from kubernetes_asyncio.client import models as k8s
from prefect.client.schemas.objects import FlowRun
from prefect.server.schemas.actions import WorkPoolCreate, validate_base_job_template
from prefect.utilities.schema_tools import is_valid_schema, validate
from prefect.utilities.templating import apply_values
from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

TEMPLATE = ROOT / "deploy" / "k8s" / "base-job-template.json"
SECRET_KEYS = ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION"]
# prefect-kubernetes' worker refuses a manifest without these two in the pod spec (its own default template puts
# them there); the API server ignores them there. Nothing else may be unknown to the Kubernetes types.
PREFECT_REQUIRED_EXTRAS = {"$.spec.template.spec.parallelism", "$.spec.template.spec.completions"}
QUANTITIES = {"limits", "requests", "sizeLimit"}  # resource.Quantity reads a JSON number or a string


def template() -> dict:
    return json.loads(TEMPLATE.read_text())


class NoAPI:
    """A client for rendering that fails on any call: the template must need no blocks or Prefect variables."""

    def __getattr__(self, name):
        raise AssertionError(f"rendering the template called the Prefect API ({name})")


def render(tpl: dict, values: dict) -> dict:
    """The Job manifest a kubernetes worker submits for a flow run of a deployment with job variables ``values``."""
    cfg = asyncio.run(KubernetesWorkerJobConfiguration.from_template_and_values(copy.deepcopy(tpl), values, client=NoAPI()))
    cfg.prepare_for_flow_run(FlowRun(id=uuid.uuid4(), name="brave-fox", flow_id=uuid.uuid4()))
    return cfg.job_manifest


def schema_errors(data, klass: str, path: str = "$", quantity: bool = False) -> list[str]:
    """Each field of ``data`` that the Kubernetes type ``klass`` (kubernetes-asyncio's OpenAPI models) lacks or types otherwise."""
    if klass.startswith("list["):
        if not isinstance(data, list):
            return [f"{path}: a list expected, got {type(data).__name__}"]
        return [e for i, x in enumerate(data) for e in schema_errors(x, klass[5:-1], f"{path}[{i}]", quantity)]
    if klass.startswith("dict("):
        if not isinstance(data, dict):
            return [f"{path}: a mapping expected, got {type(data).__name__}"]
        value_type = klass[klass.index(",") + 1 : -1].strip()
        return [e for k, v in data.items() for e in schema_errors(v, value_type, f"{path}.{k}", quantity)]
    primitive = {"str": (str,), "int": (int,), "bool": (bool,), "float": (int, float), "datetime": (str,), "object": (object,)}
    if klass in primitive:
        ok = (str, int, float) if klass == "str" and quantity else primitive[klass]
        bad = not isinstance(data, ok) or (klass == "int" and isinstance(data, bool))
        return [f"{path}: {klass} expected, got {data!r}"] if bad else []
    if not isinstance(data, dict):
        return [f"{path}: {klass} expected, got {data!r}"]
    model = getattr(k8s, klass)
    fields = {json_name: model.openapi_types[attr] for attr, json_name in model.attribute_map.items()}
    errors = []
    for key, value in data.items():
        where = f"{path}.{key}"
        if key not in fields:
            errors.append(f"{where}: not a field of {klass}")
        else:
            errors += schema_errors(value, fields[key], where, key in QUANTITIES)
    return errors


def as_v1job(manifest: dict) -> k8s.V1Job:
    """The manifest as kubernetes-asyncio reads a Job from the API: required fields and enums checked."""

    async def read():
        async with ApiClient() as api:
            return api.deserialize(SimpleNamespace(data=json.dumps(manifest)), "V1Job")

    return asyncio.run(read())


def k8s_deployments() -> list[dict]:
    """prefect-k8s.yaml's deployments with ``{{ $VAR }}`` filled from the environment, as `prefect deploy` fills them."""
    spec = yaml.safe_load((ROOT / "prefect-k8s.yaml").read_text())
    return [apply_values(d, os.environ, remove_notset=False) for d in spec["deployments"]]


def test_template_is_a_work_pool_base_job_template_prefect_accepts():
    tpl = template()
    validate_base_job_template(tpl)  # every {{ placeholder }} of job_configuration is a declared variable
    is_valid_schema(tpl["variables"], preprocess=False)
    assert WorkPoolCreate(name="gpu-k8s", type="kubernetes", base_job_template=tpl).base_job_template == tpl
    props = tpl["variables"]["properties"]
    defaults = {k: p["default"] for k, p in props.items() if "default" in p}
    assert validate(defaults, tpl["variables"], raise_on_error=True, ignore_required=True, allow_none_with_default=True) == []
    assert set(tpl["job_configuration"]) <= set(KubernetesWorkerJobConfiguration.model_fields)
    assert tpl["variables"]["required"] == ["image"] and "default" not in props["image"]
    assert (props["gpu_count"]["default"], props["store_secret"]["default"], props["namespace"]["default"]) == (1, "dmd-store", "default")
    # the check can fail: an undeclared placeholder is refused
    bad = template()
    bad["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["priorityClassName"] = "{{ priority }}"
    with pytest.raises(ValueError, match="priority"):
        validate_base_job_template(bad)


def test_variables_refuse_a_missing_image_and_bad_values():
    variables = template()["variables"]

    def errors(values: dict, ignore_required: bool = False) -> list:
        return validate(values, variables, ignore_required=ignore_required, allow_none_with_default=True)

    assert errors({"image": "registry.example.com/dmd-pipeline:0.1.0", "gpu_count": 8}) == []
    assert errors({}) != []  # a flow run without an image: the server refuses it when the run is created
    # `prefect deploy` leaves "{{ $DMD_IMAGE }}" or "" for an unset DMD_IMAGE: refused at deploy time
    for image in ["", "{{ $DMD_IMAGE }}", "dmd pipeline"]:
        assert errors({"image": image}, ignore_required=True) != [], image
    assert errors({"image": "r/d:1", "gpu_count": 0}) != []
    assert errors({"image": "r/d:1", "store_secret": "Bad_Name"}) != []


def test_rendered_job_is_a_kubernetes_job_with_gpu_image_and_secret_env():
    m = render(template(), {"image": "registry.example.com/dmd-pipeline:0.1.0", "gpu_count": 2, "store_secret": "team-store",
                            "namespace": "ml", "node_selector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}})  # fmt: skip
    errors = schema_errors(m, "V1Job")
    assert {e.split(":")[0] for e in errors} == PREFECT_REQUIRED_EXTRAS, errors
    job = as_v1job(m)
    assert (job.api_version, job.kind, job.metadata.namespace, job.metadata.generate_name) == ("batch/v1", "Job", "ml", "brave-fox-")
    assert (job.spec.backoff_limit, job.spec.ttl_seconds_after_finished) == (0, 86400)
    pod = job.spec.template.spec
    assert pod.restart_policy == "Never" and len(pod.containers) == 1
    c = pod.containers[0]
    assert c.image == "registry.example.com/dmd-pipeline:0.1.0" and c.args == ["prefect", "flow-run", "execute"]
    assert c.resources.limits == {"nvidia.com/gpu": "2"} and not c.resources.requests
    assert pod.node_selector == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert [(t.key, t.operator, t.effect) for t in pod.tolerations] == [("nvidia.com/gpu", "Exists", "NoSchedule")]
    env = {e.name: e for e in c.env}
    refs = {n: e.value_from.secret_key_ref for n, e in env.items() if e.value_from is not None}
    assert sorted(refs) == sorted(SECRET_KEYS)
    assert {(r.name, r.key, bool(r.optional)) for r in refs.values()} == {
        ("team-store", k, True) for k in SECRET_KEYS  # optional: without them the pod's own identity (IRSA, Workload Identity) serves
    }
    assert all(env[k].value is None for k in SECRET_KEYS)  # from the Secret only, never a literal
    assert env["DMD_STORE_CACHE"].value == "/cache"
    # backoffLimit 0: an evicted pod's flow run is rescheduled by Prefect (and resumes from the store), not retried by Kubernetes
    assert env["PREFECT_FLOW_RUN_EXECUTE_SIGTERM_BEHAVIOR"].value == "reschedule"
    assert env["PREFECT__FLOW_RUN_ID"].value == job.metadata.labels["prefect.io/flow-run-id"]
    mounts = {v.name: v.mount_path for v in c.volume_mounts}
    volumes = {v.name: v.empty_dir for v in pod.volumes}
    assert mounts == {"dshm": "/dev/shm", "store-cache": "/cache"}
    assert (volumes["dshm"].medium, volumes["dshm"].size_limit, volumes["store-cache"].size_limit) == ("Memory", "8Gi", "200Gi")


def test_deployment_env_overrides_and_the_defaults_render():
    m = render(template(), {"image": "r/d:1", "env": {"AWS_DEFAULT_REGION": "eu-west-1", "NCCL_DEBUG": "WARN"}})
    assert {e.split(":")[0] for e in schema_errors(m, "V1Job")} == PREFECT_REQUIRED_EXTRAS
    env = m["spec"]["template"]["spec"]["containers"][0]["env"]
    names = [e["name"] for e in env]
    assert len(names) == len(set(names))  # a job variable replaces the Secret's entry rather than doubling it
    by_name = {e["name"]: e for e in env}
    assert by_name["AWS_DEFAULT_REGION"] == {"name": "AWS_DEFAULT_REGION", "value": "eu-west-1"} and by_name["NCCL_DEBUG"]["value"] == "WARN"
    assert by_name["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "dmd-store"
    assert m["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"] == {"nvidia.com/gpu": 1}


def test_schema_check_refuses_misplaced_and_mistyped_fields():
    m = render(template(), {"image": "r/d:1"})
    m["spec"]["template"]["spec"]["restartpolicy"] = "Never"
    m["spec"]["template"]["spec"]["containers"][0]["backoffLimit"] = 0
    m["spec"]["ttlSecondsAfterFinished"] = "1d"
    env = m["spec"]["template"]["spec"]["containers"][0]["env"]
    i = [e["name"] for e in env].index("AWS_ACCESS_KEY_ID")
    env[i]["valueFrom"]["secretRef"] = {"name": "x"}
    found = {e.split(":")[0] for e in schema_errors(m, "V1Job")} - PREFECT_REQUIRED_EXTRAS
    assert found == {
        "$.spec.template.spec.restartpolicy",
        "$.spec.template.spec.containers[0].backoffLimit",
        "$.spec.ttlSecondsAfterFinished",
        f"$.spec.template.spec.containers[0].env[{i}].valueFrom.secretRef",
    }
    del m["spec"]["template"]["spec"]["containers"][0]["env"][-1]["name"]
    with pytest.raises(ValueError, match="name"):
        as_v1job(m)


def test_k8s_deployments_target_the_pool_with_a_bucket_store(monkeypatch):
    tpl = template()
    monkeypatch.setenv("DMD_IMAGE", "registry.example.com/dmd-pipeline:0.1.0")
    monkeypatch.setenv("DMD_STORE", "s3://team-dmd/runs")
    deps = k8s_deployments()
    process = yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]
    assert [d["name"] for d in deps] == [d["name"] + "-k8s" for d in process]
    assert [d.get("parameters", {}).get("only") for d in deps] == [d.get("parameters", {}).get("only") for d in process]
    assert deps[0]["schedules"] == process[0]["schedules"]
    for d, twin in zip(deps, process):
        assert d["entrypoint"] == twin["entrypoint"] and d["work_pool"]["name"] == "gpu-k8s"
        if "parameters" in twin:  # the partition deployment takes its parameters from the pipeline's run
            assert d["parameters"]["overrides"] == ["store=s3://team-dmd/runs"]
        jv = d["work_pool"]["job_variables"]
        assert jv["env"] == {"DMD_PARTITION_DEPLOYMENT": "dmd-generate-partition/partition-k8s"}  # partitions stay on this pool
        assert validate(jv, tpl["variables"], ignore_required=True, allow_none_with_default=True) == []
        c = render(tpl, jv)["spec"]["template"]["spec"]["containers"][0]
        assert c["image"] == "registry.example.com/dmd-pipeline:0.1.0" and c["resources"]["limits"] == {"nvidia.com/gpu": 1}
    # without DMD_IMAGE the placeholder stays and the pool's schema refuses the deployment
    monkeypatch.delenv("DMD_IMAGE")
    unset = k8s_deployments()[0]["work_pool"]["job_variables"]
    assert unset["image"] == "{{ $DMD_IMAGE }}"
    assert validate(unset, tpl["variables"], ignore_required=True, allow_none_with_default=True) != []
    # the code is in the image's WORKDIR, where the pull step runs the flow
    spec = yaml.safe_load((ROOT / "prefect-k8s.yaml").read_text())
    workdir = [line.split()[1] for line in (ROOT / "Dockerfile").read_text().splitlines() if line.startswith("WORKDIR")]
    assert [spec["pull"][0]["prefect.deployments.steps.set_working_directory"]["directory"]] == workdir
    # no credentials anywhere in the deployment files or the template
    for path in [TEMPLATE, ROOT / "prefect-k8s.yaml"]:
        text = path.read_text()
        assert "AWS_SECRET_ACCESS_KEY=" not in text and '"value": "AKIA' not in text


def test_k8s_commands_print_the_setup_from_the_template():
    tpl = template()
    out = subprocess.run(["make", "-s", "k8s-commands", f"PYTHON={sys.executable}", "DMD_IMAGE=reg.example/dmd:1", "DMD_STORE=s3://b/p"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60, check=True).stdout  # fmt: skip
    cmds = [line for line in out.splitlines() if line and not line.startswith("#")]
    assert cmds == [
        "docker build -t reg.example/dmd:1 . && docker push reg.example/dmd:1",
        "kubectl -n default create secret generic dmd-store --from-env-file=.env.store",
        "prefect work-pool create gpu-k8s --type kubernetes --base-job-template deploy/k8s/base-job-template.json",
        "DMD_IMAGE=reg.example/dmd:1 DMD_STORE=s3://b/p prefect deploy --prefect-file prefect-k8s.yaml --all",
        "prefect worker start --pool gpu-k8s --type kubernetes",
    ]
    assert " ".join(SECRET_KEYS) in out.replace("(and, if needed, ", "").replace("),", "")
    assert (ROOT / "deploy/k8s/base-job-template.json").is_file() and tpl["variables"]["properties"]["store_secret"]["default"] == "dmd-store"
    # .env.store, where the printed command reads the credentials from, stays out of git and the image
    for ignore_file in [".gitignore", ".dockerignore"]:
        patterns = [p.strip() for p in (ROOT / ignore_file).read_text().splitlines() if p.strip() and not p.startswith("#")]
        last = None
        for p in patterns:  # the last matching pattern wins, `!` re-includes
            if fnmatch.fnmatch(".env.store", p.lstrip("!")):
                last = not p.startswith("!")
        assert last, f"{ignore_file} does not keep .env.store out"


@pytest.mark.slow  # a temporary Prefect server (10-30 s to start on 2 cores)
def test_pool_and_deployments_on_a_real_server():
    """`prefect work-pool create --base-job-template` and `prefect deploy --prefect-file prefect-k8s.yaml` as printed."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=600):
        env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
        env.pop("DMD_IMAGE", None)
        prefect = [sys.executable, "-m", "prefect", "--no-prompt"]
        create = [*prefect, "work-pool", "create", "gpu-k8s", "--type", "kubernetes", "--base-job-template", str(TEMPLATE)]
        subprocess.run(create, cwd=ROOT, env=env, check=True, capture_output=True, timeout=300)
        deploy = [*prefect, "deploy", "--prefect-file", "prefect-k8s.yaml", "--all"]
        unset = subprocess.run(deploy, cwd=ROOT, env={**env, "DMD_STORE": "s3://team-dmd/runs"}, capture_output=True, text=True, timeout=300)
        with get_client(sync_client=True) as client:
            assert unset.returncode != 0 and not client.read_deployments(), unset.stdout[-2000:]
        assert "Validation failed for field 'image'" in unset.stdout + unset.stderr, unset.stdout[-2000:] + unset.stderr[-2000:]
        ok = subprocess.run(deploy, cwd=ROOT, env={**env, "DMD_IMAGE": "reg.example/dmd:1", "DMD_STORE": "s3://team-dmd/runs"},
                            capture_output=True, text=True, timeout=300)  # fmt: skip
        assert ok.returncode == 0, ok.stdout[-2000:] + ok.stderr[-2000:]
        with get_client(sync_client=True) as client:
            pool = client.read_work_pool("gpu-k8s")
            deps = {d.name: d for d in client.read_deployments()}
    assert pool.type == "kubernetes" and pool.base_job_template == template()
    assert set(deps) == {"pipeline-k8s", "generate-k8s", "distill-k8s", "evaluate-k8s", "export-k8s", "partition-k8s"}
    for d in deps.values():
        env = {"DMD_PARTITION_DEPLOYMENT": "dmd-generate-partition/partition-k8s"}
        assert d.work_pool_name == "gpu-k8s" and d.job_variables == {"image": "reg.example/dmd:1", "gpu_count": 1, "env": env}
        assert d.name == "partition-k8s" or d.parameters["overrides"] == ["store=s3://team-dmd/runs"]
    assert [s.schedule.cron for s in deps["pipeline-k8s"].schedules] == ["0 3 * * *"]
