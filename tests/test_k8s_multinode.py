"""The pods of a multi-node Kubernetes run, started for real on this machine: the command and
environment of the rendered Indexed Job (not retyped), one process per pod index, each with the
JOB_COMPLETION_INDEX the Job controller gives it and the head pod's DNS name
(`<job>-0.<service>`) resolving as the headless Service makes it resolve. They must find each
other, train together and finish the run.

What the kubelet would provide is provided the same way: the ConfigMap's run.yaml at its mount
path is a file holding exactly the ConfigMap's data, the claim is a folder at storage.root,
HOME is an empty folder, and `python` is the image's interpreter (this test's).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from training_support import REPO, mount_config_map, tail

from launcher.backends.kubernetes.manifests import CONFIG_MOUNT, run_documents
from launcher.grid import plan
from launcher.job.storage import RunPaths

pytestmark = pytest.mark.slow


def _pod_processes(tmp_path, job: dict, config_maps: list[dict]):
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    head = f"{job['metadata']['name']}-0.{pod['subdomain']}"
    hosts = tmp_path / "hosts"
    hosts.write_text(f"127.0.0.1 localhost\n127.0.0.1 {head}\n")
    config = mount_config_map(config_maps, tmp_path / "config", CONFIG_MOUNT)
    home = tmp_path / "home"
    home.mkdir()
    command = [
        str(config / arg[len(CONFIG_MOUNT) + 1 :]) if arg.startswith(CONFIG_MOUNT + "/") else arg
        for arg in container["command"]
    ]
    if command[0] == "python":
        command[0] = sys.executable
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    env.update(HOME=str(home), PATH=os.environ["PATH"], PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    processes = []
    for index in range(job["spec"]["completions"]):
        log = tmp_path / f"pod-{index}.log"
        # A mount namespace of its own, where /etc/hosts is the pod's: the head's name resolves.
        processes.append(
            (
                subprocess.Popen(
                    [
                        "unshare",
                        "--mount",
                        "sh",
                        "-c",
                        'mount --bind "$0" /etc/hosts && exec "$@"',
                        str(hosts),
                        *command,
                    ],
                    env={**env, "JOB_COMPLETION_INDEX": str(index)},
                    cwd=home,
                    stdout=open(log, "wb"),
                    stderr=subprocess.STDOUT,
                ),
                log,
            )
        )
    return processes


def test_indexed_job_pods_rendezvous_and_train_together(tmp_path, tiny_experiment):
    if shutil.which("unshare") is None:
        pytest.fail("unshare (util-linux) is needed to give each pod its own /etc/hosts")
    claim = tmp_path / "claim"
    claim.mkdir()
    p = plan(
        tiny_experiment(
            tmp_path,
            name="knodes",
            backend="kubernetes",
            storage={"root": str(claim)},
            resources={"nodes": 2, "gpus_per_node": 0, "cpus_per_task": 1, "memory": "2G"},
            train={"max_steps": 12, "logging_steps": 1},
            inference={"enabled": False},
        )
    )
    # The local data.jsonl travels in the run's ConfigMap (qlaunch stages it): nothing to copy.
    (run,) = p.runs
    documents = run_documents(p, run)
    (job,) = [d for d in documents if d["kind"] == "Job" and d["spec"].get("completionMode") == "Indexed"]
    config_maps = [d for d in documents if d["kind"] == "ConfigMap"]  # run.yaml's, the data file's
    assert job["spec"]["completions"] == 2 and any(d["kind"] == "Service" for d in documents)

    processes = _pod_processes(tmp_path, job, config_maps)
    try:
        codes = [process.wait(timeout=600) for process, _ in processes]
    finally:
        for process, _ in processes:
            if process.poll() is None:
                process.kill()
    assert codes == [0, 0], "\n".join(tail(log) for _, log in processes)
    paths = RunPaths.of(run)
    assert json.loads(paths.metrics.read_text())["global_step"] == 12
    # Two ranks shared the data: 24 rows, batches of 2 on each of 2 ranks → 6 steps per epoch.
    steps = [json.loads(line) for line in paths.progress.read_text().splitlines() if '"step"' in line]
    assert {e["step"]: e.get("epoch") for e in steps if e.get("event") == "step"}[6] == pytest.approx(1.0)
    environment = json.loads((paths.attempts / "1" / "environment.json").read_text())
    assert environment["scheduler"]["job_completion_index"] == "0" and environment["scheduler"]["world_size"] == "2"
