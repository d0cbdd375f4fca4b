"""The grid evaluation job on Slurm (issue #29): one sbatch script for the grid, submitted with
`--dependency=afterany:<the grid's training jobs>` so that it starts once all of them have ended,
whatever their end; the job evaluates the runs that trained and names the others.

Rendered like a run's inference script (slurm script: the same environment block, container and
directives, on `slurm.inference_partition`), from the first evaluated run's settings.
"""

from __future__ import annotations

from pathlib import Path

from ... import evaluation, templates
from ...job import grid_evaluation
from ...job.config import RunConfig
from .script import _context, _infer_directives, _scheduling, _validate, directive

EVALUATE_SCRIPT = "evaluate.sbatch"


def job_name(runs) -> str:
    return f"{runs[0].name}-evaluate"


def render_evaluation(
    runs: list[RunConfig], runs_file: Path | None = None, extra: tuple[str, ...] = ()
) -> tuple[str, tuple[str, ...]]:
    """(script text, the directives sbatch --test-only is asked about)."""
    for run in runs:
        _validate(run)
    runs_file = runs_file or grid_evaluation.folder(runs) / grid_evaluation.RUNS_FILE
    spec = evaluation.evaluation_job(runs, runs_file, extra=extra)
    first = runs[0]
    directives = [
        f"--job-name={job_name(runs)}" if d.startswith("--job-name=") else d for d in _infer_directives(first, spec)
    ]
    context = _context(first, spec)
    context["run_id"] = "grid"
    text = templates.render(
        "slurm", "evaluate.sbatch.j2", **context, run_count=len(runs), directives=[directive(d) for d in directives]
    )
    return text, _scheduling(directives)
