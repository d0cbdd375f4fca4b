"""Per-attempt environment records, and `qlaunch status` saying when a grid is not comparable."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from launcher.backends.base import RunStatus
from launcher.grid import plan
from launcher.job.environments import environment_file, version_mismatches
from launcher.job.progress import summarize
from launcher.job.storage import write_json
from launcher.status_view import Row, build_table


def _record(transformers: str) -> dict:
    return {"versions": {"python": "3.11.7", "torch": "2.13.0", "transformers": transformers, "peft": "0.21.2"}}


def _rendered(table) -> str:
    console = Console(width=200, record=True)
    console.print(table)
    return console.export_text()


def test_status_flags_a_grid_whose_runs_trained_under_different_versions(tmp_path, tiny_experiment):
    p = plan(tiny_experiment(tmp_path, grid={"train.learning_rate": [1e-4, 2e-4]}))
    first, second = p.runs
    write_json(environment_file(Path(first.run_dir), 1), _record("5.24.0"))
    write_json(environment_file(Path(second.run_dir), 1), _record("5.24.0"))
    rows = [Row(r.run_id, r.overrides, RunStatus(), summarize([])) for r in p.runs]
    assert "not comparable" not in _rendered(build_table(p, rows, "local"))

    # the second run was resumed under a newer transformers
    write_json(environment_file(Path(second.run_dir), 2), _record("5.25.0"))
    text = " ".join(_rendered(build_table(p, rows, "local")).split())  # the caption wraps at the table's width
    assert "not comparable: transformers differs across the grid" in text
    assert f"5.25.0 ({second.run_id})" in text and first.run_id in text


def test_matching_records_give_no_warning_and_missing_ones_are_not_a_difference():
    assert version_mismatches({"a": [_record("5.24.0")], "b": [_record("5.24.0")], "c": []}) == []
    assert version_mismatches({"a": [_record("5.24.0")], "b": [_record("5.23.0")]}) == [
        "transformers differs across the grid: 5.23.0 (b), 5.24.0 (a)"
    ]
