"""tests/k8s_target.py in the default mode: which target the environment selects, the one error
an incomplete real-cluster setting gives, and RealTarget's own calls (namespace and claim checks,
data seeding, submit, the Eviction API, waiting for the Job controller's pods and the trainer's
lines) against the fake API server standing in for a real cluster, with a thread playing the Job
controller and the kubelet. The real cluster itself cannot be reached here.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from fake_kube import FakeKube, start_cluster
from k8s_target import DATA_DIR, RealSettings, RealTarget, TargetError, progress, settings_from_env

from launcher.backends.base import State
from launcher.backends.kubernetes.naming import Names
from launcher.grid import plan

ROOT = Path(__file__).resolve().parents[1]
NS = "qlaunch-test"


def test_without_a_kubeconfig_the_tests_use_the_fake_server():
    assert settings_from_env({"QLAUNCH_TEST_NAMESPACE": NS}) is None


def test_the_settings_a_real_cluster_run_reads(tmp_path):
    config = tmp_path / "config"
    config.write_text("{}")
    settings = settings_from_env(
        {
            "QLAUNCH_TEST_KUBECONFIG": str(config),
            "QLAUNCH_TEST_NAMESPACE": NS,
            "QLAUNCH_TEST_IMAGE": "qlaunch-train:cpu-test",
            "QLAUNCH_TEST_GPU": "1",
            "QLAUNCH_TEST_TIMEOUT": "90",
        }
    )
    assert settings == RealSettings(config, NS, "qlaunch-storage", "qlaunch-train:cpu-test", True, 90.0)
    bare = settings_from_env({"QLAUNCH_TEST_KUBECONFIG": str(config), "QLAUNCH_TEST_NAMESPACE": NS})
    assert (bare.image, bare.gpu, bare.pvc) == (None, False, "qlaunch-storage")


@pytest.mark.parametrize(
    "env, expected",
    [
        ({"QLAUNCH_TEST_NAMESPACE": ""}, "is set but QLAUNCH_TEST_NAMESPACE is not"),
        ({"QLAUNCH_TEST_NAMESPACE": NS, "QLAUNCH_TEST_TIMEOUT": "ten"}, "QLAUNCH_TEST_TIMEOUT='ten': not a number"),
    ],
)
def test_incomplete_real_cluster_settings_are_one_clear_error(tmp_path, env, expected):
    config = tmp_path / "config"
    config.write_text("{}")
    with pytest.raises(TargetError) as error:
        settings_from_env({"QLAUNCH_TEST_KUBECONFIG": str(config), **env})
    assert expected in str(error.value)
    with pytest.raises(TargetError, match="no such file"):
        settings_from_env({"QLAUNCH_TEST_KUBECONFIG": str(tmp_path / "missing"), "QLAUNCH_TEST_NAMESPACE": NS})


def test_the_cluster_tests_stop_at_once_on_a_kubeconfig_without_a_namespace(tmp_path):
    config = tmp_path / "config"
    config.write_text("{}")
    env = {**os.environ, "QLAUNCH_TEST_KUBECONFIG": str(config)}
    env.pop("QLAUNCH_TEST_NAMESPACE", None)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_k8s_cluster.py"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=120,
    )
    output = result.stdout + result.stderr
    assert result.returncode == pytest.ExitCode.USAGE_ERROR, output
    assert output.count("is set but QLAUNCH_TEST_NAMESPACE is not") == 1
    assert " passed" not in output and " failed" not in output


class Controller(threading.Thread):
    """The Job controller and the kubelet, minimally: every Job without a live pod gets a running
    one (replacing an ended pod only when it ended without success); a bare pod (the seed pod)
    succeeds."""

    def __init__(self, server: FakeKube):
        super().__init__(daemon=True)
        self.server, self.stopped = server, threading.Event()

    tick = 0.02

    def run(self):
        while not self.stopped.wait(self.tick):
            try:
                self.step()
            except KeyError:  # a Job or pod deleted meanwhile (cancel): look again
                pass

    def step(self):
        for job in self.server.list("jobs", NS):
            name = job["metadata"]["name"]
            phases = {p["status"]["phase"] for p in self.server.pods_of(NS, name)}
            if self.may_start(job) and not phases & {"Pending", "Running", "Succeeded"}:
                self.started(job, self.server.start_pod(NS, name))
        with self.server.cond:
            for key, pod in list(self.server.store.items()):
                if key[0] == "pods" and not pod.get("status"):
                    pod["status"] = {"phase": "Succeeded"}
                    self.server._bump("pods", "MODIFIED", pod)

    def may_start(self, job: dict) -> bool:
        return not job["metadata"].get("deletionTimestamp") and not job["spec"].get("suspend")

    def started(self, job: dict, pod: str) -> None:
        self.server.run_pod(NS, pod)


class SimulatedCluster(Controller):
    """Also the trainer, as tests/test_k8s_cluster.py's real mode expects it: a step a tick up to
    max_steps; on an eviction a checkpoint, `preempted` and exit 75; the replacement resumes from
    that checkpoint; inference starts once training has completed and prints infer_end."""

    tick = 0.05
    max_steps = 40

    def __init__(self, server: FakeKube):
        super().__init__(server)
        self.steps: dict[str, int] = {}  # running train pod → step reached
        self.checkpoints: dict[str, int] = {}  # train Job → step of its last checkpoint

    def may_start(self, job: dict) -> bool:
        if job["metadata"]["labels"].get("qlaunch.dev/role") != "infer":
            return super().may_start(job)
        train = self.server.get("jobs", NS, job["metadata"]["name"].removesuffix("-infer")) or {}
        done = any(c["type"] == "Complete" for c in (train.get("status") or {}).get("conditions") or [])
        return super().may_start(job) and done  # (the init container waits for the adapter)

    def started(self, job: dict, pod: str) -> None:
        super().started(job, pod)
        name = job["metadata"]["name"]
        if job["metadata"]["labels"].get("qlaunch.dev/role") == "infer":
            self.server.log(NS, pod, progress("infer_end", self.max_steps, summary={"prompts": 1}))
            self.server.finish_pod(NS, pod)
            return
        resumed = self.checkpoints.get(name)
        attempt = len(self.server.pods_of(NS, name))
        self.server.log(
            NS, pod, progress("start", resumed or 0, total_steps=self.max_steps, attempt=attempt, resumed_from=resumed)
        )
        self.steps[pod] = resumed or 0

    def step(self):
        super().step()
        for pod, step in list(self.steps.items()):
            current = self.server.get("pods", NS, pod)
            if current is None or current["status"]["phase"] != "Running":
                del self.steps[pod]
                continue
            job = current["metadata"]["ownerReferences"][0]["name"]
            if any(c["type"] == "DisruptionTarget" for c in current["status"]["conditions"]):
                self.checkpoints[job] = step
                self.server.log(
                    NS,
                    pod,
                    progress("checkpoint", step, path=f"checkpoint-{step}"),
                    progress("preempted", step, signal="SIGTERM"),
                )
                self.server.finish_pod(NS, pod, exit_code=75)
            elif step < self.max_steps:
                self.steps[pod] = step + 1
                self.server.log(NS, pod, progress("step", step + 1, total_steps=self.max_steps, loss=2.0 - step / 40))
            else:
                self.server.log(NS, pod, progress("end", step, total_steps=self.max_steps, status="completed"))
                self.server.finish_pod(NS, pod)


@pytest.fixture
def stand_in(request, tmp_path, monkeypatch):
    """A FakeKube as the "real cluster", reached only through the kubeconfig RealTarget is given;
    Controller plays its controllers (parametrize indirectly with SimulatedCluster for a trainer)."""
    server = start_cluster(tmp_path, monkeypatch, NS)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "not-this-one"))
    controller = getattr(request, "param", Controller)(server)
    controller.start()
    settings = RealSettings(
        server.write_kubeconfig(tmp_path / "real-kubeconfig"),
        NS,
        image="qlaunch-train:cpu-test",
        timeout=15.0,
        poll=0.05,
    )
    yield server, RealTarget(settings)
    controller.stopped.set()
    controller.join()
    server.stop()


def test_real_target_checks_the_namespace_and_its_claim(stand_in):
    server, target = stand_in
    target.check_namespace()
    with server.cond:
        server.store[("persistentvolumeclaims", NS, "qlaunch-storage")]["spec"]["accessModes"] = ["ReadWriteOnce"]
    with pytest.raises(TargetError, match="is not ReadWriteMany"):
        target.check_namespace()
    with server.cond:
        server._remove(("persistentvolumeclaims", NS, "qlaunch-storage"))
    with pytest.raises(TargetError, match="no PersistentVolumeClaim 'qlaunch-storage'"):
        target.check_namespace()


def test_real_target_drives_a_run_through_a_preemption(stand_in, tmp_path):
    server, target = stand_in
    target.seed_data()
    seeded = [r for r in server.requests if r["method"] == "PATCH" and r["path"].endswith("/pods/qlaunch-test-seed")]
    assert len(seeded) == 1 and DATA_DIR in seeded[0]["body"] and "/seed/train.jsonl" in seeded[0]["body"]
    assert server.list("pods", NS) == [] and server.list("configmaps", NS) == []  # the seed pod cleaned up

    # The real-cluster experiment is valid, renders without a GPU and is accepted by the server.
    path = tmp_path / "real.yaml"
    path.write_text(target.experiment_yaml(""))
    p = plan(path)
    assert len(p.runs) == 2 and {r.resources.gpus_per_node for r in p.runs} == {0}
    k8s = target.backend()
    assert sorted(k8s.submit(p).submitted) == sorted(r.run_id for r in p.runs)
    job = Names.of(p.experiment.name, p.runs[0].run_id).train_job
    rendered = server.get("jobs", NS, job)["spec"]["template"]["spec"]
    assert "nvidia.com/gpu" not in str(rendered["containers"][0]["resources"]) and "nodeSelector" not in rendered

    first = target.pod_running(job)
    server.log(
        NS, first, progress("start", 0, total_steps=40, attempt=1, resumed_from=None), progress("step", 1, loss=2.0)
    )
    assert target.trainer_starts(first) == 1
    server.log(NS, first, progress("step", 2, loss=1.9))
    assert target.trainer_steps_on(first, 1) == '"step": 2, '

    target.preempt(first)  # POST .../pods/<name>/eviction
    condition = next(
        c for c in server.get("pods", NS, first)["status"]["conditions"] if c["type"] == "DisruptionTarget"
    )
    assert condition["reason"] == "EvictionByEvictionAPI"
    server.log(NS, first, progress("preempted", 2, signal="SIGTERM"))
    server.finish_pod(NS, first, exit_code=75)
    target.trainer_stops(first)
    second = target.replacement_pod(job, first)
    assert target.pod_running(job, second) == second
    server.log(
        NS, second, progress("start", 2, total_steps=40, attempt=2, resumed_from=2), progress("step", 3, loss=1.8)
    )
    assert target.trainer_resumes(second, None) == (2, 3)
    server.finish_pod(NS, second)
    target.trainer_finishes(job, second)
    assert k8s.status(p)[p.runs[0].run_id].state == State.COMPLETED

    target.cleanup(p.experiment.name)
    assert target.gone(p.experiment.name)


def _cluster_tests_in_real_mode(target: RealTarget, **env: str) -> str:
    """tests/test_k8s_cluster.py run as a user with a cluster runs it; its output."""
    env = {
        **os.environ,
        "QLAUNCH_TEST_KUBECONFIG": str(target.settings.kubeconfig),
        "QLAUNCH_TEST_NAMESPACE": NS,
        "QLAUNCH_TEST_TIMEOUT": "30",
        "QLAUNCH_TEST_POLL": "0.05",
        **env,
    }
    for key in [k for k, v in env.items() if v == ""]:
        del env[key]
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "tests/test_k8s_cluster.py"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=300,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    return output


def test_the_cluster_tests_in_real_mode_without_an_image(stand_in):
    """The tests a cluster can prove without a pod pass; the rest are skipped, each with its reason."""
    server, target = stand_in
    output = _cluster_tests_in_real_mode(target, QLAUNCH_TEST_IMAGE="")
    assert "4 passed" in output and "QLAUNCH_TEST_IMAGE" in output and "needs the fake API server" in output
    dry_runs = [r for r in server.requests if r["method"] == "PATCH"]
    assert dry_runs and all(r["query"].get("dryRun") == "All" for r in dry_runs)  # the dry run went to the stand-in


@pytest.mark.parametrize("stand_in", [SimulatedCluster], indirect=True)
def test_the_real_mode_scenario_against_a_simulated_cluster(stand_in):
    """The real-mode scenario (submit, resubmit, status, logs -f across an eviction, inference,
    cancel), its waits and its cleanup, against controllers and a trainer that act on their own."""
    server, target = stand_in
    output = _cluster_tests_in_real_mode(target, QLAUNCH_TEST_IMAGE="qlaunch-train:cpu-test")
    assert "5 passed" in output and "needs a GPU node" in output
    evictions = [r for r in server.requests if r["method"] == "POST" and r["path"].endswith("/eviction")]
    assert len(evictions) == 1
    assert not [key for key in server.store if key[0] in ("jobs", "pods", "configmaps")]  # all cleaned up


class Idle(Controller):
    """No controller at all: the test makes each pod itself."""

    def step(self):
        pass


@pytest.mark.parametrize("stand_in", [Idle], indirect=True)
def test_an_image_the_nodes_cannot_pull_fails_at_once_naming_it(stand_in, tmp_path):
    server, target = stand_in
    path = tmp_path / "real.yaml"
    path.write_text(target.experiment_yaml(""))
    p = plan(path)
    target.backend().submit(p)
    job = Names.of(p.experiment.name, p.runs[0].run_id).train_job
    pod = server.start_pod(NS, job)
    with server.cond:
        status = server.store[("pods", NS, pod)]["status"]["containerStatuses"][0]
        status["state"] = {
            "waiting": {"reason": "ErrImageNeverPull", "message": "image not present with pull policy of Never"}
        }
    with pytest.raises(TargetError) as error:
        target.pod_running(job)  # not after QLAUNCH_TEST_TIMEOUT: at once
    assert "ErrImageNeverPull" in str(error.value) and "'qlaunch-train:cpu-test'" in str(error.value)
    assert "kind load docker-image" in str(error.value)
