"""What the Kubernetes backend checks of a plan before any API call: names the API would refuse,
quantities, mounts, secrets, the GPU type's node label; each error at `file:line: key`."""

from __future__ import annotations

import re
from pathlib import PurePosixPath
from typing import Callable

from ...grid import Plan
from ...job.config import RunConfig
from ...job.errors import ConfigError
from ...jobspec import inference_job
from .gpu_labels import NO_GPU_LABEL, UnknownGpuType, gpu_selector
from .staging import unmounted_folders

# Paths other volumes already use inside the pod.
_RESERVED_MOUNTS = ("/config", "/dev", "/home/qlaunch", "/proc", "/sys")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_LABEL_NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
_ENV_NAME = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")
_SECRET_KEY = re.compile(r"^[-._a-zA-Z0-9]+$")
_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$")


def _label_value_ok(value: str) -> bool:
    return value == "" or (len(value) <= 63 and bool(_LABEL_NAME.match(value)))


def _label_key_ok(key: str) -> bool:
    prefix, _, name = key.rpartition("/")
    if prefix and (len(prefix) > 253 or not _DNS_SUBDOMAIN.match(prefix)):
        return False
    return 0 < len(name) <= 63 and bool(_LABEL_NAME.match(name))


def _subdomain_ok(name: str) -> bool:
    return len(name) <= 253 and bool(_DNS_SUBDOMAIN.match(name))


def kube_memory(value: str) -> str:
    """Slurm-style sizes (32G = 32 GiB, a bare number = MiB) as a Kubernetes quantity."""
    number, unit = re.fullmatch(r"(\d+)([KMGT]?)", value).groups()
    return f"{number}{unit or 'M'}i"


def check_plan(plan: Plan) -> None:
    """Raise ConfigError (file:line: key: message) for anything the cluster would refuse."""
    where = plan.where
    problems: list[str] = []
    root = plan.experiment.storage.root
    posix_root = PurePosixPath(root)
    if not posix_root.is_absolute():
        problems.append(
            f"{where('storage.root')}: must be an absolute path for the kubernetes backend: it is "
            f"where the PVC is mounted inside every pod (e.g. /mnt/qlaunch), got {root!r}"
        )
    elif str(posix_root) == "/" or any(
        str(posix_root) == reserved or str(posix_root).startswith(reserved + "/") for reserved in _RESERVED_MOUNTS
    ):
        problems.append(
            f"{where('storage.root')}: {root!r} collides with a path the pod uses; "
            "choose a folder of its own such as /mnt/qlaunch"
        )
    namespaces = {run.kubernetes.namespace for run in plan.runs}
    if len(namespaces) > 1:
        problems.append(
            f"{where('kubernetes.namespace')}: all runs of one experiment must share a "
            f"namespace (the grid gives {sorted(namespaces)})"
        )
    seen: set[str] = set()
    for run in plan.runs:
        folders = [f"{where(key)}: {message}" for key, message in unmounted_folders(run, str(posix_root))]
        for message in _run_problems(run, where) + folders:
            if message not in seen:
                seen.add(message)
                problems.append(message)
    if problems:
        raise ConfigError("\n".join(problems))


def _run_problems(run: RunConfig, where: Callable[[str], str]) -> list[str]:
    k8s, problems = run.kubernetes, []
    if not (len(k8s.namespace) <= 63 and _DNS_LABEL.match(k8s.namespace)):
        problems.append(
            f"{where('kubernetes.namespace')}: {k8s.namespace!r} is not a valid namespace "
            "(at most 63 lowercase letters, digits and '-')"
        )
    if not _subdomain_ok(k8s.pvc):
        problems.append(
            f"{where('kubernetes.pvc')}: {k8s.pvc!r} is not a valid claim name (lowercase letters, digits, '-' and '.')"
        )
    if not k8s.image.strip():
        problems.append(f"{where('kubernetes.image')}: the image must not be empty")
    if k8s.service_account is not None and not _subdomain_ok(k8s.service_account):
        problems.append(f"{where('kubernetes.service_account')}: {k8s.service_account!r} is not a valid name")
    if k8s.queue_name is not None and not (k8s.queue_name and _label_value_ok(k8s.queue_name)):
        problems.append(
            f"{where('kubernetes.queue_name')}: {k8s.queue_name!r} is not a valid Kueue "
            "queue name (a label value: at most 63 letters, digits, '-', '_' and '.')"
        )
    if k8s.priority_class is not None and not _subdomain_ok(k8s.priority_class):
        problems.append(
            f"{where('kubernetes.priority_class')}: {k8s.priority_class!r} is not a valid "
            "PriorityClass name (lowercase letters, digits, '-' and '.')"
        )
    secret = k8s.hf_token_secret
    if secret is not None:
        if not _subdomain_ok(secret.name):
            problems.append(f"{where('kubernetes.hf_token_secret.name')}: {secret.name!r} is not a valid Secret name")
        if not _SECRET_KEY.match(secret.key):
            problems.append(
                f"{where('kubernetes.hf_token_secret.key')}: {secret.key!r} is not a valid "
                "Secret key (letters, digits, '-', '_' and '.')"
            )
    if not _QUANTITY.match(k8s.shm_size):
        problems.append(
            f"{where('kubernetes.shm_size')}: {k8s.shm_size!r} is not a Kubernetes quantity (e.g. 8Gi or 512Mi)"
        )
    if k8s.gpu_node_label != NO_GPU_LABEL and not _label_key_ok(k8s.gpu_node_label):
        problems.append(
            f"{where('kubernetes.gpu_node_label')}: {k8s.gpu_node_label!r} is not a valid node label key (or none)"
        )
    elif run.resources.gpus_per_node > 0:
        try:
            for key, value in gpu_selector(k8s.gpu_node_label, run.resources.gpu_type).items():
                if not _label_value_ok(value):
                    problems.append(
                        f"{where('resources.gpu_type')}: {value!r} is not a valid value "
                        f"for node label {key} (kubernetes.gpu_node_label)"
                    )
        except UnknownGpuType as error:
            problems.append(
                f"{where('resources.gpu_type')}: {error} "
                f"(kubernetes.gpu_node_label at {where('kubernetes.gpu_node_label')})"
            )
    for key, value in k8s.node_selector.items():
        if not _label_key_ok(key) or not _label_value_ok(value):
            problems.append(
                f"{where('kubernetes.node_selector')}: {key}: {value!r} is not a valid "
                "node label (values: at most 63 letters, digits, '-', '_' and '.')"
            )
    for index, toleration in enumerate(k8s.tolerations):
        if not _label_key_ok(toleration.key):
            problems.append(
                f"{where(f'kubernetes.tolerations.{index}')}: key {toleration.key!r} is not a valid taint key"
            )
        if toleration.operator == "Exists" and toleration.value:
            problems.append(
                f"{where(f'kubernetes.tolerations.{index}')}: operator Exists takes no value (use operator: Equal)"
            )
        if toleration.value and not _label_value_ok(toleration.value):
            problems.append(
                f"{where(f'kubernetes.tolerations.{index}')}: value {toleration.value!r} is not a valid taint value"
            )
    if run.resources.time_limit_seconds() <= 0:
        problems.append(f"{where('resources.time_limit')}: must be longer than 0 seconds")
    if run.inference.enabled and inference_job(run).resources.time_limit_seconds <= 0:
        problems.append(f"{where('inference.resources.time_limit')}: must be longer than 0 seconds")
    env_names = [run.model.hf_token_env] if secret is not None else []
    env_names += list(run.environment.variables)
    for name in env_names:
        if not _ENV_NAME.match(name):
            key = "model.hf_token_env" if name == run.model.hf_token_env else f"environment.variables.{name}"
            problems.append(f"{where(key)}: {name!r} is not a valid environment variable name")
    for index, extra in enumerate(k8s.secrets):
        at = f"kubernetes.secrets.{index}"
        if not _ENV_NAME.match(extra.env):
            problems.append(f"{where(at + '.env')}: {extra.env!r} is not a valid environment variable name")
        if not _subdomain_ok(extra.name):
            problems.append(f"{where(at + '.name')}: {extra.name!r} is not a valid Secret name")
        if not _SECRET_KEY.match(extra.key):
            problems.append(f"{where(at + '.key')}: {extra.key!r} is not a valid Secret key")
        if extra.env in run.environment.variables:
            problems.append(f"{where('environment.variables')}: {extra.env} comes from {at}; do not set it here too")
    if secret is not None and run.model.hf_token_env in run.environment.variables:
        problems.append(
            f"{where('environment.variables')}: {run.model.hf_token_env} comes from "
            "kubernetes.hf_token_secret; do not set it here too"
        )
    return problems
