"""A two-node job on the real test cluster (`slurm/cluster.sh up --nodes 2`: two slurmd, each in
its own network namespace and hostname): one task per node, accelerate's rendezvous across the
two hosts (head node from `scontrol show hostnames`, machine rank from SLURM_NODEID), trained to
the end through two preemptions — a higher-priority job taking one of the nodes, then
`scontrol requeue` — and then the dependent inference job.
"""

from __future__ import annotations

import json
import subprocess

import pytest
from slurm_support import PYTHON, cancel_after, plan, require_cluster, unique_name, wait_for  # noqa: F401

from launcher.backends.base import State
from launcher.backends.slurm.backend import SlurmBackend
from launcher.job.progress import read_events, summarize
from launcher.job.storage import RunPaths

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

NODES = ("qlnode1", "qlnode2")


@pytest.fixture(scope="module", autouse=True)
def _two_nodes():
    require_cluster()
    out = subprocess.run(["sinfo", "--noheader", "--partition=multi", "--format=%D"], capture_output=True, text=True)
    if out.stdout.strip() != "2":
        pytest.fail("the test cluster has no two-node partition `multi`: run bash slurm/cluster.sh up --nodes 2")


def _events(run, kind: str) -> list[dict]:
    return [e for e in read_events(RunPaths.of(run).progress) if e.get("event") == kind]


def _training_in_attempt(run, attempt: int) -> bool:
    starts = _events(run, "start")
    if len(starts) < attempt:
        return False
    first = starts[attempt - 1]
    return any(e["step"] > first["step"] and e["time"] >= first["time"] for e in _events(run, "step"))


def test_two_node_run_trains_across_both_hosts_through_preemptions(tmp_path, tiny_experiment, cancel_after):
    max_steps = 60
    p = plan(
        tiny_experiment(
            tmp_path,
            name=unique_name("twonode"),
            backend="slurm",
            environment={"python": PYTHON},
            resources={"nodes": 2, "gpus_per_node": 0, "cpus_per_task": 1, "memory": "2G"},
            slurm={"partition": "multi", "inference_partition": "normal"},
            train={"max_steps": max_steps, "save_steps": 1000, "logging_steps": 1},
        )
    )
    cancel_after(p)
    (run,) = p.runs
    backend = SlurmBackend()
    train_job, _infer_job = backend.submit(p).submitted[run.run_id]

    # 1. a job of the high-priority partition takes one of the two nodes: the whole job requeues.
    wait_for(lambda: _training_in_attempt(run, 1), timeout=300, message="first attempt training", interval=0.5)
    high = subprocess.run(
        [
            "sbatch",
            "--parsable",
            "--partition=multi-high",
            f"--nodelist={NODES[1]}",
            "--exclusive",
            "--output=/dev/null",
            "--wrap=sleep 2",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    # 2. scontrol requeue, as an admin would.
    wait_for(lambda: _training_in_attempt(run, 2), timeout=300, message="second attempt training", interval=0.5)
    subprocess.run(["scontrol", "requeue", train_job], check=True)

    def done():
        status = backend.status(p)[run.run_id]
        if status.state == State.FAILED or status.infer_state == State.FAILED:
            raise AssertionError(f"{status}\n{RunPaths.of(run).train_log.read_text()[-4000:]}")
        return status.state == State.COMPLETED and status.infer_state == State.COMPLETED

    wait_for(done, timeout=900, message="training and inference", interval=5)
    paths = RunPaths.of(run)
    progress = summarize(read_events(paths.progress))
    assert progress.finished and progress.step == max_steps
    assert progress.restarts == 2 and backend.status(p)[run.run_id].restarts == 2
    assert all(step > 0 for step in progress.resumed_from), progress.resumed_from
    metrics = json.loads(paths.metrics.read_text())
    assert metrics["global_step"] == max_steps
    # Both hosts trained: a rank per node, each with its hostname in its attempt record, and each
    # rank's RNG state in the checkpoints.
    newest = sorted(paths.checkpoints.glob("checkpoint-*"), key=lambda c: int(c.name.split("-")[1]))[-1]
    assert {f.name for f in newest.glob("rng_state_*.pth")} == {"rng_state_0.pth", "rng_state_1.pth"}
    # Sharded across the nodes: 24 rows in batches of 2 on each of 2 ranks make a 6-step epoch.
    epochs = {e["step"]: e["epoch"] for e in _events(run, "step")}
    assert epochs[6] == pytest.approx(1.0)
    environment = json.loads((paths.attempts / "1" / "environment.json").read_text())
    assert environment["host"] == NODES[0] and environment["scheduler"]["world_size"] == "2"
    assert environment["scheduler"]["slurm_job_nodelist"] == "qlnode[1-2]"
    results = [json.loads(line) for line in (paths.inference / "results.jsonl").read_text().splitlines()]
    assert results and all(row["tuned"] for row in results)
    assert (
        subprocess.run(
            ["squeue", "--noheader", "--jobs", high, "--states=all", "--format=%T"], capture_output=True, text=True
        ).stdout.strip()
        == "COMPLETED"
    )
