"""The CLI on a login node: no training stack imported, clear errors, nothing submitted by render."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

HEAVY = ("torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate", "datasets")
ROOT = Path(__file__).resolve().parents[1]

EXPERIMENT = textwrap.dedent("""\
    name: cli-demo
    storage:
      root: /tmp/qlaunch-cli-demo-runs
    grid:
      lora.r: [8, 16]
""")


def qlaunch(*args, env=None, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "launcher.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, **(env or {})},
        timeout=120,
    )


@pytest.fixture
def experiment(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text(EXPERIMENT.replace("/tmp/qlaunch-cli-demo-runs", str(tmp_path / "runs")))
    return path


@pytest.mark.parametrize("command", ["--help", "plan", "render", "status"])
def test_login_node_commands_never_import_the_training_stack(experiment, tmp_path, command):
    args = {
        "--help": ["--help"],
        "plan": ["plan", str(experiment)],
        "render": ["render", str(experiment), "-o", str(tmp_path / "out")],
        "status": ["status", str(experiment)],
    }[command]
    probe = (
        "import sys\nfrom launcher.cli import main\n"
        f"try:\n    code = main({args!r})\nexcept SystemExit as e:\n    code = e.code\n"
        "import json; print(json.dumps([code, sorted(m for m in sys.modules if m.split('.')[0] in "
        f"{HEAVY!r})]))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        env={**os.environ, "QLAUNCH_HOME": str(tmp_path / "home")},
        timeout=120,
    )
    code, heavy = json.loads(result.stdout.strip().splitlines()[-1])
    assert code == 0, result.stderr
    assert heavy == []


def test_bad_file_exits_2_with_one_line_per_problem(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: demo\ntrain:\n  lerning_rate: 0.1\n")
    result = qlaunch("submit", str(path), env={"QLAUNCH_HOME": str(tmp_path / "home")})
    assert result.returncode == 2
    assert f"{path}:3: train.lerning_rate: unknown key" in result.stderr
    assert "Traceback" not in result.stderr


def test_render_local_writes_reviewable_commands_and_starts_nothing(experiment, tmp_path):
    result = qlaunch("render", str(experiment), "-o", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    scripts = sorted((tmp_path / "out").glob("*.sh"))
    assert len(scripts) == 3  # a script per run, one evaluation script for the grid
    assert "-m training.launch" in scripts[0].read_text()
    assert "-m training.evaluate_grid" in (tmp_path / "out" / "evaluate.sh").read_text()
    assert not (tmp_path / "runs").exists()  # nothing ran, nothing written to storage


def test_status_of_a_grid_never_started(experiment, tmp_path):
    result = qlaunch("status", str(experiment), env={"QLAUNCH_HOME": str(tmp_path / "home"), "COLUMNS": "200"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("not started") >= 2 and "unknown" not in result.stdout  # #33: say what it means
    assert "cli-demo" in result.stdout


def test_logs_of_an_unknown_run_says_how_to_name_it(tmp_path):
    result = qlaunch("logs", "deadbeef", env={"QLAUNCH_HOME": str(tmp_path / "home")})
    assert result.returncode == 2
    assert "no run or experiment 'deadbeef' known here" in result.stderr
    assert "-e FILE" in result.stderr


def test_status_top_up_needs_watch_and_a_scheduler(experiment, tmp_path):
    env = {"QLAUNCH_HOME": str(tmp_path / "home")}
    alone = qlaunch("status", str(experiment), "--top-up", env=env)
    assert alone.returncode == 2 and "use both (qlaunch status --watch --top-up)" in alone.stderr
    here = qlaunch("status", str(experiment), "--watch", "--top-up", "--backend", "local", env=env)
    assert here.returncode == 2 and "the local backend runs jobs here" in here.stderr
    assert not (tmp_path / "runs").exists()  # nothing submitted, nothing run
