"""`qlaunch render --backend slurm`: the batch scripts a user reviews, byte for byte.

Snapshots live in tests/snapshots/slurm/<case>/. After an intended template change, rewrite
them with `QLAUNCH_UPDATE_SNAPSHOTS=1 pytest tests/test_slurm_render.py` and review the diff.
No cluster needed.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import yaml

from launcher.backends.slurm.backend import SlurmBackend
from launcher.grid import plan
from launcher.job.errors import ConfigError

SNAPSHOTS = Path(__file__).parent / "snapshots" / "slurm"
UPDATE = os.environ.get("QLAUNCH_UPDATE_SNAPSHOTS") == "1"

CASES = {
    # A typical GPU cluster: site directives, module loads, a venv, a token file.
    "gpu-cluster": {
        "name": "llama2-guanaco",
        "model": {"hf_token_file": "/home/me/.cache/hf_token"},
        "storage": {"root": "/shared/qlaunch-runs"},
        "environment": {
            "setup": ["module load cuda/12.1", "source /shared/envs/qlora/bin/activate"],
            "variables": {"HF_HOME": "/shared/hf cache", "WANDB_MODE": "offline"},
        },
        "slurm": {
            "partition": "gpu",
            "inference_partition": "gpu-short",
            "account": "ml-team",
            "qos": "normal",
            "constraint": "t4",
            "extra_directives": ["--exclusive", "--comment=qlaunch grid #1"],
        },
        "grid": {"lora.r": [16, 64]},
    },
    # Two nodes of 4 GPUs in an Apptainer image, fp16 (T4), a longer warning before the limit.
    "multinode-container": {
        "name": "llama2-multinode",
        "storage": {"root": "/shared/qlaunch-runs"},
        "train": {"fp16": True},
        "resources": {
            "nodes": 2,
            "gpus_per_node": 4,
            "cpus_per_task": 16,
            "memory": "120G",
            "time_limit": "1-12:00:00",
        },
        "environment": {"container": "/shared/images/qlaunch-train.sif", "python": "python3"},
        "slurm": {"signal_seconds": 600},
    },
    # The job image (docker/Dockerfile) run by Docker on one GPU node; a variable and the token by name.
    "gpu-docker": {
        "name": "llama2-docker",
        "model": {"hf_token_file": "/home/me/.cache/hf_token"},
        "storage": {"root": "/shared/qlaunch-runs"},
        "resources": {"gpus_per_node": 2},
        "inference": {"per_run": True},  # an inference job per run, after its training job
        "environment": {
            "container": "registry.example.com/ml/qlaunch-train:0.1.0",
            "container_runtime": "docker",
            "variables": {"WANDB_MODE": "offline"},
        },
    },
    # CPU only, no requeue, no inference job.
    "cpu-no-requeue": {
        "name": "cpu-smoke",
        "storage": {"root": "/shared/qlaunch-runs"},
        "resources": {"gpus_per_node": 0, "cpus_per_task": 2, "memory": "4G", "time_limit": "00:30:00"},
        "environment": {"python": "/opt/venvs/qlaunch/bin/python"},
        "slurm": {"requeue": False},
        "inference": {"enabled": False},
    },
}


def _experiment(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _render(tmp_path: Path, data: dict, out: str = "out") -> dict[str, str]:
    written = SlurmBackend().render(plan(_experiment(tmp_path, data)), tmp_path / out)
    # The experiment's folder appears in container bind paths; it is a tmp folder here.
    return {p.name: p.read_text().replace(str(tmp_path), "<experiment dir>") for p in written}


def _run_script(rendered: dict[str, str]) -> str:
    """The one run's own training script (not the array that runs it)."""
    (text,) = [text for name, text in rendered.items() if name.endswith(".train.sbatch") and "-" not in name]
    return text


@pytest.mark.parametrize("case", sorted(CASES))
def test_render_matches_snapshot(tmp_path, case):
    rendered = _render(tmp_path, CASES[case])
    folder = SNAPSHOTS / case
    if UPDATE:
        folder.mkdir(parents=True, exist_ok=True)
        for old in [*folder.glob("*.sbatch"), *folder.glob("*.tasks")]:
            old.unlink()
        for name, text in rendered.items():
            (folder / name).write_text(text)
    expected = {p.name: p.read_text() for p in sorted([*folder.glob("*.sbatch"), *folder.glob("*.tasks")])}
    assert sorted(rendered) == sorted(expected), "a different set of scripts (QLAUNCH_UPDATE_SNAPSHOTS=1 to accept)"
    for name, text in rendered.items():
        assert text == expected[name], f"{case}/{name} differs from its snapshot (QLAUNCH_UPDATE_SNAPSHOTS=1 to accept)"


def test_a_training_script_per_run_and_one_evaluation_script_for_the_grid(tmp_path):
    rendered = _render(tmp_path, CASES["gpu-cluster"])
    # Two runs' scripts, the grid's evaluation script, and the training array over both runs.
    assert len(rendered) == 5
    for name, text in rendered.items():
        if name.endswith(".sbatch"):
            assert text.startswith("#!/bin/bash\n")
            assert subprocess.run(["bash", "-n"], input=text, text=True).returncode == 0, name
    train = next(text for name, text in rendered.items() if name.endswith(".train.sbatch") and "-" not in name)
    assert "#SBATCH --gres=gpu:t4:1" in train
    # To the step's processes: training.launch handles it (no forwarding in the script).
    assert "#SBATCH --signal=USR1@300" in train
    assert "-m training.launch" in train and "accelerate.commands" not in train and "trap" not in train
    evaluate = rendered["evaluate.sbatch"]
    assert "#SBATCH --partition=gpu-short" in evaluate and "#SBATCH --gres=gpu:t4:1" in evaluate
    assert "#SBATCH --job-name=llama2-guanaco-evaluate" in evaluate
    assert "-m training.evaluate_grid /shared/qlaunch-runs/llama2-guanaco/evaluation/runs.txt" in evaluate
    assert "#SBATCH --output=/shared/qlaunch-runs/llama2-guanaco/evaluation/evaluate.log" in evaluate


def test_per_run_inference_keeps_an_inference_script_per_run(tmp_path):
    rendered = _render(tmp_path, CASES["gpu-docker"])
    infer = next(text for name, text in rendered.items() if name.endswith(".infer.sbatch"))
    assert "-m training.infer" in infer and "evaluate.sbatch" not in rendered


def test_render_is_pure(tmp_path):
    first = _render(tmp_path, CASES["multinode-container"], out="first")
    second = _render(tmp_path, CASES["multinode-container"], out="second")
    assert first == second


def test_no_gres_line_without_gpus(tmp_path):
    text = _run_script(_render(tmp_path, CASES["cpu-no-requeue"]))
    assert "--gres" not in text
    assert "#SBATCH --no-requeue" in text
    assert "scontrol requeue" not in text


def test_no_secret_reaches_a_script(tmp_path, monkeypatch):
    secret = "hf_SeCrEt_0123456789"
    monkeypatch.setenv("HF_TOKEN", secret)
    token_file = tmp_path / "token"
    token_file.write_text(secret)
    data = {**CASES["gpu-cluster"], "model": {"hf_token_file": str(token_file)}}
    for text in _render(tmp_path, data).values():
        assert secret not in text


def test_secret_looking_variable_is_refused(tmp_path):
    data = {**CASES["cpu-no-requeue"], "environment": {"variables": {"HF_TOKEN": "hf_x"}}}
    with pytest.raises(ConfigError, match="environment.variables"):
        SlurmBackend().render(plan(_experiment(tmp_path, data)), tmp_path / "out")


def test_values_reach_the_shell_literally(tmp_path):
    """Variables are exported quoted: `$(...)`, quotes and spaces arrive as typed."""
    nasty = "a b $(touch pwned) `id` 'single' \"double\" $HOME ;"
    data = {**CASES["cpu-no-requeue"], "environment": {"variables": {"NASTY": nasty}}}
    text = _run_script(_render(tmp_path, data))
    exports = "\n".join(line for line in text.splitlines() if line.startswith("export NASTY="))
    result = subprocess.run(
        ["bash", "-c", exports + '\nprintf %s "$NASTY"'], cwd=tmp_path, capture_output=True, text=True
    )
    assert result.stdout == nasty
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize(
    ("section", "values", "message"),
    [
        ("environment", {"variables": {"MY-VAR": "x"}}, "environment.variables.MY-VAR"),
        ("slurm", {"extra_directives": ["exclusive"]}, r"slurm.extra_directives\[0\]"),
        ("environment", {"setup": ["module load a\nmodule load b"]}, r"environment.setup\[0\]"),
        ("storage", {"root": "/shared/runs-%j"}, "storage.root"),
        ("resources", {"gpu_type": "t4 --wrap=x"}, "resources.gpu_type"),
    ],
)
def test_bad_values_give_one_clear_error_and_no_files(tmp_path, section, values, message):
    data = {**CASES["cpu-no-requeue"], section: {**CASES["cpu-no-requeue"].get(section, {}), **values}}
    with pytest.raises(ConfigError, match=message):
        SlurmBackend().render(plan(_experiment(tmp_path, data)), tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("runtime", ["docker", "podman"])
def test_docker_and_podman_scripts_are_valid_bash_that_runs_the_image(tmp_path, runtime):
    data = {**CASES["gpu-docker"], "environment": {**CASES["gpu-docker"]["environment"], "container_runtime": runtime}}
    written = SlurmBackend().render(plan(_experiment(tmp_path, data)), tmp_path / "out")
    for path in written:
        if "-" in path.name:  # the array script and task list: no container of their own
            continue
        subprocess.run(["bash", "-n", str(path)], check=True)
        text = path.read_text()
        assert f"in_container=({runtime} run --rm" in text
        assert ("--userns=keep-id" in text) == (runtime == "podman")
        assert ("TINI_KILL_PROCESS_GROUP=1" in text) == (runtime == "docker")
        assert text.count("--volume /shared/qlaunch-runs:/shared/qlaunch-runs") == 1


# ---- arrays (issue #28) --------------------------------------------------------------------------
def _arrays(rendered: dict[str, str]) -> dict[str, str]:
    return {name: text for name, text in rendered.items() if "-" in name}


def test_a_grid_is_one_array_whose_tasks_run_each_runs_own_script(tmp_path):
    data = {**CASES["cpu-no-requeue"], "slurm": {"array_parallelism": 2}, "grid": {"train.seed": [1, 2, 3]}}
    p = plan(_experiment(tmp_path, data))
    rendered = _render(tmp_path, data)
    arrays = _arrays(rendered)
    (tasks_name,) = [name for name in arrays if name.endswith(".tasks")]
    (array_name,) = [name for name in arrays if name.endswith(".train.sbatch")]
    # Task N is the N-th run of the grid, by id and run folder.
    lines = [line.split("\t") for line in arrays[tasks_name].splitlines() if not line.startswith("#")]
    assert lines == [[str(i), run.run_id, run.run_dir] for i, run in enumerate(p.runs)]
    array = arrays[array_name]
    assert "#SBATCH --array=0-2%2" in array  # slurm.array_parallelism: 2 runs at once
    assert "#SBATCH --job-name=cpu-smoke-train" in array
    # The run's own directives (the same for every run of the array), its log through a link.
    run_directives = [
        line
        for line in _run_script({n: t for n, t in rendered.items() if p.runs[0].run_id in n}).splitlines()
        if line.startswith("#SBATCH") and "--job-name" not in line and "--output" not in line
    ]
    assert all(line in array for line in run_directives)
    assert f"#SBATCH --output=/shared/qlaunch-runs/cpu-smoke/arrays/{tasks_name[:-6]}.train.logs/%a.log" in array

    # The task resolves its run from $SLURM_ARRAY_TASK_ID and runs that run's train.sbatch.
    storage = tmp_path / "storage"
    for i, run in enumerate(p.runs):
        (storage / run.run_id).mkdir(parents=True)
        (storage / run.run_id / "train.sbatch").write_text(f"echo ran {run.run_id}\n")
    tasks = tmp_path / "tasks"
    tasks.write_text(arrays[tasks_name].replace("/shared/qlaunch-runs/cpu-smoke", str(storage)))
    script = array.replace(f"/shared/qlaunch-runs/cpu-smoke/arrays/{tasks_name}", str(tasks))
    for i, run in enumerate(p.runs):
        out = subprocess.run(
            ["bash", "-c", script], env={**os.environ, "SLURM_ARRAY_TASK_ID": str(i)}, capture_output=True, text=True
        )
        assert out.stdout == f"ran {run.run_id}\n", out.stderr
    missing = subprocess.run(
        ["bash", "-c", script], env={**os.environ, "SLURM_ARRAY_TASK_ID": "7"}, capture_output=True, text=True
    )
    assert missing.returncode == 1 and "array task 7 is not in" in missing.stderr


def test_runs_with_different_directives_form_separate_arrays(tmp_path):
    from dataclasses import replace

    from launcher.backends.slurm.arrays import layout
    from launcher.backends.slurm.script import render_run

    p = plan(_experiment(tmp_path, {**CASES["cpu-no-requeue"], "grid": {"train.seed": [1, 2, 3, 4]}}))
    scripts = {run.run_id: render_run(run) for run in p.runs}
    # As if the last two runs asked for more memory (a per-run resource estimate, another site).
    for run in p.runs[2:]:
        rendered = scripts[run.run_id]
        scripts[run.run_id] = replace(
            rendered,
            train_scheduling=tuple("--mem=8G" if d.startswith("--mem=") else d for d in rendered.train_scheduling),
        )
    chunks = layout(p.runs, scripts, 1001, lambda run: False)
    assert [[run.run_id for run in chunk.runs] for chunk in chunks] == [
        [run.run_id for run in p.runs[:2]],
        [run.run_id for run in p.runs[2:]],
    ]
    assert "#SBATCH --mem=4G" in chunks[0].train and "#SBATCH --mem=8G" in chunks[1].train
    assert all("#SBATCH --array=0-1\n" in chunk.train for chunk in chunks)  # no throttle by default
    # MaxArraySize=3 caps the index: 4 alike runs are two arrays, tasks 0-2 and 0.
    alike = layout(p.runs, {run.run_id: render_run(run) for run in p.runs}, 3, lambda run: False)
    assert [len(chunk.runs) for chunk in alike] == [3, 1]
    assert "#SBATCH --array=0-2\n" in alike[0].train and "#SBATCH --array=0\n" in alike[1].train


@pytest.mark.parametrize("value", [0, -1, 2.5, "four", True])
def test_array_parallelism_must_be_a_positive_integer(tmp_path, value):
    data = {**CASES["cpu-no-requeue"], "slurm": {"array_parallelism": value}}
    with pytest.raises(ConfigError, match=r"experiment.yaml:\d+: slurm.array_parallelism"):
        plan(_experiment(tmp_path, data))
