"""Every backend starts training the same way, `python -m training.launch <run.yaml>`, and
training.launch alone turns the run config into accelerate's flags for its node."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from launcher.backends.kubernetes.manifests import train_command as k8s_command
from launcher.backends.local import train_command as local_command
from launcher.backends.slurm.script import render_run
from launcher.grid import plan
from training import launch


def _plan(tmp_path: Path, backend: str, resources: str, train: str = "{}"):
    path = tmp_path / "exp.yaml"
    path.write_text(
        f"name: mn\nbackend: {backend}\nstorage: {{root: /mnt/q}}\nresources: {resources}\ntrain: {train}\n"
    )
    return plan(path)


def _flags(command: list[str]) -> dict[str, str | None]:
    flags: dict[str, str | None] = {}
    for i, part in enumerate(command):
        if part.startswith("--"):
            following = command[i + 1] if i + 1 < len(command) else None
            flags[part] = None if following is None or following.startswith("--") else following
    return flags


def _slurm_command(run) -> list[str]:
    """The training.launch command of the sbatch script's srun line, with $head_node expanded."""
    text = render_run(run).train
    line = text[text.index("srun ") :].split("\n", 2)[1]
    words = shlex.split(line.replace('"${in_container[@]}"', "").replace('"$head_node"', "node-a"))
    return words


def test_multi_node_kubernetes_pod_gets_its_rank_from_the_indexed_job(tmp_path):
    p = _plan(tmp_path, "kubernetes", "{nodes: 3, gpus_per_node: 2}", "{fp16: true}")
    run = p.runs[0]
    command = k8s_command(p, run)
    assert command[:4] == ["python", "-m", "training.launch", "/config/run.yaml"]
    args, extra = launch.parse_args(command[3:])
    # This machine has no GPU: training.launch falls back to one CPU process per node, still a
    # torchrun rendezvous across the nodes (gloo), in float32.
    flags = _flags(launch.node_command(args, extra, run, {"JOB_COMPLETION_INDEX": "2"}))
    assert (flags["--num_machines"], flags["--num_processes"], flags["--machine_rank"]) == ("3", "3", "2")
    assert "--multi_gpu" in flags and "--cpu" not in flags and flags["--mixed_precision"] == "no"
    args.processes = 2  # as on the pod's 2 GPUs
    flags = _flags(launch.node_command(args, extra, run, {"JOB_COMPLETION_INDEX": "2"}))
    assert (flags["--num_processes"], flags["--mixed_precision"]) == ("6", "fp16") and "--multi_gpu" in flags
    assert flags["--main_process_ip"] == "mn-" + run.run_id + "-0.mn-" + run.run_id
    assert flags["--main_process_port"] == "29500"


def test_slurm_task_gets_its_rank_from_slurm_and_precision_from_the_run(tmp_path):
    p = _plan(tmp_path, "slurm", "{nodes: 2, gpus_per_node: 4, cpus_per_task: 16}", "{fp16: true}")
    run = p.runs[0]
    command = _slurm_command(run)
    assert command[1:3] == ["-m", "training.launch"] and command[3].endswith("/run.yaml")
    args, extra = launch.parse_args(command[3:])
    args.processes = 4  # the node's 4 GPUs (none here)
    flags = _flags(launch.node_command(args, extra, run, {"SLURM_NODEID": "1"}))
    assert (flags["--num_machines"], flags["--num_processes"], flags["--machine_rank"]) == ("2", "8", "1")
    assert flags["--main_process_ip"] == "node-a" and "--multi_gpu" in flags
    assert flags["--mixed_precision"] == "fp16" and flags["--num_cpu_threads_per_process"] == "4"


def test_local_single_node_cpu(tmp_path):
    p = _plan(tmp_path, "local", "{gpus_per_node: 0, cpus_per_task: 2}")
    run = p.runs[0]
    command = local_command(run)
    assert command[1:3] == ["-m", "training.launch"] and command[3:] == [str(Path(run.run_dir) / "run.yaml")]
    args, extra = launch.parse_args(command[3:])
    flags = _flags(launch.node_command(args, extra, run, {"OMP_NUM_THREADS": "1"}))
    assert (flags["--num_machines"], flags["--num_processes"]) == ("1", "1") and "--cpu" in flags
    assert "--machine_rank" not in flags and "--multi_gpu" not in flags
    # A thread count the environment sets is left to accelerate (it reads OMP_NUM_THREADS).
    assert "--num_cpu_threads_per_process" not in flags


def test_multi_node_without_rendezvous_host_is_one_clear_error(tmp_path, capsys):
    p = _plan(tmp_path, "slurm", "{nodes: 2, gpus_per_node: 0}")
    run = p.runs[0]
    args, extra = launch.parse_args([str(Path(run.run_dir) / "run.yaml")])
    with pytest.raises(SystemExit, match="--main-process-ip is required"):
        launch.node_command(args, extra, run, {})


def test_rendered_kubernetes_command_is_parsed_in_full(tmp_path, capsys):
    p = _plan(tmp_path, "kubernetes", "{nodes: 2, gpus_per_node: 4}")
    command = k8s_command(p, p.runs[0])
    # Parsed in full; it stops only because /config/run.yaml exists inside the pod, not here.
    assert launch.main(command[3:]) == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments" not in err and "/config/run.yaml: cannot read run config" in err
