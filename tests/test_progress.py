"""Progress events → what the status table shows (step, loss, ETA, restarts)."""

from __future__ import annotations

import io
import json

from launcher.job.progress import PROGRESS_PREFIX, emit, parse_lines, read_events, summarize


def test_restarts_and_resume_steps_come_from_start_events(tmp_path):
    path = tmp_path / "progress.jsonl"
    log = io.StringIO()
    events = [
        {"event": "start", "time": 100.0, "step": 0, "total_steps": 20, "attempt": 1},
        {"event": "step", "time": 110.0, "step": 5, "total_steps": 20, "loss": 2.5},
        {"event": "preempted", "time": 111.0, "step": 6, "signal": "SIGTERM"},
        {"event": "start", "time": 200.0, "step": 6, "total_steps": 20, "attempt": 2, "resumed_from": 6},
        {"event": "step", "time": 210.0, "step": 11, "total_steps": 20, "loss": 1.25},
    ]
    for event in events:
        emit(event, path, log)
    progress = summarize(read_events(path))
    assert (progress.step, progress.total_steps, progress.loss) == (11, 20, 1.25)
    assert progress.restarts == 1 and progress.resumed_from == [6]
    # 5 steps in 10 s in this attempt, 9 left → 18 s
    assert progress.eta() == 18.0
    assert progress.elapsed == 110.0
    # The log carries the same events behind a prefix (Kubernetes reads pod logs).
    assert summarize(parse_lines(io.StringIO("noise\n" + log.getvalue()))) == progress


def test_a_line_cut_by_a_kill_is_skipped(tmp_path):
    path = tmp_path / "progress.jsonl"
    good = json.dumps({"event": "step", "time": 1.0, "step": 3, "loss": 0.5})
    path.write_text(good + "\n" + '{"event": "step", "ti')
    progress = summarize(read_events(path))
    assert progress.step == 3 and progress.loss == 0.5


def test_finished_run_has_no_eta():
    events = [
        {"event": "start", "time": 0.0, "step": 0, "total_steps": 4},
        {"event": "step", "time": 1.0, "step": 4, "total_steps": 4, "loss": 0.1},
        {"event": "end", "time": 2.0, "step": 4, "total_steps": 4, "status": "completed"},
    ]
    progress = summarize(events)
    assert progress.finished and progress.eta() is None
    assert PROGRESS_PREFIX.endswith(" ")
