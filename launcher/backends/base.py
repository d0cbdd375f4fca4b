"""What every backend (local, slurm, kubernetes) provides, and the state vocabulary they share.

plan → prepare → apply → watch (after TorchX's `submit = schedule(submit_dryrun(...))`):
`prepare` renders every file and decides every action before the first side effect and returns
them as a `Submission`, a plain value that `qlaunch render` and `submit --dry-run` print;
`apply` carries it out. `status` costs a constant number of scheduler/API calls per refresh,
whatever the grid size. What only some backends can do is declared here with a default.
"""

from __future__ import annotations

import abc
import enum
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Callable

from ..grid import Plan
from ..job.config import RunConfig
from ..job.errors import QlaunchError

if TYPE_CHECKING:
    from ..jobspec import JobSpec


class State(str, enum.Enum):
    UNKNOWN = "unknown"  # never submitted (or the scheduler forgot it)
    PENDING = "pending"
    RUNNING = "running"
    REQUEUED = "requeued"  # preempted/requeued, waiting to run again
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    TIMEOUT = "timeout"
    OUT_OF_MEMORY = "out_of_memory"

    @property
    def active(self) -> bool:
        return self in (State.PENDING, State.RUNNING, State.REQUEUED)


@dataclass
class RunStatus:
    """What the scheduler knows of one run. Progress (step/loss/ETA) is read separately."""

    state: State = State.UNKNOWN
    job_ids: list[str] = field(default_factory=list)  # training job(s), newest last
    infer_state: State = State.UNKNOWN
    infer_detail: str = ""  # e.g. "waiting for training"
    restarts: int | None = None  # when the scheduler counts them (e.g. Slurm Restarts=)
    detail: str = ""  # scheduler reason, exit code, node


@dataclass
class SubmitReport:
    submitted: dict[str, list[str]] = field(default_factory=dict)  # run id → job ids
    skipped: dict[str, str] = field(default_factory=dict)  # run id → why (already running …)
    interrupted: bool = False  # the local backend was stopped with Ctrl-C
    notes: list[str] = field(default_factory=list)  # one line each, e.g. runs waiting for queue room


# A run left out because the cluster's queue limits leave no room for it now (`notes` says how
# many, once); the next submit queues it.
WAITING = "waits for room in the queue"


@dataclass
class Submission:
    """What submitting a plan does, decided before anything is done: a pure value."""

    backend: str
    files: dict[str, str] = field(default_factory=dict)  # file name → text, as written/applied
    jobs: dict[str, list[str]] = field(default_factory=dict)  # run id → the jobs it submits
    skipped: dict[str, str] = field(default_factory=dict)  # run id → why nothing is submitted
    checked: str = "not checked with the scheduler"  # how the scheduler validated it
    request: Any = field(default=None, repr=False, compare=False)  # the backend's own, for apply
    notes: list[str] = field(default_factory=list)  # one line each, e.g. runs waiting for queue room

    def describe(self) -> list[str]:
        lines = [f"{run_id}: {', '.join(jobs)}" for run_id, jobs in self.jobs.items()]
        lines += [f"{run_id} skipped: {why}" for run_id, why in self.skipped.items() if why != WAITING]
        lines += self.notes
        lines.append(f"{self.backend}: {len(self.jobs)} runs to submit, {len(self.skipped)} skipped; {self.checked}")
        return lines


@dataclass
class ExportSubmission:
    """`qlaunch export` as a job: its script or manifest, where it was written, its id (None: dry run)."""

    script: str
    path: Path | None = None
    job_id: str | None = None
    checked: str = ""  # how the scheduler validated it


@dataclass
class Foreground:
    """Options of a backend that runs the jobs itself, in this process (`foreground = True`)."""

    max_parallel: int | None = None
    run_inference: bool = True
    on_event: Callable[[str], None] | None = None
    on_tick: Callable[[], None] | None = None


class Backend(abc.ABC):
    """Subclassed by each backend: the abstract methods are what a backend must do (a class
    missing one cannot be instantiated); the abilities below are declared with defaults, so the
    rest of the launcher asks the backend instead of testing its name."""

    name: str
    # Runs the jobs in this process (the local backend): `apply` returns once they have ended,
    # and the runner shows them live; otherwise it returns once they are queued.
    foreground: bool = False
    # This machine reads and writes the jobs' storage root (a shared file system, or this very
    # machine): progress and metrics are read from files, the hub cache is filled here
    # (prefetch), `--force` clears outputs here, the report is written next to the runs.
    # False (Kubernetes: a claim this machine does not mount): progress comes from the jobs'
    # logs, the jobs download themselves, the report goes to the current folder.
    shares_storage: bool = True
    # One evaluation job per grid by default (`inference.per_run` unset); False: one inference
    # job per run.
    grid_evaluation: bool = True

    @classmethod
    def connect(cls, kubeconfig: str | None = None, context: str | None = None) -> "Backend":
        """The backend, talking to `kubeconfig`/`context` where it has an API (ignored otherwise)."""
        return cls()

    @classmethod
    def job_view(cls, run: RunConfig, storage_root: Path) -> RunConfig:
        """The run as its job will see it (its relative paths), for the input checks."""
        return run

    @classmethod
    def input_findings(cls, run: RunConfig, storage_root: Path) -> list:
        """Problems of a run's inputs that only this backend has (a list of run_checks.Finding)."""
        return []

    def reconcile(self, plan: Plan) -> list[str]:
        """Writes that bring the scheduler in line with what the runs did (Kubernetes: start the
        inference Job of a finished training whose own hand-off did not); returns what it did.
        `status` only reads; `status --watch`, `submit` and the status command call this."""
        return []

    @abc.abstractmethod
    def prepare(self, plan: Plan, *, force: bool = False, offline: bool = False) -> Submission:
        """Render every file and decide every job; with the scheduler's state and its checks
        unless `offline` (no scheduler is contacted: what a first submission would do)."""

    @abc.abstractmethod
    def apply(self, submission: Submission, options: Foreground | None = None) -> SubmitReport:
        """Carry out a prepared submission."""

    def render(self, plan: Plan, out_dir: Path) -> list[Path]:
        """Write one reviewable file per job (script or manifest); submit nothing, ask nothing."""
        return write_files(self.prepare(plan, offline=True), out_dir)

    def submit(self, plan: Plan, *, force: bool = False, dry_run: bool | str = False) -> SubmitReport:
        """Submit training (+ dependent inference) for every run not already pending/running/done;
        dry_run: prepare (with the scheduler's checks) and report, submit nothing."""
        submission = self.prepare(plan, force=force, offline=dry_run == "client")
        if dry_run:
            return SubmitReport(
                submitted={r: [f"{j} (dry run)" for j in jobs] for r, jobs in submission.jobs.items()},
                skipped=dict(submission.skipped),
                notes=list(submission.notes),
            )
        return self.apply(submission)

    def progress_events(self, plan: Plan) -> dict[str, list[dict]] | None:
        """Run id → progress events, for backends whose jobs' storage this machine cannot read
        (Kubernetes reads them from pod logs); None: read each run's progress.jsonl."""
        return None

    @abc.abstractmethod
    def status(self, plan: Plan) -> dict[str, RunStatus]:
        """Run id → status, with a constant number of scheduler calls."""

    @abc.abstractmethod
    def logs(self, plan: Plan, run: RunConfig, *, follow: bool, out: IO[str], infer: bool = False) -> None:
        """Print a run's log; with follow, keep going across requeues/replacement pods."""

    def check_export(self) -> None:
        """Refuse `qlaunch export` on this backend before anything is read (one error), if it cannot run it."""

    def export_push_check(self, run: RunConfig, repo: str) -> tuple[str, str | None] | None:
        """`qlaunch export --push-to-hub REPO` where the job's hub token is not this machine's to
        read (a Kubernetes Secret): (repo id, None) once what can be checked here passed (the job
        then asks the hub before it merges), or one error. None: the token is the one this machine
        reads (`model.hf_token_env` / `hf_token_file`), and the hub is asked from here."""
        return None

    def submit_export(
        self, run: RunConfig, job: "JobSpec", finish: list[str], *, dry_run: bool, plan: Plan | None = None
    ) -> ExportSubmission:
        """`qlaunch export` as a job of this backend: `job` (training.export) then `finish` (the push
        and exports.json), with the job's resources; refusals (the scheduler's) before it is queued.
        A backend that runs its jobs here (`foreground`) is never asked: the export runs in place."""
        raise QlaunchError(
            f"qlaunch export does not run as a {self.name} job yet: run it with --backend local on a machine "
            "that mounts the storage root"
        )

    def export_active(self, run: RunConfig) -> bool:
        """Whether the run's export job may still write to its log (`qlaunch logs RUN --export -f`)."""
        return False

    def export_logs(self, run: RunConfig, *, follow: bool, out: IO[str], plan: Plan | None = None) -> None:
        """Print the log of the run's export (`<run dir>/export.log`); with follow, while its job runs."""
        from ..jobspec import EXPORT_LOG
        from ..logs import follow_file

        if not self.shares_storage:
            raise QlaunchError(f"the export log is in the run folder, which {self.name} jobs keep on their own storage")
        log = Path(run.run_dir) / EXPORT_LOG
        if not log.exists() and not self.export_active(run):
            raise QlaunchError(f"run {run.run_id} has no export log ({log}): nothing exported yet (qlaunch export)")
        follow_file(log, out, follow=follow, active=lambda: self.export_active(run))

    @abc.abstractmethod
    def cancel(self, plan: Plan, runs: list[RunConfig]) -> list[str]:
        """Cancel the runs' jobs; returns the run ids that had something to cancel."""


def write_files(submission: Submission, out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in submission.files.items():
        path = out_dir / name
        path.write_text(text)
        written.append(path)
    return written
