"""The Slurm backend: qlaunch runs on a login node, storage.root is a shared filesystem.

Each run becomes a training job; the grid gets one evaluation job that waits for all of them
(`--dependency=afterany`, slurm evaluation), or with `inference.per_run: true` each run an
inference job that waits for its training job (`--dependency=afterok`). Jobs are submitted with `sbatch <file>` on the scripts rendered into
the run folder, rather than through submitit's executor (which pickles a Python function and
writes its own script): what runs on the cluster is then exactly the file a user reviewed with
`qlaunch render`, and it can be resubmitted by hand. Job ids are kept in
`<run dir>/submission.json`; state comes from one squeue call per refresh (plus one sacct call
where accounting exists) and, for jobs Slurm has forgotten, from the run folder.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterable

from ... import evaluation
from ...grid import Plan
from ...job import requeue
from ...job.config import RunConfig
from ...job.errors import BackendError
from ...job.progress import read_events
from ...job.storage import RunPaths, read_json, write_json, write_run_config
from ...jobspec import JobSpec, launcher_environment
from ...logs import follow_file
from ..base import WAITING, Backend, ExportSubmission, Foreground, RunStatus, State, Submission, SubmitReport
from . import arrays as slurm_arrays
from . import limits as slurm_limits
from .evaluation import EVALUATE_SCRIPT, render_evaluation
from .jobs import JobInfo, SlurmCommands
from .script import EXPORT_SCRIPT, INFER_SCRIPT, TRAIN_SCRIPT, RunScripts, render_export, render_run

# How long `submit --force` waits for the jobs it cancelled to let go of the run folder.
CANCEL_WAIT_SECONDS = 120


@dataclass
class _Action:
    run: RunConfig
    scripts: RunScripts
    train: bool  # submit the training job
    infer: bool  # submit the inference job, or (grid) have the grid evaluation job evaluate the run
    after: str | None = None  # training job the inference job waits for (None: training is done)

    @property
    def grid(self) -> bool:
        return self.infer and not evaluation.per_run(self.run, "slurm")


@dataclass(frozen=True)
class _Request:
    """The Slurm side of a Submission: what apply() submits, and the scheduler view it was
    decided on (--force cancels the active jobs in it)."""

    actions: tuple[_Action, ...]
    infos: dict[str, JobInfo]
    force: bool
    evaluate: str | None = None  # the grid evaluation script, when a run needs it
    chunks: tuple[slurm_arrays.Chunk, ...] = ()  # every run's array chunk (slurm_arrays.layout)


@dataclass(frozen=True)
class _Submissions:
    """A run's `submission.json`: its Slurm jobs, oldest first."""

    jobs: tuple[dict, ...]

    @classmethod
    def of(cls, run: RunConfig) -> "_Submissions":
        record = read_json(RunPaths.of(run).submission) or {}
        return cls(tuple(record.get("jobs", [])) if record.get("backend") == "slurm" else ())

    def ids(self, kind: str) -> list[str]:
        return [str(job["job_id"]) for job in self.jobs if job.get("kind") == kind]

    def latest(self, kind: str) -> str | None:
        ids = self.ids(kind)
        return ids[-1] if ids else None

    def cancelled(self, kind: str) -> bool:
        """Whether `qlaunch cancel` cancelled the newest job of this kind (a pending array task
        that is cancelled is gone from squeue at once)."""
        jobs = [job for job in self.jobs if job.get("kind") == kind]
        return bool(jobs and jobs[-1].get("cancelled_at"))


def _mark_cancelled(run: RunConfig, job_ids: set[str]) -> None:
    record = read_json(RunPaths.of(run).submission) or {}
    jobs = record.get("jobs", [])
    for job in jobs:
        if str(job.get("job_id")) in job_ids or str(job.get("job_id")).split("_")[0] in job_ids:
            job.setdefault("cancelled_at", round(time.time(), 3))
    if jobs:
        write_json(RunPaths.of(run).submission, {**record, "jobs": jobs})


def _record_job(run: RunConfig, kind: str, job_id: str, **fields) -> None:
    job = {"kind": kind, "job_id": job_id, "submitted_at": round(time.time(), 3), **fields}
    jobs = [*_Submissions.of(run).jobs, job]
    write_json(RunPaths.of(run).submission, {"backend": "slurm", "jobs": jobs})


def _from_storage(run: RunConfig, job_id: str | None) -> tuple[State, str]:
    """State of a training job Slurm no longer lists (no slurmdbd, older than MinJobAge)."""
    paths = RunPaths.of(run)
    if paths.training_completed():
        return State.COMPLETED, ""
    if job_id is None:
        return State.UNKNOWN, ""
    events = [e for e in read_events(paths.progress) if e.get("event") != "infer_end"]
    if events and events[-1].get("event") == "error":
        return State.FAILED, str(events[-1].get("message", "error"))[:200]
    step = f", stopped at step {events[-1].get('step')}" if events else ""
    return State.UNKNOWN, f"job {job_id} gone from Slurm{step}; `qlaunch submit --backend slurm` resumes it"


class SlurmBackend(Backend):
    name = "slurm"

    def __init__(self) -> None:
        self.commands = SlurmCommands()

    # ---- state --------------------------------------------------------------------------------
    def _infos(self, runs: Iterable[RunConfig]) -> dict[str, JobInfo]:
        """Scheduler view of each run's newest training and inference job: one squeue call,
        plus one sacct call for the ones squeue no longer lists when accounting exists."""
        ids = []
        for run in runs:
            record = _Submissions.of(run)
            ids += [job_id for job_id in (record.latest("train"), record.latest("infer")) if job_id]
        infos = self.commands.squeue_jobs(ids)
        missing = [job_id for job_id in ids if job_id not in infos]
        if missing:
            infos.update(self.commands.sacct_jobs(missing))
        return infos

    def status(self, plan: Plan) -> dict[str, RunStatus]:
        infos = self._infos(plan.runs)
        return {run.run_id: self._run_status(run, infos) for run in plan.runs}

    def _run_status(self, run: RunConfig, infos: dict[str, JobInfo]) -> RunStatus:
        paths, record = RunPaths.of(run), _Submissions.of(run)
        train_id, infer_id = record.latest("train"), record.latest("infer")
        status = RunStatus(job_ids=record.ids("train"))
        train = infos.get(train_id) if train_id else None
        if train is not None:
            status.state, status.detail, status.restarts = train.state, train.detail, train.restarts
        else:
            status.state, status.detail = _from_storage(run, train_id)
            if status.state == State.UNKNOWN and record.cancelled("train"):
                status.state, status.detail = State.CANCELLED, "cancelled (qlaunch cancel)"
        guarded = requeue.stopped_reason(paths.root, train_id)
        if guarded and status.state in (State.FAILED, State.UNKNOWN):
            # The batch script's requeue guard ended it (exit 76), not a crash.
            status.state, status.detail = State.FAILED, f"{guarded}; `qlaunch submit` resumes it"
        infer = infos.get(infer_id) if infer_id else None
        if infer is not None:
            status.infer_state = infer.state
        elif paths.inference_completed():
            status.infer_state = State.COMPLETED
        elif infer_id is not None:
            status.infer_state = State.CANCELLED if record.cancelled("infer") else State.UNKNOWN
        return status

    # ---- submit -------------------------------------------------------------------------------
    def _plan_actions(
        self, plan: Plan, scripts: dict[str, RunScripts], infos: dict[str, JobInfo], force: bool, report: SubmitReport
    ) -> list[_Action]:
        actions = []
        for run in plan.runs:
            paths = RunPaths.of(run)
            infer_wanted = scripts[run.run_id].infer is not None
            if force:
                actions.append(_Action(run, scripts[run.run_id], train=True, infer=infer_wanted))
                continue
            record = _Submissions.of(run)
            train_id, infer_id = record.latest("train"), record.latest("infer")
            train = infos.get(train_id) if train_id else None
            infer = infos.get(infer_id) if infer_id else None
            infer_covered = paths.inference_completed() or (
                infer is not None and (infer.state.active or infer.state == State.COMPLETED)
            )
            if train is not None and train.state.active:
                if infer_wanted and not infer_covered:
                    actions.append(_Action(run, scripts[run.run_id], train=False, infer=True, after=train_id))
                else:
                    report.skipped[run.run_id] = f"already {train.state.value} (job {train_id})"
            elif paths.training_completed():
                if infer_wanted and not infer_covered:
                    actions.append(_Action(run, scripts[run.run_id], train=False, infer=True))
                else:
                    report.skipped[run.run_id] = "completed"
            else:
                actions.append(_Action(run, scripts[run.run_id], train=True, infer=infer_wanted))
        return actions

    def _check_with_scheduler(self, actions: list[_Action], env: dict[str, str]) -> None:
        """`sbatch --test-only` once per distinct set of directives: slurmctld checks partition,
        account, QOS and resources for every job we are about to submit, before the first one."""
        seen: set[tuple[str, ...]] = set()
        with tempfile.TemporaryDirectory(prefix="qlaunch-slurm-check-") as tmp:
            for action in actions:
                scripts = action.scripts
                candidates = []
                if action.train:
                    candidates.append(("training", scripts.train, scripts.train_scheduling))
                if action.infer and scripts.infer is not None and not action.grid:
                    candidates.append(("inference", scripts.infer, scripts.infer_scheduling))
                for kind, text, scheduling in candidates:
                    key = (kind, *scheduling)
                    if key in seen:
                        continue
                    seen.add(key)
                    path = Path(tmp) / f"{action.run.run_id}-{kind}.sbatch"
                    path.write_text(text)
                    self.commands.test_only(path, env=env, what=f"run {action.run.run_id}'s {kind} job")
            graded = [action.run for action in actions if action.grid]
            if graded:
                text, _ = render_evaluation(graded)
                path = Path(tmp) / EVALUATE_SCRIPT
                path.write_text(text)
                self.commands.test_only(path, env=env, what="the grid evaluation job")

    def prepare(self, plan: Plan, *, force: bool = False, offline: bool = False) -> Submission:
        """Scripts for every run (ConfigError before anything), the jobs each run needs given
        what squeue/sacct know, and `sbatch --test-only` on each distinct request."""
        scripts = {run.run_id: render_run(run) for run in plan.runs}
        files = {}
        for run in plan.runs:
            rendered = scripts[run.run_id]
            infer = rendered.infer if evaluation.per_run(run, self.name) else None
            for kind, text in (("train", rendered.train), ("infer", infer)):
                if text is not None:
                    files[f"{rendered.run_id}.{kind}.sbatch"] = text
        graded = [run for run in plan.runs if run.inference.enabled and not evaluation.per_run(run, self.name)]
        if graded:
            files[EVALUATE_SCRIPT] = render_evaluation(graded)[0]
        # Offline (render): cut by Slurm's default MaxArraySize, asking no cluster.
        limits = slurm_limits.Limits() if offline else slurm_limits.read(self.commands, plan.runs[0].slurm.qos)
        chunks = slurm_arrays.layout(
            plan.runs, scripts, limits.max_array_size, lambda run: evaluation.per_run(run, self.name)
        )
        for chunk in chunks:
            files.update(chunk.files())
        report = SubmitReport()
        infos = {} if offline else self._infos(plan.runs)
        actions = self._plan_actions(plan, scripts, infos, force, report)
        notes = self._fit(actions, limits, report)
        checked = "not checked with Slurm (offline)"
        if actions and not offline:
            self._check_with_scheduler(actions, launcher_environment())
            checked = "accepted by sbatch --test-only"
        jobs = {}
        for action in actions:
            if action.grid:
                evaluate = ["evaluate (one job for the grid, after its training jobs)"]
            else:
                evaluate = [f"infer after job {action.after}" if action.after else "infer"] if action.infer else []
            jobs[action.run.run_id] = (["train"] if action.train else []) + evaluate
        graded = [action.run for action in actions if action.grid]
        evaluate_text = render_evaluation(graded)[0] if graded else None
        if limits.notes:
            checked += "; " + "; ".join(limits.notes)
        return Submission(
            self.name,
            files,
            jobs,
            report.skipped,
            checked,
            request=_Request(tuple(actions), infos, force, evaluate_text, tuple(chunks)),
            notes=notes,
        )

    @staticmethod
    def _fit(actions: list[_Action], limits: slurm_limits.Limits, report: SubmitReport) -> list[str]:
        """Keep the runs (in plan order) whose jobs fit the room the cluster's limits leave; the
        others wait (WAITING), for a later submit. The grid's evaluation job goes out only with
        the last of its runs (one job for the whole grid, after all its training arrays).
        Returns the one line that says what waits."""
        costs = [int(a.train) + int(a.infer and not a.grid) for a in actions]
        fits = limits.fit(costs)
        left = actions[fits:]
        del actions[fits:]
        graded = any(a.grid for a in (*actions, *left))
        deferred = graded and (bool(left) or limits.fit([*costs, 1]) <= len(costs))
        if deferred:
            for action in actions:
                if action.grid:
                    action.infer = False
            left += [a for a in actions if not a.train and not a.infer]  # only the evaluation: it waits
            actions[:] = [a for a in actions if a.train or a.infer]
        for action in left:
            report.skipped[action.run.run_id] = WAITING
        waiting = [a for a in left if a.train or (a.infer and not a.grid)]
        evaluation_waits = "; the grid's evaluation job goes out with the last of them" if deferred else ""
        if waiting:
            queued = sum(1 for a in actions if a.train or a.infer)
            return [
                f"{queued:,} of {queued + len(waiting):,} runs queued; {len(waiting):,} wait for room "
                f"({limits.why}): run `qlaunch submit` again once jobs have ended (it queues only what is "
                f"missing{evaluation_waits}), or let `qlaunch status --watch --top-up` queue them as room frees"
            ]
        if deferred:
            return [
                f"the grid's evaluation job waits for room ({limits.why}): run `qlaunch submit` again once "
                "jobs have ended, or let `qlaunch status --watch --top-up` queue it as room frees"
            ]
        return []

    def apply(self, submission: Submission, options: Foreground | None = None) -> SubmitReport:
        request: _Request = submission.request
        report = SubmitReport(skipped=dict(submission.skipped), notes=list(submission.notes))
        actions = list(request.actions)
        if not actions:
            return report
        env = launcher_environment()  # what sbatch passes on to the job (--export=ALL)
        if request.force:
            self._stop_for_resubmit([a.run for a in actions], request.infos)
        for action in actions:
            paths = RunPaths.of(action.run)
            write_run_config(action.run)
            (paths.root / TRAIN_SCRIPT).write_text(action.scripts.train)
            if action.scripts.infer is not None and not action.grid:
                (paths.root / INFER_SCRIPT).write_text(action.scripts.infer)

        done: list[str] = []
        try:
            singles = slurm_arrays.submit_actions(
                self.commands, request.chunks, actions, env, _record_job, report.submitted, done
            )
        except BackendError as exc:
            self._midway(exc, actions, report, done)
        for action in singles:
            try:
                report.submitted[action.run.run_id] = self._submit_one(action, env)
            except BackendError as exc:
                self._midway(exc, actions, report, done)
            done.append(action.run.run_id)
        graded = [action for action in actions if action.grid]
        if graded:
            self._submit_evaluation(graded, request.evaluate, report, env)
        return report

    @staticmethod
    def _midway(exc: BackendError, actions: list[_Action], report: SubmitReport, done: list[str]) -> None:
        remaining = [a.run.run_id for a in actions if a.run.run_id not in done and a.run.run_id not in report.submitted]
        partly = [f"{run_id} ({', '.join(jobs)})" for run_id, jobs in report.submitted.items() if run_id not in done]
        raise BackendError(
            f"{exc}\nsubmitted before this failure: {', '.join(done) or 'none'}; "
            + (f"partly submitted: {', '.join(partly)}; " if partly else "")
            + f"not submitted: {', '.join(remaining)}. Fix the cause and run submit again: "
            "it submits only what is missing."
        ) from None

    def evaluate(self, runs: list[RunConfig], force: bool = False) -> str:
        """`qlaunch evaluate --backend slurm`: one evaluation job for these trained runs, now."""
        text, _ = render_evaluation(runs, extra=("--force",) if force else ())
        actions = [_Action(run, render_run(run), train=False, infer=True) for run in runs]
        return self._submit_evaluation(actions, text, SubmitReport(), launcher_environment())

    # ---- qlaunch export ------------------------------------------------------------------------
    def submit_export(
        self, run: RunConfig, job: JobSpec, finish: list[str], *, dry_run: bool, plan: Plan | None = None
    ) -> ExportSubmission:
        """`qlaunch export --backend slurm`: `<run dir>/export.sbatch`, asked of slurmctld with
        `sbatch --test-only` (the memory the merge needs on a node of the partition) before it is
        submitted; dry_run: the script and the scheduler's answer, nothing written or queued."""
        text, _ = render_export(run, job, finish)
        env = launcher_environment()
        with tempfile.TemporaryDirectory(prefix="qlaunch-slurm-check-") as tmp:
            check = Path(tmp) / EXPORT_SCRIPT
            check.write_text(text)
            res = job.resources
            asks = (
                f"--mem={res.memory} ("
                + ("what the merge needs, or --memory" if "--merge" in job.args else "an adapter export")
                + f"), --cpus-per-task={res.cpus_per_task}"
                + (f", {res.gpus_per_node} GPU" if res.gpus_per_node else "")
            )
            try:
                self.commands.test_only(check, env=env, what=f"the export job of run {run.run_id}")
            except BackendError as exc:
                raise BackendError(f"{exc}; it asks for {asks}: nothing was submitted") from None
        checked = f"sbatch --test-only accepted it (--mem={job.resources.memory})"
        if dry_run:
            return ExportSubmission(text, checked=checked)
        latest = _Submissions.of(run).latest("export")
        if latest and self.export_active(run):
            raise BackendError(
                f"run {run.run_id} has an export job still queued or running ({latest}): "
                f"wait for it, or scancel {latest}"
            )
        script = RunPaths.of(run).root / EXPORT_SCRIPT
        script.write_text(text)
        job_id = self.commands.sbatch(script, env=env, what=f"sbatch of the export job of run {run.run_id}")
        _record_job(run, "export", job_id, script=str(script))
        return ExportSubmission(text, path=script, job_id=job_id, checked=checked)

    def export_active(self, run: RunConfig) -> bool:
        job_id = _Submissions.of(run).latest("export")
        if job_id is None:
            return False
        info = self.commands.squeue_jobs([job_id]).get(job_id)
        return info is not None and info.state.active

    def _submit_evaluation(self, actions: list[_Action], text: str, report: SubmitReport, env: dict[str, str]) -> str:
        """The grid evaluation job, after every training job of its runs (afterany: it evaluates
        the runs that trained and names the others)."""
        runs = [action.run for action in actions]
        runs_file = evaluation.write_runs_file(runs)
        script = runs_file.parent / EVALUATE_SCRIPT
        script.write_text(text)
        waits = sorted(
            {
                job.split("_")[0]
                for action in actions
                for job in [  # an array: all its tasks
                    _Submissions.of(action.run).latest("train") if action.train else action.after
                ]
                if job
            }
        )
        options = [f"--dependency=afterany:{':'.join(waits)}"] if waits else []
        job_id = self.commands.sbatch(script, options, env=env, what="sbatch of the grid evaluation job")
        for run in runs:
            _record_job(run, "infer", job_id, script=str(script), grid=True, dependency=options[0] if options else None)
            report.submitted.setdefault(run.run_id, []).append(job_id)
        return job_id

    def _submit_one(self, action: _Action, env: dict[str, str]) -> list[str]:
        run, paths = action.run, RunPaths.of(action.run)
        job_ids = []
        after = action.after
        if action.train:
            after = self.commands.sbatch(
                paths.root / TRAIN_SCRIPT, env=env, what=f"sbatch of run {run.run_id}'s training job"
            )
            _record_job(run, "train", after, script=TRAIN_SCRIPT)
            job_ids.append(after)
        if action.infer and not action.grid:
            options = [f"--dependency=afterok:{after}"] if after else []
            infer_id = self.commands.sbatch(
                paths.root / INFER_SCRIPT, options, env=env, what=f"sbatch of run {run.run_id}'s inference job"
            )
            _record_job(run, "infer", infer_id, script=INFER_SCRIPT, dependency=options[0] if options else None)
            job_ids.append(infer_id)
        return job_ids

    def _stop_for_resubmit(self, runs: list[RunConfig], infos: dict[str, JobInfo]) -> None:
        """--force: cancel the runs' active jobs, wait until they are gone, clear their outputs."""
        active = self._active_ids(runs, infos)
        if active:
            self.commands.scancel(active)
            deadline = time.monotonic() + CANCEL_WAIT_SECONDS
            while True:
                still = [i for i, info in self.commands.squeue_jobs(active).items() if info.state.active]
                if not still:
                    break
                if time.monotonic() > deadline:
                    raise BackendError(f"jobs {', '.join(still)} still running {CANCEL_WAIT_SECONDS} s after scancel")
                time.sleep(1)
        for run in runs:
            RunPaths.of(run).clear_outputs()

    @staticmethod
    def _active_ids(runs: Iterable[RunConfig], infos: dict[str, JobInfo]) -> list[str]:
        ids = []
        for run in runs:
            record = _Submissions.of(run)
            for job_id in (record.latest("train"), record.latest("infer")):
                if job_id and job_id in infos and infos[job_id].state.active:
                    ids.append(job_id)
        return ids

    # ---- logs / cancel ------------------------------------------------------------------------
    def logs(self, plan: Plan, run: RunConfig, *, follow: bool, out: IO[str], infer: bool = False) -> None:
        paths = RunPaths.of(run)
        checked = {"at": float("-inf"), "active": True}

        def active() -> bool:
            # Requeued jobs append to the same file: follow until nothing of the run can still
            # write to it. At most one squeue call every 5 s.
            if time.monotonic() - checked["at"] >= 5:
                status = self._run_status(run, self._infos([run]))
                # An inference job waiting for its training job is pending: active as well.
                checked["active"] = (status.infer_state if infer else status.state).active
                checked["at"] = time.monotonic()
            return checked["active"]

        follow_file(evaluation.infer_log(run, "slurm") if infer else paths.train_log, out, follow=follow, active=active)

    def cancel(self, plan: Plan, runs: list[RunConfig]) -> list[str]:
        infos = self._infos(runs)
        cancelled, ids = [], []
        for run in runs:
            active = self._active_ids([run], infos)
            if active:
                cancelled.append(run.run_id)
                ids += active
        # A grid evaluation job is cancelled with the last of its runs only: it still evaluates
        # the others (and names the cancelled ones).
        # "Last" means: no other run it waits on still has a queued or running training job.
        chosen = {run.run_id for run in runs}
        others = [run for run in plan.runs if run.run_id not in chosen]
        others_infos = self._infos(others) if others else {}
        for run in others:
            record = _Submissions.of(run)
            shared, train = record.latest("infer"), record.latest("train")
            grid = any(job.get("grid") and str(job["job_id"]) == shared for job in record.jobs)
            training = train in others_infos and others_infos[train].state.active
            if grid and training and shared in ids:
                ids = [job_id for job_id in ids if job_id != shared]
        ids = slurm_arrays.collapse(list(dict.fromkeys(ids)), {**infos, **others_infos})
        self.commands.scancel(ids)
        for run in runs:
            if run.run_id in cancelled:
                _mark_cancelled(run, set(ids))
        return cancelled

    def throttle(self, plan: Plan, limit: int) -> list[str]:
        """`qlaunch throttle`: ArrayTaskThrottle=limit on the plan's arrays that still have
        tasks queued or running; returns their ids."""
        infos = self._infos(plan.runs)
        arrays = sorted(
            {
                parsed[0]
                for job_id, info in infos.items()
                if info.state.active and (parsed := slurm_arrays.task_id(job_id))
            },
            key=int,
        )
        slurm_arrays.throttle(self.commands, arrays, limit)
        return arrays
