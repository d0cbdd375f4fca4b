"""Standard benchmarks in the grid evaluation job: lm-evaluation-harness (`inference.lm_eval`).

The job has loaded the (4-bit) base model once and attached every run's adapter by name; lm-eval's
`HFLM` wraps that same model (no second load), and `lm_eval.simple_evaluate` runs the tasks once
with the adapters disabled (the base model) and once per adapter (`set_adapter`). Each task's
scores land in the run's `inference/summary.json` as `lm_eval` (launcher/job/grid_evaluation.py
`lm_eval_summary` says the shape), the base model's once per base model in
`<experiment>/evaluation/lm_eval.json`.

Local tasks: `include_path` is lm-eval's `TaskManager(include_path=...)`, and the evaluation runs
with that folder as working directory, so a task's relative `dataset_kwargs.data_files` are
relative to it (as the launcher checked them at plan time).
"""

from __future__ import annotations

import contextlib
import functools
import os
from pathlib import Path
from typing import Any

from launcher.job.config import LmEvalConfig, RunConfig
from launcher.job.errors import ConfigError

from .entrypoint import log

# The metric shown as a task's score (report column, tracker), the first the task reports.
PREFERRED = ("acc", "acc_norm", "exact_match", "f1", "mcc", "bleu", "rouge1")
BOOTSTRAP_ITERS = 1000  # stderr of non-mean metrics (acc's is closed-form)


def include_folder(run: RunConfig) -> Path | None:
    settings = run.inference.lm_eval
    return run.resolve_path(settings.include_path) if settings and settings.include_path else None


def task_manager(run: RunConfig):
    """lm-eval's index of tasks (its own and include_path's): seconds to build, so once per folder."""
    folder = include_folder(run)
    return _task_manager(str(folder) if folder else None)


@functools.lru_cache(maxsize=8)
def _task_manager(include_path: str | None):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path)


def problem(run: RunConfig) -> str | None:
    """Why this run's lm-eval tasks cannot run here (before the model is loaded), or None."""
    import importlib.util

    settings = run.inference.lm_eval
    if settings is None:
        return None
    if importlib.util.find_spec("lm_eval") is None:
        return "inference.lm_eval: lm_eval is not installed in the job's environment (pip install 'qlaunch[lm-eval]')"
    folder = include_folder(run)
    if folder is not None and not folder.is_dir():
        return f"inference.lm_eval.include_path: no folder {folder}"
    known = set(task_manager(run).all_tasks)
    unknown = [task for task in settings.tasks if task not in known]
    if unknown:
        import difflib

        close = {t: difflib.get_close_matches(t, sorted(known), n=3, cutoff=0.6) for t in unknown}
        names = "; ".join(f"{t!r}" + (f" (close names: {', '.join(close[t])})" if close[t] else "") for t in unknown)
        return f"inference.lm_eval.tasks: no such lm-eval task: {names}"
    return None


def headline(metrics: dict[str, float]) -> str | None:
    for name in PREFERRED:
        if name in metrics:
            return name
    return next(iter(metrics), None)


def _scores(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """lm-eval's results → {task: {"metrics": {name: value}, "n": examples}}."""
    out: dict[str, dict[str, Any]] = {}
    samples = results.get("n-samples", {})
    for task, values in results.get("results", {}).items():
        metrics: dict[str, float] = {}
        for key, value in values.items():
            name, _, _filter = key.partition(",")
            if not _ or name.endswith("_stderr") or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            metrics.setdefault(name, float(value))
        if not metrics:
            continue
        n = samples.get(task, {})
        out[task] = {"metrics": metrics, "n": int(n.get("effective", n.get("original", 0)) or 0)}
    return out


@contextlib.contextmanager
def _working_directory(folder: Path | None):
    if folder is None:
        yield
        return
    before = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(before)


def evaluate(lm, settings: LmEvalConfig, run: RunConfig) -> dict[str, dict[str, Any]]:
    import lm_eval

    with _working_directory(include_folder(run)):
        results = lm_eval.simple_evaluate(
            model=lm,
            tasks=list(settings.tasks),
            num_fewshot=settings.num_fewshot,
            limit=settings.limit,
            batch_size=settings.batch_size,
            task_manager=task_manager(run),
            log_samples=False,
            bootstrap_iters=BOOTSTRAP_ITERS,
        )
    return _scores(results or {})


def run_benchmarks(model, tokenizer, run: RunConfig, adapters: list[str], base: bool) -> dict[str, dict]:
    """Scores of the base model (key "__base__", when `base`) and of each named adapter, on the
    model the job already loaded; the adapters stay attached."""
    from lm_eval.models.huggingface import HFLM

    settings = run.inference.lm_eval
    assert settings is not None
    padding_side = tokenizer.padding_side
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=settings.batch_size)
    scores: dict[str, dict] = {}
    try:
        if base:
            with model.disable_adapter():
                scores["__base__"] = evaluate(lm, settings, run)
            log(f"lm-eval base model: {one_line(scores['__base__'])}")
        for name in adapters:
            model.set_adapter(name)
            scores[name] = evaluate(lm, settings, run)
            log(f"lm-eval {name}: {one_line(scores[name])}")
    finally:
        tokenizer.padding_side = padding_side
    return scores


def one_line(scores: dict[str, dict]) -> str:
    parts = []
    for task, entry in scores.items():
        name = headline(entry["metrics"])
        if name is not None:
            parts.append(f"{task} {name} {entry['metrics'][name]:.3f} (n={entry['n']})")
    return ", ".join(parts) or "no scores"


def summary_field(run: RunConfig, base: dict[str, dict] | None, tuned: dict[str, dict]) -> dict[str, Any]:
    """The `lm_eval` field of a run's summary.json: per task, the headline metric base → tuned
    and every metric of both."""
    from importlib.metadata import version

    settings = run.inference.lm_eval
    if settings is None:
        raise ConfigError("no inference.lm_eval")
    tasks: dict[str, Any] = {}
    for task, entry in tuned.items():
        name = headline(entry["metrics"])
        row: dict[str, Any] = {"metric": name, "tuned": entry["metrics"].get(name), "n": entry["n"]}
        if base and task in base:
            row["base"] = base[task]["metrics"].get(name)
        row["metrics"] = {
            "tuned": entry["metrics"],
            **({"base": base[task]["metrics"]} if base and task in base else {}),
        }
        tasks[task] = row
    return {
        "version": version("lm_eval"),
        "tasks_requested": list(settings.tasks),
        "limit": settings.limit,
        "num_fewshot": settings.num_fewshot,
        "tasks": tasks,
    }
