"""The grid evaluation job, from the launcher's side (issue #29): which runs it evaluates, its job
spec and where its runs file goes. One job (`python -m training.evaluate_grid <runs file>`) loads
each distinct base model once and answers for every listed run's adapter; it writes each run's
`inference/summary.json` and `results.jsonl` exactly as the per-run inference job does. The files
it shares with the job, and the eval-set fingerprint: launcher/job/grid_evaluation.py. Imports
nothing of the training stack.
"""

from __future__ import annotations

import sys
from pathlib import Path

from .job.config import RunConfig
from .job.grid_evaluation import LOG_FILE, OUTCOMES_FILE, RUNS_FILE, already_scored, folder
from .job.storage import RunPaths, atomic_write_text, read_json
from .jobspec import JobSpec, inference_job

EVALUATE = "evaluate"


def per_run(run: RunConfig, backend: str) -> bool:
    """Whether the run gets its own inference job (`inference.per_run`). Unset: one evaluation
    job per grid where the backend has it (local, Slurm, Kubernetes: `Backend.grid_evaluation`)."""
    chosen = run.inference.per_run
    from .backends import backend_class  # the backends import this module

    return chosen if chosen is not None else not backend_class(backend).grid_evaluation


def infer_log(run: RunConfig, backend: str) -> Path:
    """What `qlaunch logs RUN --infer` shows: the run's own inference log, or the grid evaluation
    job's log where that job evaluates the run (every run's answers and scores, in order)."""
    return RunPaths.of(run).infer_log if per_run(run, backend) else folder([run]) / LOG_FILE


def to_evaluate(runs, force: bool = False) -> tuple[list[RunConfig], dict[str, str]]:
    """(runs with a trained adapter not yet scored on their eval set, run id → why the others
    are left out)."""
    chosen, left_out = [], {}
    for run in runs:
        paths = RunPaths.of(run)
        if not run.inference.enabled:
            left_out[run.run_id] = "inference.enabled is false"
        elif not paths.training_completed():
            left_out[run.run_id] = "not trained yet"
        elif not force and already_scored(run):
            left_out[run.run_id] = "already scored on this eval set"
        else:
            chosen.append(run)
    return chosen, left_out


def write_runs_file(runs, place: Path | None = None) -> Path:
    place = place or folder(runs)
    path = place / RUNS_FILE
    atomic_write_text(path, "".join(str(RunPaths.of(run).config) + "\n" for run in runs))
    return path


def evaluation_job(runs, runs_file: Path, *, python: str | None = None, extra: tuple[str, ...] = ()) -> JobSpec:
    """The grid's evaluation job: the first run's inference job (its environment, one GPU),
    started on the runs file instead of one run.yaml."""
    spec = inference_job(runs[0])
    place = runs_file.parent
    return JobSpec(
        run_id=EVALUATE,
        role=EVALUATE,
        python=python or spec.python,
        module="training.evaluate_grid",
        run_yaml=str(runs_file),
        args=tuple(extra),
        env=spec.env,
        resources=spec.resources,
        workdir=str(place),
        log=str(place / LOG_FILE),
        mounts=tuple(sorted({m for run in runs for m in inference_job(run).mounts})),
    )


def local_command(runs, runs_file: Path, extra: tuple[str, ...] = ()) -> list[str]:
    """The job as a process on this machine, run by this qlaunch's own python."""
    return evaluation_job(runs, runs_file, python=sys.executable, extra=extra).command


def outcomes(runs) -> dict[str, dict]:
    """run id → {outcome, why} from the last evaluation job's evaluation.json."""
    return (read_json(folder(runs) / OUTCOMES_FILE) or {}).get("runs", {})
