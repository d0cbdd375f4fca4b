"""The launcher's input gate: every run of a grid checked before anything starts (the checks
themselves: launcher/job/run_checks.py, which the job runs again), each finding located in the
experiment file; `qlaunch plan/render/run/submit` refuse the whole grid when any run has one
(`refuse_bad_inputs`).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from .job.config import RunConfig
from .job.data_files import Rows, read_rows
from .job.experiment_file import locate_key
from .job.lm_eval_tasks import dataset_findings
from .job.run_checks import Finding, InputError, Problem, check_run


def check_plan(plan, backend: str | None = None) -> list[Problem]:
    """Every problem of every run of the grid (errors and info lines), each once, located in the
    experiment file: a grid value's own line where a grid value set the key."""
    from .backends import backend_class  # the backends import the plan, which imports this

    source = str(plan.source)
    lines = plan.key_lines
    backend = backend or plan.experiment.backend
    grid = plan.experiment.grid
    cache: dict[Path, Rows] = {}

    def read(path: Path) -> Rows:
        if path not in cache:
            cache[path] = read_rows(path)
        return cache[path]

    found: dict[Problem, list[str]] = {}
    kind = backend_class(backend)
    for run in plan.runs:
        findings = check_run(kind.job_view(run, plan.storage_root), read=read)
        findings += kind.input_findings(run, plan.storage_root)
        findings += dataset_findings(
            run, remote=not kind.foreground, storage_root=None if kind.shares_storage else plan.storage_root
        )
        for finding in findings:
            problem = locate(finding, run, grid, lines, source)
            found.setdefault(problem, []).append(run.run_id)
    problems = []
    for problem, run_ids in found.items():
        if len(plan.runs) > 1 and len(run_ids) < len(plan.runs):
            problem = replace(
                problem, message=f"{problem.message} (run{'s' if len(run_ids) > 1 else ''} {', '.join(run_ids)})"
            )
        problems.append(problem)
    return problems


def locate(finding: Finding, run: RunConfig, grid: dict, lines: dict[tuple, int], source: str) -> Problem:
    key, line = locate_key(lines, finding.key, grid, run.overrides)
    return Problem(source, line, key, finding.message, finding.path, finding.level)


# --- the two callers -------------------------------------------------------------------------------


def refuse_bad_inputs(plan, backend: str | None, skip: bool, console) -> list[Problem]:
    """What `qlaunch plan/render/run/submit/check` do right after the plan is built: say the
    info lines, and raise InputError (exit 2) with every error before anything starts."""
    if skip:
        console.print(
            "input checks skipped (--skip-input-checks): each job checks its inputs when it starts",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
        return []
    problems = check_plan(plan, backend)
    for problem in problems:
        if problem.level == "info":
            console.print(f"note: {problem}", markup=False, highlight=False, soft_wrap=True)
    errors = [problem for problem in problems if problem.level == "error"]
    if errors:
        raise InputError(errors)
    return problems
