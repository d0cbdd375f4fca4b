"""Kubernetes manifests for a plan: pure (same plan, same bytes), checked before any API call.

Each run's job specs (launcher.jobspec) become API objects built directly as dicts (what the API
client sends, after TorchX's `role_to_pod`), written once as block YAML for review. Per run: a
ConfigMap with run.yaml (and one per small local data file, shared by the grid's runs), a
headless Service (multi-node only) and the training Job; per grid one evaluation Job, held
until every training Job has ended (evaluation_documents); or, with `inference.per_run: true`,
per run an inference Job created suspended (no pod, no GPU) that the training pod releases once its final
adapter is written, through a ServiceAccount and a Role that may patch that one Job and nothing
else (the hand-off objects).
"""

from __future__ import annotations

import json
from pathlib import PurePosixPath
from typing import Any

import yaml

from ... import evaluation
from ...evaluation import per_run
from ...grid import Plan
from ...job.config import RunConfig
from ...job.errors import ConfigError
from ...job.experiment_file import dump_run_config
from ...job.grid_evaluation import RUNS_FILE
from ...job.progress import EXIT_PREEMPTED
from ...job.protocol import (
    MAIN_PROCESS_PORT,
    RELEASE_CREDENTIALS_ENV,
    RELEASE_JOB_ENV,
    RELEASE_PATCH_ENV,
    WAIT_FOR_TRAINING_ENV,
)
from ...job.requeue import EXIT_REQUEUES_EXHAUSTED
from ...job.requeue import JOB_ENV as REQUEUE_JOB_ENV
from ...jobspec import Resources, inference_job, job_specs
from .checks import (
    kube_memory,
)
from .gpu_labels import gpu_selector
from .naming import (
    ADMISSION_GATE_ANNOTATION,
    EVALUATE,
    EVALUATES_ANNOTATION,
    EXPERIMENT_LABEL,
    INFER,
    JOB_UID_LABEL,
    LABEL_PREFIX,
    QUEUE_LABEL,
    ROLE_LABEL,
    RUN_LABEL,
    STARTS_AFTER_ANNOTATION,
    TRAIN,
    TRAINING_GATE,
    Names,
    names,
)
from .staging import CONFIG_MOUNT, POD_HOME, RunFiles, pod_run, run_files

# Where the training container finds the hand-off credentials (a projected volume: the
# ServiceAccount token, the cluster CA and the namespace), and the env vars that name the Job
# to release and the patch that releases it (training/handoff.py reads them).
HANDOFF_MOUNT = "/var/run/secrets/qlaunch/handoff"
# training/infer.py waits for training when a queue admitted the inference Job early.
INFER_WAITS_ENV = WAIT_FOR_TRAINING_ENV
RELEASE_ENV = {"job": RELEASE_JOB_ENV, "patch": RELEASE_PATCH_ENV, "credentials": RELEASE_CREDENTIALS_ENV}


# ---------------------------------------------------------------------------------------------
# Checks: everything the API server would refuse, found before the first call.


# ---------------------------------------------------------------------------------------------
# Documents


def labels(plan: Plan, run: RunConfig, role: str | None) -> dict[str, str]:
    result = {
        "app.kubernetes.io/name": "qlaunch",
        "app.kubernetes.io/instance": names(plan, run).base,
        "app.kubernetes.io/component": role or "config",
        "app.kubernetes.io/part-of": plan.experiment.name,
        "app.kubernetes.io/managed-by": "qlaunch",
        EXPERIMENT_LABEL: plan.experiment.name,
        RUN_LABEL: run.run_id,
    }
    if role:
        result[ROLE_LABEL] = role
    return result


def annotations(run: RunConfig) -> dict[str, str]:
    return {
        f"{LABEL_PREFIX}/run-dir": run.run_dir,
        f"{LABEL_PREFIX}/overrides": json.dumps(run.overrides, sort_keys=True),
    }


def pod_run_config(plan: Plan, run: RunConfig, files: RunFiles | None = None) -> str:
    """run.yaml as the pod sees it: relative paths resolve on the PVC (storage.root), since the
    experiment file's folder on the laptop does not exist inside the cluster; local data files
    are named where their staged copies are (launcher/backends/kubernetes/staging.py)."""
    return dump_run_config(pod_run(run, str(plan.storage_root), files))


def _env(plan: Plan, run: RunConfig, role: str) -> list[dict[str, Any]]:
    variables = {
        "PYTHONUNBUFFERED": "1",
        "HOME": POD_HOME,
        # Model downloads land once on the shared claim, not once per pod.
        "HF_HOME": str(PurePosixPath(str(plan.storage_root)) / ".cache" / "huggingface"),
        **run.environment.variables,
    }
    env: list[dict[str, Any]] = [{"name": key, "value": value} for key, value in variables.items()]
    if role == TRAIN:
        # Which Job this pod belongs to: the requeue guard counts the stops of this Job only.
        env.append(
            {"name": REQUEUE_JOB_ENV, "valueFrom": {"fieldRef": {"fieldPath": f"metadata.labels['{JOB_UID_LABEL}']"}}}
        )
    secret = run.kubernetes.hf_token_secret
    if secret is not None:
        # The token stays in the cluster: the kubelet resolves the reference at pod start.
        env.append(
            {
                "name": run.model.hf_token_env,
                "valueFrom": {"secretKeyRef": {"name": secret.name, "key": secret.key}},
            }
        )
    for extra in run.kubernetes.secrets:  # e.g. WANDB_API_KEY for tracking.report_to: [wandb]
        env.append({"name": extra.env, "valueFrom": {"secretKeyRef": {"name": extra.name, "key": extra.key}}})
    return env


def _resources(res: Resources) -> dict[str, Any]:
    """One job's request (launcher.jobspec: the inference job's is its own, smaller one)."""
    memory = kube_memory(res.memory)
    # Memory limit = request: running out shows as OOMKilled on this pod, not as node pressure.
    limits: dict[str, Any] = {"memory": memory}
    if res.gpus_per_node > 0:
        limits["nvidia.com/gpu"] = res.gpus_per_node
    return {"requests": {"cpu": str(res.cpus_per_task), "memory": memory}, "limits": limits}


def pull_policy(run: RunConfig) -> str:
    """kubernetes.image_pull_policy, or for null the one that fits the tag: a mutable tag
    (`:latest`, or none, which means latest) is pulled every time, so pods of one grid do not run
    whatever old copy each node has cached; a version tag or a digest is pulled once per node."""
    k8s = run.kubernetes
    if k8s.image_pull_policy is not None:
        return k8s.image_pull_policy
    image = k8s.image.strip()
    if "@" in image:
        return "IfNotPresent"
    name = image.rsplit("/", 1)[-1]
    tag = name.partition(":")[2]
    return "Always" if tag in ("", "latest") else "IfNotPresent"


# The taint GPU nodes carry (the GPU operator, GKE, EKS and AKS GPU pools) so that only pods
# that ask for a GPU land there.
GPU_TAINT_KEYS = ("nvidia.com/gpu",)


def pod_tolerations(run: RunConfig, gpus: int) -> list[dict[str, Any]]:
    """kubernetes.tolerations for a pod with `gpus` GPUs: a pod without GPUs does not tolerate
    the GPU taint, so it cannot take a GPU node's CPUs and memory from the GPU jobs; the other
    tolerations (a spot pool's, say) apply to every pod."""
    return [
        t.model_dump(exclude_none=True) for t in run.kubernetes.tolerations if gpus > 0 or t.key not in GPU_TAINT_KEYS
    ]


def train_command(plan: Plan, run: RunConfig) -> list[str]:
    """The run's training job spec as the container's command: `training.launch` runs accelerate
    and the trainer as PID 1's children (accelerate launch alone, as PID 1, dies on the pod's
    SIGTERM and takes the trainer with it before it can checkpoint). A multi-node pod's rank is
    the JOB_COMPLETION_INDEX the Job controller gives each pod of an Indexed Job."""
    rendezvous: tuple[str, ...] = ()
    if run.resources.nodes > 1:
        n = names(plan, run)
        rendezvous = ("--main-process-ip", f"{n.train_job}-0.{n.service}")
    return job_specs(run).train.placed(run_yaml=f"{CONFIG_MOUNT}/run.yaml", args=rendezvous).command


def infer_command(run: RunConfig) -> list[str]:
    return inference_job(run).placed(run_yaml=f"{CONFIG_MOUNT}/run.yaml").command


def _sorted(value: Any) -> Any:
    """Mappings with their keys sorted, at every depth: the order the reviewed manifests (and
    their snapshots) have always shown for labels, env entries, resources and the like."""
    if isinstance(value, dict):
        return {key: _sorted(value[key]) for key in sorted(value)}
    if isinstance(value, list):
        return [_sorted(item) for item in value]
    return value


def _metadata(plan: Plan, run: RunConfig, name: str, labels_: dict[str, str]) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": run.kubernetes.namespace,
        "labels": _sorted(labels_),
        "annotations": _sorted(annotations(run)),
    }


def _job(plan: Plan, run: RunConfig, role: str) -> dict[str, Any]:
    """One Job per role (train, infer)."""
    n, k8s = names(plan, run), run.kubernetes
    train = role == TRAIN
    spec = job_specs(run).train if train else inference_job(run)
    indexed = train and spec.resources.nodes > 1
    role_labels = labels(plan, run, role)
    job_labels = dict(role_labels)
    # Under Kueue the training Job queues for quota from the start. The inference Job is held
    # back without the queue label (Kueue ignores it) until training's hand-off adds the label.
    queued = k8s.queue_name is not None
    if queued and train:
        job_labels[QUEUE_LABEL] = k8s.queue_name
    handoff = hands_off(run)
    container_security = _sorted(
        {
            "runAsNonRoot": True,
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
        }
    )
    storage_root = str(plan.storage_root)
    job_spec: dict[str, Any] = {
        "backoffLimit": k8s.backoff_limit,
        # A suspended Job's deadline clock starts when it is resumed: the inference Job's limit
        # covers inference alone, not the wait for training.
        "activeDeadlineSeconds": spec.resources.time_limit_seconds,
    }
    if k8s.ttl_seconds_after_finished is not None:
        job_spec["ttlSecondsAfterFinished"] = k8s.ttl_seconds_after_finished
    # A replacement pod starts only once the old one has fully terminated (and saved its
    # checkpoint): two trainers never write the same run folder.
    job_spec["podReplacementPolicy"] = "Failed"
    if queued or not train:
        # Kueue un-suspends a queued Job once the queue admits it against quota; the inference
        # Job stays suspended (no pod, no GPU) until training releases it.
        job_spec["suspend"] = True
    rules: list[dict[str, Any]] = []
    if train:
        # The requeue guard (launcher/job/requeue.py, in training.launch) stopped the run: it was
        # replaced resources.max_requeues times, or kept stopping without a newer checkpoint.
        # First, so that it wins over the rules below.
        rules.append(
            {
                "action": "FailJob",
                "onExitCodes": {"containerName": role, "operator": "In", "values": [EXIT_REQUEUES_EXHAUSTED]},
            }
        )
    job_spec["podFailurePolicy"] = {
        "rules": rules
        + [
            # Preemption, eviction, node drain or shutdown: not the run's fault. The Job replaces the
            # pod without counting it against backoffLimit; the new pod resumes from its checkpoint.
            {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
            # The trainer checkpointed on SIGTERM and exited EXIT_PREEMPTED: same as above (covers a
            # SIGTERM that comes without a DisruptionTarget condition, e.g. `kubectl delete pod`).
            # activeDeadlineSeconds and the requeue guard above bound the run as a whole.
            {"action": "Ignore", "onExitCodes": {"containerName": role, "operator": "In", "values": [EXIT_PREEMPTED]}},
        ]
    }
    if indexed:
        job_spec.update(completionMode="Indexed", completions=spec.resources.nodes, parallelism=spec.resources.nodes)
    pod: dict[str, Any] = {
        "restartPolicy": "Never",
        "terminationGracePeriodSeconds": k8s.termination_grace_period_seconds,
    }
    if k8s.priority_class:
        pod["priorityClassName"] = k8s.priority_class
    if train and handoff:
        pod["serviceAccountName"] = k8s.service_account or n.handoff
    elif k8s.service_account:
        pod["serviceAccountName"] = k8s.service_account
    # No API token in any container by default: only the training container gets one, through
    # the hand-off volume below, and its Role can patch the run's inference Job and nothing else.
    pod.update(automountServiceAccountToken=False, enableServiceLinks=False)
    if indexed:
        pod["subdomain"] = n.service
    gpu_nodes = gpu_selector(k8s.gpu_node_label, spec.resources.gpu_type) if spec.resources.gpus_per_node > 0 else {}
    node_selector = {**gpu_nodes, **k8s.node_selector}  # the user's entries win
    if node_selector:
        pod["nodeSelector"] = _sorted(node_selector)
    tolerations = pod_tolerations(run, spec.resources.gpus_per_node)
    if tolerations:
        pod["tolerations"] = _sorted(tolerations)
    pod["securityContext"] = {
        "runAsNonRoot": True,
        "runAsUser": k8s.run_as_user,
        "runAsGroup": k8s.run_as_user,
        "fsGroup": k8s.run_as_user,
        "fsGroupChangePolicy": "OnRootMismatch",
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    pod["containers"] = [
        {
            "name": role,
            "image": k8s.image,
            "imagePullPolicy": pull_policy(run),
            "command": train_command(plan, run) if train else infer_command(run),
            "env": _sorted(
                _env(plan, run, role)
                + (_release_env(plan, run) if train and handoff else [])
                + ([] if train else [{"name": INFER_WAITS_ENV, "value": "1"}])
            ),
            "resources": _sorted(_resources(spec.resources)),
            "securityContext": container_security,
            "volumeMounts": [
                {"name": "storage", "mountPath": storage_root},
                {"name": "config", "mountPath": CONFIG_MOUNT, "readOnly": True},
                {"name": "dshm", "mountPath": "/dev/shm"},
                {"name": "home", "mountPath": POD_HOME},
            ]
            + ([{"name": "handoff", "mountPath": HANDOFF_MOUNT, "readOnly": True}] if train and handoff else []),
        }
    ]
    pod["volumes"] = [
        {"name": "storage", "persistentVolumeClaim": {"claimName": k8s.pvc}},
        _config_volume(plan, run),
        # PyTorch data loaders and NCCL share memory through /dev/shm (64Mi by default).
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": k8s.shm_size}},
        # A writable HOME for caches whatever uid runs the image.
        {"name": "home", "emptyDir": {}},
    ]
    if train and handoff:
        pod["volumes"].append(_handoff_volume())
    job_spec["template"] = {
        "metadata": {"labels": _sorted(role_labels), "annotations": _sorted(annotations(run))},
        "spec": pod,
    }
    metadata = _metadata(plan, run, n.job(role), job_labels)
    if not train:
        metadata["annotations"] = _sorted({**metadata["annotations"], STARTS_AFTER_ANNOTATION: n.train_job})
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": metadata, "spec": job_spec}


# ---------------------------------------------------------------------------------------------
# The hand-off: training releases its inference Job, with no controller to install.


def hands_off(run: RunConfig) -> bool:
    """The run has its own inference Job that its trainer releases (`inference.per_run`); a run
    the grid evaluation Job evaluates hands off nothing: that Job is released by `reconcile`."""
    return run.inference.enabled and per_run(run, "kubernetes")


def release_patch(run: RunConfig) -> dict[str, Any]:
    """The JSON merge patch that starts a run's suspended inference Job: resume it, or under
    Kueue give it the queue label, so that Kueue admits it against quota and resumes it."""
    if run.kubernetes.queue_name is not None:
        return {"metadata": {"labels": {QUEUE_LABEL: run.kubernetes.queue_name}}}
    return {"spec": {"suspend": False}}


def awaiting_release(job: dict[str, Any]) -> bool:
    """An inference Job training has not released yet (suspended and, under Kueue, unlabelled)."""
    meta = job.get("metadata") or {}
    if STARTS_AFTER_ANNOTATION not in (meta.get("annotations") or {}):
        return False
    return bool((job.get("spec") or {}).get("suspend")) and QUEUE_LABEL not in (meta.get("labels") or {})


def _release_env(plan: Plan, run: RunConfig) -> list[dict[str, Any]]:
    patch = json.dumps(release_patch(run), sort_keys=True, separators=(",", ":"))
    return [
        {"name": RELEASE_ENV["job"], "value": names(plan, run).infer_job},
        {"name": RELEASE_ENV["patch"], "value": patch},
        {"name": RELEASE_ENV["credentials"], "value": HANDOFF_MOUNT},
    ]


def _handoff_volume() -> dict[str, Any]:
    """What the kubelet's own token automount gives (token, CA, namespace), for one container:
    a short-lived token the kubelet refreshes, bound to the pod."""
    return {
        "name": "handoff",
        "projected": {
            "sources": [
                {"serviceAccountToken": {"path": "token", "expirationSeconds": 3600}},
                {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
                {"downwardAPI": {"items": [{"path": "namespace", "fieldRef": {"fieldPath": "metadata.namespace"}}]}},
            ]
        },
    }


def _handoff_objects(plan: Plan, run: RunConfig) -> list[dict[str, Any]]:
    """A Role that may patch the run's inference Job (resourceNames: that one Job) and nothing
    else, bound to the training pod's ServiceAccount (the run's own, unless
    kubernetes.service_account names one)."""
    n, namespace = names(plan, run), run.kubernetes.namespace
    object_labels = {**labels(plan, run, None), "app.kubernetes.io/component": "handoff"}
    account = run.kubernetes.service_account or n.handoff
    documents: list[dict[str, Any]] = []
    if run.kubernetes.service_account is None:
        documents.append(
            {
                "apiVersion": "v1",
                "kind": "ServiceAccount",
                "metadata": _metadata(plan, run, n.handoff, object_labels),
                "automountServiceAccountToken": False,
            }
        )
    documents.append(
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": _metadata(plan, run, n.handoff, object_labels),
            "rules": [
                {"apiGroups": ["batch"], "resources": ["jobs"], "resourceNames": [n.infer_job], "verbs": ["patch"]}
            ],
        }
    )
    documents.append(
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": _metadata(plan, run, n.handoff, object_labels),
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": n.handoff},
            "subjects": [{"kind": "ServiceAccount", "name": account, "namespace": namespace}],
        }
    )
    return documents


DATA_COMPONENT = "data"


def _config_map(plan: Plan, run: RunConfig, files: RunFiles) -> dict[str, Any]:
    """The run's resolved config, mounted read-only at /config in every pod of the run (with its
    small local data files beside it, from their own ConfigMaps: _data_config_maps)."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(plan, run, names(plan, run).config, labels(plan, run, None)),
        "data": {"run.yaml": pod_run_config(plan, run, files)},
    }


def _data_config_maps(plan: Plan, run: RunConfig, files: RunFiles) -> list[dict[str, Any]]:
    """One ConfigMap per small local file, named by its content: every run of the grid (and
    every grid of the experiment) that reads the same bytes references the same object, so etcd
    holds one copy, not one per run. Each run's file shows it; applying it again is a no-op."""
    documents = []
    for key in sorted({*files.data, *files.binary_data}):
        metadata = {
            "name": Names.data(plan.experiment.name, key),
            "namespace": run.kubernetes.namespace,
            "labels": _sorted(
                {
                    "app.kubernetes.io/name": "qlaunch",
                    "app.kubernetes.io/component": DATA_COMPONENT,
                    "app.kubernetes.io/part-of": plan.experiment.name,
                    "app.kubernetes.io/managed-by": "qlaunch",
                    EXPERIMENT_LABEL: plan.experiment.name,
                }
            ),
        }
        field = ("data", files.data) if key in files.data else ("binaryData", files.binary_data)
        documents.append(
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": metadata,
                "immutable": True,
                field[0]: {key: field[1][key]},
            }
        )
    return documents


def _config_volume(plan: Plan, run: RunConfig) -> dict[str, Any]:
    """/config: the run's ConfigMap, and when the run has small local files, each file's own
    ConfigMap projected beside run.yaml under its content-addressed key."""
    n = names(plan, run)
    files = run_files(run, str(plan.storage_root))
    keys = sorted({*files.data, *files.binary_data})
    if not keys:
        return {"name": "config", "configMap": {"name": n.config}}
    sources = [{"configMap": {"name": n.config}}]
    sources += [
        {"configMap": {"name": Names.data(plan.experiment.name, key), "items": [{"key": key, "path": key}]}}
        for key in keys
    ]
    return {"name": "config", "projected": {"sources": sources}}


def _service(plan: Plan, run: RunConfig) -> dict[str, Any]:
    """Multi-node runs only: a headless Service gives each pod of the Indexed Job a stable DNS
    name (<job>-<index>.<service>), so every rank finds rank 0 before any pod is Ready."""
    n = names(plan, run)
    service_labels = {**labels(plan, run, None), "app.kubernetes.io/component": "rendezvous"}
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(plan, run, n.service, service_labels),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": _sorted({RUN_LABEL: run.run_id, ROLE_LABEL: TRAIN}),
            "ports": [{"name": "rendezvous", "port": MAIN_PROCESS_PORT, "targetPort": MAIN_PROCESS_PORT}],
        },
    }


def run_documents(plan: Plan, run: RunConfig) -> list[dict[str, Any]]:
    """The objects of one run, in the order they are applied (ConfigMap before the Jobs): the
    dicts the API client sends, dumped once as YAML for review."""
    files = run_files(run, str(plan.storage_root))
    documents = [*_data_config_maps(plan, run, files), _config_map(plan, run, files)]
    if run.resources.nodes > 1:
        documents.append(_service(plan, run))
    if hands_off(run):
        documents += _handoff_objects(plan, run)
    documents.append(_job(plan, run, TRAIN))
    if hands_off(run):
        documents.append(_job(plan, run, INFER))
    return documents


# ---------------------------------------------------------------------------------------------
# The grid evaluation Job (issue #29): one Job for the grid's runs, held until every one of
# their training Jobs has ended; `reconcile` (status, status --watch, submit) releases it.


def evaluated_runs(plan: Plan) -> list[RunConfig]:
    """The runs the grid evaluation Job evaluates: inference on, no inference Job of their own."""
    return [run for run in plan.runs if run.inference.enabled and not per_run(run, "kubernetes")]


def evaluation_name(plan: Plan) -> str:
    """The grid evaluation Job's name (and its ConfigMap's): one per experiment."""
    return f"{Names.prefix(plan.experiment.name)}-{EVALUATE}"


def evaluation_labels(plan: Plan) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "qlaunch",
        "app.kubernetes.io/instance": evaluation_name(plan),
        "app.kubernetes.io/component": EVALUATE,
        "app.kubernetes.io/part-of": plan.experiment.name,
        "app.kubernetes.io/managed-by": "qlaunch",
        EXPERIMENT_LABEL: plan.experiment.name,
        ROLE_LABEL: EVALUATE,
    }


# The evaluation ConfigMap's data (each run's run.yaml and the runs file): below the API's 1 MiB
# object limit with room for its metadata.
EVALUATION_CONFIG_LIMIT = 900 * 1024
EVALUATION_RUNS_FILE = f"{CONFIG_MOUNT}/{RUNS_FILE}"


def evaluation_documents(plan: Plan, runs: list[RunConfig]) -> list[dict[str, Any]]:
    """The grid evaluation's ConfigMap (the runs file and each run's run.yaml as its pods see
    it: the laptop cannot write the runs file onto the claim) and its Job, created held."""
    first, name = runs[0], evaluation_name(plan)
    k8s = first.kubernetes
    files = {run.run_id: run_files(run, str(plan.storage_root)) for run in runs}
    data = {f"{run.run_id}.yaml": pod_run_config(plan, run, files[run.run_id]) for run in runs}
    data[RUNS_FILE] = "".join(f"{CONFIG_MOUNT}/{run.run_id}.yaml\n" for run in runs)
    size = sum(len(text.encode()) for text in data.values())
    if size > EVALUATION_CONFIG_LIMIT:
        raise ConfigError(
            f"{plan.where('grid')}: the grid evaluation Job's ConfigMap would hold "
            f"{size // 1024} KiB of run.yaml files ({len(runs)} runs; the API stores at most about 1 MiB "
            "per object): set inference.per_run: true (one inference Job per run), or split the grid"
        )
    meta_annotations = {EVALUATES_ANNOTATION: ",".join(run.run_id for run in runs)}
    config_map = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": name,
            "namespace": k8s.namespace,
            "labels": _sorted({k: v for k, v in evaluation_labels(plan).items() if k != ROLE_LABEL}),
            "annotations": meta_annotations,
        },
        "data": _sorted(data),
    }
    job = _job(plan, first, INFER)
    spec = evaluation.evaluation_job(runs, PurePosixPath(EVALUATION_RUNS_FILE))
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    container["name"] = EVALUATE
    container["command"] = spec.command
    container["env"] = _sorted(_env(plan, first, EVALUATE))
    container["resources"] = _sorted(_resources(spec.resources))
    keys = sorted({key for f in files.values() for key in (*f.data, *f.binary_data)})
    sources = [{"configMap": {"name": name}}]
    sources += [
        {"configMap": {"name": Names.data(plan.experiment.name, key), "items": [{"key": key, "path": key}]}}
        for key in keys
    ]
    pod["volumes"] = [
        {"name": "config", "projected": {"sources": sources}} if v["name"] == "config" else v for v in pod["volumes"]
    ]
    rules = job["spec"]["podFailurePolicy"]["rules"]
    for rule in rules:
        if "onExitCodes" in rule:
            rule["onExitCodes"]["containerName"] = EVALUATE
    job["spec"]["activeDeadlineSeconds"] = spec.resources.time_limit_seconds
    template_labels = {**evaluation_labels(plan)}
    job["spec"]["template"]["metadata"] = {"labels": _sorted(template_labels), "annotations": _sorted(meta_annotations)}
    job_labels = dict(template_labels)
    job_annotations = {**meta_annotations, STARTS_AFTER_ANNOTATION: "training"}
    job["spec"]["suspend"] = True  # without Kueue: qlaunch resumes it; under Kueue: Kueue does
    if k8s.queue_name is not None:
        job_labels[QUEUE_LABEL] = k8s.queue_name
        job_annotations[ADMISSION_GATE_ANNOTATION] = TRAINING_GATE
    job["metadata"] = {
        "name": name,
        "namespace": k8s.namespace,
        "labels": _sorted(job_labels),
        "annotations": _sorted(job_annotations),
    }
    return [config_map, job]


def evaluation_release_patch(job: dict[str, Any]) -> dict[str, Any]:
    """The merge patch that releases the held grid evaluation Job: under Kueue, qlaunch's value
    leaves the admission gate annotation (the annotation goes with the last value) and Kueue,
    which owns spec.suspend, admits and resumes the Job; without Kueue, resume it."""
    meta = job.get("metadata") or {}
    if (meta.get("labels") or {}).get(QUEUE_LABEL) is not None or ADMISSION_GATE_ANNOTATION in (
        meta.get("annotations") or {}
    ):
        gates = [g.strip() for g in (meta.get("annotations") or {}).get(ADMISSION_GATE_ANNOTATION, "").split(",")]
        left = [g for g in gates if g and g != TRAINING_GATE]
        return {"metadata": {"annotations": {ADMISSION_GATE_ANNOTATION: ",".join(left) or None}}}
    return {"spec": {"suspend": False}}


def evaluation_held(job: dict[str, Any]) -> bool:
    """A grid evaluation Job qlaunch has not released yet."""
    meta = job.get("metadata") or {}
    gates = (meta.get("annotations") or {}).get(ADMISSION_GATE_ANNOTATION)
    if (meta.get("labels") or {}).get(QUEUE_LABEL) is not None:
        return TRAINING_GATE in [g.strip() for g in (gates or "").split(",")]
    return STARTS_AFTER_ANNOTATION in (meta.get("annotations") or {}) and bool((job.get("spec") or {}).get("suspend"))


def evaluated_ids(job: dict[str, Any]) -> list[str]:
    annotation = ((job.get("metadata") or {}).get("annotations") or {}).get(EVALUATES_ANNOTATION, "")
    return [run_id for run_id in annotation.split(",") if run_id]


# The output is always written by the pure-Python emitter so that the bytes never depend on how
# PyYAML was built.
class _Dumper(yaml.SafeDumper):
    """Block YAML with multi-line strings (run.yaml) as literal blocks, for review."""

    def ignore_aliases(self, data) -> bool:
        return True  # a value shared by two containers is written out twice, not as &id001


def _represent_str(dumper: yaml.SafeDumper, value: str):
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _represent_str)


def to_yaml(documents: list[dict[str, Any]]) -> str:
    return yaml.dump_all(
        documents, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=1000, explicit_start=True
    )


def file_text(plan: Plan, run_id: str, documents: list[dict[str, Any]], what: str | None = None) -> str:
    """The reviewable file of one run's objects (or, with `what`, of the grid's)."""
    header = (
        f"# qlaunch · experiment {plan.experiment.name} · {what or f'run {run_id}'}\n"
        f"# `qlaunch submit` applies these objects (server-side apply, field manager qlaunch).\n"
    )
    return header + to_yaml(documents)
