"""A Slurm-minded experiment on Kubernetes (issue #33, finding 4): the shipped T4 example renders
for Kubernetes with its model cache on the claim; a folder variable outside the pod's volumes is
one error naming the variable; the pod's run.yaml carries nothing of Slurm's."""

from __future__ import annotations

import textwrap
from pathlib import Path, PurePosixPath

import pytest
import yaml

from launcher.cli import main

ROOT = Path(__file__).resolve().parents[1]
T4_EXAMPLE = ROOT / "examples" / "llama2-7b-t4.yaml"

SLURM_MINDED = textwrap.dedent("""\
    name: slurm-minded
    backend: slurm
    storage:
      root: /mnt/qlaunch
    inference:
      enabled: false
    environment:
      setup:
        - module load cuda/12.1
      variables:
        TOKENIZERS_PARALLELISM: "false"
        HF_HOME: /shared/hf-cache
""")


@pytest.fixture(autouse=True)
def qlaunch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("QLAUNCH_HOME", str(tmp_path / "qlaunch-home"))


def rendered(out: Path) -> list[dict]:
    return [doc for file in sorted(out.glob("*.yaml")) for doc in yaml.safe_load_all(file.read_text()) if doc]


def test_the_t4_example_renders_for_kubernetes_with_the_cache_on_the_claim(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["check", str(T4_EXAMPLE), "--backend", "kubernetes"]) == 0
    setup_line = T4_EXAMPLE.read_text().splitlines().index("  setup:") + 1
    assert capsys.readouterr().err.strip() == (
        f"note: {T4_EXAMPLE}:{setup_line}: environment.setup: Slurm's: the pods start from kubernetes.image and do "
        "not run these lines (their run.yaml leaves them out)"
    )
    assert main(["render", str(T4_EXAMPLE), "--backend", "kubernetes", "-o", str(out)]) == 0, capsys.readouterr().err
    docs = rendered(out)
    jobs = [doc for doc in docs if doc["kind"] == "Job"]
    assert len(jobs) == 5  # 4 runs' training, the grid evaluation
    for job in jobs:
        pod = job["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        env = {item["name"]: item.get("value") for item in container["env"]}
        claim_mount = next(m["mountPath"] for m in container["volumeMounts"] if m["name"] == "storage")
        assert claim_mount == "/shared/qlaunch-runs"
        assert PurePosixPath(claim_mount) in PurePosixPath(env["HF_HOME"]).parents, env["HF_HOME"]
    run_yamls = [
        text for doc in docs if doc["kind"] == "ConfigMap" for key, text in doc["data"].items() if key.endswith(".yaml")
    ]  # each run's, and the grid evaluation's copy of each
    assert len(run_yamls) == 8
    for text in run_yamls:
        run = yaml.safe_load(text)
        assert run["backend"] == "kubernetes"
        assert run["environment"]["setup"] == [] and run["environment"]["container"] is None
        assert run["slurm"]["partition"] is None and run["slurm"]["account"] is None
    text = "".join(file.read_text() for file in out.glob("*.yaml"))
    assert "module load" not in text and "/shared/hf-cache" not in text and "backend: slurm" not in text


def test_the_t4_example_still_renders_its_setup_for_slurm(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["render", str(T4_EXAMPLE), "--backend", "slurm", "-o", str(out)]) == 0, capsys.readouterr().err
    scripts = "".join(file.read_text() for file in out.rglob("*.sbatch"))
    assert "module load cuda/12.1" in scripts


@pytest.mark.parametrize(
    "command",
    [
        ["check"],
        ["render", "-o", "{out}"],
        ["render", "-o", "{out}", "--skip-input-checks"],
        ["submit", "--dry-run", "client"],
    ],
)
def test_a_cache_folder_outside_the_pods_volumes_is_one_error_naming_the_variable(tmp_path, capsys, command):
    exp = tmp_path / "exp.yaml"
    exp.write_text(SLURM_MINDED)
    args = [part.format(out=tmp_path / "out") for part in command]
    assert main([args[0], str(exp), "--backend", "kubernetes", *args[1:]]) == 2
    err = capsys.readouterr().err
    expected = (
        f"{exp}:12: environment.variables.HF_HOME: /shared/hf-cache is on no volume of the Kubernetes pods "
        "(the claim 'qlaunch-storage' is mounted at /mnt/qlaunch) and uid 1000 cannot create it: leave HF_HOME "
        "unset (the pods share /mnt/qlaunch/.cache/huggingface on the claim) or point it under /mnt/qlaunch"
    )
    problems = [line.removeprefix("error: ").strip() for line in err.splitlines() if "environment.variables" in line]
    assert problems == [expected], err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_the_same_file_is_fine_for_slurm(tmp_path, capsys):
    exp = tmp_path / "exp.yaml"
    exp.write_text(SLURM_MINDED)
    assert main(["render", str(exp), "--backend", "slurm", "-o", str(tmp_path / "out")]) == 0, capsys.readouterr().err


@pytest.mark.parametrize(
    "value", ["/mnt/qlaunch/hf", "/mnt/qlaunch/../qlaunch/hf", "/home/qlaunch/hf", "/tmp/hf", "relative/hf"]
)
def test_cache_folders_the_pod_can_write_pass(tmp_path, capsys, value):
    exp = tmp_path / "exp.yaml"
    exp.write_text(SLURM_MINDED.replace("/shared/hf-cache", value))
    assert main(["render", str(exp), "--backend", "kubernetes", "-o", str(tmp_path / "out")]) == 0, (
        capsys.readouterr().err
    )


def test_other_folder_variables_are_checked_too_and_read_only_paths_are_not(tmp_path, capsys):
    exp = tmp_path / "exp.yaml"
    exp.write_text(
        SLURM_MINDED.replace(
            "HF_HOME: /shared/hf-cache", "TRITON_CACHE_DIR: /scratch/triton\n    CUDA_HOME: /usr/local/cuda"
        )
    )
    assert main(["check", str(exp), "--backend", "kubernetes"]) == 2
    err = capsys.readouterr().err
    assert f"{exp}:12: environment.variables.TRITON_CACHE_DIR: /scratch/triton is on no volume" in err
    assert "point it under /mnt/qlaunch (the claim) or /home/qlaunch (the pod's own)" in err
    assert "CUDA_HOME" not in err
