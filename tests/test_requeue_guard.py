"""The requeue guard (launcher/job/requeue.py) without a cluster: the decision, the Slurm batch script
that carries it, the Kubernetes Job and pod side that honours it, and what status says.
tests/test_slurm_requeue.py runs the batch script's guard on the real test cluster."""

from __future__ import annotations

import subprocess
import textwrap
from pathlib import Path

import pytest

from launcher.backends.base import State
from launcher.backends.kubernetes.manifests import evaluation_documents, run_documents
from launcher.backends.kubernetes.state import job_state
from launcher.backends.slurm.script import render_run
from launcher.grid import plan
from launcher.job import requeue
from launcher.job.progress import EXIT_PREEMPTED
from launcher.job.storage import RunPaths
from training.launch import requeue_guard


def _plan(tmp_path: Path, backend: str, resources: str = "{}"):
    path = tmp_path / "e.yaml"
    path.write_text(
        textwrap.dedent(f"""\
        name: guard
        backend: {backend}
        storage: {{root: {tmp_path / "runs"}}}
        resources: {resources}
    """)
    )
    return plan(path)


def test_defaults_cap_requeues_and_stalls():
    from launcher.job.config import ResourcesConfig

    res = ResourcesConfig()
    assert (res.max_requeues, res.max_requeues_without_progress) == (10, 2)


def test_decide_stops_at_the_cap_and_after_stalled_requeues(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)

    def stop(job, saved=None, started_from=None, cap=3, stalls=1):
        if saved is not None:
            (run_dir / "checkpoints" / f"checkpoint-{saved}").mkdir()
        return requeue.decide(run_dir, job, started_from, cap, stalls)

    # Each attempt saves a newer checkpoint: requeued 3 times, the 4th stop is refused.
    assert [stop("a", saved=10 * n, started_from=10 * n - 10 or None) for n in (1, 2, 3)] == [None] * 3
    reason = stop("a", saved=40, started_from=30)
    assert reason and "requeued 3 times already (resources.max_requeues: 3)" in reason
    assert requeue.stopped_reason(run_dir, "a") == reason
    # Another job of the run starts its own count; stops that save nothing: one requeue without
    # progress is allowed (max 1), the second stalled stop in a row is refused.
    assert stop("b", started_from=40) is None
    reason = stop("b", started_from=40)
    assert reason and "2 attempts in a row stopped without saving a newer checkpoint" in reason
    assert requeue.stopped_reason(run_dir, "a") is None  # the newest refusal is b's
    assert [s.advanced for s in requeue.read_stops(run_dir, "b")] == [False, False]
    # A partial save (.tmp-*) is not a checkpoint.
    (run_dir / "checkpoints" / ".tmp-checkpoint-99").mkdir()
    assert requeue.newest_checkpoint(run_dir) == 40


def test_slurm_script_renders_the_guard_and_its_limits(tmp_path):
    (run,) = _plan(tmp_path, "slurm", "{max_requeues: 4, max_requeues_without_progress: 1}").runs
    script = render_run(run).train
    assert 'if [ "$restart" -ge 4 ]; then' in script
    assert 'elif [ "$stalled" -gt 1 ]; then' in script
    assert "(resources.max_requeues: 4)" in script and "status=76" in script
    assert script.index("started_from=$(newest_checkpoint)") < script.index("srun ")
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0


def test_slurm_without_requeue_renders_no_guard(tmp_path):
    path = tmp_path / "e.yaml"
    path.write_text(f"name: guard\nbackend: slurm\nstorage: {{root: {tmp_path}}}\nslurm: {{requeue: false}}\n")
    (run,) = plan(path).runs
    assert "scontrol requeue" not in render_run(run).train and "requeues.log" not in render_run(run).train


def test_kubernetes_job_fails_on_the_guards_exit_code_and_tells_the_pod_its_job(tmp_path):
    p = _plan(tmp_path, "kubernetes", "{max_requeues: 4}")
    # The grid's evaluation Job is its runs' inference (issue #29).
    train = next(d for d in run_documents(p, p.runs[0]) if d["kind"] == "Job")
    infer = next(d for d in evaluation_documents(p, p.runs) if d["kind"] == "Job")
    rules = train["spec"]["podFailurePolicy"]["rules"]
    # The guard's code fails the Job before exit 75's "replace the pod" rule is looked at.
    assert rules[0] == {
        "action": "FailJob",
        "onExitCodes": {"containerName": "train", "operator": "In", "values": [requeue.EXIT_REQUEUES_EXHAUSTED]},
    }
    assert any(r.get("onExitCodes", {}).get("values") == [EXIT_PREEMPTED] for r in rules[1:])
    env = {e["name"]: e for e in train["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert (
        env[requeue.JOB_ENV]["valueFrom"]["fieldRef"]["fieldPath"]
        == "metadata.labels['batch.kubernetes.io/controller-uid']"
    )
    assert all(r["action"] != "FailJob" for r in infer["spec"]["podFailurePolicy"]["rules"])


def test_training_launch_honours_the_guard_in_a_pod(tmp_path):
    (run,) = _plan(tmp_path, "kubernetes", "{max_requeues: 2, max_requeues_without_progress: 5}").runs
    paths = RunPaths.of(run)
    (paths.checkpoints / "checkpoint-5").mkdir(parents=True)
    env = {requeue.JOB_ENV: "uid-1"}
    # Not in a pod (Slurm, local): 75 stays 75, nothing is recorded.
    assert requeue_guard(run, paths, None, 0, {}) == EXIT_PREEMPTED
    assert not (paths.root / requeue.LOG_NAME).exists()
    codes = []
    for step in (10, 15, 20):
        (paths.checkpoints / f"checkpoint-{step}").mkdir()
        codes.append(requeue_guard(run, paths, step - 5, 0, env))
    assert codes == [EXIT_PREEMPTED, EXIT_PREEMPTED, requeue.EXIT_REQUEUES_EXHAUSTED]
    # Other ranks leave the decision to rank 0.
    assert requeue_guard(run, paths, 20, 1, env) == EXIT_PREEMPTED


def test_kubernetes_status_says_the_guard_stopped_the_run():
    job = {
        "metadata": {"uid": "u1", "name": "j"},
        "spec": {"parallelism": 1},
        "status": {"conditions": [{"type": "Failed", "status": "True", "reason": "PodFailurePolicy"}]},
    }
    pod = {
        "metadata": {
            "name": "j-a",
            "ownerReferences": [{"uid": "u1", "kind": "Job"}],
            "creationTimestamp": "2026-12-07T00:00:00Z",
        },
        "status": {
            "phase": "Failed",
            "containerStatuses": [
                {"name": "train", "state": {"terminated": {"exitCode": requeue.EXIT_REQUEUES_EXHAUSTED}}}
            ],
        },
    }
    state, detail, _ = job_state(job, [pod])
    assert state == State.FAILED and "requeue guard" in detail and "qlaunch submit" in detail


@pytest.mark.parametrize("value", [-1])
def test_negative_limits_are_refused(tmp_path, value):
    from launcher.job.errors import ConfigError

    with pytest.raises((ConfigError, ValueError)):
        _plan(tmp_path, "slurm", f"{{max_requeues: {value}}}")


def test_a_pod_that_keeps_stopping_exits_76_at_the_cap(tmp_path, monkeypatch):
    """training.launch's own main, as a Kubernetes pod runs it, with a stand-in for accelerate that
    saves a checkpoint, records `preempted` and stops: the Job gets 75 (replace the pod) until the
    guard's limit, then 76 (its podFailurePolicy fails the Job)."""
    import sys

    from launcher.job.storage import write_run_config
    from training import launch

    (run,) = _plan(tmp_path, "kubernetes", "{max_requeues: 2}").runs
    paths = RunPaths.of(run)
    run_yaml = write_run_config(run)
    stand_in = textwrap.dedent(f"""\
        import json, pathlib, time
        root = pathlib.Path({str(paths.root)!r})
        steps = [int(p.name.split("-")[1]) for p in (root / "checkpoints").glob("checkpoint-*")]
        (root / "checkpoints" / f"checkpoint-{{max(steps, default=0) + 10}}").mkdir(parents=True)
        with open(root / "progress.jsonl", "a") as f:
            f.write(json.dumps({{"event": "preempted", "step": 1, "time": time.time() + 1, "signal": "SIGTERM"}}) + "\\n")
        raise SystemExit(1)  # accelerate turns the worker's 75 into 1
    """)
    monkeypatch.setattr(launch, "node_command", lambda *args: [sys.executable, "-c", stand_in])
    monkeypatch.setenv(requeue.JOB_ENV, "job-uid-1")
    codes = [launch.main([str(run_yaml)]) for _ in range(3)]
    assert codes == [EXIT_PREEMPTED, EXIT_PREEMPTED, requeue.EXIT_REQUEUES_EXHAUSTED]
    assert "resources.max_requeues: 2" in requeue.stopped_reason(paths.root, "job-uid-1")
    # A new Job (qlaunch submit again) has a count of its own.
    monkeypatch.setenv(requeue.JOB_ENV, "job-uid-2")
    assert launch.main([str(run_yaml)]) == EXIT_PREEMPTED
