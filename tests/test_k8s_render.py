"""Kubernetes manifests: snapshots, the official JSON schemas of two Kubernetes versions, YAML
safety of odd values, no secret in any rendered file, valid names, clear errors.

Update the snapshots after an intended change with QLAUNCH_UPDATE_SNAPSHOTS=1.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from launcher.backends.kubernetes.backend import KubernetesBackend
from launcher.backends.kubernetes.manifests import pod_run_config
from launcher.grid import plan
from launcher.job.errors import ConfigError
from launcher.job.experiment_file import load_yaml

ROOT = Path(__file__).resolve().parents[1]
SNAPSHOTS = Path(__file__).parent / "snapshots" / "k8s"
# The oldest and the newest minor version kubernetes-validate ships schemas for that have
# everything the Job uses (podFailurePolicy GA in 1.31 but present since 1.26,
# podReplacementPolicy since 1.28).
SCHEMA_VERSIONS = ("1.30", "1.37")
FAKE_TOKEN = "hf_qlaunchFAKEtoken0123456789abcdefXYZ"

EXPERIMENTS = {
    "single-node": """\
        name: llama2-guanaco
        backend: kubernetes
        storage:
          root: /mnt/qlaunch
        kubernetes:
          namespace: ml-team
          hf_token_secret: {name: hf-token}
        inference:
          prompts: ["What is QLoRA?"]
        grid:
          lora.r: [16, 64]
    """,
    "multi-node": """\
        name: llama2-multinode
        backend: kubernetes
        storage:
          root: /shared/runs
        resources:
          nodes: 3
          gpus_per_node: 2
          cpus_per_task: 16
          memory: 64000M
          time_limit: 2-00:00:00
        inference:
          enabled: false
        kubernetes:
          namespace: research
          image: registry.example.com:5000/team/qlaunch-train:v1.2
          image_pull_policy: Always
          gpu_node_label: cloud.google.com/gke-accelerator
          node_selector: {pool: spot-t4}
          tolerations:
            - {key: nvidia.com/gpu, operator: Exists}
            - {key: cloud.google.com/gke-spot, operator: Equal, value: "true", effect: NoSchedule}
          service_account: trainer
          ttl_seconds_after_finished: null
          shm_size: 16Gi
    """,
    "odd-values": """\
        name: 7b-odd-values-experiment-with-a-long-nam
        description: "line one: with a colon\\nline two with 'single' and \\"double\\" quotes # not a comment"
        backend: kubernetes
        storage:
          root: "/mnt/qlaunch runs/with: colon"
        prompt:
          system_prompt: "You are: helpful.\\n- not a list\\n{{ not jinja }} & $(not expanded)"
        environment:
          variables:
            NOTE: "a: \\"b\\"\\nc # d"
            LEADING_SPACE: "  x"
            EMPTY: ""
        kubernetes:
          hf_token_secret: {name: hf.token-secret, key: hf_token}
    """,
}


def _plan(tmp_path: Path, name: str):
    path = tmp_path / f"{name}.yaml"
    path.write_text(textwrap.dedent(EXPERIMENTS[name]))
    return plan(path)


def _documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


@pytest.mark.parametrize("name", sorted(EXPERIMENTS))
def test_rendered_manifests_match_snapshots(tmp_path, name):
    written = KubernetesBackend().render(_plan(tmp_path, name), tmp_path / "out")
    folder = SNAPSHOTS / name
    if os.environ.get("QLAUNCH_UPDATE_SNAPSHOTS"):
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.glob("*.yaml"):
            old.unlink()
        for path in written:
            (folder / path.name).write_text(path.read_text())
    expected = sorted(p.name for p in folder.glob("*.yaml"))
    assert sorted(p.name for p in written) == expected, "run ids changed: update the snapshots"
    for path in written:
        assert path.read_text() == (folder / path.name).read_text(), f"{name}/{path.name} differs from its snapshot"


def test_rendering_twice_gives_the_same_bytes(tmp_path):
    p = _plan(tmp_path, "odd-values")
    first = [f.read_bytes() for f in KubernetesBackend().render(p, tmp_path / "a")]
    second = [f.read_bytes() for f in KubernetesBackend().render(p, tmp_path / "b")]
    assert first == second


@pytest.mark.parametrize("name", sorted(EXPERIMENTS))
@pytest.mark.parametrize("version", SCHEMA_VERSIONS)
def test_every_manifest_is_valid_for_two_kubernetes_versions(tmp_path, name, version):
    written = KubernetesBackend().render(_plan(tmp_path, name), tmp_path / "out")
    kinds = []
    for path in written:
        for doc in _documents(path):
            kubernetes_validate.validate(doc, version, strict=True)
            kinds.append(doc["kind"])
    assert "Job" in kinds and "ConfigMap" in kinds
    # With an inference Job, the hand-off's objects are checked with the rest.
    handoff = {"ServiceAccount", "Role", "RoleBinding"}
    assert handoff <= set(kinds) if kinds.count("Job") == 2 * len(written) else not handoff & set(kinds)


def test_schema_validation_catches_a_misspelled_field(tmp_path):
    """The check above can fail: strict schemas reject a field Kubernetes does not know."""
    written = KubernetesBackend().render(_plan(tmp_path, "single-node"), tmp_path / "out")
    job = next(d for d in _documents(written[0]) if d["kind"] == "Job")
    job["spec"]["template"]["spec"]["restartPolicyy"] = "Never"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(job, SCHEMA_VERSIONS[0], strict=True)


def test_quotes_newlines_and_colons_reach_the_pod_unchanged(tmp_path):
    p = _plan(tmp_path, "odd-values")
    (path,) = [f for f in KubernetesBackend().render(p, tmp_path / "out") if f.name != "evaluate.yaml"]
    docs = {(d["kind"], d["metadata"]["name"]): d for d in _documents(path)}
    config = next(d for (kind, _), d in docs.items() if kind == "ConfigMap")
    assert config["data"]["run.yaml"] == pod_run_config(p, p.runs[0])
    pod_config = load_yaml(config["data"]["run.yaml"])
    assert pod_config["prompt"]["system_prompt"] == "You are: helpful.\n- not a list\n{{ not jinja }} & $(not expanded)"
    assert pod_config["description"].startswith("line one: with a colon\nline two with 'single' and \"double\"")
    train = next(d for (kind, name), d in docs.items() if kind == "Job" and not name.endswith("-infer"))
    container = train["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["NOTE"] == 'a: "b"\nc # d' and env["LEADING_SPACE"] == "  x" and env["EMPTY"] == ""
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts["storage"] == "/mnt/qlaunch runs/with: colon"
    # Relative paths in run.yaml resolve on the claim inside the pod, not on this laptop.
    assert pod_config["experiment_dir"] == "/mnt/qlaunch runs/with: colon"


def test_no_token_in_any_rendered_file(tmp_path, monkeypatch):
    token_file = tmp_path / "hf_token"
    token_file.write_text(FAKE_TOKEN + "\n")
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    monkeypatch.setenv("HUGGING_FACE_HUB_TOKEN", FAKE_TOKEN)
    text = textwrap.dedent(EXPERIMENTS["single-node"]).replace(
        "kubernetes:\n", f"model:\n  hf_token_file: {token_file}\nkubernetes:\n", 1
    )
    path = tmp_path / "exp.yaml"
    path.write_text(text)
    written = KubernetesBackend().render(plan(path), tmp_path / "out")
    assert written
    for rendered in (tmp_path / "out").rglob("*"):
        if rendered.is_file():
            assert FAKE_TOKEN not in rendered.read_text(), f"token leaked into {rendered}"
    job = next(d for d in _documents(written[0]) if d["kind"] == "Job")
    env = job["spec"]["template"]["spec"]["containers"][0]["env"]
    assert {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf-token", "key": "token"}}} in env


def test_object_names_are_valid_unique_dns_labels(tmp_path):
    path = tmp_path / "grid.yaml"
    # a 40-character name that starts with a digit
    path.write_text(
        textwrap.dedent(EXPERIMENTS["odd-values"]) + "resources: {nodes: 2}\ngrid:\n  lora.r: [8, 16, 32]\n"
    )
    p = plan(path)
    names = []
    for rendered in KubernetesBackend().render(p, tmp_path / "out"):
        for doc in _documents(rendered):
            name = doc["metadata"]["name"]
            names.append((doc["kind"], name))
            assert len(name) <= 63 and re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name), name
            if doc["kind"] == "Service":  # DNS-1035: starts with a letter
                assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name)
            if doc["kind"] == "Job" and doc["spec"].get("completionMode") == "Indexed":
                assert len(f"{name}-{doc['spec']['completions'] - 1}") <= 63  # pod hostnames
    # ConfigMap, Service and training Job per run; the grid evaluation's ConfigMap and Job
    assert len(names) == len(set(names)) == 3 * 3 + 2
    for run in p.runs:
        assert sum(run.run_id in name for _, name in names) == 3
    assert ("Job", "q7b-odd-values-experiment-with-a-long-na-evaluate") in names


def test_multi_node_is_an_indexed_job_behind_a_headless_service(tmp_path):
    p = _plan(tmp_path, "multi-node")
    (path,) = KubernetesBackend().render(p, tmp_path / "out")
    docs = _documents(path)
    assert [d["kind"] for d in docs] == ["ConfigMap", "Service", "Job"]  # inference disabled
    service, job = docs[1], docs[2]
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"]
    spec = job["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == ("Indexed", 3, 3)
    pod = spec["template"]["spec"]
    assert pod["subdomain"] == service["metadata"]["name"]
    assert all(spec["template"]["metadata"]["labels"][k] == v for k, v in service["spec"]["selector"].items())
    command = pod["containers"][0]["command"]
    flag = {command[i]: command[i + 1] for i in range(len(command) - 1) if command[i].startswith("--")}
    # Machines, processes and the rank (JOB_COMPLETION_INDEX) are training.launch's business
    # (tests/test_launch_command.py); the pod only says where rank 0 is.
    assert command[1:3] == ["-m", "training.launch"]
    assert flag == {"--main-process-ip": f"{job['metadata']['name']}-0.{service['metadata']['name']}"}
    assert pod["containers"][0]["resources"]["limits"] == {"memory": "64000Mi", "nvidia.com/gpu": 2}
    assert spec["activeDeadlineSeconds"] == 2 * 86400 and "ttlSecondsAfterFinished" not in spec


def test_jobs_survive_preemption_and_run_as_non_root(tmp_path):
    written = KubernetesBackend().render(_plan(tmp_path, "odd-values"), tmp_path / "out")
    jobs = [
        d
        for path in sorted(written, key=lambda f: f.name == "evaluate.yaml")
        for d in _documents(path)
        if d["kind"] == "Job"
    ]
    assert len(jobs) == 2
    for job in jobs:
        rules = job["spec"]["podFailurePolicy"]["rules"]
        assert {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]} in rules
        assert any(r["action"] == "Ignore" and r.get("onExitCodes", {}).get("values") == [75] for r in rules)
        pod = job["spec"]["template"]["spec"]
        assert pod["restartPolicy"] == "Never" and pod["securityContext"]["runAsNonRoot"] is True
        assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "Tesla-T4"}  # GPU feature discovery label
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
        for container in pod["containers"] + pod.get("initContainers", []):
            assert container["securityContext"]["allowPrivilegeEscalation"] is False
            assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "8Gi"}
        assert volumes["storage"]["persistentVolumeClaim"] == {"claimName": "qlaunch-storage"}
    train, evaluate = jobs
    # The grid evaluation holds no node while training runs: suspended, no init container waiting.
    assert evaluate["spec"]["suspend"] is True and "initContainers" not in evaluate["spec"]["template"]["spec"]
    assert evaluate["metadata"]["annotations"]["qlaunch.dev/starts-after"] == "training"
    # Its own deadline (inference.resources.time_limit, one hour by default), not training's.
    assert (evaluate["spec"]["activeDeadlineSeconds"], train["spec"]["activeDeadlineSeconds"]) == (3600, 86400)
    assert evaluate["spec"]["template"]["spec"]["containers"][0]["command"] == [
        "python",
        "-m",
        "training.evaluate_grid",
        "/config/runs.txt",
    ]


def test_relative_storage_root_is_refused_with_file_and_line(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("name: rel\nbackend: kubernetes\nstorage:\n  root: ./runs\n")
    with pytest.raises(ConfigError) as error:
        KubernetesBackend().render(plan(path), tmp_path / "out")
    assert f"{path.resolve()}:4: storage.root: must be an absolute path" in str(error.value)
    assert not (tmp_path / "out").exists()


def test_invalid_cluster_values_are_named_before_anything_is_written(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text(
        textwrap.dedent("""\
        name: bad
        storage: {root: /mnt/q}
        kubernetes:
          namespace: ML_Team
          shm_size: 8GB
          pvc: Shared_Claim
          node_selector: {"gpu type": "t4"}
    """)
    )
    with pytest.raises(ConfigError) as error:
        KubernetesBackend().submit(plan(path), dry_run=True)  # refused before any API call
    message = str(error.value)
    for key, line in (
        ("kubernetes.namespace", 4),
        ("kubernetes.shm_size", 5),
        ("kubernetes.pvc", 6),
        ("kubernetes.node_selector", 7),
    ):
        assert f"{path.resolve()}:{line}: {key}:" in message


def test_cli_renders_kubernetes_manifests(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text(textwrap.dedent(EXPERIMENTS["single-node"]))
    result = subprocess.run(
        [sys.executable, "-m", "launcher.cli", "render", str(path), "-o", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "QLAUNCH_HOME": str(tmp_path / "home")},
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "out").glob("*.yaml")) == sorted(
        p.name for p in (SNAPSHOTS / "single-node").glob("*.yaml")
    )


def _render(tmp_path: Path, text: str) -> dict[str, dict]:
    """The rendered objects of a one-run experiment, by kind and role (train, infer)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "exp.yaml"
    path.write_text(textwrap.dedent(text))
    out = tmp_path / "out"
    KubernetesBackend().render(plan(path), out)
    docs = [doc for file in sorted(out.rglob("*.yaml")) for doc in _documents(file)]
    return {doc["metadata"]["labels"].get("qlaunch.dev/role", doc["kind"]): doc for doc in docs}


def test_queue_name_suspends_the_training_job_under_kueue_and_priority_reaches_both_pods(tmp_path):
    jobs = _render(
        tmp_path,
        """\
        name: queued
        backend: kubernetes
        storage: {root: /mnt/q}
        inference: {per_run: true}
        kubernetes: {queue_name: t4-queue, priority_class: qlaunch-low}
    """,
    )
    train, infer = jobs["train"], jobs["infer"]
    # Kueue admits training against the queue's quota, then un-suspends it.
    assert train["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "t4-queue"
    # Inference is invisible to Kueue (no label: no quota held) until training's hand-off
    # patch gives it the label.
    assert "kueue.x-k8s.io/queue-name" not in infer["metadata"]["labels"]
    env = {e["name"]: e.get("value") for e in train["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert json.loads(env["QLAUNCH_RELEASE_PATCH"]) == {
        "metadata": {"labels": {"kueue.x-k8s.io/queue-name": "t4-queue"}}
    }
    for job in (train, infer):
        assert job["spec"]["suspend"] is True
        assert job["spec"]["template"]["spec"]["priorityClassName"] == "qlaunch-low"


def test_under_kueue_the_grid_evaluation_is_held_by_an_admission_gate_and_no_trainer_gets_a_token(tmp_path):
    jobs = _render(
        tmp_path,
        """\
        name: queued
        backend: kubernetes
        storage: {root: /mnt/q}
        kubernetes: {queue_name: t4-queue, priority_class: qlaunch-low}
        grid: {lora.r: [8]}
    """,
    )
    train, evaluate = jobs["train"], jobs["evaluate"]
    # Kueue 0.19 admits no Job its admission-gated-by annotation names a gate for; qlaunch
    # removes its value once every training Job has ended, and Kueue resumes the Job.
    assert evaluate["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "t4-queue"
    assert evaluate["metadata"]["annotations"]["kueue.x-k8s.io/admission-gated-by"] == "qlaunch.dev/training"
    assert evaluate["spec"]["suspend"] is True
    assert evaluate["spec"]["template"]["spec"]["priorityClassName"] == "qlaunch-low"
    # No trainer releases it, so none gets an API token or a hand-off Role.
    pod = train["spec"]["template"]["spec"]
    assert "serviceAccountName" not in pod and all(v["name"] != "handoff" for v in pod["volumes"])
    assert not any(e["name"].startswith("QLAUNCH_RELEASE") for e in pod["containers"][0]["env"])
    assert "Role" not in jobs and "ServiceAccount" not in jobs


def test_without_a_queue_the_training_job_starts_at_once(tmp_path):
    train = _render(tmp_path, "name: plain\nbackend: kubernetes\nstorage: {root: /mnt/q}\n")["train"]
    assert "suspend" not in train["spec"]
    assert "kueue.x-k8s.io/queue-name" not in train["metadata"]["labels"]
    assert "priorityClassName" not in train["spec"]["template"]["spec"]


def _refused(tmp_path, text: str) -> tuple[Path, str]:
    """(experiment file, the ConfigError's message) of a dry-run submit of `text`."""
    path = tmp_path / "exp.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as error:
        KubernetesBackend().submit(plan(path), dry_run=True)
    return path.resolve(), str(error.value)


def test_bad_queue_and_priority_class_names_are_named_with_file_and_line(tmp_path):
    path, message = _refused(
        tmp_path,
        "name: bad\nstorage: {root: /mnt/q}\nkubernetes:\n  queue_name: 'my queue'\n  priority_class: Low_Priority\n",
    )
    assert f"{path}:4: kubernetes.queue_name:" in message
    assert f"{path}:5: kubernetes.priority_class:" in message


@pytest.mark.parametrize(
    "label, selector",
    [
        ("nvidia.com/gpu.product", {"nvidia.com/gpu.product": "Tesla-T4"}),
        ("cloud.google.com/gke-accelerator", {"cloud.google.com/gke-accelerator": "nvidia-tesla-t4"}),
        ("example.com/gpu", {"example.com/gpu": "t4"}),  # a custom key takes gpu_type verbatim
    ],
)
def test_gpu_type_becomes_the_value_of_the_chosen_node_label(tmp_path, label, selector):
    jobs = _render(
        tmp_path,
        f"""\
        name: gpus
        backend: kubernetes
        storage: {{root: /mnt/q}}
        resources: {{gpu_type: t4}}
        kubernetes: {{gpu_node_label: {label}, node_selector: {{pool: spot}}}}
    """,
    )
    for role in ("train", "evaluate"):
        assert jobs[role]["spec"]["template"]["spec"]["nodeSelector"] == {**selector, "pool": "spot"}


def test_gpu_node_label_none_and_cpu_pods_get_no_gpu_selector(tmp_path):
    none = _render(
        tmp_path / "none",
        """\
        name: nolabel
        backend: kubernetes
        storage: {root: /mnt/q}
        kubernetes: {gpu_node_label: none}
    """,
    )
    assert "nodeSelector" not in none["train"]["spec"]["template"]["spec"]
    cpu = _render(
        tmp_path / "cpu",
        """\
        name: cpu
        backend: kubernetes
        storage: {root: /mnt/q}
        resources: {gpus_per_node: 0}
        kubernetes: {node_selector: {cloud.google.com/gke-accelerator: mine}}
    """,
    )
    # No GPU label is added, and the user's own entry is kept as written.
    assert cpu["train"]["spec"]["template"]["spec"]["nodeSelector"] == {"cloud.google.com/gke-accelerator": "mine"}


def test_unknown_gpu_type_under_a_known_label_is_one_clear_error(tmp_path):
    path, message = _refused(
        tmp_path,
        "name: bad\nstorage: {root: /mnt/q}\nresources:\n  gpu_type: mi300\n"
        "kubernetes:\n  gpu_node_label: cloud.google.com/gke-accelerator\n",
    )
    assert message.count("mi300") == 1
    assert f"{path}:4: resources.gpu_type:" in message
    assert f"{path}:6: kubernetes.gpu_node_label" in message
    assert "t4" in message and "node_selector" in message


def test_a_grid_too_large_for_the_evaluation_config_map_is_refused_with_file_and_line(tmp_path, monkeypatch):
    from launcher.backends.kubernetes import manifests

    monkeypatch.setattr(manifests, "EVALUATION_CONFIG_LIMIT", 8 * 1024)  # two run.yaml files fit, not three
    path = tmp_path / "exp.yaml"
    path.write_text("name: big\nbackend: kubernetes\nstorage: {root: /mnt/q}\ngrid:\n  lora.r: [4, 8, 16]\n")
    with pytest.raises(ConfigError) as error:
        KubernetesBackend().render(plan(path), tmp_path / "out")
    assert f"{path.resolve()}:4: grid: the grid evaluation Job's ConfigMap would hold" in str(error.value)
    assert "inference.per_run: true" in str(error.value)
    path.write_text(path.read_text() + "inference: {per_run: true}\n")
    assert len(KubernetesBackend().render(plan(path), tmp_path / "out")) == 3
