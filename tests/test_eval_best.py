"""Evaluation during training: the best checkpoint survives rotation and a resume, and is the adapter."""

from __future__ import annotations

import json
import signal

import pytest
from training_support import events, run_job, start_job, tail, wait_until

from launcher.job.progress import EXIT_PREEMPTED
from launcher.job.storage import RunPaths

pytestmark = pytest.mark.slow

STEPS = 8


def test_best_checkpoint_survives_rotation_and_resume_and_becomes_the_adapter(tmp_path, tiny_plan):
    import torch
    from safetensors.torch import load_file

    run = tiny_plan(
        tmp_path,
        dataset={"path": "data.jsonl", "test_size": 0.25},
        train={
            "max_steps": STEPS,
            "save_steps": 2,
            "save_total_limit": 1,
            "eval_strategy": "steps",
            "eval_steps": 2,
            "load_best_model_at_end": True,
            "metric_for_best_model": "eval_loss",
            # "best" = highest eval loss: an early checkpoint, the one rotation would delete.
            "sft_args": {"greater_is_better": True},
        },
    ).runs[0]
    paths = RunPaths.of(run)
    log = tmp_path / "train.log"
    job = start_job("training.sft", paths.config, log=log, cwd=tmp_path)
    wait_until(lambda: len(events(run, "eval")) >= 2 or job.poll() is not None, 300, "two evaluations")
    job.send_signal(signal.SIGTERM)
    assert job.wait(timeout=300) == EXIT_PREEMPTED, tail(log)
    [preempted] = events(run, "preempted")
    assert run_job("training.sft", paths.config, log=log, cwd=tmp_path) == 0, tail(log)
    # The checkpoint saved at the signal was not deleted in favour of the best one.
    assert events(run, "start")[-1]["resumed_from"] == preempted["step"]

    losses = {e["step"]: e["eval_loss"] for e in events(run, "eval")}
    assert set(losses) >= {2, 4, 6, 8}
    best = max(losses, key=losses.get)
    assert best < STEPS
    # Rotation (limit 1) kept the best all along; at the end transformers keeps only the best.
    assert [p.name for p in paths.checkpoints.glob("checkpoint-*")] == [f"checkpoint-{best}"]
    state = json.loads((paths.checkpoints / f"checkpoint-{best}" / "trainer_state.json").read_text())
    assert state["best_model_checkpoint"] == str(paths.checkpoints / f"checkpoint-{best}")
    assert json.loads(paths.metrics.read_text())["eval_loss"] == pytest.approx(losses[best], abs=1e-5)
    adapter = load_file(paths.adapter / "adapter_model.safetensors")
    best_weights = load_file(paths.checkpoints / f"checkpoint-{best}" / "adapter_model.safetensors")
    for name, value in best_weights.items():
        torch.testing.assert_close(adapter[name], value)
