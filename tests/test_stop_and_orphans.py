"""Stop requests and orphans through the real job command, `python -m training.launch <run.yaml>`.

- A TERM or USR1 at any moment of start-up (from spawn to the first steps), to the launcher alone
  (a container's PID 1) or to its whole process group (a Slurm step), 1 and 2 processes: the job
  ends in exit 75 with a checkpoint at the step it reached. Before this, a request that came
  while the worker was starting was lost: the run trained to its end.
- A SIGKILL of the launcher's group or of the launcher alone, 2 processes mid-training: within a
  few seconds no worker of that attempt is alive and nothing more is written to the run folder;
  the next attempt resumes from the newest complete checkpoint.
- A new attempt refuses to start while a worker of an earlier one still holds the run folder.
- The local backend: a second Ctrl-C on a 2-process run leaves no process behind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from training_support import events, job_env, processes_mentioning, tail, wait_until

from launcher.grid import plan
from launcher.job.progress import EXIT_PREEMPTED, read_events, summarize
from launcher.job.storage import RunPaths

pytestmark = pytest.mark.slow

LONG = {"train": {"max_steps": 400, "save_steps": 2, "logging_steps": 1}, "lora": {"dropout": 0.0}}


def start_launcher(run, log: Path, cwd: Path, processes: int) -> subprocess.Popen:
    """The job command as the local backend and a container start it: the leader of its own
    process group, so that a signal "to the group" reaches exactly the job."""
    return subprocess.Popen(
        [sys.executable, "-m", "training.launch", str(RunPaths.of(run).config), "--processes", str(processes)],
        cwd=cwd,
        env=job_env(),
        stdout=open(log, "ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def workers(run) -> list[int]:
    """Pids of the run's training.sft processes (not accelerate's launcher, not training.launch)."""
    found = []
    for pid in processes_mentioning(str(RunPaths.of(run).config)):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
        except OSError:
            continue
        if b"training.sft" in cmdline and b"accelerate" not in cmdline and state != "Z":
            found.append(pid)
    return found


def send(job: subprocess.Popen, sig: int, to_group: bool) -> None:
    try:
        os.killpg(job.pid, sig) if to_group else job.send_signal(sig)
    except ProcessLookupError:
        pass


def assert_stopped_at_a_checkpoint(run, code: int, log: Path) -> int:
    """Exit 75, one `preempted` event, and a complete checkpoint at the step it names."""
    assert code == EXIT_PREEMPTED, f"exit {code}, the stop request was lost?\n{tail(log)}"
    [preempted] = events(run, "preempted")
    step = preempted["step"]
    steps = [e["step"] for e in events(run, "step")]
    assert max(steps, default=0) <= step, (steps, step)
    if step:
        checkpoint = RunPaths.of(run).checkpoints / f"checkpoint-{step}"
        assert (checkpoint / "adapter_model.safetensors").is_file(), sorted(RunPaths.of(run).checkpoints.iterdir())
    assert not RunPaths.of(run).metrics.exists()
    return step


# Moments of start-up: after the launcher was spawned (seconds), or after its worker appeared, or
# once the worker logged its start, or its first step. Spread, with both signals and both targets,
# so that every phase of the window is hit: interpreter start-up, imports, config and input
# checks, model loading, trainer set-up, the first steps.
WINDOW_1 = [
    ("spawn", 0.3, signal.SIGTERM, False),  # the launcher's own start-up (its handlers come first)
    ("spawn", 0.6, signal.SIGUSR1, True),
    ("worker", 0.0, signal.SIGUSR1, True),
    ("worker", 0.3, signal.SIGTERM, False),
    ("worker", 0.7, signal.SIGUSR1, False),
    ("worker", 1.2, signal.SIGTERM, True),
    ("worker", 2.0, signal.SIGUSR1, True),
    ("worker", 3.5, signal.SIGTERM, False),
    ("start", 0.0, signal.SIGUSR1, True),
    ("step", 0.0, signal.SIGTERM, False),
]
WINDOW_2 = [
    ("worker", 0.0, signal.SIGTERM, True),
    ("worker", 0.5, signal.SIGUSR1, False),
    ("worker", 1.5, signal.SIGUSR1, True),
    ("worker", 3.0, signal.SIGTERM, False),
    ("start", 0.0, signal.SIGTERM, False),
]


def _moment(run, job, anchor: str, processes: int):
    if anchor == "spawn":
        return
    if anchor == "worker":
        what = lambda: len(workers(run)) >= processes or job.poll() is not None  # noqa: E731
    elif anchor == "start":
        what = lambda: events(run, "start") or job.poll() is not None  # noqa: E731
    else:
        what = lambda: events(run, "step") or job.poll() is not None  # noqa: E731
    wait_until(what, 300, f"the {anchor} moment", interval=0.01)


def _sweep(tmp_path, tiny_plan, processes: int, window) -> list[str]:
    outcomes = []
    for index, (anchor, delay, sig, to_group) in enumerate(window):
        folder = tmp_path / f"trial-{index}"
        run = tiny_plan(folder, **LONG).runs[0]
        log = folder / "train.log"
        job = start_launcher(run, log, folder, processes)
        try:
            _moment(run, job, anchor, processes)
            time.sleep(delay)
            send(job, sig, to_group)
            code = job.wait(timeout=300)
        finally:
            if job.poll() is None:
                os.killpg(job.pid, signal.SIGKILL)
        step = assert_stopped_at_a_checkpoint(run, code, log)
        wait_until(lambda: not workers(run), 30, "no worker left")
        outcomes.append(
            f"{anchor}+{delay}s {signal.Signals(sig).name} to {'group' if to_group else 'launcher'}: step {step}"
        )
    return outcomes


def test_a_stop_request_at_any_moment_of_start_up_is_never_lost_one_process(tmp_path, tiny_plan):
    outcomes = _sweep(tmp_path, tiny_plan, 1, WINDOW_1)
    print("\n".join(outcomes))


def test_a_stop_request_at_any_moment_of_start_up_is_never_lost_two_processes(tmp_path, tiny_plan):
    outcomes = _sweep(tmp_path, tiny_plan, 2, WINDOW_2)
    print("\n".join(outcomes))


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    found = {}
    for path in folder.rglob("*"):
        try:
            if path.is_file():
                stat = path.stat()
                found[str(path.relative_to(folder))] = (stat.st_size, stat.st_mtime_ns)
        except OSError:
            pass
    return found


@pytest.mark.parametrize("target", ["group", "launcher"])
def test_sigkill_leaves_no_worker_training_and_the_next_attempt_resumes(tmp_path, tiny_plan, target):
    run = tiny_plan(tmp_path, **{**LONG, "train": {**LONG["train"], "max_steps": 16}}).runs[0]
    paths = RunPaths.of(run)
    log = tmp_path / "train.log"
    job = start_launcher(run, log, tmp_path, processes=2)
    wait_until(lambda: len(events(run, "checkpoint")) >= 2 or job.poll() is not None, 300, "two checkpoints")
    assert job.poll() is None, tail(log)
    assert len(workers(run)) == 2
    send(job, signal.SIGKILL, to_group=target == "group")
    job.wait(timeout=30)
    # Within a few seconds, no worker of that attempt is alive...
    wait_until(lambda: not workers(run), 10, "every training.sft worker gone")
    # ...and nothing is written to the run folder after that.
    before = _snapshot(paths.root)
    time.sleep(3)
    assert _snapshot(paths.root) == before
    newest = max(int(p.name.split("-")[1]) for p in paths.checkpoints.glob("checkpoint-*"))
    assert newest < 16

    again = start_launcher(run, log, tmp_path, processes=2)
    assert again.wait(timeout=600) == 0, tail(log)
    starts = events(run, "start")
    assert starts[-1]["resumed_from"] == newest
    assert json.loads(paths.metrics.read_text())["global_step"] == 16


def test_a_new_attempt_refuses_to_start_beside_a_live_worker_of_an_earlier_one(tmp_path, tiny_plan):
    run = tiny_plan(tmp_path, **LONG).runs[0]
    paths = RunPaths.of(run)
    log = tmp_path / "stray.log"
    # An earlier attempt's worker that lives on (stopped mid-training, still holding its rank).
    stray = subprocess.Popen(
        [sys.executable, "-m", "training.sft", str(paths.config)],
        cwd=tmp_path,
        env=job_env(),
        stdout=open(log, "ab"),
        stderr=subprocess.STDOUT,
    )
    try:
        wait_until(lambda: events(run, "step") or stray.poll() is not None, 300, "the stray's first step")
        stray.send_signal(signal.SIGSTOP)
        steps = len(events(run, "step"))
        attempt = subprocess.run(
            [sys.executable, "-m", "training.launch", str(paths.config)],
            cwd=tmp_path,
            env=job_env(),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert attempt.returncode == 1, attempt.stderr
        assert f"pid {stray.pid}" in attempt.stderr and "earlier attempt" in attempt.stderr, attempt.stderr
        assert "training.sft" in attempt.stderr  # which process: its command line
        assert len(events(run, "step")) == steps and len(events(run, "start")) == 1  # it started nothing
    finally:
        stray.kill()
        stray.wait()
    log = tmp_path / "train.log"
    # Once that process is gone, the lock is gone with it: the run resumes.
    again = subprocess.Popen(
        [sys.executable, "-m", "training.launch", str(paths.config)],
        cwd=tmp_path,
        env=job_env(),
        stdout=open(log, "ab"),
        stderr=subprocess.STDOUT,
    )
    wait_until(lambda: len(events(run, "start")) == 2 or again.poll() is not None, 300, "the new attempt's start")
    again.send_signal(signal.SIGTERM)
    assert again.wait(timeout=300) == EXIT_PREEMPTED, tail(log)


def test_local_backend_second_ctrl_c_leaves_no_process_of_a_two_process_run(tiny_experiment, tmp_path):
    path = tiny_experiment(tmp_path / "exp", train={"max_steps": 400, "save_steps": 2}, inference={"enabled": False})
    (run,) = plan(path).runs
    paths = RunPaths.of(run)
    env = {**job_env(), "QLAUNCH_HOME": str(tmp_path / "home"), "QLAUNCH_PROCESSES": "2"}
    process = subprocess.Popen(
        [sys.executable, "-m", "launcher.cli", "run", str(path)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    wait_until(lambda: summarize(read_events(paths.progress)).step >= 2 or process.poll() is not None, 600, "step 2")
    assert process.poll() is None, process.stdout.read()
    assert len(workers(run)) == 2
    process.send_signal(signal.SIGINT)  # Ctrl-C: checkpoint and stop...
    time.sleep(0.2)
    process.send_signal(signal.SIGINT)  # ...and again, before they finish: kill
    output, _ = process.communicate(timeout=120)
    wait_until(lambda: not processes_mentioning(str(paths.config)), 10, "no process of the run left")
