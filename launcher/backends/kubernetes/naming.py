"""Names, labels and annotations of the Kubernetes objects of a plan: which Job, ConfigMap and
Service belong to which run, and how qlaunch finds its objects again (labels)."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from ...grid import Plan
from ...job.config import RunConfig

LABEL_PREFIX = "qlaunch.dev"
EXPERIMENT_LABEL = f"{LABEL_PREFIX}/experiment"
RUN_LABEL = f"{LABEL_PREFIX}/run-id"
ROLE_LABEL = f"{LABEL_PREFIX}/role"
TRAIN, INFER = "train", "infer"
# The grid evaluation Job (one per grid, issue #29): its role label, and the run ids it evaluates.
EVALUATE = "evaluate"
EVALUATES_ANNOTATION = f"{LABEL_PREFIX}/evaluates"
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
# Kueue (0.19: beta, on by default) admits no Job whose annotation lists a gate; each
# controller removes its own value. qlaunch's: the grid's training Jobs have not all ended.
ADMISSION_GATE_ANNOTATION = "kueue.x-k8s.io/admission-gated-by"
TRAINING_GATE = f"{LABEL_PREFIX}/training"
# Set by the Job controller on every pod it creates (Kubernetes 1.27+).
JOB_UID_LABEL = "batch.kubernetes.io/controller-uid"
# Marks an inference Job that starts only when training releases it (see release_patch).
STARTS_AFTER_ANNOTATION = f"{LABEL_PREFIX}/starts-after"


@dataclass(frozen=True)
class Names:
    """Object names of one run: DNS-1123 labels of at most 63 characters, unique per run."""

    base: str

    @staticmethod
    def prefix(experiment: str) -> str:
        prefix = re.sub(r"[^a-z0-9-]+", "-", experiment.lower()).strip("-")
        # A Service name must start with a letter (DNS-1035); the experiment name may not.
        if not prefix or not prefix[0].isalpha():
            prefix = "q" + prefix
        # 40 + 1 + 10 run id leaves room for "-infer" and for the pods' "-<index>" hostnames.
        return prefix[:40].rstrip("-")

    @classmethod
    def of(cls, experiment: str, run_id: str) -> "Names":
        return cls(f"{cls.prefix(experiment)}-{run_id}")

    @staticmethod
    def data(experiment: str, config_key: str) -> str:
        """The ConfigMap holding one staged local file (launcher/backends/kubernetes/staging.py), named by
        its ConfigMap key, which holds the content's sha16: every run of the grid that reads the
        same bytes shares one copy."""
        # A hash of the key (data-<sha16>-<file name>): a DNS name, and the same bytes under two
        # file names are two keys, so two objects (immutable ones must never change content).
        return f"{Names.prefix(experiment)}-data-{hashlib.sha256(config_key.encode()).hexdigest()[:16]}"

    @property
    def train_job(self) -> str:
        return self.base

    @property
    def infer_job(self) -> str:
        return f"{self.base}-infer"

    @property
    def config(self) -> str:
        return f"{self.base}-run"

    @property
    def service(self) -> str:
        return self.base

    @property
    def handoff(self) -> str:
        """ServiceAccount, Role and RoleBinding of the training pod's hand-off to inference."""
        return f"{self.base}-handoff"

    def job(self, role: str) -> str:
        return self.train_job if role == TRAIN else self.infer_job


def names(plan: Plan, run: RunConfig) -> Names:
    return Names.of(plan.experiment.name, run.run_id)


def namespace_of(plan: Plan) -> str:
    return plan.runs[0].kubernetes.namespace if plan.runs else plan.experiment.kubernetes.namespace


def experiment_selector(plan: Plan) -> str:
    return f"{EXPERIMENT_LABEL}={plan.experiment.name}"
