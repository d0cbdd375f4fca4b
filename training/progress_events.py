"""Trainer callbacks → `launcher.job.progress` events (progress.jsonl and the log, prefixed)."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from launcher.job.ledger import lost_attempt
from launcher.job.progress import emit, make_event, read_events


class EventWriter:
    """Writes events on the main process only (other ranks would duplicate every line)."""

    def __init__(self, progress_file: Path, is_main: bool = True) -> None:
        self.progress_file = progress_file
        self.is_main = is_main
        # When this attempt's process began: the recovery ledger counts loading the model and
        # restoring a checkpoint as time a restart cost.
        self.launched_at = round(time.time(), 3)

    def __call__(self, event: str, step: int, **fields: Any) -> None:
        if not self.is_main:
            return
        event_record = make_event(event, step, **fields)
        emit(event_record, self.progress_file, None)
        try:
            emit(event_record, None, sys.stdout)
        except (OSError, ValueError):
            pass  # a closed log pipe must not stop training; progress.jsonl has the event

    def previous_attempts(self) -> int:
        return sum(1 for e in read_events(self.progress_file) if e.get("event") == "start")

    def record_lost_attempt(self) -> None:
        """Before this attempt starts: a `killed` event for a previous attempt that ended without
        an end event (SIGKILL, OOM, lost node), with the last step it reached."""
        if self.is_main:
            lost = lost_attempt(read_events(self.progress_file))
            if lost is not None:
                self("killed", lost.pop("step"), **lost)


class ProgressCallback(TrainerCallback):
    """start / step events; tokens per second counts non-padding tokens between two logs."""

    def __init__(self, write: EventWriter, attempt: int, resumed_from: int | None) -> None:
        self.write = write
        self.attempt = attempt
        self.resumed_from = resumed_from
        self.attempt_start: tuple[float, int] | None = None  # (time, tokens) at train begin
        self._last: tuple[float, int] | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        now = time.time()
        self.attempt_start = self._last = (now, state.num_input_tokens_seen)
        self.write(
            "start",
            state.global_step,
            total_steps=state.max_steps,
            attempt=self.attempt,
            resumed_from=self.resumed_from,
            launched_at=self.write.launched_at,
        )

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if "eval_loss" in logs:
            self.write("eval", state.global_step, total_steps=state.max_steps, eval_loss=_number(logs["eval_loss"]))
            return
        if "loss" not in logs:
            return  # the end-of-training summary log, eval logs
        now, tokens = time.time(), state.num_input_tokens_seen
        last_time, last_tokens = self._last or (now, tokens)
        rate = (tokens - last_tokens) / (now - last_time) if now > last_time else None
        self._last = (now, tokens)
        self.write(
            "step",
            state.global_step,
            total_steps=state.max_steps,
            loss=_number(logs.get("loss")),
            learning_rate=_number(logs.get("learning_rate")),
            tokens_per_second=None if rate is None else round(rate, 2),
            epoch=None if state.epoch is None else round(state.epoch, 4),
            grad_norm=_number(logs.get("grad_norm")),
        )

    def attempt_tokens_per_second(self, state) -> float | None:
        if self.attempt_start is None:
            return None
        start_time, start_tokens = self.attempt_start
        elapsed = time.time() - start_time
        return round((state.num_input_tokens_seen - start_tokens) / elapsed, 2) if elapsed > 0 else None


def _number(value):
    try:
        return round(float(value), 6)
    except (TypeError, ValueError):
        return None
