"""The grid as a rich table: scheduler state + progress events, one row per run.

The run id and the state are never cut. On a narrow terminal the table first puts each dotted
grid key's header on two lines, then drops other columns (ETA first), the grid keys last, and
says under the table which columns it hid (`qlaunch status --wide` shows them all); when stdout
is not a terminal it is printed whole (`qlaunch status ... | cat`). Off an interactive terminal
(a pipe, a file, TERM=dumb) `--watch` prints one plain table per refresh and `qlaunch run`
prints a progress line per running job every PROGRESS_SECONDS (`progress_lines`).
"""

from __future__ import annotations

import codecs
import io
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from rich.cells import cell_len
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from .backends.base import Backend, RunStatus, State
from .grid import Plan
from .job.environments import attempt_records, version_mismatches
from .job.progress import Progress, read_events, summarize
from .job.search import pruned_text
from .job.storage import RunPaths

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

# A run with no job the scheduler knows of and no progress event: it was never started (the
# state stays "unknown" in --json, with this detail).
NOT_STARTED = "not started"


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
        return {run.run_id: sorted(events.get(run.run_id, []), key=lambda e: e.get("time") or 0) for run in plan.runs}
    return {run.run_id: read_events(RunPaths.of(run).progress) for run in plan.runs}


def collect(plan: Plan, backend: Backend, reconcile: bool = False) -> list[Row]:
    """One refresh: the backend's status call (constant scheduler calls) + progress events;
    with `reconcile`, the backend's writes first (Kubernetes: a finished run's inference)."""
    if reconcile:
        backend.reconcile(plan)
    statuses = backend.status(plan)
    events = run_events(plan, backend)
    rows = [
        Row(
            run.run_id,
            run.overrides,
            statuses.get(run.run_id, RunStatus()),
            summarize(events[run.run_id]),
            events[run.run_id],
        )
        for run in plan.runs
    ]
    for row in rows:
        status = row.status
        if status.state == State.UNKNOWN and not row.events and not status.job_ids and not status.detail:
            status.detail = NOT_STARTED
    return rows


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


def _two_lines(dotted: str) -> str:
    """A dotted key's header over two lines (`lora.` / `target_modules`): narrower, still whole."""
    section, dot, rest = dotted.partition(".")
    return f"{section}.\n{rest}" if dot else dotted


def format_value(value) -> str:
    """A grid value as written in YAML (flow style): `[q_proj, v_proj]`, `true`, `2e-05`, never a
    Python repr."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(format_value(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{key}: {format_value(item)}" for key, item in value.items()) + "}"
    return str(value)


def _arrow() -> str:
    """→, or -> where stdout cannot encode it (so the column is measured as it prints)."""
    encoding = (getattr(sys.stdout, "encoding", None) or "utf-8").lower().replace("-", "")
    return "→" if encoding.startswith("utf") else "->"


def metric_text(metric: dict | None) -> str:
    if not metric:
        return "–"
    base = f"{metric['base']:.2f} {_arrow()} " if metric.get("base") is not None else ""
    return f"{base}{metric['tuned']:.2f}"


def _cells(plan: Plan, rows: list[Row]) -> dict[str, list]:
    """Column name → one cell per row, in display order."""
    columns: dict[str, list] = {"run": [row.run_id for row in rows]}
    for key in plan.varying_keys:
        columns[key] = [Text(format_value(row.overrides.get(key))) for row in rows]  # not markup: [a, b]
    columns.update(state=[], step=[], loss=[], elapsed=[], eta=[], restarts=[], infer=[])
    for row in rows:
        progress, status = row.progress, row.status
        total = progress.total_steps
        if status.detail == NOT_STARTED:
            state = Text(NOT_STARTED, style="dim")
        elif progress.pruned and status.state == State.COMPLETED:
            state = Text(pruned_text(progress.pruned), style="yellow")
        else:
            state = Text(status.state.value, style=STATE_STYLE[status.state])
            if status.detail:
                state.append(f" ({status.detail})", style="dim")
        columns["state"].append(state)
        columns["step"].append(f"{progress.step}/{total}" if total else (str(progress.step) if progress.step else "–"))
        columns["loss"].append(f"{progress.loss:.4f}" if progress.loss is not None else "–")
        columns["elapsed"].append(_duration(progress.elapsed))
        columns["eta"].append(_duration(progress.eta()) if status.state == State.RUNNING else "–")
        columns["restarts"].append(str(max(progress.restarts, status.restarts or 0)))
        if status.infer_state == State.UNKNOWN:
            infer = Text("–")  # no inference job (yet): "unknown" would say nothing more
        else:
            infer = Text(status.infer_state.value, style=STATE_STYLE[status.infer_state])
        if status.infer_detail:
            infer.append(f" ({status.infer_detail})", style="dim")
        columns["infer"].append(infer)
    metrics = [row.metric for row in rows]
    named = next((m for m in metrics if m), None)
    if named:  # once inference has run: base → tuned of the headline metric
        columns[str(named.get("name", "metric"))] = [metric_text(m) for m in metrics]
    return columns


# Dropped in this order when the terminal is too narrow (the metric next, the grid keys last,
# each named under the table); run and state always stay.
_DROP_ORDER = ("eta", "elapsed", "restarts", "infer", "loss", "step")


def build_table(plan: Plan, rows: list[Row], backend_name: str, width: int | None = None) -> Table:
    """The status table; with `width`, dotted headers go on two lines, then columns are dropped
    until every cell fits whole, and the caption names what was hidden."""
    columns = _cells(plan, rows)
    keys = set(plan.varying_keys)
    title = f"{plan.experiment.name} · {backend_name} · {len(rows)} runs · {time.strftime('%H:%M:%S')}"
    headers = {name: name for name in columns}
    hidden: list[str] = []
    if width is None:
        return _captioned(_table(title, columns, headers, keys, {}), plan, hidden, width)

    def fitted() -> Table | None:
        widths = _allocate(columns, headers, keys, width)
        if widths is None:
            return None
        # The allocation, checked on a rendering of the rows that decide it (each column's widest
        # cell and longest word): the same column widths as all rows, a thousand rows or three.
        sample = _deciding_rows(columns)
        probe = _table(
            title, {name: [cells[i] for i in sample] for name, cells in columns.items()}, headers, keys, widths
        )
        return None if _cuts_a_cell(probe, width) else _table(title, columns, headers, keys, widths)

    table = fitted()
    if table is None:
        headers = {name: _two_lines(name) if name in keys else name for name in columns}
        droppable = [*_DROP_ORDER]
        droppable += [
            name for name in columns if name not in droppable and name not in ("run", "state") and name not in keys
        ]
        droppable += list(reversed(plan.varying_keys))
        table = fitted()
        while table is None and droppable:
            name = droppable.pop(0)
            if columns.pop(name, None) is not None:
                hidden.append(name)
            table = fitted()
    if table is None:  # nothing left to drop: run id and state, wrapped as rich can
        table = _table(title, columns, headers, keys, {})
    return _captioned(table, plan, hidden, width)


def _captioned(table: Table, plan: Plan, hidden: list[str], width: int | None) -> Table:
    """Under the table: what a narrow terminal hid, and versions that make runs not comparable."""
    keys = set(plan.varying_keys)
    captions = []
    if hidden:
        hidden_keys = [name for name in hidden if name in keys]
        others = [name for name in hidden if name not in keys]
        text = f"hidden to fit {width} columns: {', '.join(others)}" if others else f"at {width} columns"
        if hidden_keys:
            text += f"; grid keys hidden: {', '.join(hidden_keys)} (runs may look alike)"
        captions.append(Text(text + "; `qlaunch status --wide` shows every column", style="yellow"))
    mismatches = version_mismatches({run.run_id: attempt_records(Path(run.run_dir)) for run in plan.runs})
    if mismatches:
        captions.append(
            Text("not comparable: " + "; ".join(mismatches) + " (attempts/<n>/environment.json)", style="yellow")
        )
    if captions:
        table.caption = Text("\n").join(captions)
        table.caption_justify = "left"
    return table


def _table(
    title: str, columns: dict[str, list], headers: dict[str, str], keys: set[str], widths: dict[str, int]
) -> Table:
    """The rich table; `widths` fixes the wrapping columns (grid keys, state) where they must
    be narrower than their longest cell."""
    table = Table(title=title, title_justify="left", header_style="bold")
    for name in columns:
        header = headers.get(name, name)
        if name == "run":
            table.add_column(name, no_wrap=True)
        elif name == "state":
            # The state word never shrinks; a long detail after it wraps instead of being cut.
            table.add_column(name, overflow="fold", width=widths.get(name))
        elif name in keys:
            # A grid value wraps between list items, never inside a word.
            table.add_column(header, justify="right", overflow="fold", width=widths.get(name))
        else:
            table.add_column(header, justify="left" if name == "infer" else "right", no_wrap=True)
    for cells in zip(*columns.values()):
        table.add_row(*cells)
    return table


def _deciding_rows(columns: dict[str, list]) -> list[int]:
    """The rows whose cells decide the table's column widths: per column, the one with the widest
    line and the one with the longest word."""
    chosen: set[int] = set()
    for cells in columns.values():
        if not cells:
            continue
        texts = [_plain(cell) for cell in cells]
        chosen.add(max(range(len(texts)), key=lambda i: max(map(cell_len, texts[i].split("\n")), default=0)))
        chosen.add(max(range(len(texts)), key=lambda i: max(map(cell_len, texts[i].split()), default=0)))
    return sorted(chosen)


def _plain(cell) -> str:
    return cell.plain if isinstance(cell, Text) else str(cell)


def _min_width(header: str, cells: list, name: str) -> int:
    """The narrowest a column may be without cutting a word (its state word, for `state`)."""
    words = header.split()
    for cell in cells:
        text = _plain(cell)
        words += _state_words(text) if name == "state" else text.split()
    return max(map(cell_len, words), default=1)


def _natural_width(header: str, cells: list) -> int:
    return max(cell_len(line) for text in [header, *map(_plain, cells)] for line in text.split("\n"))


def _state_words(cell: str) -> list[str]:
    """The state's own words (not its detail in parentheses): "not started" may go over two
    lines on a narrow terminal, but never breaks inside "started"."""
    return cell.split(" (", 1)[0].split()


def _allocate(columns: dict[str, list], headers: dict[str, str], keys: set[str], width: int) -> dict[str, int] | None:
    """Widths that print every cell whole within `width` (None: impossible): the columns that
    may wrap (grid keys, state) give up room, the widest first, down to their longest word; the
    others keep their full width. Fixed here rather than left to rich, which squeezes an
    over-wide table evenly, down to nothing."""
    natural = {name: _natural_width(headers.get(name, name), cells) for name, cells in columns.items()}
    wrapping = [name for name in columns if name in keys or name == "state"]
    least = {
        name: _min_width(headers.get(name, name), columns[name], name) if name in wrapping else natural[name]
        for name in columns
    }
    room = width - (len(columns) + 1) - 2 * len(columns)  # borders, and one space either side of a cell
    if sum(least.values()) > room:
        return None
    widths = dict(natural)
    excess = sum(widths.values()) - room
    while excess > 0:
        name = max((n for n in wrapping if widths[n] > least[n]), key=lambda n: widths[n])
        widths[name] -= 1
        excess -= 1
    return {name: widths[name] for name in wrapping if widths[name] < natural[name]}


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
                pruned=row.progress.pruned,
                exports=exports_of(runs[row.run_id], row.events),
            )
            for row in rows
        ],
    ).model_dump(mode="json")


# ---- plain progress, off an interactive terminal (CI logs, nohup, a pipe, TERM=dumb) -----------
PROGRESS_SECONDS = 30.0  # between progress lines of `qlaunch run`; QLAUNCH_PROGRESS_SECONDS overrides


def progress_line(row: Row) -> str:
    """One running job as a log line: `<run> key=value step 40/120 (33%) loss 1.2345 elapsed 1:20 ETA 3:20`."""
    progress = row.progress
    parts = [row.run_id, *(f"{key}={format_value(value)}" for key, value in row.overrides.items())]
    if progress.total_steps:
        parts.append(f"step {progress.step}/{progress.total_steps} ({100 * progress.step // progress.total_steps}%)")
    else:
        parts.append(f"step {progress.step}")
    if progress.loss is not None:
        parts.append(f"loss {progress.loss:.4f}")
    if progress.tokens_per_second:
        parts.append(f"{progress.tokens_per_second:,.0f} tok/s")
    parts.append(f"elapsed {_duration(progress.elapsed)}")
    eta = progress.eta()
    parts.append(f"ETA {_duration(eta)}" if eta is not None else "ETA –")
    return " ".join(parts)


class ProgressLines:
    """Lines for the running training jobs whose step moved, at most every `seconds`
    (the first call prints at once for each run that has logged a step)."""

    def __init__(self, seconds: float | None = None):
        if seconds is None:
            seconds = float(os.environ.get("QLAUNCH_PROGRESS_SECONDS") or PROGRESS_SECONDS)
        self.seconds = seconds
        self._last_time = float("-inf")
        self._last_step: dict[str, int] = {}

    def due(self) -> bool:
        return time.monotonic() - self._last_time >= self.seconds

    def __call__(self, rows: list[Row]) -> list[str]:
        self._last_time = time.monotonic()
        lines = []
        for row in rows:
            if row.status.state != State.RUNNING or not row.progress.step:
                continue
            if self._last_step.get(row.run_id) == row.progress.step:
                continue
            self._last_step[row.run_id] = row.progress.step
            lines.append(progress_line(row))
        return lines


def print_plain_refresh(console: Console, table: Table) -> None:
    """One refresh of `status --watch` off an interactive terminal: the whole table, then a blank
    line, flushed (a pipe or a CI log sees each refresh as it happens)."""
    console.print(table)
    console.line()
    console.file.flush()


def print_progress(console: Console, lines: list[str]) -> None:
    for line in lines:
        console.print(f"{time.strftime('%H:%M:%S')} {escape(line)}", soft_wrap=True)
    if lines:
        console.file.flush()


# ---- a terminal that cannot print UTF-8 (PYTHONIOENCODING=ascii, LANG=C on an old system) --------
_PLAIN = {
    "→": "->",
    "–": "-",
    "—": "-",
    "·": "|",
    "…": "...",
    "★": "*",
    "✓": "ok",
    "✗": "x",
    "≈": "~",
    "≥": ">=",
    "≤": "<=",
    "×": "x",
    "±": "+/-",
    "✔": "ok",
    "✘": "x",
}


def _plain_characters(error: UnicodeError):
    text = error.object[error.start : error.end]
    return "".join(_PLAIN.get(char, "?") for char in text), error.end


codecs.register_error("qlaunch-plain", _plain_characters)


def plain_streams() -> None:
    """stdout/stderr that cannot encode UTF-8 spell qlaunch's arrows and dashes in ASCII instead of
    raising UnicodeEncodeError mid-table (rich draws its boxes in ASCII there by itself)."""
    for stream in (sys.stdout, sys.stderr):
        encoding = (getattr(stream, "encoding", None) or "").lower().replace("-", "")
        if encoding and not encoding.startswith("utf") and hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="qlaunch-plain")
