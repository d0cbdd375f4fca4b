"""Data-parallel training through `training.launch`, for real: two processes on CPU (gloo), the
same code path that runs one process per GPU (NCCL) on a cluster.

- the two ranks train together: the data is sharded (an epoch has half the steps), rank 0 alone
  writes checkpoints, progress events and the adapter;
- a SIGTERM to the launcher stops both ranks at the same step after one checkpoint, exit 75, no
  process left; starting again resumes both from it and ends with the adapter of an
  uninterrupted 2-process run;
- a rank killed with SIGKILL brings the other down within a bounded time (no hang in a
  collective).
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
from training_support import events, run_job, start_job, tail, wait_until

from launcher.job.progress import EXIT_PREEMPTED
from launcher.job.storage import RunPaths

pytestmark = pytest.mark.slow

ROWS = 24
BATCH = 2
PROCESSES = 2
STEPS_PER_EPOCH = ROWS // (BATCH * PROCESSES)  # 6: each rank sees half of every epoch
STEPS = 3 * STEPS_PER_EPOCH
DDP = {
    "train": {"max_steps": STEPS, "save_steps": 1000, "logging_steps": 1, "per_device_train_batch_size": BATCH},
    "lora": {"dropout": 0.0},  # the comparison below is then exact up to float round-off
}


def launch(run, log: Path, cwd: Path):
    return start_job("training.launch", RunPaths.of(run).config, "--processes", str(PROCESSES), log=log, cwd=cwd)


def lora_weights(adapter: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(adapter / "adapter_model.safetensors")


def processes_of(run_yaml: Path) -> list[int]:
    """Pids whose command line names this run (the launcher, accelerate, both ranks)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if str(run_yaml).encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


def worker_pids(run_yaml: Path) -> dict[int, int]:
    """rank → pid of the training.sft workers."""
    ranks = {}
    for pid in processes_of(run_yaml):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"training.sft" not in cmdline or b"accelerate" in cmdline:
            continue
        rank = [item for item in environ if item.startswith(b"RANK=")]
        if rank:
            ranks[int(rank[0].split(b"=")[1])] = pid
    return ranks


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_plan):
    folder = tmp_path_factory.mktemp("ddp-uninterrupted")
    run = tiny_plan(folder, **DDP).runs[0]
    log = folder / "train.log"
    assert (
        run_job("training.launch", RunPaths.of(run).config, "--processes", str(PROCESSES), log=log, cwd=folder) == 0
    ), tail(log)
    return run


def test_two_processes_shard_the_data_and_only_rank_0_writes(uninterrupted):
    paths = RunPaths.of(uninterrupted)
    metrics = json.loads(paths.metrics.read_text())
    assert metrics["global_step"] == STEPS
    # Sharded, not duplicated: an epoch of 24 rows takes 6 steps of 2 rows on each of 2 ranks.
    epochs = {e["step"]: e["epoch"] for e in events(uninterrupted, "step")}
    assert epochs[STEPS_PER_EPOCH] == pytest.approx(1.0) and epochs[STEPS] == pytest.approx(3.0)
    # One writer: each step and checkpoint once in the progress log, one start, one end.
    steps = [e["step"] for e in events(uninterrupted, "step")]
    assert steps == list(range(1, STEPS + 1))
    assert len(events(uninterrupted, "start")) == len(events(uninterrupted, "end")) == 1
    # Each rank saved its own RNG state into the one checkpoint.
    (checkpoint,) = sorted(paths.checkpoints.glob("checkpoint-*"))
    assert {p.name for p in checkpoint.glob("rng_state_*.pth")} == {"rng_state_0.pth", "rng_state_1.pth"}
    environment = json.loads((paths.attempts / "1" / "environment.json").read_text())
    assert environment["scheduler"]["world_size"] == str(PROCESSES)


def test_sigterm_stops_both_ranks_at_one_checkpoint_and_they_resume_together(tmp_path, tiny_plan, uninterrupted):
    import torch

    run = tiny_plan(tmp_path, **DDP).runs[0]
    paths = RunPaths.of(run)
    log = tmp_path / "train.log"
    job = launch(run, log, tmp_path)
    wait_until(lambda: len(events(run, "step")) >= 4 or job.poll() is not None, 300, "step 4")
    job.send_signal(signal.SIGTERM)
    assert job.wait(timeout=300) == EXIT_PREEMPTED, tail(log)
    wait_until(lambda: not processes_of(paths.config), 30, "no process of the run left")

    [preempted] = events(run, "preempted")
    stopped_at = preempted["step"]
    assert 4 <= stopped_at < STEPS
    checkpoint = paths.checkpoints / f"checkpoint-{stopped_at}"
    assert {p.name for p in checkpoint.glob("rng_state_*.pth")} == {"rng_state_0.pth", "rng_state_1.pth"}

    job = launch(run, log, tmp_path)
    assert job.wait(timeout=600) == 0, tail(log)
    starts = events(run, "start")
    assert [(s["attempt"], s["resumed_from"]) for s in starts] == [(1, None), (2, stopped_at)]
    assert json.loads(paths.metrics.read_text())["global_step"] == STEPS
    resumed, straight = lora_weights(paths.adapter), lora_weights(RunPaths.of(uninterrupted).adapter)
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], rtol=1e-4, atol=1e-6)


def test_a_rank_killed_brings_the_other_down(tmp_path, tiny_plan):
    run = tiny_plan(tmp_path, **DDP).runs[0]
    paths = RunPaths.of(run)
    log = tmp_path / "train.log"
    job = launch(run, log, tmp_path)
    wait_until(lambda: len(events(run, "step")) >= 2 or job.poll() is not None, 300, "step 2")
    ranks = wait_until(
        lambda: (lambda r: r if len(r) == PROCESSES else None)(worker_pids(paths.config)), 30, "both ranks"
    )
    os.kill(ranks[1], signal.SIGKILL)
    killed = time.monotonic()
    code = job.wait(timeout=120)  # torchrun's agent stops the survivor; bounded, never a hang
    assert code not in (0, EXIT_PREEMPTED), tail(log)
    wait_until(lambda: not processes_of(paths.config), 30, "no process of the run left")
    assert time.monotonic() - killed < 120
    assert not paths.training_completed()
