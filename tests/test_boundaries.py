"""The house's walls (issue #27), read from the code's own imports: the job side (`training/`)
imports only the launcher's contract (`launcher/job/`), the contract imports nothing else of the
launcher, the launcher never imports the job side, and the commands a login node runs never load
torch or transformers."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "bitsandbytes", "peft", "trl", "datasets", "accelerate")


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module) of every import in a file, lazy ones inside functions included."""
    parts = path.relative_to(REPO).with_suffix("").parts
    package = parts[:-1] if parts[-1] != "__init__" else parts[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(package[: len(package) - (node.level - 1)])
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            # `from launcher import x` imports launcher.x when x is a module
            for alias in node.names:
                candidate = f"{module}.{alias.name}"
                as_module = REPO / Path(*candidate.split("."))
                found.append(
                    (node.lineno, candidate if as_module.with_suffix(".py").exists() or as_module.is_dir() else module)
                )
    return found


def sources(folder: str) -> list[Path]:
    return sorted(p for p in (REPO / folder).rglob("*.py") if "__pycache__" not in p.parts)


def offenders(folder: str, allowed) -> list[str]:
    return [
        f"{path.relative_to(REPO)}:{line}: {module}"
        for path in sources(folder)
        for line, module in imported_modules(path)
        if not allowed(path, module)
    ]


def test_training_imports_only_the_contract():
    def allowed(path, module):
        return not module.startswith("launcher") or module == "launcher.job" or module.startswith("launcher.job.")

    assert offenders("training", allowed) == []


def test_the_contract_imports_nothing_else_of_the_launcher_nor_the_job_side():
    def allowed(path, module):
        if module.startswith(("training", "torch", "transformers")):
            return False
        # `launcher` itself: the package root, for __version__
        return not module.startswith("launcher.") or module.startswith("launcher.job")

    assert offenders("launcher/job", allowed) == []


def test_the_launcher_never_imports_the_job_side():
    assert offenders("launcher", lambda path, module: not module.startswith("training")) == []


def test_the_walls_would_catch_a_crossing(tmp_path):
    """The checks above fail on the import they forbid (a relative one included)."""
    probe = REPO / "launcher" / "job" / "_boundary_probe.py"
    probe.write_text("from ..grid import Plan\n")
    try:
        assert offenders(
            "launcher/job", lambda p, m: not m.startswith("launcher.") or m.startswith("launcher.job")
        ) == ["launcher/job/_boundary_probe.py:1: launcher.grid"]
    finally:
        probe.unlink()


def heavy_imports(*args: str, cwd: Path, home: Path) -> list[str]:
    env = {**os.environ, "QLAUNCH_HOME": str(home), "COLUMNS": "120", "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "launcher.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    modules = [
        line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")
    ]
    assert len(modules) > 50, result.stderr[-2000:]  # -X importtime did report
    return sorted({m for m in modules if m.split(".")[0] in HEAVY})


@pytest.mark.parametrize("command", [["--help"], ["plan"], ["render", "--backend", "slurm"], ["status"]])
def test_login_node_commands_load_no_training_library(tmp_path, command):
    shutil.copytree(REPO / "examples" / "data", tmp_path / "data")
    (tmp_path / "exp.yaml").write_text((REPO / "examples" / "quickstart.yaml").read_text())
    args = command if command == ["--help"] else [command[0], "exp.yaml", *command[1:]]
    if command[0] == "render":
        args += ["--out", str(tmp_path / "rendered")]
    assert heavy_imports(*args, cwd=tmp_path, home=tmp_path / "home") == []
