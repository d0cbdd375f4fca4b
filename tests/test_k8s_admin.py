"""What a cluster admin checks in the rendered Kubernetes objects (issue #33, finding 9): pods
without a GPU keep off GPU nodes, the default image is a published, versioned tag pulled
accordingly, and a grid's local data files are in etcd once, not once per run."""

from __future__ import annotations

import textwrap
from pathlib import Path

import kubernetes_validate
import pytest

from launcher.backends.k8s_manifests import run_documents
from launcher.grid import plan

SCHEMA_VERSIONS = ("1.30", "1.37")
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}


def _plan(tmp_path: Path, body: str):
    path = tmp_path / "e.yaml"
    path.write_text(textwrap.dedent("""\
        name: admin
        backend: kubernetes
        storage: {root: /mnt/qlaunch}
    """) + textwrap.dedent(body))
    return plan(path)


def _pods(p) -> dict[str, dict]:
    """role → pod spec of every Job of the plan's first run."""
    jobs = [d for d in run_documents(p, p.runs[0]) if d["kind"] == "Job"]
    for job in jobs:
        for version in SCHEMA_VERSIONS:
            kubernetes_validate.validate(job, version, strict=True)
    return {job["metadata"]["labels"]["qlaunch.dev/role"]: job["spec"]["template"]["spec"] for job in jobs}


# ---- c. only GPU pods tolerate the GPU taint ------------------------------------------------------
def test_cpu_only_pods_do_not_tolerate_the_gpu_taint(tmp_path):
    pods = _pods(_plan(tmp_path, """\
        resources: {gpus_per_node: 0, cpus_per_task: 2, memory: 4G}
    """))
    for role in ("train", "infer"):
        assert "tolerations" not in pods[role] and "nodeSelector" not in pods[role]


def test_gpu_training_with_cpu_inference_and_an_extra_toleration(tmp_path):
    spot = {"key": "cloud.google.com/gke-spot", "operator": "Equal", "value": "true", "effect": "NoSchedule"}
    pods = _pods(_plan(tmp_path, """\
        inference: {resources: {gpus_per_node: 0}}
        kubernetes:
          tolerations:
            - {key: nvidia.com/gpu, operator: Exists}
            - {key: cloud.google.com/gke-spot, operator: Equal, value: "true"}
    """))
    assert GPU_TOLERATION in pods["train"]["tolerations"] and spot in pods["train"]["tolerations"]
    # The CPU inference pod keeps the spot toleration, not the GPU one, and no GPU node label.
    assert pods["infer"]["tolerations"] == [spot]
    assert "nodeSelector" not in pods["infer"]
    assert "nvidia.com/gpu" not in pods["infer"]["containers"][0]["resources"]["limits"]


def test_gpu_pods_keep_the_gpu_toleration_by_default(tmp_path):
    pods = _pods(_plan(tmp_path, ""))
    assert all(pod["tolerations"] == [GPU_TOLERATION] for pod in pods.values())


@pytest.mark.parametrize("gpus", [0, 1])
def test_every_cpu_or_gpu_pod_is_valid(tmp_path, gpus):
    _pods(_plan(tmp_path, f"resources: {{gpus_per_node: {gpus}}}\n"))
