"""`qlaunch evaluate EXP [--runs ...]`: the grid evaluation job (issue #29) on demand — after a
failure, after new prompts or references, after more runs finished. Evaluates the runs that have
trained and are not yet scored on their current eval set (launcher.evaluation), in one job: on
this machine (local backend) or as a Slurm job. `cli.py` only registers it."""

from __future__ import annotations

import argparse
import subprocess

from rich.console import Console
from rich.markup import escape

from . import evaluation
from .backends import canonical
from .grid import plan
from .job import grid_evaluation
from .job.errors import QlaunchError
from .job.storage import RunPaths, read_json
from .jobspec import launcher_environment

HELP = (
    "Evaluate the grid's trained runs in one job (base model loaded once, every adapter); "
    "runs already scored on the same prompts, references and settings are skipped."
)


def add_arguments(command: argparse.ArgumentParser) -> None:
    command.add_argument("experiment")
    command.add_argument("--runs", nargs="+", metavar="RUN", help="run ids (or unique prefixes); default: every run")
    command.add_argument("--force", action="store_true", help="evaluate runs already scored on this eval set too")
    command.add_argument(
        "--backend",
        "-b",
        choices=["local", "slurm"],
        help="local: in this process's machine, now; slurm: one job (default: the experiment's)",
    )
    command.add_argument("--dry-run", action="store_true", help="say which runs would be evaluated; start nothing")


def cmd_evaluate(args: argparse.Namespace) -> int:
    console = Console(highlight=False)
    p = plan(args.experiment)
    runs = [run for ref in args.runs for run in p.find(ref)] if args.runs else list(p.runs)
    runs = list({run.run_id: run for run in runs}.values())
    chosen, left_out = evaluation.to_evaluate(runs, args.force)
    for run_id, why in left_out.items():
        console.print(escape(f"{run_id} skipped: {why}"))
    if not chosen:
        console.print("nothing to evaluate")
        return 0
    name = canonical(args.backend or p.experiment.backend)
    console.print(f"{len(chosen)} runs to evaluate in one job: {', '.join(run.run_id for run in chosen)}")
    if args.dry_run:
        return 0
    extra = ("--force",) if args.force else ()
    if name == "slurm":
        from .backends.slurm.backend import SlurmBackend

        job_id = SlurmBackend().evaluate(chosen, force=args.force)
        console.print(
            f"grid evaluation job {job_id} submitted; log: {grid_evaluation.folder(chosen) / grid_evaluation.LOG_FILE}"
        )
        return 0
    if name != "local":
        raise QlaunchError(
            f"qlaunch evaluate runs on this machine or on Slurm, not on {name} yet: "
            "use --backend local where the storage root is mounted"
        )
    runs_file = evaluation.write_runs_file(chosen)
    code = subprocess.call(
        evaluation.local_command(chosen, runs_file, extra), env=launcher_environment(), cwd=runs_file.parent
    )
    outcomes = evaluation.outcomes(chosen)
    for run in chosen:
        outcome = outcomes.get(run.run_id, {})
        if outcome.get("outcome") != "evaluated":
            console.print(escape(f"{run.run_id} not evaluated: {outcome.get('why', f'the job exited with {code}')}"))
            continue
        summary = read_json(RunPaths.of(run).inference / "summary.json") or {}
        metric = summary.get("metric") or {}
        if "tuned" in metric:
            base = f"base {metric['base']:.2f} → " if "base" in metric else ""
            console.print(
                escape(
                    f"{run.run_id}: {metric.get('name')} {base}tuned {metric['tuned']:.2f} "
                    f"on {metric.get('n')} held-out prompts"
                )
            )
        for task, row in ((summary.get("lm_eval") or {}).get("tasks") or {}).items():
            if row.get("tuned") is None:
                continue
            base = f"base {row['base']:.3f} → " if row.get("base") is not None else ""
            console.print(
                escape(
                    f"{run.run_id}: lm-eval {task} {row.get('metric')} {base}tuned {row['tuned']:.3f} on {row.get('n')}"
                )
            )
        if "tuned" not in metric and not (summary.get("lm_eval") or {}).get("tasks"):
            console.print(f"{run.run_id}: evaluated")
    return code
