"""Asynchronous successive halving, decided by each run itself on shared storage: no controller.

At each rung (first × η^k steps or tokens, below the run's own budget) the trainer evaluates,
writes its result to the grid's rung ledger and applies the rule:

    continue iff it ranks among the best max(⌊n/η⌋, 1) of the n results recorded at that rung so
    far, its own included (a tie goes to the run that recorded first). The first run to reach a
    rung always continues.

This is Optuna's SuccessiveHalvingPruner rule. Its known bias: a run that reaches a rung early is
compared with fewer results and promoted more easily than one that comes late (an early mediocre
run may go on; a late one of the same quality may be stopped). The learning-rate schedule always
spans the full budget, so a run that is never stopped trains exactly as in a plain grid.

Ledger: `<storage root>/<experiment>/asha/rung-<k>/<run id>.json`, one file per run per rung,
written atomically (rename): two runs reaching a rung at the same moment both land, none is lost.
The run's own decisions: `<run dir>/asha.json` (rung → decision), so a run preempted after
deciding reads its decision back and one preempted before deciding decides again from the ledger.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launcher.job.config import RunConfig
from launcher.job.search import DECISIONS_FILE, run_decisions, rung_entries
from launcher.job.search import ledger_dir as experiment_ledger
from launcher.job.storage import RunPaths, write_json

# What a checkpoint holds besides the adapter and its tokenizer.
TRAINER_STATE_FILES = ("optimizer.pt", "scheduler.pt", "scaler.pt", "trainer_state.json", "training_args.bin")


@dataclass(frozen=True)
class Decision:
    rung: int
    at: int  # the rung's size (steps or tokens)
    unit: str  # "steps" | "tokens"
    step: int  # the optimizer step it was decided at
    value: float
    rank: int  # 1 = best at that rung when decided
    competitors: int  # results recorded at the rung then (own included)
    keep: int  # how many of them continue
    prune: bool

    def describe(self, metric: str) -> str:
        verdict = "stopped" if self.prune else "continues"
        unit = self.unit[:-1] if self.at == 1 else self.unit
        return (
            f"rung {self.rung} ({self.at} {unit}): {metric} {self.value:.4f}, rank {self.rank} of "
            f"{self.competitors} (top {self.keep} continue): {verdict}"
        )


def ledger_dir(run: RunConfig) -> Path:
    return experiment_ledger(Path(run.run_dir).parent)


def decide(run: RunConfig, rung: int, value: float) -> tuple[int, int, int, bool]:
    """(rank, competitors, keep, prune) for `value` at `rung`, after recording it. A tie goes to
    the run that recorded first: identical results (two learning rates too small to move the
    adapter) must not all be promoted."""
    search = run.search
    experiment_folder = Path(run.run_dir).parent
    folder = ledger_dir(run) / f"rung-{rung}"
    folder.mkdir(parents=True, exist_ok=True)
    now = time.time()
    write_json(
        folder / f"{run.run_id}.json", {"run_id": run.run_id, "value": value, "time": now, "overrides": run.overrides}
    )
    entries = rung_entries(experiment_folder, rung)  # one read of the ledger: values and times
    results = {run_id: float(entry["value"]) for run_id, entry in entries.items()}
    times = {run_id: entry["time"] for run_id, entry in entries.items() if isinstance(entry.get("time"), (int, float))}
    results[run.run_id] = value
    sign = 1.0 if search.mode == "min" else -1.0
    ahead = sum(
        1
        for other, v in results.items()
        if other != run.run_id
        and (sign * v < sign * value or (v == value and (times.get(other, now), other) < (now, run.run_id)))
    )
    rank = ahead + 1
    keep = max(len(results) // search.reduction_factor, 1)
    return rank, len(results), keep, rank > keep


def recorded(paths: RunPaths) -> dict[int, Decision]:
    return {rung: Decision(**fields) for rung, fields in run_decisions(paths.root).items()}


def record(paths: RunPaths, decision: Decision) -> None:
    decisions = {str(k): v.__dict__ for k, v in recorded(paths).items()}
    decisions[str(decision.rung)] = decision.__dict__
    write_json(paths.root / DECISIONS_FILE, {"decisions": decisions})


def recorded_prune(paths: RunPaths) -> Decision | None:
    return next((d for _, d in sorted(recorded(paths).items()) if d.prune), None)


def rung_sizes(run: RunConfig) -> tuple[str, int]:
    search = run.search
    if search.first_rung_tokens:
        return "tokens", search.first_rung_tokens
    return "steps", int(search.first_rung_steps or 0)


def make_callback(run: RunConfig, paths: RunPaths, log, is_main: bool):
    """The TrainerCallback (transformers imported here, not at module level)."""
    from transformers import TrainerCallback

    unit, first = rung_sizes(run)
    eta = run.search.reduction_factor

    class AshaCallback(TrainerCallback):
        def __init__(self) -> None:
            self.decisions = recorded(paths)
            self.pending: tuple[int, int] | None = None  # (rung, size) awaiting its evaluation
            self.pruned: Decision | None = None

        def _next_rung(self) -> int:
            return max(self.decisions, default=-1) + 1

        def _reached(self, state) -> tuple[int, int] | None:
            rung = self._next_rung()
            size = first * eta**rung
            done = state.global_step if unit == "steps" else int(state.num_input_tokens_seen)
            if done < size:
                return None
            if unit == "steps" and size >= state.max_steps:
                return None  # the full budget is no rung: the run simply ends
            if state.global_step >= state.max_steps:
                return None
            return rung, size

        def on_step_end(self, args, state, control, **kwargs):
            reached = self._reached(state)
            if reached:
                self.pending = reached
                control.should_evaluate = True
            return control

        def on_log(self, args, state, control, logs=None, **kwargs):
            # trl adds its eval metrics (eval_mean_token_accuracy) to the evaluation's log line,
            # not to the metrics on_evaluate gets; the log line comes first and has eval_loss too.
            return self.on_evaluate(args, state, control, metrics=logs)

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            if self.pending is None or not metrics or run.search.metric not in metrics:
                return control
            rung, size = self.pending
            self.pending = None
            value = float(metrics[run.search.metric])
            # Every rank computes the same eval loss; rank 0 alone writes, the others read its
            # decision back so that all stop at the same step.
            if is_main:
                rank, competitors, keep, prune = decide(run, rung, value)
                decision = Decision(rung, size, unit, state.global_step, value, rank, competitors, keep, prune)
                record(paths, decision)
            else:
                decision = _wait_for_decision(paths, rung)
            self.decisions[rung] = decision
            log(f"asha: {decision.describe(run.search.metric)}")
            if decision.prune:
                self.pruned = decision
                control.should_save = True
                control.should_training_stop = True
            return control

    return AshaCallback()


def _wait_for_decision(paths: RunPaths, rung: int, timeout: float = 600.0) -> Decision:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = recorded(paths).get(rung)
        if found:
            return found
        time.sleep(0.2)
    raise RuntimeError(f"rank 0 recorded no asha decision for rung {rung} in {timeout:.0f} s")


def pruned_metrics(decision: Decision, metric: str) -> dict[str, Any]:
    return {"pruned": {**decision.__dict__, "metric": metric}}


def pruned_checkpoint(paths: RunPaths, decision: Decision) -> Path | None:
    checkpoint = paths.checkpoints / f"checkpoint-{decision.step}"
    return checkpoint if (checkpoint / "adapter_config.json").is_file() else None


def publish_pruned_adapter(paths: RunPaths, decision: Decision) -> Path:
    """The adapter of the checkpoint saved at the decision's step, as the run's final adapter."""
    import shutil

    from .checkpoints import publish

    checkpoint = pruned_checkpoint(paths, decision)
    staging = paths.root / f".tmp-adapter-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for item in checkpoint.iterdir():
        if item.is_file() and item.name not in TRAINER_STATE_FILES and not item.name.startswith("rng_state"):
            shutil.copy2(item, staging / item.name)
    publish(staging, paths.adapter)
    return paths.adapter
