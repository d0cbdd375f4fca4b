"""A run with the t4-lean levers still checkpoints on SIGTERM and resumes exactly.

On this CPU machine Liger and offloading resolve to off (said once each in the log); the run goes
through the same config, trainer setup and resume path a GPU job takes with them on."""

from __future__ import annotations

import json
import signal

import pytest
from training_support import events, run_job, start_job, tail, wait_until

from launcher.job.progress import EXIT_PREEMPTED
from launcher.job.storage import RunPaths

pytestmark = pytest.mark.slow

STEPS = 16
LEAN = {
    "use_liger_kernel": True,
    "activation_offloading": "sync",
    "expandable_segments": True,
    "gradient_checkpointing": True,
    "packing": True,
}
LEAN_RUN = {"train": {"max_steps": STEPS, "save_steps": 1000, "logging_steps": 1, **LEAN}}


def last_step(run) -> int:
    steps = events(run, "step")
    return steps[-1]["step"] if steps else 0


def test_a_preempted_lean_run_resumes_to_the_same_adapter(tmp_path, tiny_plan):
    import torch
    from safetensors.torch import load_file

    straight = tiny_plan(tmp_path / "straight", **LEAN_RUN).runs[0]
    log = tmp_path / "straight.log"
    assert run_job("training.sft", RunPaths.of(straight).config, log=log, cwd=tmp_path) == 0, tail(log)
    text = log.read_text()
    assert text.count("Liger kernels: off (train.use_liger_kernel: true; no CUDA") == 1
    assert text.count("no CUDA: activation offloading off") == 1

    run = tiny_plan(tmp_path / "resumed", **LEAN_RUN).runs[0]
    paths = RunPaths.of(run)
    log = tmp_path / "resumed.log"
    job = start_job("training.sft", paths.config, log=log, cwd=tmp_path)
    wait_until(lambda: last_step(run) >= 3 or job.poll() is not None, 300, "step 3")
    job.send_signal(signal.SIGTERM)
    assert job.wait(timeout=300) == EXIT_PREEMPTED, tail(log)
    stopped_at = events(run, "preempted")[0]["step"]
    assert 3 <= stopped_at < STEPS
    assert run_job("training.sft", paths.config, log=log, cwd=tmp_path) == 0, tail(log)

    metrics = json.loads(paths.metrics.read_text())
    reference = json.loads(RunPaths.of(straight).metrics.read_text())
    assert metrics["global_step"] == reference["global_step"] == STEPS
    assert metrics["resumed_from"] == stopped_at
    assert metrics["train_tokens"] == reference["train_tokens"]
    resumed, uninterrupted = (
        load_file(p.adapter / "adapter_model.safetensors") for p in (paths, RunPaths.of(straight))
    )
    assert resumed.keys() == uninterrupted.keys()
    for name in uninterrupted:
        torch.testing.assert_close(resumed[name], uninterrupted[name], rtol=1e-4, atol=1e-6)
