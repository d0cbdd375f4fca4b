"""Preemption: real processes, real signals, resumed from the newest complete checkpoint."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
from training_support import events, processes_mentioning, run_job, start_job, tail, wait_until

from launcher.job.progress import EXIT_PREEMPTED
from launcher.job.storage import RunPaths

pytestmark = pytest.mark.slow

STEPS = 30
# Checkpoints only when a signal forces one (and at the end), so resuming from step > 0 proves
# the signal's checkpoint; logging every step lets the test see where training is.
LONG_RUN = {"train": {"max_steps": STEPS, "save_steps": 1000, "logging_steps": 1}}


def lora_weights(adapter: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(adapter / "adapter_model.safetensors")


def last_step(run) -> int:
    steps = events(run, "step")
    return steps[-1]["step"] if steps else 0


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_plan):
    """The same run trained without interruption, for comparison."""
    folder = tmp_path_factory.mktemp("uninterrupted")
    run = tiny_plan(folder, **LONG_RUN).runs[0]
    log = folder / "train.log"
    assert run_job("training.sft", RunPaths.of(run).config, log=log, cwd=folder) == 0, tail(log)
    return run


def test_sigterm_checkpoints_then_resume_ends_where_an_uninterrupted_run_does(tmp_path, tiny_plan, uninterrupted):
    import torch

    run = tiny_plan(tmp_path, **LONG_RUN).runs[0]
    assert run.run_id == uninterrupted.run_id  # same training config, other storage
    paths = RunPaths.of(run)
    log = tmp_path / "train.log"
    job = start_job("training.sft", paths.config, log=log, cwd=tmp_path)
    wait_until(lambda: last_step(run) >= 3 or job.poll() is not None, 300, "step 3")
    job.send_signal(signal.SIGTERM)
    assert job.wait(timeout=300) == EXIT_PREEMPTED, tail(log)

    [preempted] = events(run, "preempted")
    stopped_at = preempted["step"]
    assert preempted["signal"] == "SIGTERM" and 3 <= stopped_at < STEPS
    assert (paths.checkpoints / f"checkpoint-{stopped_at}" / "trainer_state.json").is_file()
    assert not paths.training_completed()

    assert run_job("training.sft", paths.config, log=log, cwd=tmp_path) == 0, tail(log)
    starts = events(run, "start")
    assert [(s["attempt"], s["resumed_from"], s["step"]) for s in starts] == [(1, None, 0), (2, stopped_at, stopped_at)]
    assert events(run, "end")[-1]["step"] == STEPS
    metrics = json.loads(paths.metrics.read_text())
    reference = json.loads(RunPaths.of(uninterrupted).metrics.read_text())
    assert metrics["global_step"] == reference["global_step"] == STEPS
    assert metrics["train_tokens"] == reference["train_tokens"]  # same data, none seen twice
    # Optimizer, scheduler, RNG and data position were restored: the same adapter comes out.
    resumed, straight = lora_weights(paths.adapter), lora_weights(RunPaths.of(uninterrupted).adapter)
    assert resumed.keys() == straight.keys()
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], rtol=1e-4, atol=1e-6)


def test_a_save_killed_mid_write_is_ignored_on_resume(tmp_path, tiny_plan):
    run = tiny_plan(tmp_path, train={"max_steps": STEPS, "save_steps": 1, "save_total_limit": 3}).runs[0]
    paths = RunPaths.of(run)
    log = tmp_path / "train.log"
    job = start_job("training.sft", paths.config, log=log, cwd=tmp_path)
    staged = None
    try:
        # Catch a checkpoint while it is being written, freeze the process there, then kill it.
        while job.poll() is None and staged is None:
            try:
                partial = [e for e in os.scandir(paths.checkpoints) if e.name.startswith(".tmp-checkpoint-")]
            except FileNotFoundError:
                partial = []
            if partial:
                job.send_signal(signal.SIGSTOP)
                step = int(partial[0].name.rsplit("-", 1)[1])
                if Path(partial[0].path).is_dir() and not (paths.checkpoints / f"checkpoint-{step}").exists():
                    staged = (step, Path(partial[0].path))
                else:
                    job.send_signal(signal.SIGCONT)  # the rename won the race: try the next save
    finally:
        job.kill()
        job.wait()
    assert staged is not None, "training ended before a save could be caught mid-write:\n" + tail(log)
    step, partial_dir = staged
    assert partial_dir.is_dir()
    complete = sorted(int(p.name.split("-")[1]) for p in paths.checkpoints.glob("checkpoint-*"))
    assert all(s < step for s in complete)

    assert run_job("training.sft", paths.config, log=log, cwd=tmp_path) == 0, tail(log)
    resumed = events(run, "start")[-1]
    assert resumed["resumed_from"] == (complete[-1] if complete else None)
    assert "removed an incomplete checkpoint save" in log.read_text()
    assert not list(paths.checkpoints.glob(".tmp-*"))
    assert events(run, "end")[-1]["step"] == STEPS


def test_signal_reaches_the_worker_under_accelerate_launch(tmp_path, tiny_plan):
    """`accelerate launch` alone would die on SIGTERM and orphan the worker; training.launch
    hands the signal to the worker and keeps its exit code (75) visible."""
    run = tiny_plan(tmp_path, **LONG_RUN).runs[0]
    paths = RunPaths.of(run)
    log = tmp_path / "train.log"
    job = start_job("training.launch", paths.config, log=log, cwd=tmp_path)
    wait_until(lambda: last_step(run) >= 2 or job.poll() is not None, 300, "step 2")
    job.send_signal(signal.SIGTERM)
    assert job.wait(timeout=300) == EXIT_PREEMPTED, tail(log)
    [preempted] = events(run, "preempted")
    assert preempted["step"] >= 2
    assert processes_mentioning(str(paths.config)) == []  # no orphaned worker left training

    assert run_job("training.launch", paths.config, log=log, cwd=tmp_path) == 0, tail(log)
    assert events(run, "start")[-1]["resumed_from"] == preempted["step"]
    assert events(run, "end")[-1]["step"] == STEPS
