"""Progress events: what the trainer writes and what `qlaunch status` reads.

The trainer appends one JSON object per line to `<run dir>/progress.jsonl` and prints the same
object to its log prefixed with `PROGRESS_PREFIX` (a Kubernetes user's laptop cannot read the
PVC, but it can read pod logs). Events, all with "event", "time" (unix seconds) and "step":

    start       total_steps, attempt (1 for the first start), resumed_from (step or null),
                launched_at (when the process began, before loading the model)
    step        total_steps, loss, learning_rate, tokens_per_second, epoch, grad_norm
    eval        eval_loss       (an evaluation on the dataset's test split)
    checkpoint  path
    preempted   signal          (a checkpoint was saved, the job exits with EXIT_PREEMPTED)
    pruned      rung, at, unit, value, rank, competitors, keep, metric: asha stopped the run
                (search.strategy asha; then `end` with status "pruned", exit 0)
    end         total_steps, status "completed" (or "pruned")
    error       message
    killed      attempt, last_time: written by the next attempt on its start when the previous
                one has no end event (killed without a save); step = the last step it reached
    infer_end   summary (inference job finished)
    export_end  run_id, export: the record `qlaunch export`'s job added to `<run dir>/exports.json`
                (printed only, by `python -m launcher.export_command --finish`)

`launcher.job.ledger` turns them into attempts (started, from which checkpoint, stopped where and why).

Pure Python, no torch: the trainer imports it too.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, TextIO

PROGRESS_PREFIX = "QLAUNCH_PROGRESS "
EXPORT_EVENT = "export_end"

# Documented exit code of a job that checkpointed on SIGTERM/SIGUSR1 and stopped (EX_TEMPFAIL):
# not a failure; starting the run again resumes it.
EXIT_PREEMPTED = 75
# The other exit codes of every job entrypoint (training.launch, training.sft, training.infer).
EXIT_OK, EXIT_FAILED, EXIT_CONFIG = 0, 1, 2


def make_event(event: str, step: int, **fields: Any) -> dict[str, Any]:
    return {"event": event, "time": round(time.time(), 3), "step": int(step), **fields}


def emit(event: dict[str, Any], progress_file: Path | None, stream: TextIO | None) -> None:
    line = json.dumps(event, sort_keys=True)
    if progress_file is not None:
        progress_file.parent.mkdir(parents=True, exist_ok=True)
        # One short append per event: atomic enough on local and NFS storage for line records.
        with open(progress_file, "a") as handle:
            handle.write(line + "\n")
    if stream is not None:
        stream.write(PROGRESS_PREFIX + line + "\n")
        stream.flush()


def parse_lines(lines: Iterable[str]) -> list[dict[str, Any]]:
    """Events from progress.jsonl lines or from a log that contains prefixed lines."""
    events = []
    for raw in lines:
        text = raw.strip()
        if PROGRESS_PREFIX.strip() in text:
            text = text.split(PROGRESS_PREFIX.strip(), 1)[1].strip()
        if not text.startswith("{"):
            continue
        try:
            event = json.loads(text)
        except ValueError:
            continue  # a line cut by a kill mid-write
        if isinstance(event, dict) and "event" in event:
            events.append(event)
    return events


def read_events(path: Path) -> list[dict[str, Any]]:
    try:
        with open(path) as handle:
            return parse_lines(handle)
    except OSError:
        return []


@dataclass
class Progress:
    step: int = 0
    total_steps: int | None = None
    loss: float | None = None
    tokens_per_second: float | None = None
    restarts: int = 0
    resumed_from: list[int] = field(default_factory=list)  # step of each resume
    started_at: float | None = None  # first start
    attempt_started_at: float | None = None
    last_time: float | None = None
    finished: bool = False
    preempted: bool = False
    error: str | None = None
    inference_done: bool = False
    inference_summary: dict[str, Any] | None = None
    pruned: dict[str, Any] | None = None  # the asha decision that stopped the run
    _attempt_first_step: tuple[float, int] | None = None

    @property
    def elapsed(self) -> float | None:
        if self.started_at is None or self.last_time is None:
            return None
        return self.last_time - self.started_at

    def eta(self, now: float | None = None) -> float | None:
        """Seconds left, from this attempt's step rate."""
        if self.finished or not self.total_steps or self._attempt_first_step is None:
            return None
        t0, s0 = self._attempt_first_step
        if self.last_time is None or self.step <= s0 or self.last_time <= t0:
            return None
        rate = (self.step - s0) / (self.last_time - t0)
        return max(0.0, (self.total_steps - self.step) / rate)


def summarize(events: Iterable[dict[str, Any]]) -> Progress:
    progress = Progress()
    for event in events:
        kind = event.get("event")
        when = event.get("time")
        if kind in ("start", "step", "checkpoint", "preempted", "end", "error") and when:
            progress.last_time = when
        if event.get("total_steps"):
            progress.total_steps = event["total_steps"]
        if kind == "start":
            if progress.started_at is None:
                progress.started_at = when
            else:
                progress.restarts += 1
                progress.resumed_from.append(int(event.get("resumed_from") or 0))
            progress.attempt_started_at = when
            progress.step = int(event.get("step", 0))
            progress._attempt_first_step = (when, progress.step) if when else None
            progress.preempted = False
            progress.error = None
        elif kind == "step":
            progress.step = int(event["step"])
            if event.get("loss") is not None:
                progress.loss = float(event["loss"])
            if event.get("tokens_per_second") is not None:
                progress.tokens_per_second = float(event["tokens_per_second"])
        elif kind == "preempted":
            progress.preempted = True
            progress.step = int(event.get("step", progress.step))
        elif kind == "pruned":
            progress.pruned = {k: v for k, v in event.items() if k not in ("event", "time")}
        elif kind == "end":
            progress.finished = True
            progress.step = int(event.get("step", progress.step))
        elif kind == "error":
            progress.error = str(event.get("message", "error"))
        elif kind == "infer_end":
            progress.inference_done = True
            progress.inference_summary = event.get("summary")
    return progress
