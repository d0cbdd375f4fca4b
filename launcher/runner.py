"""What the `qlaunch` commands do, without the printing (after TorchX's `runner/api.py` beside
`cli/cmd_run.py`): cli.py parses arguments and shows results; tests call these directly.

    prepare   plan → Submission (files + jobs), the same value for `render` and `--dry-run`
    submit    pre-flight gate → prepare → run index (not for a dry run) → apply → exit code
    watch     status refreshes until every run has ended
    infer     ad-hoc inference with a trained adapter, on this machine
"""

from __future__ import annotations

import contextlib
import hashlib
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from . import run_index
from .backends import Backend, State, Submission, SubmitReport, canonical, get_backend
from .backends.base import WAITING, Foreground, write_files
from .grid import Plan
from .job.config import RunConfig
from .job.errors import QlaunchError
from .job.storage import RunPaths
from .jobspec import inference_job, launcher_environment

EXIT_OK, EXIT_FAILED, EXIT_INTERRUPTED = 0, 1, 130


def backend_for(plan: Plan, name: str | None) -> Backend:
    return get_backend(canonical(name or plan.experiment.backend))


def render(plan: Plan, backend: Backend, out_dir: Path) -> tuple[Submission, list[Path]]:
    """Every file a first submission would write or apply, into out_dir; no scheduler asked."""
    submission = backend.prepare(plan, offline=True)
    return submission, write_files(submission, out_dir)


def preflight_refusals(plan: Plan) -> tuple[list, list]:
    """(every estimate, the ones that will not fit their GPU): each run's training and, where
    the grid is evaluated in one job, that job."""
    from . import evaluation, preflight

    estimates = preflight.preflight(plan)
    graded = [run for run in plan.runs if run.inference.enabled and not evaluation.per_run(run, run.backend)]
    grid = preflight.estimate_evaluation(graded)
    if grid is not None:
        estimates.append(grid)
    return estimates, [e for e in estimates if not e.fits]


@dataclass
class SubmitResult:
    exit_code: int
    submission: Submission | None = None  # None when the pre-flight gate refused the plan
    report: SubmitReport = field(default_factory=SubmitReport)
    refused: list = field(default_factory=list)  # memory estimates that do not fit
    failed: list[str] = field(default_factory=list)  # runs that did not complete (foreground)
    dry_run: bool = False


@contextlib.contextmanager
def _one_submit_at_a_time(plan: Plan, backend: Backend, dry_run: bool):
    """A scheduler's submits of one experiment on this machine, one after the other (a `qlaunch
    submit` beside `status --watch --top-up`, or two submits): what is missing is decided and
    submitted under one lock, so the second sees the first's jobs and queues none of them twice.
    Not for a dry run, nor for a backend that runs the jobs here (that submit lasts the training)."""
    if dry_run or backend.foreground:
        yield
        return
    key = hashlib.sha256(f"{Path(plan.source).resolve()}\0{backend.name}".encode()).hexdigest()[:16]
    with run_index.file_lock(run_index.home() / "locks" / f"submit-{key}.lock"):
        yield


def submit(
    plan: Plan,
    backend: Backend,
    *,
    force: bool = False,
    dry_run: bool | str = False,
    skip_preflight: bool = False,
    foreground: Foreground | None = None,
    prepare: Callable[[Plan], Plan] | None = None,
) -> SubmitResult:
    """Submit a plan (or only prepare it, for a dry run). A backend that runs the jobs here
    (`foreground`) returns once they have ended, and the result says which runs failed.
    `prepare` runs once the plan passed the pre-flight gate, before anything is recorded or
    submitted (the hub prefetch: nothing is downloaded for a grid that would be refused)."""
    if not backend.foreground and not skip_preflight:
        _, refused = preflight_refusals(plan)
        if refused:
            return SubmitResult(EXIT_FAILED, refused=refused)
    if prepare is not None:
        plan = prepare(plan)
    with _one_submit_at_a_time(plan, backend, bool(dry_run)):
        submission = backend.prepare(plan, force=force, offline=dry_run == "client")
        if dry_run:
            return SubmitResult(
                EXIT_OK,
                submission,
                SubmitReport(skipped=dict(submission.skipped), notes=list(submission.notes)),
                dry_run=True,
            )
        run_index.record(plan, backend)  # only what is really submitted re-points `logs/cancel <run>`
        backend.reconcile(plan)
        report = backend.apply(submission, foreground)
    result = SubmitResult(EXIT_OK, submission, report)
    if backend.foreground:
        if report.interrupted:
            result.exit_code = EXIT_INTERRUPTED
            return result
        statuses = backend.status(plan)
        result.failed = [r for r, s in statuses.items() if s.state != State.COMPLETED or s.infer_state == State.FAILED]
        result.exit_code = EXIT_FAILED if result.failed else EXIT_OK
    return result


def top_up(plan: Plan, backend: Backend, say: Callable[[str], None]) -> bool:
    """One refresh of `status --watch --top-up`: what `qlaunch submit` does (the same prepare and
    apply, which queue only what is missing and never a job twice), saying what it queued.
    Returns whether runs still wait for room in the queue (the watch then keeps topping up).
    No pre-flight gate: the grid passed it (or was told to skip it) when it was first submitted."""
    try:
        report = submit(plan, backend, skip_preflight=True).report
    except QlaunchError as exc:  # e.g. sbatch refused midway: said, and tried again next refresh
        say(f"top-up: {exc}")
        return True
    waiting = sum(1 for why in report.skipped.values() if why == WAITING)
    if report.submitted:
        jobs = {job for ids in report.submitted.values() for job in ids}
        runs = sorted(report.submitted)
        shown = ", ".join(runs[:5]) + (", …" if len(runs) > 5 else "")
        left = "; the rest still waits for room" if waiting else "; nothing waits for room now"
        say(f"top-up: queued {len(jobs):,} job{'s' * (len(jobs) != 1)} for {len(runs):,} runs ({shown}){left}")
    return waiting > 0


def watch(
    plan: Plan,
    backend: Backend,
    show: Callable[[list], None],
    interval: float,
    top_up: Callable[[], bool] | None = None,
) -> None:
    """Refresh `show(rows)` every `interval` seconds until no run has anything active. With
    `top_up` (returns whether runs still wait for room), each refresh first queues what fits,
    and the watch goes on while runs wait."""
    from .status_view import collect

    waiting = top_up is not None
    while True:
        if waiting:
            waiting = top_up()
        rows = collect(plan, backend, reconcile=True)
        show(rows)
        if not waiting and all(not r.status.state.active and not r.status.infer_state.active for r in rows):
            return
        time.sleep(interval)


def infer(plan: Plan, run: RunConfig, extra: list[str], submitted: run_index.Resolved | None = None) -> int:
    """The inference job's entrypoint on this machine, with extra options (`qlaunch infer`).
    `submitted`: where the run went (backend, kube context), for the hint when it has not trained yet."""
    import sys

    from .hints import command as hint

    if not RunPaths.of(run).training_completed():
        status = hint("status", plan, submitted.backend if submitted else plan.experiment.backend, submitted)
        raise QlaunchError(f"run {run.run_id} has no trained adapter yet in {run.run_dir} ({status})")
    command = inference_job(run).placed(python=sys.executable, args=tuple(extra)).command
    return subprocess.call(command, env=launcher_environment())
