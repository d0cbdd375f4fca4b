"""What `qlaunch report` says of an asha grid (search.strategy asha): each rung's results, the
runs it promoted and stopped, and the GPU time spent against a full grid's."""

from __future__ import annotations

from pathlib import Path

from .grid import Plan
from .job.search import read_ledger, run_decisions
from .json_output import ReportRun, SearchRung, SearchSummary


def summarize(plan: Plan, runs: list[ReportRun]) -> SearchSummary | None:
    search = plan.experiment.search
    if search.strategy != "asha" or not plan.runs:
        return None
    experiment_folder = Path(plan.runs[0].run_dir).parent
    decisions = {run.run_id: run_decisions(Path(run.run_dir)) for run in plan.runs}
    rungs = []
    for rung, results in read_ledger(experiment_folder).items():
        mine = {rid: found[rung] for rid, found in decisions.items() if rung in found}
        first = next(iter(mine.values()), {})
        rungs.append(
            SearchRung(
                rung=rung,
                at=first.get("at"),
                unit=first.get("unit"),
                results={rid: value for rid, value in results.items() if rid in decisions},
                continued=sorted(rid for rid, d in mine.items() if not d.get("prune")),
                stopped=sorted(rid for rid, d in mine.items() if d.get("prune")),
            )
        )
    trained = full = 0
    spent = full_hours = 0.0
    by_id = {run.run_id: run for run in plan.runs}
    for report_run in runs:
        budget = report_run.total_steps or by_id[report_run.run_id].train.max_steps
        step = report_run.step
        trained += step
        full += max(budget or step, step)
        spent += report_run.gpu_hours
        # The full run's GPU time at the rate this run was measured at.
        full_hours += report_run.gpu_hours * (budget / step) if step and budget else report_run.gpu_hours
    pruned = sorted(rid for rid, found in decisions.items() if any(d.get("prune") for d in found.values()))
    return SearchSummary(
        strategy="asha",
        metric=search.metric,
        mode=search.mode,
        reduction_factor=search.reduction_factor,
        rungs=rungs,
        pruned=pruned,
        trained_steps=trained,
        full_steps=full,
        gpu_hours=round(spent, 4),
        full_gpu_hours=round(full_hours, 4),
        saved_gpu_hours=round(full_hours - spent, 4),
        saved_fraction=round(1 - trained / full, 4) if full else 0.0,
    )


def headline(summary: SearchSummary) -> str:
    if summary.audit is not None:
        from .audit import audit_line

        return _headline(summary) + " " + audit_line(summary.audit)
    return _headline(summary)


def _headline(summary: SearchSummary) -> str:
    return (
        f"Successive halving (asha, η = {summary.reduction_factor}, {summary.metric} {summary.mode}): "
        f"{len(summary.pruned)} runs stopped early; {summary.trained_steps:,} of {summary.full_steps:,} steps "
        f"trained ({summary.saved_fraction:.0%} saved), {summary.gpu_hours:.2f} GPU-hours spent of "
        f"{summary.full_gpu_hours:.2f} for the full grid (estimated from each run's measured rate)."
    )


def rung_lines(summary: SearchSummary) -> list[str]:
    lines = []
    for rung in summary.rungs:
        size = f" ({rung.at:,} {rung.unit[:-1] if rung.at == 1 else rung.unit})" if rung.at and rung.unit else ""
        ordered = sorted(rung.results.items(), key=lambda item: item[1] * (1 if summary.mode == "min" else -1))
        values = ", ".join(f"{rid} {value:.4f}{' ✗' if rid in rung.stopped else ''}" for rid, value in ordered)
        lines.append(f"rung {rung.rung}{size}: {len(rung.continued)} went on, {len(rung.stopped)} stopped — {values}")
    return lines
