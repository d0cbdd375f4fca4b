"""What a user expects of any CLI (issue #33, 10): --version, help on a bare `qlaunch`, shell
completion, `--set key=value` on every command that reads an experiment, and site defaults
(account, partition, namespace) from a user config file. Through the real command."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "examples" / "quickstart.yaml"


def qlaunch(*args, home: Path, env=None, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "launcher.cli", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, "QLAUNCH_HOME": str(home), "COLUMNS": "200", **(env or {})},
        timeout=120,
    )


@pytest.fixture
def home(tmp_path):
    return tmp_path / "qlaunch-home"


# ---- --version, bare qlaunch -------------------------------------------------------------------
def test_version_prints_the_version_and_where_it_is_installed(home):
    from launcher import __version__

    result = qlaunch("--version", home=home)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"qlaunch {__version__} (")
    assert str(ROOT / "launcher") in result.stdout
    assert "Traceback" not in result.stderr


def test_version_names_another_distribution_that_installs_launcher(home, tmp_path):
    # A package called `launcher` exists on PyPI: installed beside qlaunch it overwrites its files.
    site = tmp_path / "site"
    info = site / "launcher-9.9.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: launcher\nVersion: 9.9\n")
    (info / "RECORD").write_text("launcher/__init__.py,,\nlauncher-9.9.dist-info/METADATA,,\n")
    result = qlaunch("--version", home=home, env={"PYTHONPATH": f"{ROOT}{os.pathsep}{site}"})
    assert result.returncode == 1
    assert "launcher" in result.stderr and "also provide the top-level package 'launcher'" in result.stderr


def test_bare_qlaunch_prints_the_help_not_a_usage_error(home):
    result = qlaunch(home=home)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    for command in ("submit", "status", "completion", "--version"):
        assert command in result.stdout, result.stdout


# ---- completion --------------------------------------------------------------------------------
def complete(script: str, *words: str, cwd: Path = ROOT) -> list[str]:
    """What bash completes for `qlaunch <words>` (the last word is the one being typed)."""
    array = " ".join(f"'{w}'" for w in ("qlaunch", *words))
    probe = f'{script}\nCOMP_WORDS=({array}); COMP_CWORD={len(words)}; _qlaunch; printf "%s\\n" "${{COMPREPLY[@]}}"'
    result = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, cwd=cwd, timeout=30)
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_bash_completion_completes_commands_options_backends_and_experiment_files(home):
    result = qlaunch("completion", "bash", home=home)
    assert result.returncode == 0, result.stderr
    script = result.stdout
    assert complete(script, "sub") == ["submit"]
    assert "--set" in complete(script, "render", "--s")
    assert complete(script, "submit", "x.yaml", "--backend", "k") == ["kubernetes", "k8s"]
    assert "examples/quickstart.yaml" in complete(script, "check", "examples/qu")
    zsh = qlaunch("completion", "zsh", home=home)
    assert zsh.returncode == 0 and "bashcompinit" in zsh.stdout and "complete -F _qlaunch qlaunch" in zsh.stdout


# ---- --set ---------------------------------------------------------------------------------------
def test_set_renders_the_quickstart_for_kubernetes_without_editing_a_copy(home, tmp_path):
    plain = qlaunch("render", QUICKSTART, "--backend", "k8s", "-o", tmp_path / "no", home=home)
    assert plain.returncode == 2 and "storage.root" in plain.stderr  # the file as shipped cannot
    out = tmp_path / "k8s"
    result = qlaunch(
        "render",
        QUICKSTART,
        "--backend",
        "k8s",
        "-o",
        out,
        "--set",
        "storage.root=/mnt/qlaunch",
        "--set",
        "kubernetes.namespace=ml-team",
        home=home,
    )
    assert result.returncode == 0, result.stderr
    documents = [d for f in sorted(out.glob("*.yaml")) for d in yaml.safe_load_all(f.read_text()) if d]
    assert documents
    assert {d["metadata"]["namespace"] for d in documents if "namespace" in d.get("metadata", {})} == {"ml-team"}
    assert "/mnt/qlaunch/quickstart/" in "".join(f.read_text() for f in out.glob("*.yaml"))


def test_set_values_are_yaml_typed_and_a_grid_axis_can_be_replaced(home):
    result = qlaunch(
        "plan",
        QUICKSTART,
        "--json",
        "--set",
        "train.max_steps=7",
        "--set",
        "lora.dropout=0",
        "--set",
        "grid.lora.r=[4, 8]",
        "--set",
        "train.sft_args.neftune_noise_alpha=5e-1",
        home=home,
    )
    assert result.returncode == 0, result.stderr
    import json

    runs = json.loads(result.stdout)["runs"]
    assert len(runs) == 4  # 2 learning rates × 2 ranks
    assert {r["overrides"]["lora.r"] for r in runs} == {4, 8}


@pytest.mark.parametrize(
    "command", ["check", "plan", "render", "run", "submit", "status", "report", "preflight", "prefetch", "tensorboard"]
)
def test_every_experiment_command_takes_set_and_errors_name_the_key(home, tmp_path, command):
    extra = {"render": ["-o", tmp_path / "out"], "run": ["--dry-run"], "submit": ["--dry-run"]}.get(command, [])
    result = qlaunch(command, QUICKSTART, *extra, "--set", "train.lerning_rate=1", home=home)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "error: --set train.lerning_rate=1: unknown key 'lerning_rate' under train (did you mean learning_rate?)"
    )


def test_set_errors_name_the_set_not_the_file(home):
    bad_value = qlaunch("check", QUICKSTART, "--set", "train.max_steps=many", home=home)
    assert bad_value.returncode == 2
    assert bad_value.stderr.startswith("error: --set train.max_steps=many: train.max_steps: Input should be a valid")
    axis = qlaunch("check", QUICKSTART, "--set", "train.learning_rate=1e-4", home=home)
    assert axis.returncode == 2 and "--set grid.train.learning_rate=[...]" in axis.stderr
    no_value = qlaunch("check", QUICKSTART, "--set", "lora.r", home=home)
    assert no_value.returncode == 2 and "expected KEY=VALUE" in no_value.stderr
    bad_axis = qlaunch("check", QUICKSTART, "--set", "grid.lora.r=[x]", home=home)
    assert bad_axis.stderr.startswith("error: --set grid.lora.r=[x]: grid.lora.r[0] = 'x'"), bad_axis.stderr


# ---- the user config file --------------------------------------------------------------------------
def write_user_config(home: Path, text: str) -> Path:
    home.mkdir(parents=True, exist_ok=True)
    path = home / "config.yaml"
    path.write_text(text)
    return path


def test_user_config_gives_account_partition_and_namespace_and_the_file_wins(home, tmp_path):
    config = write_user_config(home, "slurm:\n  account: proj42\n  partition: gpu\nkubernetes:\n  namespace: ml-team\n")
    result = qlaunch("render", QUICKSTART, "--backend", "slurm", "-o", tmp_path / "slurm", home=home)
    assert result.returncode == 0, result.stderr
    assert f"from {config}: slurm.account, slurm.partition, kubernetes.namespace" in result.stdout
    script = next((tmp_path / "slurm").glob("*.train.sbatch")).read_text()
    assert "#SBATCH --account=proj42" in script and "#SBATCH --partition=gpu" in script

    experiment = tmp_path / "exp.yaml"
    experiment.write_text(QUICKSTART.read_text().replace("backend: local", "backend: local\nslurm:\n  partition: a100"))
    shutil.copytree(QUICKSTART.parent / "data", tmp_path / "data")
    result = qlaunch("render", experiment, "--backend", "slurm", "-o", tmp_path / "mine", home=home)
    assert result.returncode == 0, result.stderr
    script = next((tmp_path / "mine").glob("*.train.sbatch")).read_text()
    assert "#SBATCH --partition=a100" in script and "#SBATCH --account=proj42" in script  # file wins, key by key

    result = qlaunch(
        "render", QUICKSTART, "--backend", "k8s", "--set", "storage.root=/mnt/q", "-o", tmp_path / "k", home=home
    )
    assert result.returncode == 0, result.stderr
    assert "namespace: ml-team" in next((tmp_path / "k").glob("*.yaml")).read_text()


def test_user_config_cannot_change_what_is_trained_and_its_errors_name_its_lines(home):
    config = write_user_config(home, "train:\n  max_steps: 3\n")
    result = qlaunch("plan", QUICKSTART, home=home)
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: {config}:1: train: not a user default")
    write_user_config(home, "slurm:\n  partition: gpu\n  acount: proj42\n")
    result = qlaunch("plan", QUICKSTART, home=home)
    assert (
        result.returncode == 2
        and result.stderr.strip() == f"error: {config}:3: slurm.acount: unknown key, did you mean 'account'?"
    )


def test_user_config_leaves_run_ids_alone(home):
    before = qlaunch("plan", QUICKSTART, "--json", home=home)
    write_user_config(home, "slurm:\n  account: proj42\nkubernetes:\n  namespace: ml-team\n")
    after = qlaunch("plan", QUICKSTART, "--json", home=home)
    import json

    ids = [[r["run_id"] for r in json.loads(r.stdout)["runs"]] for r in (before, after)]
    assert ids[0] == ids[1] and len(ids[0]) == 2


def test_readme_set_example_runs_as_written(home, tmp_path):
    import re
    import shlex

    readme = (ROOT / "README.md").read_text()
    section = readme.split("### Changing keys without editing the file", 1)[1]
    line = re.search(r"```bash\n(qlaunch render .*?)\n```", section).group(1)
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    result = qlaunch(*shlex.split(line)[1:], home=home, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "rendered 2 runs for kubernetes" in result.stdout


# ---- --force says what it deletes ---------------------------------------------------------------
def forced_experiment(tmp_path: Path) -> tuple[Path, Path]:
    """An experiment whose one run has a trained adapter on disk (and a model that is gone, so a
    job started anyway fails in its first second instead of training)."""
    (tmp_path / "data.jsonl").write_text('{"instruction": "a", "response": "b"}\n')
    path = tmp_path / "exp.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "name": "forced",
                "model": {"name_or_path": str(tmp_path / "gone-model")},
                "dataset": {"path": "data.jsonl"},
                "storage": {"root": str(tmp_path / "runs")},
                "resources": {"gpus_per_node": 0},
                "inference": {"enabled": False},
            }
        )
    )
    from launcher.grid import plan

    (run,) = plan(path).runs
    run_dir = Path(run.run_dir)
    (run_dir / "adapter").mkdir(parents=True)
    (run_dir / "adapter" / "adapter_config.json").write_text("{}")
    (run_dir / "metrics.json").write_text("{}")
    return path, run_dir


def test_force_lists_what_it_deletes_and_needs_yes_off_a_terminal(home, tmp_path):
    path, run_dir = forced_experiment(tmp_path)
    args = ("run", path, "--force", "--skip-input-checks", "--no-prefetch")
    dry = qlaunch(*args, "--dry-run", home=home)
    assert dry.returncode == 0, dry.stderr
    assert "--force deletes the outputs of 1 run" in dry.stdout
    assert f"{run_dir}: adapter/ (the trained adapter), metrics.json" in dry.stdout
    assert "(dry run: nothing deleted)" in dry.stdout

    refused = subprocess.run(
        [sys.executable, "-m", "launcher.cli", *map(str, args)],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "QLAUNCH_HOME": str(home)},
        timeout=120,
    )
    assert refused.returncode == 2
    assert f"{run_dir}: adapter/ (the trained adapter)" in refused.stdout
    assert "nothing deleted, nothing started" in refused.stderr and "--yes" in refused.stderr
    assert (run_dir / "adapter" / "adapter_config.json").is_file()  # untouched

    confirmed = qlaunch(*args, "--yes", home=home)
    assert "--force deletes the outputs of 1 run" in confirmed.stdout
    assert not (run_dir / "adapter").exists() and not (run_dir / "metrics.json").exists()


def test_force_asks_on_a_terminal(home, tmp_path):
    import pty

    path, run_dir = forced_experiment(tmp_path)
    master, slave = pty.openpty()
    os.write(master, b"n\n")
    answered_no = subprocess.run(
        [sys.executable, "-m", "launcher.cli", "run", str(path), "--force", "--skip-input-checks", "--no-prefetch"],
        stdin=slave,
        capture_output=True,
        text=True,
        env={**os.environ, "QLAUNCH_HOME": str(home)},
        timeout=120,
    )
    os.close(slave)
    os.close(master)
    assert answered_no.returncode == 2, answered_no.stderr
    assert "Delete them? [y/N]" in answered_no.stdout and "nothing deleted" in answered_no.stderr
    assert (run_dir / "adapter" / "adapter_config.json").is_file()


def test_logs_cancel_and_infer_read_the_experiment_with_set_too(home, tmp_path):
    experiment = tmp_path / "exp.yaml"
    experiment.write_text(QUICKSTART.read_text())
    shutil.copytree(QUICKSTART.parent / "data", tmp_path / "data")
    elsewhere = tmp_path / "elsewhere"
    import json

    run_id = json.loads(qlaunch("plan", experiment, "--json", home=home).stdout)["runs"][0]["run_id"]
    log = elsewhere / "quickstart" / run_id / "train.log"
    log.parent.mkdir(parents=True)
    log.write_text("trained elsewhere\n")
    result = qlaunch("logs", run_id, "-e", experiment, "--set", f"storage.root={elsewhere}", home=home)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "trained elsewhere\n"
    for command in (("cancel", run_id, "-e", experiment), ("infer", run_id, "-e", experiment)):
        bad = qlaunch(*command, "--set", "lora.rr=1", home=home)
        assert bad.returncode == 2 and "--set lora.rr=1: unknown key 'rr' under lora (did you mean r?)" in bad.stderr
