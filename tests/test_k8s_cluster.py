"""The Kubernetes backend against a stateful fake API server (tests/fake_kube), through the real
`kubernetes` client and a kubeconfig file: submit → status → logs -f across a preempted pod →
cancel, resubmission semantics, and the errors a user meets (no kubeconfig, unreachable API,
401/403, missing namespace, PVC or Secret, an admission webhook saying no).

By default the test plays the Job controller and the kubelet through FakeKube's controller
methods. With QLAUNCH_TEST_KUBECONFIG and QLAUNCH_TEST_NAMESPACE set (tests/k8s_target.py), the
scenarios written against a `target` run on that real cluster instead (kind, minikube, a GPU
cluster; manifests/README.md says how to prepare one); the tests that need the fake server's
request log or controller methods are skipped there, each with its reason.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from fake_kube import ApiError, FakeKube, start_cluster
from k8s_target import NEEDS_FAKE, NEEDS_GPU, NEEDS_IMAGE, FakeTarget, RealTarget, progress, settings_from_env

from launcher.backends.base import State
from launcher.backends.kubernetes.backend import KubernetesBackend
from launcher.backends.kubernetes.naming import Names
from launcher.grid import plan
from launcher.job.errors import BackendError
from launcher.job.experiment_file import load_yaml
from launcher.job.progress import parse_lines
from launcher.status_view import collect

ROOT = Path(__file__).resolve().parents[1]
NS = "ml-team"
FAKE_TOKEN = "hf_qlaunchFAKEtoken0123456789abcdefXYZ"
EXPERIMENT = """\
    name: guanaco
    backend: kubernetes
    storage:
      root: /mnt/qlaunch
    kubernetes:
      namespace: ml-team
      hf_token_secret: {name: hf-token}
    inference: {per_run: true}  # one inference Job per run (the grid evaluation: test_k8s_evaluation.py)
    grid:
      lora.r: [16, 64]
"""


REAL = settings_from_env()  # None: the fake server (incomplete settings stop the session: conftest.py)


@pytest.fixture
def fake(tmp_path, monkeypatch):
    if REAL is not None:
        pytest.skip(NEEDS_FAKE)
    server = start_cluster(tmp_path, monkeypatch, NS, hf_token=FAKE_TOKEN)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def real_cluster():
    target = RealTarget(REAL)
    target.check_namespace()
    return target


@pytest.fixture
def target(request, tmp_path, monkeypatch):
    """Where the scenario runs: a fresh fake server, or the real cluster (tests/k8s_target.py)."""
    if REAL is None:
        server = start_cluster(tmp_path, monkeypatch, NS, hf_token=FAKE_TOKEN)
        yield FakeTarget(server, NS)
        server.stop()
        return
    monkeypatch.setenv("QLAUNCH_HOME", str(tmp_path / "qlaunch-home"))
    yield request.getfixturevalue("real_cluster")


@pytest.fixture
def scenario(target, tmp_path):
    """The experiment a target runs (the fake: EXPERIMENT; a real cluster: a tiny CPU run of the
    quickstart's model); whatever it left on a real cluster is deleted afterwards."""
    path = tmp_path / "scenario.yaml"
    path.write_text(target.experiment_yaml(textwrap.dedent(EXPERIMENT)))
    p = plan(path)
    yield p
    target.cleanup(p.experiment.name)


@pytest.fixture
def training(target):
    """A scenario whose pods must run: on a real cluster, the test image and the seeded data."""
    if target.real:
        if not REAL.image:
            pytest.skip(NEEDS_IMAGE)
        target.seed_data()


@pytest.fixture
def experiment(tmp_path):
    path = tmp_path / "guanaco.yaml"
    path.write_text(textwrap.dedent(EXPERIMENT))
    return plan(path)


def backend() -> KubernetesBackend:
    return KubernetesBackend(poll_seconds=0.05)


def patches(fake: FakeKube) -> list[dict]:
    return [r for r in fake.requests if r["method"] == "PATCH"]


def job_names(p, run) -> Names:
    return Names.of(p.experiment.name, run.run_id)


def test_submit_status_follow_logs_across_a_preemption_then_cancel(target, scenario, training):
    p, k8s, fake = scenario, target.backend(), not target.real
    experiment = p.experiment.name
    report = k8s.submit(p)
    assert sorted(report.submitted) == sorted(r.run_id for r in p.runs) and not report.skipped
    run, other = p.runs
    n = job_names(p, run)
    assert report.submitted[run.run_id] == [n.train_job, n.infer_job]
    config = target.get("configmaps", n.config)
    assert load_yaml(config["data"]["run.yaml"])["run_id"] == run.run_id
    assert target.get("jobs", n.train_job)["metadata"]["labels"]["qlaunch.dev/run-id"] == run.run_id
    states = {s.state for s in k8s.status(p).values()}
    # A real cluster may have started a pod already.
    assert states == {State.PENDING} if fake else states <= {State.PENDING, State.RUNNING}

    # Submitting again changes nothing while the runs are pending (or running).
    uids = {job["metadata"]["name"]: job["metadata"]["uid"] for job in target.objects("jobs", experiment)}
    applied = len(patches(target.server)) if fake else None
    again = k8s.submit(p)
    assert sorted(again.skipped) == sorted(r.run_id for r in p.runs) and not again.submitted
    assert {job["metadata"]["name"]: job["metadata"]["uid"] for job in target.objects("jobs", experiment)} == uids
    if fake:
        assert len(patches(target.server)) == applied

    # The Job controller starts a pod; the trainer logs progress.
    first = target.pod_running(n.train_job)
    step = target.trainer_starts(first)
    status = k8s.status(p)[run.run_id]
    assert status.state == State.RUNNING and status.job_ids == [n.train_job, n.infer_job]
    rows = {row.run_id: row for row in collect(p, k8s)}  # what `qlaunch status` shows
    shown = rows[run.run_id].progress
    if fake:
        assert (step, shown.step, shown.loss, shown.total_steps) == (10, 10, 1.9, 100)
        assert rows[other.run_id].progress.step == 0
    else:
        assert shown.step >= step and shown.total_steps == p.runs[0].train.max_steps and shown.loss is not None

    # logs -f, while the pod is preempted and the Job replaces it.
    out = io.StringIO()
    follower = threading.Thread(target=k8s.logs, args=(p, run), kwargs={"follow": True, "out": out}, daemon=True)
    follower.start()
    first_step = f'"step": {step}, '
    target.wait(lambda: first_step in out.getvalue(), what="the first pod's log")
    later = target.trainer_steps_on(first, step)
    target.wait(lambda: later in out.getvalue(), what="a line appended while following")

    target.preempt(first)
    if fake:  # a real trainer's save is too quick to catch reliably
        status = k8s.status(p)[run.run_id]
        assert status.state == State.REQUEUED and "saving a checkpoint" in status.detail
    checkpoint = target.trainer_stops(first)
    second = target.replacement_pod(n.train_job, first, scheduled=False)
    if fake:  # the replacement waits for a GPU
        status = k8s.status(p)[run.run_id]
        assert (
            status.state == State.REQUEUED
            and "preempted" in status.detail
            and "Insufficient nvidia.com/gpu" in status.detail
        )
    target.pod_running(n.train_job, second)
    resumed_from, reached = target.trainer_resumes(second, checkpoint)
    resumed = f'"resumed_from": {resumed_from}'
    target.wait(lambda: resumed in out.getvalue(), what="the replacement pod's log")
    status = k8s.status(p)[run.run_id]
    # (A real trainer may have finished its last steps by now.)
    assert status.restarts == 1 and status.state in ((State.RUNNING,) if fake else (State.RUNNING, State.COMPLETED))
    row = {row.run_id: row for row in collect(p, k8s)}[run.run_id]
    assert row.progress.restarts == 1 and row.progress.resumed_from == [resumed_from] and row.progress.step >= reached
    if fake:
        assert (resumed_from, row.progress.step, row.progress.loss) == (12, 20, 1.5)

    target.trainer_finishes(n.train_job, second)
    follower.join(timeout=15 if fake else REAL.timeout)
    assert not follower.is_alive(), "logs -f did not stop when the Job completed"
    text = out.getvalue()
    order = (["loading NousResearch"] if fake else []) + [
        first_step,
        later,
        '"event": "preempted"',
        f"pod {second}",
        resumed,
        '"event": "end"',
    ]
    positions = [text.index(marker) for marker in order]
    assert positions == sorted(positions) and text.count(resumed) == 1
    # The replacement resumed from the very checkpoint the preempted pod saved.
    assert [e["step"] for e in parse_lines(text.splitlines()) if e["event"] == "preempted"] == [resumed_from]
    assert k8s.status(p)[run.run_id].state == State.COMPLETED
    k8s.reconcile(p)  # what `qlaunch status` does before reading

    # -- Inference: suspended (no pod, no GPU) until training finished; then the trainer's
    # hand-off (a real cluster) or the reconcile above (the fake's trainer has no token)
    # started it.
    if fake:
        assert target.server.get("jobs", NS, n.infer_job)["spec"]["suspend"] is False
    target.inference_finishes(n.infer_job)
    assert k8s.status(p)[run.run_id].infer_state == State.COMPLETED
    assert {row.run_id: row for row in collect(p, k8s)}[run.run_id].progress.inference_done

    # Cancel: every Job, pod and ConfigMap of the experiment is gone.
    if fake:  # (a real cluster's other run is running or has finished by now)
        target.pod_running(job_names(p, other).train_job)
    assert sorted(k8s.cancel(p, list(p.runs))) == sorted(r.run_id for r in p.runs)
    target.wait(lambda: target.gone(experiment), what="the cancelled Jobs, pods and ConfigMaps to go")
    assert {s.state for s in k8s.status(p).values()} == {State.UNKNOWN}
    assert k8s.cancel(p, list(p.runs)) == []

    if fake:
        # The token went nowhere: not in a request, not even in an answer (metadata-only Secret GET).
        secret_token_forms = (FAKE_TOKEN, base64.b64encode(FAKE_TOKEN.encode()).decode())
        for request in target.server.requests:
            assert not any(form in request["body"] for form in secret_token_forms)
        for body in target.server.responses:
            assert not any(form.encode() in body for form in secret_token_forms)


def test_status_costs_two_list_calls_whatever_the_grid_size(fake, tmp_path):
    path = tmp_path / "big.yaml"
    path.write_text(textwrap.dedent(EXPERIMENT).replace("[16, 64]", "[4, 8, 16, 32, 64, 128]"))
    p, k8s = plan(path), backend()
    k8s.submit(p)
    for run in p.runs[:3]:
        fake.run_pod(NS, fake.start_pod(NS, job_names(p, run).train_job))
    before = len(fake.requests)
    statuses = k8s.status(p)
    calls = fake.requests[before:]
    assert [(c["method"], c["path"].rsplit("/", 1)[-1]) for c in calls] == [("GET", "jobs"), ("GET", "pods")]
    assert calls[0]["query"]["labelSelector"] == "qlaunch.dev/experiment=guanaco"
    assert sorted(s.state.value for s in statuses.values()) == ["pending"] * 3 + ["running"] * 3
    # A table refresh (status + progress) lists once, then reads the logs of the running pods.
    before = len(fake.requests)
    collect(p, k8s)
    calls = [c["path"].rsplit("/", 1)[-1] for c in fake.requests[before:]]
    assert calls == ["jobs", "pods", "log", "log", "log"]


def test_progress_reads_only_new_log_lines_and_finished_pods_once(fake, experiment):
    p, k8s = experiment, backend()
    k8s.submit(p)
    run = p.runs[0]
    pod = fake.start_pod(NS, job_names(p, run).train_job)
    fake.run_pod(NS, pod)
    fake.log(NS, pod, progress("start", 0, total_steps=50), progress("step", 5, loss=2.0))

    def log_reads():
        return [r for r in fake.requests if r["path"].endswith("/log")]

    assert [e["step"] for e in k8s.progress_events(p)[run.run_id]] == [0, 5]
    fake.log(NS, pod, progress("step", 6, loss=1.9))
    assert [e["step"] for e in k8s.progress_events(p)[run.run_id]] == [0, 5, 6]
    assert "sinceSeconds" in log_reads()[-1]["query"]  # the second read asked only for the tail
    fake.finish_pod(NS, pod)
    k8s.progress_events(p)
    reads = len(log_reads())
    assert [e["step"] for e in k8s.progress_events(p)[run.run_id]] == [0, 5, 6]
    assert len(log_reads()) == reads  # an ended pod is not read again


def test_logs_without_follow_prints_replaced_pods_first(fake, experiment):
    p, k8s = experiment, backend()
    k8s.submit(p)
    run = p.runs[0]
    job = job_names(p, run).train_job
    first = fake.start_pod(NS, job)
    fake.run_pod(NS, first)
    fake.log(NS, first, "attempt one")
    fake.evict_pod(NS, first, reason="EvictionByEvictionAPI")
    second = fake.start_pod(NS, job)
    fake.run_pod(NS, second)
    fake.log(NS, second, "attempt two")
    out = io.StringIO()
    k8s.logs(p, run, follow=False, out=out)
    text = out.getvalue()
    assert (
        text.index(f"pod {first} (replaced)")
        < text.index("attempt one")
        < text.index(f"pod {second}")
        < text.index("attempt two")
    )
    assert k8s.status(p)[run.run_id].restarts == 1


def test_dry_run_is_validated_by_the_server_and_stores_nothing(target, scenario):
    report = target.backend().submit(scenario, dry_run=True)
    assert sorted(report.submitted) == sorted(r.run_id for r in scenario.runs)
    if not target.real:
        assert patches(target.server) and all(r["query"].get("dryRun") == "All" for r in patches(target.server))
    assert (
        target.objects("jobs", scenario.experiment.name) == []
        and target.objects("configmaps", scenario.experiment.name) == []
    )
    if not target.real:
        assert target.server.list("jobs", NS) == [] and target.server.list("configmaps", NS) == []


def test_an_object_refused_by_the_server_leaves_nothing_half_submitted(fake, experiment):
    refused = Names.of(experiment.experiment.name, experiment.runs[1].run_id).infer_job

    def webhook(resource, obj, dry_run):
        if obj["metadata"]["name"] == refused:
            raise ApiError(
                403,
                "Forbidden",
                f'admission webhook "images.policy.example.com" denied the request: '
                f'jobs.batch "{refused}": images must come from registry.example.com',
            )

    fake.admission = webhook
    with pytest.raises(BackendError) as error:
        backend().submit(experiment)
    assert "images must come from registry.example.com" in str(error.value) and refused in str(error.value)
    assert fake.list("jobs", NS) == [] and fake.list("configmaps", NS) == []
    assert all(r["query"].get("dryRun") == "All" for r in patches(fake))


def test_a_failed_run_is_replaced_after_its_old_job_is_gone(fake, experiment):
    p, k8s = experiment, backend()
    k8s.submit(p)
    run = p.runs[0]
    n = job_names(p, run)
    pod = fake.start_pod(NS, n.train_job)
    fake.run_pod(NS, pod)
    fake.finish_pod(NS, pod, exit_code=137, reason="OOMKilled")
    fake.fail_job(NS, n.train_job)
    status = k8s.status(p)[run.run_id]
    assert status.state == State.OUT_OF_MEMORY and "memory" in status.detail
    old_uid = fake.get("jobs", NS, n.train_job)["metadata"]["uid"]
    fake.foreground_delay = 0.3  # the old Job lingers while its pods terminate
    report = k8s.submit(p)
    assert report.submitted == {run.run_id: [n.train_job, n.infer_job]}
    assert report.skipped.keys() == {p.runs[1].run_id}
    assert fake.get("jobs", NS, n.train_job)["metadata"]["uid"] != old_uid
    assert fake.get("pods", NS, pod) is None  # the old pod went with its Job (foreground deletion)
    deletes = [r for r in fake.requests if r["method"] == "DELETE"]
    assert {r["query"].get("propagationPolicy") for r in deletes} == {"Foreground"}


def test_force_replaces_a_running_job_and_completed_training_only_reruns_failed_inference(fake, experiment):
    p, k8s = experiment, backend()
    k8s.submit(p)
    run = p.runs[0]
    n = job_names(p, run)
    pod = fake.start_pod(NS, n.train_job)
    fake.run_pod(NS, pod)
    uid = fake.get("jobs", NS, n.train_job)["metadata"]["uid"]
    assert run.run_id in k8s.submit(p).skipped
    k8s.submit(p, force=True)
    assert fake.get("jobs", NS, n.train_job)["metadata"]["uid"] != uid and fake.get("pods", NS, pod) is None

    train_pod = fake.start_pod(NS, n.train_job)
    fake.run_pod(NS, train_pod)
    fake.finish_pod(NS, train_pod)
    assert k8s.status(p)[run.run_id].state == State.COMPLETED
    k8s.reconcile(p)  # `qlaunch status`: starts the inference Job
    infer_pod = fake.start_pod(NS, n.infer_job)
    fake.run_pod(NS, infer_pod)
    fake.finish_pod(NS, infer_pod, exit_code=1)
    fake.fail_job(NS, n.infer_job)
    assert k8s.status(p)[run.run_id].infer_state == State.FAILED
    train_uid = fake.get("jobs", NS, n.train_job)["metadata"]["uid"]
    report = k8s.submit(p)
    assert report.submitted[run.run_id] == [n.infer_job]
    assert fake.get("jobs", NS, n.train_job)["metadata"]["uid"] == train_uid
    # No trainer will release the new inference Job: training is done, so submit started it.
    assert fake.get("jobs", NS, n.infer_job)["spec"]["suspend"] is False


def test_time_limit_shows_as_timeout(fake, experiment):
    p, k8s = experiment, backend()
    k8s.submit(p)
    n = job_names(p, p.runs[0])
    fake.run_pod(NS, fake.start_pod(NS, n.train_job))
    fake.fail_job(NS, n.train_job, reason="DeadlineExceeded")
    assert k8s.status(p)[p.runs[0].run_id].state == State.TIMEOUT


# -- errors a user meets ----------------------------------------------------------------------


def test_missing_kubeconfig_is_one_clear_error(experiment, tmp_path, monkeypatch):
    missing = tmp_path / "nowhere" / "config"
    monkeypatch.setenv("KUBECONFIG", str(missing))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(BackendError) as error:
        KubernetesBackend().status(experiment)
    assert str(missing) in str(error.value) and "KUBECONFIG" in str(error.value)


def test_unreachable_api_is_one_clear_error(experiment, tmp_path, monkeypatch):
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    fake = FakeKube()
    fake.httpd.server_close()
    config = fake.write_kubeconfig(tmp_path / "kubeconfig")
    config.write_text(config.read_text().replace(fake.url, f"http://127.0.0.1:{port}"))
    monkeypatch.setenv("KUBECONFIG", str(config))
    with pytest.raises(BackendError) as error:
        KubernetesBackend().submit(experiment)
    assert f"cannot reach the Kubernetes API at http://127.0.0.1:{port}" in str(error.value)


def test_rejected_credentials(fake, experiment, tmp_path, monkeypatch):
    monkeypatch.setenv("KUBECONFIG", str(fake.write_kubeconfig(tmp_path / "stale", token="expired")))
    with pytest.raises(BackendError) as error:
        backend().status(experiment)
    assert "401 Unauthorized" in str(error.value)


def test_forbidden_namespace_submits_nothing(fake, experiment):
    fake.forbidden.add(NS)
    with pytest.raises(BackendError) as error:
        backend().submit(experiment)
    message = str(error.value)
    assert message.startswith("forbidden") and f'in the namespace "{NS}"' in message
    assert patches(fake) == []


@pytest.mark.parametrize(
    "remove, expected",
    [
        (("secrets", "hf-token"), "Secret 'hf-token' (kubernetes.hf_token_secret) not found in namespace 'ml-team'"),
        (
            ("persistentvolumeclaims", "qlaunch-storage"),
            "PersistentVolumeClaim 'qlaunch-storage' (kubernetes.pvc) not found",
        ),
        (("namespaces", NS), "namespace 'ml-team' (kubernetes.namespace) does not exist"),
    ],
)
def test_missing_cluster_objects_are_named_before_anything_is_applied(fake, experiment, remove, expected):
    resource, name = remove
    with fake.cond:
        fake._remove((resource, "" if resource == "namespaces" else NS, name))
    with pytest.raises(BackendError) as error:
        backend().submit(experiment, dry_run=True)
    assert expected in str(error.value)
    assert patches(fake) == []


def test_a_read_write_once_claim_is_refused(fake, experiment):
    with fake.cond:
        fake.store[("persistentvolumeclaims", NS, "qlaunch-storage")]["spec"]["accessModes"] = ["ReadWriteOnce"]
    with pytest.raises(BackendError) as error:
        backend().submit(experiment)
    assert "ReadWriteOnce" in str(error.value) and "ReadWriteMany" in str(error.value)


def test_logs_of_a_run_never_submitted(target, scenario):
    with pytest.raises(BackendError) as error:
        target.backend().logs(scenario, scenario.runs[0], follow=False, out=io.StringIO())
    assert "has no train Job" in str(error.value)


def test_a_gpu_run_trains_on_a_gpu_node(target, tmp_path, training):
    """Only on a real cluster with GPU nodes: one run asking for a GPU is placed where there is
    one and trains to the end (nothing to prove on the fake server, which has no scheduler)."""
    if not (target.real and REAL.gpu):
        pytest.skip(NEEDS_GPU)
    path = tmp_path / "gpu.yaml"
    text = target.experiment_yaml("").replace("gpus_per_node: 0", "gpus_per_node: 1")
    text = text.replace("  lora.r: [4, 8]", "  lora.r: [8]").replace(
        "kubernetes:\n", "kubernetes:\n  gpu_node_label: none\n", 1
    )
    path.write_text(text)
    p = plan(path)
    k8s, n = target.backend(), job_names(p, p.runs[0])
    try:
        k8s.submit(p)
        pod = target.get("pods", target.pod_running(n.train_job))
        assert pod["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] in ("1", 1)
        target.trainer_finishes(n.train_job, pod["metadata"]["name"])
        assert k8s.status(p)[p.runs[0].run_id].state == State.COMPLETED
    finally:
        k8s.cancel(p, list(p.runs))
        target.cleanup(p.experiment.name)


# -- the CLI, as a user runs it ---------------------------------------------------------------


def _cli(*args: str, **kwargs):
    return subprocess.run(
        [sys.executable, "-m", "launcher.cli", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "COLUMNS": "250"},
        timeout=120,
        **kwargs,
    )


def test_cli_submit_status_logs_follow_cancel(fake, experiment):
    source = str(experiment.source)
    result = _cli("submit", source, "--skip-preflight")
    assert result.returncode == 0, result.stderr
    assert "2 runs submitted" in result.stdout
    run = experiment.runs[0]
    job = job_names(experiment, run).train_job
    first = fake.start_pod(NS, job)
    fake.run_pod(NS, first)
    fake.log(NS, first, progress("start", 0, total_steps=40), progress("step", 8, total_steps=40, loss=1.25))
    result = _cli("status", source)
    assert result.returncode == 0, result.stderr
    line = next(line for line in result.stdout.splitlines() if run.run_id in line)
    assert "running" in line and "8/40" in line and "1.2500" in line

    follower = subprocess.Popen(
        [sys.executable, "-m", "launcher.cli", "logs", run.run_id[:6], "-f"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        time.sleep(1.0)  # the follower may attach before or after the preemption: both must work
        fake.evict_pod(NS, first)
        second = fake.start_pod(NS, job)
        fake.run_pod(NS, second)
        fake.log(NS, second, "second pod says hello")
        fake.finish_pod(NS, second)
        stdout, stderr = follower.communicate(timeout=60)
    finally:
        follower.kill()
    assert follower.returncode == 0, stderr
    assert stdout.index('"step": 8') < stdout.index("second pod says hello")

    result = _cli("cancel", "guanaco", "-e", source)
    assert result.returncode == 0, result.stderr
    assert fake.list("jobs", NS) == [] and fake.list("pods", NS) == []


def _two_context_kubeconfig(path: Path, first: FakeKube, second: FakeKube) -> Path:
    """One kubeconfig holding a context per fake cluster; its current context is the first."""
    import yaml

    configs = [
        yaml.safe_load(server.write_kubeconfig(path.with_suffix(f".{name}"), namespace=NS).read_text())
        for name, server in (("first", first), ("second", second))
    ]
    merged = {
        "apiVersion": "v1",
        "kind": "Config",
        "current-context": "first",
        "clusters": [],
        "users": [],
        "contexts": [],
    }
    for name, config in zip(("first", "second"), configs):
        merged["clusters"].append({"name": name, "cluster": config["clusters"][0]["cluster"]})
        merged["users"].append({"name": name, "user": config["users"][0]["user"]})
        merged["contexts"].append({"name": name, "context": {"cluster": name, "user": name, "namespace": NS}})
    path.write_text(json.dumps(merged))
    return path


def test_context_picks_the_cluster_every_command_talks_to(fake, experiment, tmp_path, monkeypatch):
    (tmp_path / "second").mkdir()
    second = start_cluster(tmp_path / "second", monkeypatch, NS, hf_token=FAKE_TOKEN)
    try:
        config = _two_context_kubeconfig(tmp_path / "two-contexts", fake, second)
        result = _cli(
            "submit", str(experiment.source), "--skip-preflight", "--kubeconfig", str(config), "--context", "second"
        )
        assert result.returncode == 0, result.stderr
        assert {job["metadata"]["name"] for job in second.list("jobs", NS)}  # submitted to the second
        assert not fake.list("jobs", NS)
        states = {}
        for context in ("first", "second"):
            result = _cli("status", str(experiment.source), "--json", "--kubeconfig", str(config), "--context", context)
            assert result.returncode == 0, result.stderr
            states[context] = {run["state"] for run in json.loads(result.stdout)["runs"]}
        assert states["second"] == {"pending"} and "pending" not in states["first"]
    finally:
        second.stop()


def _interrupted_after_first_table(process: subprocess.Popen) -> tuple[str, str]:
    """Ctrl-C as a user gives it: once the watch has drawn its first table (not at a fixed time,
    which on a loaded machine can fall before the command has even started)."""
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(process.stdout), daemon=True)
    reader.start()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None and not any("pending" in line for line in lines):
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGINT)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        raise AssertionError(f"the watch did not stop on Ctrl-C; it printed: {''.join(lines)[-3000:]}") from None
    reader.join(timeout=10)
    return "".join(lines), process.stderr.read()


def test_hints_and_cancel_of_a_run_go_to_the_context_it_was_submitted_to(fake, experiment, tmp_path, monkeypatch):
    """The Watch hint repeats --kubeconfig/--context; `cancel <run>` alone reaches that cluster."""
    (tmp_path / "second").mkdir()
    second = start_cluster(tmp_path / "second", monkeypatch, NS, hf_token=FAKE_TOKEN)
    try:
        config = _two_context_kubeconfig(tmp_path / "two contexts", fake, second)
        result = _cli(
            "submit", str(experiment.source), "--skip-preflight", "--kubeconfig", str(config), "--context", "second"
        )
        assert result.returncode == 0, result.stderr
        (watch,) = [line.split("Watch: ", 1)[1] for line in result.stdout.splitlines() if "Watch: " in line]
        words = shlex.split(watch)
        assert words[words.index("--kubeconfig") + 1] == str(config) and "--backend" not in words
        assert words[words.index("--context") + 1] == "second"
        # The hint, pasted into a shell; stopped with Ctrl-C (the jobs stay pending here).
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        (bin_dir / "qlaunch").write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -m launcher.cli "$@"\n')
        (bin_dir / "qlaunch").chmod(0o755)
        env = {
            **os.environ,
            "PATH": f"{bin_dir}:{os.environ['PATH']}",
            "COLUMNS": "250",
            "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
        }
        hinted = subprocess.Popen(
            ["bash", "-c", watch],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            start_new_session=True,
        )
        out, err = _interrupted_after_first_table(hinted)
        assert out.count("pending") >= 2, out + err  # the second cluster's jobs; the first has none

        run = experiment.runs[0]
        result = _cli("cancel", run.run_id)  # no --context: the one it was submitted with
        assert result.returncode == 0, result.stderr
        assert f"{run.run_id} cancelled" in result.stdout
        left = {job["metadata"]["name"] for job in second.list("jobs", NS)}
        assert job_names(experiment, run).train_job not in left
        assert job_names(experiment, experiment.runs[1]).train_job in left  # the other run's jobs stay
    finally:
        second.stop()


def test_unknown_context_is_one_clear_error_naming_the_context_and_file(fake, experiment, tmp_path):
    config = fake.write_kubeconfig(tmp_path / "kubeconfig")
    result = _cli("status", str(experiment.source), "--kubeconfig", str(config), "--context", "prod-eu")
    assert result.returncode != 0
    assert "prod-eu" in result.stderr and str(config) in result.stderr
    assert "its contexts: fake" in result.stderr and "Traceback" not in result.stderr
