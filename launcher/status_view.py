"""The grid as a rich table: scheduler state + progress events, one row per run."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from rich.table import Table
from rich.text import Text

from .backends.base import Backend, RunStatus, State
from .environments import attempt_records, version_mismatches
from .grid import Plan
from .progress import Progress, read_events, summarize
from .storage import RunPaths

STATE_STYLE = {
    State.UNKNOWN: "dim",
    State.PENDING: "yellow",
    State.RUNNING: "bold cyan",
    State.REQUEUED: "magenta",
    State.COMPLETED: "green",
    State.FAILED: "bold red",
    State.CANCELLED: "dim red",
    State.TIMEOUT: "red",
    State.OUT_OF_MEMORY: "bold red",
}


@dataclass
class Row:
    run_id: str
    overrides: dict
    status: RunStatus
    progress: Progress


def collect(plan: Plan, backend: Backend) -> list[Row]:
    """One refresh: the backend's status call (constant scheduler calls) + progress events."""
    statuses = backend.status(plan)
    events = backend.progress_events(plan)  # None: this machine reads the run folders
    rows = []
    for run in plan.runs:
        run_events = events.get(run.run_id, []) if events is not None else read_events(RunPaths.of(run).progress)
        rows.append(Row(run.run_id, run.overrides, statuses.get(run.run_id, RunStatus()), summarize(run_events)))
    return rows


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _short_key(dotted: str) -> str:
    return dotted.rsplit(".", 1)[-1]


def _value(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def build_table(plan: Plan, rows: list[Row], backend_name: str) -> Table:
    table = Table(
        title=f"{plan.experiment.name} · {backend_name} · {len(rows)} runs · {time.strftime('%H:%M:%S')}",
        title_justify="left",
        header_style="bold",
    )
    table.add_column("run")
    for key in plan.varying_keys:
        table.add_column(_short_key(key), justify="right")
    for name in ("state", "step", "loss", "elapsed", "eta", "restarts", "infer"):
        table.add_column(name, justify="left" if name in ("state", "infer") else "right")
    for row in rows:
        progress, status = row.progress, row.status
        total = progress.total_steps
        step = f"{progress.step}/{total}" if total else (str(progress.step) if progress.step else "–")
        state = Text(status.state.value, style=STATE_STYLE[status.state])
        if status.detail:
            state.append(f" ({status.detail})", style="dim")
        restarts = max(progress.restarts, status.restarts or 0)
        table.add_row(
            row.run_id,
            *(_value(row.overrides.get(key)) for key in plan.varying_keys),
            state,
            step,
            f"{progress.loss:.4f}" if progress.loss is not None else "–",
            _duration(progress.elapsed),
            _duration(progress.eta()) if status.state == State.RUNNING else "–",
            str(restarts),
            Text(status.infer_state.value, style=STATE_STYLE[status.infer_state]),
        )
    mismatches = version_mismatches({run.run_id: attempt_records(Path(run.run_dir)) for run in plan.runs})
    if mismatches:
        table.caption = Text(
            "not comparable: " + "; ".join(mismatches) + " (attempts/<n>/environment.json)", style="yellow"
        )
        table.caption_justify = "left"
    return table
