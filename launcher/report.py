"""`qlaunch report EXPERIMENT`: which run won, how the runs trained, and what restarts cost.

Writes report.html (one self-contained file, plots inlined), report.md (the table, for a pull
request or a wiki), report.json (launcher.json_output.ReportDocument) and the plots as PNG files,
into `<storage root>/<experiment>/report/` (Kubernetes: `./<experiment>-report/`) or `-o DIR`.

Everything comes from what `qlaunch status` already reads: the scheduler's state and each run's
progress events (storage; on Kubernetes the pods' logs), plus, where this machine can read the
run folder, metrics.json, inference/results.jsonl and attempts/*/environment.json.
"""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path
from typing import Any

from . import report_stats as stats
from .backends import backend_class
from .backends.base import Backend
from .export_command import exports_of
from .grid import Plan
from .job import ledger as ledgers
from .job.config import RunConfig
from .job.search import pruned_text
from .job.storage import RunPaths, atomic_write_text, read_json
from .json_output import (
    Answer,
    AttemptRecord,
    Benchmark,
    Environment,
    Metric,
    MetricInterval,
    ReportDocument,
    ReportRun,
    SearchAudit,
    SearchSummary,
)
from .report_verdict import comparison as compare_top_two
from .report_verdict import crowned, headline_interval, intervals, top_label, verdict
from .search_report import headline as search_headline
from .search_report import rung_lines as search_rung_lines
from .search_report import summarize as summarize_search
from .status_view import Row, collect, format_value

ANSWERS_SHOWN = 4
METRICS_EXPLAINED = (
    "Mean score over the held-out examples (inference.eval_file), base model → fine-tuned; in parentheses "
    "the 95% Wilson interval of the fine-tuned score. Overlapping intervals mean the runs are not told "
    "apart by these examples; the verdict above compares the top two runs example by example."
)
ENVIRONMENT_FILES = ("attempts/*/environment.json", "environment.json")


def default_output(plan: Plan, backend_name: str) -> Path:
    if not backend_class(backend_name).shares_storage:
        return Path.cwd() / f"{plan.experiment.name}-report"  # the runs' storage is not mounted here
    return plan.storage_root / plan.experiment.name / "report"


# ---- collecting ------------------------------------------------------------------------------
def build(plan: Plan, backend: Backend, backend_name: str, audit: SearchAudit | None = None) -> ReportDocument:
    rows = collect(plan, backend)
    scores = {
        run.run_id: stats.read_scores(RunPaths.of(run).inference / "results.jsonl", run.inference.metric)
        for run in plan.runs
    }
    runs = [_run(run, row, scores[run.run_id]) for run, row in zip(plan.runs, rows)]
    with_metric = [r for r in runs if r.metric is not None and r.metric.tuned is not None]
    if with_metric:
        ranked_by = f"{with_metric[0].metric.name} (tuned)"
        runs.sort(
            key=lambda r: (
                -(r.metric.tuned if r.metric and r.metric.tuned is not None else float("-inf")),
                _or_inf(r.final_loss),
            )
        )
        best = runs[0]
    else:
        ranked_by = "final_loss"
        # A run asha stopped early has an early loss: it never ranks above one that finished.
        # (From its `pruned` progress event: what every backend can read, the claim's files or not.)
        pruned = {row.run_id for row in rows if row.progress.pruned}
        runs.sort(key=lambda r: (r.run_id in pruned, _or_inf(r.final_loss)))
        best = runs[0] if runs and runs[0].final_loss is not None else None
    for rank, run in enumerate(runs, 1):
        run.rank, run.best = rank, run is best
    comparison = compare_top_two(with_metric and runs, scores)
    return ReportDocument(
        experiment=plan.experiment.name,
        backend=backend_name,
        generated_at=round(time.time(), 3),
        ranked_by=ranked_by,
        best_run=best.run_id if best else None,
        varying_keys=plan.varying_keys,
        notes=_notes(plan, backend_name, runs),
        files={},
        runs=runs,
        verdict=verdict(runs, comparison, bool(with_metric)),
        comparison=comparison,
        search=_with_audit(summarize_search(plan, runs), audit),
    )


def _with_audit(search: SearchSummary | None, audit: SearchAudit | None) -> SearchSummary | None:
    return search.model_copy(update={"audit": audit}) if search is not None and audit is not None else search


def _or_inf(value: float | None) -> float:
    return float("inf") if value is None else value


def _run(run: RunConfig, row: Row, scores: stats.Scores | None = None) -> ReportRun:
    paths = RunPaths.of(run)
    events = row.events
    ledger = ledgers.build(events, active=row.status.state.active)
    progress = row.progress
    curve: dict[int, float] = {}
    rates: list[float] = []
    evals: dict[int, float] = {}
    for event in events:
        if event.get("event") == "step" and event.get("loss") is not None:
            curve[int(event["step"])] = float(event["loss"])  # a redone step: the later value
            if event.get("tokens_per_second"):
                rates.append(float(event["tokens_per_second"]))
        elif event.get("event") == "eval" and event.get("eval_loss") is not None:
            evals[int(event["step"])] = float(event["eval_loss"])
    loss_curve = sorted(curve.items())
    metrics_file = read_json(paths.metrics) or {}
    summary = progress.inference_summary or read_json(paths.inference / "summary.json") or {}
    eval_loss = metrics_file.get("eval_loss")
    if eval_loss is None and evals:
        eval_loss = evals[max(evals)]
    gpus = run.resources.nodes * run.resources.gpus_per_node
    seconds = ledger.seconds
    metric = summary.get("metric")
    return ReportRun(
        rank=0,
        best=False,
        run_id=run.run_id,
        overrides=run.overrides,
        state=row.status.state.value,
        infer_state=row.status.infer_state.value,
        pruned=progress.pruned,
        step=progress.step,
        total_steps=progress.total_steps,
        final_loss=loss_curve[-1][1] if loss_curve else None,
        best_loss=min(curve.values()) if curve else None,
        eval_loss=eval_loss,
        metric=Metric(**_metric_fields(metric)) if isinstance(metric, dict) and "name" in metric else None,
        metrics=[
            Metric(**_metric_fields(m)) for m in summary.get("metrics", []) if isinstance(m, dict) and "name" in m
        ],
        tokens_per_second=round(sum(rates) / len(rates), 2) if rates else None,
        wall_seconds=round(seconds, 3),
        gpus=gpus,
        gpu_hours=round(gpus * seconds / 3600, 4),
        restarts=max(ledger.restarts, row.status.restarts or 0),
        steps_redone=ledger.steps_redone,
        lost_seconds=round(ledger.lost_seconds, 3),
        lost_gpu_hours=round(gpus * ledger.lost_seconds / 3600, 4),
        attempts=[AttemptRecord(**a.as_dict()) for a in ledger.attempts],
        loss_curve=loss_curve,
        eval_curve=sorted(evals.items()),
        environment=_environment(paths),
        answers=_answers(paths),
        intervals=intervals(summary, scores),
        exports=exports_of(run, row.events),
        benchmarks=_benchmarks(summary),
    )


def _benchmarks(summary: dict) -> list[Benchmark]:
    tasks = (summary.get("lm_eval") or {}).get("tasks") or {}
    return [
        Benchmark(task=task, **{key: row.get(key) for key in ("metric", "base", "tuned", "n")})
        for task, row in tasks.items()
        if isinstance(row, dict)
    ]


def _metric_fields(metric: dict) -> dict:
    return {key: metric.get(key) for key in ("name", "base", "tuned", "n")}


def _environment(paths: RunPaths) -> list[Environment]:
    """Per-attempt environment records (versions, device), where the trainer wrote them."""
    found = []
    for pattern in ENVIRONMENT_FILES:
        for path in sorted(paths.root.glob(pattern), key=lambda p: (len(str(p)), str(p))):
            data = read_json(path)
            if isinstance(data, dict):
                found.append(Environment(source=str(path.relative_to(paths.root)), data=data))
    return found


def _answers(paths: RunPaths) -> list[Answer]:
    """The first free prompts and held-out examples of the inference job, base and tuned."""
    try:
        lines = (paths.inference / "results.jsonl").read_text().splitlines()
    except OSError:
        return []
    answers = []
    for line in lines:
        try:
            row = json.loads(line)
            answers.append(Answer(**{k: row.get(k) for k in Answer.model_fields if k in row}))
        except (ValueError, TypeError):
            continue
        if len(answers) == ANSWERS_SHOWN:
            break
    return answers


def _notes(plan: Plan, backend_name: str, runs: list[ReportRun]) -> list[str]:
    notes = []
    if not backend_class(backend_name).shares_storage:
        readable = any(Path(run.run_dir).is_dir() for run in plan.runs)
        notes.append(
            "Kubernetes: progress, the recovery ledger and inference metrics come from the pods' logs "
            "(the QLAUNCH_PROGRESS lines), as for `qlaunch status`; pods that Kubernetes already deleted "
            "(the Jobs' ttlSecondsAfterFinished, evicted pods garbage-collected) are missing from the ledger."
        )
        if not readable:
            notes.append(
                f"Kubernetes: the runs' folders on the claim ({plan.storage_root / plan.experiment.name}) "
                "are not mounted on this machine, so the eval loss of metrics.json, the answers of "
                "inference/results.jsonl and the environment records are not shown; mount or copy the "
                "claim at that path (e.g. `kubectl cp`) and run the report again to include them."
            )
    if runs and not any(r.attempts for r in runs):
        notes.append("No run has started training yet: there is nothing to compare.")
    return notes


# ---- writing ---------------------------------------------------------------------------------
def write(document: ReportDocument, out: Path) -> ReportDocument:
    """report.json, report.md, report.html and the PNGs into `out`; returns the document with
    `files` filled in."""
    from . import report_plots

    out.mkdir(parents=True, exist_ok=True)
    images: dict[str, Path] = {}
    if report_plots.available():
        images = report_plots.draw_all(document, out)
    else:
        document.notes.append("No plots: matplotlib is not installed (pip install 'qlaunch[report]').")
    files = {name: str(path) for name, path in images.items()}
    for name in ("report.html", "report.md", "report.json"):
        files[name] = str(out / name)
    document.files = files
    atomic_write_text(out / "report.md", markdown(document))
    atomic_write_text(out / "report.html", html(document, images))
    atomic_write_text(out / "report.json", json.dumps(document.model_dump(mode="json"), indent=2) + "\n")
    return document


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def _number(value: float | None, digits: int = 4) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _gpu_hours(run: ReportRun, hours: float) -> str:
    return f"{hours:.3f}" if run.gpus else "– (CPU)"


def _gpu_time(run: ReportRun, hours: float, seconds: float) -> str:
    """GPU-hours and wall time (a CPU run: the wall time alone)."""
    return f"{hours:.3f} h ({_duration(seconds)})" if run.gpus else f"{_duration(seconds)} (CPU)"


def rank_cell(document: ReportDocument, run: ReportRun) -> str:
    """ "★ best" only for a lead the numbers support; a lead within noise says so."""
    if not run.best:
        return str(run.rank)
    if crowned(document):
        return "★ best"
    return "1 (lowest loss)" if document.ranked_by == "final_loss" else "1 (within noise)"


def table(document: ReportDocument) -> tuple[list[str], list[list[str]]]:
    """The grid table's header and rows (text), shared by report.md and report.html."""
    headline = next((r.metric.name for r in document.runs if r.metric), None)
    header = ["", "run", *document.varying_keys, "state", "steps", "final loss", "best loss"]
    if any(r.eval_loss is not None for r in document.runs):
        header.append("eval loss")
    if headline:
        header.append(f"{headline} base → tuned")
    header += ["tokens/s", "wall time", "GPU-hours", "restarts", "steps redone", "GPU-time lost"]
    rows = []
    for run in document.runs:
        state = run.state + ("" if run.infer_state in ("unknown", "completed") else f" (inference {run.infer_state})")
        if run.pruned and run.state == "completed":
            state = pruned_text(run.pruned)
        row = [
            rank_cell(document, run),
            run.run_id,
            *(format_value(run.overrides.get(k)) for k in document.varying_keys),
            state,
            f"{run.step}/{run.total_steps}" if run.total_steps else str(run.step),
            _number(run.final_loss),
            _number(run.best_loss),
        ]
        if "eval loss" in header:
            row.append(_number(run.eval_loss))
        if headline:
            row.append(_metric_cell(run.metric, headline_interval(run)))
        row += [
            "–" if run.tokens_per_second is None else f"{run.tokens_per_second:,.0f}",
            _duration(run.wall_seconds),
            _gpu_hours(run, run.gpu_hours),
            str(run.restarts),
            str(run.steps_redone),
            _gpu_time(run, run.lost_gpu_hours, run.lost_seconds),
        ]
        rows.append(row)
    return header, rows


def _metric_cell(metric: Metric | MetricInterval | None, interval: MetricInterval | None = None) -> str:
    """base → tuned, and the tuned score's 95% interval where there is one."""
    if metric is None or metric.tuned is None:
        return "–"
    base = "–" if metric.base is None else f"{metric.base:.2f}"
    span = (
        f" ({interval.tuned_low:.2f}–{interval.tuned_high:.2f})" if interval and interval.tuned_low is not None else ""
    )
    return f"{base} → {metric.tuned:.2f}{span}"


def metric_names(document: ReportDocument) -> list[str]:
    """Every configured metric any run has, headline first."""
    names: list[str] = []
    for run in document.runs:
        for metric in [*run.metrics, *run.intervals]:
            if metric.name not in names:
                names.append(metric.name)
    return names


def metrics_table(document: ReportDocument) -> tuple[list[str], list[list[str]]]:
    """Every metric of every run: base → tuned (95% interval of tuned), n. Empty when none."""
    names = metric_names(document)
    runs = [run for run in document.runs if run.metrics or run.intervals]
    if not names or not runs:
        return [], []
    header = ["", "run", *document.varying_keys, *(f"{name} base → tuned (95%)" for name in names), "n"]
    rows = []
    for run in runs:
        row = [
            rank_cell(document, run),
            run.run_id,
            *(format_value(run.overrides.get(k)) for k in document.varying_keys),
        ]
        n = None
        for name in names:
            interval = next((i for i in run.intervals if i.name == name), None)
            metric = next((m for m in run.metrics if m.name == name), None) or interval
            row.append(_metric_cell(metric, interval))
            n = n or (interval.n if interval else metric.n if metric else None)
        rows.append([*row, "–" if n is None else str(n)])
    return header, rows


BENCHMARKS_EXPLAINED = (
    "lm-evaluation-harness tasks (inference.lm_eval), scored in the grid evaluation job on the same "
    "loaded base model: the base model (adapters disabled) → each run's adapter, n examples per task."
)


def benchmark_names(document: ReportDocument) -> list[tuple[str, str | None]]:
    names: list[tuple[str, str | None]] = []
    for run in document.runs:
        for b in run.benchmarks:
            if (b.task, b.metric) not in names:
                names.append((b.task, b.metric))
    return names


def benchmarks_table(document: ReportDocument) -> tuple[list[str], list[list[str]]]:
    """A column per lm-eval task: base → tuned of its headline metric. Empty when none."""
    names = benchmark_names(document)
    runs = [run for run in document.runs if run.benchmarks]
    if not names:
        return [], []
    header = [
        "",
        "run",
        *document.varying_keys,
        *(f"{task} {metric or ''} base → tuned".strip() for task, metric in names),
        "n",
    ]
    rows = []
    for run in runs:
        row = [
            rank_cell(document, run),
            run.run_id,
            *(format_value(run.overrides.get(k)) for k in document.varying_keys),
        ]
        n = []
        for task, metric in names:
            found = next((b for b in run.benchmarks if (b.task, b.metric) == (task, metric)), None)
            if found is None or found.tuned is None:
                row.append("–")
                continue
            base = "–" if found.base is None else f"{found.base:.3f}"
            row.append(f"{base} → {found.tuned:.3f}")
            if found.n is not None and str(found.n) not in n:
                n.append(str(found.n))
        rows.append([*row, "/".join(n) or "–"])
    return header, rows


def markdown(document: ReportDocument) -> str:
    header, rows = table(document)

    def line(cells):
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    top = top_label(document)
    parts = [
        f"# {document.experiment}: {len(document.runs)} runs ({document.backend})",
        "",
        f"Ranked by {document.ranked_by}; {top}: **{document.best_run or '–'}**. "
        f"Generated {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(document.generated_at))}.",
        "",
    ]
    if document.verdict:
        parts += [f"**Verdict.** {document.verdict}", ""]
    parts += [line(header), line(["---"] * len(header)), *(line(row) for row in rows), ""]
    metric_header, metric_rows = metrics_table(document)
    if metric_rows:
        parts += [
            "## Held-out metrics",
            "",
            METRICS_EXPLAINED,
            "",
            line(metric_header),
            line(["---"] * len(metric_header)),
            *(line(row) for row in metric_rows),
            "",
        ]
    bench_header, bench_rows = benchmarks_table(document)
    if bench_rows:
        parts += [
            "## Standard benchmarks (lm-eval)",
            "",
            BENCHMARKS_EXPLAINED,
            "",
            line(bench_header),
            line(["---"] * len(bench_header)),
            *(line(row) for row in bench_rows),
            "",
        ]
    if document.search:
        parts += [
            "## Successive halving",
            "",
            search_headline(document.search),
            "",
            *(f"- {line}" for line in search_rung_lines(document.search)),
            "",
        ]
    exported = [
        f"- {run.run_id}: {e.kind} → {e.path}" + (f" (hub {e.hub.repo_id} @ {e.hub.revision[:10]})" if e.hub else "")
        for run in document.runs
        for e in run.exports
    ]
    if exported:
        parts += ["## Exports", "", *exported, ""]
    ledger_lines = _ledger_lines(document)
    if ledger_lines:
        parts += ["## Restarts", "", *ledger_lines, ""]
    for note in document.notes:
        parts.append(f"> {note}")
    return "\n".join(parts).rstrip() + "\n"


def interrupted(run: ReportRun) -> bool:
    """Restarted, or stopped without completing: the runs the recovery ledger lists."""
    return len(run.attempts) > 1 or any(a.outcome not in ("completed", "running") for a in run.attempts)


def _ledger_lines(document: ReportDocument) -> list[str]:
    return [
        f"- {run.run_id} attempt {attempt.number}: {attempt_text(attempt)}"
        for run in document.runs
        if interrupted(run)
        for attempt in run.attempts
    ]


def attempt_text(attempt: AttemptRecord) -> str:
    begin = "from scratch" if attempt.resumed_from is None else f"from checkpoint {attempt.resumed_from}"
    why = {
        "preempted": f"preempted ({attempt.signal or 'signal'}), checkpoint saved",
        "killed": "killed without a save",
        "failed": f"failed: {(attempt.message or '')[:120]}",
        "completed": "completed",
        "running": "running (no end event yet)",
    }[attempt.outcome]
    started = time.strftime("%H:%M:%S", time.gmtime(attempt.started_at)) if attempt.started_at else "?"
    if attempt.outcome == "running":
        return f"started {started} UTC {begin}, at step {attempt.stop_step} so far: {why}"
    cost = ""
    if attempt.outcome != "completed":
        cost = f"; {attempt.steps_redone} steps redone, {_duration(attempt.lost_seconds)} lost"
    return f"started {started} UTC {begin}, stopped at step {attempt.stop_step}: {why}{cost}"


def html(document: ReportDocument, images: dict[str, Path]) -> str:
    import jinja2
    import markupsafe

    header, rows = table(document)
    metric_header, metric_rows = metrics_table(document)
    bench_header, bench_rows = benchmarks_table(document)
    inline = {name: base64.b64encode(Path(path).read_bytes()).decode("ascii") for name, path in images.items()}
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(Path(__file__).parent)),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    # The whole dotted key (`r` alone says little), free to break after a dot in a narrow header.
    short = {key: markupsafe.Markup(".<wbr>").join(key.split(".")) for key in document.varying_keys}
    return env.get_template("report.html.j2").render(
        doc=document,
        header=header,
        short=short,
        rows=rows,
        metric_header=metric_header,
        metric_rows=metric_rows,
        metrics_explained=METRICS_EXPLAINED,
        bench_header=bench_header,
        bench_rows=bench_rows,
        benchmarks_explained=BENCHMARKS_EXPLAINED,
        top=top_label(document),
        rank_cell=rank_cell,
        images=inline,
        attempt_text=attempt_text,
        listed=[run for run in document.runs if interrupted(run)],
        generated=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(document.generated_at)),
        environment_table=environment_table,
        search_headline=search_headline,
        rung_lines=search_rung_lines,
    )


def environment_table(document: ReportDocument) -> tuple[list[tuple[str, str]], list[tuple[str, list[str], bool]]]:
    """Every run's attempt records side by side: ([(run id, record source)], [(dotted key,
    value per record, differs)]), so a version that differs between runs or between a
    preemption and its resume stands out."""
    columns, flat = [], []
    for run in document.runs:
        for env in run.environment:
            columns.append((run.run_id, env.source))
            flat.append(dict(_flatten(env.data)))
    keys: list[str] = []
    for record in flat:
        keys += [key for key in record if key not in keys]
    rows = []
    for key in keys:
        values = [_environment_value(key, record.get(key, "–")) for record in flat]
        per_attempt = key in ("attempt", "time") or key.startswith("scheduler.")  # differ by nature
        rows.append((key, values, not per_attempt and len(set(values)) > 1))
    return columns, rows


def _environment_value(key: str, value: Any) -> str:
    if key == "time" and isinstance(value, (int, float)):
        return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(value))
    return str(value)


def _flatten(data: dict, prefix: str = "") -> list[tuple[str, str]]:
    """An environment record as (dotted key, value) lines."""
    items = []
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            items += _flatten(value, name + ".")
        else:
            items.append((name, value if isinstance(value, str) else json.dumps(value)))
    return items


def print_summary(console, document: ReportDocument) -> None:
    """What `qlaunch report` says on the terminal: the winner and where the files are."""
    from rich.markup import escape

    best = next((r for r in document.runs if r.best), None)
    if best is not None:
        values = " ".join(f"{k}={format_value(v)}" for k, v in best.overrides.items())
        what = (
            _metric_cell(best.metric, headline_interval(best))
            if best.metric
            else f"final loss {_number(best.final_loss)}"
        )
        top = top_label(document)
        console.print(f"{top}: [bold]{best.run_id}[/] {escape(values)} ({document.ranked_by}: {what})")
    if document.verdict:
        console.print(escape(document.verdict))
    lost = sum(r.lost_seconds for r in document.runs)
    redone = sum(r.steps_redone for r in document.runs)
    restarts = sum(r.restarts for r in document.runs)
    console.print(
        f"{len(document.runs)} runs, {restarts} restarts, {redone} steps redone, {_duration(lost)} lost to restarts"
    )
    if document.search:
        console.print(escape(search_headline(document.search)))
    for note in document.notes:
        console.print(f"[yellow]note:[/] {note}")
    console.print(f"report: {document.files.get('report.html')}")
