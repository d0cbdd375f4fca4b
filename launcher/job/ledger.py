"""The recovery ledger: a run's progress events → its training attempts and what each restart cost.

Each start of the training job is an attempt. An attempt opens with a `start` event and ends with
`end` (completed), `preempted` (a signal: it checkpointed and stopped), `error` (failed) or
`killed`, which the next attempt's trainer writes when it finds the previous attempt ended without
a word (SIGKILL, OOM kill, node lost): the trainer calls `lost_attempt()` on start. An attempt
with no end event that is followed by a `start` (events from pod logs, or a trainer older than
the `killed` event) is inferred killed here the same way.

What a restart costs:
  steps redone  the steps an attempt trained past the checkpoint the next attempt resumed from
                (a signal saves at the current step, so a clean preemption redoes none; a kill
                redoes everything since the last checkpoint). A kill's step is the last step
                event, so with `logging_steps` > 1 the count is a lower bound.
  lost seconds  the wall time of those redone steps (from the moment the resumed checkpoint was
                saved to the attempt's end) plus the next attempt's start-up (process launch to
                its first training step: loading the model, restoring the checkpoint).

Pure: no files, no clocks; `launcher.report` and the trainer both use it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

TERMINAL = {"end": "completed", "preempted": "preempted", "error": "failed", "killed": "killed"}
OUTCOMES = ("completed", "preempted", "killed", "failed", "running")


@dataclass
class Attempt:
    number: int
    launched_at: float | None = None  # the process started (before loading the model)
    started_at: float | None = None  # training began (the `start` event)
    ended_at: float | None = None  # the end event, or a killed attempt's last event
    resumed_from: int | None = None  # checkpoint step it started from (None: from scratch)
    stop_step: int = 0  # the last step it reached
    outcome: str = "running"  # one of OUTCOMES; "running": no end event (yet)
    signal: str | None = None  # preempted: which signal
    message: str | None = None  # failed: the error
    steps_redone: int = 0  # steps the next attempt trained again
    lost_seconds: float = 0.0  # redone steps' time + the next attempt's start-up
    checkpoints: dict[int, float] = field(default_factory=dict, repr=False)  # step → time saved

    @property
    def start_step(self) -> int:
        return self.resumed_from or 0

    @property
    def seconds(self) -> float:
        """How long the job ran (launch → end), what a GPU was held for."""
        begin = self.launched_at or self.started_at
        if begin is None or self.ended_at is None:
            return 0.0
        return max(0.0, self.ended_at - begin)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("checkpoints")
        data["seconds"] = round(self.seconds, 3)
        data["lost_seconds"] = round(self.lost_seconds, 3)
        return data


@dataclass
class Ledger:
    attempts: list[Attempt]

    @property
    def restarts(self) -> int:
        return max(0, len(self.attempts) - 1)

    @property
    def steps_redone(self) -> int:
        return sum(a.steps_redone for a in self.attempts)

    @property
    def lost_seconds(self) -> float:
        return sum(a.lost_seconds for a in self.attempts)

    @property
    def seconds(self) -> float:
        return sum(a.seconds for a in self.attempts)

    def interruptions(self) -> dict[str, int]:
        """Outcome → count, for the attempts that did not complete."""
        counts: dict[str, int] = {}
        for attempt in self.attempts:
            if attempt.outcome != "completed":
                counts[attempt.outcome] = counts.get(attempt.outcome, 0) + 1
        return counts


def build(events: Iterable[dict[str, Any]], *, active: bool | None = None) -> Ledger:
    """The attempts of one run's training job. `active=False` (the scheduler says nothing runs)
    turns a last attempt without an end event into "killed"; None/True leaves it "running"."""
    attempts: list[Attempt] = []
    current: Attempt | None = None
    for event in events:
        kind, when, step = event.get("event"), event.get("time"), _int(event.get("step"))
        if kind == "start":
            if current is not None:  # no end event, and a new start: it was killed
                _close(current, "killed", current.ended_at)
            current = Attempt(
                number=len(attempts) + 1,
                launched_at=event.get("launched_at") or when,
                started_at=when,
                ended_at=when,
                resumed_from=_int(event.get("resumed_from")),
                stop_step=step or 0,
            )
            attempts.append(current)
            continue
        if kind == "killed":
            # Written by the next attempt about the previous one, before that next one starts.
            target = current if current is not None else (attempts[-1] if attempts else None)
            if target is not None and target.outcome in ("running", "killed"):
                target.stop_step = max(target.stop_step, step or 0)
                _close(target, "killed", event.get("last_time") or target.ended_at)
            current = None
            continue
        if kind not in ("step", "checkpoint", "eval", "preempted", "end", "error"):
            continue  # infer_end and anything newer belong to no training attempt
        if current is None:
            if kind not in TERMINAL:
                continue
            # Stopped before training began (a signal while loading the model): an attempt
            # that started from the newest checkpoint and trained nothing.
            current = Attempt(
                number=len(attempts) + 1,
                launched_at=event.get("launched_at"),
                resumed_from=step or None,
                stop_step=step or 0,
            )
            attempts.append(current)
        if when is not None:
            current.ended_at = when
        if step is not None and kind in ("step", "checkpoint", "preempted", "end"):
            current.stop_step = max(current.stop_step, step)
        if kind == "checkpoint" and step is not None and when is not None:
            current.checkpoints[step] = when
        if kind in TERMINAL:
            _close(current, TERMINAL[kind], when)
            current.signal = event.get("signal")
            current.message = event.get("message")
            current = None
    if current is not None and active is False:
        _close(current, "killed", current.ended_at)
    _cost_restarts(attempts)
    return Ledger(attempts)


def lost_attempt(events: Iterable[dict[str, Any]]) -> dict[str, Any] | None:
    """For a trainer about to start: the fields of a `killed` event when the previous attempt
    has no end event (it was killed without a save), else None."""
    last_start: dict[str, Any] | None = None
    last: dict[str, Any] | None = None
    step = 0
    for event in events:
        kind = event.get("event")
        if kind == "start":
            last_start, step = event, _int(event.get("step")) or 0
        elif kind in TERMINAL:
            last_start = None
        if last_start is not None and kind in ("start", "step", "checkpoint", "eval"):
            last = event
            step = max(step, _int(event.get("step")) or 0)
    if last_start is None or last is None:
        return None
    return {"step": step, "attempt": last_start.get("attempt"), "last_time": last.get("time")}


def _close(attempt: Attempt, outcome: str, when: float | None) -> None:
    attempt.outcome = outcome
    if when is not None:
        attempt.ended_at = when


def _cost_restarts(attempts: list[Attempt]) -> None:
    all_checkpoints: dict[int, float] = {}
    for index, attempt in enumerate(attempts):
        all_checkpoints.update(attempt.checkpoints)
        if attempt.outcome == "completed":
            continue
        following = attempts[index + 1] if index + 1 < len(attempts) else None
        if following is not None:
            resume = following.start_step
        elif attempt.outcome == "killed":
            # Not resumed yet: a resume starts from the newest checkpoint, so this is what it will redo.
            resume = max((s for s in all_checkpoints if s <= attempt.stop_step), default=attempt.start_step)
        else:
            continue  # running, or preempted/failed and not started again: nothing redone yet
        attempt.steps_redone = max(0, attempt.stop_step - max(resume, attempt.start_step))
        if attempt.ended_at is not None:
            saved = attempt.checkpoints.get(resume)
            since = (
                saved if saved is not None and resume > attempt.start_step else (attempt.started_at or attempt.ended_at)
            )
            redone_time = attempt.ended_at - since if attempt.steps_redone else 0.0
            startup = 0.0
            if following is not None and following.started_at and following.launched_at:
                startup = following.started_at - following.launched_at
            attempt.lost_seconds = max(0.0, redone_time) + max(0.0, startup)


def _int(value: Any) -> int | None:
    try:
        return None if value is None else int(value)
    except (TypeError, ValueError):
        return None
