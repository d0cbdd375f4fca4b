"""One signal path for every backend: real training under `python -m training.launch`, real signals.

- Slurm's pattern: USR1 (the time-limit warning, or a preemption) and, 0.5 s later, TERM, both
  sent to every process of the step (training.launch, accelerate, the worker), while the
  checkpoint is being written: still exit 75, with a complete checkpoint to resume from.
- Kubernetes: the container command of the Job the backend sent to the (fake) API server, run
  as the pod's PID 1 would be, stopped by the kubelet's SIGTERM to PID 1 alone: exit 75, the
  code the Job's podFailurePolicy ignores; started again (the replacement pod), it resumes.

The local backend's Ctrl-C (tests/test_local_backend.py) and Slurm's requeue and preemption
(tests/test_slurm_e2e.py) go through the same training.launch.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fake_kube import start_cluster
from training_support import events, job_env, mount_config_map, processes_mentioning, start_job, tail, wait_until

from launcher.backends.kubernetes.backend import KubernetesBackend
from launcher.backends.kubernetes.manifests import CONFIG_MOUNT
from launcher.backends.kubernetes.naming import Names
from launcher.grid import plan
from launcher.job.progress import EXIT_PREEMPTED
from launcher.job.storage import RunPaths

pytestmark = pytest.mark.slow

STEPS = 30
LONG_RUN = {"train": {"max_steps": STEPS, "save_steps": 1000, "logging_steps": 1}}


def _signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def last_step(run) -> int:
    steps = events(run, "step")
    return steps[-1]["step"] if steps else 0


def test_usr1_then_term_to_every_process_still_ends_in_exit_75_and_a_complete_checkpoint(tmp_path, tiny_plan):
    run = tiny_plan(tmp_path, **LONG_RUN).runs[0]
    paths = RunPaths.of(run)
    log = tmp_path / "train.log"
    job = start_job("training.launch", paths.config, log=log, cwd=tmp_path)
    wait_until(lambda: last_step(run) >= 2 or job.poll() is not None, 300, "step 2")
    step_processes = processes_mentioning(str(paths.config))  # training.launch, accelerate, worker
    assert job.pid in step_processes and len(step_processes) >= 3, step_processes
    _signal_all(step_processes, signal.SIGUSR1)
    time.sleep(0.5)
    _signal_all(step_processes, signal.SIGTERM)
    assert job.wait(timeout=300) == EXIT_PREEMPTED, tail(log)

    [preempted] = events(run, "preempted")
    assert preempted["signal"] == "SIGUSR1" and 2 <= preempted["step"] < STEPS
    checkpoint = paths.checkpoints / f"checkpoint-{preempted['step']}"
    assert (checkpoint / "trainer_state.json").is_file() and (checkpoint / "adapter_model.safetensors").is_file()
    assert not list(paths.checkpoints.glob(".tmp-*"))
    text = log.read_text()
    assert "ignored" in text  # the later TERM was absorbed, by training.launch and the trainer
    assert processes_mentioning(str(paths.config)) == []


@pytest.fixture
def fake(tmp_path, monkeypatch):
    server = start_cluster(tmp_path, monkeypatch, "default")
    yield server
    server.stop()


def test_kubernetes_pod_command_checkpoints_on_sigterm_to_pid_1_and_its_replacement_resumes(
    tmp_path, tiny_experiment, fake
):
    # storage.root stands for the claim: the pod's paths are real paths on this machine.
    storage = tmp_path / "claim"
    path = tiny_experiment(
        tmp_path / "exp", backend="kubernetes", storage={"root": str(storage)}, inference={"enabled": False}, **LONG_RUN
    )
    p = plan(path)
    (run,) = p.runs
    KubernetesBackend(poll_seconds=0.05).submit(p)
    storage.mkdir(parents=True, exist_ok=True)  # (the local data.jsonl travels in the ConfigMap)

    # What the API server holds is what the pod runs: the ConfigMap at /config, the command.
    names = Names.of(p.experiment.name, run.run_id)
    # The run's ConfigMap and its data file's (the namespace holds this experiment alone).
    config = mount_config_map(fake.list("configmaps", "default"), tmp_path / "config", CONFIG_MOUNT)
    pod = fake.get("jobs", "default", names.train_job)["spec"]["template"]["spec"]
    command = [part.replace(CONFIG_MOUNT, str(config)) for part in pod["containers"][0]["command"]]
    assert command[1:3] == ["-m", "training.launch"]
    command[0] = sys.executable  # the image's python

    def start_pod(log: Path) -> subprocess.Popen:
        # PID 1 of its container: the leader of its own process group.
        return subprocess.Popen(
            command,
            cwd=tmp_path,
            env=job_env(),
            stdout=log.open("ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    log = tmp_path / "pod-0.log"
    first = start_pod(log)
    wait_until(lambda: last_step(run) >= 2 or first.poll() is not None, 300, "step 2")
    first.send_signal(signal.SIGTERM)  # the kubelet signals PID 1 only
    assert first.wait(timeout=300) == EXIT_PREEMPTED, tail(log)
    assert "[qlaunch] got SIGTERM: asking the workers to checkpoint" in log.read_text()
    [preempted] = events(run, "preempted")
    assert preempted["signal"] == "SIGTERM"
    ignored = pod_failure_exit_codes(fake.get("jobs", "default", names.train_job))
    assert EXIT_PREEMPTED in ignored

    replacement = start_pod(tmp_path / "pod-1.log")
    assert replacement.wait(timeout=600) == 0, tail(tmp_path / "pod-1.log")
    assert events(run, "start")[-1]["resumed_from"] == preempted["step"]
    assert events(run, "end")[-1]["step"] == STEPS


def pod_failure_exit_codes(job: dict) -> list[int]:
    return [
        code
        for rule in job["spec"]["podFailurePolicy"]["rules"]
        if rule["action"] == "Ignore"
        for code in rule.get("onExitCodes", {}).get("values", [])
    ]
