"""What a cluster admin checks in the rendered Kubernetes objects (issue #33, finding 9): pods
without a GPU keep off GPU nodes, the default image is a published, versioned tag pulled
accordingly, and a grid's local data files are in etcd once, not once per run."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import kubernetes_validate
import pytest

from launcher.backends.kubernetes.manifests import evaluation_documents, run_documents
from launcher.grid import plan

SCHEMA_VERSIONS = ("1.30", "1.37")
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}


def _plan(tmp_path: Path, body: str):
    path = tmp_path / "e.yaml"
    path.write_text(
        textwrap.dedent("""\
        name: admin
        backend: kubernetes
        storage: {root: /mnt/qlaunch}
    """)
        + textwrap.dedent(body)
    )
    return plan(path)


def _pods(p) -> dict[str, dict]:
    """role → pod spec of every Job of the plan's first run ("infer": the grid evaluation Job's)."""
    jobs = [d for d in run_documents(p, p.runs[0]) + evaluation_documents(p, p.runs) if d["kind"] == "Job"]
    for job in jobs:
        for version in SCHEMA_VERSIONS:
            kubernetes_validate.validate(job, version, strict=True)
    roles = {"evaluate": "infer"}
    return {
        roles.get(role := job["metadata"]["labels"]["qlaunch.dev/role"], role): job["spec"]["template"]["spec"]
        for job in jobs
    }


# ---- c. only GPU pods tolerate the GPU taint ------------------------------------------------------
def test_cpu_only_pods_do_not_tolerate_the_gpu_taint(tmp_path):
    pods = _pods(
        _plan(
            tmp_path,
            """\
        resources: {gpus_per_node: 0, cpus_per_task: 2, memory: 4G}
    """,
        )
    )
    for role in ("train", "infer"):
        assert "tolerations" not in pods[role] and "nodeSelector" not in pods[role]


def test_gpu_training_with_cpu_inference_and_an_extra_toleration(tmp_path):
    spot = {"key": "cloud.google.com/gke-spot", "operator": "Equal", "value": "true", "effect": "NoSchedule"}
    pods = _pods(
        _plan(
            tmp_path,
            """\
        inference: {resources: {gpus_per_node: 0}}
        kubernetes:
          tolerations:
            - {key: nvidia.com/gpu, operator: Exists}
            - {key: cloud.google.com/gke-spot, operator: Equal, value: "true"}
    """,
        )
    )
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


# ---- d. a versioned default image, pulled as its tag calls for ------------------------------------
def test_default_image_is_this_qlaunch_versions_tag_pulled_once_per_node(tmp_path):
    from launcher import __version__

    for pod in _pods(_plan(tmp_path, "")).values():
        container = pod["containers"][0]
        assert container["image"] == f"ghcr.io/qlaunch/qlaunch-train:{__version__}"
        assert not container["image"].endswith(":latest")
        assert container["imagePullPolicy"] == "IfNotPresent"


@pytest.mark.parametrize(
    "image, policy",
    [
        ("ghcr.io/you/qlaunch-train:latest", "Always"),
        ("ghcr.io/you/qlaunch-train", "Always"),  # no tag means latest
        ("registry.example.com:5000/qlaunch-train", "Always"),  # a port is not a tag
        ("registry.example.com:5000/team/qlaunch-train:0.1.0", "IfNotPresent"),
        ("ghcr.io/you/qlaunch-train@sha256:" + "0" * 64, "IfNotPresent"),
    ],
)
def test_pull_policy_follows_the_tag_unless_set(tmp_path, image, policy):
    pods = _pods(_plan(tmp_path, f"kubernetes: {{image: '{image}'}}\n"))
    assert {pod["containers"][0]["imagePullPolicy"] for pod in pods.values()} == {policy}
    explicit = _pods(_plan(tmp_path, f"kubernetes: {{image: '{image}', image_pull_policy: Never}}\n"))
    assert {pod["containers"][0]["imagePullPolicy"] for pod in explicit.values()} == {"Never"}


def test_staging_pod_pulls_like_the_jobs(tmp_path):
    from launcher.backends.kubernetes.upload import stage_pod

    p = _plan(tmp_path, "kubernetes: {image: 'ghcr.io/you/qlaunch-train:latest'}\n")
    pod = stage_pod(p, p.runs[0], "qlaunch-stage-0")
    assert pod["spec"]["containers"][0]["imagePullPolicy"] == "Always"


# ---- e. a grid's local data files are in etcd once ------------------------------------------------
def test_a_grid_shares_one_copy_of_its_data_file_and_cancel_removes_it_last(tmp_path, monkeypatch):
    from fake_kube import start_cluster

    from launcher.backends.kubernetes.backend import KubernetesBackend

    data = "".join(f'{{"text": "### Human: q{i}? ### Assistant: a{i}"}}\n' for i in range(2000))  # ~80 kB
    (tmp_path / "train.jsonl").write_text(data)
    p = _plan(
        tmp_path,
        """\
        kubernetes: {namespace: ml-team}
        dataset: {path: train.jsonl}
        grid: {lora.r: [4, 8, 16, 32]}
    """,
    )
    # Rendered: every run's file shows the one data ConfigMap its pods mount; the run's own
    # ConfigMap holds run.yaml alone.
    config_maps = [d for run in p.runs for d in run_documents(p, run) if d["kind"] == "ConfigMap"]
    copies = {d["metadata"]["name"]: d for d in config_maps if "run.yaml" not in d.get("data", {})}
    assert len(copies) == 1 and len([d for d in config_maps if "run.yaml" in d.get("data", {})]) == 4
    (shared,) = copies.values()
    assert list(shared["data"].values()) == [data] and shared["immutable"] is True
    for run in p.runs:
        for pod in _pods_of(p, run):
            (volume,) = [v for v in pod["volumes"] if v["name"] == "config"]
            assert {
                "configMap": {
                    "name": shared["metadata"]["name"],
                    "items": [{"key": key, "path": key} for key in shared["data"]],
                }
            } in volume["projected"]["sources"]

    server = start_cluster(tmp_path, monkeypatch, "ml-team")
    try:
        backend = KubernetesBackend(poll_seconds=0.02)
        backend.submit(p)
        stored = server.list("configmaps", "ml-team")
        assert sum(len(json.dumps(c)) for c in stored) < 2 * len(data)  # one copy, not four
        data_maps = [c["metadata"]["name"] for c in stored if c["metadata"]["name"].startswith("admin-data-")]
        assert data_maps == [shared["metadata"]["name"]]
        applies = [r for r in server.requests if r["method"] == "PATCH" and shared["metadata"]["name"] in r["path"]]
        assert len([r for r in applies if "dryRun" not in r["query"]]) == 1  # applied once for the grid
        # Cancelling some runs keeps the copy the others mount; cancelling the last removes it.
        backend.cancel(p, p.runs[:3])
        assert server.get("configmaps", "ml-team", shared["metadata"]["name"]) is not None
        backend.cancel(p, p.runs[3:])
        assert server.get("configmaps", "ml-team", shared["metadata"]["name"]) is None
    finally:
        server.stop()


def _pods_of(p, run) -> list[dict]:
    return [d["spec"]["template"]["spec"] for d in run_documents(p, run) if d["kind"] == "Job"]


def test_the_default_tag_is_the_packaged_version():
    import tomllib

    from launcher import __version__
    from launcher.job.config import KubernetesConfig

    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    assert project["version"] == __version__
    assert KubernetesConfig().image.endswith(f":{project['version']}")
