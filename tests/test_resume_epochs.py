"""A run stopped in any epoch and started again trains exactly what an uninterrupted run trains.

Three-epoch runs of the tiny model, each stopped once in the first, once in a middle and once in
the last epoch by a real signal to a real process, and started again with the same command:

  SIGTERM  the trainer saves a checkpoint at the step it is in and exits 75; the run resumes there;
  SIGKILL  nothing is saved; the run resumes from its newest `save_steps` checkpoint and trains
           the steps after it again.

Per configuration (packing on/off × group_by_length on/off) one uninterrupted reference run; the
configurations alternate the two kinds of stop so that every epoch position sees each kind of stop
with packing on and off and with group_by_length on and off. Each test asserts, from the
examples-per-step record the trainer writes with QLAUNCH_RECORD_EXAMPLES=1 (training/example_record.py),
that every epoch trained each example exactly once and every step the same examples as the
reference, and that the final adapter equals the reference's.

The four references are started together when the module starts (the 2 CI cores share them with
the first test), since most of a tiny run's time is importing the training stack.
"""

from __future__ import annotations

import json
import signal
from collections import Counter
from pathlib import Path

import pytest
from training_support import events, start_job, tail, wait_until

from launcher.job.progress import EXIT_PREEMPTED
from launcher.job.storage import RunPaths
from training.example_record import ENV, FILE_NAME

pytestmark = pytest.mark.slow

EPOCHS = 3
RECORD = {ENV: "1"}
BASE = {
    "num_train_epochs": EPOCHS,
    "max_steps": -1,
    "save_steps": 3,
    "save_total_limit": None,  # keep every checkpoint: a SIGKILL resumes from the newest save_steps one
    "logging_steps": 1,  # a step event per step: the test sees where training is
}
# 24 examples: 12 steps of 2 per epoch; packed into rows of 64 tokens (2-3 examples each), one
# row per step so that packed epochs have about as many steps.
CONFIGS = {
    "grouped": {"group_by_length": True, "packing": False},
    "shuffled": {"group_by_length": False, "packing": False},
    "packed-grouped": {"group_by_length": True, "packing": True, "per_device_train_batch_size": 1},
    "packed-shuffled": {"group_by_length": False, "packing": True, "per_device_train_batch_size": 1},
}
# How each configuration is stopped in epochs 0, 1, 2.
STOPS = {
    "grouped": (signal.SIGTERM, signal.SIGKILL, signal.SIGTERM),
    "shuffled": (signal.SIGKILL, signal.SIGTERM, signal.SIGKILL),
    "packed-grouped": (signal.SIGKILL, signal.SIGTERM, signal.SIGKILL),
    "packed-shuffled": (signal.SIGTERM, signal.SIGKILL, signal.SIGTERM),
}
# Stop once this far into the epoch: a SIGTERM stops a step or two later, a SIGKILL resumes from
# the save_steps checkpoint before it; both stay well inside the epoch.
INTO_EPOCH = {signal.SIGTERM: 0.2, signal.SIGKILL: 0.45}


def train_config(name: str) -> dict:
    return {"train": {**BASE, **CONFIGS[name]}}


@pytest.fixture(scope="module")
def references(tmp_path_factory, tiny_plan):
    """name -> (run, process) of an uninterrupted run per configuration, all started at once."""
    started = {}
    for name in CONFIGS:
        folder = tmp_path_factory.mktemp(f"reference-{name}")
        run = tiny_plan(folder, **train_config(name)).runs[0]
        process = start_job("training.sft", RunPaths.of(run).config, log=folder / "train.log", cwd=folder, env=RECORD)
        started[name] = (run, process, folder / "train.log")
    yield started
    for _run, process, _log in started.values():
        if process.poll() is None:
            process.kill()
            process.wait()


def finished_reference(references, name):
    run, process, log = references[name]
    assert process.wait(timeout=900) == 0, tail(log)
    return run


def read_record(run) -> tuple[list[int], dict[int, dict]]:
    """(every example of the training set, {step: what the step trained}); a step trained again
    after a resume from an older checkpoint counts as its last training."""
    lines = [json.loads(line) for line in (RunPaths.of(run).root / FILE_NAME).read_text().splitlines()]
    datasets = [line["dataset"] for line in lines if "dataset" in line]
    assert datasets and all(d == datasets[0] for d in datasets), "the training set changed between attempts"
    steps = {}
    for line in lines:
        if "step" in line:
            steps[line["step"]] = line
    return datasets[0], steps


def attempt_epoch(run, attempt: int) -> float:
    """How far (in epochs) the given attempt's training has come; 0 before it started."""
    found, starts = 0.0, 0
    for event in events(run):
        starts += event.get("event") == "start"
        if starts == attempt and event.get("event") == "step":
            found = event.get("epoch") or 0.0
    return found


def checkpoint_epoch(run, step: int) -> float:
    state = RunPaths.of(run).checkpoints / f"checkpoint-{step}" / "trainer_state.json"
    return json.loads(state.read_text())["epoch"]


def lora_weights(adapter: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(adapter / "adapter_model.safetensors")


@pytest.mark.parametrize("name", list(CONFIGS))
def test_a_run_stopped_in_every_epoch_trains_what_an_uninterrupted_one_does(name, tmp_path, tiny_plan, references):
    import torch

    run = tiny_plan(tmp_path, **train_config(name)).runs[0]
    paths = RunPaths.of(run)
    log = tmp_path / "train.log"
    for attempt, (epoch, stop) in enumerate(zip(range(EPOCHS), STOPS[name]), start=1):
        job = start_job("training.sft", paths.config, log=log, cwd=tmp_path, env=RECORD)
        target = epoch + INTO_EPOCH[stop]
        try:
            wait_until(lambda: attempt_epoch(run, attempt) >= target or job.poll() is not None, 600, f"epoch {target}")
            assert job.poll() is None, f"attempt {attempt} ended before epoch {target}:\n{tail(log)}"
            job.send_signal(stop)
            code = job.wait(timeout=300)
        finally:
            if job.poll() is None:
                job.kill()
                job.wait()
        assert code == (EXIT_PREEMPTED if stop == signal.SIGTERM else -signal.SIGKILL), tail(log)
    job = start_job("training.sft", paths.config, log=log, cwd=tmp_path, env=RECORD)
    assert job.wait(timeout=600) == 0, tail(log)

    # Each start after the first resumed inside the epoch it was stopped in (not at its end).
    resumed = [start["resumed_from"] for start in events(run, "start")[1:]]
    assert len(resumed) == EPOCHS and None not in resumed, resumed
    assert [int(checkpoint_epoch(run, step)) for step in resumed] == list(range(EPOCHS))
    preempted = [event["step"] for event in events(run, "preempted")]
    signalled = [step for step, stop in zip(resumed, STOPS[name]) if stop == signal.SIGTERM]
    assert preempted == signalled  # SIGTERM: resumed from its own checkpoint; SIGKILL: from save_steps'
    assert all(step % BASE["save_steps"] == 0 for step, stop in zip(resumed, STOPS[name]) if stop == signal.SIGKILL)

    reference = finished_reference(references, name)
    examples, steps = read_record(run)
    reference_examples, reference_steps = read_record(reference)
    assert examples == reference_examples == list(range(len(examples)))  # no two examples alike
    total = json.loads(paths.metrics.read_text())["total_steps"]
    assert sorted(steps) == list(range(1, total + 1)) and total % EPOCHS == 0
    per_epoch = total // EPOCHS
    for epoch in range(EPOCHS):
        in_epoch = [steps[s] for s in range(epoch * per_epoch + 1, (epoch + 1) * per_epoch + 1)]
        assert {line["epoch"] for line in in_epoch} == {epoch}
        seen = Counter(i for line in in_epoch for i in line["examples"])
        assert seen == Counter(examples), f"epoch {epoch}: not every example exactly once: {seen}"
    # The same examples in the same steps as without interruption; different orders in different epochs.
    assert [steps[s]["examples"] for s in sorted(steps)] == [
        reference_steps[s]["examples"] for s in sorted(reference_steps)
    ]
    orders = [
        [i for s in range(e * per_epoch + 1, (e + 1) * per_epoch + 1) for i in steps[s]["examples"]]
        for e in range(EPOCHS)
    ]
    assert len({tuple(order) for order in orders}) == EPOCHS

    resumed_weights, straight = lora_weights(paths.adapter), lora_weights(RunPaths.of(reference).adapter)
    assert resumed_weights.keys() == straight.keys()
    for key in straight:
        torch.testing.assert_close(resumed_weights[key], straight[key], rtol=1e-6, atol=1e-7)
