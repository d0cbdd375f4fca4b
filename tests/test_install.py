"""The README's install lines work on a fresh machine as written (issue #33, 3).

qlaunch is not on PyPI, so the README installs it from a checkout, from a wheel `make dist`
builds, or from a git URL. This test copies the checkout (what `git clone` would give: tracked
and untracked-but-not-ignored files), then runs the Install section's bash blocks line by line,
verbatim, in bash with a fresh HOME, so `python3 -m venv ~/.venvs/qlaunch` is a fresh venv:

- block 1 in full (the launcher's dependencies come from the package index or pip's cache),
  then `qlaunch --version` and `qlaunch check examples/quickstart.yaml` from that venv;
- block 2 (the extras) with `pip` a shell function that adds `--no-deps`: torch and the rest
  are GBs; the lines still must be valid for pip and name extras the wheel declares;
- block 3: `make dist`, the wheel line, and the wheel's `qlaunch` from outside the checkout.

Lines naming a placeholder (`<your git host>`) cannot run here; the `git clone <URL>` line is
played by the copy.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def install_blocks() -> list[list[str]]:
    text = README.read_text()
    section = text.split("\n## Install\n", 1)[1].split("\n## ", 1)[0].split("\n### ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
    return [[line for line in block.splitlines() if line.strip()] for block in blocks]


def copy_checkout(dest: Path) -> None:
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split("\0")
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)


def run_line(line: str, cwd: Path, env: dict, prefix: str = "") -> subprocess.CompletedProcess:
    """One README line in bash, after `prefix` (the venv activation a reader's shell still has)."""
    result = subprocess.run(
        ["bash", "-c", f"set -eo pipefail\n{prefix}{line}"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, f"README line failed: {line}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.mark.slow  # about 1.5 min on 2 cores (four wheel builds, the launcher's dependencies)
@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_readme_install_lines_work_in_a_fresh_venv(tmp_path):
    launcher_block, extras_block, wheel_block = install_blocks()
    home = tmp_path / "home"
    home.mkdir()
    bin_dir = tmp_path / "bin"  # the machine's python3 (not this test's venv)
    bin_dir.mkdir()
    (bin_dir / "python3").symlink_to(Path(getattr(sys, "_base_executable", sys.executable)))
    path = [bin_dir] + [p for p in os.environ["PATH"].split(os.pathsep) if Path(p) != Path(sys.executable).parent]
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("PYTHONPATH", "VIRTUAL_ENV", "QLAUNCH_HOME", "PYTHONHOME")
    }
    env.update(HOME=str(home), PATH=os.pathsep.join(map(str, path)), PIP_DISABLE_PIP_VERSION_CHECK="1")
    env["QLAUNCH_HOME"] = str(tmp_path / "qlaunch-home")  # the run index, away from the real one

    clone, *lines = launcher_block
    assert clone.startswith("git clone ") and "&& cd qlaunch" in clone, clone
    checkout = tmp_path / "qlaunch"
    copy_checkout(checkout)

    activate = ""
    outputs = {}
    for line in lines:
        outputs[line] = run_line(line, checkout, env, activate).stdout
        if line.startswith("python3 -m venv"):
            activate = line.split("&&", 1)[1].strip() + "\n"  # `. ~/.venvs/qlaunch/bin/activate`
            assert (home / ".venvs" / "qlaunch" / "bin" / "python").exists()
    version = next(out for line, out in outputs.items() if line.startswith("qlaunch --version"))
    assert re.match(r"qlaunch \d+\.\d+\.\d+ \(", version), version
    assert str(home / ".venvs" / "qlaunch") in version  # the venv's copy, not the checkout on a path
    check = next(out for line, out in outputs.items() if line.startswith("qlaunch check"))
    assert "inputs OK: 2 runs checked" in check

    for line in extras_block:
        no_deps = 'pip() { command pip "$@" --no-deps; }\n'  # not PIP_NO_DEPS: the build env needs its deps
        result = run_line(line, checkout, env, activate + no_deps)
        assert "does not provide the extra" not in result.stdout + result.stderr, line

    for line in wheel_block:
        if "<" in line:
            assert "git+https://" in line  # the git URL form: needs a host this test does not have
            continue
        run_line(line, checkout, env, activate)
    from launcher import __version__

    assert (checkout / "dist" / f"qlaunch-{__version__}-py3-none-any.whl").is_file(), "README names another wheel"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    version = run_line("qlaunch --version", elsewhere, env, activate).stdout
    assert "site-packages" in version and str(checkout) not in version, version
    check = run_line(f"qlaunch check {checkout}/examples/quickstart.yaml", elsewhere, env, activate).stdout
    assert "inputs OK" in check
