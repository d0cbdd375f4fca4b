"""Reports and results on a shared filesystem are readable by the team: atomic writes
(launcher.storage.atomic_write_text, which reports, metrics.json, inference results and
submission records go through) give a file the mode a plain open() gives it, 0666 less the
umask, not mkstemp's private 0600."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from launcher.job.storage import atomic_write_text, write_json

ROOT = Path(__file__).resolve().parents[1]


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_qlaunch_report_files_follow_the_umask(tmp_path, umask, mode):
    (tmp_path / "data.jsonl").write_text('{"text": "hi"}\n')
    experiment = tmp_path / "e.yaml"
    experiment.write_text("name: modes\nstorage: {root: ./runs}\ndataset: {path: data.jsonl}\n")
    env = {**os.environ, "HOME": str(tmp_path / "home"), "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            f"import os, sys; os.umask({umask}); from launcher.cli import main; sys.exit(main())",
            "report",
            str(experiment),
            "-o",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    written = sorted((tmp_path / "out").glob("report.*"))
    assert [p.name for p in written] == ["report.html", "report.json", "report.md"]
    assert {p.name: oct(_mode(p)) for p in written} == {p.name: oct(mode) for p in written}


def test_results_written_atomically_are_group_and_world_readable(tmp_path):
    old = os.umask(0o022)
    try:
        write_json(tmp_path / "inference" / "summary.json", {"metric": 1})
        atomic_write_text(tmp_path / "metrics.json", "{}\n")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "inference" / "summary.json") == 0o644
    assert _mode(tmp_path / "metrics.json") == 0o644
    assert not list(tmp_path.rglob(".*.json.*"))  # no temporary file left behind
