"""The report's plots (PNG), with matplotlib: the optional `qlaunch[report]` extra.

matplotlib is imported only here and only when drawing (the launcher starts without it), and
through `matplotlib.figure.Figure` rather than pyplot: no GUI backend, no global figure state.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from .json_output import ReportDocument, ReportRun

LOSS_PNG = "loss.png"
METRIC_PNG = "metric.png"


def available() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def label(run: ReportRun) -> str:
    values = " ".join(f"{key.rsplit('.', 1)[-1]}={value:g}" if isinstance(value, float)
                      else f"{key.rsplit('.', 1)[-1]}={value}" for key, value in run.overrides.items())  # fmt: skip
    return f"{'★ ' if run.best else ''}{run.run_id} {values}".strip()


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
    for index, run in enumerate(document.runs):
        colour = cycle[index % len(cycle)]
        if run.loss_curve:
            steps, losses = zip(*run.loss_curve)
            axes.plot(steps, losses, color=colour, linewidth=2.2 if run.best else 1.4,
                      marker="o" if len(steps) <= 12 else None, markersize=3, label=label(run))  # fmt: skip
        if run.eval_curve:
            steps, losses = zip(*run.eval_curve)
            axes.plot(steps, losses, color=colour, linestyle="--", marker="s", markersize=4,
                      label=f"{run.run_id} eval")  # fmt: skip
        for attempt in run.attempts[1:]:
            if attempt.resumed_from:  # where a restart resumed: the curve goes on from there
                axes.axvline(attempt.resumed_from, color=colour, linestyle=":", linewidth=1, alpha=0.7)
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.set_title(f"{document.experiment}: training loss" + (" (dashed: eval)" if any(r.eval_curve for r in document.runs) else ""))
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=8, loc="upper right")
    figure.savefig(path, dpi=110)
    return path


def metric_bars(document: ReportDocument, path: Path) -> Path:
    """Base vs tuned headline metric per run, best run first."""
    from matplotlib.figure import Figure

    runs = [run for run in document.runs if run.metric is not None]
    name = runs[0].metric.name
    figure = Figure(figsize=(9, 0.5 + 0.9 * max(2, len(runs)) * 0.6 + 1.2), layout="constrained")
    axes = figure.subplots()
    positions = list(range(len(runs)))[::-1]  # best at the top
    height = 0.38
    base = [run.metric.base or 0.0 for run in runs]
    tuned = [run.metric.tuned or 0.0 for run in runs]
    bars_base = axes.barh([p + height / 2 for p in positions], base, height, label="base", color="#9aa5b1")
    bars_tuned = axes.barh([p - height / 2 for p in positions], tuned, height, label="tuned", color="#2f80ed")
    for bars in (bars_base, bars_tuned):
        axes.bar_label(bars, fmt="%.2f", padding=3, fontsize=8)
    axes.set_yticks(positions, [label(run) for run in runs], fontsize=8)
    axes.set_xlim(0, max(1.0, max(base + tuned) * 1.15))
    axes.set_xlabel(f"{name} (n = {runs[0].metric.n or '?'} held-out examples)")
    axes.set_title(f"{document.experiment}: {name}, base vs fine-tuned")
    axes.grid(True, axis="x", alpha=0.3)
    axes.legend(fontsize=8, loc="lower right")
    figure.savefig(path, dpi=110)
    return path


def _colour_cycle():
    import matplotlib

    return matplotlib.rcParams["axes.prop_cycle"]
