"""The recovery ledger on event sequences the trainer writes (the slow report test covers a real
SIGTERM; these cover the kills and failures a test cannot cheaply cause for real)."""

from __future__ import annotations

from launcher.job.ledger import build, lost_attempt


def start(t, step=0, resumed=None, launched=None, attempt=1):
    return {
        "event": "start",
        "time": t,
        "step": step,
        "resumed_from": resumed,
        "attempt": attempt,
        "launched_at": launched if launched is not None else t,
    }


def step(t, s):
    return {"event": "step", "time": t, "step": s, "loss": 1.0}


def checkpoint(t, s):
    return {"event": "checkpoint", "time": t, "step": s, "path": f"checkpoint-{s}"}


def test_a_clean_run_is_one_completed_attempt():
    ledger = build([start(100, launched=90), step(110, 5), step(120, 10), {"event": "end", "time": 121, "step": 10}])
    [attempt] = ledger.attempts
    assert (attempt.outcome, attempt.resumed_from, attempt.stop_step) == ("completed", None, 10)
    assert attempt.seconds == 31  # from process launch: the GPU was held while loading too
    assert (ledger.restarts, ledger.steps_redone, ledger.lost_seconds) == (0, 0, 0)


def test_a_preemption_that_checkpointed_redoes_nothing_but_costs_the_restart():
    events = [
        start(100),
        step(110, 5),
        checkpoint(111, 7),
        {"event": "preempted", "time": 111, "step": 7, "signal": "SIGTERM"},
        start(150, step=7, resumed=7, launched=140, attempt=2),
        step(160, 10),
        {"event": "end", "time": 161, "step": 10},
    ]
    ledger = build(events)
    first, second = ledger.attempts
    assert (first.outcome, first.signal, first.stop_step, first.steps_redone) == ("preempted", "SIGTERM", 7, 0)
    assert first.lost_seconds == 10  # the second attempt's start-up (140 → 150)
    assert (second.outcome, second.resumed_from) == ("completed", 7)
    assert (ledger.restarts, ledger.steps_redone) == (1, 0)


def test_a_kill_redoes_the_steps_since_the_last_checkpoint():
    events = [
        start(100),
        step(110, 4),
        checkpoint(112, 4),
        step(120, 8),
        step(130, 9),
        # what the trainer writes on the next start, about the attempt that vanished
        {"event": "killed", "time": 200, "step": 9, "attempt": 1, "last_time": 130},
        start(210, step=4, resumed=4, launched=200, attempt=2),
        step(220, 10),
        {"event": "end", "time": 221, "step": 10},
    ]
    ledger = build(events)
    killed = ledger.attempts[0]
    assert (killed.outcome, killed.stop_step, killed.ended_at) == ("killed", 9, 130)
    assert killed.steps_redone == 5
    assert killed.lost_seconds == (130 - 112) + (210 - 200)
    assert ledger.interruptions() == {"killed": 1}


def test_a_missing_end_event_followed_by_a_start_is_inferred_killed():
    # Pod logs of a killed pod, then the next pod's (a trainer without the killed event).
    events = [
        start(100),
        step(110, 3),
        start(150, step=0, resumed=None, attempt=2),
        {"event": "end", "time": 170, "step": 6},
    ]
    ledger = build(events)
    assert [a.outcome for a in ledger.attempts] == ["killed", "completed"]
    assert ledger.attempts[0].steps_redone == 3  # no checkpoint: all of it again


def test_the_trainer_finds_the_attempt_that_ended_without_a_word():
    assert lost_attempt([start(100), step(110, 3), checkpoint(111, 3), step(120, 6)]) == {
        "step": 6,
        "attempt": 1,
        "last_time": 120,
    }
    assert lost_attempt([start(100), step(110, 3), {"event": "preempted", "time": 111, "step": 3}]) is None
    assert lost_attempt([]) is None


def test_the_last_attempt_is_running_unless_the_scheduler_says_nothing_runs():
    events = [start(100), step(110, 4), checkpoint(111, 4), step(120, 6)]
    assert build(events).attempts[0].outcome == "running"
    gone = build(events, active=False).attempts[0]
    assert (gone.outcome, gone.steps_redone) == ("killed", 2)  # what resuming from checkpoint-4 redoes


def test_a_failure_and_a_signal_before_training_began():
    events = [
        start(100),
        step(110, 2),
        {"event": "error", "time": 111, "step": 0, "message": "CUDA out of memory"},
        {"event": "preempted", "time": 130, "step": 0, "signal": "SIGTERM", "launched_at": 120},
    ]
    failed, stopped = build(events).attempts
    assert (failed.outcome, failed.message, failed.steps_redone) == ("failed", "CUDA out of memory", 2)
    assert (stopped.outcome, stopped.stop_step, stopped.seconds) == ("preempted", 0, 10)
