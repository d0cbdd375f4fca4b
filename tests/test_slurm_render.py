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
        "resources": {"nodes": 2, "gpus_per_node": 4, "cpus_per_task": 16, "memory": "120G",
                      "time_limit": "1-12:00:00"},
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
        "environment": {"container": "registry.example.com/ml/qlaunch-train:0.1.0",
                        "container_runtime": "docker", "variables": {"WANDB_MODE": "offline"}},
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


@pytest.mark.parametrize("case", sorted(CASES))
def test_render_matches_snapshot(tmp_path, case):
    rendered = _render(tmp_path, CASES[case])
    folder = SNAPSHOTS / case
    if UPDATE:
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.glob("*.sbatch"):
            old.unlink()
        for name, text in rendered.items():
            (folder / name).write_text(text)
    expected = {p.name: p.read_text() for p in sorted(folder.glob("*.sbatch"))}
    assert sorted(rendered) == sorted(expected), "a different set of scripts (QLAUNCH_UPDATE_SNAPSHOTS=1 to accept)"
    for name, text in rendered.items():
        assert text == expected[name], f"{case}/{name} differs from its snapshot (QLAUNCH_UPDATE_SNAPSHOTS=1 to accept)"


def test_a_training_script_per_run_and_one_evaluation_script_for_the_grid(tmp_path):
    rendered = _render(tmp_path, CASES["gpu-cluster"])
    assert len(rendered) == 3
    for name, text in rendered.items():
        assert text.startswith("#!/bin/bash\n")
        assert subprocess.run(["bash", "-n"], input=text, text=True).returncode == 0, name
    train = next(text for name, text in rendered.items() if name.endswith(".train.sbatch"))
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
    rendered = _render(tmp_path, CASES["cpu-no-requeue"])
    (text,) = rendered.values()
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
    (text,) = _render(tmp_path, data).values()
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
        subprocess.run(["bash", "-n", str(path)], check=True)
        text = path.read_text()
        assert f"in_container=({runtime} run --rm" in text
        assert ("--userns=keep-id" in text) == (runtime == "podman")
        assert ("TINI_KILL_PROCESS_GROUP=1" in text) == (runtime == "docker")
        assert text.count("--volume /shared/qlaunch-runs:/shared/qlaunch-runs") == 1
