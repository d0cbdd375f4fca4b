"""No GPU waits for training on Kubernetes: the inference Job is created suspended and the
training pod starts it, once its final adapter is written, through a rendered ServiceAccount and
a Role that may patch that one Job and nothing else; `qlaunch status` and `qlaunch submit` start
it themselves when training completed without doing so.

Against the wire-level fake API server over HTTPS (as a pod reaches the API), with RBAC for the
ServiceAccount's token. The test plays the kubelet: it projects the hand-off volume (token, CA,
namespace) into a folder and runs the training container's own command and environment.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from fake_kube import FakeKube, start_cluster
from kubernetes import client as kube_client

from launcher.backends.base import State
from launcher.backends.kubernetes.backend import KubernetesBackend
from launcher.backends.kubernetes.manifests import run_documents
from launcher.backends.kubernetes.naming import Names
from launcher.grid import plan
from launcher.job.storage import RunPaths, write_json
from launcher.status_view import build_table, collect

ROOT = Path(__file__).resolve().parents[1]
NS = "ml-team"


@pytest.fixture
def fake(tmp_path, monkeypatch):
    server = start_cluster(tmp_path, monkeypatch, NS, tls=True)
    yield server
    server.stop()


def _experiment(tmp_path: Path, extra: str = "") -> object:
    path = tmp_path / "handoff.yaml"
    path.write_text(
        textwrap.dedent(f"""\
        name: handoff
        backend: kubernetes
        storage: {{root: {tmp_path / "claim"}}}
        kubernetes: {{namespace: {NS}{extra}}}
        inference: {{per_run: true}}  # one inference Job per run, released by its trainer
        grid:
          lora.r: [8, 16]
    """)
    )
    return plan(path)


def _backend() -> KubernetesBackend:
    return KubernetesBackend(poll_seconds=0.05)


def _container(job: dict) -> dict:
    return job["spec"]["template"]["spec"]["containers"][0]


def _project_handoff_volume(fake: FakeKube, job: dict, folder: Path) -> Path:
    """What the kubelet mounts at the hand-off volume for a pod of `job`: a token of the pod's
    ServiceAccount, the cluster CA and the namespace."""
    pod = job["spec"]["template"]["spec"]
    volume = next(v for v in pod["volumes"] if v["name"] == "handoff")
    sources = volume["projected"]["sources"]
    assert {"serviceAccountToken", "configMap", "downwardAPI"} == {key for s in sources for key in s}
    assert pod["automountServiceAccountToken"] is False  # only this one container gets a token
    folder.mkdir(parents=True)
    (folder / "token").write_text(fake.service_account_token(NS, pod["serviceAccountName"]))
    (folder / "ca.crt").write_bytes(fake.ca_path.read_bytes())
    (folder / "namespace").write_text(NS)
    return folder


def _account_client(fake: FakeKube, job: dict, tmp_path: Path) -> kube_client.BatchV1Api:
    """The official client, authenticated as the training pod's ServiceAccount."""
    token = fake.service_account_token(NS, job["spec"]["template"]["spec"]["serviceAccountName"])
    config = kube_client.Configuration()
    config.host, config.ssl_ca_cert, config.retries = fake.url, str(fake.ca_path), 0
    config.api_key = {"authorization": f"Bearer {token}"}
    return kube_client.BatchV1Api(kube_client.ApiClient(config))


def test_the_trainer_starts_its_inference_job_through_the_rendered_role(fake, tmp_path):
    p, k8s = _experiment(tmp_path), _backend()
    k8s.submit(p)
    run = p.runs[0]
    n = Names.of(p.experiment.name, run.run_id)
    train, infer = fake.get("jobs", NS, n.train_job), fake.get("jobs", NS, n.infer_job)
    # Submitted: the inference Job exists but holds no pod and no GPU.
    assert infer["spec"]["suspend"] is True and fake.pods_of(NS, n.infer_job) == []
    status = k8s.status(p)[run.run_id]
    assert (status.infer_state, status.infer_detail) == (State.PENDING, "waiting for training")
    assert "waiting for training" in _table(p, k8s)

    # Training has written its final adapter and metrics (a resubmitted, already finished run:
    # training.sft exits 0 at once). The kubelet runs the training container as rendered.
    paths = RunPaths.of(run)
    (paths.adapter).mkdir(parents=True)
    (paths.adapter / "adapter_config.json").write_text("{}")
    write_json(paths.metrics, {"run_id": run.run_id})
    run_yaml = tmp_path / "config" / "run.yaml"  # the ConfigMap, mounted at /config
    run_yaml.parent.mkdir()
    run_yaml.write_text(fake.get("configmaps", NS, n.config)["data"]["run.yaml"])
    container = _container(train)
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    assert env["QLAUNCH_RELEASE_JOB"] == n.infer_job
    credentials = _project_handoff_volume(fake, train, tmp_path / "handoff")
    env.update(
        QLAUNCH_RELEASE_CREDENTIALS=str(credentials),
        KUBERNETES_SERVICE_HOST="127.0.0.1",
        KUBERNETES_SERVICE_PORT=str(fake.port),
        PATH=os.environ["PATH"],
        PYTHONPATH=str(ROOT),
        HOME=str(tmp_path),
        OMP_NUM_THREADS="1",
    )
    command = [
        sys.executable if arg == "python" else str(run_yaml) if arg == "/config/run.yaml" else arg
        for arg in container["command"]
    ]
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"started inference Job {n.infer_job}" in done.stderr

    assert fake.get("jobs", NS, n.infer_job)["spec"]["suspend"] is False
    handoff = [r for r in fake.requests if r["headers"].get("Content-Type") == "application/merge-patch+json"]
    assert len(handoff) == 1 and handoff[0]["path"].endswith(f"/jobs/{n.infer_job}")
    assert handoff[0]["headers"]["Authorization"] == f"Bearer {(credentials / 'token').read_text()}"
    # The other run's inference still waits: its training has not finished.
    other = Names.of(p.experiment.name, p.runs[1].run_id)
    assert fake.get("jobs", NS, other.infer_job)["spec"]["suspend"] is True


def test_the_handoff_role_allows_patching_that_one_job_and_nothing_else(fake, tmp_path):
    p = _experiment(tmp_path)
    _backend().submit(p)
    n, other = (Names.of(p.experiment.name, run.run_id) for run in p.runs)
    role = fake.get("roles", NS, n.handoff)
    assert role["rules"] == [
        {"apiGroups": ["batch"], "resources": ["jobs"], "resourceNames": [n.infer_job], "verbs": ["patch"]}
    ]
    batch = _account_client(fake, fake.get("jobs", NS, n.train_job), tmp_path)
    merge = {"_content_type": "application/merge-patch+json"}
    refused = [
        lambda: batch.patch_namespaced_job(n.train_job, NS, {"spec": {"suspend": True}}, **merge),
        lambda: batch.patch_namespaced_job(other.infer_job, NS, {"spec": {"suspend": False}}, **merge),
        lambda: batch.read_namespaced_job(n.infer_job, NS),
        lambda: batch.list_namespaced_job(NS),
        lambda: batch.delete_namespaced_job(n.infer_job, NS),
        lambda: kube_client.CoreV1Api(batch.api_client).read_namespaced_config_map(n.config, NS),
    ]
    for call in refused:
        with pytest.raises(kube_client.ApiException) as error:
            call()
        assert error.value.status == 403
        assert f"system:serviceaccount:{NS}:{n.handoff}" in json.loads(error.value.body)["message"]
    batch.patch_namespaced_job(n.infer_job, NS, {"spec": {"suspend": False}}, _preload_content=False, **merge)
    assert fake.get("jobs", NS, n.infer_job)["spec"]["suspend"] is False
    assert fake.get("jobs", NS, other.infer_job)["spec"]["suspend"] is True


def test_under_kueue_the_handoff_gives_inference_its_queue_label(fake, tmp_path):
    from training.handoff import release

    p = _experiment(tmp_path, ", queue_name: t4-queue")
    _backend().submit(p)
    n = Names.of(p.experiment.name, p.runs[0].run_id)
    train, infer = fake.get("jobs", NS, n.train_job), fake.get("jobs", NS, n.infer_job)
    assert train["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "t4-queue"
    assert "kueue.x-k8s.io/queue-name" not in infer["metadata"]["labels"]  # Kueue ignores it for now
    env = {e["name"]: e["value"] for e in _container(train)["env"] if "value" in e}
    env.update(
        QLAUNCH_RELEASE_CREDENTIALS=str(_project_handoff_volume(fake, train, tmp_path / "handoff")),
        KUBERNETES_SERVICE_HOST="127.0.0.1",
        KUBERNETES_SERVICE_PORT=str(fake.port),
    )
    release(env, attempts=1)
    infer = fake.get("jobs", NS, n.infer_job)
    # Kueue, not qlaunch, resumes it once the queue admits it against quota.
    assert infer["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "t4-queue"
    assert infer["spec"]["suspend"] is True


def test_status_only_reads_and_reconcile_starts_inference_of_runs_finished_without_the_handoff(fake, tmp_path):
    p, k8s = _experiment(tmp_path), _backend()
    k8s.submit(p)
    names = [Names.of(p.experiment.name, run.run_id) for run in p.runs]
    for n in names:  # both trainers finished, neither could reach the API
        fake.finish_pod(NS, fake.start_pod(NS, n.train_job))

    # Reading (what `report`, `logs` and `export` do through status) sends no write at all.
    before = len(fake.requests)
    k8s.status(p)
    collect(p, k8s)
    assert [r["method"] for r in fake.requests[before:] if r["method"] != "GET"] == []
    assert all(fake.get("jobs", NS, n.infer_job)["spec"]["suspend"] is True for n in names)

    # `qlaunch status` (and status --watch on every refresh, and submit) reconcile first: exactly
    # the release the old status did, once.
    rows = collect(p, k8s, reconcile=True)
    for row, n in zip(rows, names):
        assert row.status.state == State.COMPLETED
        assert row.status.infer_detail != "waiting for training"
        assert fake.get("jobs", NS, n.infer_job)["spec"]["suspend"] is False
    merges = [r for r in fake.requests if "merge-patch" in r["headers"].get("Content-Type", "")]
    assert len(merges) == 2 and {r["method"] for r in fake.requests[before:] if r["method"] != "GET"} == {"PATCH"}
    assert k8s.reconcile(p) == []
    assert len([r for r in fake.requests if "merge-patch" in r["headers"].get("Content-Type", "")]) == 2  # once


def test_submit_starts_inference_of_a_completed_run(fake, tmp_path):
    p, k8s = _experiment(tmp_path), _backend()
    k8s.submit(p)
    run = p.runs[0]
    n = Names.of(p.experiment.name, run.run_id)
    fake.finish_pod(NS, fake.start_pod(NS, n.train_job))
    report = k8s.submit(p)
    assert f"inference Job {n.infer_job} started" in report.skipped[run.run_id]
    assert fake.get("jobs", NS, n.infer_job)["spec"]["suspend"] is False
    assert fake.get("jobs", NS, Names.of(p.experiment.name, p.runs[1].run_id).infer_job)["spec"]["suspend"] is True


def test_cancel_removes_the_handoff_objects(fake, tmp_path):
    p, k8s = _experiment(tmp_path), _backend()
    k8s.submit(p)
    assert (
        len(fake.list("serviceaccounts", NS)) == len(fake.list("roles", NS)) == len(fake.list("rolebindings", NS)) == 2
    )
    k8s.cancel(p, list(p.runs))
    assert fake.list("serviceaccounts", NS) == fake.list("roles", NS) == fake.list("rolebindings", NS) == []


def _table(p, k8s) -> str:
    from rich.console import Console

    console = Console(width=200, record=True, file=open(os.devnull, "w"))
    console.print(build_table(p, collect(p, k8s), "kubernetes", width=200))
    return console.export_text()


def test_a_submitter_who_may_not_create_roles_is_told_why_before_anything_is_created(fake, tmp_path):
    from fake_kube import ApiError

    from launcher.job.errors import BackendError

    def edit_role_only(resource, obj, dry_run):  # what the namespace's "edit" ClusterRole gives
        if resource in ("roles", "rolebindings"):
            raise ApiError(
                403,
                "Forbidden",
                f"{resource}.rbac.authorization.k8s.io is forbidden: User "
                f'"qlaunch-tester" cannot patch resource "{resource}"',
            )

    fake.admission = edit_role_only
    with pytest.raises(BackendError) as error:
        _backend().submit(_experiment(tmp_path))
    assert "forbidden" in str(error.value) and "admin role" in str(error.value)
    assert "inference.enabled: false" in str(error.value)
    assert fake.list("jobs", NS) == [] and fake.list("configmaps", NS) == [] and fake.list("serviceaccounts", NS) == []


def test_inference_admitted_before_training_finished_waits_for_the_adapter(tmp_path):
    """A Kueue that labels every Job (a LocalQueue named "default") admits the suspended
    inference Job early: the inference entrypoint then waits for training instead of failing."""
    import threading

    from training.infer import wait_for_training

    p = _experiment(tmp_path)
    doc = next(
        d for d in run_documents(p, p.runs[0]) if d["kind"] == "Job" and d["metadata"]["name"].endswith("-infer")
    )
    env = {e["name"]: e["value"] for e in _container(doc)["env"] if "value" in e}
    paths = RunPaths.of(p.runs[0])

    def training_finishes():
        paths.adapter.mkdir(parents=True)
        (paths.adapter / "adapter_config.json").write_text("{}")
        write_json(paths.metrics, {"run_id": p.runs[0].run_id})

    timer = threading.Timer(0.3, training_finishes)
    timer.start()
    wait_for_training(paths, env, poll=0.05)
    timer.join()
    assert paths.training_completed()
    wait_for_training(paths, {}, poll=0.05)  # elsewhere (Slurm, local) it never waits
