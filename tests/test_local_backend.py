"""`qlaunch run` end to end on this machine: real training subprocesses, real Ctrl-C, resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from launcher import evaluation
from launcher.backends import State, get_backend
from launcher.grid import plan
from launcher.job import grid_evaluation
from launcher.job.progress import read_events, summarize
from launcher.job.storage import RunPaths

pytestmark = pytest.mark.slow


def qlaunch(*args, home, **kwargs):
    env = {**os.environ, "QLAUNCH_HOME": str(home), "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "launcher.cli", *args], capture_output=True, text=True, env=env, timeout=900, **kwargs
    )


def test_run_trains_the_grid_then_infers_and_never_retrains(tiny_experiment, tmp_path):
    path = tiny_experiment(tmp_path / "exp", grid={"train.learning_rate": [1e-3, 2e-3]})
    home = tmp_path / "home"
    result = qlaunch("run", str(path), home=home)
    assert result.returncode == 0, result.stdout + result.stderr
    p = plan(path)
    # One evaluation job for the grid after its training (issue #29), base model loaded once.
    assert "grid evaluation of 2 runs started" in " ".join(result.stdout.split())
    assert evaluation.outcomes(p.runs) == {run.run_id: {"outcome": "evaluated"} for run in p.runs}
    assert (grid_evaluation.folder(p.runs) / grid_evaluation.LOG_FILE).read_text().count("loading base model") == 1
    for run in p.runs:
        paths = RunPaths.of(run)
        assert (paths.adapter / "adapter_config.json").is_file()
        assert (paths.inference / "summary.json").is_file()
        assert summarize(read_events(paths.progress)).step == 8
    statuses = get_backend("local").status(p)
    assert {s.state for s in statuses.values()} == {State.COMPLETED}
    assert {s.infer_state for s in statuses.values()} == {State.COMPLETED}

    status = qlaunch("status", str(path), home=home)
    assert status.stdout.count("completed") >= 4  # training and inference of both runs

    again = qlaunch("run", str(path), home=home)
    assert again.returncode == 0
    assert again.stdout.count("skipped: completed") == 2
    for run in p.runs:  # no second start event: nothing was trained again
        events = read_events(RunPaths.of(run).progress)
        assert [e["event"] for e in events].count("start") == 1

    logs = qlaunch("logs", p.runs[0].run_id[:6], home=home)
    assert logs.returncode == 0 and "QLAUNCH_PROGRESS" in logs.stdout


def test_ctrl_c_checkpoints_and_the_next_run_resumes(tiny_experiment, tmp_path):
    path = tiny_experiment(tmp_path / "exp", train={"max_steps": 60, "save_steps": 50}, inference={"enabled": False})
    (run,) = plan(path).runs
    paths = RunPaths.of(run)
    env = {**os.environ, "QLAUNCH_HOME": str(tmp_path / "home")}
    process = subprocess.Popen(
        [sys.executable, "-m", "launcher.cli", "run", str(path)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 600
    while summarize(read_events(paths.progress)).step < 5:
        assert process.poll() is None, process.stdout.read()
        assert time.monotonic() < deadline, "training never reached step 5"
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)  # what a terminal's Ctrl-C does
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 130, output
    assert "Resume with: qlaunch run" in output
    # The local backend's SIGTERM took the same path as on a cluster: training.launch.
    assert "[qlaunch] got SIGTERM: asking the workers to checkpoint" in paths.train_log.read_text()

    stopped = summarize(read_events(paths.progress))
    assert stopped.preempted and 5 <= stopped.step < 60
    assert get_backend("local").status(plan(path))[run.run_id].state == State.REQUEUED
    checkpoints = sorted(paths.checkpoints.glob("checkpoint-*"))
    assert checkpoints and checkpoints[-1].name == f"checkpoint-{stopped.step}"

    result = qlaunch("run", str(path), home=tmp_path / "home")
    assert result.returncode == 0, result.stdout + result.stderr
    final = summarize(read_events(paths.progress))
    assert final.finished and final.step == 60
    assert final.restarts == 1 and final.resumed_from == [stopped.step]
    assert json.loads(paths.metrics.read_text())["global_step"] == 60


def test_cancel_stops_a_running_run(tiny_experiment, tmp_path):
    path = tiny_experiment(tmp_path / "exp", train={"max_steps": 400, "save_steps": 1000}, inference={"enabled": False})
    (run,) = plan(path).runs
    paths = RunPaths.of(run)
    home = tmp_path / "home"
    env = {**os.environ, "QLAUNCH_HOME": str(home)}
    process = subprocess.Popen(
        [sys.executable, "-m", "launcher.cli", "run", str(path)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 600
    while summarize(read_events(paths.progress)).step < 2:
        assert process.poll() is None, process.stdout.read()
        assert time.monotonic() < deadline
        time.sleep(0.2)
    result = qlaunch("cancel", "tiny", home=home)
    assert result.returncode == 0, result.stderr
    assert f"{run.run_id} cancelled" in result.stdout
    output, _ = process.communicate(timeout=300)
    assert "cancelled" in output
    assert get_backend("local").status(plan(path))[run.run_id].state == State.CANCELLED
    assert summarize(read_events(paths.progress)).step < 400
