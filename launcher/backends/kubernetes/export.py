"""`qlaunch export --backend kubernetes`: the export as one batch/v1 Job (issue #32).

The Job is the run's inference Job's twin (manifests._job: same image, pod and container
security contexts, the claim at storage.root, the run's ConfigMap at /config, the hub token only
as a secretKeyRef of kubernetes.hf_token_secret, labels, ttlSecondsAfterFinished, backoffLimit)
with the export's own command and resources: a CPU pod (the merge holds the model in host memory:
jobspec.export_resources' memory, or --memory), so it tolerates no GPU taint and asks for no GPU
node. Its container runs, in a shell with every word quoted, the steps the Slurm export script runs:
[the hub's answer on the token, before anything is merged,] `python -m training.export`, then
`python -m launcher.export_command --finish` (the push and `<run dir>/exports.json` on the claim,
and one progress line with the record: how `qlaunch status`/`report` see it from the pod log).

One Job per run and output folder (`<run>-x<4 hex of the folder>`): exporting the same folder again
replaces that Job, another folder (`-o`) gets its own; `qlaunch logs RUN --export` follows the
newest.
"""

from __future__ import annotations

import hashlib
import shlex
from dataclasses import replace
from pathlib import PurePosixPath
from typing import Any

from ...grid import Plan
from ...job.config import RunConfig
from ...job.errors import ConfigError
from ...jobspec import JobSpec
from . import manifests
from .naming import EXPERIMENT_LABEL, QUEUE_LABEL, RUN_LABEL, STARTS_AFTER_ANNOTATION, names
from .staging import CONFIG_MOUNT

EXPORT = "export"
# training.export's own failures (a refused merge check, bad input): running it again gives the
# same answer, so the Job fails at once instead of retrying up to backoffLimit.
EXIT_REFUSED = (1, 2)
POD_RUN_YAML = f"{CONFIG_MOUNT}/run.yaml"


def export_job_name(plan: Plan, run: RunConfig, out: str) -> str:
    """`<experiment>-<run id>-x<4 hex>`: at most 40 + 11 + 6 characters (a DNS label)."""
    return f"{names(plan, run).base}-x{hashlib.sha256(out.encode()).hexdigest()[:4]}"


def export_selector(plan: Plan, run: RunConfig) -> str:
    return f"{EXPERIMENT_LABEL}={plan.experiment.name},{RUN_LABEL}={run.run_id},{manifests.ROLE_LABEL}={EXPORT}"


def check_output(plan: Plan, out: str) -> None:
    """The export folder must be on the claim: the pod writes nowhere else that outlives it."""
    root, folder = PurePosixPath(str(plan.storage_root)), PurePosixPath(out)
    if folder != root and root not in folder.parents:
        raise ConfigError(
            f"-o {out}: the export Job writes into the storage claim, mounted at {root} in its pod: "
            f"give a folder under {root} (default: the run folder's export/)"
        )


def pod_command(job: JobSpec, finish: list[str], push_repo: str | None) -> list[str]:
    """The container's command: the export's steps in one shell, each word quoted, the last exec'd
    (its exit code is the pod's)."""
    pod_job = job.placed(run_yaml=POD_RUN_YAML)
    pod_finish = [POD_RUN_YAML if part == job.run_yaml else part for part in finish]
    steps = []
    if push_repo:
        # The token is the Secret's, which never leaves the cluster: the pod asks the hub.
        steps.append(
            [job.python, "-m", "launcher.export_command", "--check-push", POD_RUN_YAML, "--push-to-hub", push_repo]
        )
    steps.append(pod_job.command)
    script = " && ".join(shlex.join(step) for step in steps) + " && exec " + shlex.join(pod_finish)
    return ["/bin/sh", "-c", script]


def export_document(
    plan: Plan, run: RunConfig, job: JobSpec, finish: list[str], push_repo: str | None
) -> dict[str, Any]:
    """The export Job of `run` (job: jobspec.export_job; finish: export_finish_command)."""
    check_output(plan, job.args[job.args.index("--out") + 1])
    k8s = run.kubernetes
    resources = replace(job.resources, gpus_per_node=0)  # the merge runs in host memory: a CPU pod
    document = manifests._job(plan, run, manifests.INFER)
    name = export_job_name(plan, run, job.args[job.args.index("--out") + 1])
    role_labels = {**manifests.labels(plan, run, EXPORT)}
    job_labels = dict(role_labels)
    spec = document["spec"]
    spec.pop("suspend", None)  # starts at once (under Kueue: once the queue admits it)
    if k8s.queue_name is not None:
        job_labels[QUEUE_LABEL] = k8s.queue_name
        spec["suspend"] = True
    spec["activeDeadlineSeconds"] = resources.time_limit_seconds
    spec["podFailurePolicy"] = {
        "rules": [
            {
                "action": "FailJob",
                "onExitCodes": {"containerName": EXPORT, "operator": "In", "values": list(EXIT_REFUSED)},
            },
            # Preemption, eviction, a drained node: the export runs again in a new pod (it writes
            # aside and renames into place, so a stopped one leaves nothing half-written).
            {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
        ]
    }
    # No GPU: no GPU node label, and not the GPU taint's toleration (a CPU pod must not take a
    # GPU node's CPUs and memory from the GPU jobs); the user's own selector and tolerations stay.
    placement = {"nodeSelector": manifests._sorted(dict(k8s.node_selector))} if k8s.node_selector else {}
    if tolerations := manifests.pod_tolerations(run, 0):
        placement["tolerations"] = manifests._sorted(tolerations)
    pod: dict[str, Any] = {}
    for key, value in spec["template"]["spec"].items():
        if key == "securityContext":  # where _job puts them
            pod.update(placement)
        if key not in ("nodeSelector", "tolerations"):
            pod[key] = value
    spec["template"]["spec"] = pod
    (container,) = pod["containers"]
    container["name"] = EXPORT
    container["command"] = pod_command(job, finish, push_repo)
    container["env"] = manifests._sorted(manifests._env(plan, run, EXPORT))
    container["resources"] = manifests._sorted(manifests._resources(resources))
    spec["template"]["metadata"]["labels"] = manifests._sorted(role_labels)
    metadata = manifests._metadata(plan, run, name, job_labels)
    metadata["annotations"] = {k: v for k, v in metadata["annotations"].items() if k != STARTS_AFTER_ANNOTATION}
    document["metadata"] = metadata
    return document


def file_text(plan: Plan, run: RunConfig, document: dict[str, Any]) -> str:
    """The reviewable manifest `qlaunch export --dry-run` prints."""
    header = (
        f"# qlaunch · experiment {plan.experiment.name} · export of run {run.run_id}\n"
        "# `qlaunch export` creates this Job (server-side apply, field manager qlaunch).\n"
    )
    return header + manifests.to_yaml([document])
