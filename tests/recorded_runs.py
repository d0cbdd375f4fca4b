"""Run folders as a finished (or running) job leaves them, written without training: progress
events, local.json, metrics.json, the adapter marker, inference/summary.json and results.jsonl.
`qlaunch status` and `qlaunch report` read exactly these, so their tests need no model.
"""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

from launcher.grid import plan
from launcher.job.config import RunConfig
from launcher.job.storage import RunPaths, write_json, write_run_config

REFERENCE = '{"city": "Paris", "country": "France"}'
RIGHT = REFERENCE
FENCED = '```json\n{"city": "Paris", "country": "France"}\n```'  # right only for json_match_fenced
WRONG_VALUE = '{"city": "Lyon", "country": "France"}'  # right shape: format_match only
PROSE = "The city is Paris."  # wrong for every JSON metric


def experiment(
    folder: Path, grid: dict, metric: str = "json_match,json_match_fenced,format_match", name: str = "recorded"
) -> Path:
    """A small experiment file (never trained: the tests write its run folders)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "eval.jsonl").write_text(json.dumps({"prompt": "p", "reference": REFERENCE}) + "\n")
    lines = "\n".join(f"  {key}: {json.dumps(values)}" for key, values in grid.items())
    path = folder / f"{name}.yaml"
    path.write_text(
        textwrap.dedent(f"""\
        name: {name}
        storage:
          root: {folder / "runs"}
        inference:
          eval_file: eval.jsonl
          metric: {json.dumps(metric)}
        grid:
        """)
        + lines
        + "\n"
    )
    return path


def runs(path: Path) -> list[RunConfig]:
    return plan(path).runs


def trained(run: RunConfig, losses: list[float], eval_loss: float | None = None, start: float = 1_796_000_000.0):
    """A completed training: start, one step event per loss, end; metrics.json; the adapter."""
    paths = RunPaths.of(run)
    write_run_config(run)
    total = len(losses)
    events = [
        {
            "event": "start",
            "time": start,
            "step": 0,
            "total_steps": total,
            "attempt": 1,
            "resumed_from": None,
            "launched_at": start - 5,
        }
    ]
    for step, loss in enumerate(losses, 1):
        events.append(
            {
                "event": "step",
                "time": start + 10 * step,
                "step": step,
                "total_steps": total,
                "loss": loss,
                "tokens_per_second": 900.0,
            }
        )
    if eval_loss is not None:
        events.append({"event": "eval", "time": start + 10 * total, "step": total, "eval_loss": eval_loss})
    events.append(
        {"event": "end", "time": start + 10 * total + 1, "step": total, "total_steps": total, "status": "completed"}
    )
    paths.progress.write_text("".join(json.dumps(e) + "\n" for e in events))
    write_json(paths.metrics, {"eval_loss": eval_loss} if eval_loss is not None else {"train_loss": losses[-1]})
    paths.adapter.mkdir(parents=True, exist_ok=True)
    (paths.adapter / "adapter_config.json").write_text("{}")
    write_json(paths.root / "local.json", {"state": "completed", "phase": "train", "returncode": 0})


def running(run: RunConfig, step: int, total: int, loss: float, pid: int | None = None, start: float | None = None):
    """A training job in progress (local backend): local.json names a live process."""
    import time

    paths = RunPaths.of(run)
    write_run_config(run)
    start = start if start is not None else time.time() - 10 * step - 5
    events = [{"event": "start", "time": start, "step": 0, "total_steps": total, "attempt": 1, "resumed_from": None}]
    for n in range(1, step + 1):
        events.append(
            {"event": "step", "time": start + 10 * n, "step": n, "total_steps": total, "loss": loss + 0.01 * (step - n)}
        )
    paths.progress.write_text("".join(json.dumps(e) + "\n" for e in events))
    write_json(
        paths.root / "local.json", {"state": "running", "phase": "train", "pid": pid or os.getpid(), "started": start}
    )


def inferred(run: RunConfig, tuned: list[str], base: list[str] | None = None, metrics=None):
    """The inference job's files for held-out answers: `tuned[i]` answers example i (all share
    REFERENCE, prompts differ). The summary's means are computed with the job's own metrics."""
    from launcher.job.metrics import get_metrics
    from training.infer import Item, score

    base = base or [PROSE] * len(tuned)
    items = [
        Item(prompt=f"Where is landmark {i}? Answer in JSON.", reference=REFERENCE, answers={"base": b, "tuned": t})
        for i, (b, t) in enumerate(zip(base, tuned))
    ]
    summary = {"run_id": run.run_id, "prompts": 0, "eval_examples": len(items)}
    summary.update(score(items, get_metrics(metrics or run.inference.metric)))
    paths = RunPaths.of(run)
    paths.inference.mkdir(parents=True, exist_ok=True)
    (paths.inference / "results.jsonl").write_text("".join(json.dumps(i.record()) + "\n" for i in items))
    write_json(paths.inference / "summary.json", summary)
    with open(paths.progress, "a") as handle:
        handle.write(json.dumps({"event": "infer_end", "time": 1_796_000_900.0, "step": 0, "summary": summary}) + "\n")
    write_json(paths.root / "local.json", {"state": "completed", "phase": "infer", "returncode": 0})
    return summary
