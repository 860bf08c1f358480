"""Print the commands that set up the Kubernetes work pool (``make k8s-commands``); runs nothing.

The Secret's name, its namespace and its keys are read from base-job-template.json, so the printed
commands and the template cannot disagree. ``DMD_IMAGE`` and ``DMD_STORE`` from the environment fill in
the image and the bucket; unset, they stay shell variables for you to set. Standard library only.
"""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
TEMPLATE = HERE / "base-job-template.json"
POOL = "gpu-k8s"


def secret_keys(template: dict) -> list[tuple[str, bool]]:
    """(key, optional) of every environment variable the job reads from the store Secret."""
    env = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]["env"]
    refs = [e["valueFrom"]["secretKeyRef"] for e in env if "secretKeyRef" in e.get("valueFrom", {})]
    return [(r["key"], bool(r.get("optional", False))) for r in refs]


def commands(template: dict, image: str | None = None, store: str | None = None) -> str:
    """The setup as a shell script: image, Secret, pool, deployments, worker."""
    props = template["variables"]["properties"]
    namespace, secret = props["namespace"]["default"], props["store_secret"]["default"]
    rel = TEMPLATE.relative_to(ROOT).as_posix()
    img = shlex.quote(image) if image else '"$DMD_IMAGE"'
    env_store = shlex.quote(store) if store else '"$DMD_STORE"'
    keys = secret_keys(template)
    required = " ".join(k for k, opt in keys if not opt)
    optional = " ".join(k for k, opt in keys if opt)
    lines = [] if image and store else ["# Set DMD_IMAGE (REGISTRY/dmd-pipeline:TAG) and DMD_STORE (s3://BUCKET/PREFIX) first, or pass them to make."]
    lines += [
        "# 1. The image: this project's Dockerfile, pushed where the cluster's nodes pull from.",
        f"docker build -t {img} . && docker push {img}",
        f"# 2. The store's credentials as a Secret in the jobs' namespace ({namespace}). A file .env.store holds",
        f"#    {required} (and, if needed, {optional}),",
        "#    one NAME=value a line (git and docker ignore .env.*); the values never enter the template, the config or a deployment.",
        f"kubectl -n {namespace} create secret generic {secret} --from-env-file=.env.store",
        "# 3. The work pool, from the base job template (GPU request, Secret, shared memory, store cache).",
        f"prefect work-pool create {POOL} --type kubernetes --base-job-template {rel}",
        "# 4. The deployments (prefect-k8s.yaml): the nightly pipeline and one per stage, store in the bucket.",
        f"DMD_IMAGE={img} DMD_STORE={env_store} prefect deploy --prefect-file prefect-k8s.yaml --all",
        "# 5. A worker with cluster access (e.g. Prefect's prefect-worker Helm chart, image prefecthq/prefect:3-python3.11-kubernetes):",
        f"prefect worker start --pool {POOL} --type kubernetes",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    template = json.loads(TEMPLATE.read_text())
    print(commands(template, os.environ.get("DMD_IMAGE") or None, os.environ.get("DMD_STORE") or None), end="")


if __name__ == "__main__":
    main()
