"""The grid as a rich table: scheduler state + progress events, one row per run.

The run id and the state are never cut: on a narrow terminal the table drops other columns
(ETA first); when stdout is not a terminal it is printed whole (`qlaunch status ... | cat`).
"""

from __future__ import annotations

import io
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
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


# Width a piped (non-terminal) stdout gets: wide enough that no table is ever cut.
PIPE_WIDTH = 10_000


@dataclass
class Row:
    run_id: str
    overrides: dict
    status: RunStatus
    progress: Progress
    events: list[dict] = field(default_factory=list, repr=False)

    @property
    def metric(self) -> dict | None:
        """The inference job's headline metric {name, base, tuned, n}, once it has run."""
        metric = (self.progress.inference_summary or {}).get("metric")
        return metric if isinstance(metric, dict) and "tuned" in metric else None


def run_events(plan: Plan, backend: Backend) -> dict[str, list[dict]]:
    """Each run's progress events: from storage, or from the backend when this machine cannot
    read it (Kubernetes: pod logs). Call right after backend.status() (the lists are reused)."""
    events = backend.progress_events(plan)  # None: this machine reads the run folders
    if events is not None:
        # Pods are read in creation order, which ties within a second (a replacement pod created
        # right after the evicted one): order by the events' own times (stable for equal ones).
        return {run.run_id: sorted(events.get(run.run_id, []), key=lambda e: e.get("time") or 0)
                for run in plan.runs}  # fmt: skip
    return {run.run_id: read_events(RunPaths.of(run).progress) for run in plan.runs}


def collect(plan: Plan, backend: Backend) -> list[Row]:
    """One refresh: the backend's status call (constant scheduler calls) + progress events."""
    statuses = backend.status(plan)
    events = run_events(plan, backend)
    return [
        Row(run.run_id, run.overrides, statuses.get(run.run_id, RunStatus()), summarize(events[run.run_id]),
            events[run.run_id])  # fmt: skip
        for run in plan.runs
    ]


def output_width() -> int | None:
    """The console width for qlaunch's stdout: the terminal's (or $COLUMNS); PIPE_WIDTH when
    stdout is a pipe or a file, so that `qlaunch status | cat` shows whole cells."""
    if os.environ.get("COLUMNS") or sys.stdout.isatty():
        return None
    return PIPE_WIDTH


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


def metric_text(metric: dict | None) -> str:
    if not metric:
        return "–"
    base = f"{metric['base']:.2f} → " if metric.get("base") is not None else ""
    return f"{base}{metric['tuned']:.2f}"


def _cells(plan: Plan, rows: list[Row]) -> dict[str, list]:
    """Column name → one cell per row, in display order."""
    columns: dict[str, list] = {"run": [row.run_id for row in rows]}
    for key in plan.varying_keys:
        columns[_short_key(key)] = [_value(row.overrides.get(key)) for row in rows]
    columns.update(state=[], step=[], loss=[], elapsed=[], eta=[], restarts=[], infer=[])
    for row in rows:
        progress, status = row.progress, row.status
        total = progress.total_steps
        state = Text(status.state.value, style=STATE_STYLE[status.state])
        if status.detail:
            state.append(f" ({status.detail})", style="dim")
        columns["state"].append(state)
        columns["step"].append(f"{progress.step}/{total}" if total else (str(progress.step) if progress.step else "–"))
        columns["loss"].append(f"{progress.loss:.4f}" if progress.loss is not None else "–")
        columns["elapsed"].append(_duration(progress.elapsed))
        columns["eta"].append(_duration(progress.eta()) if status.state == State.RUNNING else "–")
        columns["restarts"].append(str(max(progress.restarts, status.restarts or 0)))
        infer = Text(status.infer_state.value, style=STATE_STYLE[status.infer_state])
        if status.infer_detail:
            infer.append(f" ({status.infer_detail})", style="dim")
        columns["infer"].append(infer)
    metrics = [row.metric for row in rows]
    named = next((m for m in metrics if m), None)
    if named:  # once inference has run: base → tuned of the headline metric
        columns[str(named.get("name", "metric"))] = [metric_text(m) for m in metrics]
    return columns


# Dropped in this order when the terminal is too narrow; run and state always stay.
_DROP_ORDER = ("eta", "elapsed", "restarts", "infer", "loss", "step")


def build_table(plan: Plan, rows: list[Row], backend_name: str, width: int | None = None) -> Table:
    """The status table; with `width`, columns are dropped until no cell needs cutting."""
    columns = _cells(plan, rows)
    title = f"{plan.experiment.name} · {backend_name} · {len(rows)} runs · {time.strftime('%H:%M:%S')}"
    table = _table(title, columns)
    if width is not None:
        droppable = [*_DROP_ORDER, *reversed([_short_key(k) for k in plan.varying_keys])]
        droppable += [name for name in columns if name not in droppable and name not in ("run", "state")]
        while _cuts_a_cell(table, width) and droppable:
            columns.pop(droppable.pop(0), None)
            table = _table(title, columns)
    mismatches = version_mismatches({run.run_id: attempt_records(Path(run.run_dir)) for run in plan.runs})
    if mismatches:
        table.caption = Text(
            "not comparable: " + "; ".join(mismatches) + " (attempts/<n>/environment.json)", style="yellow"
        )
        table.caption_justify = "left"
    return table


def _table(title: str, columns: dict[str, list]) -> Table:
    table = Table(title=title, title_justify="left", header_style="bold")
    for name in columns:
        if name == "run":
            table.add_column(name, no_wrap=True, min_width=max([len(name), *map(len, columns[name])]))
        elif name == "state":
            # The state word never shrinks; a long detail after it wraps instead of being cut.
            widest = max([len(name), *(len(cell.plain.split(" ", 1)[0]) for cell in columns[name])])
            table.add_column(name, overflow="fold", min_width=widest)
        else:
            table.add_column(name, justify="left" if name == "infer" else "right", no_wrap=True)
    for cells in zip(*columns.values()):
        table.add_row(*cells)
    return table


def _cuts_a_cell(table: Table, width: int) -> bool:
    """Would this width cut the table: a cell shortened to "…", or the right edge cropped?
    (Rendered aside, nothing printed.)"""
    console = Console(width=width, file=io.StringIO(), color_system=None)
    console.print(table)
    text = console.file.getvalue()
    return "…" in text or not text.rstrip().endswith(table.box.bottom_right if table.box else "")


def status_document(plan: Plan, rows: list[Row], backend_name: str) -> dict:
    """`qlaunch status --json` (shape: launcher.json_output.StatusDocument, README)."""
    from .export_command import exports_of
    from .json_output import StatusDocument, StatusRun

    runs = {run.run_id: run for run in plan.runs}
    return StatusDocument(
        experiment=plan.experiment.name,
        backend=backend_name,
        time=round(time.time(), 3),
        varying_keys=plan.varying_keys,
        runs=[
            StatusRun(
                run_id=row.run_id,
                overrides=row.overrides,
                state=row.status.state.value,
                detail=row.status.detail,
                infer_state=row.status.infer_state.value,
                infer_detail=row.status.infer_detail,
                job_ids=row.status.job_ids,
                step=row.progress.step,
                total_steps=row.progress.total_steps,
                loss=row.progress.loss,
                tokens_per_second=row.progress.tokens_per_second,
                elapsed_seconds=row.progress.elapsed,
                eta_seconds=row.progress.eta() if row.status.state == State.RUNNING else None,
                restarts=max(row.progress.restarts, row.status.restarts or 0),
                metric=row.metric,
                exports=exports_of(runs[row.run_id]),
            )
            for row in rows
        ],
    ).model_dump(mode="json")
