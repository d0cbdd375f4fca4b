"""An installed wheel finds its templates and examples without the checkout."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def tracked_files(folder: str) -> list[str]:
    out = subprocess.run(["git", "ls-files", folder], cwd=ROOT, capture_output=True, text=True)
    files = out.stdout.split()
    if not files:  # not a git checkout (an sdist): every file on disk
        files = [str(p.relative_to(ROOT)) for p in (ROOT / folder).rglob("*") if p.is_file()]
    return [f for f in files if "__pycache__" not in f]


def test_wheel_carries_templates_and_examples_and_uses_them(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path / "dist"), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    (wheel,) = (tmp_path / "dist").glob("qlaunch-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for folder in ("slurm", "examples"):
        expected = tracked_files(folder)
        assert expected, f"{folder}/ is empty"
        for name in expected:
            assert f"launcher/_data/{name}" in names, f"{name} missing from the wheel"
    assert not any("qlaunch-runs" in n for n in names)

    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    probe = "import launcher.templates as t; print(t.data_dir('slurm')); print(t.data_dir('examples'))"
    out = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(site)},
        check=True,
    ).stdout.split()
    assert all(line.startswith(str(site / "launcher" / "_data")) for line in out), out
