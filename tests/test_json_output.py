"""`--json` documents keep their documented shape; the status table never cuts a run id or a state.

The JSON Schema of each document is a snapshot (tests/snapshots/json/): a change of shape must be
accepted on purpose (QLAUNCH_UPDATE_SNAPSHOTS=1 pytest -k snapshot) and reviewed like an API change.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from rich.console import Console

from launcher.backends.base import RunStatus, State
from launcher.grid import plan
from launcher.job.progress import Progress
from launcher.json_output import DOCUMENTS, PlanDocument, ReportDocument, StatusDocument
from launcher.status_view import Row, build_table

SNAPSHOTS = Path(__file__).parent / "snapshots" / "json"
HEAVY = ("torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate", "datasets")


@pytest.fixture
def experiment(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text(
        textwrap.dedent(f"""\
        name: json-demo
        storage:
          root: {tmp_path / "runs"}
        grid:
          lora.r: [8, 16]
          train.learning_rate: [1.0e-4, 2.0e-4]
    """)
    )
    return path


def qlaunch(*args, home):
    env = {**os.environ, "QLAUNCH_HOME": str(home)}
    return subprocess.run(
        [sys.executable, "-m", "launcher.cli", *args], capture_output=True, text=True, env=env, timeout=120
    )


@pytest.mark.parametrize("kind", sorted(DOCUMENTS))
def test_json_schema_matches_snapshot(kind):
    schema = json.dumps(DOCUMENTS[kind].model_json_schema(), indent=2, sort_keys=True) + "\n"
    path = SNAPSHOTS / f"{kind}.schema.json"
    if os.environ.get("QLAUNCH_UPDATE_SNAPSHOTS"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(schema)
    assert path.is_file(), f"no snapshot {path} (QLAUNCH_UPDATE_SNAPSHOTS=1 to write it)"
    assert schema == path.read_text(), f"the shape of `{kind} --json` changed: update README and the snapshot"


def test_plan_and_status_json_of_a_grid_never_started(experiment, tmp_path):
    expected = plan(experiment)
    result = qlaunch("plan", str(experiment), "--json", home=tmp_path / "home")
    assert result.returncode == 0, result.stderr
    planned = PlanDocument.model_validate_json(result.stdout)
    assert [(r.run_id, r.overrides) for r in planned.runs] == [(r.run_id, r.overrides) for r in expected.runs]
    assert planned.varying_keys == ["lora.r", "train.learning_rate"]

    result = qlaunch("status", str(experiment), "--json", home=tmp_path / "home")
    assert result.returncode == 0, result.stderr
    status = StatusDocument.model_validate_json(result.stdout)
    assert [r.run_id for r in status.runs] == [r.run_id for r in expected.runs]
    assert {(r.state, r.step, r.metric) for r in status.runs} == {("unknown", 0, None)}


def test_report_of_a_grid_never_started_says_so_and_imports_no_training_stack(experiment, tmp_path):
    out = tmp_path / "report"
    probe = (
        "import sys, json\nfrom launcher.cli import main\n"
        f"code = main(['report', {str(experiment)!r}, '-o', {str(out)!r}, '--json'])\n"
        f"print(json.dumps([code, sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})]))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "QLAUNCH_HOME": str(tmp_path / "home")},
    )
    *document, last = result.stdout.strip().splitlines()
    assert json.loads(last) == [0, []], result.stderr
    report = ReportDocument.model_validate_json("\n".join(document))
    assert report.best_run is None and len(report.runs) == 4
    assert any("nothing to compare" in note for note in report.notes)
    assert {p.name for p in out.iterdir()} == {"report.html", "report.md", "report.json"}


def test_a_narrow_terminal_drops_columns_but_never_cuts_run_id_or_state(experiment):
    """…and never drops one silently: what a width hides is named under the table, the grid
    keys are the last to go (#33)."""
    p = plan(experiment)
    states = [State.COMPLETED, State.OUT_OF_MEMORY, State.RUNNING, State.REQUEUED]
    rows = []
    for run, state in zip(p.runs, states):
        progress = Progress(step=7, total_steps=30, loss=1.2345, started_at=1.0, last_time=61.0)
        progress.inference_summary = {"metric": {"name": "json_match", "base": 0.1, "tuned": 0.85, "n": 40}}
        detail = "stopped after a checkpoint; `qlaunch run` resumes it" if state == State.REQUEUED else ""
        rows.append(Row(run.run_id, run.overrides, RunStatus(state=state, detail=detail), progress))
    for width in (200, 80, 60, 36):
        console = Console(width=width, file=io.StringIO(), color_system=None)
        console.print(build_table(p, rows, "local", width=width))
        text = console.file.getvalue()
        table, _, hidden = text.partition("hidden to fit")
        assert "…" not in text, text
        assert max(map(len, text.splitlines())) <= width, text
        for run, state in zip(p.runs, states):
            assert run.run_id in table and state.value in table, text
        assert ("0.10 → 0.85" in table) != ("json_match" in hidden), text
        for key in p.varying_keys:  # shown for every run, or named as hidden
            shown = all(
                any(run.run_id in line and str(run.overrides[key]) in line for line in table.splitlines())
                for run in p.runs
            )
            assert shown != (key in " ".join(hidden.split())), text


def test_readme_documents_every_field_of_every_document():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("### Machine-readable output", 1)[1].split("\n## ", 1)[0]
    from launcher import json_output

    for model in (
        *DOCUMENTS.values(),
        json_output.StatusRun,
        json_output.ReportRun,
        json_output.PlanRun,
        json_output.AttemptRecord,
        json_output.Answer,
        json_output.Environment,
        json_output.Metric,
        json_output.MetricInterval,
        json_output.Comparison,
    ):
        for name in model.model_fields:
            assert re.search(rf"\b{name}\b", section), f"README's Machine-readable output lacks {model.__name__}.{name}"


def test_report_shows_attempt_environments_side_by_side_and_marks_a_version_that_differs(experiment, tmp_path):
    """attempts/<n>/environment.json (written by the trainer where it records them)."""
    from launcher import report
    from launcher.backends import get_backend

    p = plan(experiment)
    first, second = p.runs[:2]
    for run, attempt, transformers in ((first, 1, "5.24.0"), (first, 2, "5.25.0"), (second, 1, "5.24.0")):
        record = {
            "attempt": attempt,
            "time": 1796187824.4 + attempt,
            "device": "cpu",
            "versions": {"transformers": transformers, "torch": "2.13.0+cpu"},
        }
        folder = Path(run.run_dir) / "attempts" / str(attempt)
        folder.mkdir(parents=True)
        (folder / "environment.json").write_text(json.dumps(record))
    document = report.build(p, get_backend("local"), "local")
    by_id = {run.run_id: run for run in document.runs}
    assert [e.source for e in by_id[first.run_id].environment] == [
        "attempts/1/environment.json",
        "attempts/2/environment.json",
    ]
    columns, rows = report.environment_table(document)
    assert len(columns) == 3
    differs = {key for key, _, flagged in rows if flagged}
    assert differs == {"versions.transformers"}  # attempt numbers and times differ by nature
    html = report.html(document, {})
    assert '<tr class="differs"><td class="text mono">versions.transformers</td>' in html
