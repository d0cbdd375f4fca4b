"""The Kubernetes backend: each run is a ConfigMap (run.yaml) and a training Job on a T4 node
pool; the grid gets one evaluation Job (manifests.evaluation_documents), held until every
training Job has ended and then released by reconcile(). With `inference.per_run: true` each run
gets instead a suspended inference Job that training starts when it has written the adapter
(through the run's hand-off ServiceAccount and Role). All on one ReadWriteMany PVC mounted at
storage.root. Objects are sent with server-side apply (field manager `qlaunch`), so submitting
again is idempotent.

submit: render and check every object → GET namespace, PVC and token Secret (say which is
missing) → one list of the experiment's Jobs → server-side dry run of every object → stage
local data files onto the claim (staging, upload) → apply.
status: one Job list and one Pod list per refresh, whatever the grid size.
progress_events(plan) → {run id: [progress events]} from the pods' logs (the laptop cannot read
the PVC); the status table summarizes them with launcher.job.progress.summarize.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from ...grid import Plan
from ...job.config import RunConfig
from ...job.errors import BackendError, QlaunchError
from ...job.run_checks import Finding
from ...jobspec import JobSpec
from ..base import Backend, ExportSubmission, Foreground, RunStatus, State, Submission, SubmitReport
from . import checks, manifests, naming
from . import export as export_manifest
from .client import APPLY_PATCH, FIELD_MANAGER, MERGE_PATCH, Kube, KubeApiError
from .logs import LogFollower, ProgressReader
from .staging import LocalFile, describe_size, local_sources, plan_uploads, run_files, unmounted_folders
from .state import completion_index, created, job_state, owned_by
from .upload import Stager, stage_pod, stage_pod_name

Obj = dict[str, Any]
DRY_RUN = "All"
# kind → (Kube attribute, client method) that applies (and deletes, with "patch" → "delete") it
_APPLY_METHODS = {
    "ConfigMap": ("core", "patch_namespaced_config_map"),
    "Service": ("core", "patch_namespaced_service"),
    "Pod": ("core", "patch_namespaced_pod"),  # the short-lived staging pod (upload.py)
    "ServiceAccount": ("core", "patch_namespaced_service_account"),
    "Role": ("rbac", "patch_namespaced_role"),
    "RoleBinding": ("rbac", "patch_namespaced_role_binding"),
    "Job": ("batch", "patch_namespaced_job"),
}


@dataclass(frozen=True)
class _Request:
    """The Kubernetes side of a Submission: every run's objects and, per run and role, None
    (keep), "create" or "replace"."""

    plan: Plan
    namespace: str
    documents: dict[str, list[Obj]]
    actions: dict[str, dict[str, str | None]]
    # Runs whose training has completed, so nothing will release their inference Job (a
    # failed hand-off, or an inference Job replaced after training): apply() starts it.
    releases: list[str] = field(default_factory=list)
    # Per claim: the local files to stage onto it before any Job (launcher/backends/kubernetes/upload.py).
    uploads: dict[str, list[LocalFile]] = field(default_factory=dict)
    # The grid evaluation Job's objects (ConfigMap, Job), what to do with it (None: keep, "create"
    # or "replace") and whether to release it once applied (every training Job had ended).
    evaluation: list[Obj] = field(default_factory=list)
    evaluation_action: str | None = None
    evaluation_release: bool = False

    def job_name(self, run_id: str, role: str) -> str:
        run = next(r for r in self.plan.runs if r.run_id == run_id)
        return naming.names(self.plan, run).job(role)

    def replacing(self, run_id: str) -> list[str]:
        return [self.job_name(run_id, role) for role, action in self.actions[run_id].items() if action == "replace"]

    def selected(self, run_id: str, replaceable: bool) -> list[Obj]:
        todo, out = self.actions[run_id], []
        for doc in self.documents[run_id]:
            role = (doc["metadata"].get("labels") or {}).get(naming.ROLE_LABEL)
            if role is None or todo.get(role) == "create" or (replaceable and todo.get(role) == "replace"):
                out.append(doc)
        return out


class KubernetesBackend(Backend):
    name = "kubernetes"
    shares_storage = False  # the jobs' storage is a claim this machine does not mount
    # One evaluation Job per grid, held until every training Job of the grid has ended and then
    # released by reconcile() (status, status --watch, submit); `inference.per_run: true` keeps
    # one inference Job per run, released by its own trainer (training/handoff.py).
    grid_evaluation = True

    @classmethod
    def connect(cls, kubeconfig: str | None = None, context: str | None = None) -> "KubernetesBackend":
        return cls(kubeconfig, context)

    @classmethod
    def job_view(cls, run: RunConfig, storage_root: Path) -> RunConfig:
        """A pod resolves relative paths on the claim (manifests.pod_run_config), except the local
        files `qlaunch submit` stages there (staging.py): those are checked where they are."""
        sections: dict[str, dict[str, str]] = {}
        for dotted, path in local_sources(run, str(storage_root)).items():
            section, key = dotted.split(".")
            sections.setdefault(section, {})[key] = str(path)
        update = {section: getattr(run, section).model_copy(update=values) for section, values in sections.items()}
        return run.model_copy(update={"experiment_dir": str(storage_root), **update})

    @classmethod
    def input_findings(cls, run: RunConfig, storage_root: Path) -> list[Finding]:
        findings = [Finding(key, message) for key, message in unmounted_folders(run, str(storage_root))]
        if run.environment.setup:
            findings.append(
                Finding(
                    "environment.setup",
                    "Slurm's: the pods start from kubernetes.image and do not "
                    "run these lines (their run.yaml leaves them out)",
                    level="info",
                )
            )
        return findings

    def __init__(
        self,
        kubeconfig: str | None = None,
        context: str | None = None,
        *,
        poll_seconds: float = 2.0,
        delete_timeout: float | None = None,
    ):
        self.kube = Kube(kubeconfig, context)
        self.poll_seconds = poll_seconds
        self.delete_timeout = delete_timeout
        self._progress = ProgressReader(self.kube)
        # Run id → why starting its inference Job was refused (shown instead of "waiting").
        self.release_errors: dict[str, str] = {}
        # The last (time, experiment, jobs, pods) lists: progress_events right after status (one
        # table refresh) reuses them instead of listing again.
        self._snapshot: tuple[float, str, list[Obj], list[Obj]] | None = None

    # -- API helpers -------------------------------------------------------------------------

    def _apply(self, doc: Obj, dry_run: bool) -> Obj:
        kind, meta = doc["kind"], doc["metadata"]
        api, name = _APPLY_METHODS[kind]
        method = getattr(getattr(self.kube, api), name)
        return self.kube.call(
            method,
            meta["name"],
            meta["namespace"],
            doc,
            field_manager=FIELD_MANAGER,
            force=True,
            dry_run=DRY_RUN if dry_run else None,
            _content_type=APPLY_PATCH,
            what=f"applying {kind} {meta['name']}",
        )

    def _dry_run(self, doc: Obj) -> None:
        try:
            self._apply(doc, dry_run=True)
        except KubeApiError as exc:
            if exc.status == 403 and doc["kind"] in ("ServiceAccount", "Role", "RoleBinding"):
                raise BackendError(
                    f"{exc}\nEach run gets a ServiceAccount, Role and RoleBinding so that its training pod "
                    "can start its suspended inference Job (README: Kubernetes, inference). Creating them "
                    "needs the namespace's admin role (the edit role cannot); ask for it, or set "
                    "inference.enabled: false"
                ) from None
            raise

    def _list(self, plan: Plan, kind: str) -> list[Obj]:
        namespace = naming.namespace_of(plan)
        method = self.kube.batch.list_namespaced_job if kind == "jobs" else self.kube.core.list_namespaced_pod
        listing = self.kube.call(
            method,
            namespace,
            label_selector=naming.experiment_selector(plan),
            what=f"listing {kind} in namespace {namespace!r}",
        )
        return listing.get("items") or []

    def _lists(self, plan: Plan, reuse: bool = False) -> tuple[list[Obj], list[Obj]]:
        """The experiment's Jobs and Pods. status() keeps them for one following
        progress_events() (one table refresh = one list of each kind)."""
        key = f"{naming.namespace_of(plan)}/{plan.experiment.name}"
        snap, self._snapshot = self._snapshot, None
        if reuse and snap and snap[1] == key and time.monotonic() - snap[0] <= 5.0:
            return snap[2], snap[3]
        jobs, pods = self._list(plan, "jobs"), self._list(plan, "pods")
        if not reuse:
            self._snapshot = (time.monotonic(), key, jobs, pods)
        return jobs, pods

    @staticmethod
    def _by_run(plan: Plan, objects: list[Obj]) -> dict[tuple[str, str], Obj]:
        """(run id, role) → object; of two (a Job being replaced), the newer one."""
        ids = {run.run_id for run in plan.runs}
        result: dict[tuple[str, str], Obj] = {}
        for obj in sorted(objects, key=created):
            labels = obj["metadata"].get("labels") or {}
            run_id, role = labels.get(naming.RUN_LABEL), labels.get(naming.ROLE_LABEL)
            if run_id in ids and role:
                result[(run_id, role)] = obj
        return result

    def _preflight(self, plan: Plan) -> None:
        """The namespace, the claim and the token Secret must exist before anything is created."""
        namespace = naming.namespace_of(plan)
        core = self.kube.core
        try:
            found = self.kube.call(
                core.read_namespace, namespace, missing_ok=True, what=f"reading namespace {namespace!r}"
            )
        except KubeApiError as exc:
            if exc.status != 403:  # many users may not read Namespace objects; the GETs below tell
                raise
            found = True
        if found is None:
            raise BackendError(
                f"namespace {namespace!r} (kubernetes.namespace) does not exist: create it, and the "
                f"ReadWriteMany claim {plan.runs[0].kubernetes.pvc!r} in it, before submitting"
            )
        for pvc in sorted({run.kubernetes.pvc for run in plan.runs}):
            claim = self.kube.call(
                core.read_namespaced_persistent_volume_claim,
                pvc,
                namespace,
                missing_ok=True,
                what=f"reading PVC {pvc!r}",
            )
            if claim is None:
                raise BackendError(
                    f"PersistentVolumeClaim {pvc!r} (kubernetes.pvc) not found in namespace "
                    f"{namespace!r}: create a ReadWriteMany claim with that name (it is mounted at "
                    f"{plan.storage_root} in every pod)"
                )
            modes = (claim.get("spec") or {}).get("accessModes") or []
            if "ReadWriteMany" not in modes:
                raise BackendError(
                    f"PersistentVolumeClaim {pvc!r} (kubernetes.pvc) is {', '.join(modes) or 'without access modes'}; "
                    "qlaunch needs ReadWriteMany: training, inference and replacement pods mount it "
                    "from different nodes"
                )
        secrets = {run.kubernetes.hf_token_secret.name for run in plan.runs if run.kubernetes.hf_token_secret}
        for name in sorted(secrets):
            try:
                # Metadata only: the token never leaves the cluster, not even into this process.
                found = self.kube.call(
                    core.read_namespaced_secret,
                    name,
                    namespace,
                    missing_ok=True,
                    _headers={"Accept": "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1"},
                    what=f"checking Secret {name!r}",
                )
            except KubeApiError as exc:
                if exc.status == 403:  # pods may use a Secret their submitter cannot read
                    continue
                raise
            if found is None:
                raise BackendError(
                    f"Secret {name!r} (kubernetes.hf_token_secret) not found in namespace {namespace!r}: "
                    f"create it with `kubectl -n {namespace} create secret generic {name} "
                    f"--from-literal=token=$HF_TOKEN`"
                )

    def _delete_job(self, namespace: str, name: str, dry_run: bool = False) -> bool:
        # Foreground: the Job object stays until its pods are gone, so nothing is left running
        # and a resubmission cannot start a second trainer on the same run folder.
        result = self.kube.call(
            self.kube.batch.delete_namespaced_job,
            name,
            namespace,
            propagation_policy="Foreground",
            dry_run=DRY_RUN if dry_run else None,
            missing_ok=True,
            what=f"deleting Job {name}",
        )
        return result is not None

    def _wait_gone(self, namespace: str, names: list[str], grace: int) -> None:
        timeout = self.delete_timeout if self.delete_timeout is not None else grace + 120
        deadline = time.monotonic() + timeout
        for name in names:
            while (
                self.kube.call(
                    self.kube.batch.read_namespaced_job,
                    name,
                    namespace,
                    missing_ok=True,
                    what=f"waiting for Job {name} to be deleted",
                )
                is not None
            ):
                if time.monotonic() > deadline:
                    raise BackendError(
                        f"Job {name} is still being deleted after {timeout:.0f}s (its pod is saving "
                        "a checkpoint or is stuck); submit again once `kubectl get job` no longer shows it"
                    )
                time.sleep(self.poll_seconds)

    # -- submit ------------------------------------------------------------------------------

    def prepare(self, plan: Plan, *, force: bool = False, offline: bool = False) -> Submission:
        """Render and check every object; then (unless offline, `--dry-run client`) check the
        namespace, PVC and Secret, decide per run and role create / replace / keep from one
        Job list, and let the API server validate every object (server-side dry run)."""
        checks.check_plan(plan)
        documents = {run.run_id: manifests.run_documents(plan, run) for run in plan.runs}
        files = {f"{run_id}.yaml": manifests.file_text(plan, run_id, docs) for run_id, docs in documents.items()}
        graded = manifests.evaluated_runs(plan)
        evaluation_docs = manifests.evaluation_documents(plan, graded) if graded else []
        evaluation_name = manifests.evaluation_name(plan)
        if evaluation_docs:
            files[f"{naming.EVALUATE}.yaml"] = manifests.file_text(
                plan, "", evaluation_docs, what=f"grid evaluation of {len(graded)} runs"
            )
        shared = f"{evaluation_name} (grid evaluation, after every training Job)"
        namespace = naming.namespace_of(plan)
        if offline or not plan.runs:
            jobs = {
                run_id: [d["metadata"]["name"] for d in docs if d["kind"] == "Job"]
                for run_id, docs in documents.items()
            }
            for run in graded:
                jobs[run.run_id].append(shared)
            checked = "not sent to the API server (client-side dry run)" + _staging_note(self._uploads(plan, plan.runs))
            return Submission(self.name, files, jobs, {}, checked, request=_Request(plan, namespace, {}, {}))

        self._preflight(plan)
        job_list = self._list(plan, "jobs")
        existing = self._by_run(plan, job_list)
        pods = self._list(plan, "pods")

        # What each run needs: None (keep), "create" or "replace" per role.
        actions: dict[str, dict[str, str | None]] = {}
        skipped: dict[str, str] = {}
        releases: list[str] = []
        for run in plan.runs:
            train = existing.get((run.run_id, naming.TRAIN))
            infer = existing.get((run.run_id, naming.INFER))
            train_state = job_state(train, [p for p in pods if train and owned_by(p, train)])[0]
            todo: dict[str, str | None] = {naming.TRAIN: None, naming.INFER: None}
            if train is None:
                todo[naming.TRAIN] = "create"
            elif force or not (train_state.active or train_state == State.COMPLETED):
                todo[naming.TRAIN] = "replace"
            if manifests.hands_off(run):
                infer_state = job_state(infer, [p for p in pods if infer and owned_by(p, infer)])[0]
                if infer is None:
                    todo[naming.INFER] = "create"
                elif todo[naming.TRAIN] or not (infer_state.active or infer_state == State.COMPLETED):
                    todo[naming.INFER] = "replace"  # a new training run gets a new inference
            if (
                train_state == State.COMPLETED
                and not todo[naming.TRAIN]
                and manifests.hands_off(run)
                and (todo[naming.INFER] or (infer is not None and manifests.awaiting_release(infer)))
            ):
                releases.append(run.run_id)
            if not any(todo.values()):
                skipped[run.run_id] = (
                    f"training Job {naming.names(plan, run).train_job} is {train_state.value} "
                    "(--force replaces it; it resumes from its newest checkpoint)"
                )
                continue
            actions[run.run_id] = todo
        uploads = self._uploads(plan, [run for run in plan.runs if run.run_id in actions])
        action, release = self._evaluation_action(plan, graded, job_list, pods, actions, existing, force)
        for run in graded:
            if action and run.run_id in skipped:
                skipped[run.run_id] += f"; grid evaluation Job {evaluation_name} {action}d"
        request = _Request(plan, namespace, documents, actions, releases, uploads, evaluation_docs, action, release)

        # The server validates every object (admission, quotas, schema) before any is stored; a
        # Job about to be replaced cannot be dry-run against its old, immutable self, but its
        # deletion can.
        checked_docs: set[tuple[str, str]] = set()
        for run_id in actions:
            for doc in request.selected(run_id, replaceable=False):
                if _first_time(doc, checked_docs):  # a grid's shared data ConfigMaps once
                    self._dry_run(doc)
            for name in request.replacing(run_id):
                self._delete_job(namespace, name, dry_run=True)
        if action:
            for doc in evaluation_docs:
                if doc["kind"] != "Job" or action == "create":
                    self._dry_run(doc)
            if action == "replace":
                self._delete_job(namespace, evaluation_name, dry_run=True)
        for pvc in uploads:  # the staging pod too (an admission policy may refuse it)
            run = next(r for r in plan.runs if r.kubernetes.pvc == pvc)
            self._apply(stage_pod(plan, run, stage_pod_name()), dry_run=True)
        jobs = {
            run_id: [
                f"{request.job_name(run_id, role)}{' (replace)' if action == 'replace' else ''}"
                for role, action in todo.items()
                if action
            ]
            for run_id, todo in actions.items()
        }
        if action:
            for run in graded:
                if run.run_id in jobs:
                    jobs[run.run_id].append(shared + (" (replace)" if action == "replace" else ""))
        checked = "validated by the API server (server-side dry run)" + _staging_note(uploads)
        return Submission(self.name, files, jobs, skipped, checked, request=request)

    def _evaluation_action(
        self,
        plan: Plan,
        graded: list[RunConfig],
        job_list: list[Obj],
        pods: list[Obj],
        actions: dict[str, dict[str, str | None]],
        existing: dict[tuple[str, str], Obj],
        force: bool,
    ) -> tuple[str | None, bool]:
        """(None: keep, "create" or "replace" the grid evaluation Job; release it once applied).
        Kept while it evaluates the same runs and none of their training is submitted again
        (`submit` twice never makes a second one); a held one stays held while any trains."""
        if not graded:
            return None, False
        current = self._evaluation_job(job_list)
        trained_again = any((actions.get(run.run_id) or {}).get(naming.TRAIN) for run in graded)
        same_runs = current is not None and manifests.evaluated_ids(current) == [run.run_id for run in graded]
        if current is None:
            action = "create"
        elif not same_runs or (trained_again and not manifests.evaluation_held(current)):
            action = "replace"
        else:
            action = None
        trains = [existing.get((run.run_id, naming.TRAIN)) for run in graded]
        ended = not trained_again and all(
            train is None or not job_state(train, [p for p in pods if owned_by(p, train)])[0].active for train in trains
        )
        held = action is not None or (current is not None and manifests.evaluation_held(current))
        return action, held and ended and any(train is not None for train in trains)

    @staticmethod
    def _evaluation_job(job_list: list[Obj]) -> Obj | None:
        """The experiment's grid evaluation Job (of two, the newer: one being replaced)."""
        found = [
            job
            for job in job_list
            if ((job.get("metadata") or {}).get("labels") or {}).get(naming.ROLE_LABEL) == naming.EVALUATE
        ]
        return sorted(found, key=created)[-1] if found else None

    def _release_evaluation(self, plan: Plan, job: Obj) -> bool:
        """Start the held grid evaluation Job, as the submitter: under Kueue remove qlaunch's
        admission gate (Kueue owns spec.suspend), else resume it. A refusal is kept for status."""
        if self._patch_held(job, manifests.evaluation_release_patch(job), naming.EVALUATE, "grid evaluation") is None:
            return False
        self.release_errors.pop(naming.EVALUATE, None)
        return True

    def apply(self, submission: Submission, options: Foreground | None = None) -> SubmitReport:
        request: _Request = submission.request
        report = SubmitReport(skipped=dict(submission.skipped))
        plan, namespace = request.plan, request.namespace
        # 0. Local data files onto the claim: a failure here leaves the cluster as it was.
        for pvc, files in request.uploads.items():
            run = next(r for r in plan.runs if r.kubernetes.pvc == pvc)
            Stager(self.kube, self.poll_seconds).stage(plan, run, files, lambda line: print(line, file=sys.stderr))
        # 1. Jobs to replace are deleted and gone (pods included) before their successors exist.
        replacing = []
        for run_id in request.actions:
            for name in request.replacing(run_id):
                self._delete_job(namespace, name)
                replacing.append(name)
        if request.evaluation_action == "replace":
            name = manifests.evaluation_name(plan)
            self._delete_job(namespace, name)
            replacing.append(name)
        if replacing:
            grace = max(run.kubernetes.termination_grace_period_seconds for run in plan.runs)
            self._wait_gone(namespace, replacing, grace)

        # 2. Apply: per run the ConfigMaps (and Service) first, then its Jobs; a data ConfigMap
        # the grid's runs share, once.
        applied: set[tuple[str, str]] = set()
        for run_id in request.actions:
            for doc in request.selected(run_id, replaceable=True):
                if _first_time(doc, applied):
                    self._apply(doc, dry_run=False)
            report.submitted[run_id] = [
                doc["metadata"]["name"] for doc in request.selected(run_id, replaceable=True) if doc["kind"] == "Job"
            ]
        # 2b. The grid evaluation Job, held (after its ConfigMap), once the runs' Jobs exist.
        if request.evaluation_action:
            for doc in request.evaluation:
                self._apply(doc, dry_run=False)
            name = manifests.evaluation_name(plan)
            for run in manifests.evaluated_runs(plan):
                if run.run_id in report.submitted:
                    report.submitted[run.run_id].append(name)
        if request.evaluation_release:
            # Every training Job had ended: nothing else will. Read again first: `qlaunch submit`
            # reconciles between prepare and apply, and the release happens once.
            name = manifests.evaluation_name(plan)
            current = self.kube.call(
                self.kube.batch.read_namespaced_job, name, namespace, missing_ok=True, what=f"reading Job {name}"
            )
            if current is not None and manifests.evaluation_held(current):
                self._release_evaluation(plan, current)
        # 3. Training done, so no trainer will release the inference Job: start it now.
        for run in plan.runs:
            if run.run_id in request.releases:
                name = naming.names(plan, run).infer_job
                self._release(run, {"metadata": {"name": name, "namespace": namespace}})
                if run.run_id in report.skipped and run.run_id not in self.release_errors:
                    report.skipped[run.run_id] += f"; inference Job {name} started (training had completed)"
        return report

    @staticmethod
    def _uploads(plan: Plan, runs) -> dict[str, list[LocalFile]]:
        """Per claim, the distinct local files these runs read that go onto it (not in a ConfigMap)."""
        by_claim: dict[str, list] = {}
        for run in runs:
            by_claim.setdefault(run.kubernetes.pvc, []).append(run_files(run, str(plan.storage_root)))
        return {pvc: found for pvc, listed in by_claim.items() if (found := plan_uploads(listed))}

    def submit(self, plan: Plan, *, force: bool = False, dry_run: bool | str = False) -> SubmitReport:
        """dry_run=True (or "server"): the API server validates every object, nothing is stored;
        dry_run="client": local checks and rendering only, no API call."""
        submission = self.prepare(plan, force=force, offline=dry_run == "client")
        if dry_run:
            return SubmitReport(
                submitted={r: [j.removesuffix(" (replace)") for j in jobs] for r, jobs in submission.jobs.items()},
                skipped=dict(submission.skipped),
            )
        return self.apply(submission)

    # -- status ------------------------------------------------------------------------------

    def reconcile(self, plan: Plan) -> list[str]:
        """Starts each inference Job whose training completed but that was not released (the
        trainer's hand-off failed, or it ran before this qlaunch), as the submitter; returns
        their names. A refusal (no patch permission) is kept for `status` to show."""
        job_list, pods = self._lists(plan)
        jobs = self._by_run(plan, job_list)
        released = []
        for run in plan.runs:
            train, infer = jobs.get((run.run_id, naming.TRAIN)), jobs.get((run.run_id, naming.INFER))
            if train is None or infer is None or not manifests.awaiting_release(infer):
                continue
            if job_state(train, pods)[0] == State.COMPLETED and self._release(run, infer) is not infer:
                released.append(infer["metadata"]["name"])
        evaluation = self._evaluation_job(job_list)
        if (
            evaluation is not None
            and manifests.evaluation_held(evaluation)
            and self._training_ended(plan, evaluation, jobs, pods)
        ):
            if self._release_evaluation(plan, evaluation):
                released.append(evaluation["metadata"]["name"])
        return released

    @staticmethod
    def _still_training(plan: Plan, evaluation: Obj, jobs: dict[tuple[str, str], Obj], pods: list[Obj]) -> list[str]:
        """The runs the grid evaluation Job evaluates whose training Job has not ended."""
        ids = {run.run_id for run in plan.runs}
        return [
            run_id
            for run_id in manifests.evaluated_ids(evaluation)
            if run_id in ids
            and (train := jobs.get((run_id, naming.TRAIN))) is not None
            and job_state(train, pods)[0].active
        ]

    def _training_ended(self, plan: Plan, evaluation: Obj, jobs: dict[tuple[str, str], Obj], pods: list[Obj]) -> bool:
        """Every training Job of the evaluated runs has ended (completed, failed, or gone): the
        last one to end releases the evaluation, once, whatever its own end."""
        ids = set(manifests.evaluated_ids(evaluation))
        return any(key[0] in ids and key[1] == naming.TRAIN for key in jobs) and not self._still_training(
            plan, evaluation, jobs, pods
        )

    def status(self, plan: Plan) -> dict[str, RunStatus]:
        """Every run's state, read only (`reconcile` does the writes)."""
        job_list, pods = self._lists(plan)
        jobs = self._by_run(plan, job_list)
        evaluation = self._evaluation_job(job_list)
        result = {}
        for run in plan.runs:
            status = RunStatus()
            train = jobs.get((run.run_id, naming.TRAIN))
            infer = jobs.get((run.run_id, naming.INFER))
            if train is not None:
                status.state, status.detail, status.restarts = job_state(train, pods)
                status.job_ids = [train["metadata"]["name"]]
            if infer is not None:
                status.infer_state, status.infer_detail, _ = job_state(infer, pods)
                if manifests.awaiting_release(infer) and status.infer_state == State.PENDING:
                    status.infer_detail = self.release_errors.get(run.run_id, "waiting for training")
                status.job_ids.append(infer["metadata"]["name"])
            if evaluation is not None and run.run_id in manifests.evaluated_ids(evaluation):
                self._evaluation_status(plan, run, status, evaluation, jobs, pods)
            result[run.run_id] = status
        return result

    def _evaluation_status(
        self,
        plan: Plan,
        run: RunConfig,
        status: RunStatus,
        evaluation: Obj,
        jobs: dict[tuple[str, str], Obj],
        pods: list[Obj],
    ) -> None:
        """A run's inference, as the shared grid evaluation Job tells it."""
        status.job_ids.append(evaluation["metadata"]["name"])
        if status.state != State.UNKNOWN and not status.state.active and status.state != State.COMPLETED:
            status.infer_state, status.infer_detail = State.CANCELLED, f"not evaluated: training {status.state.value}"
            return
        state, detail, _ = job_state(evaluation, pods)
        if manifests.evaluation_held(evaluation) and state == State.PENDING:
            still = self._still_training(plan, evaluation, jobs, pods)
            waiting = (
                f"grid evaluation waits for {len(still)} training Job{'s' if len(still) != 1 else ''}"
                if still
                else "grid evaluation: every training ended; `qlaunch status` starts it"
            )
            status.infer_state = State.PENDING
            status.infer_detail = self.release_errors.get(naming.EVALUATE, waiting)
            return
        status.infer_state = state
        status.infer_detail = "grid evaluation" + (f": {detail}" if detail else "")

    def _release(self, run: RunConfig, job: Obj) -> Obj:
        """What the training pod does when it has written its final adapter, done as the
        submitter. A refusal (no patch permission) leaves the Job as it is: status still works."""
        released = self._patch_held(job, manifests.release_patch(run), run.run_id, "inference")
        return job if released is None else released or job

    def _patch_held(self, job: Obj, patch: Obj, key: str, what: str) -> Obj | None:
        """Merge-patch a held Job to start it, as the submitter: the patched Job ({} when it is
        gone), or None when the API refused (the refusal kept under `key` for status)."""
        meta = job["metadata"]
        try:
            return (
                self.kube.call(
                    self.kube.batch.patch_namespaced_job,
                    meta["name"],
                    meta["namespace"],
                    patch,
                    _content_type=MERGE_PATCH,
                    missing_ok=True,
                    what=f"starting {what} Job {meta['name']}",
                )
                or {}
            )
        except KubeApiError as exc:
            self.release_errors[key] = str(exc)
            return None

    def progress_events(self, plan: Plan) -> dict[str, list[dict]]:
        """Run id → progress events parsed from its pods' logs (training pods oldest first, then
        inference). Right after status() it reuses that call's lists; then it costs one log read
        per live pod (only the lines added since the last read); an ended pod is read once."""
        job_list, pod_list = self._lists(plan, reuse=True)
        jobs = self._by_run(plan, job_list)
        pods = sorted(pod_list, key=created)
        run_pods: dict[str, list[Obj]] = {}
        exports: dict[str, list[Obj]] = {}  # run id → its export Jobs (one per export folder)
        for job in job_list:
            labels = job["metadata"].get("labels") or {}
            if labels.get(naming.ROLE_LABEL) == export_manifest.EXPORT:
                exports.setdefault(labels.get(naming.RUN_LABEL), []).append(job)
        for run in plan.runs:
            ordered = []
            for role in (naming.TRAIN, naming.INFER):
                job = jobs.get((run.run_id, role))
                if job is not None:
                    ordered += [p for p in pods if owned_by(p, job) and completion_index(p) in (None, "0")]
            # Then its export Jobs' pods: their `export_end` lines are what status/report show.
            for job in exports.get(run.run_id, []):
                ordered += [p for p in pods if owned_by(p, job)]
            run_pods[run.run_id] = ordered
        evaluation = self._evaluation_job(job_list)
        if evaluation is not None:
            run_pods[_EVALUATION_KEY] = [p for p in pods if owned_by(p, evaluation)]
        events = self._progress.events(naming.namespace_of(plan), run_pods)
        # The grid evaluation's log holds every run's inference events: each goes to its run.
        for event in events.pop(_EVALUATION_KEY, []):
            run_id = (event.get("summary") or {}).get("run_id") or event.get("run_id")
            if run_id in events:
                events[run_id].append(event)
        return events

    # -- qlaunch export ----------------------------------------------------------------------

    def export_push_check(self, run: RunConfig, repo: str) -> tuple[str, str | None]:
        """The export pod's token is the Secret's, which never leaves the cluster: the pod asks the
        hub before it merges (export.pod_command); here only what needs no token."""
        secret = run.kubernetes.hf_token_secret
        if secret is None:
            raise QlaunchError(
                f"--push-to-hub {repo}: the export Job gets a hub token only from the Secret that "
                "kubernetes.hf_token_secret names, and the experiment names none (kubectl create secret generic "
                "hf-token --from-literal=token=...; kubernetes.hf_token_secret: {name: hf-token}); nothing was exported"
            )
        if "/" not in repo:
            raise QlaunchError(
                f"--push-to-hub {repo}: name the repo with its owner (user/{repo} or org/{repo}): the token is in "
                "the cluster's Secret, so qlaunch cannot ask the hub here whose it is"
            )
        return repo, None

    def _export_jobs(self, plan: Plan, run: RunConfig) -> list[Obj]:
        namespace = run.kubernetes.namespace
        listing = self.kube.call(
            self.kube.batch.list_namespaced_job,
            namespace,
            label_selector=export_manifest.export_selector(plan, run),
            what=f"listing the export Jobs of run {run.run_id}",
        )
        return sorted(listing.get("items") or [], key=created)

    def submit_export(
        self, run: RunConfig, job: JobSpec, finish: list[str], *, dry_run: bool, plan: Plan | None = None
    ) -> ExportSubmission:
        """`qlaunch export --backend kubernetes`: one Job (export.export_document), checked like
        submit's objects (the plan's values, the namespace, claim and token Secret, the run's
        ConfigMap it mounts, a server-side dry run) before it is created; an earlier export Job of
        the same folder is replaced once it has ended (refused while it runs)."""
        assert plan is not None, "the Kubernetes export Job is rendered from the plan"
        checks.check_plan(plan)
        repo = finish[finish.index("--push-to-hub") + 1] if "--push-to-hub" in finish else None
        document = export_manifest.export_document(plan, run, job, finish, repo)
        text = export_manifest.file_text(plan, run, document)
        namespace, name = run.kubernetes.namespace, document["metadata"]["name"]
        self._preflight(plan)
        config = naming.names(plan, run).config
        found = self.kube.call(
            self.kube.core.read_namespaced_config_map,
            config,
            namespace,
            missing_ok=True,
            what=f"reading ConfigMap {config}",
        )
        if found is None:
            raise BackendError(
                f"run {run.run_id} has no ConfigMap {config!r} in namespace {namespace!r} (its run.yaml, which the "
                "export Job mounts): was it cancelled? `qlaunch submit` creates it again"
            )
        existing = self.kube.call(
            self.kube.batch.read_namespaced_job, name, namespace, missing_ok=True, what=f"reading Job {name}"
        )
        if existing is not None and job_state(existing, [])[0].active:
            raise BackendError(
                f"run {run.run_id} has an export Job into this folder still queued or running ({name}): wait for "
                f"it (qlaunch logs {run.run_id} --export -f), or kubectl -n {namespace} delete job {name}"
            )
        if existing is not None:  # its template is immutable: the deletion is what can be dry-run
            self._delete_job(namespace, name, dry_run=True)
        else:
            self._dry_run(document)
        checked = "validated by the API server (server-side dry run)" + (
            f"; it replaces the ended Job {name}" if existing is not None else ""
        )
        if dry_run:
            return ExportSubmission(text, checked=checked)
        if existing is not None:
            self._delete_job(namespace, name)
            self._wait_gone(namespace, [name], run.kubernetes.termination_grace_period_seconds)
        self._apply(document, dry_run=False)
        return ExportSubmission(text, job_id=name, checked=f"Job {name} in namespace {namespace}")

    def export_logs(self, run: RunConfig, *, follow: bool, out: IO[str], plan: Plan | None = None) -> None:
        """The newest export Job's pod log (the pods print what Slurm's export.log holds)."""
        assert plan is not None
        namespace = run.kubernetes.namespace
        jobs = self._export_jobs(plan, run)
        if not jobs:
            raise BackendError(
                f"run {run.run_id} has no export Job in namespace {namespace!r}: nothing exported yet (qlaunch "
                "export), or removed by ttlSecondsAfterFinished"
            )
        name = jobs[-1]["metadata"]["name"]
        selector = f"{export_manifest.export_selector(plan, run)},batch.kubernetes.io/job-name={name}"

        def finished() -> bool:
            current = self.kube.call(
                self.kube.batch.read_namespaced_job, name, namespace, missing_ok=True, what=f"reading Job {name}"
            )
            return current is None or not job_state(current, [])[0].active

        LogFollower(self.kube, namespace, selector, out, finished).run(follow)

    # -- logs --------------------------------------------------------------------------------

    def logs(self, plan: Plan, run: RunConfig, *, follow: bool, out: IO[str], infer: bool = False) -> None:
        namespace = naming.namespace_of(plan)
        role = naming.INFER if infer else naming.TRAIN
        name = naming.names(plan, run).job(role)
        selector = f"{naming.RUN_LABEL}={run.run_id},{naming.ROLE_LABEL}={role}"
        if infer and not manifests.hands_off(run):  # the grid evaluation Job answers for it
            role, name = naming.EVALUATE, manifests.evaluation_name(plan)
            selector = f"{naming.experiment_selector(plan)},{naming.ROLE_LABEL}={role}"
        job = self.kube.call(
            self.kube.batch.read_namespaced_job, name, namespace, missing_ok=True, what=f"reading Job {name}"
        )
        if job is None:
            raise BackendError(
                f"run {run.run_id} has no {role} Job {name!r} in namespace {namespace!r} "
                "(not submitted, cancelled, or removed by ttlSecondsAfterFinished)"
            )

        def finished() -> bool:
            current = self.kube.call(
                self.kube.batch.read_namespaced_job, name, namespace, missing_ok=True, what=f"reading Job {name}"
            )
            return current is None or job_state(current, [])[0] not in (State.PENDING, State.RUNNING, State.REQUEUED)

        LogFollower(self.kube, namespace, selector, out, finished).run(follow)

    # -- cancel ------------------------------------------------------------------------------

    def cancel(self, plan: Plan, runs: list[RunConfig]) -> list[str]:
        namespace = naming.namespace_of(plan)
        jobs = self._by_run(plan, self._list(plan, "jobs"))
        cancelled = []
        for run in runs:
            n = naming.names(plan, run)
            found = [jobs[(run.run_id, role)] for role in (naming.TRAIN, naming.INFER) if (run.run_id, role) in jobs]
            deleted = [self._delete_job(namespace, job["metadata"]["name"]) for job in found]
            if any(deleted):
                cancelled.append(run.run_id)
            self.kube.call(
                self.kube.core.delete_namespaced_config_map,
                n.config,
                namespace,
                missing_ok=True,
                what=f"deleting ConfigMap {n.config}",
            )
            leftovers = [("Service", n.service)] if run.resources.nodes > 1 else []
            if manifests.hands_off(run):
                leftovers += [
                    (kind, n.handoff)
                    for kind in ("RoleBinding", "Role", "ServiceAccount")
                    if kind != "ServiceAccount" or run.kubernetes.service_account is None
                ]
            for kind, name in leftovers:
                api, method = _APPLY_METHODS[kind]
                self.kube.call(
                    getattr(getattr(self.kube, api), method.replace("patch_", "delete_")),
                    name,
                    namespace,
                    missing_ok=True,
                    what=f"deleting {kind} {name}",
                )
        # The grid evaluation Job goes with the last of its runs: while another run still has its
        # training Job, it evaluates that one (and names the cancelled ones).
        chosen = {run.run_id for run in runs}
        graded = manifests.evaluated_runs(plan)
        if graded and not any((run.run_id, naming.TRAIN) in jobs for run in graded if run.run_id not in chosen):
            name = manifests.evaluation_name(plan)
            self._delete_job(namespace, name)
            self.kube.call(
                self.kube.core.delete_namespaced_config_map,
                name,
                namespace,
                missing_ok=True,
                what=f"deleting ConfigMap {name}",
            )
        self._delete_unused_data(plan, namespace)
        return cancelled

    def _delete_unused_data(self, plan: Plan, namespace: str) -> None:
        """The experiment's data ConfigMaps (one per staged file, shared by its runs) that no
        Job of the experiment still mounts: after the last run that read a file is cancelled."""
        selector = f"{naming.experiment_selector(plan)},app.kubernetes.io/component={manifests.DATA_COMPONENT}"
        listing = self.kube.call(
            self.kube.core.list_namespaced_config_map,
            namespace,
            label_selector=selector,
            what=f"listing data ConfigMaps in namespace {namespace!r}",
        )
        data = [item["metadata"]["name"] for item in listing.get("items") or []]
        if not data:
            return
        used: set[str] = set()
        for job in self._list(plan, "jobs"):
            if (job.get("metadata") or {}).get("deletionTimestamp"):
                continue  # being deleted (foreground): its pods are stopping
            for volume in ((job.get("spec") or {}).get("template") or {}).get("spec", {}).get("volumes") or []:
                for source in (volume.get("projected") or {}).get("sources") or []:
                    used.add((source.get("configMap") or {}).get("name"))
        for name in data:
            if name not in used:
                self.kube.call(
                    self.kube.core.delete_namespaced_config_map,
                    name,
                    namespace,
                    missing_ok=True,
                    what=f"deleting ConfigMap {name}",
                )


_EVALUATION_KEY = "\0evaluate"  # never a run id


def _first_time(doc: Obj, seen: set[tuple[str, str]]) -> bool:
    key = (doc["kind"], doc["metadata"]["name"])
    if key in seen:
        return False
    seen.add(key)
    return True


def _staging_note(uploads: dict[str, list[LocalFile]]) -> str:
    """What submit stages onto the claims, for the dry-run summary."""
    notes = [
        f"{len(files)} local file{'s' if len(files) > 1 else ''} "
        f"({describe_size(sum(f.size for f in files))}) to stage onto claim {pvc!r}"
        for pvc, files in uploads.items()
    ]
    return "".join(f"; {note}" for note in notes)
