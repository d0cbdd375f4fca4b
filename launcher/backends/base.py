"""What every backend (local, slurm, kubernetes) provides, and the state vocabulary they share.

plan → prepare → apply → watch (after TorchX's `submit = schedule(submit_dryrun(...))`):
`prepare` renders every file and decides every action before the first side effect and returns
them as a `Submission`, a plain value that `qlaunch render` and `submit --dry-run` print;
`apply` carries it out. `status` costs a constant number of scheduler/API calls per refresh,
whatever the grid size. What only some backends can do is declared here with a default.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Callable, Protocol

from ..config import RunConfig
from ..grid import Plan


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
class Foreground:
    """Options of a backend that runs the jobs itself, in this process (`foreground = True`)."""

    max_parallel: int | None = None
    run_inference: bool = True
    on_event: Callable[[str], None] | None = None
    on_tick: Callable[[], None] | None = None


class Backend(Protocol):
    """Subclassed by each backend, which inherits the defaults below."""

    name: str
    # Runs the jobs in this process (the local backend): `apply` returns once they have ended,
    # and the runner shows them live; otherwise it returns once they are queued.
    foreground: bool = False

    def prepare(self, plan: Plan, *, force: bool = False, offline: bool = False) -> Submission:
        """Render every file and decide every job; with the scheduler's state and its checks
        unless `offline` (no scheduler is contacted: what a first submission would do)."""

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
            return SubmitReport(submitted={r: [f"{j} (dry run)" for j in jobs] for r, jobs in submission.jobs.items()},
                                skipped=dict(submission.skipped), notes=list(submission.notes))  # fmt: skip
        return self.apply(submission)

    def progress_events(self, plan: Plan) -> dict[str, list[dict]] | None:
        """Run id → progress events, for backends whose jobs' storage this machine cannot read
        (Kubernetes reads them from pod logs); None: read each run's progress.jsonl."""
        return None

    def status(self, plan: Plan) -> dict[str, RunStatus]:
        """Run id → status, with a constant number of scheduler calls."""

    def logs(self, plan: Plan, run: RunConfig, *, follow: bool, out: IO[str], infer: bool = False) -> None:
        """Print a run's log; with follow, keep going across requeues/replacement pods."""

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
