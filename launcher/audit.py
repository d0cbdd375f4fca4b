"""`qlaunch report EXP --audit` (issue #30): what stopping runs early cost. Each run asha stopped
is finished to its own budget from the checkpoint it saved at its rung, in a copy beside the grid
(`<storage root>/<experiment>/audit/<run id>/`: the run's own folder, adapter and decision stay
as they are), and the report says whether the winner would have changed (pruning regret).

A finished copy is exactly the run a plain grid would have trained (the learning-rate schedule
spans the full budget either way; bit for bit on CPU: tests/test_asha.py), so the audit answers
"would the plain grid have crowned another run?" at the price of the stopped runs' remaining
steps only. The copies train here, one after the other, like `qlaunch run` (the grid's storage
must be readable here); a copy already finished is reused.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Callable

from .backends.local import train_command
from .grid import Plan
from .job.config import RunConfig
from .job.errors import QlaunchError
from .job.hub import offline_env
from .job.search import pruned_decision
from .job.storage import RunPaths, read_json, write_run_config
from .jobspec import launcher_environment
from .json_output import SearchAudit

FOLDER = "audit"


def audit_copy(run: RunConfig) -> RunConfig:
    """The run as a plain grid trains it, in the audit folder."""
    return run.model_copy(
        update={
            "run_dir": str(Path(run.run_dir).parent / FOLDER / run.run_id),
            "search": run.search.model_copy(update={"strategy": "grid"}),
        }
    )


def finish(run: RunConfig, decision: dict, say: Callable[[str], None]) -> RunConfig:
    """Train the copy of a stopped run from its rung checkpoint to the end (unless done)."""
    copy = audit_copy(run)
    paths, original = RunPaths.of(copy), RunPaths.of(run)
    if paths.training_completed():
        return copy
    rung_checkpoint = original.checkpoints / f"checkpoint-{decision.get('step')}"
    if not rung_checkpoint.is_dir():
        raise QlaunchError(
            f"run {run.run_id}: its rung checkpoint {rung_checkpoint} is gone; the audit "
            "cannot finish it as the plain grid would have"
        )
    paths.checkpoints.mkdir(parents=True, exist_ok=True)
    shutil.copytree(rung_checkpoint, paths.checkpoints / rung_checkpoint.name, dirs_exist_ok=True)
    write_run_config(copy)
    say(
        f"{run.run_id}: finishing from step {decision.get('step')} (stopped at rung {decision.get('rung')}); "
        f"log {paths.train_log}"
    )
    with open(paths.train_log, "ab") as log:
        code = subprocess.call(
            train_command(copy),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**launcher_environment(), **offline_env(copy)},
            cwd=paths.root,
        )
    if code != 0 or not paths.training_completed():
        raise QlaunchError(f"run {run.run_id}: the audit's training of it failed (exit {code}); see {paths.train_log}")
    return copy


def audit(plan: Plan, say: Callable[[str], None] = lambda line: None) -> SearchAudit | None:
    """Finish every stopped run; the winner by the search metric with and without stopping."""
    search = plan.experiment.search
    if search.strategy != "asha":
        raise QlaunchError(
            f"{plan.where('search.strategy')}: --audit needs search.strategy: asha "
            f"(this grid is {search.strategy!r}: no run was stopped early)"
        )
    sign = 1 if search.mode == "min" else -1
    values: dict[str, float] = {}
    finished: dict[str, float] = {}
    for run in plan.runs:
        metrics = read_json(RunPaths.of(run).metrics) or {}
        decision = pruned_decision(RunPaths.of(run).metrics)
        if decision:
            copy = finish(run, decision, say)
            value = (read_json(RunPaths.of(copy).metrics) or {}).get(search.metric)
            if value is not None:
                finished[run.run_id] = float(value)
        elif metrics.get(search.metric) is not None:
            values[run.run_id] = float(metrics[search.metric])
    if not values:
        return None
    winner = min(values, key=lambda rid: sign * values[rid])
    everything = {**values, **finished}
    plain_winner = min(everything, key=lambda rid: sign * everything[rid])
    return SearchAudit(
        metric=search.metric,
        mode=search.mode,
        winner=winner,
        winner_value=values[winner],
        plain_winner=plain_winner,
        plain_winner_value=everything[plain_winner],
        finished=finished,
        regret=round(sign * (values[winner] - everything[plain_winner]), 6),
    )


def audit_line(found: SearchAudit) -> str:
    if found.plain_winner == found.winner:
        sign = 1 if found.mode == "min" else -1
        best_stopped = min(found.finished.items(), key=lambda item: sign * item[1], default=None)
        tail = (
            f"; the best stopped run, finished, reaches {best_stopped[1]:.4f} ({best_stopped[0]})"
            if best_stopped
            else ""
        )
        return (
            f"Audit: {len(found.finished)} stopped runs finished to their budget; the winner stays "
            f"{found.winner} ({found.metric} {found.winner_value:.4f}){tail}: no pruning regret."
        )
    return (
        f"Audit: {len(found.finished)} stopped runs finished to their budget; the plain grid would have "
        f"crowned {found.plain_winner} ({found.metric} {found.plain_winner_value:.4f}) over {found.winner} "
        f"({found.winner_value:.4f}): pruning regret {found.regret:.4f}."
    )
