"""What every backend (local, slurm, kubernetes) provides, and the state vocabulary they share.

plan → render → submit → watch: `render` is pure (same plan, same bytes) and writes reviewable
files; `submit` renders and validates everything before its first side effect; `status` costs a
constant number of scheduler/API calls per refresh, whatever the grid size.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Protocol

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
    restarts: int | None = None  # when the scheduler counts them (e.g. Slurm Restarts=)
    detail: str = ""  # scheduler reason, exit code, node


@dataclass
class SubmitReport:
    submitted: dict[str, list[str]] = field(default_factory=dict)  # run id → job ids
    skipped: dict[str, str] = field(default_factory=dict)  # run id → why (already running …)
    interrupted: bool = False  # the local backend was stopped with Ctrl-C


class Backend(Protocol):
    name: str

    def render(self, plan: Plan, out_dir: Path) -> list[Path]:
        """Write one reviewable file per run (script or manifest); submit nothing."""

    def submit(self, plan: Plan, *, force: bool = False, dry_run: bool = False) -> SubmitReport:
        """Submit training (+ dependent inference) for every run not already pending/running/done."""

    def status(self, plan: Plan) -> dict[str, RunStatus]:
        """Run id → status, with a constant number of scheduler calls."""

    def logs(self, plan: Plan, run: RunConfig, *, follow: bool, out: IO[str], infer: bool = False) -> None:
        """Print a run's log; with follow, keep going across requeues/replacement pods."""

    def cancel(self, plan: Plan, runs: list[RunConfig]) -> list[str]:
        """Cancel the runs' jobs; returns the run ids that had something to cancel."""
