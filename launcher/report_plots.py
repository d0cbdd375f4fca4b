"""The report's plots (PNG), with matplotlib: the optional `qlaunch[report]` extra.

matplotlib is imported only here and only when drawing (the launcher starts without it), and
through `matplotlib.figure.Figure` rather than pyplot: no GUI backend, no global figure state.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from .json_output import ReportDocument, ReportRun
from .status_view import format_value

LOSS_PNG = "loss.png"
METRIC_PNG = "metric.png"


def available() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def label(run: ReportRun, crown: bool = True) -> str:
    """Run id and grid values; ★ on the best run only where its lead is established."""
    values = " ".join(f"{key}={format_value(value)}" for key, value in run.overrides.items())
    return f"{'★ ' if run.best and crown else ''}{run.run_id} {values}".strip()


def _crown(document: ReportDocument) -> bool:
    from .report_verdict import crowned  # the report's own rule, not a second one

    return crowned(document)


def draw_all(document: ReportDocument, out: Path) -> dict[str, Path]:
    """Name → PNG path of each plot there is data for."""
    images = {}
    if any(run.loss_curve for run in document.runs):
        images[LOSS_PNG] = loss_curves(document, out / LOSS_PNG)
    if any(run.metric is not None for run in document.runs):
        images[METRIC_PNG] = metric_bars(document, out / METRIC_PNG)
    return images


def loss_curves(document: ReportDocument, path: Path) -> Path:
    """Training loss of every run on one plot; eval loss (dashed, same colour) where there is one."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(9, 4.8), layout="constrained")
    axes = figure.subplots()
    cycle = [c["color"] for c in _colour_cycle()]
    crown = _crown(document)
    for index, run in enumerate(document.runs):
        colour = cycle[index % len(cycle)]
        if run.loss_curve:
            steps, losses = zip(*run.loss_curve)
            axes.plot(
                steps,
                losses,
                color=colour,
                linewidth=2.2 if run.best else 1.4,
                marker="o" if len(steps) <= 12 else None,
                markersize=3,
                label=label(run, crown),
            )
        if run.eval_curve:
            steps, losses = zip(*run.eval_curve)
            axes.plot(steps, losses, color=colour, linestyle="--", marker="s", markersize=4, label=f"{run.run_id} eval")
        for attempt in run.attempts[1:]:
            if attempt.resumed_from:  # where a restart resumed: the curve goes on from there
                axes.axvline(attempt.resumed_from, color=colour, linestyle=":", linewidth=1, alpha=0.7)
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.set_title(
        f"{document.experiment}: training loss"
        + (" (dashed: eval)" if any(r.eval_curve for r in document.runs) else "")
    )
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=8, loc="upper right")
    figure.savefig(path, dpi=110)
    return path


def metric_bars(document: ReportDocument, path: Path) -> Path:
    """Base vs tuned per run, one panel per configured metric, best run at the top; the tuned
    bar carries its 95% interval (where the report has one): bars whose intervals overlap are
    not told apart by the held-out examples."""
    from matplotlib.figure import Figure

    runs = [run for run in document.runs if run.metric is not None]
    names = []
    for run in runs:
        names += [m.name for m in run.metrics or [run.metric] if m.name not in names]
    figure = Figure(figsize=(min(5.2 * len(names), 16), 1.7 + 0.55 * max(2, len(runs))), layout="constrained")
    panels = figure.subplots(1, len(names), sharey=True, squeeze=False)[0]
    positions = list(range(len(runs)))[::-1]  # best at the top
    height = 0.38
    for index, (axes, name) in enumerate(zip(panels, names)):
        metrics = [next((m for m in run.metrics or [run.metric] if m.name == name), None) for run in runs]
        intervals = [next((i for i in run.intervals if i.name == name), None) for run in runs]
        base = [m.base or 0.0 if m else 0.0 for m in metrics]
        tuned = [m.tuned or 0.0 if m else 0.0 for m in metrics]
        low = [t - i.tuned_low if i and i.tuned_low is not None else 0.0 for t, i in zip(tuned, intervals)]
        high = [i.tuned_high - t if i and i.tuned_high is not None else 0.0 for t, i in zip(tuned, intervals)]
        bars_base = axes.barh([p + height / 2 for p in positions], base, height, label="base", color="#9aa5b1")
        bars_tuned = axes.barh(
            [p - height / 2 for p in positions],
            tuned,
            height,
            label="tuned (95% interval)",
            color="#2f80ed",
            xerr=[low, high] if any(low + high) else None,
            error_kw={"ecolor": "#1f2933", "capsize": 3, "elinewidth": 1},
        )
        axes.bar_label(bars_base, fmt="%.2f", padding=3, fontsize=8)
        for position, value, above in zip(positions, tuned, high):  # right of the interval's cap
            axes.text(value + above + 0.02, position - height / 2, f"{value:.2f}", va="center", fontsize=8)
        axes.set_xlim(0, 1.25)
        n = next((m.n for m in metrics if m and m.n), None)
        axes.set_xlabel(f"{name} (n = {n or '?'} held-out examples)")
        axes.grid(True, axis="x", alpha=0.3)
        if index == 0:
            crown = _crown(document)
            axes.set_yticks(positions, [label(run, crown) for run in runs], fontsize=8)
            figure.legend(handles=[bars_base, bars_tuned], loc="outside lower center", ncols=2, fontsize=8)
    figure.suptitle(f"{document.experiment}: base vs fine-tuned, every metric")
    figure.savefig(path, dpi=110)
    return path


def _colour_cycle():
    import matplotlib

    return matplotlib.rcParams["axes.prop_cycle"]
